//! Order events in, through the inbox: the orders consumer driven step by step against a real
//! SQLite file and a real `nats-server -js` of the test's own, and `ticketing all` as a real
//! process (real HTTP, a SIGKILL under a burst).

mod support;

use async_nats::jetstream::{self, consumer, stream};
use common::inbox::InboxMessage;
use common::inbox::{Outcome, RetryPolicy};
use common::store::{AlertQueue, Inbox, OutboxAdmin, ParkedMessages, SqliteStore, Tickets};
use common::{NewTicket, Price, Ticket, TicketId, Title, UserId};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::delivery::{
    BIN, Role, STREAM as TICKETS_STREAM, Setup, StoredMessage, Webhook, spawn_role, stream_messages,
};
use support::{errors, eventually, session_cookie, sqlite_store};
use testkit::{NatsServer, free_port};
use worker::orders::{IN_FLIGHT, OrdersConfig, OrdersConsumer, StepOutcome};

const ORDERS: &str = "orders";
const CONSUMER: &str = "tickets-service";
const LONG: Duration = Duration::from_secs(60);

fn created(order: &str, ticket: &str) -> Vec<u8> {
    json!({"id": order, "version": 0, "status": "created", "userId": "buyer",
           "expiresAt": "2026-12-01T10:15:00.000Z", "ticket": {"id": ticket, "price": 10}})
    .to_string()
    .into_bytes()
}

fn cancelled(order: &str, ticket: &str) -> Vec<u8> {
    json!({"id": order, "version": 1, "ticket": {"id": ticket}})
        .to_string()
        .into_bytes()
}

/// The orders service's side: a JetStream context on the test's server.
async fn orders_service(nats: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    jetstream::new(client)
}

/// Publishes as the orders service does (`Nats-Msg-Id` = `msg_id`); true when JetStream stored
/// it, false when it dropped it as a duplicate.
async fn publish(js: &jetstream::Context, subject: &str, msg_id: &str, payload: Vec<u8>) -> bool {
    let message = jetstream::message::PublishMessage::build()
        .payload(payload.into())
        .message_id(msg_id);
    let ack = js
        .send_publish(subject.to_owned(), message)
        .await
        .expect("publish")
        .await
        .expect("puback");
    !ack.duplicate
}

/// The orders stream and the durable consumer, made by the test as an operator could: a short
/// ack wait (so a message whose ack was lost comes back within a test), a short duplicate window.
async fn provision(js: &jetstream::Context, ack_wait: Duration, duplicate_window: Duration) {
    let s = js
        .create_stream(stream::Config {
            name: ORDERS.into(),
            subjects: vec!["order.>".into()],
            storage: stream::StorageType::File,
            duplicate_window,
            ..Default::default()
        })
        .await
        .expect("orders stream");
    s.create_consumer(consumer::pull::Config {
        durable_name: Some(CONSUMER.into()),
        filter_subject: "order.>".into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        ..Default::default()
    })
    .await
    .expect("consumer");
}

async fn ticket(store: &SqliteStore, title: &str) -> Ticket {
    store
        .create_ticket(&NewTicket {
            title: Title::parse(title).expect("title"),
            price: Price::new(10.0).expect("price"),
            user_id: UserId::parse("seller").expect("user"),
        })
        .await
        .expect("create")
}

async fn orders_consumer(
    nats: &NatsServer,
    store: &Arc<SqliteStore>,
    ack_wait: Duration,
    retry: RetryPolicy,
) -> OrdersConsumer {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let mut config = OrdersConfig::new(ORDERS, CONSUMER, Duration::from_secs(168 * 3600));
    config.ack_wait = ack_wait;
    config.retry = retry;
    OrdersConsumer::new(client, store.clone(), store.clone(), store.clone(), config)
}

/// Steps until one step saw `outcome` at least once; returns that step.
async fn step_until(c: &OrdersConsumer, outcome: Outcome) -> StepOutcome {
    eventually(
        LONG,
        &format!("a step with an outcome {outcome}"),
        || async {
            let step = c.step(Duration::from_millis(200)).await.expect("step");
            (step.count(outcome) > 0).then_some(step)
        },
    )
    .await
}

