//! The store contract: one suite, generic over [`Store`], that every adapter must pass.
//! SQLite runs it in `common/tests/sqlite_contract.rs`; MongoDB runs it whenever `TICKETS_TEST_MONGO_URI` is set.
//! Each check takes a fresh, empty store whose new events are reserved for the change feed for
//! 30 s (the default `OUTBOX_LOCK_SECS`).

use common::domain::AttemptOutcome;
use common::inbox::{InboxMessage, ORDER_CANCELLED, ORDER_CREATED, Outcome, RetryPolicy, Verdict};
use common::outbox::{AlertAbout, AlertKind, Claimer, FailedAttempt, Lease, rules};
use common::store::{Page, Store, UpdateOutcome};
use common::{EventId, NewTicket, Price, Subject, TicketChanges, TicketId, Title, UserId};
use futures::StreamExt;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The single list of contract checks: expands `$callback!($($pre)* check, check, ...)`, so the
/// per-test macro below and the [`CHECKS`] table are generated from one list.
#[doc(hidden)]
#[macro_export]
macro_rules! __store_contract_checks {
    ([$($callback:tt)*] ($($pre:tt)*)) => {
        $($callback)*!($($pre)*
            create_writes_ticket_and_fresh_event,
            update_writes_event_from_stored_row,
            update_reports_conflict_and_not_found,
            listing_pages_unreserved_tickets,
            fresh_event_is_claimed_once,
            sweep_claims_only_unlocked_or_expired,
            failures_unlock_keep_last_ten_and_alert_once,
            complete_deletes_and_resolves_alerted,
            release_needs_the_lease,
            pending_versions_lists_the_outbox_per_ticket,
            change_feed_sees_commits_in_order,
            fresh_events_are_handed_out_claimed_in_commit_order,
            an_unknown_outcome_is_kept_with_the_event,
            alerts_are_claimed_once,
            a_digest_turn_is_taken_once_per_period,
            stats_and_operator_commands,
            concurrent_claims_each_get_a_full_batch_while_enough_are_due,
            a_stale_failure_report_raises_no_alert,
            concurrent_updates_of_one_ticket_answer_updated_or_conflict,
            inbox_reserves_and_releases_with_one_event_each,
            inbox_applies_a_message_once_however_often_it_comes,
            inbox_a_cancelled_before_its_created_wins,
            inbox_a_created_for_a_held_ticket_changes_nothing,
            inbox_unknown_tickets_retry_then_park_and_malformed_messages_park_at_once,
            inbox_parked_messages_replay_and_drop,
            inbox_retention_deletes_settled_records_in_bounded_batches,
            inbox_and_ticket_updates_interleave_with_contiguous_versions,
            inbox_a_large_batch_applies_every_change_in_order,
        );
    };
}

/// Expands to one `#[tokio::test]` per contract check. `$make` is an async expression yielding
/// `Option<(impl Store, guard)>` (the guard, such as a temp dir, lives as long as the test);
/// `None` means "this adapter can't run here" and the test says so.
#[macro_export]
macro_rules! store_contract_tests {
    ($make:expr) => {
        $crate::__store_contract_checks!([$crate::store_contract_tests] (@each $make;));
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                match $make.await {
                    Some((store, _guard)) => $crate::contract::$name(&store).await,
                    None => eprintln!("skipped {}: adapter not available here", stringify!($name)),
                }
            }
        )*
    };
}

/// One contract check: runs against a fresh, empty store and panics when the store breaks the
/// contract.
pub type Check = for<'a> fn(&'a dyn Store) -> BoxFuture<'a, ()>;

macro_rules! checks_table {
    ($($name:ident),* $(,)?) => {
        /// Every contract check with its name, for adapters that run the suite from one test
        /// (each check still needs a fresh store).
        pub const CHECKS: &[(&str, Check)] = &[$((stringify!($name), |store| Box::pin($name(store)))),*];
    };
}

crate::__store_contract_checks!([checks_table]());

fn new_ticket(title: &str, price: f64, user: &str) -> NewTicket {
    NewTicket {
        title: Title::parse(title).expect("valid title"),
        price: Price::new(price).expect("valid price"),
        user_id: UserId::parse(user).expect("valid user"),
    }
}

fn changes(title: &str, price: f64) -> TicketChanges {
    TicketChanges {
        title: Title::parse(title).expect("valid title"),
        price: Price::new(price).expect("valid price"),
    }
}

/// An attempt refused before it reached the stream, failed now.
fn failed(error: impl Into<String>, threshold: i64) -> FailedAttempt {
    FailedAttempt::new(error, AttemptOutcome::NotStored, rules::now(), threshold)
}

fn lease(who: &str) -> Lease {
    Lease::new(who, Duration::from_secs(30))
}

fn expired_lease(who: &str) -> Lease {
    let mut l = Lease::new(who, Duration::ZERO);
    l.until -= chrono::Duration::seconds(1);
    l
}

/// Creates `n` tickets (`t0`, `t1`, ...) in an empty store and returns their (fresh) events,
/// as `list_events` lists them.
async fn seed_events(store: &dyn Store, n: usize) -> Vec<common::OutboxEvent> {
    for i in 0..n {
        store
            .create_ticket(&new_ticket(&format!("t{i}"), 1.0, "u"))
            .await
            .expect("create");
    }
    let events = store.list_events(n + 1, None).await.expect("list");
    assert_eq!(events.len(), n, "an empty store to start from");
    events
}

/// Creates one ticket in an empty store and returns the id of its (fresh) event.
async fn one_event(store: &dyn Store) -> EventId {
    store
        .create_ticket(&new_ticket("a", 1.0, "u"))
        .await
        .expect("create");
    store.list_events(1, None).await.expect("list")[0].id
}

