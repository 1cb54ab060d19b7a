//! The benchmark's own `Tickets` in front of the API (the product's other capabilities are
//! untouched):
//! - `TicketsOnly`: the baseline of scenario 1 (1a): tickets written through the SQLite store's
//!   own writer (its group commit, its fsync), without their events.
//! - `Decorated` adds one thing after each successful ticket write of an inner `Tickets`:
//!   - `Publish`: the design the seed warns against: publish the event straight to JetStream
//!     and await its PubAck before the HTTP answer (1c).
//!   - `Clock`: record the instant each ticket's transaction committed (the inner call
//!     returned), for the commit-to-PubAck latency scenario.
//!   - `Hand`: hand the event to an in-process publisher and answer at once: no event row, no
//!     claim, no delete, nothing awaited. The least a delivery with the product's publisher can
//!     cost (and one that loses the event in a crash): where the outbox path tops out here (1d).

use async_nats::jetstream;
use common::store::{Page, SqliteStore, Tickets, UpdateOutcome};
use common::{
    EventId, NewTicket, OutboxEvent, StoreError, Subject, Ticket, TicketChanges, TicketId,
};
use rusqlite::{OptionalExtension, Row, params};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

/// 1a: the product's ticket rows and statements, on the product's writer, and no event row.
pub struct TicketsOnly(pub SqliteStore);

fn ticket_from_row(row: &Row) -> rusqlite::Result<Ticket> {
    let id: String = row.get(0)?;
    Ok(Ticket {
        id: TicketId::parse(&id).ok_or(rusqlite::Error::InvalidQuery)?,
        title: row.get(1)?,
        price: row.get(2)?,
        user_id: row.get(3)?,
        version: row.get(4)?,
        order_id: row.get(5)?,
    })
}

#[async_trait::async_trait]
impl Tickets for TicketsOnly {
    async fn create_ticket(&self, new: &NewTicket) -> Result<Ticket, StoreError> {
        let new = new.clone();
        self.0
            .write("create_ticket", move |conn| {
                conn.prepare_cached(
                    "INSERT INTO tickets (id, title, price, user_id, version, order_id) \
                     VALUES (?1, ?2, ?3, ?4, 0, NULL) \
                     RETURNING id, title, price, user_id, version, order_id",
                )?
                .query_row(
                    params![
                        TicketId::new().to_hex(),
                        new.title.as_str(),
                        new.price.value(),
                        new.user_id.as_str()
                    ],
                    ticket_from_row,
                )
            })
            .await
    }

    async fn get_ticket(&self, id: TicketId) -> Result<Option<Ticket>, StoreError> {
        self.0.get_ticket(id).await
    }

    async fn list_unreserved(&self, page: Page) -> Result<Vec<Ticket>, StoreError> {
        self.0.list_unreserved(page).await
    }

    async fn update_ticket(
        &self,
        id: TicketId,
        expected_version: i64,
        changes: &TicketChanges,
    ) -> Result<UpdateOutcome, StoreError> {
        let changes = changes.clone();
        self.0
            .write("update_ticket", move |conn| {
                let updated = conn
                    .prepare_cached(
                        "UPDATE tickets SET title = ?1, price = ?2, version = version + 1 \
                         WHERE id = ?3 AND version = ?4 \
                         RETURNING id, title, price, user_id, version, order_id",
                    )?
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
                if let Some(t) = updated {
                    return Ok(UpdateOutcome::Updated(t));
                }
                let exists = conn
                    .prepare_cached("SELECT 1 FROM tickets WHERE id = ?1")?
                    .exists([id.to_hex()])?;
                Ok(if exists {
                    UpdateOutcome::Conflict
                } else {
                    UpdateOutcome::NotFound
                })
            })
            .await
    }
}

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
    inner: Arc<dyn Tickets>,
    after: AfterWrite,
}

impl Decorated {
    pub fn new(inner: Arc<dyn Tickets>, after: AfterWrite) -> Self {
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
impl Tickets for Decorated {
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
}
