//! Helpers for delivery tests: `ticketing` roles as child processes, reading the JetStream
//! stream back, and a real webhook receiver.
#![allow(dead_code)]

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub const BIN: &str = env!("CARGO_BIN_EXE_ticketing");

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
    pub received: Arc<Mutex<Vec<Value>>>,
}

impl Webhook {
    pub async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route(
                "/hook",
                post(
                    |State(r): State<Arc<Mutex<Vec<Value>>>>, Json(body): Json<Value>| async move {
                        r.lock().expect("lock").push(body);
                        "ok"
                    },
                ),
            )
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, received }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.received.lock().expect("lock").clone()
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
