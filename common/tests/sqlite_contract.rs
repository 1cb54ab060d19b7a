//! The store contract against the embedded SQLite store, one test per check, each on a fresh
//! file in a temp dir.

use common::store::SqliteStore;

async fn fresh_store() -> Option<(SqliteStore, tempfile::TempDir)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("nested/tickets.db"), Default::default())
        .await
        .expect("open");
    Some((store, dir))
}

testkit::store_contract_tests!(fresh_store());
