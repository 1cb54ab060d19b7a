//! Delivery of the outbox to JetStream with the MongoDB store, end to end: `ticketing all` as a
//! process on a database of its own, with its own `nats-server -js`. Runs only where
//! `TICKETS_TEST_MONGO_URI` names a replica set (e.g. `mongodb://127.0.0.1:27017/?replicaSet=rs0`).

mod support;

use common::store::OutboxAdmin;
use common::store::mongo::{MongoOptions, MongoStore};
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use support::delivery::{
    Role, StoredMessage, assert_created_then_updated, assert_once_each, spawn_role, stream_messages,
};
use support::{eventually, session_cookie};
use testkit::mongo::with_database;
use testkit::{NatsServer, free_port};

const URI_VAR: &str = "TICKETS_TEST_MONGO_URI";
const STREAM: &str = "ticketing";
const LONG: Duration = Duration::from_secs(60);

/// The role's log, shown when the test fails.
struct ShowLogOnFailure(PathBuf);

impl Drop for ShowLogOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.0).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("==== {} (last 40 lines)", self.0.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Sends `req` signed in as the seller, asserts `status` and returns the JSON body.
async fn send(req: reqwest::RequestBuilder, status: u16) -> Value {
    let res = req
        .header("cookie", session_cookie("seller"))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), status);
    res.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_and_updated_tickets_reach_the_stream_through_the_mongodb_change_stream() {
    let Some(base) = std::env::var(URI_VAR).ok().filter(|u| !u.trim().is_empty()) else {
        // Straight to stderr, past the test harness' capture: a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: no MongoDB (set {URI_VAR} to a replica-set URI to run the MongoDB delivery \
             test)"
        );
        return;
    };
    let database = format!("tickets_test_{}", common::EventId::new().to_hex());
    let uri = with_database(&base, &database);
    // The test's own view of the database (the role opens it too; indexes are idempotent).
    let store = MongoStore::open(&uri, MongoOptions::default())
        .await
        .expect("open the MongoDB store");
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port().expect("port");
    let log = dir.path().join("all.log");
    let _show_log = ShowLogOnFailure(log.clone());
    // A yearly sweep: whatever arrives now came through the change stream. Redis is
    // unreachable: `all` does not need it.
    let _all: Role = spawn_role(
        "all",
        &[
            ("MONGO_URI", uri.clone()),
            (
                "SQLITE_PATH",
                dir.path().join("unused.db").display().to_string(),
            ),
            ("PORT", port.to_string()),
            ("NATS_URL", nats.url()),
            ("NATS_CLUSTER_ID", STREAM.to_owned()),
            ("RETRY_SCHEDULE", "0 0 0 1 1 *".to_owned()),
            ("REDIS_URL", "redis://127.0.0.1:1".to_owned()),
        ],
        log,
    );
    let client = reqwest::Client::new();
    let base_url = format!("http://127.0.0.1:{port}/api/tickets");
    eventually(Duration::from_secs(30), "the API to answer", || {
        let (client, url) = (&client, &base_url);
        async move {
            client
                .get(url)
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
        }
    })
    .await;

    let mut tickets = Vec::new();
    for i in 0..3 {
        let req = client
            .post(&base_url)
            .json(&json!({"title": format!("show {i}"), "price": 10}));
        tickets.push(send(req, 201).await);
    }
    let id = tickets[0]["id"].as_str().expect("id").to_owned();
    let mut versions = Vec::new();
    for title in ["renamed", "renamed again"] {
        let req = client
            .put(format!("{base_url}/{id}"))
            .json(&json!({"title": title, "price": 12.5}));
        versions.push(send(req, 200).await);
    }

    let url = nats.url();
    let messages: Vec<StoredMessage> = eventually(LONG, "5 messages in the stream", || {
        let url = url.clone();
        async move {
            let m = stream_messages(&url, STREAM).await;
            (m.len() >= 5).then_some(m)
        }
    })
    .await;
    assert_once_each(&messages, 5);
    assert_created_then_updated(&messages, &tickets, &versions);

    eventually(LONG, "the events collection to empty", || async {
        store
            .list_events(10, None)
            .await
            .ok()
            .filter(|events| events.is_empty())
    })
    .await;
    store
        .database()
        .drop()
        .await
        .unwrap_or_else(|e| panic!("cannot drop {database}: {e}"));
}
