//! Where the SQLite store picks its change feed. A subscriber in the writer's own process gets
//! new events from the writer itself: inserted already claimed for it and handed over once
//! their group has committed, so the feed neither reads nor claims them. Events written by
//! other processes on the same file (or while the hand-over channel was full) are written
//! fresh and reach it through a [`Tail`] of the `events` table in commit (`seq`) order.

use super::SqliteStore;
use super::writer::Handoff;
use crate::domain::{EventId, OutboxEvent};
use crate::outbox::{Claimed, Claimer, Lease};
use crate::store::feed::{FEED_CHUNK, FEED_NAME, Tail};
use crate::store::{
    ChangeSource, ChangeStream, FeedItem, FeedPosition, FreshEvents, FreshFeed, Outbox, StoreError,
};
use rusqlite::{OptionalExtension, params};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Rows the tail reads at a time.
const TAIL_BATCH: i64 = 512;

#[async_trait::async_trait]
impl FreshEvents for SqliteStore {
    async fn subscribe(
        &self,
        claimer: &Claimer,
        stop: CancellationToken,
    ) -> Result<Box<dyn FreshFeed>, StoreError> {
        let outbox: Arc<dyn Outbox> = Arc::new(self.clone());
        let tail = Tail::open(self.clone(), outbox.clone(), claimer, stop.clone()).await?;
        let token = format!("{}/local/{}", claimer.name, EventId::new());
        let (sender, events) = mpsc::channel(self.inner.options.handover_capacity.max(1));
        self.inner.writer.set_handoff(Handoff {
            token: token.clone(),
            events: sender,
        });
        tracing::info!("change feed: events handed over at commit, and the table tailed");
        Ok(Box::new(SqliteFeed {
            outbox,
            local: Some(Local { token, events }),
            tail,
            stop,
        }))
    }
}

/// The writer's hand-over: events inserted claimed under `token`.
struct Local {
    token: String,
    events: mpsc::Receiver<OutboxEvent>,
}

struct SqliteFeed {
    outbox: Arc<dyn Outbox>,
    /// `None` once the store is gone (the writer dropped its sender).
    local: Option<Local>,
    tail: Tail<SqliteStore>,
    stop: CancellationToken,
}

enum Next {
    Stopped,
    /// How many events the writer handed over (0: it is gone).
    Handed(usize),
    Tailed(Result<crate::store::feed::Chunk, StoreError>),
}

/// Waits for events from the writer (cancel-safe); never returns once it is gone.
async fn handed(local: &mut Option<Local>, batch: &mut Vec<OutboxEvent>) -> usize {
    match local {
        Some(local) => local.events.recv_many(batch, FEED_CHUNK).await,
        None => std::future::pending().await,
    }
}

impl SqliteFeed {
    fn handed_over(&self, events: Vec<OutboxEvent>) -> Option<Claimed> {
        let local = self.local.as_ref()?;
        // Each event's claim runs from its insert; the batch holds until the earliest ends.
        let until = events.iter().map(|e| e.locked_until).min()?;
        let lease = Lease {
            token: local.token.clone(),
            until,
        };
        Some(Claimed::new(self.outbox.clone(), lease, events))
    }
}

#[async_trait::async_trait]
impl FreshFeed for SqliteFeed {
    async fn next(&mut self) -> Option<Result<Claimed, StoreError>> {
        loop {
            let mut batch = Vec::new();
            let SqliteFeed {
                local, tail, stop, ..
            } = &mut *self;
            // Both waits are cancel-safe; the claim of what the tail reported happens after.
            let next = tokio::select! {
                biased; // a stop wins over more work, and events already claimed come first
                _ = stop.cancelled() => Next::Stopped,
                n = handed(local, &mut batch) => Next::Handed(n),
                chunk = tail.next_chunk() => Next::Tailed(chunk),
            };
            match next {
                Next::Stopped => return None,
                Next::Handed(0) => self.local = None,
                Next::Handed(_) => {
                    if let Some(claimed) = self.handed_over(batch) {
                        return Some(Ok(claimed));
                    }
                }
                Next::Tailed(Err(e)) => return Some(Err(e)),
                Next::Tailed(Ok(chunk)) => {
                    if let Some(result) = self.tail.claim(chunk).await {
                        return Some(result);
                    }
                }
            }
        }
    }

