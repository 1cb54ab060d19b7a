//! `ticketing scheduler`: an apalis cron schedule (`RETRY_SCHEDULE`) that pushes one
//! `RetryPublishingNATSEvents` job per tick into Redis. Each job carries the tick as its
//! idempotency key (Redis SETNX), so scheduler replicas never double a tick's job. Run one
//! replica; a second one is harmless.

use apalis::prelude::*;
use apalis_core::backend::Vacuum;
use apalis_cron::{CronScheduler, Tick};
use apalis_redis::RedisStorage;
use common::jobs::RetryPublishingNATSEvents;
use std::str::FromStr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The default `RETRY_SCHEDULE`: every ten seconds (6 fields, seconds first).
pub const DEFAULT_SCHEDULE: &str = "*/10 * * * * *";
/// Finished jobs older than this are removed from Redis, once an hour.
const VACUUM_AFTER: Duration = Duration::from_secs(3600);

type Storage = RedisStorage<RetryPublishingNATSEvents>;

/// Parses a 6- or 7-field cron expression (seconds first), with a message naming the setting.
pub fn parse_schedule(expr: &str) -> anyhow::Result<cron::Schedule> {
    cron::Schedule::from_str(expr).map_err(|e| {
        anyhow::anyhow!(
            "RETRY_SCHEDULE {expr:?} is not a valid cron expression with seconds \
             (6 fields, e.g. \"*/10 * * * * *\"): {e}"
        )
    })
}

/// Pushes one job for this tick; a tick another replica already pushed is a no-op.
pub async fn enqueue(storage: &mut Storage, tick: i64) -> Result<(), BoxDynError> {
    let job = RetryPublishingNATSEvents { tick };
    let key = job.idempotency_key();
    let task = TaskBuilder::new(job).idempotency_key(key).build();
    storage.push_task(task).await?;
    Ok(())
}

async fn on_tick(tick: Tick, storage: Data<Storage>) -> Result<(), BoxDynError> {
    let mut storage = (*storage).clone();
    let tick = tick.get_timestamp() as i64;
    match enqueue(&mut storage, tick).await {
        Ok(()) => {
            tracing::debug!(tick, "RetryPublishingNATSEvents enqueued");
            Ok(())
        }
        Err(e) => {
            // This tick is lost; the next one sweeps everything this one would have.
            tracing::error!(tick, error = %e, "cannot enqueue RetryPublishingNATSEvents (is Redis down?)");
            Err(e)
        }
    }
}

/// Runs the schedule until `shutdown`. Redis being down is logged at every tick and recovered
/// from when it returns.
pub async fn run(
    redis_url: &str,
    schedule: cron::Schedule,
    name: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(storage) = worker::job::connect_redis(redis_url, &shutdown).await else {
        return Ok(());
    };
    tokio::spawn(vacuum_hourly(storage.clone(), shutdown.clone()));
    tracing::info!(schedule = %schedule, "scheduler started");
    let name = name.to_owned();
    let signal = async move {
        shutdown.cancelled().await;
        Ok(())
    };
    Monitor::new()
        .should_restart(|ctx, err| {
            tracing::error!(worker = %ctx.name(), error = %err, "scheduler stopped; restarting");
            true
        })
        .register(move |_| {
            WorkerBuilder::new(name.clone())
                .backend(CronScheduler::new(schedule.clone()))
                .data(storage.clone())
                .build(on_tick)
        })
        .run_with_signal(signal)
        .await
        .map_err(|e| anyhow::anyhow!("scheduler failed: {e}"))
}

async fn vacuum_hourly(mut storage: Storage, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(VACUUM_AFTER) => {}
        }
        match storage.vacuum_before(VACUUM_AFTER).await {
            Ok(n) => tracing::debug!(removed = n, "vacuumed finished jobs"),
            Err(e) => tracing::warn!(error = %e, "cannot vacuum finished jobs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_need_seconds() {
        assert!(parse_schedule(DEFAULT_SCHEDULE).is_ok());
        let err = parse_schedule("*/5 * * * *").unwrap_err().to_string();
        assert!(err.contains("RETRY_SCHEDULE"), "{err}");
    }
}