/// The versions of a ticket's events in the outbox, and their `orderId`.
async fn outbox_versions(store: &SqliteStore, id: TicketId) -> Vec<(i64, Option<String>)> {
    let mut events: Vec<_> = store
        .list_events(1000, None)
        .await
        .expect("list")
        .into_iter()
        .filter(|e| e.aggregate_id == id)
        .map(|e| {
            let order = e.data.to_value()["orderId"].as_str().map(str::to_owned);
            (e.version, order)
        })
        .collect();
    events.sort();
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_seen_twice_or_redelivered_after_a_crash_between_commit_and_ack_applies_once() {
    let nats = NatsServer::start().expect("nats");
    let js = orders_service(&nats).await;
    // A one-second duplicate window, so the orders service can publish an event again.
    provision(&js, Duration::from_secs(1), Duration::from_secs(1)).await;
    let (store, _dir) = sqlite_store().await;
    let t = ticket(&store, "show").await;
    let c = orders_consumer(&nats, &store, Duration::from_secs(1), RetryPolicy::DEFAULT).await;

    assert!(
        publish(
            &js,
            "order.created",
            "order-1:created",
            created("order-1", &t.id.to_hex())
        )
        .await
    );
    // The crash: fetched and committed, never acked.
    let fetched = eventually(LONG, "the message fetched", || async {
        let f = c.fetch(Duration::from_millis(200)).await.expect("fetch");
        (!f.is_empty()).then_some(f)
    })
    .await;
    let verdicts = c.apply(&fetched).await.expect("apply");
    assert_eq!(verdicts[0].outcome(), Outcome::Applied);
    drop(fetched);
    // JetStream delivers it again after the ack wait; the inbox knows it.
    let step = step_until(&c, Outcome::Duplicate).await;
    assert_eq!(step.count(Outcome::Applied), 0);
    // The orders service publishes the same event again, past JetStream's duplicate window.
    eventually(LONG, "the same event stored again", || async {
        publish(
            &js,
            "order.created",
            "order-1:created",
            created("order-1", &t.id.to_hex()),
        )
        .await
        .then_some(())
    })
    .await;
    step_until(&c, Outcome::Duplicate).await;
    let stored = store.get_ticket(t.id).await.expect("get").expect("ticket");
    assert_eq!(
        (stored.version, stored.order_id.as_deref()),
        (1, Some("order-1"))
    );
    assert_eq!(
        outbox_versions(&store, t.id).await,
        [(0, None), (1, Some("order-1".into()))],
        "one event for the one change"
    );
    // Everything acked: nothing comes back.
    let idle = c.step(Duration::from_millis(1500)).await.expect("step");
    assert_eq!(idle.settled, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_batches_commit_while_the_next_is_fetched_and_each_is_acked_after_its_commit() {
    let nats = NatsServer::start().expect("nats");
    let js = orders_service(&nats).await;
    let (store, _dir) = sqlite_store().await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let mut config = OrdersConfig::new(ORDERS, CONSUMER, Duration::from_secs(168 * 3600));
    config.batch = 3;
    let c = OrdersConsumer::new(client, store.clone(), store.clone(), store.clone(), config);
    c.bind().await.expect("bind");
    let mut tickets = Vec::new();
    for i in 0..10 {
        let t = ticket(&store, &format!("t{i}")).await;
        let order = format!("order-{i}");
        publish(
            &js,
            "order.created",
            &format!("{order}:created"),
            created(&order, &t.id.to_hex()),
        )
        .await;
        tickets.push(t.id);
    }
    // Full batches are left committing, up to IN_FLIGHT (two) of them: those steps settle
    // nothing yet.
    assert_eq!(IN_FLIGHT, 2);
    let first = c.step(Duration::from_millis(500)).await.expect("step");
    assert_eq!(first.settled, 0);
    let second = c.step(Duration::ZERO).await.expect("step");
    assert_eq!(second.settled, 0);
    // The next full batch settles the oldest, once committed, and leaves its own running.
    let third = c.step(Duration::ZERO).await.expect("step");
    assert_eq!(third.settled, 3);
    // The last, short batch is settled in its own step, with the ones before it.
    let fourth = c.step(Duration::ZERO).await.expect("step");
    assert_eq!((fourth.settled, fourth.count(Outcome::Applied)), (7, 7));
    for id in &tickets {
        let t = store.get_ticket(*id).await.expect("get").expect("ticket");
        assert_eq!(t.version, 1);
    }
    // A shutdown finishes what a step left running: committed, then acked.
    let t = ticket(&store, "late").await;
    for i in 0..3 {
        let order = format!("late-{i}");
        publish(
            &js,
            "order.created",
            &format!("{order}:created"),
            created(&order, &t.id.to_hex()),
        )
        .await;
    }
    assert_eq!(
        c.step(Duration::from_millis(500))
            .await
            .expect("step")
            .settled,
        0
    );
    let finished = c.finish_in_flight().await.expect("finish");
    assert_eq!(
        (
            finished.settled,
            finished.count(Outcome::Applied),
            finished.count(Outcome::Conflict)
        ),
        (3, 1, 2)
    );
    assert_eq!(
        c.step(Duration::from_millis(300))
            .await
            .expect("step")
            .settled,
        0,
        "all acked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_before_its_created_wins_and_a_second_order_conflicts() {
    let nats = NatsServer::start().expect("nats");
    let js = orders_service(&nats).await;
    let (store, _dir) = sqlite_store().await;
    let (t, u) = (ticket(&store, "a").await, ticket(&store, "b").await);
    // The orders service's stream also holds other subjects: the consumer's filter keeps them
    // out (the singular `filter_subject`: nats-server 2.9 ignores the plural one).
    js.create_stream(stream::Config {
        name: ORDERS.into(),
        subjects: vec!["order.>".into(), "payment.>".into()],
        ..Default::default()
    })
    .await
    .expect("orders stream");
    let c = orders_consumer(&nats, &store, Duration::from_secs(30), RetryPolicy::DEFAULT).await;
    c.bind().await.expect("bind: creates the consumer");
    let (tid, uid) = (t.id.to_hex(), u.id.to_hex());
    publish(&js, "payment.created", "P:created", b"{}".to_vec()).await;
    publish(&js, "order.cancelled", "A:cancelled", cancelled("A", &tid)).await;
    publish(&js, "order.created", "A:created", created("A", &tid)).await;
    publish(&js, "order.created", "B:created", created("B", &uid)).await;
    publish(&js, "order.created", "C:created", created("C", &uid)).await;
    publish(&js, "order.updated", "B:updated", b"{}".to_vec()).await;
    let counts = std::cell::RefCell::new(HashMap::<Outcome, usize>::new());
    let fetched = std::cell::Cell::new(0);
    let (counts_ref, fetched_ref, c_ref) = (&counts, &fetched, &c);
    eventually(LONG, "the five messages stepped through", || async move {
        let step = c_ref.step(Duration::from_millis(500)).await.expect("step");
        fetched_ref.set(fetched_ref.get() + step.settled);
        for o in Outcome::ALL {
            *counts_ref.borrow_mut().entry(o).or_insert(0) += step.count(o);
        }
        (fetched_ref.get() >= 5).then_some(())
    })
    .await;
    let counts = counts.into_inner();
    assert_eq!(counts[&Outcome::NoOp], 2, "{counts:?}");
    assert_eq!(counts[&Outcome::Applied], 1, "{counts:?}");
    assert_eq!(counts[&Outcome::Conflict], 1, "{counts:?}");
    assert_eq!(counts[&Outcome::Ignored], 1, "{counts:?}");
    let t = store.get_ticket(t.id).await.expect("get").expect("ticket");
    assert_eq!(
        (t.version, t.order_id),
        (0, None),
        "a cancelled order never holds it"
    );
    let u = store.get_ticket(u.id).await.expect("get").expect("ticket");
    assert_eq!(
        (u.version, u.order_id.as_deref()),
        (1, Some("B")),
        "C did not overwrite B"
    );
    let conflict = store
        .get_message("C:created")
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(conflict.outcome, Outcome::Conflict);
    assert!(store.get_message("B:updated").await.expect("get").is_none());
    let idle = c.step(Duration::from_millis(300)).await.expect("step");
    assert_eq!(idle.settled, 0, "the payment subject is not the consumer's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ticket_is_parked_after_its_retries_and_poison_at_once_with_alerts() {
    let nats = NatsServer::start().expect("nats");
    let js = orders_service(&nats).await;
    let webhook = Webhook::start().await;
    let (store, _dir) = sqlite_store().await;
    let retry = RetryPolicy {
        deliveries: 3,
        first_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(200),
    };
    let c = orders_consumer(&nats, &store, Duration::from_secs(30), retry).await;
    c.bind().await.expect("bind");
    let missing = TicketId::new();
    publish(
        &js,
        "order.created",
        "X:created",
        created("X", &missing.to_hex()),
    )
    .await;
    publish(&js, "order.cancelled", "poison", b"{\"id\": 42".to_vec()).await;
    // The poison is parked by the first step; the unknown ticket is retried twice first.
    let (retried, parked) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let (retried_ref, parked_ref, c_ref) = (&retried, &parked, &c);
    eventually(LONG, "both parked", || async move {
        let step = c_ref.step(Duration::from_millis(300)).await.expect("step");
        retried_ref.set(retried_ref.get() + step.count(Outcome::Retried));
        parked_ref.set(parked_ref.get() + step.count(Outcome::Parked));
        (parked_ref.get() == 2).then_some(())
    })
    .await;
    let retried = retried.get();
    assert_eq!(
        retried, 2,
        "redelivered after each of its first two deliveries"
    );
    let unknown = store
        .get_message("X:created")
        .await
        .expect("get")
        .expect("kept");
    assert_eq!((unknown.outcome, unknown.deliveries), (Outcome::Parked, 3));
    assert!(
        unknown
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&missing.to_hex()))
    );
    let poison = store
        .get_message("poison")
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(
        (poison.deliveries, poison.payload.as_slice()),
        (1, &b"{\"id\": 42"[..])
    );
    assert_eq!(store.count_parked().await.expect("count"), 2);
    // Acked: neither comes back.
    assert_eq!(
        c.step(Duration::from_millis(500))
            .await
            .expect("step")
            .settled,
        0
    );

    // The alerts go out through the outbox's alert path, in one digest.
    let alerter = worker::alerts::Alerter::new(
        store.clone(),
        Some(webhook.url()),
        "test".into(),
        Duration::from_secs(60),
    )
    .expect("alerter");
    let round = alerter.send_pending().await.expect("send");
    assert_eq!(round.sent, 1);
    let bodies = webhook.digests("parked");
    assert_eq!(bodies.len(), 1);
    let body = &bodies[0];
    assert_eq!(
        (body["resolved"].clone(), body["events"].clone()),
        (json!(false), json!(2))
    );
    let about: HashSet<&str> = body["sampleMessageIds"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|id| id.as_str())
        .collect();
    assert_eq!(about, HashSet::from(["X:created", "poison"]));
    let text = body["text"].as_str().expect("slack text");
    assert!(
        text.contains("parked") && text.contains("ticketing inbox show"),
        "{text}"
    );
    assert!(
        store
            .claim_alerts(
                common::outbox::AlertKind::Parked,
                10,
                &common::outbox::Lease::new("t", Duration::from_secs(5))
            )
            .await
            .expect("claim")
            .is_empty()
    );
}

// ---- `ticketing all` as a process ----

/// What these tests add to the delivery tests' `Setup`.
impl Setup {
    fn count(&self, sql: &str) -> i64 {
        self.db().query_row(sql, [], |r| r.get(0)).unwrap_or(-1)
    }

    /// `ticketing all` on the test's file and server. A short outbox lease and a sweep every
    /// second: what a killed process held is published soon after.
    fn all(&self, nats: &NatsServer, port: u16, name: &str) -> Role {
        let env = self.env(
            nats,
            &[
                ("PORT", port.to_string()),
                ("REDIS_URL", "redis://127.0.0.1:1".into()),
                ("OUTBOX_LOCK_SECS", "2".into()),
            ],
        );
        spawn_role("all", &env, self.log(name))
    }

    async fn get(&self, port: u16, path: &str) -> (u16, Value) {
        let Ok(res) = self
            .client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
        else {
            return (0, Value::Null); // not listening yet
        };
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn put(&self, port: u16, id: &str, title: &str) -> reqwest::Response {
        self.client
            .put(format!("http://127.0.0.1:{port}/api/tickets/{id}"))
            .header("cookie", session_cookie("seller"))
            .json(&json!({"title": title, "price": 15}))
            .send()
            .await
            .expect("request")
    }

    /// Ready, with the orders consumer bound (it created the orders stream).
    async fn wait_ready(&self, port: u16) {
        eventually(LONG, "`all` ready with its orders consumer", || async {
            let (status, body) = self.get(port, "/readyz").await;
            (status == 200 && body["checks"]["orders"]["status"] == "up").then_some(())
        })
        .await;
    }
}

async fn ticket_messages(nats: &NatsServer, count: usize) -> Vec<StoredMessage> {
    eventually(
        LONG,
        &format!("{count} ticket events in the stream"),
        || async {
            let m = stream_messages(&nats.url(), TICKETS_STREAM).await;
            (m.len() >= count).then_some(m)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_reserves_the_ticket_over_http_and_its_cancellation_releases_it() {
    let nats = NatsServer::start().expect("nats");
    let s = Setup::new();
    let port = free_port().expect("port");
    let _all = s.all(&nats, port, "all");
    s.wait_ready(port).await;
    let ticket = s.create(port, "concert").await;
    let id = ticket["id"].as_str().expect("id").to_owned();

    // `all` created the orders stream: the orders service publishes to it.
    let js = orders_service(&nats).await;
    publish(
        &js,
        "order.created",
        "order-1:created",
        created("order-1", &id),
    )
    .await;
    let reserved = eventually(LONG, "the ticket reserved", || async {
        let (_, t) = s.get(port, &format!("/api/tickets/{id}")).await;
        (t["orderId"] == "order-1").then_some(t)
    })
    .await;
    assert_eq!(reserved["version"], 1);
    let refused = s.put(port, &id, "renamed").await;
    let errors = errors(refused, 400).await;
    assert_eq!(errors[0]["message"], "Cannot edit a reserved ticket");
    let (_, listing) = s.get(port, "/api/tickets").await;
    assert_eq!(listing, json!([]), "a reserved ticket is not listed");

    publish(
        &js,
        "order.cancelled",
        "order-1:cancelled",
        cancelled("order-1", &id),
    )
    .await;
    eventually(LONG, "the ticket released", || async {
        let (_, t) = s.get(port, &format!("/api/tickets/{id}")).await;
        (t["version"] == 2 && t.get("orderId").is_none()).then_some(())
    })
    .await;
    let (_, listing) = s.get(port, "/api/tickets").await;
    assert_eq!(listing.as_array().map(Vec::len), Some(1));
    let updated = s.put(port, &id, "renamed").await;
    assert_eq!(updated.status(), 200);

    // Every version reached the stream once, with `orderId` only while reserved.
    let messages = ticket_messages(&nats, 4).await;
    let seen: Vec<(String, i64, Option<&str>)> = messages
        .iter()
        .map(|m| {
            (
                m.subject.clone(),
                m.payload["version"].as_i64().expect("version"),
                m.payload["orderId"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("ticket.created".into(), 0, None),
            ("ticket.updated".into(), 1, Some("order-1")),
            ("ticket.updated".into(), 2, None),
            ("ticket.updated".into(), 3, None),
        ]
    );
    let metrics = s
        .client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for (subject, outcome) in [("order.created", "applied"), ("order.cancelled", "applied")] {
        let needle =
            format!("inbox_messages_total{{subject=\"{subject}\",outcome=\"{outcome}\"}} 1");
        let alt = format!("inbox_messages_total{{outcome=\"{outcome}\",subject=\"{subject}\"}} 1");
        assert!(
            metrics.contains(&needle) || metrics.contains(&alt),
            "{needle} in\n{metrics}"
        );
    }
    assert!(metrics.contains("inbox_parked_messages 0"), "{metrics}");
    assert!(metrics.contains("inbox_apply_seconds_count"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_updates_and_order_events_on_one_ticket_keep_contiguous_versions() {
    let nats = NatsServer::start().expect("nats");
    let s = Setup::new();
    let port = free_port().expect("port");
    let _all = s.all(&nats, port, "all");
    s.wait_ready(port).await;
    let id = s.create(port, "contested").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let js = orders_service(&nats).await;
    let orders = async {
        for i in 0..10 {
            let order = format!("order-{i}");
            publish(
                &js,
                "order.created",
                &format!("{order}:created"),
                created(&order, &id),
            )
            .await;
            publish(
                &js,
                "order.cancelled",
                &format!("{order}:cancelled"),
                cancelled(&order, &id),
            )
            .await;
        }
    };
    let puts = async {
        let mut ok = 0;
        for i in 0..30 {
            // 200 while unreserved, 400 while an order holds it: both are right answers.
            let status = s
                .put(port, &id, &format!("title {i}"))
                .await
                .status()
                .as_u16();
            assert!(status == 200 || status == 400, "{status}");
            ok += usize::from(status == 200);
        }
        ok
    };
    let ((), ok) = futures::join!(orders, puts);
    // Every order applied: 20 changes, plus each accepted PUT.
    let expected = 1 + 20 + ok;
    let messages = ticket_messages(&nats, expected).await;
    let versions: Vec<i64> = messages
        .iter()
        .map(|m| m.payload["version"].as_i64().expect("version"))
        .collect();
    assert_eq!(
        versions,
        (0..expected as i64).collect::<Vec<_>>(),
        "contiguous, one event each"
    );
    let (_, t) = s.get(port, &format!("/api/tickets/{id}")).await;
    assert_eq!(t["version"], json!(expected - 1));
    assert!(t.get("orderId").is_none());
}

/// Seeds `n` tickets straight into the store file (before `all` opens it).
async fn seed_tickets(path: &Path, n: usize) -> Vec<String> {
    let store = SqliteStore::open(path, Default::default())
        .await
        .expect("open");
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(ticket(&store, &format!("t{i}")).await.id.to_hex());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_under_a_burst_of_orders_applies_each_once_after_a_restart() {
    const TICKETS: usize = 600;
    let nats = NatsServer::start().expect("nats");
    let s = Setup::new();
    let ids = seed_tickets(&s.db, TICKETS).await;
    let js = orders_service(&nats).await;
    // An ack wait of 2 s: what the killed process fetched and did not ack comes back soon.
    provision(&js, Duration::from_secs(2), Duration::from_secs(120)).await;
    let port = free_port().expect("port");
    let mut first = s.all(&nats, port, "all-1");
    s.wait_ready(port).await;

    // The burst: every ticket reserved, every other one released again.
    let burst = {
        let (js, ids) = (js.clone(), ids.clone());
        tokio::spawn(async move {
            for (i, id) in ids.iter().enumerate() {
                let order = format!("order-{i}");
                publish(
                    &js,
                    "order.created",
                    &format!("{order}:created"),
                    created(&order, id),
                )
                .await;
                if i % 2 == 0 {
                    publish(
                        &js,
                        "order.cancelled",
                        &format!("{order}:cancelled"),
                        cancelled(&order, id),
                    )
                    .await;
                }
            }
        })
    };
    eventually(LONG, "part of the burst applied", || async {
        (s.count("SELECT COUNT(*) FROM inbox") >= 100).then_some(())
    })
    .await;
    first.sigkill();
    let applied_before = s.count("SELECT COUNT(*) FROM inbox");
    burst.await.expect("burst published");
    let total = TICKETS + TICKETS / 2;
    assert!(
        applied_before < total as i64,
        "killed mid-burst: {applied_before} of {total}"
    );

    let _second = s.all(&nats, port, "all-2");
    eventually(LONG, "every order message recorded once", || async {
        (s.count("SELECT COUNT(*) FROM inbox") == total as i64).then_some(())
    })
    .await;
    // What the killed process fetched and did not ack comes back after the ack wait, behind
    // newer messages: an order's cancelled can then be applied before its created. The
    // cancelled wins either way (the created after it changes nothing), so each released ticket
    // ends at version 2 (both applied, in order) or 0 (both no-ops): never reserved.
    let outcomes: HashMap<String, String> = {
        let db = s.db();
        let mut stmt = db.prepare("SELECT id, outcome FROM inbox").expect("sql");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("records")
    };
    let versions: HashMap<String, (i64, Option<String>)> = {
        let db = s.db();
        let mut stmt = db
            .prepare("SELECT id, version, order_id FROM tickets")
            .expect("sql");
        stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("tickets")
    };
    let mut changes = 0;
    for (i, id) in ids.iter().enumerate() {
        let outcome = |kind: &str| outcomes[&format!("order-{i}:{kind}")].as_str();
        if i % 2 == 1 {
            assert_eq!(outcome("created"), "applied", "order-{i}");
            assert_eq!(versions[id], (1, Some(format!("order-{i}"))), "ticket {i}");
            changes += 1;
        } else if outcome("cancelled") == "applied" {
            assert_eq!(outcome("created"), "applied", "order-{i}");
            assert_eq!(versions[id], (2, None), "ticket {i}");
            changes += 2;
        } else {
            assert_eq!(
                (outcome("cancelled"), outcome("created")),
                ("no_op", "no_op"),
                "order-{i}: its cancelled came first"
            );
            assert_eq!(versions[id], (0, None), "ticket {i}");
        }
    }
    // And each change reached the stream once.
    let expected = TICKETS + changes;
    let messages = ticket_messages(&nats, expected).await;
    let mut per_version = HashSet::new();
    for m in &messages {
        let key = (
            m.payload["id"].as_str().expect("id").to_owned(),
            m.payload["version"].as_i64(),
        );
        assert!(per_version.insert(key.clone()), "{key:?} twice");
    }
    assert_eq!(messages.len(), expected);
}

/// `ticketing inbox ...` on a store file; (succeeded, stdout or else stderr, stderr).
fn inbox(db: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("inbox")
        .args(args)
        .env("SQLITE_PATH", db)
        .env_remove("MONGO_URI")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        stderr.clone()
    };
    (out.status.success(), text, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_commands_list_show_replay_and_drop_parked_messages() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("t.db");
    let store = SqliteStore::open(&db, Default::default())
        .await
        .expect("open");
    let t = ticket(&store, "known").await;
    let late = TicketId::new();
    let message = |id: &str, subject: &str, payload: Vec<u8>| {
        InboxMessage::new(Some(id), ORDERS, 1, subject, payload, 5)
    };
    let verdicts = store
        .apply_messages(
            vec![
                message("X:created", "order.created", created("X", &late.to_hex())),
                message("poison", "order.cancelled", b"not json".to_vec()),
                message("A:created", "order.created", created("A", &t.id.to_hex())),
            ]
            .into(),
            &RetryPolicy::DEFAULT,
        )
        .await
        .expect("apply");
    let outcomes: Vec<Outcome> = verdicts.iter().map(|v| v.outcome()).collect();
    assert_eq!(
        outcomes,
        [Outcome::Parked, Outcome::Parked, Outcome::Applied]
    );
    drop(store);

    let (ok, text, _) = inbox(&db, &["list", "--json"]);
    assert!(ok, "{text}");
    let listed: Vec<Value> = serde_json::from_str(&text).expect("json");
    let ids: HashSet<&str> = listed.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids, HashSet::from(["X:created", "poison"]));
    let (ok, table, _) = inbox(&db, &["list"]);
    assert!(
        ok && table.lines().count() == 3 && table.contains("DELIVERIES"),
        "{table}"
    );
    let (ok, text, _) = inbox(&db, &["show", "poison"]);
    assert!(ok, "{text}");
    let shown: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(shown["payload"], "not json", "the raw message");
    assert_eq!(
        (shown["outcome"].as_str(), shown["deliveries"].as_i64()),
        (Some("parked"), Some(5))
    );
    let (ok, text, _) = inbox(&db, &["show", "nope"]);
    assert!(!ok && text.contains("no message \"nope\""), "{text}");

    // The ticket turns up (restored from a backup, say): a replay applies the order now.
    rusqlite::Connection::open(&db)
        .and_then(|c| {
            c.execute(
                "INSERT INTO tickets (id, title, price, user_id, version, order_id) \
                 VALUES (?1, 'late', 5, 'seller', 0, NULL)",
                [late.to_hex()],
            )
        })
        .expect("insert");
    let (ok, text, _) = inbox(&db, &["replay", "X:created"]);
    assert!(ok && text.contains("X:created: applied"), "{text}");
    let (ok, text, _) = inbox(&db, &["replay", "--all", "--json"]);
    assert!(ok, "{text}");
    let replayed: Vec<Value> = serde_json::from_str(&text).expect("json");
    assert_eq!(replayed.len(), 1);
    assert_eq!(
        (replayed[0]["id"].as_str(), replayed[0]["outcome"].as_str()),
        (Some("poison"), Some("parked"))
    );
    let (ok, text, logs) = inbox(&db, &["drop", "poison"]);
    assert!(ok && text.contains("dropped poison"), "{text}");
    assert!(
        logs.contains("dropped by an operator") && logs.contains("not json"),
        "{logs}"
    );
    let (ok, text, _) = inbox(&db, &["replay", "poison"]);
    assert!(!ok && text.contains("no parked message"), "{text}");
    let (_, text, _) = inbox(&db, &["list", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("json"),
        json!([])
    );

    let store = SqliteStore::open(&db, Default::default())
        .await
        .expect("open");
    let stored = store.get_ticket(late).await.expect("get").expect("ticket");
    assert_eq!((stored.version, stored.order_id.as_deref()), (1, Some("X")));
    assert_eq!(outbox_versions(&store, late).await, [(1, Some("X".into()))]);

    // The settings are documented where the roles that use them are.
    for role in ["all", "worker"] {
        let out = std::process::Command::new(BIN)
            .args([role, "--help"])
            .output()
            .expect("run");
        let help = String::from_utf8_lossy(&out.stdout);
        for var in ["ORDERS_STREAM", "ORDERS_CONSUMER", "INBOX_RETENTION_HOURS"] {
            assert!(
                help.contains(&format!("[env: {var}")),
                "{var} missing from {role}:\n{help}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_shorter_than_the_redelivery_horizon_stops_the_role() {
    let nats = NatsServer::start().expect("nats");
    let js = orders_service(&nats).await;
    // The orders service drops a re-published event for two hours: an inbox that forgets after
    // one could apply it twice.
    provision(&js, Duration::from_secs(30), Duration::from_secs(2 * 3600)).await;
    let s = Setup::new();
    let out = std::process::Command::new(BIN)
        .arg("all")
        .env_remove("MONGO_URI")
        .env("JWT_KEY", support::JWT_KEY)
        .env("PORT", free_port().expect("port").to_string())
        .env("SQLITE_PATH", &s.db)
        .env("NATS_URL", nats.url())
        .env("INBOX_RETENTION_HOURS", "1")
        .output()
        .expect("run");
    assert!(!out.status.success(), "must refuse to run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("INBOX_RETENTION_HOURS (1 h) must be longer"),
        "{stderr}"
    );
}
