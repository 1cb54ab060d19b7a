//! A three-node JetStream cluster of the test's own (testkit::NatsCluster: real nats-servers on
//! loopback, routes, a store each) and `ticketing all` given all three URLs with
//! NATS_STREAM_REPLICAS=3, under a steady load of creates and updates, while servers are killed
//! with SIGKILL: the stream's leader, a server that is not the leader, the server the service is
//! connected to, then two of three. The API keeps answering, delivery resumes by itself after
//! each election, every event is in the stream exactly once and in version order per ticket, and
//! each restarted server catches up (its copy's message count, read from its monitoring
//! endpoint, agrees with the others).

mod support;

use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::delivery::{Webhook, assert_once_each, spawn_role, stream_messages};
use support::{eventually, session_cookie};
use testkit::{NatsCluster, free_port};

const STREAM: &str = "ticketing";
/// The service's connection name (`NATS_CLIENT_ID`), to find the server it is connected to.
const CLIENT: &str = "cluster-all";
/// Several elections of 4 to 9 s each fit in it.
const LONG: Duration = Duration::from_secs(60);

/// Creates and updates at a steady pace until stopped; every request must succeed. Returns
/// each event written: (ticket id, version).
struct Load {
    written: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(String, i64)>>,
}

impl Load {
    fn start(port: u16) -> Self {
        let written = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (written.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let url = format!("http://127.0.0.1:{port}/api/tickets");
            let mut events = Vec::new();
            let mut tickets: Vec<String> = Vec::new();
            let mut i = 0usize;
            while !stopped.load(Ordering::Relaxed) {
                // Every third request updates an earlier ticket: tickets get versions 1, 2, ...
                let (res, expected) = if i % 3 == 2 {
                    let id = &tickets[i % tickets.len()];
                    let res = client.put(format!("{url}/{id}"));
                    (res, 200)
                } else {
                    (client.post(&url), 201)
                };
                let res = res
                    .header("cookie", session_cookie("seller"))
                    .json(&json!({"title": format!("load {i}"), "price": 10}))
                    .send()
                    .await
                    .expect("the API answers");
                assert_eq!(res.status(), expected, "the API never waits on NATS");
                let ticket: serde_json::Value = res.json().await.expect("json");
                let id = ticket["id"].as_str().expect("id").to_owned();
                if expected == 201 {
                    tickets.push(id.clone());
                }
                events.push((id, ticket["version"].as_i64().expect("version")));
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            events
        });
        Self {
            written,
            stop,
            task,
        }
    }

    fn written(&self) -> usize {
        self.written.load(Ordering::Relaxed)
    }

    async fn stop(self) -> Vec<(String, i64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("every request answered as expected")
    }
}

/// Messages in the stream, as its leader reports them (`None` while no leader answers).
async fn stored(cluster: &NatsCluster) -> Option<u64> {
    let node = *cluster.running().first()?;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(cluster.url(node))
        .await
        .ok()?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client);
    let mut stream = js.get_stream(STREAM).await.ok()?;
    Some(stream.info().await.ok()?.state.messages)
}

/// Waits until the stream holds at least `count` messages: delivery has caught up with the
/// events written so far.
async fn delivered(cluster: &NatsCluster, count: usize, after: &str) -> Duration {
    let started = Instant::now();
    eventually(
        LONG,
        &format!("{count} events delivered {after}"),
        || async {
            stored(cluster)
                .await
                .filter(|&n| n >= count as u64)
                .map(|_| ())
        },
    )
    .await;
    started.elapsed()
}

/// The stream's leader, agreed by the running nodes.
async fn leader(cluster: &NatsCluster) -> usize {
    eventually(LONG, "the stream to have a leader", || async {
        cluster.stream_leader(STREAM)
    })
    .await
}

/// Restarts a killed node and waits until its copy of the stream has caught up: every copy
/// current with the leader, and this one holding at least what the stream held before.
async fn restart(cluster: &mut NatsCluster, node: usize) {
    let before = eventually(LONG, "the stream's count", || stored(cluster)).await;
    cluster.restart(node).expect("restart");
    let cluster = &*cluster;
    eventually(LONG, "the restarted server to catch up", || async {
        let held = cluster.stream_messages_on(node, STREAM)?;
        (held >= before && cluster.stream_current(STREAM)).then_some(())
    })
    .await;
}

/// Events that failed at least once and still wait in the outbox.
fn failing_events(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).expect("db");
    c.busy_timeout(Duration::from_secs(10)).expect("busy");
    c.query_row("SELECT COUNT(*) FROM events WHERE attempts > 0", [], |r| {
        r.get(0)
    })
    .unwrap_or(0)
}

/// On failure, the last lines of each log: the service's and every server's.
struct ShowLogs(Vec<PathBuf>);

