//! The embedded store: one SQLite file in WAL mode. One writer connection, owned by a thread that
//! commits queued writes in groups (`writer`: writes are serialised by SQLite anyway; queueing
//! in-process beats failing with "database is locked", and a group shares one fsync), and a
//! small pool of readers on tokio's blocking pool. Another process on the same file (a separate
//! `ticketing worker`) waits on `busy_timeout`.
//!
//! By capability: `tickets`, `outbox` (claims, outcomes, alerts), `feed` (where this store
//! picks its change feed), `admin`, `inbox` (order messages in); rows are read and written by
//! `codec`.

use crate::store::{Health, StoreError};
use rusqlite::{Connection, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use writer::{Durability, Writer};

/// The columns of an event row, in `codec::event_from_row`'s order. Macros rather than
/// constants, so that the statements using them are put together at compile time (`concat!`)
/// instead of formatted on every call: the writer runs these for every request.
macro_rules! event_cols {
    () => {
        "id, subject, data, aggregate_id, version, is_locked, locked_until, \
         locked_by, failures, attempts, created_at, alerted_at, unknown_since"
    };
}
/// The columns of a ticket row, in `codec::ticket_from_row`'s order.
macro_rules! ticket_cols {
    () => {
        "id, title, price, user_id, version, order_id"
    };
}
/// The columns of an inbox row, in `codec::inbox_from_row`'s order.
macro_rules! inbox_cols {
    () => {
        "id, subject, stream, sequence, order_id, ticket_id, outcome, reason, deliveries, \
         payload, received_at, done_at"
    };
}

mod admin;
mod codec;
mod feed;
mod inbox;
mod outbox;
mod tickets;
mod writer;

const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/0001_init.sql"),
    include_str!("../../../migrations/0002_events_alerted.sql"),
    include_str!("../../../migrations/0003_events_failing.sql"),
    include_str!("../../../migrations/0004_events_unknown_since.sql"),
    include_str!("../../../migrations/0005_alert_digests.sql"),
    include_str!("../../../migrations/0006_inbox.sql"),
];
const MAX_IDLE_READERS: usize = 8;

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How long a new event stays reserved for the change feed's first attempt before the sweep
    /// may take it (`OUTBOX_LOCK_SECS`).
    pub fresh_lock: Duration,
    /// How often a change feed in another process than the writer looks for new events.
    pub feed_poll: Duration,
    /// Room in the channel of events handed over to a subscriber in this process: beyond it,
    /// new events are written fresh and reach it through the tail of the table.
    pub handover_capacity: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            fresh_lock: Duration::from_secs(30),
            feed_poll: Duration::from_millis(100),
            handover_capacity: 8_192,
        }
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The one writer connection, owned by its thread (group commit).
    writer: Writer,
    readers: Mutex<Vec<Connection>>,
    /// Woken after every commit that wrote an unclaimed event, so a change feed tailing the
    /// table in this process sees it at once.
    committed: Arc<Notify>,
    options: SqliteOptions,
}

impl SqliteStore {
    /// Opens (creating it and its parent folders if needed) and migrates the database file.
    pub async fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let store = tokio::task::spawn_blocking(move || -> Result<Self, StoreError> {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| StoreError::backend("open", e))?;
            }
            let conn = open_and_migrate(&path)?;
            let committed = Arc::new(Notify::new());
            let checkpoints = connect(&path).map_err(|e| StoreError::backend("open", e))?;
            let writer = Writer::spawn(conn, checkpoints, options.clone(), committed.clone())
                .map_err(|e| StoreError::backend("open", e))?;
            Ok(Self {
                inner: Arc::new(Inner {
                    path,
                    writer,
                    readers: Mutex::new(Vec::new()),
                    committed,
                    options,
                }),
            })
        })
        .await
        .map_err(|e| StoreError::backend("open", e))??;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `write` on the writer thread, in its next group, and answers once that group is on
    /// disk, as a ticket write does. For tools (the benchmark's baselines write tickets without
    /// events through it); the service's own writes go through the capabilities.
    pub async fn write<T, F>(&self, op: &'static str, mut write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.inner
            .writer
            .submit(op, Durability::Durable, move |conn, _| write(conn))
            .await
    }

    /// Outbox bookkeeping (claims, deliveries, failures, alerts, the feed position): committed
    /// without waiting for an fsync. Losing the last of these in a power cut is harmless: a lost
    /// claim expires, a lost delete republishes an event JetStream drops as a duplicate, and the
    /// next durable commit (WAL order) makes everything before it durable anyway.
    async fn write_bookkeeping<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &SqliteOptions) -> rusqlite::Result<T> + Send + 'static,
    {
        self.inner
            .writer
            .submit(op, Durability::Bookkeeping, f)
            .await
    }

    async fn read<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().ok().and_then(|mut r| r.pop());
            let conn = match pooled {
                Some(c) => c,
                None => connect(&inner.path).map_err(|e| StoreError::backend(op, e))?,
            };
            let result = f(&conn).map_err(|e| StoreError::backend(op, e));
            if let Ok(mut idle) = inner.readers.lock()
                && idle.len() < MAX_IDLE_READERS
            {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::backend(op, e))?
    }
}

