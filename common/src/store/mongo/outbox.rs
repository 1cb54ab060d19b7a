//! Claims and outcomes of the outbox, and the queue of alerts. Leases are kept on the server's
//! clock (`codec`'s pipelines write `lockedUntil` from `$$NOW`; "due" compares with the
//! primary's `hello.localTime`); what a claim returns carries the claimer's own `lease.until`,
//! the same lease on the clock the claimer compares it with.

use super::MongoStore;
use super::codec::{
    Fields, alert_claim_pipeline, alert_from_doc, alert_release_pipeline, alert_upsert,
    claim_pipeline, event_from_doc, failed_pipeline, in_order_of, lease_left_ms, object_ids,
    to_bson_date, unlock_pipeline,
};
use super::errors::{self, Facts};
use crate::domain::{EventId, OutboxEvent, TicketId};
use crate::outbox::{Alert, AlertKind, FailedAttempt, Lease, rules};
use crate::store::{AlertQueue, Outbox, PendingVersion, StoreError};
use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use futures::FutureExt;
use std::collections::HashMap;
use std::time::Duration;

/// Rounds of one `claim_due` while concurrent claimers keep taking its candidates.
const CLAIM_ROUNDS: usize = 16;

impl MongoStore {
    /// Locks those of `ids` that still match `condition` under `lease`, and returns them in the
    /// order of `ids`. Each document's update is atomic and re-checks the filter, so of several
    /// claimers exactly one matches each event; the token is unique per claim, so what carries it
    /// is what this claim won (also after the write was sent again: what the first attempt took
    /// carries the token already). Stored until the server's now plus what is left of the lease.
    async fn claim_ids(
        &self,
        op: &'static str,
        ids: &[ObjectId],
        condition: Document,
        lease: &Lease,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let mut filter = doc! {"_id": {"$in": ids}};
        filter.extend(condition);
        let pipeline = claim_pipeline(&lease.token, lease_left_ms(lease.until, rules::now()));
        self.multi_write(op, || {
            self.events
                .update_many(filter.clone(), pipeline.clone())
                .into_future()
        })
        .await?;
        let mut claimed = self
            .find_events(op, doc! {"_id": {"$in": ids}, "lockedBy": &lease.token})
            .await?;
        // The stored `lockedUntil` is on the server's clock; the claimer compares with its own.
        for event in &mut claimed {
            event.locked_until = lease.until;
        }
        Ok(in_order_of(claimed, ids))
    }

    /// Queues an alert unless one with its id is queued already (then this is a no-op).
    async fn queue_alert(&self, op: &'static str, alert: &Alert) -> Result<(), StoreError> {
        let (filter, pipeline) = alert_upsert(alert);
        let result = self.alerts.update_one(filter, pipeline).upsert(true).await;
        match result {
            Ok(_) => Ok(()),
            // Two upserts of one id raced: the other one queued it.
            Err(e) if Facts::of(&e).is_duplicate_key() => Ok(()),
            Err(e) => Err(errors::backend(op, e)),
        }
    }
}

#[async_trait::async_trait]
impl Outbox for MongoStore {
    async fn claim_fresh(
        &self,
        ids: &[EventId],
        lease: &Lease,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = object_ids(ids);
        self.claim_ids(
            "claim_fresh",
            &ids,
            doc! {"isLocked": true, "lockedBy": Bson::Null},
            lease,
        )
        .await
    }