pub async fn create_writes_ticket_and_fresh_event(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("concert", 20.0, "user-1"))
        .await
        .expect("create");
    assert_eq!((t.version, t.price, t.title.as_str()), (0, 20.0, "concert"));
    assert_eq!(store.get_ticket(t.id).await.expect("get"), Some(t.clone()));
    let events = store.list_events(10, None).await.expect("list");
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.subject, Subject::TicketCreated);
    assert_eq!(e.aggregate_id, t.id);
    assert_eq!(e.version, 0);
    assert_eq!(e.data.to_value(), serde_json::to_value(&t).expect("json"));
    assert!(e.is_locked && e.locked_by.is_none());
    assert!(e.locked_until > chrono::Utc::now());
    assert_eq!((e.attempts, e.failures.len()), (0, 0));
    assert!(
        store
            .get_ticket(TicketId::new())
            .await
            .expect("get")
            .is_none()
    );
}

/// A price that needs all 17 digits: the event's payload (a document on MongoDB) must hold the
/// stored double bit for bit, not one read back one unit in the last place off.
const SEVENTEEN_DIGITS: f64 = 394_301.338_356_336_75;

pub async fn update_writes_event_from_stored_row(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("a", 5.0, "u"))
        .await
        .expect("create");
    let outcome = store
        .update_ticket(t.id, 0, &changes("b", SEVENTEEN_DIGITS))
        .await
        .expect("update");
    let UpdateOutcome::Updated(u) = outcome else {
        panic!("expected Updated, got {outcome:?}");
    };
    assert_eq!((u.version, u.title.as_str()), (1, "b"));
    assert_eq!(u.price.to_bits(), SEVENTEEN_DIGITS.to_bits());
    let events = store.list_events(10, None).await.expect("list");
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].subject, Subject::TicketUpdated);
    assert_eq!(events[1].version, 1);
    assert_eq!(
        events[1].data.to_value(),
        serde_json::to_value(&u).expect("json")
    );
}

pub async fn update_reports_conflict_and_not_found(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("a", 5.0, "u"))
        .await
        .expect("create");
    let first = store.update_ticket(t.id, 0, &changes("b", 1.0)).await;
    assert!(matches!(first, Ok(UpdateOutcome::Updated(_))));
    let stale = store.update_ticket(t.id, 0, &changes("c", 2.0)).await;
    assert_eq!(stale.expect("update"), UpdateOutcome::Conflict);
    let missing = store
        .update_ticket(TicketId::new(), 0, &changes("c", 2.0))
        .await;
    assert_eq!(missing.expect("update"), UpdateOutcome::NotFound);
    // The conflict wrote nothing: still two events, ticket at version 1.
    assert_eq!(store.list_events(10, None).await.expect("list").len(), 2);
    let stored = store.get_ticket(t.id).await.expect("get").expect("exists");
    assert_eq!((stored.version, stored.title.as_str()), (1, "b"));
}

pub async fn listing_pages_unreserved_tickets(store: &dyn Store) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let t = store
            .create_ticket(&new_ticket(&format!("t{i}"), 1.0 + i as f64, "u"))
            .await
            .expect("create");
        ids.push(t.id);
    }
    ids.sort();
    let first = store
        .list_unreserved(Page {
            limit: 2,
            after: None,
        })
        .await
        .expect("list");
    assert_eq!(first.iter().map(|t| t.id).collect::<Vec<_>>(), ids[..2]);
    let rest = store
        .list_unreserved(Page {
            limit: 10,
            after: Some(ids[1]),
        })
        .await
        .expect("list");
    assert_eq!(rest.iter().map(|t| t.id).collect::<Vec<_>>(), ids[2..]);
}

pub async fn fresh_event_is_claimed_once(store: &dyn Store) {
    let id = one_event(store).await;
    let (a, b) = (lease("replica-a"), lease("replica-b"));
    let first = store.claim_fresh(&[id], &a).await.expect("claim");
    let second = store.claim_fresh(&[id], &b).await.expect("claim");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].locked_by.as_deref(), Some(a.token.as_str()));
    assert!(second.is_empty(), "a second replica must not get the event");
    // Neither may the sweep while the lease holds.
    assert!(store.claim_due(10, &b).await.expect("due").is_empty());
}

pub async fn sweep_claims_only_unlocked_or_expired(store: &dyn Store) {
    let events = seed_events(store, 3).await;
    // Fresh events are reserved for the change feed: nothing is due.
    assert!(
        store
            .claim_due(10, &lease("s"))
            .await
            .expect("due")
            .is_empty()
    );
    // One fails (unlocked), one is held by a feed whose lease already expired, one stays held.
    let dead = expired_lease("dead-worker");
    let held = store.claim_fresh(&[events[0].id], &dead).await.expect("c");
    assert_eq!(held.len(), 1);
    let failing = lease("w");
    store
        .claim_fresh(&[events[1].id], &failing)
        .await
        .expect("c");
    store
        .fail(&[events[1].id], &failing, &failed("nats down", 5))
        .await
        .expect("fail");
    store
        .claim_fresh(&[events[2].id], &lease("alive"))
        .await
        .expect("c");
    let sweeper = lease("sweeper");
    let mut due = store.claim_due(10, &sweeper).await.expect("due");
    due.sort_by_key(|e| e.id);
    let mut want = vec![events[0].id, events[1].id];
    want.sort();
    assert_eq!(due.iter().map(|e| e.id).collect::<Vec<_>>(), want);
    assert!(
        due.iter()
            .all(|e| e.is_locked && e.locked_by.as_deref() == Some(&sweeper.token))
    );
    // Claimed once: a concurrent sweeper finds nothing.
    assert!(
        store
            .claim_due(10, &lease("other"))
            .await
            .expect("due")
            .is_empty()
    );
}