impl Drop for ShowLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for path in &self.0 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("==== {} (last 30 lines)", path.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_replica_stream_loses_nothing_while_its_servers_die() {
    let mut cluster = NatsCluster::start(3).expect("three clustered nats-servers");
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("tickets.db");
    let port = free_port().expect("port");
    let webhook = Webhook::start().await;
    let all = spawn_role(
        "all",
        &[
            ("SQLITE_PATH", db.display().to_string()),
            ("NATS_URL", cluster.urls()),
            ("NATS_CLUSTER_ID", STREAM.to_owned()),
            ("NATS_CLIENT_ID", CLIENT.to_owned()),
            ("NATS_STREAM_REPLICAS", "3".to_owned()),
            ("NATS_ACK_TIMEOUT_SECS", "2".to_owned()),
            ("RETRY_SCHEDULE", "* * * * * *".to_owned()),
            ("ALERT_THRESHOLD", "3".to_owned()),
            ("ALERT_DIGEST_SECS", "1".to_owned()),
            ("ALERT_WEBHOOK_URL", webhook.url()),
            ("PORT", port.to_string()),
        ],
        dir.path().join("all.log"),
    );
    let _logs = ShowLogs(
        std::iter::once(all.log.clone())
            .chain((0..3).map(|i| cluster.log_path(i).to_owned()))
            .collect(),
    );

    // The service creates the stream with three replicas, one on each server.
    eventually(LONG, "a copy of the stream on every server", || async {
        let copies = (0..3).filter_map(|i| cluster.stream_on(i, STREAM)).count();
        (copies == 3 && cluster.stream_leader(STREAM).is_some()).then_some(())
    })
    .await;
    let client = reqwest::Client::new();
    eventually(LONG, "the API to answer", || async {
        let res = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .ok()?;
        (res.status() == 200).then_some(())
    })
    .await;
    let load = Load::start(port);
    delivered(&cluster, 20, "before any server dies").await;

    // 1. The stream's leader dies.
    let first = leader(&cluster).await;
    let killed = Instant::now();
    cluster.kill(first);
    let next = leader(&cluster).await;
    assert_ne!(next, first, "another server leads");
    let elected = killed.elapsed();
    delivered(&cluster, load.written(), "after the leader died").await;
    eprintln!(
        "leader {} killed: {} elected after {elected:?}, delivery caught up after {:?}",
        cluster.name(first),
        cluster.name(next),
        killed.elapsed()
    );
    restart(&mut cluster, first).await;

    // 2. A server that does not lead the stream dies.
    let lead = leader(&cluster).await;
    let follower = (0..3).find(|&i| i != lead).expect("a follower");
    let killed = Instant::now();
    cluster.kill(follower);
    delivered(&cluster, load.written(), "after a follower died").await;
    eprintln!(
        "follower {} killed: delivery caught up after {:?}",
        cluster.name(follower),
        killed.elapsed()
    );
    restart(&mut cluster, follower).await;

    // 3. The server the service is connected to dies: the client moves to another.
    let connected = eventually(LONG, "the service's connection", || async {
        cluster.connected_node(CLIENT)
    })
    .await;
    let killed = Instant::now();
    cluster.kill(connected);
    eventually(LONG, "the service to connect to another server", || async {
        cluster.connected_node(CLIENT).filter(|&n| n != connected)
    })
    .await;
    delivered(&cluster, load.written(), "after its server died").await;
    eprintln!(
        "the service's server {} killed: delivery caught up after {:?}",
        cluster.name(connected),
        killed.elapsed()
    );
    restart(&mut cluster, connected).await;

    // 4. Two of three die: no quorum, events wait in the outbox (their failures recorded) while
    // the API keeps taking tickets; one back and everything drains.
    let lead = leader(&cluster).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != lead).collect();
    cluster.kill(lead);
    cluster.kill(others[0]);
    let before = load.written();
    eventually(LONG, "events to wait in the outbox", || async {
        (load.written() > before + 10 && failing_events(&db) > 0).then_some(())
    })
    .await;
    let waiting = failing_events(&db);
    let restarted = Instant::now();
    // No quorum to catch up from yet: just start it.
    cluster.restart(lead).expect("restart");
    delivered(&cluster, load.written(), "after quorum came back").await;
    eprintln!(
        "two of three down: {waiting} events waiting; one back, delivery caught up after {:?}",
        restarted.elapsed()
    );
    restart(&mut cluster, others[0]).await;

    // Everything once, in version order per ticket, on every server.
    let events = load.stop().await;
    delivered(&cluster, events.len(), "in the end").await;
    eventually(LONG, "the outbox to drain", || async {
        let c = rusqlite::Connection::open(&db).ok()?;
        let left: i64 = c
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .ok()?;
        (left == 0).then_some(())
    })
    .await;
    let messages = stream_messages(&cluster.url(0), STREAM).await;
    assert_once_each(&messages, events.len());
    let mut versions: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for m in &messages {
        let id = m.payload["id"].as_str().expect("id").to_owned();
        versions
            .entry(id)
            .or_default()
            .push(m.payload["version"].as_i64().expect("version"));
    }
    for (ticket, seen) in &versions {
        let expected: Vec<i64> = (0..seen.len() as i64).collect();
        assert_eq!(seen, &expected, "ticket {ticket}: in version order");
    }
    let written: HashSet<(String, i64)> = events.into_iter().collect();
    let stored: HashSet<(String, i64)> = versions
        .into_iter()
        .flat_map(|(id, vs)| vs.into_iter().map(move |v| (id.clone(), v)))
        .collect();
    assert_eq!(stored, written, "every event written is in the stream");
    // Alerts as usual, in digests: every event that failed 3 times is told once in a firing
    // digest, and once more in a resolved one when the outage is over.
    eventually(
        LONG,
        "a resolved digest for every event that fired",
        || async {
            let bodies = webhook.bodies();
            let events = |kind: &str| -> u64 {
                bodies
                    .iter()
                    .filter(|b| b["kind"] == kind)
                    .filter_map(|b| b["events"].as_u64())
                    .sum()
            };
            let (firing, resolved) = (events("firing"), events("resolved"));
            (firing == resolved && bodies.last().is_none_or(|b| b["kind"] == "resolved"))
                .then_some(())
        },
    )
    .await;
    let total = messages.len() as u64;
    eventually(
        LONG,
        "every server's copy to hold every message",
        || async {
            let counts: Vec<Option<u64>> = (0..3)
                .map(|i| cluster.stream_messages_on(i, STREAM))
                .collect();
            counts.iter().all(|&c| c == Some(total)).then_some(())
        },
    )
    .await;
}
