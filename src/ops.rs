//! Operability endpoints of every role: `GET /healthz` (the process is alive), `GET /readyz`
//! (it can do its job, with each dependency's state as JSON) and `GET /metrics` (Prometheus).
//! The API serves them on its own port; the worker and the scheduler on `HEALTH_PORT`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use common::store::{Health, OutboxAdmin};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use worker::JetStreamPublisher;
use worker::job::JobWorkerStatus;
use worker::orders::OrdersConsumer;

/// Longest a dependency check may take before it counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Histogram buckets of every `*_seconds` metric.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How often the recorder's upkeep runs (see [`metrics_handle`]).
pub const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// The process-wide Prometheus recorder (installed once, whatever calls it), with its upkeep
/// running every [`METRICS_UPKEEP`]: the recorder keeps every histogram sample until something
/// folds it into its buckets, which rendering `/metrics` does, so without the upkeep a process
/// nobody scrapes grows by every request's samples. Counters and buckets stay cumulative.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            // A thread rather than a task: the recorder outlives any one tokio runtime.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(METRICS_UPKEEP);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the metrics upkeep; histograms grow until scraped");
            }
            handle
        })
        .clone()
}

/// What a role depends on, and which of it readiness requires.
pub struct Probes {
    pub role: &'static str,
    pub store: Option<Arc<dyn Health>>,
    /// Whose outbox the gauges show (refreshed at each scrape).
    pub outbox: Option<Arc<dyn OutboxAdmin>>,
    pub nats: Option<Arc<JetStreamPublisher>>,
    /// The API stays ready while NATS is down (taking tickets during an outage is the point of
    /// the outbox); a worker without NATS cannot do its job. The same goes for the orders
    /// consumer.
    pub nats_required: bool,
    /// The orders consumer (`all`, `worker`): bound to its stream and stepping; the parked gauge.
    pub orders: Option<Arc<OrdersConsumer>>,
    /// Checked with a fresh connection each time, so readiness tells the truth about Redis now.
    pub redis: Option<redis::Client>,
    /// The Redis job worker (`worker`): required, it is what retries failed events.
    pub jobs: Option<Arc<JobWorkerStatus>>,
    pub alert_threshold: i64,
}

impl Probes {
    async fn check_store(&self) -> Option<Value> {
        let store = self.store.as_ref()?;
        let r = tokio::time::timeout(CHECK_TIMEOUT, store.ping()).await;
        Some(match r {
            Ok(Ok(())) => json!({"status": "up", "kind": store.kind(), "required": true}),
            Ok(Err(e)) => json!({"status": "down", "kind": store.kind(), "required": true,
                                 "error": common::error_chain(&e)}),
            Err(_) => {
                json!({"status": "down", "kind": store.kind(), "required": true, "error": "timed out"})
            }
        })
    }

    fn check_nats(&self) -> Option<Value> {
        let nats = self.nats.as_ref()?;
        let up = nats.is_connected();
        Some(json!({"status": if up { "up" } else { "down" }, "required": self.nats_required}))
    }

    fn check_orders(&self) -> Option<Value> {
        let orders = self.orders.as_ref()?;
        Some(match orders.readiness() {
            (true, _) => json!({"status": "up", "required": self.nats_required}),
            (false, why) => {
                json!({"status": "down", "required": self.nats_required, "error": why})
            }
        })
    }

    async fn check_redis(&self) -> Option<Value> {
        let client = self.redis.as_ref()?;
        let ping = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        let r = tokio::time::timeout(CHECK_TIMEOUT, ping).await;
        Some(match r {
            Ok(Ok(_)) => json!({"status": "up", "required": true}),
            Ok(Err(e)) => json!({"status": "down", "required": true, "error": e.to_string()}),
            Err(_) => json!({"status": "down", "required": true, "error": "timed out"}),
        })
    }

    fn check_jobs(&self) -> Option<Value> {
        Some(match self.jobs.as_ref()?.get() {
            Ok(()) => json!({"status": "up", "required": true}),
            Err(reason) => json!({"status": "down", "required": true, "error": reason}),
        })
    }

    /// Each dependency's state, and whether the role is ready.
    pub async fn readiness(&self) -> (bool, Value) {
        let mut checks = serde_json::Map::new();
        if let Some(v) = self.check_store().await {
            checks.insert("store".into(), v);
        }
        if let Some(v) = self.check_nats() {
            checks.insert("nats".into(), v);
        }
        if let Some(v) = self.check_orders() {
            checks.insert("orders".into(), v);
        }
        if let Some(v) = self.check_redis().await {
            checks.insert("redis".into(), v);
        }
        if let Some(v) = self.check_jobs() {
            checks.insert("jobs".into(), v);
        }
        let ready = checks
            .values()
            .all(|c| c["status"] == "up" || c["required"] != json!(true));
        let body = json!({
            "status": if ready { "ready" } else { "not ready" },
            "role": self.role,
            "checks": checks,
        });
        (ready, body)
    }

    /// Refreshes the outbox gauges: counts and the oldest event. Cheap while the outbox is
    /// near empty; during an outage the unlocked and past-threshold counts read an index entry
    /// of every waiting event (`events_due`, and the partial `events_failing` that holds only
    /// events that failed), never the events themselves. Bounded by `CHECK_TIMEOUT`.
    async fn refresh_gauges(&self) {
        if let Some(orders) = &self.orders {
            match tokio::time::timeout(CHECK_TIMEOUT, orders.refresh_gauges()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %common::error_chain(&e), "cannot count parked messages")
                }
                Err(_) => tracing::warn!("counting parked messages timed out"),
            }
        }
        let Some(outbox) = &self.outbox else { return };
        match tokio::time::timeout(CHECK_TIMEOUT, outbox.outbox_stats(self.alert_threshold)).await {
            Ok(Ok(stats)) => {
                let age = stats
                    .oldest_created_at
                    .map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                metrics::gauge!("outbox_depth").set(stats.depth as f64);
                metrics::gauge!("outbox_unlocked_events").set(stats.unlocked as f64);
                metrics::gauge!("outbox_oldest_event_age_seconds").set(age);
                metrics::gauge!("outbox_events_past_alert_threshold")
                    .set(stats.past_alert_threshold as f64);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %common::error_chain(&e), "cannot read outbox stats")
            }
            Err(_) => tracing::warn!("outbox stats timed out"),
        }
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn router(probes: Arc<Probes>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(probes)
}

async fn readyz(State(probes): State<Arc<Probes>>) -> (StatusCode, Json<Value>) {
    let (ready, body) = probes.readiness().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics_text(State(probes): State<Arc<Probes>>) -> String {
    probes.refresh_gauges().await;
    metrics_handle().render()
}

/// Serves the ops router alone (worker, scheduler) until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    probes: Arc<Probes>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding HEALTH_PORT {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "health and metrics listening");
    let app = router(probes).layer(axum::middleware::from_fn(api::observe::observe));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