pub async fn failures_unlock_keep_last_ten_and_alert_once(store: &dyn Store) {
    let id = one_event(store).await;
    let first = lease("feed");
    assert_eq!(store.claim_fresh(&[id], &first).await.expect("c").len(), 1);
    let alerted = store
        .fail(&[id], &first, &failed("error 1", 3))
        .await
        .expect("fail");
    assert!(alerted.is_empty());
    let mut alert_count = 0;
    for n in 2..=12 {
        let l = lease("sweep");
        let claimed = store.claim_due(10, &l).await.expect("due");
        assert_eq!(claimed.len(), 1, "attempt {n}");
        let alerted = store
            .fail(&[id], &l, &failed(format!("error {n}"), 3))
            .await
            .expect("fail");
        alert_count += alerted.len();
        if n == 3 {
            assert_eq!(alerted.len(), 1, "alerts when attempts reach the threshold");
        }
    }
    assert_eq!(alert_count, 1, "one alert per event, not one per sweep");
    let e = store.get_event(id).await.expect("get").expect("exists");
    assert_eq!(e.attempts, 12);
    assert!(!e.is_locked && e.locked_by.is_none());
    assert_eq!(e.failures.len(), 10);
    assert_eq!(e.failures[0].error, "error 3");
    assert_eq!(e.last_error(), Some("error 12"));
    assert!(e.alerted_at.is_some());
    // A failure reported under a lease that is no longer held changes nothing.
    let stale = store
        .fail(&[id], &first, &failed("late", 3))
        .await
        .expect("fail");
    assert!(stale.is_empty());
    assert_eq!(
        store.get_event(id).await.expect("get").expect("e").attempts,
        12
    );
    let alerts = store
        .claim_alerts(AlertKind::Firing, 10, &lease("a"))
        .await
        .expect("alerts");
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].kind, AlertKind::Firing);
    assert_eq!(alerts[0].event().expect("about an event").id, id);
    assert_eq!(alerts[0].event().expect("about an event").attempts, 3);
}

pub async fn complete_deletes_and_resolves_alerted(store: &dyn Store) {
    store
        .create_ticket(&new_ticket("a", 1.0, "u"))
        .await
        .expect("create");
    store
        .create_ticket(&new_ticket("b", 1.0, "u"))
        .await
        .expect("create");
    let events = store.list_events(10, None).await.expect("list");
    let (quiet, alerted) = (events[0].id, events[1].id);
    let l = lease("w");
    store.claim_fresh(&[quiet, alerted], &l).await.expect("c");
    store
        .fail(&[alerted], &l, &failed("boom", 1))
        .await
        .expect("fail");
    let fired = store
        .claim_alerts(AlertKind::Firing, 10, &lease("a"))
        .await
        .expect("alerts");
    assert_eq!(fired.len(), 1);
    assert_eq!(store.alerted_events().await.expect("alerted"), 1);
    store
        .delete_alerts(&[fired[0].id.clone()])
        .await
        .expect("delete");
    store.complete(&[quiet, alerted]).await.expect("complete");
    assert!(store.list_events(10, None).await.expect("list").is_empty());
    assert_eq!(store.alerted_events().await.expect("alerted"), 0);
    let resolved = store
        .claim_alerts(AlertKind::Resolved, 10, &lease("a"))
        .await
        .expect("alerts");
    assert_eq!(
        resolved.len(),
        1,
        "one resolved alert, for the alerted event only"
    );
    assert_eq!(resolved[0].kind, AlertKind::Resolved);
    assert_eq!(resolved[0].event().expect("about an event").id, alerted);
    // Completing again (a re-delivered duplicate) is harmless.
    store.complete(&[alerted]).await.expect("complete");
}

pub async fn release_needs_the_lease(store: &dyn Store) {
    let id = one_event(store).await;
    let mine = lease("mine");
    store.claim_fresh(&[id], &mine).await.expect("c");
    store.release(&[id], &lease("intruder")).await.expect("r");
    assert!(store.get_event(id).await.expect("g").expect("e").is_locked);
    store.release(&[id], &mine).await.expect("r");
    let e = store.get_event(id).await.expect("g").expect("e");
    assert!(!e.is_locked && e.locked_by.is_none());
    assert_eq!(e.attempts, 0, "waiting is not a failure");
    assert_eq!(
        store.claim_due(10, &lease("s")).await.expect("due").len(),
        1
    );
}

pub async fn pending_versions_lists_the_outbox_per_ticket(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("a", 1.0, "u"))
        .await
        .expect("create");
    store
        .update_ticket(t.id, 0, &changes("b", 2.0))
        .await
        .expect("update");
    let other = store
        .create_ticket(&new_ticket("x", 1.0, "u"))
        .await
        .expect("create");
    let pending = store.pending_versions(&[t.id]).await.expect("pending");
    assert_eq!(
        pending.iter().map(|p| p.version).collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(pending.iter().all(|p| p.aggregate_id == t.id));
    let first = pending[0].event_id;
    store.complete(&[first]).await.expect("complete");
    let pending = store
        .pending_versions(&[t.id, other.id])
        .await
        .expect("pending");
    assert_eq!(pending.len(), 2);
}

pub async fn change_feed_sees_commits_in_order(store: &dyn Store) {
    let start = store.load_position().await.expect("load");
    let mut feed = store.changes(start).await.expect("feed");
    let created: Vec<EventId> = seed_events(store, 3).await.iter().map(|e| e.id).collect();
    let mut seen = Vec::new();
    let mut last = None;
    while seen.len() < 3 {
        let item = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("the feed must deliver within 10 s")
            .expect("feed ended")
            .expect("feed error");
        seen.push(item.event_id);
        last = Some(item.position);
    }
    assert_eq!(seen, created);
    let last = last.expect("a position");
    store.save_position(&last).await.expect("save");
    assert_eq!(
        store.load_position().await.expect("load"),
        Some(last.clone())
    );
    // Resuming from the saved position yields only what came after it.
    drop(feed);
    store
        .create_ticket(&new_ticket("late", 1.0, "u"))
        .await
        .expect("create");
    let mut resumed = store.changes(Some(last)).await.expect("feed");
    let next = tokio::time::timeout(Duration::from_secs(10), resumed.next())
        .await
        .expect("resumed feed must deliver")
        .expect("feed ended")
        .expect("feed error");
    assert!(!created.contains(&next.event_id));
}

