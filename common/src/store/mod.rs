//! The store, as small capabilities: each part of the service is given only the one its job
//! needs, and both adapters (`sqlite`, the embedded reference; `mongo`, production) implement
//! them all. What the outbox decides (a failure's bookkeeping, alerts, fresh events) is decided
//! once above them, in [`crate::outbox`]; the adapters store what they are told.
//!
//! | capability | for | methods |
//! |---|---|---|
//! | [`Health`] | readiness | `kind`, `ping` |
//! | [`Tickets`] | the HTTP API | `create_ticket`, `get_ticket`, `list_unreserved`, `update_ticket` |
//! | [`FreshEvents`] | the change-feed consumer (first attempts) | `subscribe` |
//! | [`Outbox`] | delivery, through [`crate::outbox::Claimed`] | `claim_fresh`, `claim_due`, `pending_versions`, `complete`, `release`, `fail` |
//! | [`ChangeSource`] | the adapters' own change feeds ([`feed::Tail`]) | `changes`, `load_position`, `save_position` |
//! | [`AlertQueue`] | the webhook sender | `claim_alerts`, `delete_alerts`, `release_alerts`, `alerted_events`, `take_digest_turn` |
//! | [`OutboxAdmin`] | operators, the gauges | `outbox_stats`, `get_event`, `list_events`, `unlock_events` |
//! | [`Inbox`] | the orders consumer | `apply_messages` |
//! | [`ParkedMessages`] | operators (`ticketing inbox`), the parked gauge | `list_parked`, `count_parked`, `get_message`, `replay_parked`, `drop_parked` |
//! | [`InboxRetention`] | the orders consumer's retention sweep | `expire_inbox` |
//!
//! Every method is one atomic step; loops live in the callers.

use crate::domain::{EventId, NewTicket, OutboxEvent, Ticket, TicketChanges, TicketId};
use crate::inbox::{InboxMessage, InboxRecord, RetryPolicy, Verdict};
use crate::outbox::{Alert, AlertKind, Claimer, FailedAttempt, Lease};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub mod feed;
pub mod mongo;
pub mod sqlite;

pub use feed::{ChangeSource, ChangeStream, FeedItem, FeedPosition, FreshFeed};
pub use mongo::MongoStore;
pub use sqlite::SqliteStore;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not do what was asked (down, busy past its timeout, I/O error...).
    #[error("store operation `{op}` failed")]
    Backend {
        op: &'static str,
        #[source]
        source: BoxError,
    },
    /// A stored value could not be read back (a bug or a hand-edited row).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn backend(op: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            op,
            source: source.into(),
        }
    }
}

/// A page of the unreserved-tickets listing: tickets after `after` in id order.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: u32,
    pub after: Option<TicketId>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpdateOutcome {
    Updated(Ticket),
    /// No ticket has this id.
    NotFound,
    /// The ticket is no longer at the expected version: somebody else updated it first.
    Conflict,
}

/// An event still in the outbox, as far as the per-ticket order rule cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingVersion {
    pub aggregate_id: TicketId,
    pub version: i64,
    pub event_id: EventId,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxStats {
    pub depth: u64,
    pub locked: u64,
    pub unlocked: u64,
    pub oldest_created_at: Option<DateTime<Utc>>,
    pub past_alert_threshold: u64,
    pub pending_alerts: u64,
}

/// Is the store there?
#[async_trait::async_trait]
pub trait Health: Send + Sync + 'static {
    /// Which adapter this is, for logs and health output.
    fn kind(&self) -> &'static str;
    /// Cheap round trip proving the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Tickets. Each write commits the ticket and its outbox event ([`crate::outbox::rules::fresh_event`])
/// in one transaction, or neither.
#[async_trait::async_trait]
pub trait Tickets: Send + Sync + 'static {
    /// Inserts the ticket at version 0 and its `ticket.created` event.
    async fn create_ticket(&self, new: &NewTicket) -> Result<Ticket, StoreError>;

    async fn get_ticket(&self, id: TicketId) -> Result<Option<Ticket>, StoreError>;

    /// Tickets without an order, in id order.
    async fn list_unreserved(&self, page: Page) -> Result<Vec<Ticket>, StoreError>;

    /// Applies `changes` only if the ticket is still at `expected_version`, bumping the version
    /// and writing its `ticket.updated` event (built from the stored row).
    async fn update_ticket(
        &self,
        id: TicketId,
        expected_version: i64,
        changes: &TicketChanges,
    ) -> Result<UpdateOutcome, StoreError>;
}

/// The first attempt's way in: how it learns about new events is the store's business (SQLite:
/// the writer hands them over as it commits, and the table is tailed for other processes'
/// writes; MongoDB: a change stream).
#[async_trait::async_trait]
pub trait FreshEvents: Send + Sync + 'static {
    /// Events committed from now on (and those a previous subscriber left), each handed out
    /// once, already claimed for `claimer`; the feed ends when `stop` fires.
    async fn subscribe(
        &self,
        claimer: &Claimer,
        stop: CancellationToken,
    ) -> Result<Box<dyn FreshFeed>, StoreError>;
}