    /// No more hand-overs (the writer inserts new events fresh from now on); what was handed
    /// over and not given out is released, due for the next sweep at once.
    async fn close(mut self: Box<Self>) {
        if let Some(mut local) = self.local.take() {
            local.events.close();
            let mut left = Vec::new();
            while let Some(event) = local.events.recv().await {
                left.push(event.id);
            }
            let lease = Lease {
                token: local.token,
                until: chrono::Utc::now(),
            };
            if !left.is_empty() {
                match self.outbox.release(&left, &lease).await {
                    Ok(()) => tracing::info!(
                        released = left.len(),
                        "change feed: released the events handed over and not attempted"
                    ),
                    Err(e) => tracing::warn!(error = %crate::error_chain(&e), events = left.len(),
                        "change feed: cannot release the events it did not attempt; the sweep takes them when their claim expires"),
                }
            }
        }
        Box::new(self.tail).close().await;
    }
}

#[async_trait::async_trait]
impl ChangeSource for SqliteStore {
    /// The table in commit order after `from` (a `seq`; `None`: from the first row). Events a
    /// feed in the writer's process holds (handed over at commit) are passed over.
    async fn changes(&self, from: Option<FeedPosition>) -> Result<ChangeStream, StoreError> {
        let start: i64 = match from {
            Some(p) => p
                .0
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("bad SQLite feed position {:?}", p.0)))?,
            None => 0,
        };
        let state = (self.clone(), start, VecDeque::<FeedItem>::new());
        let feed = futures::stream::unfold(state, |(store, mut last, mut buffer)| async move {
            loop {
                if let Some(item) = buffer.pop_front() {
                    return Some((Ok(item), (store, last, buffer)));
                }
                let rows = store
                    .read("change_feed", move |c| {
                        let mut stmt = c.prepare_cached(
                            "SELECT seq, id, is_locked = 1 AND locked_by IS NULL FROM events \
                             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                        )?;
                        stmt.query_map(params![last, TAIL_BATCH], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, bool>(2)?,
                            ))
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .await;
                match rows {
                    Err(e) => return Some((Err(e), (store, last, buffer))),
                    Ok(rows) if rows.is_empty() => {
                        let poll = store.inner.options.feed_poll;
                        tokio::select! {
                            _ = store.inner.committed.notified() => {}
                            _ = tokio::time::sleep(poll) => {}
                        }
                    }
                    Ok(rows) => {
                        for (seq, id, fresh) in rows {
                            last = seq;
                            if !fresh {
                                continue;
                            }
                            if let Some(event_id) = EventId::parse(&id) {
                                buffer.push_back(FeedItem {
                                    event_id,
                                    position: FeedPosition(seq.to_string()),
                                });
                            }
                        }
                    }
                }
            }
        });
        Ok(Box::pin(feed))
    }

    async fn load_position(&self) -> Result<Option<FeedPosition>, StoreError> {
        self.read("load_feed_position", |c| {
            c.query_row(
                "SELECT position FROM feed_positions WHERE name = ?1",
                [FEED_NAME],
                |r| r.get(0).map(FeedPosition),
            )
            .optional()
        })
        .await
    }

    async fn save_position(&self, position: &FeedPosition) -> Result<(), StoreError> {
        let position = position.0.clone();
        self.write_bookkeeping("save_feed_position", move |conn, _| {
            conn.execute(
                "INSERT INTO feed_positions (name, position) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                params![FEED_NAME, position],
            )
            .map(drop)
        })
        .await
    }
}
