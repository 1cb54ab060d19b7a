//! The outbox state machine driven step by step (a first attempt on claimed events, a batch of
//! the store's fresh-event feed, `sweep_once`) against a real SQLite file and a real
//! `nats-server -js`.

mod support;

use common::outbox::{Claimed, Claimer, Lease};
use common::store::{FreshEvents, FreshFeed, Outbox, OutboxAdmin, SqliteStore, Tickets};
use common::{EventId, NewTicket, Price, TicketChanges, Title, UserId};
use std::sync::Arc;
use std::time::Duration;
use support::delivery::stream_messages;
use support::sqlite_store;
use testkit::NatsServer;
use tokio_util::sync::CancellationToken;
use worker::{DispatchConfig, Dispatcher, JetStreamPublisher, NatsConfig, Outcome, Path};

const STREAM: &str = "ticketing";

async fn publisher(nats: &NatsServer, name: &str) -> Arc<JetStreamPublisher> {
    let p = JetStreamPublisher::connect(NatsConfig {
        url: nats.url(),
        auth: Default::default(),
        stream: STREAM.into(),
        client_name: name.into(),
        duplicate_window: Duration::from_secs(120),
        ack_timeout: Duration::from_secs(2),
        policy: Default::default(),
    })
    .await
    .expect("connect");
    assert!(p.wait_connected(Duration::from_secs(10)).await);
    Arc::new(p)
}

fn dispatcher(
    store: &Arc<SqliteStore>,
    publisher: Arc<JetStreamPublisher>,
    name: &str,
    batch: usize,
) -> Dispatcher {
    Dispatcher::new(
        store.clone(),
        publisher,
        DispatchConfig {
            claimer: name.into(),
            lease: Duration::from_secs(30),
            alert_threshold: 5,
            sweep_batch: batch,
            duplicate_window: Duration::from_secs(120),
        },
    )
}

fn ticket(title: &str) -> NewTicket {
    NewTicket {
        title: Title::parse(title).expect("title"),
        price: Price::new(5.0).expect("price"),
        user_id: UserId::parse("seller").expect("user"),
    }
}

fn changes(title: &str) -> TicketChanges {
    TicketChanges {
        title: Title::parse(title).expect("title"),
        price: Price::new(6.0).expect("price"),
    }
}

/// The `version` of every message in the stream, in stream order.
async fn published_versions(nats: &NatsServer) -> Vec<i64> {
    stream_messages(&nats.url(), STREAM)
        .await
        .iter()
        .map(|m| m.payload["version"].as_i64().expect("version"))
        .collect()
}

/// The ids of the events still in the outbox, oldest first (at most `limit`).
async fn outbox_ids(store: &SqliteStore, limit: usize) -> Vec<EventId> {
    store
        .list_events(limit, None)
        .await
        .expect("list")
        .iter()
        .map(|e| e.id)
        .collect()
}

/// The change feed's first attempt on `ids`, as a feed that saw them committed makes it.
async fn first_attempt(d: &Dispatcher, store: &Arc<SqliteStore>, ids: &[EventId]) -> Outcome {
    let claimed = Claimed::fresh(store.clone(), ids, d.claimer().lease())
        .await
        .expect("claim");
    d.dispatch(claimed, Path::ChangeFeed)
        .await
        .expect("dispatch")
}

/// The next batch of a fresh-event feed, within 10 s.
async fn next_batch(feed: &mut Box<dyn FreshFeed>) -> Claimed {
    tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .expect("a batch within 10 s")
        .expect("not stopped")
        .expect("a batch")
}

async fn subscribe(store: &SqliteStore, name: &str) -> (Box<dyn FreshFeed>, CancellationToken) {
    let stop = CancellationToken::new();
    let feed = store
        .subscribe(&Claimer::new(name, Duration::from_secs(30)), stop.clone())
        .await
        .expect("subscribe");
    (feed, stop)
}