/// The first attempt's way in, whatever the store's mechanism: each event committed after
/// `subscribe` comes out once, in commit order, already claimed for the subscriber (so no
/// sweep and no other replica takes it); a stop ends the feed.
pub async fn fresh_events_are_handed_out_claimed_in_commit_order(store: &dyn Store) {
    let claimer = Claimer::new("feed", Duration::from_secs(30));
    let stop = CancellationToken::new();
    let mut feed = store
        .subscribe(&claimer, stop.clone())
        .await
        .expect("subscribe");
    let created: Vec<EventId> = seed_events(store, 3).await.iter().map(|e| e.id).collect();
    let mut seen = Vec::new();
    while seen.len() < created.len() {
        let batch = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("the feed must deliver within 10 s")
            .expect("not stopped")
            .expect("a batch");
        assert!(!batch.is_empty(), "a batch is never empty");
        let token = batch.lease().token.clone();
        assert!(token.starts_with("feed/"), "{token}");
        for e in batch.events() {
            assert!(e.is_locked);
            assert_eq!(e.locked_by.as_deref(), Some(token.as_str()));
        }
        assert!(
            store
                .claim_due(10, &lease("sweeper"))
                .await
                .expect("due")
                .is_empty(),
            "what the feed holds is not due"
        );
        let ids: Vec<EventId> = batch.events().iter().map(|e| e.id).collect();
        batch.complete(&ids).await.expect("complete");
        seen.extend(ids);
    }
    assert_eq!(seen, created, "each once, in commit order");
    assert!(store.list_events(10, None).await.expect("list").is_empty());
    stop.cancel();
    assert!(feed.next().await.is_none(), "a stop ends the feed");
    feed.close().await;
}

/// What a failed attempt leaves known about the stream is stored with the event: each
/// failure's outcome, and since when an attempt of unknown outcome may have stored it.
pub async fn an_unknown_outcome_is_kept_with_the_event(store: &dyn Store) {
    let id = one_event(store).await;
    let l = lease("w");
    store.claim_fresh(&[id], &l).await.expect("claim");
    let sent = rules::now() - chrono::Duration::seconds(3);
    let attempt = FailedAttempt::new("timed out", AttemptOutcome::Unknown, sent, 5);
    store.fail(&[id], &l, &attempt).await.expect("fail");
    let e = store.get_event(id).await.expect("get").expect("exists");
    assert_eq!(e.unknown_since, Some(sent));
    assert_eq!(e.failures[0].outcome, AttemptOutcome::Unknown);
    let l = lease("sweep");
    assert_eq!(store.claim_due(10, &l).await.expect("due").len(), 1);
    store
        .fail(&[id], &l, &failed("not connected", 5).after_absent())
        .await
        .expect("fail");
    let e = store.get_event(id).await.expect("get").expect("exists");
    assert_eq!(e.unknown_since, None, "a read showed it absent");
    assert_eq!(
        e.failures.iter().map(|f| f.outcome).collect::<Vec<_>>(),
        [AttemptOutcome::Unknown, AttemptOutcome::NotStored]
    );
}

pub async fn alerts_are_claimed_once(store: &dyn Store) {
    let id = one_event(store).await;
    let l = lease("w");
    store.claim_fresh(&[id], &l).await.expect("c");
    store.fail(&[id], &l, &failed("boom", 1)).await.expect("f");
    let claim = |who| async move {
        store
            .claim_alerts(AlertKind::Firing, 10, &lease(who))
            .await
            .expect("claim")
    };
    let (a, b) = (claim("a").await, claim("b").await);
    assert_eq!((a.len(), b.len()), (1, 0));
    assert!(
        store
            .claim_alerts(AlertKind::Resolved, 10, &lease("c"))
            .await
            .expect("claim")
            .is_empty(),
        "one kind at a time"
    );
    store
        .release_alerts(&[a[0].id.clone()], true)
        .await
        .expect("release");
    let again = claim("b").await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1, "a failed post counts");
    store
        .release_alerts(&[a[0].id.clone()], false)
        .await
        .expect("release");
    let later = claim("c").await;
    assert_eq!(later[0].attempts, 1, "a post not made does not count");
}

/// Of several senders, one gets each turn to post a digest of a kind, and the next turn comes
/// a period later.
pub async fn a_digest_turn_is_taken_once_per_period(store: &dyn Store) {
    let period = Duration::from_secs(60);
    let turns = futures::future::join_all(
        (0..4).map(|_| store.take_digest_turn(AlertKind::Firing, period)),
    )
    .await;
    let taken = turns
        .into_iter()
        .filter(|t| *t.as_ref().expect("turn"))
        .count();
    assert_eq!(taken, 1, "one sender gets the turn");
    assert!(
        !store
            .take_digest_turn(AlertKind::Firing, period)
            .await
            .expect("turn")
    );
    assert!(
        store
            .take_digest_turn(AlertKind::Resolved, period)
            .await
            .expect("turn"),
        "each kind has its own turns"
    );
    // A period of zero: the last turn is long enough ago.
    assert!(
        store
            .take_digest_turn(AlertKind::Firing, Duration::ZERO)
            .await
            .expect("turn")
    );
}

pub async fn stats_and_operator_commands(store: &dyn Store) {
    let empty = store.outbox_stats(5).await.expect("stats");
    assert_eq!(empty.depth, 0);
    assert!(empty.oldest_created_at.is_none());
    let events = seed_events(store, 3).await;
    let l = lease("w");
    store.claim_fresh(&[events[0].id], &l).await.expect("c");
    store
        .fail(&[events[0].id], &l, &failed("boom", 1))
        .await
        .expect("f");
    let stats = store.outbox_stats(1).await.expect("stats");
    assert_eq!((stats.depth, stats.locked, stats.unlocked), (3, 2, 1));
    assert_eq!(stats.past_alert_threshold, 1);
    assert_eq!(stats.pending_alerts, 1);
    assert_eq!(stats.oldest_created_at, Some(events[0].created_at));
    let stuck = store.list_events(10, Some(1)).await.expect("list");
    assert_eq!(
        stuck.iter().map(|e| e.id).collect::<Vec<_>>(),
        [events[0].id]
    );
    // Operator retry: unlock a fresh event now so the next sweep takes it.
    assert_eq!(store.unlock_events(&[events[1].id]).await.expect("u"), 1);
    assert_eq!(
        store.claim_due(10, &lease("s")).await.expect("due").len(),
        2
    );
}

