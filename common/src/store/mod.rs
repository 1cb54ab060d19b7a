//! The store: tickets and their outbox, behind one async trait so the embedded SQLite adapter and
//! the MongoDB adapter are interchangeable. `contract` holds the test suite both must pass.

use crate::domain::{EventId, NewTicket, OutboxEvent, Ticket, TicketChanges, TicketId};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub mod contract;
pub mod mongo;
pub mod sqlite;

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

/// Where a change feed has got to: opaque to everyone but the adapter that made it
/// (SQLite: the last sequence number handled; MongoDB: a change-stream resume token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedPosition(pub String);

/// One event the change feed saw committed.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedItem {
    pub event_id: EventId,
    pub position: FeedPosition,
}

pub type ChangeFeed = BoxStream<'static, Result<FeedItem, StoreError>>;

/// Fresh events handed over in-process by the store that wrote them (see
/// [`Store::attach_local_feed`]).
pub struct LocalFeed {
    /// The lease token the events were inserted under.
    pub token: String,
    /// Each event once its transaction has committed.
    pub events: tokio::sync::mpsc::Receiver<OutboxEvent>,
}

/// A claim on events: who holds them and until when.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Unique per claim, so a claimer can tell its own locks from anybody else's.
    pub token: String,
    pub until: DateTime<Utc>,
}

impl Lease {
    pub fn new(claimer: &str, duration: Duration) -> Self {
        let nonce = EventId::new();
        Self {
            token: format!("{claimer}/{nonce}"),
            until: Utc::now() + chrono::Duration::from_std(duration).unwrap_or_default(),
        }
    }
}

/// An event still in the outbox, as far as the per-ticket order rule cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingVersion {
    pub aggregate_id: TicketId,
    pub version: i64,
    pub event_id: EventId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    Firing,
    Resolved,
}

/// A webhook notification waiting to be sent: alerts go through an outbox of their own, so a
/// webhook that is down delays nothing and loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `{eventId}:{kind}`: queueing the same alert twice is a no-op.
    pub id: String,
    pub kind: AlertKind,
    /// The event as it was when the alert was queued.
    pub event: OutboxEvent,
    pub created_at: DateTime<Utc>,
    pub attempts: i64,
}

impl Alert {
    pub fn new(kind: AlertKind, event: OutboxEvent, now: DateTime<Utc>) -> Self {
        let kind_name = match kind {
            AlertKind::Firing => "firing",
            AlertKind::Resolved => "resolved",
        };
        Self {
            id: format!("{}:{kind_name}", event.id),
            kind,
            event,
            created_at: now,
            attempts: 0,
        }
    }
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

/// The tickets and their outbox. Every method is one atomic step; loops live in the callers.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which adapter this is, for logs and health output.
    fn kind(&self) -> &'static str;

    /// Cheap round trip proving the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    // ---- tickets (each write commits the ticket and its event in one transaction) ----

    /// Inserts the ticket at version 0 and its `ticket.created` event, atomically.
    async fn create_ticket(&self, new: &NewTicket) -> Result<Ticket, StoreError>;

    async fn get_ticket(&self, id: TicketId) -> Result<Option<Ticket>, StoreError>;

    /// Tickets without an order, in id order.
    async fn list_unreserved(&self, page: Page) -> Result<Vec<Ticket>, StoreError>;

    /// Applies `changes` only if the ticket is still at `expected_version`, bumping the version
    /// and writing its `ticket.updated` event (built from the stored row) atomically.
    async fn update_ticket(
        &self,
        id: TicketId,
        expected_version: i64,
        changes: &TicketChanges,
    ) -> Result<UpdateOutcome, StoreError>;

    // ---- outbox: claiming ----

    /// The change feed's first attempt: locks those of `ids` that are fresh (locked, with no
    /// holder) for `lease`. Several replicas may try; each event goes to one of them.
    async fn claim_fresh(
        &self,
        ids: &[EventId],
        lease: &Lease,
    ) -> Result<Vec<OutboxEvent>, StoreError>;

    /// The sweep: locks up to `limit` events that are unlocked or whose lock expired, the longest
    /// waiting first. An indexed range, whatever the size of the outbox. Fewer than `limit` only
    /// when fewer were due, even while other callers claim (a sweep lane stops on a short claim;
    /// MongoDB: within a bounded number of rounds, after which the next tick goes on).
    async fn claim_due(&self, limit: usize, lease: &Lease) -> Result<Vec<OutboxEvent>, StoreError>;

    /// Every event still in the outbox for these tickets (for the per-ticket order rule).
    async fn pending_versions(
        &self,
        aggregates: &[TicketId],
    ) -> Result<Vec<PendingVersion>, StoreError>;

    // ---- outbox: outcomes ----

    /// Delivered: deletes the events, and queues a "resolved" alert for those that had alerted.
    async fn complete(&self, ids: &[EventId]) -> Result<(), StoreError>;

    /// Not published, and not a failure (an older event of the ticket is still waiting): unlocks
    /// the events still held under `lease` so the next sweep takes them.
    async fn release(&self, ids: &[EventId], lease: &Lease) -> Result<(), StoreError>;

    /// Publishing failed: for the events still held under `lease`, unlocks them, appends the
    /// failure (keeping the last ten), counts the attempt, and queues one "firing" alert for each
    /// whose attempts reached `alert_threshold`. Returns the events that alerted now.
    async fn record_failure(
        &self,
        ids: &[EventId],
        lease: &Lease,
        error: &str,
        alert_threshold: i64,
    ) -> Result<Vec<OutboxEvent>, StoreError>;

    // ---- alerts ----

    /// Locks up to `limit` queued alerts that nobody is sending, so two senders never post one
    /// alert twice.
    async fn claim_alerts(&self, limit: usize, lease: &Lease) -> Result<Vec<Alert>, StoreError>;
    /// Sent: forget it.
    async fn delete_alert(&self, id: &str) -> Result<(), StoreError>;
    /// Not sent: count the attempt and make it due again for the next sweep.
    async fn release_alert(&self, id: &str) -> Result<(), StoreError>;

    // ---- change feed ----

    /// A change feed in the writer's own process. From now on, while the returned channel has
    /// room, this store inserts each new event already claimed under the returned token and
    /// sends it on the channel once its transaction has committed: the feed neither reads nor
    /// claims it. Events written by other processes (or while the channel is full or closed)
    /// stay fresh and come through [`Store::change_feed`]. `None` where a store cannot do this
    /// (MongoDB: the writers are other pods, the change stream is the feed).
    fn attach_local_feed(&self, claimer: &str, capacity: usize) -> Option<LocalFeed> {
        let _ = (claimer, capacity);
        None
    }

    /// Events committed after `from` (or from now on, when `None`), as they commit.
    async fn change_feed(&self, from: Option<FeedPosition>) -> Result<ChangeFeed, StoreError>;
    async fn load_feed_position(&self) -> Result<Option<FeedPosition>, StoreError>;
    async fn save_feed_position(&self, position: &FeedPosition) -> Result<(), StoreError>;

    // ---- operators ----

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

/// `error: cause: cause ...`, for logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