async fn newest_event(store: &SqliteStore) -> EventId {
    store
        .list_events(1000, None)
        .await
        .expect("list")
        .last()
        .expect("an event")
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_version_waits_for_an_earlier_failed_one() {
    let mut nats = NatsServer::start().expect("nats");
    let (store, _dir) = sqlite_store().await;
    let d = dispatcher(&store, publisher(&nats, "w").await, "w", 100);

    let t = store.create_ticket(&ticket("show")).await.expect("create");
    let v0 = newest_event(&store).await;
    nats.stop();
    let first = first_attempt(&d, &store, &[v0]).await;
    assert_eq!(
        (first.claimed, first.failed),
        (1, 1),
        "v0's first attempt fails"
    );

    nats.restart().expect("restart");
    store
        .update_ticket(t.id, 0, &changes("v1"))
        .await
        .expect("update");
    let v1 = newest_event(&store).await;
    let second = first_attempt(&d, &store, &[v1]).await;
    assert_eq!(
        (second.published, second.deferred, second.failed),
        (0, 1, 0),
        "v1 comes through the feed but waits for v0, and waiting is not a failure"
    );
    let waiting = store
        .get_event(v1)
        .await
        .expect("get")
        .expect("v1 still there");
    assert!(!waiting.is_locked);
    assert_eq!(waiting.attempts, 0);

    store
        .update_ticket(t.id, 1, &changes("v2"))
        .await
        .expect("update");
    let swept = d.sweep_once().await.expect("sweep");
    assert_eq!(
        swept.published, 2,
        "v0 and v1 are due; v2 is still reserved for the feed"
    );
    let v2 = newest_event(&store).await;
    let third = first_attempt(&d, &store, &[v2]).await;
    assert_eq!(third.published, 1);

    let versions = published_versions(&nats).await;
    assert_eq!(versions, [0, 1, 2]);
    assert!(store.list_events(10, None).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_versions_is_published_in_order_in_one_sweep() {
    let nats = NatsServer::start().expect("nats");
    let (store, _dir) = sqlite_store().await;
    let d = dispatcher(&store, publisher(&nats, "w").await, "w", 100);
    let t = store.create_ticket(&ticket("show")).await.expect("create");
    for v in 0..4 {
        store
            .update_ticket(t.id, v, &changes(&format!("v{}", v + 1)))
            .await
            .expect("update");
    }
    let ids = outbox_ids(&store, 10).await;
    store.unlock_events(&ids).await.expect("unlock");
    let swept = d.sweep_once().await.expect("sweep");
    assert_eq!((swept.claimed, swept.published), (5, 5));
    let versions = published_versions(&nats).await;
    assert_eq!(versions, [0, 1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sweeps_never_publish_an_event_twice() {
    let nats = NatsServer::start().expect("nats");
    let (store, _dir) = sqlite_store().await;
    let a = dispatcher(&store, publisher(&nats, "a").await, "a", 25);
    let b = dispatcher(&store, publisher(&nats, "b").await, "b", 25);
    for i in 0..300 {
        store
            .create_ticket(&ticket(&format!("t{i}")))
            .await
            .expect("create");
    }
    let ids = outbox_ids(&store, 1000).await;
    assert_eq!(store.unlock_events(&ids).await.expect("unlock"), 300);

    async fn drain(d: &Dispatcher) -> (usize, usize) {
        let (mut published, mut duplicates) = (0, 0);
        loop {
            let o = d.sweep_once().await.expect("sweep");
            published += o.published;
            duplicates += o.duplicates;
            assert_eq!(o.failed, 0);
            if o.claimed == 0 {
                return (published, duplicates);
            }
        }
    }
    let ((pa, da), (pb, db)) = tokio::join!(drain(&a), drain(&b));
    assert_eq!(pa + pb, 300, "every event published by exactly one sweeper");
    assert!(pa > 0 && pb > 0, "both sweepers took part: {pa} / {pb}");
    assert_eq!(
        da + db,
        0,
        "no duplicate PubAck: nothing was published twice"
    );
    let messages = stream_messages(&nats.url(), STREAM).await;
    assert_eq!(messages.len(), 300);
    assert!(store.list_events(10, None).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_event_is_dropped_by_jetstream_and_still_completed() {
    let nats = NatsServer::start().expect("nats");
    let (store, _dir) = sqlite_store().await;
    let p = publisher(&nats, "w").await;
    let d = dispatcher(&store, p.clone(), "w", 100);
    store.create_ticket(&ticket("t")).await.expect("create");
    let event = store.list_events(1, None).await.expect("list").remove(0);
    // The ack of an earlier attempt was lost: the message is in the stream, the event is not
    // deleted.
    let first = p.publish_batch(std::slice::from_ref(&event)).await;
    assert!(first[0].as_ref().is_ok_and(|a| !a.duplicate));
    store.unlock_events(&[event.id]).await.expect("unlock");
    let swept = d.sweep_once().await.expect("sweep");
    assert_eq!((swept.published, swept.duplicates), (1, 1));
    assert_eq!(stream_messages(&nats.url(), STREAM).await.len(), 1);
    assert!(store.list_events(10, None).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_stops_when_everything_it_claims_must_wait() {
    let nats = NatsServer::start().expect("nats");
    let (store, _dir) = sqlite_store().await;
    let d = dispatcher(&store, publisher(&nats, "w").await, "w", 2);
    let t = store.create_ticket(&ticket("show")).await.expect("create");
    for v in 0..5 {
        store
            .update_ticket(t.id, v, &changes(&format!("v{}", v + 1)))
            .await
            .expect("update");
    }
    let events = store.list_events(10, None).await.expect("list");
    // v0 is held by a live claim elsewhere; v1..v5 are due but must wait behind it.
    let elsewhere = Lease::new("elsewhere", Duration::from_secs(30));
    store
        .claim_fresh(&[events[0].id], &elsewhere)
        .await
        .expect("claim");
    let later: Vec<EventId> = events[1..].iter().map(|e| e.id).collect();
    store.unlock_events(&later).await.expect("unlock");
    let stop = tokio_util::sync::CancellationToken::new();
    let outcome = d
        .sweep(Duration::from_secs(30), &stop)
        .await
        .expect("sweep");
    // A sweep runs several lanes; each takes one step of at most a batch (2) and stops.
    assert_eq!(outcome.published, 0);
    assert_eq!(outcome.deferred, outcome.claimed, "{outcome:?}");
    assert!(
        (2..=2 * worker::dispatch::SWEEP_LANES).contains(&outcome.claimed),
        "one step per lane, not a spin until the budget is spent: {outcome:?}"
    );
    assert!(stream_messages(&nats.url(), STREAM).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_hands_each_event_over_at_commit_already_claimed() {
    let nats = NatsServer::start().expect("nats");
    let (store, dir) = sqlite_store().await;
    let d = dispatcher(&store, publisher(&nats, "w").await, "w", 100);
    let (mut feed, stop) = subscribe(&store, "w").await;

    let t = store.create_ticket(&ticket("show")).await.expect("create");
    store
        .update_ticket(t.id, 0, &changes("v1"))
        .await
        .expect("update");
    let mut handed = Vec::new();
    while handed.iter().map(Claimed::len).sum::<usize>() < 2 {
        let batch = next_batch(&mut feed).await;
        let token = batch.lease().token.clone();
        assert!(
            token.starts_with("w/local/"),
            "handed over by the writer: {token}"
        );
        for event in batch.events() {
            assert_eq!(event.locked_by.as_deref(), Some(token.as_str()));
            let stored = store.get_event(event.id).await.expect("get").expect("row");
            assert_eq!(&stored, event, "what was handed over is the committed row");
        }
        handed.push(batch);
    }
    let versions: Vec<i64> = handed
        .iter()
        .flat_map(|b| b.events().iter().map(|e| e.version))
        .collect();
    assert_eq!(versions, [0, 1]);

    // A writer in another process (a second store on the same file) hands nothing over: its
    // event is written fresh, and the same feed gets it from the tail of the table, claimed
    // for it there; the two events handed over are passed over by the tail.
    let other = SqliteStore::open(dir.path().join("t.db"), Default::default())
        .await
        .expect("open");
    other
        .create_ticket(&ticket("elsewhere"))
        .await
        .expect("create");
    let fresh = newest_event(&store).await;
    let tailed = next_batch(&mut feed).await;
    assert_eq!(
        tailed.events().iter().map(|e| e.id).collect::<Vec<_>>(),
        [fresh]
    );
    assert!(tailed.lease().token.starts_with("w/") && !tailed.lease().token.contains("/local/"));

    for batch in handed {
        let outcome = d.dispatch(batch, Path::ChangeFeed).await.expect("dispatch");
        assert_eq!(outcome.deferred, 0);
    }
    let versions = published_versions(&nats).await;
    assert_eq!(versions, [0, 1], "published in version order");
    let left = outbox_ids(&store, 10).await;
    assert_eq!(left, [fresh], "delivered events are deleted");

    // Once the feed is closed, new events are written fresh, for whatever feed tails the table.
    stop.cancel();
    feed.close().await;
    store.create_ticket(&ticket("later")).await.expect("create");
    let later = store
        .get_event(newest_event(&store).await)
        .await
        .expect("get")
        .expect("row");
    assert_eq!((later.is_locked, later.locked_by), (true, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_feed_releases_the_events_it_did_not_hand_out() {
    let nats = NatsServer::start().expect("nats");
    let (store, _dir) = sqlite_store().await;
    let d = dispatcher(&store, publisher(&nats, "w").await, "w", 100);
    let (mut feed, stop) = subscribe(&store, "w").await;
    for i in 0..3 {
        store
            .create_ticket(&ticket(&format!("t{i}")))
            .await
            .expect("create");
    }
    let held = store.list_events(10, None).await.expect("list");
    assert!(held.iter().all(|e| {
        e.locked_by
            .as_deref()
            .is_some_and(|by| by.starts_with("w/local/"))
    }));

    // Stopped before it attempted anything (SIGTERM): the three are released, due at once.
    stop.cancel();
    assert!(feed.next().await.is_none(), "a stop ends the feed");
    feed.close().await;
    let released = store.list_events(10, None).await.expect("list");
    assert_eq!(released.len(), 3);
    assert!(
        released
            .iter()
            .all(|e| !e.is_locked && e.locked_by.is_none() && e.attempts == 0),
        "released, and releasing is not a failure: {released:?}"
    );
    let swept = d.sweep_once().await.expect("sweep");
    assert_eq!(swept.published, 3, "the next sweep delivers them");

    // Written after the feed stopped: fresh, not claimed by a feed that is gone.
    store.create_ticket(&ticket("after")).await.expect("create");
    let after = store.list_events(10, None).await.expect("list");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].locked_by, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_hand_over_has_no_room_for_come_through_the_tail() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqliteStore::open(
        dir.path().join("t.db"),
        common::store::sqlite::SqliteOptions {
            handover_capacity: 1,
            ..Default::default()
        },
    )
    .await
    .expect("open");
    let (mut feed, _stop) = subscribe(&store, "w").await;
    let first = store.create_ticket(&ticket("first")).await.expect("create");
    let second = store
        .create_ticket(&ticket("second"))
        .await
        .expect("create");
    let events = store.list_events(10, None).await.expect("list");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].aggregate_id, first.id);
    assert!(
        events[0]
            .locked_by
            .as_deref()
            .is_some_and(|by| by.starts_with("w/local/")),
        "the first fills the channel"
    );
    assert_eq!(events[1].aggregate_id, second.id);
    assert_eq!(
        (events[1].is_locked, events[1].locked_by.as_deref()),
        (true, None),
        "no room: written fresh, reserved for a change feed's first attempt"
    );
    let handed = next_batch(&mut feed).await;
    assert_eq!(handed.events()[0].id, events[0].id);
    let tailed = next_batch(&mut feed).await;
    assert_eq!(tailed.events()[0].id, events[1].id);
    assert_eq!(
        tailed.events()[0].locked_by.as_deref(),
        Some(tailed.lease().token.as_str()),
        "claimed from the tail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_handed_over_with_little_of_its_claim_left_goes_to_the_sweep_instead() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tmp");
    // Events are reserved for 1 s only, less than half of the dispatcher's 30 s lease: by the
    // time the feed takes one, a sweep could be taking it too.
    let store = Arc::new(
        SqliteStore::open(
            dir.path().join("t.db"),
            common::store::sqlite::SqliteOptions {
                fresh_lock: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .await
        .expect("open"),
    );
    let d = dispatcher(&store, publisher(&nats, "w").await, "w", 100);
    let (mut feed, _stop) = subscribe(&store, "w").await;
    store.create_ticket(&ticket("late")).await.expect("create");
    let handed = next_batch(&mut feed).await;
    let id = handed.events()[0].id;

    let outcome = d
        .dispatch(handed, Path::ChangeFeed)
        .await
        .expect("dispatch");
    assert_eq!(
        (outcome.published, outcome.deferred, outcome.failed),
        (0, 1, 0)
    );
    assert!(stream_messages(&nats.url(), STREAM).await.is_empty());
    let released = store
        .get_event(id)
        .await
        .expect("get")
        .expect("still there");
    assert_eq!(
        (released.is_locked, released.locked_by, released.attempts),
        (false, None, 0),
        "released, due now, and not a failure"
    );
    let swept = d.sweep_once().await.expect("sweep");
    assert_eq!(swept.published, 1, "the sweep delivers it, once");
    assert_eq!(published_versions(&nats).await, [0]);
}
