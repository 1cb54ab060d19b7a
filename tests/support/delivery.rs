//! Helpers for delivery tests: `ticketing` roles as child processes, reading the JetStream
//! stream back, and a real webhook receiver.
#![allow(dead_code)]

use super::{eventually, session_cookie};
use axum::Json;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use testkit::NatsServer;

pub const BIN: &str = env!("CARGO_BIN_EXE_ticketing");
/// The stream the tests' roles publish to (`NATS_CLUSTER_ID`).
pub const STREAM: &str = "ticketing";
/// Deadline of the slow conditions (a role starting, a backlog draining).
pub const LONG: Duration = Duration::from_secs(60);

/// A `ticketing` role running as a child process, logging JSON lines to a file; killed on drop.
pub struct Role {
    pub child: Child,
    pub log: PathBuf,
}

pub fn spawn_role(role: &str, env: &[(&str, String)], log: PathBuf) -> Role {
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(BIN);
    cmd.arg(role)
        .env_remove("MONGO_URI")
        .env("JWT_KEY", super::JWT_KEY)
        .env("RUST_LOG", "info,worker=debug,scheduler=debug")
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
    // Several workers and schedulers run side by side: each gets its own health port.
    let port = testkit::free_port().expect("free port");
    cmd.env("HEALTH_PORT", port.to_string());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn ticketing");
    Role { child, log }
}

impl Role {
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// The JSON log lines written so far.
    pub fn logs(&self) -> Vec<Value> {
        log_lines(&self.log)
    }

    /// Log lines whose message contains `needle`.
    pub fn logged(&self, needle: &str) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(needle)))
            .collect()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// One message stored in the stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub sequence: u64,
    pub subject: String,
    pub msg_id: String,
    pub payload: Value,
}

/// Every message of `stream`, in stream order (empty when the stream does not exist yet).
pub async fn stream_messages(nats_url: &str, stream: &str) -> Vec<StoredMessage> {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let Ok(mut s) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let info = s.info().await.expect("stream info").clone();
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return out;
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let m = s.get_raw_message(seq).await.expect("message");
        out.push(StoredMessage {
            sequence: m.sequence,
            subject: m.subject.to_string(),
            msg_id: m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default(),
            payload: serde_json::from_slice(&m.payload).expect("JSON payload"),
        });
    }
    out
}

/// A real HTTP server recording every JSON body posted to it; answers `status`.
#[derive(Clone)]
pub struct Webhook {
    pub addr: SocketAddr,
    state: Arc<HookState>,
}

#[derive(Default)]
struct HookState {
    /// Bodies it answered 200 to.
    received: Mutex<Vec<Value>>,
    /// Posts it refused (503) while down.
    refused: AtomicUsize,
    down: AtomicBool,
}

