//! Claims and outcomes of the outbox, and the queue of alerts. Every write here is bookkeeping
//! (`SqliteStore::write_bookkeeping`): committed in the writer's groups without its own fsync.

use super::SqliteStore;
use super::codec::{
    alert_from_row, event_from_row, parse_oid, placeholders, queue_alert, select_event, to_json, ts,
};
use crate::domain::{EventId, OutboxEvent, TicketId};
use crate::outbox::{Alert, AlertKind, FailedAttempt, Lease, rules};
use crate::store::{AlertQueue, Outbox, PendingVersion, StoreError};
use chrono::Utc;
use rusqlite::{OptionalExtension, params, params_from_iter};
use std::time::Duration;

/// Most values bound in one `IN (...)` list (SQLite allows 32,766 variables).
pub(super) const IN_LIST_MAX: usize = 500;

#[async_trait::async_trait]
impl Outbox for SqliteStore {
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
                     RETURNING {}",
                    placeholders(chunk.len()),
                    event_cols!()
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
            .collect()
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
            let now = rules::now();
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
                let event = alerted.query_row([&id], event_from_row).optional()?;
                if let Some(alert) = event.and_then(|e| rules::resolution(&e, now)) {
                    queue_alert(conn, &alert)?;
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
            let mut stmt = conn.prepare_cached(
                "UPDATE events SET is_locked = 0, locked_by = NULL, locked_until = ?1 \
                 WHERE id = ?2 AND locked_by = ?3",
            )?;
            let now = ts(Utc::now());
            for id in &ids {
                stmt.execute(params![now, id.to_hex(), token])?;
            }
            Ok(())
        })
        .await
    }

    async fn fail(
        &self,
        ids: &[EventId],
        lease: &Lease,
        attempt: &FailedAttempt,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let ids = ids.to_vec();
        let token = lease.token.clone();
        let attempt = attempt.clone();
        self.write_bookkeeping("fail", move |conn, _| {
            let mut alerted = Vec::new();
            for &id in &ids {
                let Some(mut event) = select_event(conn, id)? else {
                    continue;
                };
                if event.locked_by.as_deref() != Some(token.as_str()) {
                    continue; // our lease expired and somebody else holds it now
                }
                let alert = attempt.apply(&mut event);
                conn.prepare_cached(
                    "UPDATE events SET is_locked = ?1, locked_by = ?2, locked_until = ?3, \
                     failures = ?4, attempts = ?5, alerted_at = ?6, unknown_since = ?7 \
                     WHERE id = ?8",
                )?
                .execute(params![
                    event.is_locked,
                    event.locked_by,
                    ts(event.locked_until),
                    to_json(&event.failures)?,
                    event.attempts,
                    event.alerted_at.map(ts),
                    event.unknown_since.map(ts),
                    id.to_hex()
                ])?;
                if let Some(alert) = alert {
                    queue_alert(conn, &alert)?;
                    alerted.push(event);
                }
            }
            Ok(alerted)
        })
        .await
    }
}

#[async_trait::async_trait]
impl AlertQueue for SqliteStore {
    async fn claim_alerts(
        &self,
        kind: AlertKind,
        limit: usize,
        lease: &Lease,
    ) -> Result<Vec<Alert>, StoreError> {
        let until = ts(lease.until);
        self.write_bookkeeping("claim_alerts", move |conn, _| {
            let mut stmt = conn.prepare_cached(
                "UPDATE alerts SET locked_until = ?1 WHERE id IN \
                 (SELECT id FROM alerts WHERE kind = ?2 AND locked_until <= ?3 \
                  ORDER BY locked_until LIMIT ?4) \
                 RETURNING id, kind, event, created_at, attempts",
            )?;
            let mut alerts = stmt
                .query_map(
                    params![until, kind.as_str(), ts(Utc::now()), limit as i64],
                    alert_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            alerts.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
            Ok(alerts)
        })
        .await
    }

    async fn delete_alerts(&self, ids: &[String]) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.write_bookkeeping("delete_alerts", move |conn, _| {
            let mut stmt = conn.prepare_cached("DELETE FROM alerts WHERE id = ?1")?;
            for id in &ids {
                stmt.execute([id])?;
            }
            Ok(())
        })
        .await
    }

    async fn release_alerts(&self, ids: &[String], attempted: bool) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.write_bookkeeping("release_alerts", move |conn, _| {
            let mut stmt = conn.prepare_cached(
                "UPDATE alerts SET attempts = attempts + ?1, locked_until = ?2 WHERE id = ?3",
            )?;
            let now = ts(Utc::now());
            for id in &ids {
                stmt.execute(params![i64::from(attempted), now, id])?;
            }
            Ok(())
        })
        .await
    }

    async fn alerted_events(&self) -> Result<u64, StoreError> {
        self.read("alerted_events", |c| {
            c.query_row(
                "SELECT COUNT(*) FROM events INDEXED BY events_alerted WHERE alerted_at IS NOT NULL",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }

    async fn take_digest_turn(
        &self,
        kind: AlertKind,
        period: Duration,
    ) -> Result<bool, StoreError> {
        self.write_bookkeeping("take_digest_turn", move |conn, _| {
            let now = Utc::now();
            let due = now - chrono::Duration::from_std(period).unwrap_or_default();
            let taken = conn
                .prepare_cached(
                    "INSERT INTO alert_digests (kind, sent_at) VALUES (?1, ?2) \
                     ON CONFLICT (kind) DO UPDATE SET sent_at = excluded.sent_at \
                     WHERE alert_digests.sent_at <= ?3",
                )?
                .execute(params![kind.as_str(), ts(now), ts(due)])?;
            Ok(taken == 1)
        })
        .await
    }
}
