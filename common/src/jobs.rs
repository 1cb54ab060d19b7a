//! The job the scheduler enqueues and the worker runs, shared so both agree on its shape and on
//! the queue it travels in.

use serde::{Deserialize, Serialize};

/// The Redis queue of `RetryPublishingNATSEvents` jobs. Fixed, not derived from a type path, so
/// a refactor can never leave the scheduler and the worker on different queues.
pub const RETRY_QUEUE: &str = "tickets:retry-publishing-nats-events";

/// "Sweep the outbox": retry every unlocked (or lock-expired) event. One per schedule tick.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPublishingNATSEvents {
    /// The schedule tick (Unix seconds) this job was enqueued for; also its idempotency key.
    pub tick: i64,
}

impl RetryPublishingNATSEvents {
    /// The idempotency key: one job per tick however many schedulers push it.
    pub fn idempotency_key(&self) -> String {
        format!("tick:{}", self.tick)
    }
}
