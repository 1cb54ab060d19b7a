//! The store contract against MongoDB, and what only a server shows (write conflicts, commits of
//! unknown outcome, a wrong set name, a dropped collection). Runs only where
//! `TICKETS_TEST_MONGO_URI` names a replica set (e.g.
//! `mongodb://127.0.0.1:27017/?replicaSet=rs0`); each check gets a fresh database
//! `tickets_test_<ObjectId>`, dropped when the check passes (kept for a look when it fails).
//! The commit checks need fail points (`--setParameter enableTestCommands=1`), and say that they
//! skipped without them.

use common::store::mongo::{MongoOptions, MongoStore};
use common::store::{OutboxAdmin, Tickets, UpdateOutcome};
use common::{NewTicket, Price, TicketChanges, Title, UserId};
use std::io::Write;
use std::time::Duration;
use testkit::contract::CHECKS;
use testkit::mongo::with_database;

const URI_VAR: &str = "TICKETS_TEST_MONGO_URI";

/// The replica set to test against, or `None` after saying loudly that the test is skipped.
fn mongo_uri(test: &str) -> Option<String> {
    let uri = std::env::var(URI_VAR).ok().filter(|u| !u.trim().is_empty());
    if uri.is_none() {
        // Straight to stderr, past the test harness' capture: a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "skipped {test}: no MongoDB (set {URI_VAR} to a replica-set URI to run it)"
        );
    }
    uri
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_store_passes_the_store_contract() {
    let Some(uri) = mongo_uri("the MongoDB store contract") else {
        return;
    };
    for (name, check) in CHECKS {
        let database = format!("tickets_test_{}", bson::oid::ObjectId::new().to_hex());
        let options = MongoOptions {
            fresh_lock: Duration::from_secs(30),
            ..MongoOptions::default()
        };
        let store = MongoStore::open(&with_database(&uri, &database), options)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{name}: cannot open the MongoDB store: {}",
                    common::error_chain(&e)
                )
            });
        eprintln!("contract check {name} on database {database}");
        check(&store).await;
        store
            .database()
            .drop()
            .await
            .unwrap_or_else(|e| panic!("{name}: cannot drop {database}: {e}"));
    }
}

/// A transaction of ours that keeps losing write conflicts (another one holds the ticket,
/// uncommitted, for longer than our retries last) is a conflict for the caller (the API re-reads
/// and checks again), not a failure of the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_keeps_losing_write_conflicts_answers_conflict() {
    let Some(uri) = mongo_uri("the MongoDB write-conflict check") else {
        return;
    };
    let database = format!("tickets_test_{}", bson::oid::ObjectId::new().to_hex());
    let store = MongoStore::open(&with_database(&uri, &database), MongoOptions::default())
        .await
        .expect("open");
    let price = |p: f64| Price::new(p).expect("price");
    let title = |t: &str| Title::parse(t).expect("title");
    let ticket = store
        .create_ticket(&NewTicket {
            title: title("a"),
            price: price(1.0),
            user_id: UserId::parse("u").expect("user"),
        })
        .await
        .expect("create");
    let db = store.database();
    let mut held = db.client().start_session().await.expect("session");
    held.start_transaction().await.expect("start");
    db.collection::<bson::Document>("tickets")
        .update_one(
            bson::doc! {"_id": ticket.id.object_id()},
            bson::doc! {"$set": {"title": "held"}},
        )
        .session(&mut held)
        .await
        .expect("held write");
    let outcome = store
        .update_ticket(
            ticket.id,
            0,
            &TicketChanges {
                title: title("b"),
                price: price(2.0),
            },
        )
        .await;
    held.abort_transaction().await.expect("abort");
    assert!(
        matches!(outcome, Ok(UpdateOutcome::Conflict)),
        "expected Ok(Conflict), got {outcome:?}"
    );
    db.drop().await.expect("drop");
}

