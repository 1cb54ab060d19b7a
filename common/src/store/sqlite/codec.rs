//! Rows to values and back: timestamps as fixed-width UTC text, ids as ObjectId hex, the
//! failures and alert snapshots as JSON text.

use crate::domain::{EventId, Hex, OutboxEvent, Payload, Subject, Ticket, TicketId};
use crate::inbox::{InboxRecord, Outcome};
use crate::outbox::{Alert, AlertAbout, AlertKind};
use crate::store::BoxError;
use chrono::{DateTime, Utc};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, Statement, ToSql, params};

/// UTC timestamps as fixed-width text, so that text order is time order.
pub(super) fn ts(t: DateTime<Utc>) -> String {
    String::from_utf8_lossy(Ts::of(t).text()).into_owned()
}

/// [`ts`] without allocating, for the binds of the hot writes: "2026-11-24T19:40:00.123Z" written
/// digit by digit (chrono's formatter, with its `String`, took a visible share of the writer's
/// time), and chrono's text for what that shape cannot hold (a year past 9999, a leap second).
pub(super) enum Ts {
    Fixed([u8; 24]),
    Other(String),
}

impl Ts {
    pub(super) fn of(t: DateTime<Utc>) -> Self {
        use chrono::{Datelike, Timelike};
        let millis = t.nanosecond() / 1_000_000;
        if !(0..=9999).contains(&t.year()) || millis > 999 {
            return Ts::Other(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        }
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut n: u32| {
            for i in (at..at + width).rev() {
                out[i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, t.year().unsigned_abs());
        put(5, 2, t.month());
        put(8, 2, t.day());
        put(11, 2, t.hour());
        put(14, 2, t.minute());
        put(17, 2, t.second());
        put(20, 3, millis);
        Ts::Fixed(out)
    }

    fn text(&self) -> &[u8] {
        match self {
            Ts::Fixed(text) => text,
            Ts::Other(text) => text.as_bytes(),
        }
    }
}

impl ToSql for Ts {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Text(self.text())))
    }
}

impl ToSql for Hex {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Text(
            self.as_str().as_bytes(),
        )))
    }
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

const INSERT_EVENT: &str = concat!(
    "INSERT INTO events (",
    event_cols!(),
    ") VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)"
);
const EVENT_COLUMNS: usize = 13;

/// Rows per multi-row INSERT of a batch's events or inbox records: one statement for this many
/// rows saves, per row, a statement's set-up and halt and (events) the `AUTOINCREMENT` counter's
/// read and write. The rows past the last full statement go one by one.
pub(super) const ROWS_PER_INSERT: usize = 100;

/// `(?, ?), (?, ?), ...`: a `VALUES` list of `rows` rows of `n` placeholders each.
pub(super) fn values_list(n: usize, rows: usize) -> String {
    let row = format!("({})", placeholders(n));
    vec![row.as_str(); rows].join(", ")
}

/// `INSERT INTO {table} ({columns}) VALUES (?,...),(?,...)...`: `rows` rows of `n` columns.
fn insert_many_sql(table: &str, columns: &str, n: usize, rows: usize) -> String {
    format!(
        "INSERT INTO {table} ({columns}) VALUES {}",
        values_list(n, rows)
    )
}

static INSERT_EVENTS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    insert_many_sql("events", event_cols!(), EVENT_COLUMNS, ROWS_PER_INSERT)
});

/// Inserts `events` in commit order, [`ROWS_PER_INSERT`] to a statement (one alone: one
/// single-row statement).
pub(super) fn insert_events(conn: &Connection, events: &[OutboxEvent]) -> rusqlite::Result<()> {
    insert_rows(
        conn,
        events,
        (&INSERT_EVENTS, INSERT_EVENT),
        EVENT_COLUMNS,
        bind_event,
    )
}

