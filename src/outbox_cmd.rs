//! `ticketing outbox ...`: look at and act on the outbox without a database shell. Works on both
//! stores with the services' settings.

use crate::settings::StoreSettings;
use crate::startup::open_store;
use clap::{Args, Subcommand};
use common::display::human_age;
use common::store::{OutboxAdmin, OutboxStats};
use common::{EventId, OutboxEvent};
use serde_json::json;
use std::io::Write;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    pub command: OutboxCommand,
    #[command(flatten)]
    pub store: StoreSettings,
    /// Failed attempts after which an event counts as stuck (and has alerted).
    #[arg(long, env = "ALERT_THRESHOLD", default_value_t = 5, global = true)]
    pub alert_threshold: i64,
    /// Print JSON for scripts instead of a table for people.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Depth, age of the oldest event, locked/unlocked counts, events past the alert threshold.
    Stats,
    /// Undelivered events, oldest first: id, subject, ticket, version, attempts, last error, age.
    List {
        /// Only events with at least ALERT_THRESHOLD failed attempts.
        #[arg(long)]
        stuck: bool,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One event, whole, with its failures.
    Show {
        /// The event id (24 hex characters).
        id: String,
    },
    /// Unlock events now, so the next sweep retries them.
    Retry {
        /// The event id to retry.
        #[arg(required_unless_present = "all_stuck", conflicts_with = "all_stuck")]
        id: Option<String>,
        /// Every event with at least ALERT_THRESHOLD failed attempts.
        #[arg(long)]
        all_stuck: bool,
    },
}

/// Most events `retry --all-stuck` unlocks in one go.
const RETRY_ALL_LIMIT: usize = 100_000;

fn parse_event_id(s: &str) -> anyhow::Result<EventId> {
    EventId::parse(s).ok_or_else(|| anyhow::anyhow!("{s:?} is not an event id (24 hex characters)"))
}

fn age_of(e: &OutboxEvent) -> String {
    human_age((chrono::Utc::now() - e.created_at).num_seconds())
}

pub async fn run(args: OutboxArgs) -> anyhow::Result<()> {
    let store: Arc<dyn OutboxAdmin> = open_store(&args.store).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        OutboxCommand::Stats => {
            let stats = store.outbox_stats(args.alert_threshold).await?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&stats_json(&stats))?
                )?;
            } else {
                write_stats(&mut out, &stats, args.alert_threshold)?;
            }
        }
        OutboxCommand::List { stuck, limit } => {
            let threshold = stuck.then_some(args.alert_threshold);
            let events = store.list_events(limit, threshold).await?;
            if args.json {
                let rows: Vec<_> = events.iter().map(list_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                write_list(&mut out, &events)?;
            }
        }
        OutboxCommand::Show { id } => {
            let id = parse_event_id(&id)?;
            let event = store.get_event(id).await?.ok_or_else(|| {
                anyhow::anyhow!("no event {id} in the outbox (delivered events are deleted)")
            })?;
            writeln!(out, "{}", serde_json::to_string_pretty(&event)?)?;
        }
        OutboxCommand::Retry { id, all_stuck } => {
            let ids = match id {
                Some(id) => vec![parse_event_id(&id)?],
                None => store
                    .list_events(RETRY_ALL_LIMIT, Some(args.alert_threshold))
                    .await?
                    .iter()
                    .map(|e| e.id)
                    .collect(),
            };
            let _ = all_stuck;
            let unlocked = store.unlock_events(&ids).await?;
            if args.json {
                writeln!(out, "{}", json!({"unlocked": unlocked}))?;
            } else {
                writeln!(
                    out,
                    "unlocked {unlocked} event(s): the next sweep retries them"
                )?;
            }
        }
    }
    Ok(())
}

fn stats_json(s: &OutboxStats) -> serde_json::Value {
    let age = s
        .oldest_created_at
        .map(|t| (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0);
    json!({
        "depth": s.depth,
        "oldestAgeSeconds": age,
        "oldestCreatedAt": s.oldest_created_at,
        "locked": s.locked,
        "unlocked": s.unlocked,
        "pastAlertThreshold": s.past_alert_threshold,
        "pendingAlerts": s.pending_alerts,
    })
}

fn write_stats(out: &mut impl Write, s: &OutboxStats, threshold: i64) -> std::io::Result<()> {
    let oldest = match s.oldest_created_at {
        Some(t) => format!(
            "{} (created {})",
            human_age((chrono::Utc::now() - t).num_seconds()),
            t.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        None => "-".into(),
    };
    writeln!(out, "outbox depth           {}", s.depth)?;
    writeln!(out, "oldest event age       {oldest}")?;
    writeln!(out, "locked                 {}", s.locked)?;
    writeln!(out, "unlocked (due)         {}", s.unlocked)?;
    writeln!(
        out,
        "past alert threshold   {} (ALERT_THRESHOLD={threshold})",
        s.past_alert_threshold
    )?;
    writeln!(out, "alerts waiting to send {}", s.pending_alerts)
}

fn list_json(e: &OutboxEvent) -> serde_json::Value {
    let mut row = e.summary();
    row["isLocked"] = json!(e.is_locked);
    row
}

fn write_list(out: &mut impl Write, events: &[OutboxEvent]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24}  {:<14}  {:<24}  {:>7}  {:>8}  {:>8}  LAST ERROR",
        "ID", "SUBJECT", "TICKET", "VERSION", "ATTEMPTS", "AGE"
    )?;
    for e in events {
        let mut error = e.last_error().unwrap_or("-").replace('\n', " ");
        if error.chars().count() > 60 {
            error = error.chars().take(57).collect::<String>() + "...";
        }
        writeln!(
            out,
            "{:<24}  {:<14}  {:<24}  {:>7}  {:>8}  {:>8}  {}",
            e.id.to_hex(),
            e.subject.as_str(),
            e.aggregate_id.to_hex(),
            e.version,
            e.attempts,
            age_of(e),
            error
        )?;
    }
    if events.is_empty() {
        writeln!(out, "(no events)")?;
    }
    Ok(())
}