    async fn claim_due(&self, limit: usize, lease: &Lease) -> Result<Vec<OutboxEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // What this claim takes is no longer due once locked until `lease.until`; a lease that
        // has already run out (only tests make one) would find the same events again.
        let rounds = if lease.until > rules::now() {
            CLAIM_ROUNDS
        } else {
            1
        };
        // Due on the server's clock, the one every `lockedUntil` was written with.
        let now = to_bson_date(self.server_now("claim_due").await?);
        let mut claimed = Vec::with_capacity(limit);
        // Sweep lanes claim side by side and read the same first candidates; each document goes
        // to one of them, so a round can come back short while more is due. Another round then
        // reads past what was taken (claimed events are no longer due): a claim is short only
        // when fewer events were due, as the contract says (SQLite's single writer gets that
        // for free). Bounded, so a claim under heavy contention still returns.
        for _ in 0..rounds {
            let want = limit - claimed.len();
            // Candidates: one range over `events_due`, covered (only `_id` is read).
            let candidates: Vec<ObjectId> = self
                .find_docs(
                    "claim_due",
                    &self.events,
                    doc! {"lockedUntil": {"$lte": now}},
                    Some(doc! {"lockedUntil": 1, "_id": 1}),
                    Some(want),
                    Some(doc! {"_id": 1}),
                )
                .await?
                .iter()
                .filter_map(|d| d.get_object_id("_id").ok())
                .collect();
            let fewer_due = candidates.len() < want;
            if candidates.is_empty() {
                break;
            }
            // Re-checked per document: a candidate another sweeper took meanwhile is not due.
            claimed.extend(
                self.claim_ids(
                    "claim_due",
                    &candidates,
                    doc! {"lockedUntil": {"$lte": now}},
                    lease,
                )
                .await?,
            );
            if fewer_due || claimed.len() >= limit {
                break;
            }
        }
        Ok(claimed)
    }

    async fn pending_versions(
        &self,
        aggregates: &[TicketId],
    ) -> Result<Vec<PendingVersion>, StoreError> {
        if aggregates.is_empty() {
            return Ok(Vec::new());
        }
        let oids: Vec<ObjectId> = aggregates.iter().map(TicketId::object_id).collect();
        let docs = self
            .find_docs(
                "pending_versions",
                &self.events,
                doc! {"aggregateId": {"$in": &oids}},
                Some(doc! {"aggregateId": 1, "version": 1}),
                None,
                Some(doc! {"_id": 1, "aggregateId": 1, "version": 1}),
            )
            .await?;
        let mut by_aggregate: HashMap<ObjectId, Vec<PendingVersion>> = HashMap::new();
        for d in &docs {
            let f = Fields::new("events", d);
            let aggregate = f.oid("aggregateId")?;
            by_aggregate
                .entry(aggregate)
                .or_default()
                .push(PendingVersion {
                    aggregate_id: TicketId::from_object_id(aggregate),
                    version: f.i64("version")?,
                    event_id: EventId::from_object_id(f.oid("_id")?),
                });
        }
        // Per ticket in the order asked, each by version (SQLite answers in ticket-id order;
        // the dispatcher sorts what it gets either way).
        Ok(oids
            .iter()
            .flat_map(|a| by_aggregate.get(a).cloned().unwrap_or_default())
            .collect())
    }

    async fn complete(&self, ids: &[EventId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = object_ids(ids);
        let now = rules::now();
        // Resolved alerts first, then the delete: a crash in between leaves the events, and
        // completing them again queues nothing twice (the alert id is fixed).
        let alerted = self
            .find_events(
                "complete",
                // `$type: date` (alertedAt is a date or null) matches `events_alerted`'s filter.
                doc! {"_id": {"$in": &ids}, "alertedAt": {"$type": "date"}},
            )
            .await?;
        for alert in alerted.iter().filter_map(|e| rules::resolution(e, now)) {
            self.queue_alert("complete", &alert).await?;
        }
        // A delete that failed would have the events published again once their lease ran out.
        let filter = doc! {"_id": {"$in": &ids}};
        self.multi_write("complete", || {
            self.events.delete_many(filter.clone()).into_future()
        })
        .await
        .map(drop)
    }

    async fn release(&self, ids: &[EventId], lease: &Lease) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let filter = doc! {"_id": {"$in": object_ids(ids)}, "lockedBy": &lease.token};
        self.multi_write("release", || {
            self.events
                .update_many(filter.clone(), unlock_pipeline())
                .into_future()
        })
        .await
        .map(drop)
    }

    async fn fail(
        &self,
        ids: &[EventId],
        lease: &Lease,
        attempt: &FailedAttempt,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = object_ids(ids);
        let (events, alerts) = (self.events.clone(), self.alerts.clone());
        let (token, attempt) = (lease.token.clone(), attempt.clone());
        // One transaction, as SQLite's one write: no sweeper can take the event between its
        // unlock and its alert being queued and marked (it would deliver it without queueing
        // the "resolved" alert), and only events this call held change or alert.
        self.transaction("fail", move |s| {
            let (events, alerts, ids) = (events.clone(), alerts.clone(), ids.clone());
            let (token, attempt) = (token.clone(), attempt.clone());
            async move {
                // Only events still held under this lease: a late worker changes nothing.
                let mut cursor = events
                    .find(doc! {"_id": {"$in": &ids}, "lockedBy": &token})
                    .session(&mut *s)
                    .await?;
                let mut held = Vec::new();
                while let Some(d) = cursor.next(&mut *s).await.transpose()? {
                    held.push(event_from_doc(&d)?);
                }
                let mut alerted = Vec::new();
                for mut event in in_order_of(held, &ids) {
                    let alert = attempt.apply(&mut event);
                    events
                        .update_one(
                            doc! {"_id": event.id.object_id(), "lockedBy": &token},
                            failed_pipeline(&event),
                        )
                        .session(&mut *s)
                        .await?;
                    if let Some(alert) = alert {
                        let (filter, pipeline) = alert_upsert(&alert);
                        alerts
                            .update_one(filter, pipeline)
                            .upsert(true)
                            .session(&mut *s)
                            .await?;
                        alerted.push(event);
                    }
                }
                Ok(alerted)
            }
            .boxed()
        })
        .await
    }
}

