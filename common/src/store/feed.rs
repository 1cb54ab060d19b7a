//! Change feeds: how a first attempt learns that an event committed. Each store picks its
//! mechanism in its [`FreshEvents::subscribe`](super::FreshEvents::subscribe); what they share
//! is here: the [`FreshFeed`] they hand out, and [`Tail`], a feed over a store's own
//! [`ChangeSource`] (SQLite's commit order, MongoDB's change stream) that claims what the source
//! reports and remembers where it got to.

use super::{Outbox, StoreError};
use crate::domain::EventId;
use crate::outbox::{Claimed, Claimer};
use futures::StreamExt;
use futures::stream::{BoxStream, ReadyChunks};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Most events claimed and handed out in one batch.
pub const FEED_CHUNK: usize = 512;
/// The name the change feed's position is saved under, in both stores.
pub const FEED_NAME: &str = "change-feed";
/// The saved position is a hint (the sweep covers whatever a restart skips), so it is written at
/// most this often rather than after every batch.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Where a change feed has got to: opaque to everyone but the adapter that made it
/// (SQLite: the last sequence number handled; MongoDB: a change-stream resume token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedPosition(pub String);

/// One event a change source saw committed.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedItem {
    pub event_id: EventId,
    pub position: FeedPosition,
}

pub type ChangeStream = BoxStream<'static, Result<FeedItem, StoreError>>;

/// A store's own record of commits: the ids of new events, in commit order, each with a
/// position to resume after.
#[async_trait::async_trait]
pub trait ChangeSource: Send + Sync + 'static {
    /// Events committed after `from`. `None`: where a feed without a saved position starts
    /// (SQLite: every event still in the table; MongoDB: now).
    async fn changes(&self, from: Option<FeedPosition>) -> Result<ChangeStream, StoreError>;
    async fn load_position(&self) -> Result<Option<FeedPosition>, StoreError>;
    async fn save_position(&self, position: &FeedPosition) -> Result<(), StoreError>;
}

/// Fresh events for one subscriber, claimed for it, batch by batch.
#[async_trait::async_trait]
pub trait FreshFeed: Send {
    /// The next batch (never empty); `None` once the subscription's stop fired. After an
    /// error, call again (after a pause): the feed reopens what broke.
    async fn next(&mut self) -> Option<Result<Claimed, StoreError>>;
    /// Leaves: events received but not handed out are released to the sweep at once, and the
    /// position is saved.
    async fn close(self: Box<Self>);
}

/// A chunk of what the source reported: `None` when the source ended (a MongoDB stream
/// invalidated by a dropped collection).
pub type Chunk = Option<Vec<Result<FeedItem, StoreError>>>;

/// A feed over a [`ChangeSource`]: claims the events the source reports (another replica may
/// claim some first: each event goes to one), saves its position at most every second and when
/// it closes, reopens after an error from its saved position, and after the source ended, from
/// where a new feed starts (resuming into the same end would end again at once; the sweep
/// delivers whatever that skips).
pub struct Tail<S> {
    source: S,
    outbox: Arc<dyn Outbox>,
    claimer: Claimer,
    stop: CancellationToken,
    stream: Option<ReadyChunks<ChangeStream>>,
    /// The source ended: the next open does not resume from the saved position.
    from_start: bool,
    /// An error seen after items that were still claimed and handed out: reported next.
    failed: Option<StoreError>,
    unsaved: Option<FeedPosition>,
    last_save: Instant,
}

impl<S: ChangeSource> Tail<S> {
    /// Opens the source now (so that "from now on" means from this call).
    pub async fn open(
        source: S,
        outbox: Arc<dyn Outbox>,
        claimer: &Claimer,
        stop: CancellationToken,
    ) -> Result<Self, StoreError> {
        let mut tail = Self {
            source,
            outbox,
            claimer: claimer.clone(),
            stop,
            stream: None,
            from_start: false,
            failed: None,
            unsaved: None,
            last_save: Instant::now(),
        };
        tail.reopen().await?;
        Ok(tail)
    }

    async fn reopen(&mut self) -> Result<(), StoreError> {
        let from = if self.from_start {
            None
        } else {
            self.source.load_position().await?
        };
        let stream = self.source.changes(from).await?;
        self.stream = Some(stream.ready_chunks(FEED_CHUNK));
        Ok(())
    }

    /// Waits for the source's next chunk. Cancel-safe: nothing is claimed here, so it can race
    /// other sources of events.
    pub async fn next_chunk(&mut self) -> Result<Chunk, StoreError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.stream.is_none() {
            self.reopen().await?;
        }
        match self.stream.as_mut() {
            Some(stream) => Ok(stream.next().await),
            None => Ok(None),
        }
    }

    /// Claims what `chunk` reported. `None` when none of it was left to claim.
    pub async fn claim(&mut self, chunk: Chunk) -> Option<Result<Claimed, StoreError>> {
        let Some(items) = chunk else {
            self.stream = None;
            self.from_start = true;
            return Some(Err(StoreError::backend(
                "change_feed",
                "the change feed ended; reopening from where a new feed starts (the sweep \
                 delivers what that skips)",
            )));
        };
        self.from_start = false;
        let mut ids = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Ok(item) => {
                    ids.push(item.event_id);
                    self.unsaved = Some(item.position);
                }
                Err(e) => {
                    // Reopened from the saved position at the next call; what this chunk
                    // reported before the error is still claimed now.
                    self.stream = None;
                    self.failed = Some(e);
                }
            }
        }
        let claimed = if ids.is_empty() {
            None
        } else {
            match Claimed::fresh(self.outbox.clone(), &ids, self.claimer.lease()).await {
                Ok(c) if c.is_empty() => None,
                Ok(c) => Some(Ok(c)),
                // These stay fresh: the sweep takes them once their fresh lock expires.
                Err(e) => Some(Err(e)),
            }
        };
        if self.last_save.elapsed() >= SAVE_EVERY {
            self.save().await;
        }
        match (claimed, self.failed.take()) {
            (Some(result), failed) => {
                self.failed = failed;
                Some(result)
            }
            (None, Some(e)) => Some(Err(e)),
            (None, None) => None,
        }
    }

    async fn save(&mut self) {
        if let Some(position) = self.unsaved.take() {
            if let Err(e) = self.source.save_position(&position).await {
                tracing::warn!(error = %crate::error_chain(&e), "change feed: cannot save its position");
            }
            self.last_save = Instant::now();
        }
    }
}

#[async_trait::async_trait]
impl<S: ChangeSource> FreshFeed for Tail<S> {
    async fn next(&mut self) -> Option<Result<Claimed, StoreError>> {
        loop {
            let stop = self.stop.clone();
            let chunk = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                chunk = self.next_chunk() => chunk,
            };
            match chunk {
                Err(e) => return Some(Err(e)),
                Ok(chunk) => {
                    if let Some(result) = self.claim(chunk).await {
                        return Some(result);
                    }
                }
            }
        }
    }

    async fn close(mut self: Box<Self>) {
        self.save().await;
    }
}
