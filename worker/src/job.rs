//! `RetryPublishingNATSEvents`: the sweep, run as an apalis job. In `ticketing worker` the jobs
//! come from Redis (pushed by `ticketing scheduler`); in `ticketing all` the same cron schedule
//! drives the same job in-process, without Redis.

use crate::alerts::Alerter;
use crate::dispatch::{Dispatcher, Outcome};
use apalis::prelude::*;
use apalis_cron::{CronScheduler, Tick};
use apalis_redis::{Config as RedisConfig, RedisStorage};
use common::backoff::Backoff;
use common::jobs::{RETRY_QUEUE, RetryPublishingNATSEvents};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// How often an idle Redis worker looks for a job (apalis' default is its 30 s heartbeat).
pub const REDIS_POLL: Duration = Duration::from_millis(200);

/// Runs sweeps one at a time: a tick that arrives while a sweep is still running is skipped
/// (the running sweep is already doing that work).
pub struct SweepRunner {
    dispatcher: Arc<Dispatcher>,
    alerter: Arc<Alerter>,
    budget: Duration,
    stop: CancellationToken,
    sweeping: Mutex<()>,
    alerting: Arc<Mutex<()>>,
}

impl SweepRunner {
    /// `budget` bounds one job's sweep loop; the rest waits for the next tick. After `stop`,
    /// a running sweep finishes its current step and no new one starts.
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        alerter: Arc<Alerter>,
        budget: Duration,
        stop: CancellationToken,
    ) -> Self {
        Self {
            dispatcher,
            alerter,
            budget,
            stop,
            sweeping: Mutex::new(()),
            alerting: Arc::new(Mutex::new(())),
        }
    }

    /// Waits until no sweep is running (for a clean shutdown: every claim finished or released).
    pub async fn drain(&self) {
        let _idle = self.sweeping.lock().await;
    }

    /// One `RetryPublishingNATSEvents` job. `None` when skipped (a sweep is running).
    pub async fn run(&self, job: &RetryPublishingNATSEvents) -> Option<Outcome> {
        let Ok(_guard) = self.sweeping.try_lock() else {
            tracing::debug!(tick = job.tick, "a sweep is still running; tick skipped");
            return None;
        };
        if self.stop.is_cancelled() {
            return None;
        }
        let outcome = match self.dispatcher.sweep(self.budget, &self.stop).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(tick = job.tick, error = %common::error_chain(&e), "sweep failed");
                Outcome::default()
            }
        };
        if outcome.claimed > 0 {
            tracing::info!(
                tick = job.tick,
                claimed = outcome.claimed,
                published = outcome.published,
                failed = outcome.failed,
                deferred = outcome.deferred,
                duplicates = outcome.duplicates,
                "RetryPublishingNATSEvents done"
            );
        } else {
            tracing::debug!(
                tick = job.tick,
                "RetryPublishingNATSEvents done: nothing due"
            );
        }
        self.spawn_alerts();
        Some(outcome)
    }

    /// Sends queued alerts in the background, so a slow webhook never delays publishing.
    fn spawn_alerts(&self) {
        let (alerter, alerting) = (self.alerter.clone(), self.alerting.clone());
        tokio::spawn(async move {
            let Ok(_guard) = alerting.try_lock() else {
                return;
            };
            if let Err(e) = alerter.send_pending().await {
                tracing::error!(error = %common::error_chain(&e), "sending alerts failed");
            }
        });
    }
}

async fn handle_redis_job(
    job: RetryPublishingNATSEvents,
    runner: Data<Arc<SweepRunner>>,
) -> Result<(), BoxDynError> {
    // Failures are recorded on the events and retried by the next tick; re-running an old
    // tick's job would add nothing, so the job itself always succeeds.
    runner.run(&job).await;
    Ok(())
}

async fn handle_tick(tick: Tick, runner: Data<Arc<SweepRunner>>) -> Result<(), BoxDynError> {
    let job = RetryPublishingNATSEvents {
        tick: tick.get_timestamp() as i64,
    };
    // Spawned: a cron-driven worker whose handler outlives the period stops ("Tick out of
    // range"); a long sweep just makes the next ticks skip.
    let runner = (*runner).clone();
    tokio::spawn(async move { runner.run(&job).await });
    Ok(())
}

/// How long a tick's idempotency key lives in Redis: far longer than any schedule period, so
/// two schedulers never both enqueue a tick, and short enough that keys do not pile up.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(3600);

