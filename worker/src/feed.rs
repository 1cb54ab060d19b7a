//! The change-feed consumer: the first publish attempt for every event, right after its commit.
//! How it learns about new events is the store's business (`FreshEvents::subscribe`: SQLite
//! hands them over from its writer and tails the table, MongoDB watches a change stream); what
//! it gets is batches already claimed for it, which it dispatches one by one. It is an
//! optimisation of latency only: an event it misses is taken by the sweep once its fresh lock
//! expires.

use crate::dispatch::{Dispatcher, Path};
use common::backoff::Backoff;
use common::error_chain;
use common::store::FreshEvents;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Subscribes and dispatches every batch until `stop`; on leaving, the feed releases what it
/// was handed and did not attempt, so no event waits for a lease after a clean shutdown.
pub async fn run(
    fresh: Arc<dyn FreshEvents>,
    dispatcher: Arc<Dispatcher>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let claimer = dispatcher.claimer();
    let mut feed = loop {
        match fresh.subscribe(&claimer, stop.clone()).await {
            Ok(feed) => break feed,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "change feed: cannot open");
                if !sleep_or_stop(&stop, backoff.next_delay()).await {
                    return;
                }
            }
        }
    };
    tracing::info!("change feed consumer started");
    while let Some(next) = feed.next().await {
        match next {
            Ok(claimed) => {
                backoff.reset();
                if let Err(e) = dispatcher.dispatch(claimed, Path::ChangeFeed).await {
                    // The events stay locked until their lease expires; the sweep takes them then.
                    tracing::error!(error = %error_chain(&e), "change feed: dispatch failed");
                }
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "change feed failed; reopening");
                if !sleep_or_stop(&stop, backoff.next_delay()).await {
                    break;
                }
            }
        }
    }
    feed.close().await;
    tracing::info!("change feed consumer stopped");
}

/// Sleeps `d`; false when `stop` fired first.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