impl Webhook {
    pub async fn start() -> Self {
        let state = Arc::new(HookState::default());
        let app = axum::Router::new()
            .route(
                "/hook",
                post(
                    |State(s): State<Arc<HookState>>, Json(body): Json<Value>| async move {
                        if s.down.load(Ordering::SeqCst) {
                            s.refused.fetch_add(1, Ordering::SeqCst);
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        s.received.lock().expect("lock").push(body);
                        axum::http::StatusCode::OK
                    },
                ),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The bodies it took, in order.
    pub fn bodies(&self) -> Vec<Value> {
        self.state.received.lock().expect("lock").clone()
    }

    /// While down, it answers 503 and keeps nothing.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Posts it refused while down.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// The digests of `kind` (`firing` or `resolved`) it took.
    pub fn digests(&self, kind: &str) -> Vec<Value> {
        self.bodies()
            .into_iter()
            .filter(|b| b["kind"] == kind)
            .collect()
    }

    /// How many events the digests of `kind` told of, in all.
    pub fn events_told(&self, kind: &str) -> u64 {
        self.digests(kind)
            .iter()
            .filter_map(|b| b["events"].as_u64())
            .sum()
    }
}

/// Every event exactly once, each carrying its event id (an ObjectId) as `Nats-Msg-Id`.
pub fn assert_once_each(messages: &[StoredMessage], expected: usize) {
    assert_eq!(messages.len(), expected, "every event exactly once");
    let ids: std::collections::HashSet<&str> = messages.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), expected, "one Nats-Msg-Id per message");
    assert!(
        ids.iter().all(|id| id.len() == 24),
        "Nats-Msg-Id is the event's ObjectId"
    );
}

/// Each of `tickets` has one `ticket.created` message whose payload is the ticket as stored, and
/// the first ticket's `updates` follow its creation in version order, with their stored payloads.
pub fn assert_created_then_updated(
    messages: &[StoredMessage],
    tickets: &[Value],
    updates: &[Value],
) {
    for t in tickets {
        let created: Vec<&StoredMessage> = messages
            .iter()
            .filter(|m| m.subject == "ticket.created" && m.payload["id"] == t["id"])
            .collect();
        assert_eq!(created.len(), 1);
        assert_eq!(&created[0].payload, t, "payload = the ticket as stored");
    }
    let first = &tickets[0]["id"];
    let of_first: Vec<&StoredMessage> = messages
        .iter()
        .filter(|m| &m.payload["id"] == first)
        .collect();
    let versions: Vec<i64> = of_first
        .iter()
        .map(|m| m.payload["version"].as_i64().expect("version"))
        .collect();
    let expected: Vec<i64> = (0..=updates.len() as i64).collect();
    assert_eq!(versions, expected, "in order per ticket");
    for (message, update) in of_first[1..].iter().zip(updates) {
        assert_eq!(message.subject, "ticket.updated");
        assert_eq!(&message.payload, update);
    }
}

/// A temp dir with the SQLite file every role of a test shares, its logs, and an HTTP client.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub client: reqwest::Client,
}

impl Setup {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("tickets.db");
        Self {
            dir,
            db,
            client: reqwest::Client::new(),
        }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Settings every role shares.
    pub fn env(
        &self,
        nats: &NatsServer,
        extra: &[(&'static str, String)],
    ) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("SQLITE_PATH", self.db.display().to_string()),
            ("NATS_URL", nats.url()),
            ("NATS_CLUSTER_ID", STREAM.to_owned()),
            ("RETRY_SCHEDULE", "* * * * * *".to_owned()),
        ];
        env.extend_from_slice(extra);
        env
    }

    pub fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.db).expect("db");
        c.busy_timeout(Duration::from_secs(10)).expect("busy");
        c
    }

    pub fn events(&self) -> i64 {
        self.db()
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap_or(-1)
    }

    pub fn min_attempts(&self) -> i64 {
        self.db()
            .query_row("SELECT COALESCE(MIN(attempts), -1) FROM events", [], |r| {
                r.get(0)
            })
            .unwrap_or(-1)
    }

    pub async fn wait_api(&self, port: u16) {
        let url = format!("http://127.0.0.1:{port}/api/tickets");
        eventually(Duration::from_secs(30), "the API to answer", || {
            let (client, url) = (&self.client, &url);
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
    }

    pub async fn create(&self, port: u16, title: &str) -> Value {
        let res = self
            .client
            .post(format!("http://127.0.0.1:{port}/api/tickets"))
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
        res.json().await.expect("json")
    }

    pub async fn update(&self, port: u16, id: &str, title: &str) -> Value {
        let res = self
            .client
            .put(format!("http://127.0.0.1:{port}/api/tickets/{id}"))
            .header("cookie", session_cookie("seller"))
            .json(&json!({"title": title, "price": 12.5}))
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 200);
        res.json().await.expect("json")
    }
}

impl Drop for Setup {
    /// On failure, show what each role logged: the first thing anyone debugging wants.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("==== {} (last 40 lines)", path.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

pub async fn messages_when(nats: &NatsServer, count: usize) -> Vec<StoredMessage> {
    let url = nats.url();
    eventually(LONG, &format!("{count} messages in the stream"), || {
        let url = url.clone();
        async move {
            let m = stream_messages(&url, STREAM).await;
            (m.len() >= count).then_some(m)
        }
    })
    .await
}