/// Sweep lanes claim side by side, and a lane takes a short claim to mean "nothing more is due".
/// So a claim returns fewer than `limit` only when fewer were due, even while others claim.
pub async fn concurrent_claims_each_get_a_full_batch_while_enough_are_due(store: &dyn Store) {
    let ids: Vec<EventId> = seed_events(store, 60).await.iter().map(|e| e.id).collect();
    assert_eq!(store.unlock_events(&ids).await.expect("unlock"), 60);
    let (a, b, c) = (lease("lane-a"), lease("lane-b"), lease("lane-c"));
    let (ca, cb, cc) = futures::join!(
        store.claim_due(15, &a),
        store.claim_due(15, &b),
        store.claim_due(15, &c)
    );
    let claims = [ca.expect("a"), cb.expect("b"), cc.expect("c")];
    let sizes: Vec<usize> = claims.iter().map(Vec::len).collect();
    assert_eq!(
        sizes,
        [15, 15, 15],
        "each concurrent claim gets a full batch"
    );
    let mut taken: Vec<_> = claims.iter().flatten().map(|e| e.id).collect();
    taken.sort();
    taken.dedup();
    assert_eq!(taken.len(), 45, "no event claimed twice");
    let rest = store.claim_due(20, &lease("lane-d")).await.expect("d");
    assert_eq!(
        rest.len(),
        15,
        "a short claim means that is all that was due"
    );
}

/// Only the caller still holding an event records its failure, and only such a caller can raise
/// its alert: not one whose lease was taken over, even when the threshold is already reached.
pub async fn a_stale_failure_report_raises_no_alert(store: &dyn Store) {
    let id = one_event(store).await;
    let old = lease("old-holder");
    assert_eq!(store.claim_fresh(&[id], &old).await.expect("c").len(), 1);
    let alerted = store
        .fail(&[id], &old, &failed("error 1", 5))
        .await
        .expect("fail");
    assert!(alerted.is_empty());
    let holder = lease("holder");
    assert_eq!(store.claim_due(10, &holder).await.expect("due").len(), 1);
    // The old holder reports again, with a threshold the event has reached: nothing happens.
    let stale = store
        .fail(&[id], &old, &failed("late", 1))
        .await
        .expect("fail");
    assert!(stale.is_empty(), "a stale report must not alert: {stale:?}");
    let e = store.get_event(id).await.expect("get").expect("exists");
    assert_eq!(e.attempts, 1);
    assert!(e.alerted_at.is_none());
    assert_eq!(e.locked_by.as_deref(), Some(holder.token.as_str()));
    assert!(
        store
            .claim_alerts(AlertKind::Firing, 10, &lease("a"))
            .await
            .expect("alerts")
            .is_empty()
    );
    // The holder's report alerts, once, with the event as it stands after this failure.
    let alerted = store
        .fail(&[id], &holder, &failed("error 2", 1))
        .await
        .expect("fail");
    assert_eq!(alerted.len(), 1);
    assert_eq!(alerted[0].attempts, 2);
    let alerts = store
        .claim_alerts(AlertKind::Firing, 10, &lease("a"))
        .await
        .expect("alerts");
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].event().expect("about an event").attempts, 2);
    assert_eq!(
        alerts[0].event().expect("about an event").last_error(),
        Some("error 2")
    );
}

/// Writers racing on one version: exactly one wins, every other one hears `Conflict` (which the
/// API answers by re-reading), never an error. (A MongoDB transaction that loses a write
/// conflict on every retry is forced in its own test, `tests/mongo_contract.rs`.)
pub async fn concurrent_updates_of_one_ticket_answer_updated_or_conflict(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("a", 1.0, "u"))
        .await
        .expect("create");
    let attempts = (0..8).map(|i| {
        let changes = changes(&format!("v{i}"), 2.0);
        async move { store.update_ticket(t.id, 0, &changes).await }
    });
    let outcomes = futures::future::join_all(attempts).await;
    let mut updated = 0;
    for outcome in outcomes {
        match outcome.expect("contention must not be an error") {
            UpdateOutcome::Updated(u) => {
                updated += 1;
                assert_eq!(u.version, 1);
            }
            UpdateOutcome::Conflict => {}
            other => panic!("expected Updated or Conflict, got {other:?}"),
        }
    }
    assert_eq!(updated, 1, "exactly one writer wins version 0");
    assert_eq!(store.list_events(10, None).await.expect("list").len(), 2);
}

// ---- The inbox (order messages in) ----

/// An `order.created` / `order.cancelled` message as the course's orders service publishes it,
/// with `id` as its `Nats-Msg-Id`.
fn order_message(id: &str, subject: &str, order: &str, ticket: TicketId) -> InboxMessage {
    let payload = if subject == ORDER_CREATED {
        serde_json::json!({"id": order, "version": 0, "status": "created", "userId": "buyer",
            "expiresAt": "2026-12-01T10:15:00.000Z", "ticket": {"id": ticket, "price": 20}})
    } else {
        serde_json::json!({"id": order, "version": 1, "ticket": {"id": ticket}})
    };
    InboxMessage::new(
        Some(id),
        "orders",
        1,
        subject,
        payload.to_string().into_bytes(),
        1,
    )
}

fn created(id: &str, order: &str, ticket: TicketId) -> InboxMessage {
    order_message(id, ORDER_CREATED, order, ticket)
}

fn cancelled(id: &str, order: &str, ticket: TicketId) -> InboxMessage {
    order_message(id, ORDER_CANCELLED, order, ticket)
}

fn outcomes(verdicts: &[Verdict]) -> Vec<Outcome> {
    verdicts.iter().map(Verdict::outcome).collect()
}

/// The events of one ticket still in the outbox, by version.
async fn events_of(store: &dyn Store, ticket: TicketId) -> Vec<common::OutboxEvent> {
    let mut events: Vec<_> = store
        .list_events(1000, None)
        .await
        .expect("list")
        .into_iter()
        .filter(|e| e.aggregate_id == ticket)
        .collect();
    events.sort_by_key(|e| e.version);
    events
}

