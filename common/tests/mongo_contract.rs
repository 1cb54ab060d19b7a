//! The store contract against MongoDB. Runs only where `TICKETS_TEST_MONGO_URI` names a replica
//! set (e.g. `mongodb://127.0.0.1:27017/?replicaSet=rs0`); each check gets a fresh database
//! `tickets_test_<ObjectId>`, dropped when the check passes (kept for a look when it fails).

use common::store::mongo::{MongoOptions, MongoStore};
use common::store::{Tickets, UpdateOutcome};
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