/// Inserts `rows` in order: [`ROWS_PER_INSERT`] to a statement with `many`, what is left one by
/// one with `one`; `bind` binds a row's `columns` from a parameter index on.
fn insert_rows<T>(
    conn: &Connection,
    rows: &[T],
    (many, one): (&str, &str),
    columns: usize,
    bind: fn(&mut Statement, usize, &T) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
    if rows.len() >= ROWS_PER_INSERT {
        let mut many = conn.prepare_cached(many)?;
        for chunk in chunks.by_ref() {
            for (i, row) in chunk.iter().enumerate() {
                bind(&mut many, 1 + i * columns, row)?;
            }
            many.raw_execute()?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut one = conn.prepare_cached(one)?;
        for row in rest {
            bind(&mut one, 1, row)?;
            one.raw_execute()?;
        }
    }
    Ok(())
}

/// Binds `e`'s columns ([`event_cols!`]) from parameter `first` on.
fn bind_event(s: &mut Statement, first: usize, e: &OutboxEvent) -> rusqlite::Result<()> {
    // No failures yet on every fresh event: no serialiser for "[]".
    let failures = match e.failures.is_empty() {
        true => None,
        false => Some(to_json(&e.failures)?),
    };
    s.raw_bind_parameter(first, e.id.hex())?;
    s.raw_bind_parameter(first + 1, e.subject.as_str())?;
    s.raw_bind_parameter(first + 2, e.data.as_str())?;
    s.raw_bind_parameter(first + 3, e.aggregate_id.hex())?;
    s.raw_bind_parameter(first + 4, e.version)?;
    s.raw_bind_parameter(first + 5, e.is_locked)?;
    s.raw_bind_parameter(first + 6, Ts::of(e.locked_until))?;
    s.raw_bind_parameter(first + 7, e.locked_by.as_deref())?;
    s.raw_bind_parameter(first + 8, failures.as_deref().unwrap_or("[]"))?;
    s.raw_bind_parameter(first + 9, e.attempts)?;
    s.raw_bind_parameter(first + 10, Ts::of(e.created_at))?;
    s.raw_bind_parameter(first + 11, e.alerted_at.map(Ts::of))?;
    s.raw_bind_parameter(first + 12, e.unknown_since.map(Ts::of))?;
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

const INSERT_INBOX_RECORD: &str = concat!(
    "INSERT INTO inbox (",
    inbox_cols!(),
    ") VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"
);
const INBOX_COLUMNS: usize = 12;

static INSERT_INBOX_RECORDS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    insert_many_sql("inbox", inbox_cols!(), INBOX_COLUMNS, ROWS_PER_INSERT)
});

/// Inserts `records`, [`ROWS_PER_INSERT`] to a statement.
pub(super) fn insert_inbox_records(
    conn: &Connection,
    records: &[InboxRecord],
) -> rusqlite::Result<()> {
    insert_rows(
        conn,
        records,
        (&INSERT_INBOX_RECORDS, INSERT_INBOX_RECORD),
        INBOX_COLUMNS,
        bind_inbox_record,
    )
}

/// Binds `r`'s columns ([`inbox_cols!`]) from parameter `first` on.
fn bind_inbox_record(s: &mut Statement, first: usize, r: &InboxRecord) -> rusqlite::Result<()> {
    s.raw_bind_parameter(first, r.id.as_str())?;
    s.raw_bind_parameter(first + 1, r.subject.as_str())?;
    s.raw_bind_parameter(first + 2, r.stream.as_str())?;
    s.raw_bind_parameter(first + 3, i64::try_from(r.sequence).unwrap_or(i64::MAX))?;
    s.raw_bind_parameter(first + 4, r.order_id.as_deref())?;
    s.raw_bind_parameter(first + 5, r.ticket_id.map(|t| t.hex()))?;
    s.raw_bind_parameter(first + 6, r.outcome.as_str())?;
    s.raw_bind_parameter(first + 7, r.reason.as_deref())?;
    s.raw_bind_parameter(first + 8, r.deliveries)?;
    s.raw_bind_parameter(first + 9, r.payload.as_slice())?;
    s.raw_bind_parameter(first + 10, Ts::of(r.received_at))?;
    s.raw_bind_parameter(first + 11, r.done_at.map(Ts::of))?;
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

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let chrono_text = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut t = DateTime::parse_from_rfc3339("1999-12-31T23:59:59.999Z")
            .expect("t")
            .with_timezone(&Utc);
        // Steps of a prime number of milliseconds cross every field's carries.
        for _ in 0..20_000 {
            assert_eq!(ts(t), chrono_text(t));
            t += chrono::Duration::milliseconds(7_919_993_017);
        }
        let now = Utc::now();
        assert_eq!(ts(now), chrono_text(now));
        for text in ["0000-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"] {
            let t = DateTime::parse_from_rfc3339(text)
                .expect("t")
                .with_timezone(&Utc);
            assert_eq!(ts(t), text);
        }
        // Outside the fixed shape: chrono's own text.
        let far = DateTime::<Utc>::MAX_UTC;
        assert_eq!(ts(far), chrono_text(far));
        assert!(matches!(Ts::of(far), Ts::Other(_)));
    }
}
