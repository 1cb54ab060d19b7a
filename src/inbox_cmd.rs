//! `ticketing inbox ...`: the order messages the inbox parked, looked at and acted on without a
//! database shell. Works on both stores with the services' settings.

use crate::settings::StoreSettings;
use crate::startup::open_store;
use clap::{Args, Subcommand};
use common::display::human_age;
use common::inbox::{InboxRecord, Verdict};
use common::store::ParkedMessages;
use serde_json::json;
use std::io::Write;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct InboxArgs {
    #[command(subcommand)]
    pub command: InboxCommand,
    #[command(flatten)]
    pub store: StoreSettings,
    /// Print JSON for scripts instead of a table for people.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum InboxCommand {
    /// Parked order messages, oldest first: id, subject, stream sequence, order, ticket,
    /// deliveries, age, why.
    List {
        /// At most this many messages.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One inbox record (parked or not), whole, with its raw message.
    Show {
        /// The message id: its Nats-Msg-Id, or `{stream}:{sequence}`.
        id: String,
    },
    /// Apply parked messages again now: applied, or parked again with the new reason.
    Replay {
        /// The parked message to apply again.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every parked message, oldest first.
        #[arg(long)]
        all: bool,
    },
    /// Forget a parked message (logged, with what it was).
    Drop {
        /// The parked message to forget.
        id: String,
    },
}

/// Most messages `replay --all` takes in one go.
const REPLAY_ALL_LIMIT: usize = 100_000;

fn age_of(r: &InboxRecord) -> String {
    human_age((chrono::Utc::now() - r.received_at).num_seconds())
}

pub async fn run(args: InboxArgs) -> anyhow::Result<()> {
    let store: Arc<dyn ParkedMessages> = open_store(&args.store).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        InboxCommand::List { limit } => {
            let parked = store.list_parked(limit).await?;
            if args.json {
                let rows: Vec<_> = parked.iter().map(InboxRecord::snapshot).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                write_list(&mut out, &parked)?;
            }
        }
        InboxCommand::Show { id } => {
            let record = store.get_message(&id).await?.ok_or_else(|| {
                anyhow::anyhow!(
                    "no message {id:?} in the inbox (records of applied messages expire after \
                     INBOX_RETENTION_HOURS)"
                )
            })?;
            writeln!(out, "{}", serde_json::to_string_pretty(&record.to_json())?)?;
        }
        InboxCommand::Replay { id, all } => {
            let ids = match id {
                Some(id) => vec![id],
                None => store
                    .list_parked(REPLAY_ALL_LIMIT)
                    .await?
                    .into_iter()
                    .map(|r| r.id)
                    .collect(),
            };
            let _ = all;
            let mut rows = Vec::new();
            for id in ids {
                let verdict = store.replay_parked(&id).await?.ok_or_else(|| {
                    anyhow::anyhow!("no parked message {id:?} (`ticketing inbox list`)")
                })?;
                tracing::info!(message = %id, outcome = %verdict.outcome(), "parked order message replayed");
                rows.push((id, verdict));
            }
            if args.json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|(id, v)| json!({"id": id, "outcome": v.outcome(), "detail": detail(v)}))
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                for (id, v) in &rows {
                    writeln!(out, "{id}: {} ({})", v.outcome(), detail(v))?;
                }
                if rows.is_empty() {
                    writeln!(out, "(no parked messages)")?;
                }
            }
        }
        InboxCommand::Drop { id } => {
            let record = store.drop_parked(&id).await?.ok_or_else(|| {
                anyhow::anyhow!("no parked message {id:?} (`ticketing inbox list`)")
            })?;
            tracing::warn!(message = %record.id, subject = %record.subject, stream = %record.stream,
                sequence = record.sequence, order = record.order_id.as_deref().unwrap_or("-"),
                reason = record.reason.as_deref().unwrap_or("-"), payload = %record.payload_text(),
                "parked order message dropped by an operator: it will not be applied");
            if args.json {
                writeln!(out, "{}", json!({"dropped": record.to_json()}))?;
            } else {
                writeln!(out, "dropped {}: it will not be applied", record.id)?;
            }
        }
    }
    Ok(())
}

/// What a replay did, in words.
fn detail(v: &Verdict) -> String {
    match v {
        Verdict::Applied {
            ticket,
            order,
            version,
            reserved,
        } => {
            let what = if *reserved {
                "reserved by"
            } else {
                "released by"
            };
            format!("ticket {ticket} v{version} {what} order {order}")
        }
        Verdict::NoOp { reason, .. } => reason.clone(),
        Verdict::Conflict { holder, order, .. } => {
            format!("order {order} not applied: order {holder} holds the ticket")
        }
        Verdict::Parked { reason } => format!("parked again: {reason}"),
        Verdict::Retry { reason, .. } => reason.clone(),
        Verdict::Duplicate => "applied before".into(),
        Verdict::Ignored => "not an order subject the inbox applies".into(),
    }
}

fn write_list(out: &mut impl Write, parked: &[InboxRecord]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<28}  {:<15}  {:>8}  {:<24}  {:<24}  {:>10}  {:>8}  REASON",
        "ID", "SUBJECT", "SEQUENCE", "ORDER", "TICKET", "DELIVERIES", "AGE"
    )?;
    for r in parked {
        let mut reason = r.reason.as_deref().unwrap_or("-").replace('\n', " ");
        if reason.chars().count() > 60 {
            reason = reason.chars().take(57).collect::<String>() + "...";
        }
        writeln!(
            out,
            "{:<28}  {:<15}  {:>8}  {:<24}  {:<24}  {:>10}  {:>8}  {}",
            r.id,
            r.subject,
            r.sequence,
            r.order_id.as_deref().unwrap_or("-"),
            r.ticket_id.map_or("-".to_owned(), |t| t.to_hex()),
            r.deliveries,
            age_of(r),
            reason
        )?;
    }
    if parked.is_empty() {
        writeln!(out, "(no parked messages)")?;
    }
    Ok(())
}
