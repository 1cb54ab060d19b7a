//! The embedded store: one SQLite file in WAL mode. One writer connection, owned by a thread that
//! commits queued writes in groups (`writer`: writes are serialised by SQLite anyway; queueing
//! in-process beats failing with "database is locked", and a group shares one fsync), and a
//! small pool of readers on tokio's blocking pool. Another process on the same file (a separate
//! `ticketing worker`) waits on `busy_timeout`.

use super::{
    Alert, AlertKind, ChangeFeed, FeedItem, FeedPosition, Lease, LocalFeed, OutboxStats, Page,
    PendingVersion, Store, StoreError, UpdateOutcome,
};
use crate::domain::{
    EventId, FAILURES_KEPT, Failure, NewTicket, OutboxEvent, Payload, Subject, Ticket,
    TicketChanges, TicketId,
};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use writer::{Durability, Handoff, Writer};

mod writer;

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_events_alerted.sql"),
    include_str!("../../migrations/0003_events_failing.sql"),
];
/// The past-threshold gauge. `attempts > 0` repeats the partial index's condition so SQLite
/// can prove the index covers the query (it cannot from `>= ?1` alone, a bound value); a
/// threshold is at least 1, so the condition changes no count.
const COUNT_PAST_THRESHOLD: &str =
    "SELECT COUNT(*) FROM events INDEXED BY events_failing WHERE attempts > 0 AND attempts >= ?1";
const MAX_IDLE_READERS: usize = 8;
const FEED_BATCH: i64 = 512;
/// Most values bound in one `IN (...)` list (SQLite allows 32,766 variables).
const IN_LIST_MAX: usize = 500;
const FEED_NAME: &str = "change-feed";
/// The columns of an event row, in `event_from_row`'s order. Macros rather than constants, so
/// that the statements using them are put together at compile time (`concat!`) instead of
/// formatted on every call: the writer runs these for every request.
macro_rules! event_cols {
    () => {
        "id, subject, data, aggregate_id, version, is_locked, locked_until, \
         locked_by, failures, attempts, created_at, alerted_at"
    };
}
/// The columns of a ticket row, in `ticket_from_row`'s order.
macro_rules! ticket_cols {
    () => {
        "id, title, price, user_id, version, order_id"
    };
}
const EVENT_COLS: &str = event_cols!();

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How long a new event stays reserved for the change feed's first attempt before the sweep
    /// may take it (`OUTBOX_LOCK_SECS`).
    pub fresh_lock: Duration,
    /// How often a change feed in another process than the writer looks for new events.
    pub feed_poll: Duration,
    /// Benchmark baseline only: write tickets without their events. Never in production.
    pub write_outbox: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            fresh_lock: Duration::from_secs(30),
            feed_poll: Duration::from_millis(100),
            write_outbox: true,
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

/// `?, ?, ?` for an `IN (...)` list of `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

// ---- value mapping ----

/// UTC timestamps as fixed-width text, so that text order is time order.
fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn conversion_error(idx: usize, e: impl Into<super::BoxError>) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, e.into())
}

fn parse_ts(idx: usize, s: &str) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| conversion_error(idx, e))
}

fn parse_oid<T>(idx: usize, s: &str, f: impl Fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    f(s).ok_or_else(|| conversion_error(idx, format!("not an ObjectId: {s:?}")))
}

fn json_col<T: serde::de::DeserializeOwned>(row: &Row, idx: usize) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    serde_json::from_str(&s).map_err(|e| conversion_error(idx, e))
}

fn ticket_from_row(row: &Row) -> rusqlite::Result<Ticket> {
    let id: String = row.get(0)?;
    Ok(Ticket {
        id: parse_oid(0, &id, TicketId::parse)?,
        title: row.get(1)?,
        price: row.get(2)?,
        user_id: row.get(3)?,
        version: row.get(4)?,
        order_id: row.get(5)?,
    })
}