/// `uri` with option `name` set to `value` (replaced when present, appended otherwise).
fn with_option(uri: &str, name: &str, value: &str) -> String {
    let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut options: Vec<String> = query
        .split('&')
        .filter(|o| !o.is_empty())
        .filter(|o| {
            !o.to_ascii_lowercase()
                .starts_with(&format!("{}=", name.to_ascii_lowercase()))
        })
        .map(str::to_owned)
        .collect();
    options.push(format!("{name}={value}"));
    format!("{base}?{}", options.join("&"))
}

fn new_ticket(title: &str) -> NewTicket {
    NewTicket {
        title: Title::parse(title).expect("title"),
        price: Price::new(20.0).expect("price"),
        user_id: UserId::parse("u").expect("user"),
    }
}

/// Sets MongoDB's `failCommand` fail point for the clients named `app`, or `None` (after saying
/// so) when the server does not allow fail points (it needs `--setParameter
/// enableTestCommands=1`, as the GitHub workflow starts it).
async fn fail_commits(client: &mongodb::Client, app: &str, data: bson::Document) -> Option<()> {
    let mut data = data;
    data.insert("failCommands", vec!["commitTransaction"]);
    data.insert("appName", app);
    let set = client
        .database("admin")
        .run_command(bson::doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 50},
            "data": data,
        })
        .await;
    match set {
        Ok(_) => Some(()),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "skipped: the MongoDB server refuses fail points (start mongod with \
                 --setParameter enableTestCommands=1): {e}"
            );
            None
        }
    }
}

async fn fail_point_off(client: &mongodb::Client) {
    client
        .database("admin")
        .run_command(bson::doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .await
        .expect("fail point off");
}

/// The commit applied, but its confirmation keeps failing (the write concern error a lagging
/// majority or a crashed primary gives) past the retries: the write answers with the stored
/// ticket, not a 503 that the client's retry would turn into a second ticket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_unknown_outcome_that_applied_answers_with_the_stored_ticket() {
    let Some(uri) = mongo_uri("the MongoDB unknown-commit check") else {
        return;
    };
    let database = format!("tickets_test_{}", bson::oid::ObjectId::new().to_hex());
    // A name of its own: the fail point touches this test's client only.
    let app = format!("unknown-commit-{}", bson::oid::ObjectId::new().to_hex());
    let uri = with_option(&with_database(&uri, &database), "appName", &app);
    let store = MongoStore::open(&uri, MongoOptions::default())
        .await
        .expect("open");
    let client = store.database().client().clone();
    let timed_out = bson::doc! {"writeConcernError": {
        "code": 64, "codeName": "WriteConcernFailed",
        "errmsg": "waiting for replication timed out", "errInfo": {"wtimeout": true},
    }};
    if fail_commits(&client, &app, timed_out.clone())
        .await
        .is_none()
    {
        return;
    }
    let created = store.create_ticket(&new_ticket("concert")).await;
    fail_point_off(&client).await;
    let created = created.expect("the committed ticket, read back");
    assert_eq!(
        store.get_ticket(created.id).await.expect("get"),
        Some(created.clone())
    );
    let events = store.list_events(10, None).await.expect("list");
    assert_eq!(events.len(), 1, "one ticket, one event");
    assert_eq!(events[0].aggregate_id, created.id);

    fail_commits(&client, &app, timed_out)
        .await
        .expect("fail point");
    let changes = TicketChanges {
        title: Title::parse("renamed").expect("title"),
        price: Price::new(12.5).expect("price"),
    };
    let updated = store.update_ticket(created.id, 0, &changes).await;
    fail_point_off(&client).await;
    let Ok(UpdateOutcome::Updated(updated)) = updated else {
        panic!("expected the stored update, got {updated:?}");
    };
    assert_eq!((updated.version, updated.title.as_str()), (1, "renamed"));
    assert_eq!(store.list_events(10, None).await.expect("list").len(), 2);
    store.database().drop().await.expect("drop");
}

