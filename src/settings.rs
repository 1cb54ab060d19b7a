//! Every setting is an environment variable and a flag of the same meaning (clap `env`).

use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct StoreSettings {
    /// SQLite database file of the embedded store; parent folders are created.
    #[arg(long, env = "SQLITE_PATH", default_value = "data/tickets.db")]
    pub sqlite_path: PathBuf,
    /// MongoDB connection string (a replica set); when set, MongoDB is used instead of SQLite.
    #[arg(long, env = "MONGO_URI", hide_env_values = true)]
    pub mongo_uri: Option<String>,
    /// Lease, in seconds, of an outbox lock: how long a claimed (or newly written) event is
    /// reserved before another worker may take it. Shorter than NATS_DUPLICATE_WINDOW_SECS.
    #[arg(long, env = "OUTBOX_LOCK_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub outbox_lock_secs: u64,
    /// MongoDB only: how long, in seconds, a write waits for a majority of the replica set to
    /// confirm it before it fails (503) instead of hanging behind a member that is down or
    /// lagging.
    #[arg(long, env = "MONGO_WRITE_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub mongo_write_timeout_secs: u64,
}

impl StoreSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.outbox_lock_secs)
    }

    pub fn mongo_write_timeout(&self) -> Duration {
        Duration::from_secs(self.mongo_write_timeout_secs)
    }
}

#[derive(Debug, Clone, Args)]
pub struct HttpSettings {
    /// Port the HTTP API listens on (all interfaces).
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Secret that signs and verifies the HS256 JWTs of the auth service. Required.
    #[arg(long, env = "JWT_KEY", hide_env_values = true)]
    pub jwt_key: Option<String>,
}

/// The JWT key, or the error message the contract pins.
pub fn require_jwt_key(key: &Option<String>) -> anyhow::Result<String> {
    match key.as_deref().map(str::trim) {
        Some(k) if !k.is_empty() => Ok(k.to_owned()),
        _ => anyhow::bail!("JWT_KEY must be defined"),
    }
}

#[derive(Debug, Clone, Args)]
pub struct NatsSettings {
    /// NATS server URL, or several separated by commas; the `http://` scheme of the course's
    /// manifests is accepted. `user:password@` or `token@` before the host authenticates; it is
    /// shown redacted everywhere (`nats://user:***@host:4222`).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,
    /// Name of the JetStream stream the events go to (created if missing, capturing `ticket.>`).
    #[arg(long, env = "NATS_CLUSTER_ID", default_value = "ticketing", value_parser = parse_stream_name)]
    pub nats_cluster_id: String,
    /// Connection name, unique per process (the pod name on Kubernetes). Default: host name and
    /// process id. Also the worker's name in outbox locks and, with a suffix per start, in the
    /// job queue.
    #[arg(long, env = "NATS_CLIENT_ID")]
    pub nats_client_id: Option<String>,
    /// How long JetStream drops a re-published event (same `Nats-Msg-Id`), in seconds. Longer
    /// than OUTBOX_LOCK_SECS.
    #[arg(long, env = "NATS_DUPLICATE_WINDOW_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub nats_duplicate_window_secs: u64,
    /// How long a publish waits for JetStream's acknowledgement, in seconds.
    #[arg(long, env = "NATS_ACK_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub nats_ack_timeout_secs: u64,
    /// Max age, in seconds, of the messages of the streams this service creates: older ones are
    /// discarded. Longer than NATS_DUPLICATE_WINDOW_SECS. An existing stream is not changed.
    #[arg(long, env = "NATS_STREAM_MAX_AGE_SECS", default_value_t = 604_800, value_parser = clap::value_parser!(u64).range(1..))]
    pub nats_stream_max_age_secs: u64,
    /// Max size, in bytes, of each stream this service creates: past it the oldest messages are
    /// discarded. Default: no limit but the server's storage. An existing stream is not changed.
    #[arg(long, env = "NATS_STREAM_MAX_BYTES", value_parser = clap::value_parser!(u64).range(1..=i64::MAX as u64))]
    pub nats_stream_max_bytes: Option<u64>,
    /// Servers of a JetStream cluster that hold a copy of each stream this service creates (3: a
    /// stream that stays writable while one server is down). An existing stream is not changed.
    #[arg(long, env = "NATS_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
    pub nats_stream_replicas: u64,
    #[command(flatten)]
    pub auth: NatsAuthSettings,
}

