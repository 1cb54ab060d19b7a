//! Building and running each role. `Application` binds its port first (port 0 in tests), so
//! callers learn the port before serving starts.

use crate::ops::{self, Probes};
use crate::settings::{DeliverySettings, StoreSettings};
use anyhow::Context;
use api::{ApiContext, JwtKey};
use common::Store;
use common::store::sqlite::SqliteOptions;
use common::store::{
    AlertQueue, FreshEvents, Health, Inbox, InboxRetention, Outbox, OutboxAdmin, ParkedMessages,
    SqliteStore, Tickets,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::alerts::Alerter;
use worker::job::{JobWorkerStatus, SweepRunner};
use worker::orders::{OrdersConfig, OrdersConsumer};
use worker::{DispatchConfig, Dispatcher, JetStreamPublisher, NatsConfig};

/// How long in-flight requests may take to finish after a shutdown signal.
pub const HTTP_DRAIN: Duration = Duration::from_secs(10);

/// Opens the configured store: MongoDB when `MONGO_URI` is set, else the SQLite file.
pub async fn open_store(settings: &StoreSettings) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(uri) = &settings.mongo_uri {
        let options = common::store::mongo::MongoOptions {
            fresh_lock: settings.lease(),
            write_timeout: settings.mongo_write_timeout(),
            ..Default::default()
        };
        // The URI may hold a password: log the database, not the URI.
        let store = common::store::MongoStore::open(uri, options)
            .await
            .context("opening the MongoDB store named by MONGO_URI")?;
        tracing::info!(database = %store.database().name(), "using the MongoDB store (MONGO_URI)");
        return Ok(Arc::new(store));
    }
    let options = SqliteOptions {
        fresh_lock: settings.lease(),
        ..Default::default()
    };
    let store = SqliteStore::open(&settings.sqlite_path, options)
        .await
        .with_context(|| {
            format!(
                "opening the SQLite store {}",
                settings.sqlite_path.display()
            )
        })?;
    tracing::info!(path = %settings.sqlite_path.display(), "using the embedded SQLite store");
    Ok(Arc::new(store))
}

/// The store as each part of a role sees it: the capability its job needs. [`Stores::of`] gives
/// every part the same store (the benchmark puts a decorator of its own in front of `tickets`).
#[derive(Clone)]
pub struct Stores {
    pub health: Arc<dyn Health>,
    pub tickets: Arc<dyn Tickets>,
    pub fresh: Arc<dyn FreshEvents>,
    pub outbox: Arc<dyn Outbox>,
    pub alerts: Arc<dyn AlertQueue>,
    pub admin: Arc<dyn OutboxAdmin>,
    /// The orders consumer: applying order messages, and the retention sweep of their records.
    pub inbox: Arc<dyn Inbox>,
    pub retention: Arc<dyn InboxRetention>,
    /// The parked gauge.
    pub parked: Arc<dyn ParkedMessages>,
}

impl Stores {
    pub fn of(store: Arc<dyn Store>) -> Self {
        Self {
            health: store.clone(),
            tickets: store.clone(),
            fresh: store.clone(),
            outbox: store.clone(),
            alerts: store.clone(),
            admin: store.clone(),
            inbox: store.clone(),
            retention: store.clone(),
            parked: store,
        }
    }
}

/// The HTTP API, bound and ready to serve.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
}

