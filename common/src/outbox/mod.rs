//! The outbox above the stores: who holds which events (leases and claims) and the rules every
//! store applies (`rules`). A claim comes back as a [`Claimed`] batch, and what happens to its
//! events (published, failed, left for later) is recorded only through that batch, under its
//! lease: a worker whose lease ran out changes nothing.

pub mod rules;

use crate::domain::{EventId, OutboxEvent};
use crate::store::{Outbox, StoreError};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;

pub use rules::{Alert, AlertAbout, AlertKind, FailedAttempt};

/// A claim on events: who holds them and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
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
            until: rules::now() + chrono::Duration::from_std(duration).unwrap_or_default(),
        }
    }
}

/// Who claims, and for how long each claim holds (`NATS_CLIENT_ID`, `OUTBOX_LOCK_SECS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimer {
    pub name: String,
    pub lease: Duration,
}

impl Claimer {
    pub fn new(name: impl Into<String>, lease: Duration) -> Self {
        Self {
            name: name.into(),
            lease,
        }
    }

    /// A new lease of this claimer's, starting now.
    pub fn lease(&self) -> Lease {
        Lease::new(&self.name, self.lease)
    }
}

/// Events held under one lease, and the only way to record what became of them.
pub struct Claimed {
    outbox: Arc<dyn Outbox>,
    lease: Lease,
    events: Vec<OutboxEvent>,
}

impl Claimed {
    /// Events `outbox` already holds under `lease` (a store that claimed them as it wrote them).
    pub fn new(outbox: Arc<dyn Outbox>, lease: Lease, events: Vec<OutboxEvent>) -> Self {
        Self {
            outbox,
            lease,
            events,
        }
    }

    /// Claims those of `ids` that are still fresh (a change feed's first attempt): several
    /// replicas may try, each event goes to one of them.
    pub async fn fresh(
        outbox: Arc<dyn Outbox>,
        ids: &[EventId],
        lease: Lease,
    ) -> Result<Self, StoreError> {
        let events = outbox.claim_fresh(ids, &lease).await?;
        Ok(Self::new(outbox, lease, events))
    }

    /// Claims up to `limit` events that are unlocked or whose lock expired, the longest waiting
    /// first (a sweep step). Fewer only when fewer were due.
    pub async fn due(
        outbox: Arc<dyn Outbox>,
        limit: usize,
        lease: Lease,
    ) -> Result<Self, StoreError> {
        let events = outbox.claim_due(limit, &lease).await?;
        Ok(Self::new(outbox, lease, events))
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn events(&self) -> &[OutboxEvent] {
        &self.events
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Takes the events out to publish them; their outcomes are still recorded through `self`.
    pub fn take_events(&mut self) -> Vec<OutboxEvent> {
        std::mem::take(&mut self.events)
    }

    /// Published (JetStream acknowledged them): they leave the outbox, and an event that had
    /// alerted queues its "resolved" alert.
    pub async fn complete(&self, ids: &[EventId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.outbox.complete(ids).await
    }

    /// Not published, and not a failure (an older event of the ticket is still waiting, or the
    /// claim is about to run out): unlocked for the next sweep, still held by nobody else.
    pub async fn release(&self, ids: &[EventId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.outbox.release(ids, &self.lease).await
    }

    /// The publish failed: `attempt` is recorded on each event still held under this lease (the
    /// failure rule, [`FailedAttempt::apply`]). Returns the events that alerted now.
    pub async fn fail(
        &self,
        ids: &[EventId],
        attempt: &FailedAttempt,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.outbox.fail(ids, &self.lease, attempt).await
    }
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("lease", &self.lease)
            .field("events", &self.events.len())
            .finish()
    }
}