/// The queue's settings, shared by the scheduler (pushing) and the worker (taking). The queue
/// name is fixed, never the job's type path. Note: apalis deletes an idempotency key at once
/// when no TTL is set, so the TTL is what makes "one job per tick" hold.
pub fn redis_config() -> RedisConfig {
    RedisConfig::default()
        .queue(RETRY_QUEUE)
        // One job at a time, none prefetched and held while a sweep runs.
        .batch_size(1)
        .idempotency_ttl(Some(IDEMPOTENCY_TTL))
        .persist_results(false)
}

/// The Redis storage of the job queue, retrying the connection until Redis answers.
pub async fn connect_redis(
    url: &str,
    shutdown: &CancellationToken,
) -> Option<RedisStorage<RetryPublishingNATSEvents>> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match apalis_redis::connect(url).await {
            Ok(conn) => {
                tracing::info!("connected to Redis");
                return Some(RedisStorage::new(conn).with_config(redis_config()));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reach Redis (REDIS_URL); retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Whether the Redis job worker can take jobs, for `/readyz`: not before its registration in
/// the queue succeeded, and not from when it stops until it is registered again.
#[derive(Debug)]
pub struct JobWorkerStatus(std::sync::Mutex<Result<(), String>>);

impl Default for JobWorkerStatus {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Err(
            "not registered in the job queue yet".into(),
        )))
    }
}

impl JobWorkerStatus {
    /// `Ok` while jobs can be taken, else why not.
    pub fn get(&self) -> Result<(), String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sets the status, returning the previous one.
    fn set(&self, status: Result<(), String>) -> Result<(), String> {
        let mut current = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *current, status)
    }
}

/// The worker's name in the job queue: `name` (`NATS_CLIENT_ID`), this process start and the
/// monitor's restart count. apalis-redis refuses to register a name whose last heartbeat is
/// under 30 s old ("still active within threshold"), and a container restarted by Kubernetes
/// keeps its pod name: a name of its own per start and per restart is never refused.
pub fn queue_worker_name(name: &str, started: std::time::SystemTime, restarts: usize) -> String {
    let started = started
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{name}@{started}.{restarts}")
}

/// `ticketing worker`: runs the jobs the scheduler pushes into Redis until `shutdown`. A Redis
/// outage restarts the apalis worker until Redis is back; `status` says whether it can take jobs.
pub async fn run_redis_worker(
    runner: Arc<SweepRunner>,
    redis_url: &str,
    name: &str,
    status: Arc<JobWorkerStatus>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let _ = status.set(Err("connecting to Redis (REDIS_URL)".into()));
    let Some(storage) = connect_redis(redis_url, &shutdown).await else {
        return Ok(());
    };
    let (name, started) = (name.to_owned(), std::time::SystemTime::now());
    let signal = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            Ok(())
        }
    };
    let registered = status.clone();
    Monitor::new()
        // Emitted once registered in the queue, then at every heartbeat.
        .on_event(move |ctx, event| {
            if matches!(event, Event::HeartBeat) && registered.set(Ok(())).is_err() {
                tracing::info!(worker = %ctx.name(), "job worker registered in the job queue");
            }
        })
        .should_restart(move |ctx, err| {
            let _ = status.set(Err(format!("job worker stopped: {err}")));
            tracing::error!(worker = %ctx.name(), error = %err,
                "job worker stopped; registering again in the job queue in 1 s, under a new name");
            true
        })
        .register(move |restarts| {
            let backend = storage
                .clone()
                .before_start(move |_| async move {
                    if restarts > 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Ok(())
                })
                .poll_with_interval(REDIS_POLL);
            WorkerBuilder::new(queue_worker_name(&name, started, restarts))
                .backend(backend)
                .concurrency(1)
                .data(runner.clone())
                .build(handle_redis_job)
        })
        .run_with_signal(signal)
        .await
        .map_err(|e| anyhow::anyhow!("job worker failed: {e}"))
}

/// `ticketing all`: the same job, driven by the cron schedule in this process.
pub async fn run_inprocess_schedule(
    runner: Arc<SweepRunner>,
    schedule: cron::Schedule,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let signal = async move {
        shutdown.cancelled().await;
        Ok(())
    };
    Monitor::new()
        .register(move |_| {
            WorkerBuilder::new("retry-publishing-nats-events")
                .backend(CronScheduler::new(schedule.clone()))
                .data(runner.clone())
                .build(handle_tick)
        })
        .run_with_signal(signal)
        .await
        .map_err(|e| anyhow::anyhow!("in-process schedule failed: {e}"))
}
