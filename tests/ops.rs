//! Operability: health and readiness, metrics after real traffic, request ids, a clean shutdown
//! under load, and the operators' outbox commands.

mod support;

use common::domain::AttemptOutcome;
use common::outbox::{FailedAttempt, Lease, rules};
use common::store::{Outbox, OutboxAdmin, SqliteStore, Tickets};
use common::{NewTicket, Price, Title, UserId};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::delivery::{BIN, spawn_role, stream_messages};
use support::{eventually, session_cookie};
use testkit::{NatsServer, RedisServer, free_port};

const LONG: Duration = Duration::from_secs(60);

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let res = client.get(url).send().await.expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn wait_for(client: &reqwest::Client, url: &str) {
    eventually(Duration::from_secs(30), url, || async {
        client.get(url).send().await.ok().map(|_| ())
    })
    .await;
}

/// `name{labels} value` lines of a Prometheus text page whose name and labels contain `needles`.
fn metric_sum(page: &str, name: &str, needles: &[&str]) -> Option<f64> {
    let values: Vec<f64> = page
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_request_ids_of_all() {
    let mut nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port().expect("port");
    let _all = spawn_role(
        "all",
        &[
            ("PORT", port.to_string()),
            ("SQLITE_PATH", dir.path().join("t.db").display().to_string()),
            ("NATS_URL", nats.url()),
        ],
        dir.path().join("all.log"),
    );
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for(&client, &format!("{base}/healthz")).await;
    let (status, body) = get_json(&client, &format!("{base}/healthz")).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let ready = eventually(LONG, "ready with NATS up", || async {
        let (status, body) = get_json(&client, &format!("{base}/readyz")).await;
        (status == 200 && body["checks"]["nats"]["status"] == "up").then_some(body)
    })
    .await;
    assert_eq!(ready["checks"]["store"]["status"], "up");
    assert_eq!(ready["role"], "all");

    // Real traffic, then the metrics it produced.
    for i in 0..5 {
        let res = client
            .post(format!("{base}/api/tickets"))
            .header("cookie", session_cookie("u"))
            .header("x-request-id", format!("req-{i}"))
            .json(&json!({"title": "t", "price": 1}))
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 201);
        assert_eq!(
            res.headers()["x-request-id"],
            format!("req-{i}").as_str(),
            "echoed"
        );
    }
    let res = client
        .get(format!("{base}/api/tickets/nope"))
        .send()
        .await
        .expect("request");
    let generated = res.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(generated.len(), 24, "generated when absent");

    let page = eventually(LONG, "5 events published and the outbox empty", || async {
        let page = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let published = metric_sum(&page, "outbox_publish_successes_total", &[])?;
        // The gauges are read just before the counters are rendered: wait for a page where the
        // last delete is seen by both.
        let depth = metric_sum(&page, "outbox_depth", &[])?;
        (published >= 5.0 && depth == 0.0).then_some(page)
    })
    .await;
    let created = metric_sum(
        &page,
        "http_requests_total",
        &[
            r#"route="/api/tickets""#,
            r#"status="201""#,
            r#"method="POST""#,
        ],
    );
    assert_eq!(created, Some(5.0), "{page}");
    let not_found = metric_sum(
        &page,
        "http_requests_total",
        &[r#"route="/api/tickets/{id}""#, r#"status="404""#],
    );
    assert_eq!(not_found, Some(1.0));
    assert!(
        metric_sum(
            &page,
            "http_request_duration_seconds_bucket",
            &[r#"le="0.005""#]
        )
        .is_some()
    );
    assert_eq!(
        metric_sum(
            &page,
            "outbox_publish_attempts_total",
            &[r#"path="change_feed""#]
        ),
        Some(5.0)
    );
    assert_eq!(
        metric_sum(&page, "outbox_commit_to_puback_seconds_count", &[]),
        Some(5.0)
    );
    assert_eq!(metric_sum(&page, "outbox_depth", &[]), Some(0.0));
    assert_eq!(
        metric_sum(&page, "outbox_oldest_event_age_seconds", &[]),
        Some(0.0)
    );

    // NATS down: the API role stays ready (taking tickets during an outage is the point).
    nats.stop();
    let (status, body) = eventually(LONG, "readiness to see NATS down", || async {
        let (status, body) = get_json(&client, &format!("{base}/readyz")).await;
        (body["checks"]["nats"]["status"] == "down").then_some((status, body))
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_scheduler_serve_health_on_their_own_port() {
    let mut nats = NatsServer::start().expect("nats");
    let mut redis = RedisServer::start().expect("redis");
    let dir = tempfile::tempdir().expect("tmp");
    let (wport, sport) = (free_port().expect("port"), free_port().expect("port"));
    let common_env = |port: u16| {
        vec![
            ("HEALTH_PORT", port.to_string()),
            ("SQLITE_PATH", dir.path().join("t.db").display().to_string()),
            ("NATS_URL", nats.url()),
            ("REDIS_URL", redis.url()),
        ]
    };
    let _worker = spawn_role("worker", &common_env(wport), dir.path().join("w.log"));
    let _scheduler = spawn_role("scheduler", &common_env(sport), dir.path().join("s.log"));
    let client = reqwest::Client::new();
    for port in [wport, sport] {
        let base = format!("http://127.0.0.1:{port}");
        wait_for(&client, &format!("{base}/healthz")).await;
        eventually(LONG, "ready", || async {
            (get_json(&client, &format!("{base}/readyz")).await.0 == 200).then_some(())
        })
        .await;
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(metrics.status(), 200);
    }
    let (_, worker_ready) = get_json(&client, &format!("http://127.0.0.1:{wport}/readyz")).await;
    for dep in ["store", "nats", "redis", "jobs", "orders"] {
        assert_eq!(
            worker_ready["checks"][dep]["status"], "up",
            "{worker_ready}"
        );
    }
    // A worker without NATS cannot do its job; a scheduler without Redis neither.
    nats.stop();
    redis.stop();
    for (port, dep) in [(wport, "nats"), (sport, "redis")] {
        let body = eventually(LONG, "not ready", || async {
            let (status, body) =
                get_json(&client, &format!("http://127.0.0.1:{port}/readyz")).await;
            (status == 503).then_some(body)
        })
        .await;
        assert_eq!(body["checks"][dep]["status"], "down", "{body}");
        let (alive, _) = get_json(&client, &format!("http://127.0.0.1:{port}/healthz")).await;
        assert_eq!(alive, 200, "still alive");
    }
    // Without Redis the job worker cannot take jobs, and readiness says why.
    let jobs = eventually(LONG, "the job worker to be down", || async {
        let (_, body) = get_json(&client, &format!("http://127.0.0.1:{wport}/readyz")).await;
        (body["checks"]["jobs"]["status"] == "down").then_some(body)
    })
    .await;
    let reason = jobs["checks"]["jobs"]["error"].as_str().unwrap_or_default();
    assert!(reason.starts_with("job worker stopped: "), "{jobs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_leaves_nothing_locked() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("t.db");
    let port = free_port().expect("port");
    let env = vec![
        ("PORT", port.to_string()),
        ("SQLITE_PATH", db.display().to_string()),
        ("NATS_URL", nats.url()),
        ("RETRY_SCHEDULE", "* * * * * *".to_owned()),
    ];
    let mut all = spawn_role("all", &env, dir.path().join("all-1.log"));
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for(&client, &format!("{base}/healthz")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..8)
        .map(|_| {
            let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut created = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let res = client
                        .post(format!("{base}/api/tickets"))
                        .header("cookie", session_cookie("u"))
                        .json(&json!({"title": "load", "price": 1}))
                        .send()
                        .await;
                    match res {
                        Ok(r) if r.status() == 201 => {
                            let body: Value = r.json().await.expect("json");
                            created.push(body["id"].as_str().expect("id").to_owned());
                        }
                        Ok(r) => panic!("unexpected status {} during load", r.status()),
                        Err(_) => break, // the server stopped accepting
                    }
                }
                created
            })
        })
        .collect();
    eventually(LONG, "some load", || async {
        let n: i64 = rusqlite::Connection::open(&db)
            .ok()?
            .query_row("SELECT COUNT(*) FROM tickets", [], |r| r.get(0))
            .ok()?;
        (n >= 100).then_some(())
    })
    .await;
    all.sigterm();
    let status = tokio::task::spawn_blocking(move || {
        let status = all.child.wait();
        (status, all)
    })
    .await
    .expect("join");
    assert!(status.0.expect("wait").success(), "exit 0 after SIGTERM");
    stop.store(true, Ordering::Relaxed);
    let mut created = HashSet::new();
    for l in loaders {
        created.extend(l.await.expect("loader"));
    }
    assert!(created.len() >= 100);

    let conn = rusqlite::Connection::open(&db).expect("db");
    let stored: i64 = conn
        .query_row("SELECT COUNT(*) FROM tickets", [], |r| r.get(0))
        .expect("count");
    assert!(stored as usize >= created.len(), "every 201 is stored");
    let held: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM events WHERE locked_by IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(
        held, 0,
        "a clean shutdown leaves no claim waiting for its lease"
    );
    drop(conn);

    // Start again: whatever was not yet delivered goes out; each ticket's event exactly once.
    let _again = spawn_role("all", &env, dir.path().join("all-2.log"));
    let url = nats.url();
    let messages = eventually(LONG, "every created ticket in the stream", || {
        let (url, created) = (url.clone(), &created);
        async move {
            let m = stream_messages(&url, "ticketing").await;
            let ids: HashSet<String> = m
                .iter()
                .filter_map(|m| m.payload["id"].as_str().map(str::to_owned))
                .collect();
            created.is_subset(&ids).then_some(m)
        }
    })
    .await;
    let ids: Vec<&str> = messages.iter().map(|m| m.msg_id.as_str()).collect();
    let unique: HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice");
}

fn outbox(db: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("outbox")
        .args(args)
        .env("SQLITE_PATH", db)
        .env("ALERT_THRESHOLD", "3")
        .env_remove("MONGO_URI")
        .output()
        .expect("run");
    // Data on stdout, logs and errors on stderr.
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_commands_show_and_retry_failed_events() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("t.db");
    let store = SqliteStore::open(&db, Default::default())
        .await
        .expect("open");
    for i in 0..3 {
        store
            .create_ticket(&NewTicket {
                title: Title::parse(&format!("t{i}")).expect("title"),
                price: Price::new(1.0).expect("price"),
                user_id: UserId::parse("u").expect("user"),
            })
            .await
            .expect("create");
    }
    let events = store.list_events(10, None).await.expect("list");
    // The first event failed four times (stuck), the second once, the third is fresh.
    for (event, failures) in [(&events[0], 4), (&events[1], 1)] {
        for n in 0..failures {
            let lease = Lease::new("test", Duration::from_secs(30));
            if n == 0 {
                store.claim_fresh(&[event.id], &lease).await.expect("claim");
            } else {
                store.claim_due(10, &lease).await.expect("claim");
            }
            store
                .fail(
                    &[event.id],
                    &lease,
                    &FailedAttempt::new(
                        format!("nats down #{n}"),
                        AttemptOutcome::NotStored,
                        rules::now(),
                        3,
                    ),
                )
                .await
                .expect("fail");
        }
    }
    drop(store);

    let (ok, text) = outbox(&db, &["stats", "--json"]);
    assert!(ok, "{text}");
    let stats: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(stats["depth"], 3);
    assert_eq!(stats["unlocked"], 2);
    assert_eq!(stats["locked"], 1);
    assert_eq!(stats["pastAlertThreshold"], 1);
    let (ok, text) = outbox(&db, &["stats"]);
    assert!(
        ok && text.contains("outbox depth") && text.contains("past alert threshold   1"),
        "{text}"
    );

    let (ok, text) = outbox(&db, &["list", "--stuck", "--json"]);
    assert!(ok, "{text}");
    let stuck: Vec<Value> = serde_json::from_str(&text).expect("json");
    assert_eq!(stuck.len(), 1);
    assert_eq!(stuck[0]["id"], json!(events[0].id.to_hex()));
    assert_eq!(stuck[0]["attempts"], 4);
    assert_eq!(stuck[0]["lastError"], "nats down #3");
    let (ok, table) = outbox(&db, &["list"]);
    assert!(
        ok && table.lines().count() == 4 && table.contains("ATTEMPTS"),
        "{table}"
    );

    let (ok, text) = outbox(&db, &["show", &events[0].id.to_hex()]);
    assert!(ok, "{text}");
    let shown: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(shown["failures"].as_array().map(Vec::len), Some(4));
    let (ok, text) = outbox(&db, &["show", "not-an-id"]);
    assert!(!ok && text.contains("not an event id"), "{text}");

    // Retry: the fresh (locked) event by id, then every stuck one.
    let (ok, text) = outbox(&db, &["retry", &events[2].id.to_hex()]);
    assert!(ok && text.contains("unlocked 1"), "{text}");
    let (ok, text) = outbox(&db, &["retry", "--all-stuck", "--json"]);
    assert!(ok, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("json")["unlocked"],
        1
    );
    let (_, text) = outbox(&db, &["stats", "--json"]);
    let stats: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(stats["unlocked"], 3, "all three are due for the next sweep");
}

/// The recorder's upkeep (on a timer, so that a process nobody scrapes does not keep every
/// histogram sample) changes nothing `/metrics` shows: counts and buckets stay cumulative.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stay_cumulative_across_the_recorders_upkeep() {
    let app = support::spawn_app().await;
    let labels = [
        r#"route="/api/tickets""#,
        r#"method="POST""#,
        r#"status="201""#,
    ];
    let scrape = || async {
        let res = app.client.get(app.url("/metrics")).send().await;
        res.expect("metrics").text().await.expect("text")
    };
    // (requests, histogram count, every bucket by its `le`), whatever this process counted before.
    let created = |page: &str| {
        let buckets: Vec<(String, f64)> = page
            .lines()
            .filter(|l| l.starts_with("http_request_duration_seconds_bucket{"))
            .filter(|l| labels.iter().all(|n| l.contains(n)))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?.to_owned();
                Some((le, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect();
        (
            metric_sum(page, "http_requests_total", &labels).unwrap_or(0.0),
            metric_sum(page, "http_request_duration_seconds_count", &labels).unwrap_or(0.0),
            buckets,
        )
    };
    let (requests0, count0, _) = created(&scrape().await);
    for i in 0..3 {
        app.create_ok("u", &format!("before {i}"), 1.0).await;
    }
    let (requests, count, before) = created(&scrape().await);
    assert_eq!((requests - requests0, count - count0), (3.0, 3.0));

    let handle = ticketing::ops::metrics_handle();
    handle.run_upkeep();
    for i in 0..2 {
        app.create_ok("u", &format!("after {i}"), 1.0).await;
    }
    handle.run_upkeep();
    let (requests, count, after) = created(&scrape().await);
    assert_eq!(
        (requests - requests0, count - count0),
        (5.0, 5.0),
        "a scrape after an upkeep still counts every request"
    );
    assert_eq!(before.len(), after.len(), "the same buckets");
    for ((le, was), (le_after, now)) in before.iter().zip(&after) {
        assert_eq!(le, le_after);
        assert!(now >= was, "bucket le={le} went from {was} to {now}");
    }
    let inf = after.iter().find(|(le, _)| le == "+Inf").map(|(_, v)| *v);
    assert_eq!(inf, Some(count), "the +Inf bucket holds every sample");
}