/// The outbox's events, claimed under leases and settled. Callers go through
/// [`crate::outbox::Claimed`], which carries the lease.
#[async_trait::async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Locks those of `ids` that are fresh (locked, with no holder) for `lease`. Several
    /// replicas may try; each event goes to one of them.
    async fn claim_fresh(
        &self,
        ids: &[EventId],
        lease: &Lease,
    ) -> Result<Vec<OutboxEvent>, StoreError>;

    /// Locks up to `limit` events that are unlocked or whose lock expired, the longest waiting
    /// first. An indexed range, whatever the size of the outbox. Fewer than `limit` only when
    /// fewer were due, even while other callers claim (a sweep lane stops on a short claim;
    /// MongoDB: within a bounded number of rounds, after which the next tick goes on).
    async fn claim_due(&self, limit: usize, lease: &Lease) -> Result<Vec<OutboxEvent>, StoreError>;

    /// Every event still in the outbox for these tickets (for the per-ticket order rule).
    async fn pending_versions(
        &self,
        aggregates: &[TicketId],
    ) -> Result<Vec<PendingVersion>, StoreError>;

    /// Delivered: deletes the events, queueing [`crate::outbox::rules::resolution`] of each.
    async fn complete(&self, ids: &[EventId]) -> Result<(), StoreError>;

    /// Unlocks the events still held under `lease`, due at once, without counting an attempt.
    async fn release(&self, ids: &[EventId], lease: &Lease) -> Result<(), StoreError>;

    /// For the events still held under `lease`: applies `attempt` ([`FailedAttempt::apply`])
    /// and stores the result and the alert it returns, atomically per event. Returns the events
    /// that alerted now.
    async fn fail(
        &self,
        ids: &[EventId],
        lease: &Lease,
        attempt: &FailedAttempt,
    ) -> Result<Vec<OutboxEvent>, StoreError>;
}

/// Alerts waiting for the webhook: an outbox of their own, one record per event and kind,
/// posted in digests.
#[async_trait::async_trait]
pub trait AlertQueue: Send + Sync + 'static {
    /// Locks up to `limit` queued alerts of `kind` that nobody is sending, oldest first, so two
    /// senders never post one alert twice.
    async fn claim_alerts(
        &self,
        kind: AlertKind,
        limit: usize,
        lease: &Lease,
    ) -> Result<Vec<Alert>, StoreError>;
    /// Sent: forget them.
    async fn delete_alerts(&self, ids: &[String]) -> Result<(), StoreError>;
    /// Not sent: due again at once; `attempted` counts a post that failed.
    async fn release_alerts(&self, ids: &[String], attempted: bool) -> Result<(), StoreError>;
    /// Events that alerted and are not delivered yet: an episode lasts while any is left.
    async fn alerted_events(&self) -> Result<u64, StoreError>;
    /// Takes the turn to post a digest of `kind` when the last one was taken at least `period`
    /// ago (or never): of several senders, one gets each turn.
    async fn take_digest_turn(&self, kind: AlertKind, period: Duration)
    -> Result<bool, StoreError>;
}

/// What operators (`ticketing outbox`) and the gauges see and do.
#[async_trait::async_trait]
pub trait OutboxAdmin: Send + Sync + 'static {
    async fn outbox_stats(&self, alert_threshold: i64) -> Result<OutboxStats, StoreError>;
    async fn get_event(&self, id: EventId) -> Result<Option<OutboxEvent>, StoreError>;
    /// Oldest first; `stuck_threshold` keeps only events with at least that many attempts.
    async fn list_events(
        &self,
        limit: usize,
        stuck_threshold: Option<i64>,
    ) -> Result<Vec<OutboxEvent>, StoreError>;
    /// Unlocks events now so the next sweep takes them; returns how many it unlocked.
    async fn unlock_events(&self, ids: &[EventId]) -> Result<u64, StoreError>;
}

/// Order messages in, applied exactly once ([`crate::inbox`]).
#[async_trait::async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// Applies a batch in ONE transaction: reads what [`crate::inbox::Batch::reads`] asks for,
    /// and stores what [`crate::inbox::Batch::plan`] returns (each ticket change with its
    /// `ticket.updated` event, [`crate::outbox::rules::fresh_event`] of the stored row; the
    /// inbox records; the alerts of parked messages), or nothing. One verdict per message, in
    /// order; the consumer acks only after this returns. The messages are shared with the
    /// caller (it acks them after), not copied.
    async fn apply_messages(
        &self,
        messages: Arc<[InboxMessage]>,
        policy: &RetryPolicy,
    ) -> Result<Vec<Verdict>, StoreError>;
}

/// Parked messages: what operators (`ticketing inbox`) and the parked gauge see and do.
#[async_trait::async_trait]
pub trait ParkedMessages: Send + Sync + 'static {
    /// Oldest first.
    async fn list_parked(&self, limit: usize) -> Result<Vec<InboxRecord>, StoreError>;
    async fn count_parked(&self) -> Result<u64, StoreError>;
    /// Any inbox record, parked or not.
    async fn get_message(&self, id: &str) -> Result<Option<InboxRecord>, StoreError>;
    /// Applies a parked message again now, in one transaction ([`RetryPolicy::PARK_AT_ONCE`]:
    /// parked again, without a new alert, if it still cannot be applied). `None` when no
    /// parked message has this id.
    async fn replay_parked(&self, id: &str) -> Result<Option<Verdict>, StoreError>;
    /// Forgets a parked message; the record it was, if there was one.
    async fn drop_parked(&self, id: &str) -> Result<Option<InboxRecord>, StoreError>;
}

/// The inbox's retention.
#[async_trait::async_trait]
pub trait InboxRetention: Send + Sync + 'static {
    /// Deletes up to `limit` settled records done before `before` (an indexed range; parked
    /// messages never); returns how many.
    async fn expire_inbox(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError>;
}

/// A whole store: every capability. What opening one returns; each part of a role is then given
/// the capability it needs.
pub trait Store:
    Health
    + Tickets
    + FreshEvents
    + Outbox
    + ChangeSource
    + AlertQueue
    + OutboxAdmin
    + Inbox
    + ParkedMessages
    + InboxRetention
{
}

impl<T> Store for T where
    T: Health
        + Tickets
        + FreshEvents
        + Outbox
        + ChangeSource
        + AlertQueue
        + OutboxAdmin
        + Inbox
        + ParkedMessages
        + InboxRetention
{
}
