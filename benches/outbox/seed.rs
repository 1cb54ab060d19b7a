//! Fast backlog seeding: one SQLite transaction through rusqlite, straight into `tickets` and
//! `events` with the schema's columns (the file must already be migrated by `SqliteStore::open`).

use anyhow::Context;
use chrono::{DateTime, Utc};
use common::domain::AttemptOutcome;
use common::{EventId, Failure, Ticket, TicketId};
use rusqlite::{Connection, params};
use std::path::Path;
use std::time::Duration;

/// The state the seeded events are left in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// NATS was down: published once, failed, unlocked (`is_locked = 0`, `locked_until` in the
    /// past, one failure recorded). The sweep takes them.
    Failed,
    /// Held by another worker until an hour from now: the sweep finds nothing due.
    LockedFuture,
    /// Published ten minutes ago with no PubAck (the outcome unknown: the stream may hold
    /// them), then unlocked: past any duplicate window, the sweep reads the stream first.
    Unknown,
}

/// The store's timestamp format (fixed-width UTC text).
pub fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

pub fn connect(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    Ok(conn)
}

/// Inserts `n` tickets, each with its `ticket.created` event in the `waiting` state.
pub fn backlog(path: &Path, n: usize, waiting: Waiting) -> anyhow::Result<()> {
    let mut conn = connect(path)?;
    // Seeding only: the measured store keeps its own synchronous=FULL connection.
    conn.pragma_update(None, "synchronous", "OFF")?;
    let now = Utc::now();
    let created = ts(now - chrono::Duration::minutes(10));
    let failed = |error: &str, outcome| -> anyhow::Result<String> {
        Ok(serde_json::to_string(&[Failure {
            at: now - chrono::Duration::minutes(9),
            error: error.to_owned(),
            outcome,
        }])?)
    };
    let unlocked = ts(now - chrono::Duration::minutes(9));
    let mut unknown_since = None;
    let (is_locked, locked_until, locked_by, failures, attempts) = match waiting {
        Waiting::Failed => (
            0,
            unlocked,
            None,
            failed(
                "NATS is not connected (nats://127.0.0.1:4222)",
                AttemptOutcome::NotStored,
            )?,
            1,
        ),
        Waiting::Unknown => {
            unknown_since = Some(ts(now - chrono::Duration::minutes(10)));
            (
                0,
                unlocked,
                None,
                failed(
                    "timed out: didn't receive ack in time",
                    AttemptOutcome::Unknown,
                )?,
                1,
            )
        }
        Waiting::LockedFuture => (
            1,
            ts(now + chrono::Duration::hours(1)),
            Some(format!("other-worker/{}", EventId::new())),
            "[]".to_owned(),
            0,
        ),
    };
    let tx = conn.transaction()?;
    {
        let mut tickets = tx.prepare(
            "INSERT INTO tickets (id, title, price, user_id, version, order_id) \
             VALUES (?1, ?2, ?3, ?4, 0, NULL)",
        )?;
        let mut events = tx.prepare(
            "INSERT INTO events (id, subject, data, aggregate_id, version, is_locked, \
             locked_until, locked_by, failures, attempts, created_at, alerted_at, unknown_since) \
             VALUES (?1, 'ticket.created', ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8, ?9, NULL, ?10)",
        )?;
        for i in 0..n {
            let ticket = Ticket {
                id: TicketId::new(),
                title: format!("concert #{i}"),
                price: 20.0,
                user_id: "bench-user".to_owned(),
                version: 0,
                order_id: None,
            };
            let id = ticket.id.to_hex();
            tickets.execute(params![id, ticket.title, ticket.price, ticket.user_id])?;
            events.execute(params![
                EventId::new().to_hex(),
                serde_json::to_string(&ticket)?,
                id,
                is_locked,
                locked_until,
                locked_by,
                failures,
                attempts,
                created,
                unknown_since,
            ])?;
        }
    }
    tx.commit()?;
    checkpoint(&conn)?;
    Ok(())
}

/// Makes every event due now, as if all of them had failed a minute ago.
pub fn make_all_due(path: &Path) -> anyhow::Result<()> {
    let mut conn = connect(path)?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    let tx = conn.transaction()?;
    tx.execute(
        "UPDATE events SET is_locked = 0, locked_by = NULL, locked_until = ?1",
        [ts(Utc::now() - chrono::Duration::minutes(1))],
    )?;
    tx.commit()?;
    checkpoint(&conn)?;
    Ok(())
}

fn checkpoint(conn: &Connection) -> anyhow::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

pub fn count_events(conn: &Connection) -> anyhow::Result<u64> {
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?;
    Ok(n as u64)
}

/// One message as the outbox would publish it.
#[derive(Clone)]
pub struct Message {
    pub subject: String,
    pub payload: Vec<u8>,
    pub msg_id: String,
}

/// The waiting events, oldest first, as raw messages (for the raw-publish ceiling).
pub fn messages(path: &Path) -> anyhow::Result<Vec<Message>> {
    let conn = connect(path)?;
    let mut stmt = conn.prepare("SELECT subject, data, id FROM events ORDER BY seq")?;
    let rows = stmt.query_map([], |r| {
        Ok(Message {
            subject: r.get(0)?,
            payload: r.get::<_, String>(1)?.into_bytes(),
            msg_id: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// `EXPLAIN QUERY PLAN` of the sweep's claim, exactly as `SqliteStore::claim_due` issues it.
pub fn claim_due_plan(path: &Path) -> anyhow::Result<Vec<String>> {
    let conn = connect(path)?;
    let sql = "EXPLAIN QUERY PLAN \
               UPDATE events SET is_locked = 1, locked_by = ?1, locked_until = ?2 \
               WHERE seq IN (SELECT seq FROM events WHERE locked_until <= ?3 \
                             ORDER BY locked_until, seq LIMIT ?4) \
               RETURNING id";
    let mut stmt = conn.prepare(sql)?;
    let now = ts(Utc::now());
    let rows = stmt.query_map(params!["x", now, now, 1000], |r| r.get::<_, String>(3))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}