async fn apply(store: &dyn Store, messages: &[InboxMessage]) -> Vec<Verdict> {
    store
        .apply_messages(messages.into(), &RetryPolicy::DEFAULT)
        .await
        .expect("apply")
}

/// `order.created` reserves (the API then hides and protects the ticket), `order.cancelled`
/// releases; each change is one version and one `ticket.updated` event built from the stored
/// row, with `orderId` while reserved; each message leaves a settled record.
pub async fn inbox_reserves_and_releases_with_one_event_each(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("concert", 20.0, "seller"))
        .await
        .expect("create");
    let verdicts = apply(store, &[created("m1", "order-A", t.id)]).await;
    assert_eq!(
        verdicts,
        [Verdict::Applied {
            ticket: t.id,
            order: "order-A".into(),
            version: 1,
            reserved: true
        }]
    );
    let reserved = store.get_ticket(t.id).await.expect("get").expect("exists");
    assert_eq!(
        (reserved.version, reserved.order_id.as_deref()),
        (1, Some("order-A"))
    );
    let listed = store
        .list_unreserved(Page {
            limit: 10,
            after: None,
        })
        .await
        .expect("list");
    assert!(listed.is_empty(), "a reserved ticket is not listed");
    let record = store
        .get_message("m1")
        .await
        .expect("get")
        .expect("recorded");
    assert_eq!(record.outcome, Outcome::Applied);
    assert_eq!(record.order_id.as_deref(), Some("order-A"));
    assert!(record.done_at.is_some());
    assert!(
        record.payload.is_empty(),
        "a settled record keeps no payload"
    );

    let verdicts = apply(store, &[cancelled("m2", "order-A", t.id)]).await;
    assert_eq!(outcomes(&verdicts), [Outcome::Applied]);
    let released = store.get_ticket(t.id).await.expect("get").expect("exists");
    assert_eq!((released.version, released.order_id.as_deref()), (2, None));
    let events = events_of(store, t.id).await;
    assert_eq!(
        events
            .iter()
            .map(|e| (e.subject, e.version))
            .collect::<Vec<_>>(),
        [
            (Subject::TicketCreated, 0),
            (Subject::TicketUpdated, 1),
            (Subject::TicketUpdated, 2)
        ]
    );
    assert_eq!(
        events[1].data.to_value(),
        serde_json::to_value(&reserved).expect("json")
    );
    assert_eq!(events[1].data.to_value()["orderId"], "order-A");
    assert_eq!(
        events[2].data.to_value(),
        serde_json::to_value(&released).expect("json")
    );
    assert!(events[2].data.to_value().get("orderId").is_none());
    assert!(
        events.iter().all(|e| e.is_locked && e.attempts == 0),
        "fresh events, as the API's"
    );
}

/// Exactly once: a message delivered again (in the same batch, in a later one, or published
/// again under its `Nats-Msg-Id` at another stream sequence) changes the ticket once.
pub async fn inbox_applies_a_message_once_however_often_it_comes(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("a", 1.0, "u"))
        .await
        .expect("create");
    let m = created("order-A:created", "order-A", t.id);
    let verdicts = apply(store, &[m.clone(), m.clone()]).await;
    assert_eq!(outcomes(&verdicts), [Outcome::Applied, Outcome::Duplicate]);
    let mut again = m.clone();
    again.sequence = 2;
    again.deliveries = 2;
    assert_eq!(
        outcomes(&apply(store, &[m, again]).await),
        [Outcome::Duplicate; 2]
    );
    // Without a Nats-Msg-Id, the identity is the stream and the sequence.
    let mut anonymous = cancelled("", "order-A", t.id);
    anonymous.sequence = 9;
    anonymous.id = common::inbox::message_key(None, "orders", 9);
    let verdicts = apply(store, &[anonymous.clone()]).await;
    assert_eq!(outcomes(&verdicts), [Outcome::Applied]);
    assert_eq!(
        outcomes(&apply(store, &[anonymous]).await),
        [Outcome::Duplicate]
    );
    let stored = store.get_ticket(t.id).await.expect("get").expect("exists");
    assert_eq!((stored.version, stored.order_id), (2, None));
    assert_eq!(events_of(store, t.id).await.len(), 3, "created + 2 updates");
    assert!(store.get_message("orders:9").await.expect("get").is_some());
}

/// Whatever the delivery order, a cancelled order never holds a ticket: its `cancelled`
/// applied first is remembered, and its `created` changes nothing, in the same batch or later.
pub async fn inbox_a_cancelled_before_its_created_wins(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("a", 1.0, "u"))
        .await
        .expect("create");
    let u = store
        .create_ticket(&new_ticket("b", 1.0, "u"))
        .await
        .expect("create");
    let verdicts = apply(
        store,
        &[
            cancelled("c-A", "order-A", t.id),
            cancelled("c-B", "order-B", u.id),
            created("r-B", "order-B", u.id),
        ],
    )
    .await;
    assert_eq!(outcomes(&verdicts), [Outcome::NoOp; 3]);
    let verdicts = apply(store, &[created("r-A", "order-A", t.id)]).await;
    assert_eq!(outcomes(&verdicts), [Outcome::NoOp]);
    for id in [t.id, u.id] {
        let ticket = store.get_ticket(id).await.expect("get").expect("exists");
        assert_eq!(
            (ticket.version, ticket.order_id),
            (0, None),
            "never reserved"
        );
        assert_eq!(events_of(store, id).await.len(), 1, "no update event");
    }
    let record = store
        .get_message("r-A")
        .await
        .expect("get")
        .expect("recorded");
    assert_eq!(record.outcome, Outcome::NoOp);
    // Another order may still take the ticket.
    let verdicts = apply(store, &[created("r-C", "order-C", t.id)]).await;
    assert_eq!(outcomes(&verdicts), [Outcome::Applied]);
}