fn event_from_row(row: &Row) -> rusqlite::Result<OutboxEvent> {
    let id: String = row.get(0)?;
    let subject: String = row.get(1)?;
    let aggregate: String = row.get(3)?;
    let locked_until: String = row.get(6)?;
    let created_at: String = row.get(10)?;
    let alerted_at: Option<String> = row.get(11)?;
    Ok(OutboxEvent {
        id: parse_oid(0, &id, EventId::parse)?,
        subject: Subject::parse(&subject)
            .ok_or_else(|| conversion_error(1, format!("unknown subject {subject:?}")))?,
        data: Payload::parse(row.get(2)?).map_err(|e| conversion_error(2, e))?,
        aggregate_id: parse_oid(3, &aggregate, TicketId::parse)?,
        version: row.get(4)?,
        is_locked: row.get(5)?,
        locked_until: parse_ts(6, &locked_until)?,
        locked_by: row.get(7)?,
        failures: json_col(row, 8)?,
        attempts: row.get(9)?,
        created_at: parse_ts(10, &created_at)?,
        alerted_at: alerted_at.map(|s| parse_ts(11, &s)).transpose()?,
    })
}

fn alert_from_row(row: &Row) -> rusqlite::Result<Alert> {
    let kind: String = row.get(1)?;
    let created_at: String = row.get(3)?;
    Ok(Alert {
        id: row.get(0)?,
        kind: match kind.as_str() {
            "firing" => AlertKind::Firing,
            "resolved" => AlertKind::Resolved,
            other => return Err(conversion_error(1, format!("unknown alert kind {other:?}"))),
        },
        event: json_col(row, 2)?,
        created_at: parse_ts(3, &created_at)?,
        attempts: row.get(4)?,
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn insert_event(conn: &Connection, e: &OutboxEvent) -> rusqlite::Result<()> {
    conn.prepare_cached(concat!(
        "INSERT INTO events (",
        event_cols!(),
        ") VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"
    ))?
    .execute(params![
        e.id.to_hex(),
        e.subject.as_str(),
        e.data.as_str(),
        e.aggregate_id.to_hex(),
        e.version,
        e.is_locked,
        ts(e.locked_until),
        e.locked_by,
        to_json(&e.failures)?,
        e.attempts,
        ts(e.created_at),
        e.alerted_at.map(ts),
    ])?;
    Ok(())
}

/// Writes the outbox event of a ticket write (unless the benchmark baseline turned the outbox
/// off): reserved for a change feed's first attempt, and claimed by the local feed if `claim`.
fn write_event(
    conn: &Connection,
    opts: &SqliteOptions,
    claim: Option<&str>,
    subject: Subject,
    stored: &Ticket,
) -> rusqlite::Result<Option<OutboxEvent>> {
    if !opts.write_outbox {
        return Ok(None);
    }
    // Millisecond precision, as stored: the event handed to a local feed equals the row.
    let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 3);
    let mut event = OutboxEvent::for_ticket(
        subject,
        stored,
        now,
        chrono::Duration::from_std(opts.fresh_lock).unwrap_or_default(),
    );
    event.locked_by = claim.map(str::to_owned);
    insert_event(conn, &event)?;
    Ok(Some(event))
}

fn queue_alert(conn: &Connection, alert: &Alert) -> rusqlite::Result<()> {
    let kind = match alert.kind {
        AlertKind::Firing => "firing",
        AlertKind::Resolved => "resolved",
    };
    conn.execute(
        "INSERT OR IGNORE INTO alerts (id, kind, event, created_at, attempts, locked_until) \
         VALUES (?1, ?2, ?3, ?4, 0, ?4)",
        params![alert.id, kind, to_json(&alert.event)?, ts(alert.created_at)],
    )?;
    Ok(())
}

fn select_event(conn: &Connection, id: EventId) -> rusqlite::Result<Option<OutboxEvent>> {
    conn.prepare_cached(concat!(
        "SELECT ",
        event_cols!(),
        " FROM events WHERE id = ?1"
    ))?
    .query_row([id.to_hex()], event_from_row)
    .optional()
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read("ping", |c| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn create_ticket(&self, new: &NewTicket) -> Result<Ticket, StoreError> {
        let new = new.clone();
        self.inner
            .writer
            .submit_event_write("create_ticket", move |conn, opts, claim| {
                // The event is built from the row as stored (RETURNING), never from the request.
                let stored = conn
                    .prepare_cached(concat!(
                        "INSERT INTO tickets (",
                        ticket_cols!(),
                        ") VALUES (?1, ?2, ?3, ?4, 0, NULL) \
                         RETURNING ",
                        ticket_cols!()
                    ))?
                    .query_row(
                        params![
                            TicketId::new().to_hex(),
                            new.title.as_str(),
                            new.price.value(),
                            new.user_id.as_str()
                        ],
                        ticket_from_row,
                    )?;
                let event = write_event(conn, opts, claim, Subject::TicketCreated, &stored)?;
                Ok((stored, event))
            })
            .await
    }

    async fn get_ticket(&self, id: TicketId) -> Result<Option<Ticket>, StoreError> {
        self.read("get_ticket", move |c| {
            c.prepare_cached(concat!(
                "SELECT ",
                ticket_cols!(),
                " FROM tickets WHERE id = ?1"
            ))?
            .query_row([id.to_hex()], ticket_from_row)
            .optional()
        })
        .await
    }

    async fn list_unreserved(&self, page: Page) -> Result<Vec<Ticket>, StoreError> {
        self.read("list_unreserved", move |c| {
            let after = page.after.map(|a| a.to_hex()).unwrap_or_default();
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                ticket_cols!(),
                " FROM tickets WHERE order_id IS NULL AND id > ?1 \
                 ORDER BY id LIMIT ?2"
            ))?;
            stmt.query_map(params![after, page.limit], ticket_from_row)?
                .collect()
        })
        .await
    }

    async fn update_ticket(
        &self,
        id: TicketId,
        expected_version: i64,
        changes: &TicketChanges,
    ) -> Result<UpdateOutcome, StoreError> {
        let changes = changes.clone();
        self.inner
            .writer
            .submit_event_write("update_ticket", move |conn, opts, claim| {
                let stored = conn
                    .prepare_cached(concat!(
                        "UPDATE tickets SET title = ?1, price = ?2, version = version + 1 \
                         WHERE id = ?3 AND version = ?4 RETURNING ",
                        ticket_cols!()
                    ))?
                    .query_row(
                        params![
                            changes.title.as_str(),
                            changes.price.value(),
                            id.to_hex(),
                            expected_version
                        ],
                        ticket_from_row,
                    )
                    .optional()?;
                let Some(stored) = stored else {
                    let exists = conn
                        .prepare_cached("SELECT 1 FROM tickets WHERE id = ?1")?
                        .exists([id.to_hex()])?;
                    let outcome = if exists {
                        UpdateOutcome::Conflict
                    } else {
                        UpdateOutcome::NotFound
                    };
                    return Ok((outcome, None));
                };
                let event = write_event(conn, opts, claim, Subject::TicketUpdated, &stored)?;
                Ok((UpdateOutcome::Updated(stored), event))
            })
            .await
    }

    async fn claim_fresh(
        &self,
        ids: &[EventId],
        lease: &Lease,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let ids = ids.to_vec();
        let lease = lease.clone();
        self.write_bookkeeping("claim_fresh", move |conn, _| {
            let mut claimed = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(IN_LIST_MAX) {
                let mut stmt = conn.prepare_cached(&format!(
                    "UPDATE events SET locked_by = ?, locked_until = ? \
                     WHERE id IN ({}) AND is_locked = 1 AND locked_by IS NULL \
                     RETURNING {EVENT_COLS}",
                    placeholders(chunk.len())
                ))?;
                let args = [lease.token.clone(), ts(lease.until)]
                    .into_iter()
                    .chain(chunk.iter().map(EventId::to_hex));
                let rows = stmt.query_map(params_from_iter(args), event_from_row)?;
                for row in rows {
                    claimed.push(row?);
                }
            }
            Ok(claimed)
        })
        .await
    }

    async fn claim_due(&self, limit: usize, lease: &Lease) -> Result<Vec<OutboxEvent>, StoreError> {
        // Nothing due (the common case): one index seek on a reader, no write lock taken.
        let now = ts(Utc::now());
        let any_due = self
            .read("claim_due", move |c| {
                c.prepare_cached("SELECT 1 FROM events WHERE locked_until <= ?1 LIMIT 1")?
                    .exists([now])
            })
            .await?;
        if !any_due {
            return Ok(Vec::new());
        }
        let lease = lease.clone();
        self.write_bookkeeping("claim_due", move |conn, _| {
            let claimed = {
                let mut stmt = conn.prepare_cached(concat!(
                    "UPDATE events SET is_locked = 1, locked_by = ?1, locked_until = ?2 \
                     WHERE seq IN (SELECT seq FROM events WHERE locked_until <= ?3 \
                                   ORDER BY locked_until, seq LIMIT ?4) \
                     RETURNING ",
                    event_cols!()
                ))?;
                stmt.query_map(
                    params![lease.token, ts(lease.until), ts(Utc::now()), limit as i64],
                    event_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?
            };
            Ok(claimed)
        })
        .await
    }

    async fn pending_versions(
        &self,
        aggregates: &[TicketId],
    ) -> Result<Vec<PendingVersion>, StoreError> {
        let aggregates = aggregates.to_vec();
        self.read("pending_versions", move |c| {
            let mut out = Vec::new();
            for chunk in aggregates.chunks(IN_LIST_MAX) {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT aggregate_id, version, id FROM events WHERE aggregate_id IN ({}) \
                     ORDER BY aggregate_id, version",
                    placeholders(chunk.len())
                ))?;
                let rows =
                    stmt.query_map(params_from_iter(chunk.iter().map(TicketId::to_hex)), |r| {
                        let aggregate: String = r.get(0)?;
                        let id: String = r.get(2)?;
                        Ok(PendingVersion {
                            aggregate_id: parse_oid(0, &aggregate, TicketId::parse)?,
                            version: r.get(1)?,
                            event_id: parse_oid(2, &id, EventId::parse)?,
                        })
                    })?;
                for row in rows {
                    out.push(row?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn complete(&self, ids: &[EventId]) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.write_bookkeeping("complete", move |conn, _| {
            let now = Utc::now();
            // One cached statement per id rather than an `IN (...)` list: lists of every length
            // are different statements, and parsing one each time cost more than the deletes.
            // Only events that alerted need their row (for the "resolved" alert); the partial
            // index `events_alerted` finds them without touching the others.
            let mut alerted = conn.prepare_cached(concat!(
                "SELECT ",
                event_cols!(),
                " FROM events INDEXED BY events_alerted WHERE alerted_at IS NOT NULL AND id = ?1"
            ))?;
            let mut delete = conn.prepare_cached("DELETE FROM events WHERE id = ?1")?;
            for id in &ids {
                let id = id.to_hex();
                if let Some(event) = alerted.query_row([&id], event_from_row).optional()? {
                    queue_alert(conn, &Alert::new(AlertKind::Resolved, event, now))?;
                }
                delete.execute([&id])?;
            }
            Ok(())
        })
        .await
    }

    async fn release(&self, ids: &[EventId], lease: &Lease) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        let token = lease.token.clone();
        self.write_bookkeeping("release", move |conn, _| {
            {
                let mut stmt = conn.prepare_cached(
                    "UPDATE events SET is_locked = 0, locked_by = NULL, locked_until = ?1 \
                     WHERE id = ?2 AND locked_by = ?3",
                )?;
                let now = ts(Utc::now());
                for id in &ids {
                    stmt.execute(params![now, id.to_hex(), token])?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn record_failure(
        &self,
        ids: &[EventId],
        lease: &Lease,
        error: &str,
        alert_threshold: i64,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let ids = ids.to_vec();
        let token = lease.token.clone();
        let error = error.to_owned();
        self.write_bookkeeping("record_failure", move |conn, _| {
            let now = Utc::now();
            let mut alerted = Vec::new();
            for &id in &ids {
                let Some(mut event) = select_event(conn, id)? else {
                    continue;
                };
                if event.locked_by.as_deref() != Some(token.as_str()) {
                    continue; // our lease expired and somebody else holds it now
                }
                event.failures.push(Failure {
                    at: now,
                    error: error.clone(),
                });
                let excess = event.failures.len().saturating_sub(FAILURES_KEPT);
                event.failures.drain(..excess);
                event.attempts += 1;
                event.is_locked = false;
                event.locked_by = None;
                event.locked_until = now;
                let alert_now = event.attempts >= alert_threshold && event.alerted_at.is_none();
                if alert_now {
                    event.alerted_at = Some(now);
                }
                conn.execute(
                    "UPDATE events SET is_locked = 0, locked_by = NULL, locked_until = ?1, \
                     failures = ?2, attempts = ?3, alerted_at = ?4 WHERE id = ?5",
                    params![
                        ts(now),
                        to_json(&event.failures)?,
                        event.attempts,
                        event.alerted_at.map(ts),
                        id.to_hex()
                    ],
                )?;
                if alert_now {
                    queue_alert(conn, &Alert::new(AlertKind::Firing, event.clone(), now))?;
                    alerted.push(event);
                }
            }
            Ok(alerted)
        })
        .await
    }

    async fn claim_alerts(&self, limit: usize, lease: &Lease) -> Result<Vec<Alert>, StoreError> {
        let until = ts(lease.until);
        self.write_bookkeeping("claim_alerts", move |conn, _| {
            let alerts = {
                let mut stmt = conn.prepare_cached(
                    "UPDATE alerts SET locked_until = ?1 WHERE id IN \
                     (SELECT id FROM alerts WHERE locked_until <= ?2 ORDER BY locked_until LIMIT ?3) \
                     RETURNING id, kind, event, created_at, attempts",
                )?;
                stmt.query_map(params![until, ts(Utc::now()), limit as i64], alert_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            Ok(alerts)
        })
        .await
    }

    async fn delete_alert(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write_bookkeeping("delete_alert", move |conn, _| {
            conn.execute("DELETE FROM alerts WHERE id = ?1", [&id])
                .map(drop)
        })
        .await
    }

    async fn release_alert(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write_bookkeeping("release_alert", move |conn, _| {
            conn.execute(
                "UPDATE alerts SET attempts = attempts + 1, locked_until = ?1 WHERE id = ?2",
                params![ts(Utc::now()), id],
            )
            .map(drop)
        })
        .await
    }

    fn attach_local_feed(&self, claimer: &str, capacity: usize) -> Option<LocalFeed> {
        let token = format!("{claimer}/local/{}", EventId::new());
        let (sender, events) = tokio::sync::mpsc::channel(capacity.max(1));
        self.inner.writer.set_handoff(Handoff {
            token: token.clone(),
            events: sender,
        });
        Some(LocalFeed { token, events })
    }

    async fn change_feed(&self, from: Option<FeedPosition>) -> Result<ChangeFeed, StoreError> {
        let start: i64 = match from {
            Some(p) => p
                .0
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("bad SQLite feed position {:?}", p.0)))?,
            // First start: everything still in the outbox gets its first attempt.
            None => 0,
        };
        let store = self.clone();
        let state = (store, start, VecDeque::<FeedItem>::new());
        let feed = futures::stream::unfold(state, |(store, mut last, mut buffer)| async move {
            loop {
                if let Some(item) = buffer.pop_front() {
                    return Some((Ok(item), (store, last, buffer)));
                }
                let rows = store
                    .read("change_feed", move |c| {
                        // Events a feed in the writer's process already holds (handed over
                        // at commit) are passed over, not offered.
                        let mut stmt = c.prepare_cached(
                            "SELECT seq, id, is_locked = 1 AND locked_by IS NULL FROM events \
                             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                        )?;
                        stmt.query_map(params![last, FEED_BATCH], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, bool>(2)?,
                            ))
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .await;
                match rows {
                    Err(e) => return Some((Err(e), (store, last, buffer))),
                    Ok(rows) if rows.is_empty() => {
                        let poll = store.inner.options.feed_poll;
                        tokio::select! {
                            _ = store.inner.committed.notified() => {}
                            _ = tokio::time::sleep(poll) => {}
                        }
                    }
                    Ok(rows) => {
                        for (seq, id, fresh) in rows {
                            last = seq;
                            if !fresh {
                                continue;
                            }
                            if let Some(event_id) = EventId::parse(&id) {
                                buffer.push_back(FeedItem {
                                    event_id,
                                    position: FeedPosition(seq.to_string()),
                                });
                            }
                        }
                    }
                }
            }
        });
        Ok(Box::pin(feed))
    }

    async fn load_feed_position(&self) -> Result<Option<FeedPosition>, StoreError> {
        self.read("load_feed_position", |c| {
            c.query_row(
                "SELECT position FROM feed_positions WHERE name = ?1",
                [FEED_NAME],
                |r| r.get(0).map(FeedPosition),
            )
            .optional()
        })
        .await
    }

    async fn save_feed_position(&self, position: &FeedPosition) -> Result<(), StoreError> {
        let position = position.0.clone();
        self.write_bookkeeping("save_feed_position", move |conn, _| {
            conn.execute(
                "INSERT INTO feed_positions (name, position) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                params![FEED_NAME, position],
            )
            .map(drop)
        })
        .await
    }

    async fn outbox_stats(&self, alert_threshold: i64) -> Result<OutboxStats, StoreError> {
        self.read("outbox_stats", move |c| {
            let now = ts(Utc::now());
            let (depth, unlocked): (i64, i64) = c.query_row(
                "SELECT COUNT(*), (SELECT COUNT(*) FROM events WHERE locked_until <= ?1) FROM events",
                [&now],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let oldest: Option<String> = c
                .query_row(
                    "SELECT created_at FROM events ORDER BY seq LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let past: i64 =
                c.query_row(COUNT_PAST_THRESHOLD, [alert_threshold.max(1)], |r| r.get(0))?;
            let pending_alerts: i64 =
                c.query_row("SELECT COUNT(*) FROM alerts", [], |r| r.get(0))?;
            Ok(OutboxStats {
                depth: depth as u64,
                locked: (depth - unlocked) as u64,
                unlocked: unlocked as u64,
                oldest_created_at: oldest.map(|s| parse_ts(0, &s)).transpose()?,
                past_alert_threshold: past as u64,
                pending_alerts: pending_alerts as u64,
            })
        })
        .await
    }

    async fn get_event(&self, id: EventId) -> Result<Option<OutboxEvent>, StoreError> {
        self.read("get_event", move |c| select_event(c, id)).await
    }

    async fn list_events(
        &self,
        limit: usize,
        stuck_threshold: Option<i64>,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.read("list_events", move |c| {
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                event_cols!(),
                " FROM events WHERE attempts >= ?1 ORDER BY seq LIMIT ?2"
            ))?;
            stmt.query_map(
                params![stuck_threshold.unwrap_or(0), limit as i64],
                event_from_row,
            )?
            .collect()
        })
        .await
    }

    async fn unlock_events(&self, ids: &[EventId]) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        self.write_bookkeeping("unlock_events", move |conn, _| {
            let mut n = 0;
            {
                let mut stmt = conn.prepare_cached(
                    "UPDATE events SET is_locked = 0, locked_by = NULL, locked_until = ?1 \
                     WHERE id = ?2",
                )?;
                let now = ts(Utc::now());
                for id in &ids {
                    n += stmt.execute(params![now, id.to_hex()])? as u64;
                }
            }
            Ok(n)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fresh_store() -> Option<(SqliteStore, tempfile::TempDir)> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("nested/tickets.db"), Default::default())
            .await
            .expect("open");
        Some((store, dir))
    }

    crate::store_contract_tests!(fresh_store());

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
        let lease = Lease {
            token: "w".to_owned(),
            until: Utc::now() + chrono::Duration::seconds(30),
        };
        store.claim_fresh(&[failed], &lease).await.expect("claim");
        store
            .record_failure(&[failed], &lease, "boom", 5)
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
            title: crate::Title::parse(Some(&serde_json::json!(title))).expect("title"),
            price: crate::Price::parse(Some(&serde_json::json!(1)), "p").expect("price"),
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
        let mut feed = store.attach_local_feed("test", 1024).expect("local feed");
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
        // The local feed got each stored event once, and nothing of the writes undone.
        let mut handed = Vec::new();
        while let Ok(event) = feed.events.try_recv() {
            handed.push(event.aggregate_id);
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
            .map(|e| crate::store::error_chain(e))
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

    #[test]
    fn timestamps_sort_as_text() {
        let a = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.006Z").expect("t");
        let b = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.100Z").expect("t");
        let (a, b) = (ts(a.with_timezone(&Utc)), ts(b.with_timezone(&Utc)));
        assert_eq!(a, "2026-01-02T03:04:05.006Z");
        assert!(a < b);
    }
}