impl NatsSettings {
    /// The limits and replicas the streams this service creates get.
    pub fn stream_policy(&self) -> worker::StreamPolicy {
        worker::StreamPolicy {
            max_age: Duration::from_secs(self.nats_stream_max_age_secs),
            max_bytes: self.nats_stream_max_bytes,
            replicas: usize::try_from(self.nats_stream_replicas).unwrap_or(1),
        }
    }

    pub fn client_id(&self) -> String {
        self.nats_client_id.clone().unwrap_or_else(|| {
            let host = gethostname::gethostname().to_string_lossy().into_owned();
            format!("{host}-{}", std::process::id())
        })
    }
}

/// How the delivering roles authenticate to NATS besides NATS_URL's user info, and TLS.
#[derive(Debug, Clone, Default, Args)]
pub struct NatsAuthSettings {
    /// NATS credentials file (`.creds`: a user JWT and its NKey seed, for NATS accounts).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificates (PEM) that the NATS server's certificate is checked against, instead of
    /// the system's. Any NATS_TLS_* setting makes TLS required.
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a NATS server that verifies its clients; with NATS_TLS_KEY.
    #[arg(long, env = "NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of NATS_TLS_CERT.
    #[arg(long, env = "NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
}

impl NatsAuthSettings {
    pub fn auth(&self) -> worker::NatsAuth {
        worker::NatsAuth {
            creds: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
        }
    }
}

fn parse_stream_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '.' | '*' | '>' | '/' | '\\'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a JetStream stream name: no spaces, '.', '*', '>', '/' or '\\'".into())
    }
}

#[derive(Debug, Clone, Args)]
pub struct ScheduleSettings {
    /// Cron schedule of the RetryPublishingNATSEvents sweep: 6 fields, seconds first.
    #[arg(long, env = "RETRY_SCHEDULE", default_value = "*/10 * * * * *")]
    pub retry_schedule: String,
}

#[derive(Debug, Clone, Args)]
pub struct DeliverySettings {
    #[command(flatten)]
    pub nats: NatsSettings,
    /// Webhook (Slack-compatible) that is told when an event keeps failing, and when it is
    /// finally delivered. Optional: without it, alerts are only logged at error level.
    #[arg(long, env = "ALERT_WEBHOOK_URL", hide_env_values = true)]
    pub alert_webhook_url: Option<String>,
    /// At most one digest of events that newly kept failing per this many seconds, posted to
    /// ALERT_WEBHOOK_URL (and one digest when all of them are delivered).
    #[arg(long, env = "ALERT_DIGEST_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub alert_digest_secs: u64,
    /// Failed publish attempts after which an event alerts.
    #[arg(long, env = "ALERT_THRESHOLD", default_value_t = 5, value_parser = clap::value_parser!(i64).range(1..))]
    pub alert_threshold: i64,
    /// Events a sweep claims and publishes per step.
    #[arg(long, env = "SWEEP_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=5000))]
    pub sweep_batch_size: u64,
    #[command(flatten)]
    pub orders: OrdersSettings,
}

pub const DEFAULT_ORDERS_STREAM: &str = "orders";
pub const DEFAULT_ORDERS_CONSUMER: &str = "tickets-service";
pub const DEFAULT_INBOX_RETENTION_HOURS: u64 = 168;