/// A `created` for order B while order A holds the ticket does not overwrite A.
pub async fn inbox_a_created_for_a_held_ticket_changes_nothing(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("a", 1.0, "u"))
        .await
        .expect("create");
    apply(store, &[created("r-A", "order-A", t.id)]).await;
    let verdicts = apply(store, &[created("r-B", "order-B", t.id)]).await;
    assert_eq!(
        verdicts,
        [Verdict::Conflict {
            ticket: t.id,
            order: "order-B".into(),
            holder: "order-A".into()
        }]
    );
    let stored = store.get_ticket(t.id).await.expect("get").expect("exists");
    assert_eq!(
        (stored.version, stored.order_id.as_deref()),
        (1, Some("order-A"))
    );
    let record = store
        .get_message("r-B")
        .await
        .expect("get")
        .expect("recorded");
    assert_eq!(record.outcome, Outcome::Conflict);
    // B's cancellation does not release A's ticket either.
    let verdicts = apply(store, &[cancelled("c-B", "order-B", t.id)]).await;
    assert_eq!(outcomes(&verdicts), [Outcome::NoOp]);
    assert_eq!(events_of(store, t.id).await.len(), 2);
}

/// A message whose ticket is unknown is retried (nothing written) until its last delivery, then
/// parked; a malformed one is parked at once. Parked: kept whole with why and its delivery
/// count, out of the retention's reach, and an alert queued in the same transaction.
pub async fn inbox_unknown_tickets_retry_then_park_and_malformed_messages_park_at_once(
    store: &dyn Store,
) {
    let policy = RetryPolicy {
        deliveries: 3,
        first_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
    };
    let missing = TicketId::new();
    let mut message = created("r-X", "order-X", missing);
    for deliveries in 1..3 {
        message.deliveries = deliveries;
        let verdicts = store
            .apply_messages(Arc::from([message.clone()]), &policy)
            .await
            .expect("apply");
        assert_eq!(outcomes(&verdicts), [Outcome::Retried]);
        assert!(verdicts[0].retry_after().is_some());
        assert!(store.get_message("r-X").await.expect("get").is_none());
    }
    message.deliveries = 3;
    let poison = InboxMessage::new(
        Some("poison"),
        "orders",
        5,
        ORDER_CANCELLED,
        b"{oops".to_vec(),
        1,
    );
    let verdicts = store
        .apply_messages(Arc::from([message.clone(), poison]), &policy)
        .await
        .expect("apply");
    assert_eq!(outcomes(&verdicts), [Outcome::Parked, Outcome::Parked]);
    let parked = store.get_message("r-X").await.expect("get").expect("kept");
    assert!(parked.is_parked() && parked.done_at.is_none());
    assert_eq!(parked.deliveries, 3);
    assert_eq!(parked.payload, message.payload, "the raw message");
    assert!(
        parked
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&missing.to_hex())),
        "{parked:?}"
    );
    let poison = store
        .get_message("poison")
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(poison.payload, b"{oops");
    assert_eq!(poison.order_id, None);
    assert_eq!(store.count_parked().await.expect("count"), 2);
    let mut listed: Vec<String> = store
        .list_parked(10)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    listed.sort();
    assert_eq!(listed, ["poison", "r-X"]);
    let mut alerts = store
        .claim_alerts(AlertKind::Parked, 10, &lease("a"))
        .await
        .expect("alerts");
    alerts.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        alerts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        ["inbox:poison:parked", "inbox:r-X:parked"]
    );
    assert!(alerts.iter().all(|a| a.kind == AlertKind::Parked));
    let AlertAbout::Message(about) = &alerts[1].about else {
        panic!("a parked alert is about the message: {:?}", alerts[1]);
    };
    assert_eq!((about.id.as_str(), about.deliveries), ("r-X", 3));
    // The retention never takes a parked message.
    let later = chrono::Utc::now() + chrono::Duration::days(365);
    assert_eq!(store.expire_inbox(later, 100).await.expect("expire"), 0);
    assert_eq!(store.count_parked().await.expect("count"), 2);
}

/// Operators: a replay applies a parked message again now (parked again, without a new alert,
/// when it still cannot be applied); a drop forgets it. Neither touches a settled record.
pub async fn inbox_parked_messages_replay_and_drop(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("a", 1.0, "u"))
        .await
        .expect("create");
    let unknown = created("r-X", "order-X", TicketId::new());
    let poison = InboxMessage::new(
        Some("poison"),
        "orders",
        5,
        ORDER_CREATED,
        b"[]".to_vec(),
        1,
    );
    let verdicts = store
        .apply_messages(
            Arc::from([unknown, poison, created("r-A", "order-A", t.id)]),
            &RetryPolicy::PARK_AT_ONCE,
        )
        .await
        .expect("apply");
    assert_eq!(
        outcomes(&verdicts),
        [Outcome::Parked, Outcome::Parked, Outcome::Applied]
    );
    let queued = store
        .claim_alerts(AlertKind::Parked, 10, &lease("a"))
        .await
        .expect("alerts");
    assert_eq!(queued.len(), 2);
    let ids: Vec<String> = queued.iter().map(|a| a.id.clone()).collect();
    store.delete_alerts(&ids).await.expect("delete");
    let replayed = store.replay_parked("r-X").await.expect("replay");
    assert!(
        matches!(&replayed, Some(Verdict::Parked { reason }) if reason.contains("unknown ticket")),
        "{replayed:?}"
    );
    let again = store.get_message("r-X").await.expect("get").expect("kept");
    assert!(again.is_parked());
    assert!(
        store
            .claim_alerts(AlertKind::Parked, 10, &lease("a"))
            .await
            .expect("alerts")
            .is_empty(),
        "a replay the operator asked for alerts nobody"
    );
    assert_eq!(store.replay_parked("nope").await.expect("replay"), None);
    assert_eq!(
        store.replay_parked("r-A").await.expect("replay"),
        None,
        "an applied message is not replayed"
    );
    assert_eq!(store.drop_parked("r-A").await.expect("drop"), None);
    let dropped = store
        .drop_parked("poison")
        .await
        .expect("drop")
        .expect("was parked");
    assert_eq!(dropped.payload, b"[]");
    assert!(store.get_message("poison").await.expect("get").is_none());
    assert_eq!(store.drop_parked("poison").await.expect("drop"), None);
    assert_eq!(store.count_parked().await.expect("count"), 1);
    assert_eq!(
        events_of(store, t.id).await.len(),
        2,
        "nothing applied twice"
    );
}

