//! Test helpers: a real app on port 0 over a real SQLite file in a temp dir.
#![allow(dead_code)]

pub mod delivery;

use common::store::SqliteStore;
use reqwest::{Client, Response};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ticketing::startup::Application;
use tokio_util::sync::CancellationToken;

pub const JWT_KEY: &str = "test-jwt-key";

pub struct TestApp {
    pub addr: SocketAddr,
    pub db_path: PathBuf,
    pub store: SqliteStore,
    pub client: Client,
    pub shutdown: CancellationToken,
    pub dir: tempfile::TempDir,
}

pub async fn spawn_app() -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("data/tickets.db");
    let store = SqliteStore::open(&db_path, Default::default())
        .await
        .expect("open store");
    let probes = Arc::new(ticketing::ops::Probes {
        role: "api",
        store: Some(Arc::new(store.clone())),
        outbox: Some(Arc::new(store.clone())),
        nats: None,
        nats_required: false,
        orders: None,
        redis: None,
        jobs: None,
        alert_threshold: 5,
    });
    let app = Application::build(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::new(store.clone()),
        JWT_KEY,
        probes,
    )
    .await
    .expect("build app");
    let addr = app.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        addr,
        db_path,
        store,
        client: Client::new(),
        shutdown,
        dir,
    }
}

pub fn token(user: &str) -> String {
    api::JwtKey::new(JWT_KEY)
        .sign(user, &format!("{user}@test.dev"))
        .expect("sign")
}

pub fn session_cookie(user: &str) -> String {
    format!("session={}", api::auth::session_cookie_value(&token(user)))
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn create(&self, user: &str, body: Value) -> Response {
        self.client
            .post(self.url("/api/tickets"))
            .header("cookie", session_cookie(user))
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// Creates a ticket and returns its JSON, asserting 201.
    pub async fn create_ok(&self, user: &str, title: &str, price: f64) -> Value {
        let res = self
            .create(user, serde_json::json!({"title": title, "price": price}))
            .await;
        assert_eq!(res.status(), 201);
        res.json().await.expect("json")
    }

    pub async fn update(&self, user: &str, id: &str, body: Value) -> Response {
        self.client
            .put(self.url(&format!("/api/tickets/{id}")))
            .header("cookie", session_cookie(user))
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// A direct connection to the app's SQLite file, to look at (or poke) what it stored.
    pub fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.db_path).expect("open db");
        c.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        c
    }

    pub fn count(&self, table: &str) -> i64 {
        self.db()
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    }
}

/// Asserts the error shape and returns the list of errors.
pub async fn errors(res: Response, status: u16) -> Vec<Value> {
    assert_eq!(res.status(), status);
    let body: Value = res.json().await.expect("error body is JSON");
    let errors = body["errors"].as_array().expect("errors array").clone();
    assert!(!errors.is_empty());
    for e in &errors {
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    errors
}

/// A SQLite store on a file in a temp dir of its own (kept while the dir lives).
pub async fn sqlite_store() -> (Arc<SqliteStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqliteStore::open(dir.path().join("t.db"), Default::default())
        .await
        .expect("open");
    (Arc::new(store), dir)
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
