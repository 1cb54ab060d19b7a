//! What operators and the gauges read and do.

use super::MongoStore;
use super::codec::{Fields, event_from_doc, object_ids, to_bson_date, unlock_pipeline};
use super::errors;
use crate::domain::{EventId, OutboxEvent};
use crate::store::{OutboxAdmin, OutboxStats, StoreError};
use bson::doc;

#[async_trait::async_trait]
impl OutboxAdmin for MongoStore {
    async fn outbox_stats(&self, alert_threshold: i64) -> Result<OutboxStats, StoreError> {
        let err = |e| errors::backend("outbox_stats", e);
        // Due on the server's clock, as the sweep sees it.
        let now = to_bson_date(self.server_now("outbox_stats").await?);
        // Two counts of `events_due`'s key range, exact rather than the collection's metadata
        // estimate (which drifts after an unclean shutdown, and which `locked` was derived
        // from). `unlocked` is the bulk during an outage and was counted anyway; the locked
        // events (claims in flight, fresh events) are few otherwise.
        let unlocked = self
            .events
            .count_documents(doc! {"lockedUntil": {"$lte": now}})
            .await
            .map_err(err)?;
        let locked = self
            .events
            .count_documents(doc! {"lockedUntil": {"$gt": now}})
            .await
            .map_err(err)?;
        let depth = unlocked + locked;
        let oldest = self
            .events
            .find_one(doc! {})
            .sort(doc! {"createdAt": 1, "_id": 1})
            .projection(doc! {"_id": 1, "createdAt": 1})
            .await
            .map_err(err)?
            .map(|d| Fields::new("events", &d).date("createdAt"))
            .transpose()?;
        let past = self
            .events
            .count_documents(doc! {"attempts": {"$gte": alert_threshold}})
            .await
            .map_err(err)?;
        let pending_alerts = self.alerts.estimated_document_count().await.map_err(err)?;
        Ok(OutboxStats {
            depth,
            locked,
            unlocked,
            oldest_created_at: oldest,
            past_alert_threshold: past,
            pending_alerts,
        })
    }

    async fn get_event(&self, id: EventId) -> Result<Option<OutboxEvent>, StoreError> {
        self.events
            .find_one(doc! {"_id": id.object_id()})
            .await
            .map_err(|e| errors::backend("get_event", e))?
            .as_ref()
            .map(event_from_doc)
            .transpose()
    }

    async fn list_events(
        &self,
        limit: usize,
        stuck_threshold: Option<i64>,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let filter = match stuck_threshold {
            Some(t) => doc! {"attempts": {"$gte": t}},
            None => doc! {},
        };
        self.find_docs(
            "list_events",
            &self.events,
            filter,
            Some(doc! {"createdAt": 1, "_id": 1}),
            Some(limit),
            None,
        )
        .await?
        .iter()
        .map(event_from_doc)
        .collect()
    }

    async fn unlock_events(&self, ids: &[EventId]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let filter = doc! {"_id": {"$in": object_ids(ids)}};
        self.multi_write("unlock_events", || {
            self.events
                .update_many(filter.clone(), unlock_pipeline())
                .into_future()
        })
        .await
        .map(|r| r.matched_count)
    }
}
