//! The command line: `ticketing <role>`. Each subcommand is a thin call into a library function.

use crate::ops::Probes;
use crate::settings::{
    DeliverySettings, HealthSettings, HttpSettings, RedisSettings, ScheduleSettings, StoreSettings,
    require_jwt_key, require_lease_within_window, require_retention_keeps_outbox,
};
use crate::startup::{Application, cancel_on_signal, open_store};
use crate::telemetry;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "ticketing",
    version,
    about = "The tickets service: an HTTP API whose every ticket change reaches NATS JetStream \
             through a transactional outbox.",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Api(ApiArgs),
    /// Run every role in one process, without Redis: the HTTP API, the change-feed consumer, the
    /// retry sweep on the in-process cron schedule and the orders consumer. The embedded default.
    All(AllArgs),
    /// Deliver the outbox: the change-feed consumer (first attempts) and the worker of the
    /// RetryPublishingNATSEvents jobs queued in Redis; apply order events (the orders consumer).
    Worker(WorkerArgs),
    /// Push one RetryPublishingNATSEvents job per RETRY_SCHEDULE tick into Redis.
    Scheduler(SchedulerArgs),
    /// Look at and act on the outbox: stats, list, show, retry.
    Outbox(crate::outbox_cmd::OutboxArgs),
    /// Look at and act on parked order messages: list, show, replay, drop.
    Inbox(crate::inbox_cmd::InboxArgs),
    /// Print a JWT signed with JWT_KEY and the cookie header that carries it, to call the API
    /// without the auth service.
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub http: HttpSettings,
    #[command(flatten)]
    pub store: StoreSettings,
}

#[derive(Debug, Args)]
pub struct AllArgs {
    #[command(flatten)]
    pub http: HttpSettings,
    #[command(flatten)]
    pub store: StoreSettings,
    #[command(flatten)]
    pub delivery: DeliverySettings,
    #[command(flatten)]
    pub schedule: ScheduleSettings,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub store: StoreSettings,
    #[command(flatten)]
    pub delivery: DeliverySettings,
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub health: HealthSettings,
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    #[command(flatten)]
    pub schedule: ScheduleSettings,
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub health: HealthSettings,
    /// Name of this scheduler in logs and in apalis' worker registry. Default: host name and pid.
    #[arg(long, env = "NATS_CLIENT_ID")]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The `id` claim: the user the token signs in.
    #[arg(long)]
    pub user_id: String,
    /// The `email` claim.
    #[arg(long)]
    pub email: String,
    /// Secret that signs the token (the API's JWT_KEY). Required.
    #[arg(long, env = "JWT_KEY", hide_env_values = true)]
    pub jwt_key: Option<String>,
}

/// Runs the command; logs the error with its cause chain and exits non-zero on failure.
pub async fn run(cli: Cli) -> ExitCode {
    telemetry::init();
    let result = match cli.command {
        Command::Api(args) => serve_api(args).await,
        Command::All(args) => serve_all(args).await,
        Command::Worker(args) => serve_worker(args).await,
        Command::Scheduler(args) => serve_scheduler(args).await,
        Command::Outbox(args) => crate::outbox_cmd::run(args).await,
        Command::Inbox(args) => crate::inbox_cmd::run(args).await,
        Command::Token(args) => print_token(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain: "opening the SQLite store x: unable to open ...".
            eprintln!("error: {}", common::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

pub async fn serve_api(args: ApiArgs) -> anyhow::Result<()> {
    let jwt_key = require_jwt_key(&args.http.jwt_key)?;
    let store = open_store(&args.store).await?;
    let shutdown = shutdown_on_signal();
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.http.port));
    let probes = Arc::new(Probes {
        role: "api",
        store: Some(store.clone()),
        outbox: Some(store.clone()),
        nats: None,
        nats_required: false,
        orders: None,
        redis: None,
        jobs: None,
        alert_threshold: i64::MAX,
    });
    let app = Application::build(addr, store, &jwt_key, probes).await?;
    app.run_until_stopped(shutdown).await
}

fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    shutdown
}

pub async fn serve_all(args: AllArgs) -> anyhow::Result<()> {
    let jwt_key = require_jwt_key(&args.http.jwt_key)?;
    require_lease_within_window(args.store.lease(), &args.delivery.nats)?;
    require_retention_keeps_outbox(&args.delivery)?;
    let schedule = scheduler::parse_schedule(&args.schedule.retry_schedule)?;
    let store = open_store(&args.store).await?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.http.port));
    crate::startup::run_all(
        addr,
        &jwt_key,
        crate::startup::Stores::of(store),
        &args.delivery,
        schedule,
        args.store.lease(),
        shutdown_on_signal(),
    )
    .await
}

pub async fn serve_worker(args: WorkerArgs) -> anyhow::Result<()> {
    require_lease_within_window(args.store.lease(), &args.delivery.nats)?;
    require_retention_keeps_outbox(&args.delivery)?;
    let store = open_store(&args.store).await?;
    crate::startup::run_worker(
        crate::startup::Stores::of(store),
        &args.delivery,
        args.redis.redis_url,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.health.health_port)),
        args.store.lease(),
        shutdown_on_signal(),
    )
    .await
}

pub async fn serve_scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let schedule = scheduler::parse_schedule(&args.schedule.retry_schedule)?;
    let name = args.name.unwrap_or_else(|| {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        format!("scheduler-{host}-{}", std::process::id())
    });
    crate::startup::run_scheduler(
        args.redis.redis_url,
        schedule,
        name,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.health.health_port)),
        shutdown_on_signal(),
    )
    .await
}

pub fn print_token(args: TokenArgs) -> anyhow::Result<()> {
    let jwt_key = require_jwt_key(&args.jwt_key)?;
    let user = common::UserId::parse(&args.user_id)
        .ok_or_else(|| anyhow::anyhow!("--user-id must not be empty"))?;
    let jwt = api::JwtKey::new(&jwt_key).sign(user.as_str(), &args.email)?;
    let cookie = api::auth::session_cookie_value(&jwt);
    let mut out = std::io::stdout().lock();
    let written = writeln!(out, "{jwt}").and_then(|()| writeln!(out, "Cookie: session={cookie}"));
    match written {
        // `ticketing token ... | head -1` closes the pipe after the JWT: that is fine.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