#[async_trait::async_trait]
impl AlertQueue for MongoStore {
    async fn claim_alerts(
        &self,
        kind: AlertKind,
        limit: usize,
        lease: &Lease,
    ) -> Result<Vec<Alert>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = to_bson_date(self.server_now("claim_alerts").await?);
        let candidates: Vec<Bson> = self
            .find_docs(
                "claim_alerts",
                &self.alerts,
                doc! {"kind": kind.as_str(), "lockedUntil": {"$lte": now}},
                Some(doc! {"lockedUntil": 1}),
                Some(limit),
                Some(doc! {"_id": 1}),
            )
            .await?
            .into_iter()
            .filter_map(|mut d| d.remove("_id"))
            .collect();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let filter = doc! {"_id": {"$in": &candidates}, "lockedUntil": {"$lte": now}};
        let pipeline = alert_claim_pipeline(&lease.token, lease_left_ms(lease.until, rules::now()));
        self.multi_write("claim_alerts", || {
            self.alerts
                .update_many(filter.clone(), pipeline.clone())
                .into_future()
        })
        .await?;
        let mut alerts = self
            .find_docs(
                "claim_alerts",
                &self.alerts,
                doc! {"_id": {"$in": &candidates}, "lockedBy": &lease.token},
                None,
                None,
                None,
            )
            .await?
            .iter()
            .map(alert_from_doc)
            .collect::<Result<Vec<_>, _>>()?;
        alerts.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(alerts)
    }

    async fn delete_alerts(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.alerts
            .delete_many(doc! {"_id": {"$in": ids}})
            .await
            .map(drop)
            .map_err(|e| errors::backend("delete_alerts", e))
    }

    async fn release_alerts(&self, ids: &[String], attempted: bool) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.alerts
            .update_many(
                doc! {"_id": {"$in": ids}},
                alert_release_pipeline(attempted),
            )
            .await
            .map(drop)
            .map_err(|e| errors::backend("release_alerts", e))
    }

    async fn alerted_events(&self) -> Result<u64, StoreError> {
        // `$type: date` (alertedAt is a date or null) matches `events_alerted`'s filter.
        self.events
            .count_documents(doc! {"alertedAt": {"$type": "date"}})
            .await
            .map_err(|e| errors::backend("alerted_events", e))
    }

    async fn take_digest_turn(
        &self,
        kind: AlertKind,
        period: Duration,
    ) -> Result<bool, StoreError> {
        // The server's clock, as for leases: replicas' clocks may disagree.
        let now = self.server_now("take_digest_turn").await?;
        let due = now - chrono::Duration::from_std(period).unwrap_or_default();
        // Matches only a turn taken long enough ago; when the kind has no document yet, the
        // upsert inserts it. A turn taken more recently matches nothing, so the upsert tries to
        // insert a second document with the same `_id`: a duplicate key, and not our turn.
        let taken = self
            .alert_digests
            .update_one(
                doc! {"_id": kind.as_str(), "sentAt": {"$lte": to_bson_date(due)}},
                doc! {"$set": {"sentAt": to_bson_date(now)}},
            )
            .upsert(true)
            .await;
        match taken {
            Ok(r) => Ok(r.modified_count == 1 || r.upserted_id.is_some()),
            Err(e) if Facts::of(&e).is_duplicate_key() => Ok(false),
            Err(e) => Err(errors::backend("take_digest_turn", e)),
        }
    }
}