/// The commit never reached the server (the connection dropped each time): nothing is there to
/// read back, and the write fails as unavailable, with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_unknown_outcome_that_did_not_apply_fails_with_nothing_written() {
    let Some(uri) = mongo_uri("the MongoDB lost-commit check") else {
        return;
    };
    let database = format!("tickets_test_{}", bson::oid::ObjectId::new().to_hex());
    let app = format!("lost-commit-{}", bson::oid::ObjectId::new().to_hex());
    let uri = with_option(&with_database(&uri, &database), "appName", &app);
    let store = MongoStore::open(&uri, MongoOptions::default())
        .await
        .expect("open");
    let client = store.database().client().clone();
    if fail_commits(&client, &app, bson::doc! {"closeConnection": true})
        .await
        .is_none()
    {
        return;
    }
    let created = store.create_ticket(&new_ticket("lost")).await;
    fail_point_off(&client).await;
    let err = created.expect_err("not committed");
    let chain = common::error_chain(&err);
    assert!(chain.contains("commit outcome is unknown"), "{chain}");
    assert!(store.list_events(10, None).await.expect("list").is_empty());
    let tickets = store
        .database()
        .collection::<bson::Document>("tickets")
        .count_documents(bson::doc! {})
        .await
        .expect("count");
    assert_eq!(tickets, 0);
    // Not dropped: the server holds the abandoned transaction (its commit never ran) until it
    // expires (transactionLifetimeLimitSeconds, 60 s), and a drop would wait for it.
    eprintln!("left {database} behind (an abandoned transaction expires in it)");
}

/// A replica set name that is not the server's: the driver waits out the selection timeout
/// and gives up; the start-up probe says what is wrong, and how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_set_name_is_named_at_start() {
    let Some(uri) = mongo_uri("the MongoDB set-name check") else {
        return;
    };
    let wrong = with_option(
        &with_option(&uri, "replicaSet", "not-the-set"),
        "serverSelectionTimeoutMS",
        "2000",
    );
    let err = MongoStore::open(&wrong, MongoOptions::default())
        .await
        .err()
        .expect("the wrong set name is refused");
    let chain = common::error_chain(&err);
    assert!(chain.contains("belongs to the replica set `"), "{chain}");
    assert!(chain.contains("replicaSet=not-the-set"), "{chain}");
}

/// A dropped `events` collection is recreated by the next insert without its indexes (the
/// unique `(aggregateId, version)` among them); the change feed, reopened after the drop
/// invalidated its stream, creates them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_events_collection_gets_its_indexes_back() {
    use common::outbox::Claimer;
    use common::store::FreshEvents;
    let Some(uri) = mongo_uri("the MongoDB dropped-collection check") else {
        return;
    };
    let database = format!("tickets_test_{}", bson::oid::ObjectId::new().to_hex());
    let store = MongoStore::open(&with_database(&uri, &database), MongoOptions::default())
        .await
        .expect("open");
    let stop = tokio_util::sync::CancellationToken::new();
    let claimer = Claimer::new("feed", Duration::from_secs(30));
    let mut feed = store
        .subscribe(&claimer, stop.clone())
        .await
        .expect("subscribe");
    let events = store.database().collection::<bson::Document>("events");
    events.drop().await.expect("drop events");
    // Creates go on (each recreating `events` if needed) until the reopened feed hands one out:
    // by then it has created the indexes.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the feed did not come back after the drop"
        );
        // A create racing the collection's re-creation may fail; the feed is what is tested.
        if let Err(e) = store.create_ticket(&new_ticket("after the drop")).await {
            eprintln!("create after the drop: {}", common::error_chain(&e));
        }
        match tokio::time::timeout(Duration::from_secs(2), feed.next()).await {
            Ok(Some(Ok(batch))) if !batch.is_empty() => break,
            _ => continue,
        }
    }
    let names = events.list_index_names().await.expect("indexes");
    for index in ["events_due", "events_aggregate_version", "events_created"] {
        assert!(
            names.iter().any(|n| n == index),
            "{index} missing: {names:?}"
        );
    }
    stop.cancel();
    feed.close().await;
    store.database().drop().await.expect("drop");
}