impl Application {
    /// The API with `/healthz`, `/readyz` and `/metrics` answering for `probes`.
    pub async fn build(
        addr: SocketAddr,
        tickets: Arc<dyn Tickets>,
        jwt_key: &str,
        probes: Arc<Probes>,
    ) -> anyhow::Result<Self> {
        ops::metrics_handle();
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP port {addr}"))?;
        let router = api::router_with(
            ApiContext {
                tickets,
                jwt: JwtKey::new(jwt_key),
            },
            ops::router(probes),
        );
        Ok(Self { listener, router })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` fires, then stops accepting and lets in-flight requests finish
    /// (at most [`HTTP_DRAIN`]).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr()?, "HTTP API listening");
        let graceful = shutdown.clone();
        let server = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { graceful.cancelled().await });
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            res = &mut server => return res.context("HTTP server failed"),
            _ = shutdown.cancelled() => {}
        }
        match tokio::time::timeout(HTTP_DRAIN, server).await {
            Ok(res) => res.context("HTTP server failed"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within {HTTP_DRAIN:?}; stopping");
                Ok(())
            }
        }
    }
}

/// Cancels the token on SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        token.cancel();
    });
}

/// Longest one sweep job keeps claiming before it leaves the rest to the next tick.
pub const SWEEP_BUDGET: Duration = Duration::from_secs(30);

/// The delivery side: a NATS publisher, the dispatcher over the store, the sweep runner; and
/// the orders consumer, on the publisher's connection.
pub struct Delivery {
    pub publisher: Arc<JetStreamPublisher>,
    pub dispatcher: Arc<Dispatcher>,
    pub runner: Arc<SweepRunner>,
    pub orders: Arc<OrdersConsumer>,
    pub name: String,
}

pub async fn build_delivery(
    stores: &Stores,
    settings: &DeliverySettings,
    lease: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Delivery> {
    let name = settings.nats.client_id();
    anyhow::ensure!(
        settings.orders.orders_stream != settings.nats.nats_cluster_id,
        "ORDERS_STREAM and NATS_CLUSTER_ID must name two streams (both are {:?})",
        settings.orders.orders_stream
    );
    let publisher = Arc::new(
        JetStreamPublisher::connect(NatsConfig {
            url: settings.nats.nats_url.clone(),
            auth: settings.nats.auth.auth(),
            stream: settings.nats.nats_cluster_id.clone(),
            client_name: name.clone(),
            duplicate_window: Duration::from_secs(settings.nats.nats_duplicate_window_secs),
            ack_timeout: Duration::from_secs(settings.nats.nats_ack_timeout_secs),
            policy: settings.nats.stream_policy(),
        })
        .await?,
    );
    check_stream_at_start(publisher.clone(), shutdown.clone());
    let dispatcher = Arc::new(Dispatcher::new(
        stores.outbox.clone(),
        publisher.clone(),
        DispatchConfig {
            claimer: name.clone(),
            lease,
            alert_threshold: settings.alert_threshold,
            sweep_batch: settings.sweep_batch_size as usize,
            duplicate_window: Duration::from_secs(settings.nats.nats_duplicate_window_secs),
        },
    ));
    let alerter = Arc::new(Alerter::new(
        stores.alerts.clone(),
        settings.alert_webhook_url.clone(),
        name.clone(),
        Duration::from_secs(settings.alert_digest_secs),
    )?);
    let runner = Arc::new(SweepRunner::new(
        dispatcher.clone(),
        alerter,
        SWEEP_BUDGET,
        shutdown.clone(),
    ));
    let orders = Arc::new(OrdersConsumer::new(
        publisher.client().clone(),
        stores.inbox.clone(),
        stores.retention.clone(),
        stores.parked.clone(),
        OrdersConfig::new(
            &settings.orders.orders_stream,
            &settings.orders.orders_consumer,
            settings.orders.retention(),
        ),
    ));
    tracing::info!(worker = %name, nats = %common::redact_url(&settings.nats.nats_url), stream = %settings.nats.nats_cluster_id,
        orders_stream = %settings.orders.orders_stream, "outbox delivery and orders consumer configured");
    Ok(Delivery {
        publisher,
        dispatcher,
        runner,
        orders,
        name,
    })
}

/// Gets or creates the stream as soon as NATS answers, rather than at the first publish, so a
/// stream that exists with other limits is reported at start. Tries again (doubling waits up to
/// 30 s) while JetStream cannot answer yet, as a cluster still electing its meta leader.
fn check_stream_at_start(publisher: Arc<JetStreamPublisher>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut backoff =
            common::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            if publisher.wait_connected(Duration::from_secs(1)).await {
                match publisher.ensure_stream().await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "the JetStream stream is not ready yet")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    });
}

/// Waits for every task, in the order they finish: the first to fail stops the others (its error
/// is the result), whichever of them it is.
pub async fn join_roles(
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut running = tokio::task::JoinSet::new();
    for (role, task) in tasks {
        running.spawn(async move { (role, task.await) });
    }
    let mut result = Ok(());
    while let Some(joined) = running.join_next().await {
        let (role, outcome) = match joined {
            Ok((role, Ok(outcome))) => (role, outcome),
            Ok((role, Err(e))) => (role, Err(anyhow::anyhow!(e))),
            Err(e) => ("a role", Err(anyhow::anyhow!(e))),
        };
        if let Err(e) = outcome {
            tracing::error!(role, error = %common::error_chain(e.as_ref()), "role failed; stopping");
            shutdown.cancel();
            if result.is_ok() {
                result = Err(e.context(format!("{role} failed")));
            }
        }
    }
    result
}

/// `ticketing all`: the API, the change feed, the in-process retry schedule and the orders
/// consumer.
pub async fn run_all(
    addr: SocketAddr,
    jwt_key: &str,
    stores: Stores,
    delivery: &DeliverySettings,
    schedule: cron::Schedule,
    lease: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let d = build_delivery(&stores, delivery, lease, &shutdown).await?;
    let probes = Arc::new(Probes {
        role: "all",
        store: Some(stores.health.clone()),
        outbox: Some(stores.admin.clone()),
        nats: Some(d.publisher.clone()),
        nats_required: false,
        orders: Some(d.orders.clone()),
        redis: None,
        jobs: None,
        alert_threshold: delivery.alert_threshold,
    });
    let app = Application::build(addr, stores.tickets.clone(), jwt_key, probes).await?;
    let feed = tokio::spawn(worker::feed::run(
        stores.fresh.clone(),
        d.dispatcher.clone(),
        shutdown.clone(),
    ));
    let tasks = vec![
        ("api", tokio::spawn(app.run_until_stopped(shutdown.clone()))),
        (
            "change feed",
            tokio::spawn(async move {
                feed.await?;
                Ok(())
            }),
        ),
        (
            "retry schedule",
            tokio::spawn(worker::job::run_inprocess_schedule(
                d.runner.clone(),
                schedule,
                shutdown.clone(),
            )),
        ),
        (
            "orders consumer",
            tokio::spawn(worker::orders::run(d.orders.clone(), shutdown.clone())),
        ),
    ];
    let result = join_roles(tasks, shutdown).await;
    d.runner.drain().await;
    tracing::info!("stopped: every claim finished");
    result
}

/// `ticketing worker`: the change feed, the Redis job worker and the orders consumer, with
/// health on `health`.
pub async fn run_worker(
    stores: Stores,
    delivery: &DeliverySettings,
    redis_url: String,
    health: SocketAddr,
    lease: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    ops::metrics_handle();
    let d = build_delivery(&stores, delivery, lease, &shutdown).await?;
    let jobs = Arc::new(JobWorkerStatus::default());
    let probes = Arc::new(Probes {
        role: "worker",
        store: Some(stores.health.clone()),
        outbox: Some(stores.admin.clone()),
        nats: Some(d.publisher.clone()),
        nats_required: true,
        orders: Some(d.orders.clone()),
        redis: Some(redis_client(&redis_url)?),
        jobs: Some(jobs.clone()),
        alert_threshold: delivery.alert_threshold,
    });
    let feed = tokio::spawn(worker::feed::run(
        stores.fresh.clone(),
        d.dispatcher.clone(),
        shutdown.clone(),
    ));
    let runner = d.runner.clone();
    let name = d.name.clone();
    let jobs_shutdown = shutdown.clone();
    let tasks = vec![
        (
            "health",
            tokio::spawn(ops::serve(health, probes, shutdown.clone())),
        ),
        (
            "change feed",
            tokio::spawn(async move {
                feed.await?;
                Ok(())
            }),
        ),
        (
            "job worker",
            tokio::spawn(async move {
                worker::job::run_redis_worker(runner, &redis_url, &name, jobs, jobs_shutdown).await
            }),
        ),
        (
            "orders consumer",
            tokio::spawn(worker::orders::run(d.orders.clone(), shutdown.clone())),
        ),
    ];
    let result = join_roles(tasks, shutdown).await;
    d.runner.drain().await;
    tracing::info!("stopped: every claim finished");
    result
}

/// `ticketing scheduler`: the cron schedule, with health on `health`.
pub async fn run_scheduler(
    redis_url: String,
    schedule: cron::Schedule,
    name: String,
    health: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    ops::metrics_handle();
    let probes = Arc::new(Probes {
        role: "scheduler",
        store: None,
        outbox: None,
        nats: None,
        nats_required: false,
        orders: None,
        redis: Some(redis_client(&redis_url)?),
        jobs: None,
        alert_threshold: 0,
    });
    let sched_shutdown = shutdown.clone();
    let tasks = vec![
        (
            "health",
            tokio::spawn(ops::serve(health, probes, shutdown.clone())),
        ),
        (
            "scheduler",
            tokio::spawn(async move {
                scheduler::run(&redis_url, schedule, &name, sched_shutdown).await
            }),
        ),
    ];
    join_roles(tasks, shutdown).await
}

fn redis_client(url: &str) -> anyhow::Result<redis::Client> {
    redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid REDIS_URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_role_that_fails_stops_the_others_whatever_its_place_in_the_list() {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        // Listed first, runs until told to stop (as the health server does).
        let health = tokio::spawn(async move {
            token.cancelled().await;
            Ok(())
        });
        let jobs = tokio::spawn(async { Err(anyhow::anyhow!("cannot register")) });
        let joined = tokio::time::timeout(
            Duration::from_secs(10),
            join_roles(
                vec![("health", health), ("job worker", jobs)],
                shutdown.clone(),
            ),
        )
        .await
        .expect("the failure is seen at once, not after the health server ends");
        let err = joined.expect_err("the job worker failed");
        assert_eq!(
            common::error_chain(err.as_ref()),
            "job worker failed: cannot register"
        );
        assert!(shutdown.is_cancelled());
    }
}