/// Settled records expire in bounded batches (a range over an index); younger ones and parked
/// ones stay.
pub async fn inbox_retention_deletes_settled_records_in_bounded_batches(store: &dyn Store) {
    let mut messages = Vec::new();
    for i in 0..5 {
        let t = store
            .create_ticket(&new_ticket(&format!("t{i}"), 1.0, "u"))
            .await
            .expect("create");
        messages.push(created(&format!("r-{i}"), &format!("order-{i}"), t.id));
    }
    messages.push(InboxMessage::new(
        Some("poison"),
        "orders",
        9,
        ORDER_CREATED,
        b"x".to_vec(),
        1,
    ));
    apply(store, &messages).await;
    let hour = chrono::Duration::hours(1);
    let past = chrono::Utc::now() - hour;
    assert_eq!(
        store.expire_inbox(past, 10).await.expect("expire"),
        0,
        "too young"
    );
    let future = chrono::Utc::now() + hour;
    let mut rounds = Vec::new();
    loop {
        let n = store.expire_inbox(future, 2).await.expect("expire");
        rounds.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(rounds, [2, 2, 1, 0]);
    assert!(store.get_message("r-0").await.expect("get").is_none());
    assert!(store.get_message("poison").await.expect("get").is_some());
}

/// Ticket updates (the API's optimistic writes, re-read on a conflict) and order messages on
/// one ticket at once: both apply, the versions stay contiguous, one event each.
pub async fn inbox_and_ticket_updates_interleave_with_contiguous_versions(store: &dyn Store) {
    let t = store
        .create_ticket(&new_ticket("a", 1.0, "u"))
        .await
        .expect("create");
    let updates = async {
        let mut applied = 0;
        for i in 0..10 {
            loop {
                let current = store.get_ticket(t.id).await.expect("get").expect("exists");
                let outcome = store
                    .update_ticket(t.id, current.version, &changes(&format!("v{i}"), 2.0))
                    .await
                    .expect("update");
                match outcome {
                    UpdateOutcome::Updated(_) => break,
                    UpdateOutcome::Conflict => continue,
                    UpdateOutcome::NotFound => panic!("the ticket exists"),
                }
            }
            applied += 1;
        }
        applied
    };
    let orders = async {
        let mut applied = 0;
        for i in 0..5 {
            let order = format!("order-{i}");
            for m in [
                created(&format!("{order}:created"), &order, t.id),
                cancelled(&format!("{order}:cancelled"), &order, t.id),
            ] {
                let verdicts = apply(store, &[m]).await;
                assert_eq!(outcomes(&verdicts), [Outcome::Applied]);
                applied += 1;
            }
        }
        applied
    };
    let (updated, reserved_or_released) = futures::join!(updates, orders);
    let stored = store.get_ticket(t.id).await.expect("get").expect("exists");
    assert_eq!(stored.version, updated + reserved_or_released);
    assert_eq!(stored.order_id, None);
    let versions: Vec<i64> = events_of(store, t.id)
        .await
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(
        versions,
        (0..=stored.version).collect::<Vec<_>>(),
        "one event per version"
    );
}

/// A batch of hundreds of messages (the consumer fetches up to a thousand; a store may write
/// them in multi-row statements), some tickets reserved and released in the same batch, some
/// released at its end: every change applied in order, one event each.
pub async fn inbox_a_large_batch_applies_every_change_in_order(store: &dyn Store) {
    const TICKETS: usize = 250;
    let mut tickets = Vec::with_capacity(TICKETS);
    for i in 0..TICKETS {
        let t = store
            .create_ticket(&new_ticket(&format!("t{i}"), 20.0, "seller"))
            .await
            .expect("create");
        tickets.push(t.id);
    }
    // Released in the same batch, right after the reservation: a few (long runs of distinct
    // tickets between them); released at the end of the batch: every other one.
    let (at_once, at_end) = (|i: usize| i.is_multiple_of(120), |i: usize| i % 2 == 1);
    let released = |i: usize| at_once(i) || at_end(i);
    let mut messages = Vec::new();
    for (i, id) in tickets.iter().enumerate() {
        messages.push(created(&format!("c{i}"), &format!("order-{i}"), *id));
        if at_once(i) {
            messages.push(cancelled(&format!("x{i}"), &format!("order-{i}"), *id));
        }
    }
    for (i, id) in tickets.iter().enumerate() {
        if at_end(i) {
            messages.push(cancelled(&format!("x{i}"), &format!("order-{i}"), *id));
        }
    }
    let verdicts = apply(store, &messages).await;
    assert_eq!(verdicts.len(), messages.len());
    assert!(
        verdicts.iter().all(|v| v.outcome() == Outcome::Applied),
        "{verdicts:?}"
    );
    let events = store.list_events(5_000, None).await.expect("list");
    for (i, id) in tickets.iter().enumerate() {
        let t = store.get_ticket(*id).await.expect("get").expect("exists");
        let order = format!("order-{i}");
        let (version, holder) = if released(i) {
            (2, None)
        } else {
            (1, Some(order.as_str()))
        };
        assert_eq!(
            (t.version, t.order_id.as_deref()),
            (version, holder),
            "ticket {i}"
        );
        let mut versions: Vec<(i64, Option<String>)> = events
            .iter()
            .filter(|e| e.aggregate_id == *id)
            .map(|e| {
                let data = e.data.to_value();
                (e.version, data["orderId"].as_str().map(str::to_owned))
            })
            .collect();
        versions.sort();
        let mut want = vec![(0, None), (1, Some(order.clone()))];
        if released(i) {
            want.push((2, None));
        }
        assert_eq!(versions, want, "events of ticket {i}");
    }
}
