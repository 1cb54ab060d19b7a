//! Store decorators used by the benchmark. Both delegate every `Store` method to an inner
//! `SqliteStore` and add one thing after a successful ticket write:
//! - `Naive`: the design the seed warns against: save (outbox write disabled), then publish the
//!   event straight to JetStream and await its PubAck before the HTTP answer.
//! - `Clock`: records the instant each ticket's transaction committed (the inner call returned),
//!   for the commit-to-PubAck latency scenario.
//! - `Hand`: hands the event to an in-process publisher and answers at once: no event row, no
//!   claim, no delete, nothing awaited. The least a delivery with the product's publisher can
//!   cost (and one that loses the event in a crash): where the outbox path tops out here.

use async_nats::jetstream;
use common::store::{
    Alert, ChangeFeed, FeedPosition, Lease, LocalFeed, OutboxStats, Page, PendingVersion,
    SqliteStore, UpdateOutcome,
};
use common::{
    EventId, NewTicket, OutboxEvent, Store, StoreError, Subject, Ticket, TicketChanges, TicketId,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

/// Commit instants by ticket id.
pub type CommitTimes = Arc<Mutex<HashMap<TicketId, Instant>>>;

pub enum AfterWrite {
    /// Publish to JetStream and await the PubAck before answering.
    Publish(Box<jetstream::Context>),
    /// Remember when the write committed.
    Clock(CommitTimes),
    /// Hand the event to an in-process publisher (waiting only while its channel is full).
    Hand(mpsc::Sender<OutboxEvent>, Arc<Handed>),
}

/// Counts of events handed to a publisher by `AfterWrite::Hand` and of those it got a PubAck for.
#[derive(Default)]
pub struct Handed {
    pub handed: AtomicU64,
    pub acked: AtomicU64,
    pub failed: AtomicU64,
}

impl Handed {
    /// Events handed over and not yet answered by JetStream (acked or failed).
    pub fn unanswered(&self) -> u64 {
        let answered = self.acked.load(Ordering::Acquire) + self.failed.load(Ordering::Acquire);
        self.handed.load(Ordering::Acquire).saturating_sub(answered)
    }
}

pub struct Decorated {
    inner: SqliteStore,
    after: AfterWrite,
}

impl Decorated {
    pub fn new(inner: SqliteStore, after: AfterWrite) -> Self {
        Self { inner, after }
    }

    async fn after_write(&self, subject: Subject, ticket: &Ticket) -> Result<(), StoreError> {
        match &self.after {
            AfterWrite::Clock(times) => {
                let now = Instant::now();
                times
                    .lock()
                    .map_err(|_| StoreError::backend("clock", "commit clock poisoned"))?
                    .insert(ticket.id, now);
                Ok(())
            }
            AfterWrite::Publish(js) => {
                let payload =
                    serde_json::to_vec(ticket).map_err(|e| StoreError::backend("publish", e))?;
                let message = jetstream::message::PublishMessage::build()
                    .payload(payload.into())
                    .message_id(EventId::new().to_hex());
                js.send_publish(subject.as_str(), message)
                    .await
                    .map_err(|e| StoreError::backend("publish", e))?
                    .await
                    .map_err(|e| StoreError::backend("publish", e))?;
                Ok(())
            }
            AfterWrite::Hand(events, counts) => {
                let event = OutboxEvent::for_ticket(
                    subject,
                    ticket,
                    chrono::Utc::now(),
                    chrono::Duration::seconds(30),
                );
                counts.handed.fetch_add(1, Ordering::AcqRel);
                events
                    .send(event)
                    .await
                    .map_err(|e| StoreError::backend("hand over", e))
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for Decorated {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn create_ticket(&self, new: &NewTicket) -> Result<Ticket, StoreError> {
        let ticket = self.inner.create_ticket(new).await?;
        self.after_write(Subject::TicketCreated, &ticket).await?;
        Ok(ticket)
    }

    async fn get_ticket(&self, id: TicketId) -> Result<Option<Ticket>, StoreError> {
        self.inner.get_ticket(id).await
    }

    async fn list_unreserved(&self, page: Page) -> Result<Vec<Ticket>, StoreError> {
        self.inner.list_unreserved(page).await
    }

    async fn update_ticket(
        &self,
        id: TicketId,
        expected_version: i64,
        changes: &TicketChanges,
    ) -> Result<UpdateOutcome, StoreError> {
        let outcome = self
            .inner
            .update_ticket(id, expected_version, changes)
            .await?;
        if let UpdateOutcome::Updated(ticket) = &outcome {
            self.after_write(Subject::TicketUpdated, ticket).await?;
        }
        Ok(outcome)
    }

    async fn claim_fresh(
        &self,
        ids: &[EventId],
        lease: &Lease,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner.claim_fresh(ids, lease).await
    }

    async fn claim_due(&self, limit: usize, lease: &Lease) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner.claim_due(limit, lease).await
    }

    async fn pending_versions(
        &self,
        aggregates: &[TicketId],
    ) -> Result<Vec<PendingVersion>, StoreError> {
        self.inner.pending_versions(aggregates).await
    }

    async fn complete(&self, ids: &[EventId]) -> Result<(), StoreError> {
        self.inner.complete(ids).await
    }

    async fn release(&self, ids: &[EventId], lease: &Lease) -> Result<(), StoreError> {
        self.inner.release(ids, lease).await
    }

    async fn record_failure(
        &self,
        ids: &[EventId],
        lease: &Lease,
        error: &str,
        alert_threshold: i64,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner
            .record_failure(ids, lease, error, alert_threshold)
            .await
    }

    async fn claim_alerts(&self, limit: usize, lease: &Lease) -> Result<Vec<Alert>, StoreError> {
        self.inner.claim_alerts(limit, lease).await
    }

    async fn delete_alert(&self, id: &str) -> Result<(), StoreError> {
        self.inner.delete_alert(id).await
    }

    async fn release_alert(&self, id: &str) -> Result<(), StoreError> {
        self.inner.release_alert(id).await
    }

    fn attach_local_feed(&self, claimer: &str, capacity: usize) -> Option<LocalFeed> {
        self.inner.attach_local_feed(claimer, capacity)
    }

    async fn change_feed(&self, from: Option<FeedPosition>) -> Result<ChangeFeed, StoreError> {
        self.inner.change_feed(from).await
    }

    async fn load_feed_position(&self) -> Result<Option<FeedPosition>, StoreError> {
        self.inner.load_feed_position().await
    }

    async fn save_feed_position(&self, position: &FeedPosition) -> Result<(), StoreError> {
        self.inner.save_feed_position(position).await
    }

    async fn outbox_stats(&self, alert_threshold: i64) -> Result<OutboxStats, StoreError> {
        self.inner.outbox_stats(alert_threshold).await
    }

    async fn get_event(&self, id: EventId) -> Result<Option<OutboxEvent>, StoreError> {
        self.inner.get_event(id).await
    }

    async fn list_events(
        &self,
        limit: usize,
        stuck_threshold: Option<i64>,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner.list_events(limit, stuck_threshold).await
    }

    async fn unlock_events(&self, ids: &[EventId]) -> Result<u64, StoreError> {
        self.inner.unlock_events(ids).await
    }
}