/// Order events in: where the orders consumer reads them, and how long the inbox remembers them.
#[derive(Debug, Clone, Args)]
pub struct OrdersSettings {
    /// JetStream stream the orders service publishes `order.created` / `order.cancelled` to
    /// (created if missing, capturing `order.>`, file storage).
    #[arg(long, env = "ORDERS_STREAM", default_value = DEFAULT_ORDERS_STREAM, value_parser = parse_stream_name)]
    pub orders_stream: String,
    /// Durable pull consumer of the orders stream, shared by every replica (the course's queue
    /// group).
    #[arg(long, env = "ORDERS_CONSUMER", default_value = DEFAULT_ORDERS_CONSUMER, value_parser = parse_consumer_name)]
    pub orders_consumer: String,
    /// Hours an applied order message is remembered (its inbox record), so that it is applied
    /// once however often it comes; parked messages stay until replayed or dropped. Longer than
    /// the consumer's redelivery horizon (checked when it starts).
    #[arg(long, env = "INBOX_RETENTION_HOURS", default_value_t = DEFAULT_INBOX_RETENTION_HOURS, value_parser = clap::value_parser!(u64).range(1..=87_600))]
    pub inbox_retention_hours: u64,
}

impl Default for OrdersSettings {
    fn default() -> Self {
        Self {
            orders_stream: DEFAULT_ORDERS_STREAM.to_owned(),
            orders_consumer: DEFAULT_ORDERS_CONSUMER.to_owned(),
            inbox_retention_hours: DEFAULT_INBOX_RETENTION_HOURS,
        }
    }
}

impl OrdersSettings {
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.inbox_retention_hours.saturating_mul(3600))
    }
}

fn parse_consumer_name(s: &str) -> Result<String, String> {
    parse_stream_name(s)
        .map_err(|_| "a JetStream consumer name: no spaces, '.', '*', '>', '/' or '\\'".into())
}

/// A worker whose lease outlives JetStream's duplicate window would turn every crash
/// mid-publish into a duplicate downstream: the event is published again once the lease
/// expires, and JetStream drops that copy only within the window. Refused at start.
pub fn require_lease_within_window(lease: Duration, nats: &NatsSettings) -> anyhow::Result<()> {
    let window = nats.nats_duplicate_window_secs;
    anyhow::ensure!(
        lease.as_secs() < window,
        "OUTBOX_LOCK_SECS ({}) must be shorter than NATS_DUPLICATE_WINDOW_SECS ({window}): an \
         event whose worker died mid-publish is published again when its lock expires, and \
         JetStream drops that copy as a duplicate only within the window",
        lease.as_secs()
    );
    Ok(())
}

/// The retry horizon that looking up a possibly-stored event needs: once the duplicate window
/// may have passed since an attempt of unknown outcome, the outbox reads the stream from that
/// attempt, less `RECONCILE_MARGIN` for the server's clock, before it publishes again. The
/// stream must still hold the message then, so [`require_retention_keeps_outbox`] refuses a
/// NATS_STREAM_MAX_AGE_SECS not longer than the window and the margin. (Past the max age, an
/// event that waited through a longer outage cannot be looked up: the README says so.)
pub fn lookup_horizon(delivery: &DeliverySettings) -> Option<Duration> {
    let window = Duration::from_secs(delivery.nats.nats_duplicate_window_secs);
    Some(window + common::outbox::rules::RECONCILE_MARGIN)
}

/// Streams that forget events sooner than the outbox relies on them would turn a lost ack into
/// a duplicate downstream: refused at start, with the reason.
pub fn require_retention_keeps_outbox(delivery: &DeliverySettings) -> anyhow::Result<()> {
    let nats = &delivery.nats;
    let needs = worker::stream::RetentionNeeds {
        duplicate_window: Duration::from_secs(nats.nats_duplicate_window_secs),
        lookup_horizon: lookup_horizon(delivery),
    };
    match worker::stream::retention_problem(nats.stream_policy().max_age, &needs) {
        Some(problem) => anyhow::bail!(problem),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Args)]
pub struct RedisSettings {
    /// Redis holding the RetryPublishingNATSEvents job queue (worker and scheduler only).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct HealthSettings {
    /// Port of /healthz, /readyz and /metrics for the worker and the scheduler (the API serves
    /// them on PORT).
    #[arg(long, env = "HEALTH_PORT", default_value_t = 9090)]
    pub health_port: u16,
}
