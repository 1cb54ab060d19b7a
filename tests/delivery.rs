//! Delivery of the outbox to JetStream, end to end: `ticketing` roles as processes, with their
//! own `nats-server -js` and `redis-server` that the tests stop, pause and restart.

mod support;

use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use support::delivery::{
    LONG, Role, Setup, Webhook, assert_created_then_updated, assert_once_each, messages_when,
    spawn_role,
};
use support::eventually;
use testkit::{NatsServer, RedisServer, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_and_updated_tickets_reach_the_stream_through_the_change_feed() {
    let nats = NatsServer::start().expect("nats");
    let s = Setup::new();
    let port = free_port().expect("port");
    // A yearly sweep: whatever arrives now came through the change feed. Redis is unreachable:
    // `all` does not need it.
    let _all = spawn_role(
        "all",
        &s.env(
            &nats,
            &[
                ("PORT", port.to_string()),
                ("RETRY_SCHEDULE", "0 0 0 1 1 *".into()),
                ("REDIS_URL", "redis://127.0.0.1:1".into()),
            ],
        ),
        s.log("all"),
    );
    s.wait_api(port).await;
    let mut tickets = Vec::new();
    for i in 0..3 {
        tickets.push(s.create(port, &format!("show {i}")).await);
    }
    let id = tickets[0]["id"].as_str().expect("id").to_owned();
    let v1 = s.update(port, &id, "renamed").await;
    let v2 = s.update(port, &id, "renamed again").await;

    let messages = messages_when(&nats, 5).await;
    assert_once_each(&messages, 5);
    eventually(LONG, "the outbox to empty", || async {
        (s.events() == 0).then_some(())
    })
    .await;

    assert_created_then_updated(&messages, &tickets, &[v1, v2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_loses_nothing_and_is_told_in_digests_then_resolved() {
    let mut nats = NatsServer::start().expect("nats");
    let webhook = Webhook::start().await;
    let s = Setup::new();
    let port = free_port().expect("port");
    let _all = spawn_role(
        "all",
        &s.env(
            &nats,
            &[
                ("PORT", port.to_string()),
                ("ALERT_THRESHOLD", "3".into()),
                ("ALERT_WEBHOOK_URL", webhook.url()),
                ("ALERT_DIGEST_SECS", "2".into()),
            ],
        ),
        s.log("all"),
    );
    s.wait_api(port).await;
    nats.stop();

    let mut ids = HashSet::new();
    for i in 0..200 {
        let t = s.create(port, &format!("outage {i}")).await;
        ids.insert(t["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(ids.len(), 200);
    // Every event fails, is unlocked with its failure recorded, and is retried by each sweep
    // until it passes the alert threshold.
    eventually(LONG, "every event to have 3 failed attempts", || async {
        (s.events() == 200 && s.min_attempts() >= 3).then_some(())
    })
    .await;
    let (failures, locked): (String, bool) = s
        .db()
        .query_row("SELECT failures, is_locked FROM events LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("row");
    let failures: Vec<Value> = serde_json::from_str(&failures).expect("json");
    assert!(failures.len() >= 3 && failures[0]["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(failures[0]["at"].is_string());
    let _ = locked;
    let firing = eventually(LONG, "a firing digest of the 200 events", || async {
        (webhook.events_told("firing") >= 200).then(|| webhook.digests("firing"))
    })
    .await;
    assert_eq!(
        webhook.events_told("firing"),
        200,
        "each event in one digest"
    );
    assert!(
        firing.len() <= 3,
        "a few digests, not one per event: {}",
        firing.len()
    );
    let sample = &firing[0];
    assert!(
        sample["text"]
            .as_str()
            .is_some_and(|t| t.contains("failed to publish"))
    );
    for field in [
        "events",
        "tickets",
        "attempts",
        "oldestAgeSeconds",
        "errors",
        "sampleEventIds",
    ] {
        assert!(
            !sample[field].is_null(),
            "the digest lacks {field}: {sample}"
        );
    }

    nats.restart().expect("restart nats");
    let messages = messages_when(&nats, 200).await;
    eventually(LONG, "the outbox to empty", || async {
        (s.events() == 0).then_some(())
    })
    .await;
    assert_once_each(&messages, 200);
    let delivered: HashSet<String> = messages
        .iter()
        .map(|m| m.payload["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(delivered, ids);

    let resolved = eventually(LONG, "one resolved digest", || async {
        let r = webhook.digests("resolved");
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(resolved.len(), 1, "one resolved digest for the episode");
    assert_eq!(resolved[0]["events"], 200);
    assert!(resolved[0]["durationSeconds"].as_i64().is_some());
    assert_eq!(webhook.events_told("firing"), 200, "no event fired twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_holding_claims_is_taken_over_after_the_lease() {
    let nats = NatsServer::start().expect("nats");
    let redis = RedisServer::start().expect("redis");
    let s = Setup::new();
    let port = free_port().expect("port");
    let lease = [("OUTBOX_LOCK_SECS", "3".to_owned())];
    let _api = spawn_role(
        "api",
        &s.env(&nats, &[("PORT", port.to_string())]),
        s.log("api"),
    );
    let mut worker_a = spawn_role(
        "worker",
        &s.env(
            &nats,
            &[
                lease[0].clone(),
                ("NATS_CLIENT_ID", "worker-a".into()),
                ("NATS_ACK_TIMEOUT_SECS", "120".into()),
                ("REDIS_URL", redis.url()),
            ],
        ),
        s.log("worker-a"),
    );
    s.wait_api(port).await;
    s.create(port, "warm-up").await;
    messages_when(&nats, 1).await;

    // NATS stops answering: worker A sends, then waits for acks while holding its claims.
    nats.pause().expect("pause");
    for i in 0..20 {
        s.create(port, &format!("claimed {i}")).await;
    }
    // Its change feed is stuck awaiting the acks of the first chunk it claimed.
    let held = eventually(LONG, "worker A to hold claims", || async {
        let held: i64 = s
            .db()
            .query_row(
                "SELECT COUNT(*) FROM events WHERE locked_by LIKE 'worker-a/%'",
                [],
                |r| r.get(0),
            )
            .unwrap_or(0);
        (held > 0).then_some(held)
    })
    .await;
    worker_a.sigkill();
    nats.resume().expect("resume");
    assert_eq!(
        s.events(),
        20,
        "nothing was delivered while NATS was paused"
    );
    let still_held: i64 = s
        .db()
        .query_row(
            "SELECT COUNT(*) FROM events WHERE locked_by LIKE 'worker-a/%'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert!(
        still_held >= held,
        "the dead worker's claims are still there"
    );

    let extra = [
        lease[0].clone(),
        ("NATS_CLIENT_ID", "worker-b".into()),
        ("REDIS_URL", redis.url()),
    ];
    let worker_b = spawn_role("worker", &s.env(&nats, &extra), s.log("worker-b"));
    let _scheduler = spawn_role(
        "scheduler",
        &s.env(&nats, &[("REDIS_URL", redis.url())]),
        s.log("scheduler"),
    );
    eventually(
        LONG,
        "worker B to deliver the dead worker's events",
        || async { (s.events() == 0).then_some(()) },
    )
    .await;
    let messages = messages_when(&nats, 21).await;
    // Worker A's messages may have reached NATS before it died: JetStream dropped B's
    // re-publish of those as duplicates, so each event is still in the stream once.
    assert_once_each(&messages, 21);
    let swept: usize = worker_b
        .logged("RetryPublishingNATSEvents done")
        .iter()
        .filter_map(|l| l["claimed"].as_u64())
        .sum::<u64>() as usize;
    assert!(swept >= 1, "worker B's sweep took over the expired claims");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_and_two_schedulers_deliver_each_event_once_with_one_job_per_tick() {
    let mut nats = NatsServer::start().expect("nats");
    let redis = RedisServer::start().expect("redis");
    let s = Setup::new();
    let port = free_port().expect("port");
    let _api = spawn_role(
        "api",
        &s.env(&nats, &[("PORT", port.to_string())]),
        s.log("api"),
    );
    let workers: Vec<Role> = ["w1", "w2"]
        .iter()
        .map(|name| {
            let extra = [
                ("NATS_CLIENT_ID", (*name).to_owned()),
                ("REDIS_URL", redis.url()),
            ];
            spawn_role("worker", &s.env(&nats, &extra), s.log(name))
        })
        .collect();
    let _schedulers: Vec<Role> = ["s1", "s2"]
        .iter()
        .map(|name| {
            let extra = [
                ("NATS_CLIENT_ID", (*name).to_owned()),
                ("REDIS_URL", redis.url()),
            ];
            spawn_role("scheduler", &s.env(&nats, &extra), s.log(name))
        })
        .collect();
    s.wait_api(port).await;
    // NATS down first, so the retries go through the sweeps of both workers.
    nats.stop();
    for i in 0..100 {
        s.create(port, &format!("shared {i}")).await;
    }
    eventually(LONG, "every event to have failed once", || async {
        (s.events() == 100 && s.min_attempts() >= 1).then_some(())
    })
    .await;
    nats.restart().expect("restart");
    eventually(LONG, "the outbox to empty", || async {
        (s.events() == 0).then_some(())
    })
    .await;
    let messages = messages_when(&nats, 100).await;
    assert_once_each(&messages, 100);

    for w in &workers {
        assert!(
            w.logged("JetStream dropped a duplicate").is_empty(),
            "no event was published twice"
        );
    }
    let jobs_per_tick = eventually(LONG, "jobs of at least 3 ticks", || async {
        let mut jobs_per_tick: HashMap<i64, usize> = HashMap::new();
        for w in &workers {
            for line in w.logs() {
                if let Some(tick) = line["tick"].as_i64() {
                    *jobs_per_tick.entry(tick).or_default() += 1;
                }
            }
        }
        (jobs_per_tick.len() >= 3).then_some(jobs_per_tick)
    })
    .await;
    assert!(
        jobs_per_tick.values().all(|n| *n == 1),
        "one job per tick across two schedulers: {jobs_per_tick:?}"
    );
    let first_attempts = workers
        .iter()
        .flat_map(|w| w.logged("publish failed"))
        .filter(|l| l["path"] == "change_feed")
        .filter_map(|l| l["events"].as_u64())
        .sum::<u64>();
    assert_eq!(
        first_attempts, 100,
        "one first attempt per event across two replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_logged_and_recovered_from() {
    let mut nats = NatsServer::start().expect("nats");
    let mut redis = RedisServer::start().expect("redis");
    let s = Setup::new();
    let port = free_port().expect("port");
    let _api = spawn_role(
        "api",
        &s.env(&nats, &[("PORT", port.to_string())]),
        s.log("api"),
    );
    let env = s.env(&nats, &[("REDIS_URL", redis.url())]);
    let worker = spawn_role("worker", &env, s.log("worker"));
    let scheduler = spawn_role("scheduler", &env, s.log("scheduler"));
    s.wait_api(port).await;
    nats.stop();
    for i in 0..5 {
        s.create(port, &format!("waiting {i}")).await;
    }
    eventually(LONG, "the first attempts to fail", || async {
        (s.events() == 5 && s.min_attempts() >= 1).then_some(())
    })
    .await;
    redis.stop();
    nats.restart().expect("restart nats");
    eventually(LONG, "both roles to report Redis down", || async {
        let sched = !scheduler.logged("cannot enqueue").is_empty();
        let work = !worker.logged("job worker stopped").is_empty();
        (sched && work).then_some(())
    })
    .await;
    redis.restart().expect("restart redis");
    eventually(
        Duration::from_secs(90),
        "sweeps to resume and deliver",
        || async { (s.events() == 0).then_some(()) },
    )
    .await;
    assert_once_each(&messages_when(&nats, 5).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_and_restarted_under_its_own_name_takes_the_next_jobs() {
    let mut nats = NatsServer::start().expect("nats");
    let redis = RedisServer::start().expect("redis");
    let s = Setup::new();
    let port = free_port().expect("port");
    let health = free_port().expect("port");
    let _api = spawn_role(
        "api",
        &s.env(&nats, &[("PORT", port.to_string())]),
        s.log("api"),
    );
    // The pod name survives a container restart: both processes are `worker-a`.
    let env = s.env(
        &nats,
        &[
            ("NATS_CLIENT_ID", "worker-a".into()),
            ("REDIS_URL", redis.url()),
            ("HEALTH_PORT", health.to_string()),
        ],
    );
    let mut first = spawn_role("worker", &env, s.log("worker-a-1"));
    let _scheduler = spawn_role(
        "scheduler",
        &s.env(&nats, &[("REDIS_URL", redis.url())]),
        s.log("scheduler"),
    );
    s.wait_api(port).await;
    // Killed right after a job: its registration in the queue is as fresh as it gets.
    eventually(LONG, "the first worker to run a job", || async {
        (!first.logged("RetryPublishingNATSEvents done").is_empty()).then_some(())
    })
    .await;
    first.sigkill();

    let second = spawn_role("worker", &env, s.log("worker-a-2"));
    let readyz = format!("http://127.0.0.1:{health}/readyz");
    let readiness = || async {
        let res = s.client.get(&readyz).send().await.ok()?;
        let status = res.status().as_u16();
        Some((status, res.json::<Value>().await.ok()?))
    };
    // Connected to NATS (not necessarily ready: that is what this test is about).
    eventually(LONG, "the restarted worker to connect to NATS", || async {
        let (_, body) = readiness().await?;
        (body["checks"]["nats"]["status"] == "up").then_some(())
    })
    .await;

    nats.stop();
    for i in 0..10 {
        s.create(port, &format!("after the restart {i}")).await;
    }
    eventually(LONG, "every first attempt to fail", || async {
        (s.events() == 10 && s.min_attempts() >= 1).then_some(())
    })
    .await;
    nats.restart().expect("restart nats");
    let back = std::time::Instant::now();
    // Only a sweep (a job from the queue) retries a failed event.
    eventually(
        Duration::from_secs(10),
        "the restarted worker's jobs to deliver every event",
        || async { (s.events() == 0).then_some(()) },
    )
    .await;
    eprintln!(
        "outbox drained {:.1} s after NATS came back",
        back.elapsed().as_secs_f64()
    );
    assert_once_each(&messages_when(&nats, 10).await, 10);
    // Ready again once NATS is back (the orders consumer's next step finds it too).
    let ready = eventually(LONG, "the restarted worker to be ready", || async {
        let (status, body) = readiness().await?;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(ready["checks"]["jobs"]["status"], "up", "{ready}");
    let published: u64 = second
        .logged("RetryPublishingNATSEvents done")
        .iter()
        .filter_map(|l| l["published"].as_u64())
        .sum();
    assert_eq!(
        published, 10,
        "the restarted worker's sweeps published the events"
    );
    let registered = second.logged("job worker registered in the job queue");
    assert_eq!(registered.len(), 1, "registered at once, never refused");
    assert!(
        registered[0]["worker"]
            .as_str()
            .is_some_and(|w| w.starts_with("worker-a@")),
        "the pod name is in the queue's worker name: {registered:?}"
    );
    let blamed: Vec<Value> = second
        .logs()
        .into_iter()
        .filter(|l| l["level"] == "ERROR" || l["level"] == "WARN")
        .filter(|l| {
            let line = l.to_string();
            ["Redis", "job worker stopped", "still active"]
                .iter()
                .any(|n| line.contains(n))
        })
        .collect();
    assert!(blamed.is_empty(), "nothing blames Redis: {blamed:?}");
}
