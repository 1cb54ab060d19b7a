//! Rows to values and back: timestamps as fixed-width UTC text, ids as ObjectId hex, the
//! failures and alert snapshots as JSON text.

use crate::domain::{EventId, OutboxEvent, Payload, Subject, Ticket, TicketId};
use crate::inbox::{InboxRecord, Outcome};
use crate::outbox::{Alert, AlertAbout, AlertKind};
use crate::store::BoxError;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

/// UTC timestamps as fixed-width text, so that text order is time order.
pub(super) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(super) fn conversion_error(idx: usize, e: impl Into<BoxError>) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, e.into())
}

pub(super) fn parse_ts(idx: usize, s: &str) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| conversion_error(idx, e))
}

pub(super) fn parse_oid<T>(
    idx: usize,
    s: &str,
    f: impl Fn(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    f(s).ok_or_else(|| conversion_error(idx, format!("not an ObjectId: {s:?}")))
}

fn json_col<T: serde::de::DeserializeOwned>(row: &Row, idx: usize) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    serde_json::from_str(&s).map_err(|e| conversion_error(idx, e))
}

pub(super) fn to_json<T: serde::Serialize>(v: &T) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// `?, ?, ?` for an `IN (...)` list of `n` values.
pub(super) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// A row of `ticket_cols!()`.
pub(super) fn ticket_from_row(row: &Row) -> rusqlite::Result<Ticket> {
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

/// A row of `event_cols!()`.
pub(super) fn event_from_row(row: &Row) -> rusqlite::Result<OutboxEvent> {
    let id: String = row.get(0)?;
    let subject: String = row.get(1)?;
    let aggregate: String = row.get(3)?;
    let locked_until: String = row.get(6)?;
    let created_at: String = row.get(10)?;
    let alerted_at: Option<String> = row.get(11)?;
    let unknown_since: Option<String> = row.get(12)?;
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
        unknown_since: unknown_since.map(|s| parse_ts(12, &s)).transpose()?,
    })
}

/// A row of `id, kind, event, created_at, attempts` of `alerts`. `event` holds the snapshot of
/// what the alert is about: the outbox event, or the parked message for `parked`.
pub(super) fn alert_from_row(row: &Row) -> rusqlite::Result<Alert> {
    let kind: String = row.get(1)?;
    let created_at: String = row.get(3)?;
    let kind = AlertKind::parse(&kind)
        .ok_or_else(|| conversion_error(1, format!("unknown alert kind {kind:?}")))?;
    let about = match kind {
        AlertKind::Parked => AlertAbout::Message(json_col(row, 2)?),
        AlertKind::Firing | AlertKind::Resolved => AlertAbout::Event(json_col(row, 2)?),
    };
    Ok(Alert {
        id: row.get(0)?,
        kind,
        about,
        created_at: parse_ts(3, &created_at)?,
        attempts: row.get(4)?,
    })
}

pub(super) fn insert_event(conn: &Connection, e: &OutboxEvent) -> rusqlite::Result<()> {
    conn.prepare_cached(concat!(
        "INSERT INTO events (",
        event_cols!(),
        ") VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)"
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
        e.unknown_since.map(ts),
    ])?;
    Ok(())
}

pub(super) fn select_event(
    conn: &Connection,
    id: EventId,
) -> rusqlite::Result<Option<OutboxEvent>> {
    conn.prepare_cached(concat!(
        "SELECT ",
        event_cols!(),
        " FROM events WHERE id = ?1"
    ))?
    .query_row([id.to_hex()], event_from_row)
    .optional()
}

/// A row of `inbox_cols!()`.
pub(super) fn inbox_from_row(row: &Row) -> rusqlite::Result<InboxRecord> {
    let sequence: i64 = row.get(3)?;
    let ticket: Option<String> = row.get(5)?;
    let outcome: String = row.get(6)?;
    let received_at: String = row.get(10)?;
    let done_at: Option<String> = row.get(11)?;
    Ok(InboxRecord {
        id: row.get(0)?,
        subject: row.get(1)?,
        stream: row.get(2)?,
        sequence: u64::try_from(sequence).map_err(|e| conversion_error(3, e))?,
        order_id: row.get(4)?,
        ticket_id: ticket
            .map(|t| parse_oid(5, &t, TicketId::parse))
            .transpose()?,
        outcome: Outcome::parse(&outcome)
            .ok_or_else(|| conversion_error(6, format!("unknown outcome {outcome:?}")))?,
        reason: row.get(7)?,
        deliveries: row.get(8)?,
        payload: row.get(9)?,
        received_at: parse_ts(10, &received_at)?,
        done_at: done_at.map(|s| parse_ts(11, &s)).transpose()?,
    })
}

pub(super) fn insert_inbox_record(conn: &Connection, r: &InboxRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(concat!(
        "INSERT INTO inbox (",
        inbox_cols!(),
        ") VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"
    ))?
    .execute(params![
        r.id,
        r.subject,
        r.stream,
        i64::try_from(r.sequence).unwrap_or(i64::MAX),
        r.order_id,
        r.ticket_id.map(|t| t.to_hex()),
        r.outcome.as_str(),
        r.reason,
        r.deliveries,
        r.payload,
        ts(r.received_at),
        r.done_at.map(ts),
    ])?;
    Ok(())
}

/// Queues an alert unless one with its id is queued already.
pub(super) fn queue_alert(conn: &Connection, alert: &Alert) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO alerts (id, kind, event, created_at, attempts, locked_until) \
         VALUES (?1, ?2, ?3, ?4, 0, ?4)",
        params![
            alert.id,
            alert.kind.as_str(),
            match &alert.about {
                AlertAbout::Event(e) => to_json(e)?,
                AlertAbout::Message(m) => to_json(m)?,
            },
            ts(alert.created_at)
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_sort_as_text() {
        let a = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.006Z").expect("t");
        let b = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.100Z").expect("t");
        let (a, b) = (ts(a.with_timezone(&Utc)), ts(b.with_timezone(&Utc)));
        assert_eq!(a, "2026-01-02T03:04:05.006Z");
        assert!(a < b);
    }
}
