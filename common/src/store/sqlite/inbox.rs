//! The inbox: a batch of order messages is one of the writer's event writes (durable, as a
//! ticket write: the consumer acks after it answers). Inside it, what the batch needs is read
//! (set-based, `IN (...)`), `inbox::Batch::plan` decides, and the plan is stored: ticket changes
//! with their events (claimed for the local change feed when it has room, as the API's are),
//! inbox records, alerts.

use super::SqliteStore;
use super::codec::{
    inbox_from_row, insert_events, insert_inbox_records, placeholders, queue_alert,
    ticket_from_row, ts, values_list,
};
use super::outbox::IN_LIST_MAX;
use super::tickets::claimed_event;
use crate::domain::{OutboxEvent, Subject, TicketId};
use crate::inbox::{
    Batch, InboxMessage, InboxRecord, Known, Plan, Reads, RetryPolicy, TicketChange, Verdict,
};
use crate::outbox::rules;
use crate::store::{Inbox, InboxRetention, ParkedMessages, StoreError};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Tickets a batch read changed before the batch wrote them (the writer is the only one, so a
/// bug; the batch is rolled back and its messages are redelivered).
#[derive(Debug, thiserror::Error)]
#[error("{moved} of the tickets {first}.. changed while the inbox applied a batch")]
struct TicketMoved {
    first: TicketId,
    moved: usize,
}

/// Ticket changes per multi-row UPDATE: one statement for this many tickets.
const CHANGES_PER_UPDATE: usize = 100;

const UPDATE_TICKET: &str = "UPDATE tickets SET order_id = ?1, version = version + 1 \
     WHERE id = ?2 AND version = ?3";

/// [`UPDATE_TICKET`] for [`CHANGES_PER_UPDATE`] tickets at once, from a `VALUES` list of
/// (id, orderId, expected version).
static UPDATE_TICKETS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE tickets SET order_id = v.column2, version = tickets.version + 1 \
         FROM (VALUES {}) AS v WHERE tickets.id = v.column1 AND tickets.version = v.column3",
        values_list(3, CHANGES_PER_UPDATE)
    )
});

/// Applies `changes` in order. A multi-row UPDATE changes each ticket once, so a run of changes
/// goes in one only while no ticket repeats in it (a created and its cancelled in one batch
/// change one ticket twice); what does not fill one goes row by row. No RETURNING (SQLite
/// buffers its rows in a temporary table, a cost per message): each row was read in this
/// transaction and its update applies only to that version, so the row stored is
/// `change.ticket` exactly (only `orderId` and `version` change).
fn update_tickets(conn: &Connection, changes: &[TicketChange]) -> rusqlite::Result<()> {
    let moved = |first: &TicketChange, expected: usize, changed: usize| {
        rusqlite::Error::ToSqlConversionFailure(Box::new(TicketMoved {
            first: first.ticket.id,
            moved: expected - changed.min(expected),
        }))
    };
    let mut rest = changes;
    while !rest.is_empty() {
        let mut seen = HashSet::with_capacity(CHANGES_PER_UPDATE);
        let run = rest
            .iter()
            .take(CHANGES_PER_UPDATE)
            .take_while(|c| seen.insert(c.ticket.id))
            .count();
        let (now, later) = rest.split_at(run);
        if now.len() == CHANGES_PER_UPDATE {
            let mut many = conn.prepare_cached(&UPDATE_TICKETS)?;
            for (i, c) in now.iter().enumerate() {
                many.raw_bind_parameter(1 + 3 * i, c.ticket.id.hex())?;
                many.raw_bind_parameter(2 + 3 * i, c.ticket.order_id.as_deref())?;
                many.raw_bind_parameter(3 + 3 * i, c.expected_version)?;
            }
            let changed = many.raw_execute()?;
            if changed != now.len() {
                return Err(moved(&now[0], now.len(), changed));
            }
        } else {
            let mut one = conn.prepare_cached(UPDATE_TICKET)?;
            for c in now {
                let changed = one.execute(params![
                    c.ticket.order_id,
                    c.ticket.id.hex(),
                    c.expected_version
                ])?;
                if changed != 1 {
                    return Err(moved(c, 1, changed));
                }
            }
        }
        rest = later;
    }
    Ok(())
}

/// The values of `ids` found by `sql` (an `IN (...)` of `{}` placeholders), chunk by chunk.
fn found<T: rusqlite::ToSql>(
    conn: &Connection,
    sql: &str,
    ids: &[T],
) -> rusqlite::Result<Vec<String>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(IN_LIST_MAX) {
        let mut stmt = conn.prepare_cached(&sql.replace("{}", &placeholders(chunk.len())))?;
        let rows = stmt.query_map(params_from_iter(chunk), |r| r.get::<_, String>(0))?;
        for row in rows {
            out.push(row?);
        }
    }
    Ok(out)
}

/// What the store holds of what a batch reads.
fn read_known(conn: &Connection, reads: &Reads) -> rusqlite::Result<Known> {
    let mut known = Known::default();
    known.recorded.extend(found(
        conn,
        "SELECT id FROM inbox WHERE id IN ({})",
        &reads.message_ids,
    )?);
    known.cancelled_orders.extend(found(
        conn,
        "SELECT order_id FROM inbox INDEXED BY inbox_cancelled \
         WHERE subject = 'order.cancelled' AND done_at IS NOT NULL AND order_id IN ({})",
        &reads.created_orders,
    )?);
    let ids: Vec<String> = reads.tickets.iter().map(TicketId::to_hex).collect();
    for chunk in ids.chunks(IN_LIST_MAX) {
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {} FROM tickets WHERE id IN ({})",
            ticket_cols!(),
            placeholders(chunk.len())
        ))?;
        let rows = stmt.query_map(params_from_iter(chunk), ticket_from_row)?;
        for row in rows {
            let ticket = row?;
            known.tickets.insert(ticket.id, ticket);
        }
    }
    Ok(known)
}

