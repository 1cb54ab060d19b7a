//! The retention of the stream this service creates (NATS_STREAM_MAX_AGE_SECS,
//! NATS_STREAM_MAX_BYTES), against a real nats-server: the stream is created with the configured
//! limits, a stream that exists with others (or other replicas) is left as it is and reported
//! once, a full stream or
//! a full server is recorded as "NATS is full" (in `ticketing outbox list` and `/metrics`) while
//! the events wait, and they are delivered once room is made. Limits that would forget events
//! before the duplicate window ends are refused at start.

mod support;

use async_nats::jetstream::{self, stream};
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::delivery::{BIN, Role, assert_once_each, spawn_role, stream_messages};
use support::{eventually, session_cookie};
use testkit::{NatsServer, free_port};

const STREAM: &str = "ticketing";
const LONG: Duration = Duration::from_secs(30);

/// `ticketing all` on a SQLite file of `dir`, sweeping every second.
struct All {
    port: u16,
    db: PathBuf,
    role: Role,
    client: reqwest::Client,
}

impl All {
    fn spawn(dir: &Path, name: &str, nats: &NatsServer, extra: &[(&'static str, String)]) -> Self {
        let port = free_port().expect("port");
        let db = dir.join("tickets.db");
        let mut env = vec![
            ("SQLITE_PATH", db.display().to_string()),
            ("NATS_URL", nats.url()),
            ("NATS_CLUSTER_ID", STREAM.to_owned()),
            ("RETRY_SCHEDULE", "* * * * * *".to_owned()),
            ("PORT", port.to_string()),
        ];
        env.extend_from_slice(extra);
        let role = spawn_role("all", &env, dir.join(format!("{name}.log")));
        Self {
            port,
            db,
            role,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn wait_api(&self) {
        eventually(LONG, "the API to answer", || async {
            let res = self.client.get(self.url("/healthz")).send().await.ok()?;
            (res.status() == 200).then_some(())
        })
        .await;
    }

    /// Creates a ticket; returns its id.
    async fn create(&self, title: &str) -> String {
        let res = self
            .client
            .post(self.url("/api/tickets"))
            .header("cookie", session_cookie("seller"))
            .json(&json!({"title": title, "price": 10}))
            .send()
            .await
            .expect("request");
        assert_eq!(
            res.status(),
            201,
            "the API takes tickets whatever NATS does"
        );
        let ticket: serde_json::Value = res.json().await.expect("json");
        ticket["id"].as_str().expect("id").to_owned()
    }

    fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.db).expect("db");
        c.busy_timeout(Duration::from_secs(10)).expect("busy");
        c
    }

    fn events(&self) -> i64 {
        self.db()
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap_or(-1)
    }

    /// Events whose failures include one that says `text`.
    fn failed_with(&self, text: &str) -> i64 {
        self.db()
            .query_row(
                "SELECT COUNT(*) FROM events WHERE attempts > 0 AND failures LIKE ?1",
                [format!("%{text}%")],
                |r| r.get(0),
            )
            .unwrap_or(0)
    }

    async fn metrics(&self) -> String {
        let res = self.client.get(self.url("/metrics")).send().await;
        res.expect("/metrics").text().await.expect("text")
    }

    /// `ticketing outbox list` of this instance's store.
    async fn outbox_list(&self) -> String {
        let out = tokio::process::Command::new(BIN)
            .args(["outbox", "list"])
            .env_remove("MONGO_URI")
            .env("SQLITE_PATH", &self.db)
            .output()
            .await
            .expect("ticketing outbox list");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logged(&self, needle: &str) -> Vec<serde_json::Value> {
        self.role.logged(needle)
    }
}

async fn jetstream(nats: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(nats.url()).await.expect("connect"))
}

/// The stream's configuration, once it exists.
async fn stream_config(js: &jetstream::Context) -> stream::Config {
    eventually(LONG, "the stream to exist", || async {
        let mut s = js.get_stream(STREAM).await.ok()?;
        Some(s.info().await.ok()?.config.clone())
    })
    .await
}

/// A `kind="storage_full"` failure counted on `/metrics`.
fn full_failures_counted(page: &str) -> bool {
    page.lines().any(|l| {
        l.starts_with("outbox_publish_failures_total{")
            && l.contains(r#"kind="storage_full""#)
            && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(1.0)
    })
}

/// Waits until the stream holds every one of `ids`' events once and the outbox is empty.
async fn delivered_once_each(nats: &NatsServer, all: &All, ids: &HashSet<String>) {
    eventually(LONG, "the outbox to drain", || async {
        (all.events() == 0).then_some(())
    })
    .await;
    let messages = stream_messages(&nats.url(), STREAM).await;
    assert_once_each(&messages, ids.len());
    let delivered: HashSet<String> = messages
        .iter()
        .map(|m| m.payload["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(&delivered, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_full_under_an_operators_limits_holds_events_back_until_it_has_room() {
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    let dir = tempfile::tempdir().expect("tmp");
    let limits = [
        ("NATS_STREAM_MAX_AGE_SECS", "3600".to_owned()),
        ("NATS_STREAM_MAX_BYTES", "5000000".to_owned()),
    ];

    // 1. The service creates the stream with the configured limits, at start.
    let first = All::spawn(dir.path(), "all-1", &nats, &limits);
    let config = stream_config(&js).await;
    assert_eq!(config.max_age, Duration::from_secs(3600));
    assert_eq!(config.max_bytes, 5_000_000);
    assert_eq!(config.discard, stream::DiscardPolicy::Old);
    assert_eq!(config.duplicate_window, Duration::from_secs(120));
    first.wait_api().await;
    let mut ids = HashSet::from([first.create("before").await]);
    delivered_once_each(&nats, &first, &ids).await;
    assert!(first.logged("exists with other limits").is_empty());
    drop(first);

    // 2. An operator caps the stream just above what it holds, refusing new messages past it.
    let mut s = js.get_stream(STREAM).await.expect("stream");
    let held = s.info().await.expect("info").state.bytes as i64;
    let capped = stream::Config {
        max_bytes: held + 600,
        discard: stream::DiscardPolicy::New,
        ..config.clone()
    };
    js.update_stream(capped.clone()).await.expect("update");

    // Left as it is, and reported once at start; so are its replicas (asked for 3 here).
    let mut asked = limits.to_vec();
    asked.push(("NATS_STREAM_REPLICAS", "3".to_owned()));
    let all = All::spawn(dir.path(), "all-2", &nats, &asked);
    let reported = eventually(LONG, "the other limits to be reported", || async {
        let lines = all.logged("exists with other limits");
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    let differences = reported[0]["differences"].as_str().expect("differences");
    assert!(
        differences.contains(&format!("max bytes {}, not 5000000", held + 600))
            && differences.contains("discard new, not old")
            && differences.contains("replicas 1, not 3"),
        "{differences}"
    );
    assert_eq!(reported[0]["level"], "WARN");
    all.wait_api().await;
    for i in 0..10 {
        ids.insert(all.create(&format!("show {i}")).await);
    }
    eventually(LONG, "events to fail with the stream full", || async {
        (all.failed_with("NATS is full: maximum bytes exceeded") >= 1).then_some(())
    })
    .await;
    let list = all.outbox_list().await;
    assert!(list.contains("NATS is full"), "{list}");
    let page = all.metrics().await;
    assert!(full_failures_counted(&page), "{page}");
    let now = js
        .get_stream(STREAM)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .clone();
    assert_eq!(
        (now.max_bytes, now.discard),
        (capped.max_bytes, capped.discard),
        "an existing stream is not changed"
    );

    // 3. Room again: every waiting event goes out, once, and the report was not repeated.
    js.update_stream(stream::Config {
        max_bytes: 5_000_000,
        ..capped
    })
    .await
    .expect("update");
    delivered_once_each(&nats, &all, &ids).await;
    assert_eq!(all.logged("exists with other limits").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_holds_events_back_says_so_and_delivers_once_space_is_freed() {
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "jetstream { max_file_store: 1MB }\n").expect("conf");
    let nats = NatsServer::start_with(&["-c", &conf.display().to_string()]).expect("nats");
    let js = jetstream(&nats).await;
    let all = All::spawn(dir.path(), "all", &nats, &[]);
    // Created with the defaults: 7 days, no byte limit but the server's, discarding old.
    let config = stream_config(&js).await;
    assert_eq!(config.max_age, Duration::from_secs(604_800));
    assert!(config.max_bytes <= 0, "no byte limit: {}", config.max_bytes);
    assert_eq!(config.discard, stream::DiscardPolicy::Old);

    // Another stream takes every byte the server has.
    js.create_stream(stream::Config {
        name: "filler".into(),
        subjects: vec!["filler.>".into()],
        ..Default::default()
    })
    .await
    .expect("filler stream");
    for size in [10_000, 1_000, 100] {
        for _ in 0..2_000 {
            let ack = js
                .publish("filler.x", vec![b'x'; size].into())
                .await
                .expect("send");
            if ack.await.is_err() {
                break;
            }
        }
    }

    all.wait_api().await;
    let mut ids = HashSet::new();
    for i in 0..10 {
        ids.insert(all.create(&format!("show {i}")).await);
    }
    eventually(LONG, "every event to fail with NATS full", || async {
        (all.failed_with("NATS is full: insufficient resources") == 10).then_some(())
    })
    .await;
    assert!(all.events() == 10, "the events wait in the outbox");
    let list = all.outbox_list().await;
    assert_eq!(list.matches("NATS is full").count(), 10, "{list}");
    let page = all.metrics().await;
    assert!(full_failures_counted(&page), "{page}");

    js.delete_stream("filler").await.expect("free the space");
    delivered_once_each(&nats, &all, &ids).await;
}

#[tokio::test]
async fn a_max_age_within_the_duplicate_window_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    for role in ["all", "worker"] {
        let out = tokio::process::Command::new(BIN)
            .arg(role)
            .env_remove("MONGO_URI")
            .env("JWT_KEY", support::JWT_KEY)
            .env("SQLITE_PATH", dir.path().join("t.db"))
            .env("NATS_DUPLICATE_WINDOW_SECS", "120")
            .env("NATS_STREAM_MAX_AGE_SECS", "120")
            .env("PORT", "0")
            .env("HEALTH_PORT", "0")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(LONG, out)
            .await
            .expect("refused at once")
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{role} must refuse to start");
        assert!(
            stderr.contains(
                "NATS_STREAM_MAX_AGE_SECS (120) must be longer than NATS_DUPLICATE_WINDOW_SECS (120)"
            ),
            "{role}: {stderr}"
        );
    }
}
