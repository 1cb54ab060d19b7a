//! The store contract against MongoDB. Runs only where `TICKETS_TEST_MONGO_URI` names a replica
//! set (e.g. `mongodb://127.0.0.1:27017/?replicaSet=rs0`); each check gets a fresh database
//! `tickets_test_<ObjectId>`, dropped when the check passes (kept for a look when it fails).

use common::store::contract::CHECKS;
use common::store::mongo::{MongoOptions, MongoStore, with_database};
use std::io::Write;
use std::time::Duration;

const URI_VAR: &str = "TICKETS_TEST_MONGO_URI";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_store_passes_the_store_contract() {
    let Some(uri) = std::env::var(URI_VAR).ok().filter(|u| !u.trim().is_empty()) else {
        // Straight to stderr, past the test harness' capture: a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: no MongoDB (set {URI_VAR} to a replica-set URI to run the MongoDB store \
             contract)"
        );
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
                    common::store::error_chain(&e)
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