/// Writes a plan; returns the events of its ticket changes (each built from the row as stored,
/// as the API builds its events). Tickets, events and records go in multi-row statements.
fn store_plan(
    conn: &Connection,
    fresh_lock: Duration,
    claim: Option<&str>,
    plan: &Plan,
) -> rusqlite::Result<Vec<OutboxEvent>> {
    update_tickets(conn, &plan.changes)?;
    let events: Vec<OutboxEvent> = plan
        .changes
        .iter()
        .map(|c| claimed_event(fresh_lock, claim, Subject::TicketUpdated, &c.ticket))
        .collect();
    insert_events(conn, &events)?;
    insert_inbox_records(conn, &plan.records)?;
    for alert in &plan.alerts {
        queue_alert(conn, alert)?;
    }
    Ok(events)
}

/// Reads, plans and stores `batch` in the open transaction.
fn apply(
    conn: &Connection,
    fresh_lock: Duration,
    claim: Option<&str>,
    batch: &Batch,
    reads: &Reads,
    policy: &RetryPolicy,
) -> rusqlite::Result<(Plan, Vec<OutboxEvent>)> {
    let known = read_known(conn, reads)?;
    let plan = batch.plan(known, policy, rules::now());
    let events = store_plan(conn, fresh_lock, claim, &plan)?;
    Ok((plan, events))
}

#[async_trait::async_trait]
impl Inbox for SqliteStore {
    async fn apply_messages(
        &self,
        messages: Arc<[InboxMessage]>,
        policy: &RetryPolicy,
    ) -> Result<Vec<Verdict>, StoreError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        // Read (parsed) here, off the writer thread: its time is every writer's.
        let batch = Batch::new(messages);
        let (reads, policy) = (batch.reads(), *policy);
        self.inner
            .writer
            .submit_event_write("apply_messages", move |conn, opts, claim| {
                let (plan, events) = apply(conn, opts.fresh_lock, claim, &batch, &reads, &policy)?;
                Ok((plan.verdicts, events))
            })
            .await
    }
}

#[async_trait::async_trait]
impl ParkedMessages for SqliteStore {
    async fn list_parked(&self, limit: usize) -> Result<Vec<InboxRecord>, StoreError> {
        self.read("list_parked", move |c| {
            c.prepare_cached(concat!(
                "SELECT ",
                inbox_cols!(),
                " FROM inbox INDEXED BY inbox_parked WHERE done_at IS NULL \
                 ORDER BY received_at, id LIMIT ?1"
            ))?
            .query_map([limit as i64], inbox_from_row)?
            .collect()
        })
        .await
    }

    async fn count_parked(&self) -> Result<u64, StoreError> {
        self.read("count_parked", |c| {
            c.query_row(
                "SELECT COUNT(*) FROM inbox INDEXED BY inbox_parked WHERE done_at IS NULL",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }

    async fn get_message(&self, id: &str) -> Result<Option<InboxRecord>, StoreError> {
        let id = id.to_owned();
        self.read("get_message", move |c| select_record(c, &id))
            .await
    }

    async fn replay_parked(&self, id: &str) -> Result<Option<Verdict>, StoreError> {
        let id = id.to_owned();
        self.inner
            .writer
            .submit_event_write("replay_parked", move |conn, opts, claim| {
                let parked = select_record(conn, &id)?.filter(InboxRecord::is_parked);
                let Some(parked) = parked else {
                    return Ok((None, Vec::new()));
                };
                conn.prepare_cached("DELETE FROM inbox WHERE id = ?1")?
                    .execute([&id])?;
                let message = parked.message();
                let batch = Batch::new(std::slice::from_ref(&message));
                let known = read_known(conn, &batch.reads())?;
                let mut plan = batch.plan(known, &RetryPolicy::PARK_AT_ONCE, rules::now());
                // The operator is looking at it: no new alert.
                plan.alerts.clear();
                let events = store_plan(conn, opts.fresh_lock, claim, &plan)?;
                Ok((plan.verdicts.into_iter().next(), events))
            })
            .await
    }

    async fn drop_parked(&self, id: &str) -> Result<Option<InboxRecord>, StoreError> {
        let id = id.to_owned();
        self.write("drop_parked", move |conn| {
            conn.prepare_cached(concat!(
                "DELETE FROM inbox WHERE id = ?1 AND done_at IS NULL RETURNING ",
                inbox_cols!()
            ))?
            .query_row([&id], inbox_from_row)
            .optional()
        })
        .await
    }
}

/// The retention sweep's range: settled records done before `?1`, oldest first, on the partial
/// index of settled records (parked ones are not in it).
pub(super) const EXPIRED: &str = "SELECT id FROM inbox INDEXED BY inbox_done \
     WHERE done_at IS NOT NULL AND done_at < ?1 ORDER BY done_at LIMIT ?2";

#[async_trait::async_trait]
impl InboxRetention for SqliteStore {
    async fn expire_inbox(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let before = ts(before);
        self.write_bookkeeping("expire_inbox", move |conn, _| {
            let deleted = conn
                .prepare_cached(&format!("DELETE FROM inbox WHERE id IN ({EXPIRED})"))?
                .execute(params![before, limit as i64])?;
            Ok(deleted as u64)
        })
        .await
    }
}

fn select_record(conn: &Connection, id: &str) -> rusqlite::Result<Option<InboxRecord>> {
    conn.prepare_cached(concat!(
        "SELECT ",
        inbox_cols!(),
        " FROM inbox WHERE id = ?1"
    ))?
    .query_row([id], inbox_from_row)
    .optional()
}
