//! The change-feed consumer: the first publish attempt for every event, right after its commit.
//! Where the store can hand events over in this process (SQLite, the writer here), it takes them
//! from that channel already claimed ([`run_local_feed`]); it also tails the store's change feed
//! (MongoDB change stream / SQLite commit order) for events written elsewhere, resumes from the
//! position it saved, and reconnects on errors. It is an optimisation of latency only: an event
//! it misses is taken by the sweep once its fresh lock expires.

use crate::dispatch::Dispatcher;
use common::store::{FeedPosition, LocalFeed};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Most events handled in one step.
pub const FEED_CHUNK: usize = 512;
/// The saved position is a hint (the sweep covers whatever a restart skips), so it is written at
/// most this often rather than after every event.
const SAVE_EVERY: Duration = Duration::from_secs(1);

pub async fn run_change_feed(dispatcher: Arc<Dispatcher>, shutdown: CancellationToken) {
    let store = dispatcher.store().clone();
    let mut backoff = Duration::from_millis(100);
    // A feed that ended without an error (MongoDB: the collection was dropped or renamed, which
    // invalidates the stream) would end again at once if resumed from the position saved before
    // that: the next one starts from now instead. What it skips, the sweep delivers.
    let mut from_now = false;
    while !shutdown.is_cancelled() {
        let start = match store.load_feed_position().await {
            Ok(_) if from_now => None,
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %common::store::error_chain(&e), "change feed: cannot load its position");
                sleep_or_stop(&shutdown, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let feed = match store.change_feed(start).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %common::store::error_chain(&e), "change feed: cannot open");
                sleep_or_stop(&shutdown, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        tracing::info!(store = store.kind(), "change feed consumer started");
        let mut chunks = feed.ready_chunks(FEED_CHUNK);
        let mut unsaved: Option<FeedPosition> = None;
        let mut last_save = Instant::now();
        loop {
            let chunk = tokio::select! {
                _ = shutdown.cancelled() => break,
                chunk = chunks.next() => chunk,
            };
            let Some(chunk) = chunk else {
                tracing::warn!("change feed ended; reopening from now (the sweep covers the gap)");
                if from_now {
                    // It ended again before anything arrived: back off.
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                from_now = true;
                break;
            };
            from_now = false;
            let mut ids = Vec::with_capacity(chunk.len());
            let mut failed = None;
            for item in chunk {
                match item {
                    Ok(item) => {
                        ids.push(item.event_id);
                        unsaved = Some(item.position);
                    }
                    Err(e) => failed = Some(e),
                }
            }
            if !ids.is_empty()
                && let Err(e) = dispatcher.try_dispatch_fresh(&ids).await
            {
                // The events stay locked until their lease expires; the sweep takes them then.
                tracing::error!(error = %common::store::error_chain(&e), "change feed: dispatch failed");
            }
            backoff = Duration::from_millis(100);
            if last_save.elapsed() >= SAVE_EVERY
                && let Some(p) = unsaved.take()
            {
                save(&dispatcher, &p).await;
                last_save = Instant::now();
            }
            if let Some(e) = failed {
                tracing::error!(error = %common::store::error_chain(&e), "change feed failed; reopening");
                break;
            }
        }
        if let Some(p) = unsaved.take() {
            save(&dispatcher, &p).await;
        }
        if !shutdown.is_cancelled() {
            sleep_or_stop(&shutdown, backoff).await;
        }
    }
    tracing::info!("change feed consumer stopped");
}

/// Room in the channel of a local feed: beyond it, events stay fresh for the tailing feed.
pub const LOCAL_FEED_CAPACITY: usize = 8_192;

/// Runs the change feed: the local one when the store can hand events over in this process,
/// together with the one that tails the store (for events written by other processes).
pub async fn run(dispatcher: Arc<Dispatcher>, shutdown: CancellationToken) {
    let claimer = dispatcher.config().claimer.clone();
    match dispatcher
        .store()
        .attach_local_feed(&claimer, LOCAL_FEED_CAPACITY)
    {
        Some(local) => {
            tokio::join!(
                run_local_feed(dispatcher.clone(), local, shutdown.clone()),
                run_change_feed(dispatcher, shutdown)
            );
        }
        None => run_change_feed(dispatcher, shutdown).await,
    }
}

/// The first attempt on events the store hands over at commit (already claimed for us): no read,
/// no claim. On shutdown, events handed over but not attempted are released for the next sweep.
pub async fn run_local_feed(
    dispatcher: Arc<Dispatcher>,
    mut feed: LocalFeed,
    shutdown: CancellationToken,
) {
    tracing::info!("local change feed started (events handed over at commit)");
    let mut batch = Vec::with_capacity(FEED_CHUNK);
    loop {
        let received = tokio::select! {
            biased; // a stop wins over more work
            _ = shutdown.cancelled() => break,
            n = feed.events.recv_many(&mut batch, FEED_CHUNK) => n,
        };
        if received == 0 {
            break; // the store is gone
        }
        let events = std::mem::replace(&mut batch, Vec::with_capacity(FEED_CHUNK));
        if let Err(e) = dispatcher.dispatch_handed_over(events, &feed.token).await {
            // The events stay claimed until their lease expires; the sweep takes them then.
            tracing::error!(error = %common::store::error_chain(&e), "local change feed: dispatch failed");
        }
    }
    // No more hand-overs (the store writes new events unclaimed from now on); release the rest.
    feed.events.close();
    let mut left = Vec::new();
    while let Some(event) = feed.events.recv().await {
        left.push(event);
    }
    if !left.is_empty()
        && let Err(e) = dispatcher.release_handed_over(&left, &feed.token).await
    {
        tracing::warn!(error = %common::store::error_chain(&e), events = left.len(),
            "local change feed: cannot release the events it did not attempt; the sweep takes them when their claim expires");
    }
    tracing::info!(released = left.len(), "local change feed stopped");
}

async fn save(dispatcher: &Dispatcher, position: &FeedPosition) {
    if let Err(e) = dispatcher.store().save_feed_position(position).await {
        tracing::warn!(error = %common::store::error_chain(&e), "change feed: cannot save its position");
    }
}

async fn sleep_or_stop(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
