//! What operators and the gauges read and do.

use super::SqliteStore;
use super::codec::{event_from_row, parse_ts, select_event, ts};
use crate::domain::{EventId, OutboxEvent};
use crate::store::{OutboxAdmin, OutboxStats, StoreError};
use chrono::Utc;
use rusqlite::{OptionalExtension, params};

/// The past-threshold gauge. `attempts > 0` repeats the partial index's condition so SQLite
/// can prove the index covers the query (it cannot from `>= ?1` alone, a bound value); a
/// threshold is at least 1, so the condition changes no count.
pub(super) const COUNT_PAST_THRESHOLD: &str =
    "SELECT COUNT(*) FROM events INDEXED BY events_failing WHERE attempts > 0 AND attempts >= ?1";

#[async_trait::async_trait]
impl OutboxAdmin for SqliteStore {
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
            let mut stmt = conn.prepare_cached(
                "UPDATE events SET is_locked = 0, locked_by = NULL, locked_until = ?1 \
                 WHERE id = ?2",
            )?;
            let now = ts(Utc::now());
            let mut n = 0;
            for id in &ids {
                n += stmt.execute(params![now, id.to_hex()])? as u64;
            }
            Ok(n)
        })
        .await
    }
}