#[async_trait::async_trait]
impl Health for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read("ping", |c| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // WAL: readers never block the writer. synchronous=FULL: a 201 means the ticket and its
    // event survive a power cut, not only a process crash.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Opens the writer connection and migrates. Several processes starting together on one file
/// (`api` and `worker`) can find it locked while another switches it to WAL or migrates it:
/// that is retried, for up to [`OPEN_BUSY_FOR`].
fn open_and_migrate(path: &Path) -> Result<Connection, StoreError> {
    let started = std::time::Instant::now();
    loop {
        let attempt = connect(path).and_then(|mut c| migrate(&mut c).map(|()| c));
        match attempt {
            Ok(c) => return Ok(c),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && started.elapsed() < OPEN_BUSY_FOR =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(StoreError::backend("open", e)),
        }
    }
}

const OPEN_BUSY_FOR: Duration = Duration::from_secs(30);

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::admin::COUNT_PAST_THRESHOLD;
    use super::*;
    use crate::domain::AttemptOutcome;
    use crate::domain::{NewTicket, Ticket, TicketId};
    use crate::outbox::{Claimer, FailedAttempt, Lease, rules};
    use crate::store::{FreshEvents, Outbox, OutboxAdmin, Tickets};
    use tokio_util::sync::CancellationToken;

    async fn fresh_store() -> Option<(SqliteStore, tempfile::TempDir)> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("nested/tickets.db"), Default::default())
            .await
            .expect("open");
        Some((store, dir))
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_does_not_migrate_twice() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, Default::default())
            .await
            .expect("open");
        let created = store.create_ticket(&new_ticket("x")).await.expect("create");
        drop(store);
        let again = SqliteStore::open(&path, Default::default())
            .await
            .expect("reopen");
        assert_eq!(
            again.get_ticket(created.id).await.expect("get"),
            Some(created)
        );
    }

    /// `.cargo/config.toml` sets these for the bundled SQLite; a build without them works but
    /// takes a global mutex on every page fetch and every allocation.
    #[test]
    fn the_bundled_sqlite_is_built_without_its_global_mutexes() {
        let conn = Connection::open_in_memory().expect("open");
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("compile options");
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
    }

    #[tokio::test]
    async fn the_past_threshold_gauge_reads_only_the_index_of_failed_events() {
        let (store, dir) = fresh_store().await.expect("store");
        let conn = connect(&dir.path().join("nested/tickets.db")).expect("connect");
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {COUNT_PAST_THRESHOLD}"))
            .expect("plan")
            .query_map([5], |r| r.get::<_, String>(3))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("plan rows");
        assert_eq!(
            plan,
            ["SEARCH events USING COVERING INDEX events_failing (attempts>?)"],
            "a range over the partial index, no table scan"
        );
        // A fresh event is not in the index; one that failed is, and the gauge counts it.
        let indexed = || -> i64 {
            conn.query_row(
                "SELECT COUNT(*) FROM events INDEXED BY events_failing WHERE attempts > 0",
                [],
                |r| r.get(0),
            )
            .expect("count")
        };
        store.create_ticket(&new_ticket("x")).await.expect("create");
        store.create_ticket(&new_ticket("y")).await.expect("create");
        assert_eq!(indexed(), 0);
        let failed = store.list_events(1, None).await.expect("list")[0].id;
        let lease = Lease::new("w", Duration::from_secs(30));
        store.claim_fresh(&[failed], &lease).await.expect("claim");
        store
            .fail(
                &[failed],
                &lease,
                &FailedAttempt::new("boom", AttemptOutcome::NotStored, rules::now(), 5),
            )
            .await
            .expect("failure");
        assert_eq!(indexed(), 1);
        assert_eq!(
            store
                .outbox_stats(1)
                .await
                .expect("stats")
                .past_alert_threshold,
            1
        );
        assert_eq!(
            store
                .outbox_stats(2)
                .await
                .expect("stats")
                .past_alert_threshold,
            0
        );
    }

    /// A store whose file got `sql` from outside (as an operator, or a bug, could do).
    async fn store_altered_with(sql: &str) -> (SqliteStore, PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, Default::default())
            .await
            .expect("open");
        connect(&path)
            .and_then(|c| c.execute_batch(sql))
            .expect("alter");
        (store, path, dir)
    }

    fn new_ticket(title: &str) -> NewTicket {
        NewTicket {
            title: crate::Title::parse(title).expect("title"),
            price: crate::Price::new(1.0).expect("price"),
            user_id: crate::UserId::parse("u").expect("user"),
        }
    }

    /// Creates tickets with these titles all at once (so they commit in a few groups).
    async fn create_all_at_once(
        store: &SqliteStore,
        titles: impl Iterator<Item = &'static str>,
    ) -> Vec<Result<Ticket, StoreError>> {
        let writes = titles.map(|title| {
            let store = store.clone();
            let ticket = new_ticket(title);
            tokio::spawn(async move { store.create_ticket(&ticket).await })
        });
        futures::future::join_all(writes)
            .await
            .into_iter()
            .map(|r| r.expect("task"))
            .collect()
    }

    fn count(path: &Path, sql: &str) -> i64 {
        connect(path)
            .and_then(|c| c.query_row(sql, [], |r| r.get(0)))
            .expect("count")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_in_a_group_undoes_only_itself() {
        // Events of "bad" tickets cannot be written.
        let (store, path, _dir) = store_altered_with(
            "CREATE TRIGGER no_bad BEFORE INSERT ON events \
             WHEN json_extract(NEW.data, '$.title') = 'bad' \
             BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .await;
        let claimer = Claimer::new("test", Duration::from_secs(30));
        let stop = CancellationToken::new();
        let mut feed = store.subscribe(&claimer, stop).await.expect("subscribe");
        // 64 writes queued at once: they commit in a few groups, good and bad mixed (a group
        // with a failure runs again, one savepoint per write).
        let titles = (0..64).map(|i| if i % 2 == 0 { "good" } else { "bad" });
        let results = create_all_at_once(&store, titles).await;
        let mut created = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(r.is_ok(), i % 2 == 0, "write {i}: {r:?}");
            if let Ok(t) = r {
                created.push(t.id);
            }
        }
        assert_eq!(count(&path, "SELECT COUNT(*) FROM tickets"), 32);
        assert_eq!(count(&path, "SELECT COUNT(*) FROM events"), 32);
        assert_eq!(
            count(&path, "SELECT COUNT(*) FROM tickets WHERE title = 'bad'"),
            0
        );
        for &id in &created {
            assert!(store.get_ticket(id).await.expect("get").is_some());
        }
        // The feed was handed each stored event once, and nothing of the writes undone.
        let mut handed = Vec::new();
        while handed.len() < created.len() {
            let batch = tokio::time::timeout(Duration::from_secs(10), feed.next())
                .await
                .expect("handed over in time")
                .expect("not stopped")
                .expect("a batch");
            assert!(batch.lease().token.starts_with("test/local/"));
            handed.extend(batch.events().iter().map(|e| e.aggregate_id));
        }
        handed.sort();
        created.sort();
        assert_eq!(handed, created);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_whose_commit_fails_answers_every_write_with_the_error_and_keeps_none() {
        // A "poison" ticket's event inserts a row whose deferred foreign key fails at COMMIT,
        // after every write of its group has succeeded on its own.
        let (store, path, _dir) = store_altered_with(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY); \
             CREATE TABLE child (parent_id INTEGER REFERENCES parent (id) \
                 DEFERRABLE INITIALLY DEFERRED); \
             CREATE TRIGGER poison AFTER INSERT ON events \
             WHEN json_extract(NEW.data, '$.title') = 'poison' \
             BEGIN INSERT INTO child VALUES (42); END;",
        )
        .await;
        let titles = (0..64).map(|i| if i == 10 { "poison" } else { "good" });
        let results = create_all_at_once(&store, titles).await;
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| crate::error_chain(e))
            .collect();
        assert!(results[10].is_err(), "the poisoned write fails");
        assert!(
            failed.iter().all(|e| e.contains("FOREIGN KEY")),
            "every write of its group hears why: {failed:?}"
        );
        let kept: Vec<TicketId> = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|t| t.id)
            .collect();
        let stored = (
            count(&path, "SELECT COUNT(*) FROM tickets"),
            count(&path, "SELECT COUNT(*) FROM events"),
        );
        assert_eq!(
            stored,
            (kept.len() as i64, kept.len() as i64),
            "exactly the writes that answered Ok are stored, each with its event"
        );
        for id in kept {
            assert!(store.get_ticket(id).await.expect("get").is_some());
        }
        // The writer goes on: the next write commits.
        store
            .create_ticket(&new_ticket("after"))
            .await
            .expect("create");
    }
}
