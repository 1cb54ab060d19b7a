//! Outbox benchmarks: `cargo bench --bench outbox` (full), `cargo bench --bench outbox --
//! --quick` (CI smoke run: small sizes, no assertion on speed); `-- --help` lists the flags.
//!
//! Starts its own `nats-server -js` (testkit::NatsServer), runs the service in-process
//! (and `ticketing all` as a child process for the memory scenario), and prints one table. Every
//! scenario measures its own baseline in the same run, so the figures that matter are ratios:
//! the machine is small (2 cores) and shared.
//!
//! 1. Create-ticket throughput over HTTP, 64 clients: (a) store only, tickets written without
//!    their events (the bench's own `stores::TicketsOnly` on the store's writer),
//!    (b) the real path (`run_all`: ticket + event in one transaction, the change feed publishing
//!    concurrently), (c) save then publish to JetStream and await the PubAck before answering,
//!    (d) save, then hand the event to an in-process publisher and answer at once (no event row):
//!    the least a delivery with the product's publisher costs, so 1d/1a is where 1b/1a tops out.
//! 2. Commit-to-receipt latency under (b) at 50% of its measured peak, open loop.
//! 3. Backlog drain by sweeps of 1,000 against raw JetStream publishing of the same messages.
//! 4. Sweep cost (empty claim, 1,000-event claim) with 1k / 100k / 1M rows waiting.
//! 5. Peak RSS of `ticketing all` draining the scenario-3 backlog; its anonymous RSS under a
//!    sustained create load that nothing scrapes (benches/outbox/memory.rs).
//! 6. Reconciliation past the duplicate window: events of unknown outcome, half of them in the
//!    stream, drained by sweeps that read the stream first (against the drain of 3).
//! 7. (opt-in, `-- --only 7`) On a three-node cluster: 1b's create rate and the drain rate on a
//!    three-replica stream against a one-replica stream.
//! 8. Order events in: 10,000 `order.created` waiting in the orders stream, applied by the
//!    orders consumer (one store transaction per fetch, acks after it), against raw JetStream
//!    fetch-and-ack of the same messages; the median of 5 rounds (1 with `--quick`).

#[path = "outbox/cluster.rs"]
mod cluster;
#[path = "outbox/drain.rs"]
mod drain;
#[path = "outbox/env.rs"]
mod env;
#[path = "outbox/latency.rs"]
mod latency;
#[path = "outbox/load.rs"]
mod load;
#[path = "outbox/memory.rs"]
mod memory;
#[path = "outbox/orders_in.rs"]
mod orders_in;
#[path = "outbox/peak_rss.rs"]
mod peak_rss;
#[path = "outbox/reconcile.rs"]
mod reconcile;
#[path = "outbox/seed.rs"]
mod seed;
#[path = "outbox/service.rs"]
mod service;
#[path = "outbox/stores.rs"]
mod stores;
#[path = "outbox/sweep_cost.rs"]
mod sweep_cost;
#[path = "outbox/throughput.rs"]
mod throughput;

use anyhow::{Context, bail, ensure};
use async_nats::jetstream::{self, stream};
use common::TicketId;
use common::outbox::Lease;
use common::store::SqliteStore;
use common::store::feed::FEED_CHUNK;
use common::store::sqlite::SqliteOptions;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use service::*;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stores::{AfterWrite, CommitTimes, Decorated, Handed};
use testkit::{NatsServer, free_port};
use ticketing::ops::Probes;
use ticketing::settings::{DeliverySettings, NatsSettings};
use ticketing::startup::{Application, SWEEP_BUDGET, run_all};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::{DispatchConfig, Dispatcher, JetStreamPublisher, NatsConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const JWT_KEY: &str = "bench-secret";
const STREAM: &str = "ticketing";
const CLIENTS: usize = 64;
const BATCH: usize = 1000;
const LEASE: Duration = Duration::from_secs(30);
const MIB: f64 = 1024.0;

struct Plan {
    quick: bool,
    http_warmup: Duration,
    http_measure: Duration,
    http_rounds: usize,
    latency_warmup_secs: f64,
    latency_secs: f64,
    rtt_samples: usize,
    backlog: usize,
    /// Scenario 6's events of unknown outcome.
    reconcile_backlog: usize,
    /// Scenario 8: order messages waiting in the orders stream, and rounds of it.
    orders: usize,
    order_rounds: usize,
    sweep_sizes: Vec<usize>,
    empty_reps: usize,
    sweep_reps: usize,
    only: Option<Vec<u32>>,
    variants: Option<Vec<char>>,
    /// Scenario 2's request rate, instead of half of 1b's peak (to compare builds at one load).
    latency_rate: Option<f64>,
    /// `--windows`: print each scenario-1 measurement window's wall-clock edges
    /// (for benches/profile.py).
    windows: bool,
}

/// The scenario that runs only when asked for (`--only 7`): three more nats-servers.
const CLUSTER_SCENARIO: u32 = 7;

impl Plan {
    fn runs(&self, scenario: u32) -> bool {
        match &self.only {
            Some(o) => o.contains(&scenario),
            None => scenario != CLUSTER_SCENARIO,
        }
    }
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                http_warmup: Duration::from_millis(300),
                http_measure: Duration::from_secs(1),
                http_rounds: 1,
                latency_warmup_secs: 0.3,
                latency_secs: 1.0,
                rtt_samples: 200,
                backlog: 5_000,
                reconcile_backlog: 1_000,
                orders: 2_000,
                order_rounds: 1,
                sweep_sizes: vec![1_000, 10_000],
                empty_reps: 21,
                sweep_reps: 3,
                only: None,
                variants: None,
                latency_rate: None,
                windows: false,
            }
        } else {
            Self {
                quick,
                http_warmup: Duration::from_millis(500),
                http_measure: Duration::from_secs(3),
                http_rounds: 7,
                latency_warmup_secs: 1.0,
                latency_secs: 10.0,
                rtt_samples: 2_000,
                backlog: 100_000,
                reconcile_backlog: 10_000,
                orders: 10_000,
                order_rounds: 5,
                sweep_sizes: vec![1_000, 100_000, 1_000_000],
                empty_reps: 101,
                sweep_reps: 11,
                only: None,
                variants: None,
                latency_rate: None,
                windows: false,
            }
        }
    }
}

/// One line of the result table.
struct Row {
    id: String,
    what: String,
    measured: String,
    baseline: String,
    ratio: String,
    target: String,
    verdict: &'static str,
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// The outbox benchmarks (see the module docs and BENCHMARKS.md).
#[derive(Debug, clap::Parser)]
struct Args {
    /// CI smoke run: small sizes, under 10 s, nothing asserted.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios, e.g. `1,3` (to iterate on one). Scenario 6 (a three-replica
    /// stream on a three-node cluster against one replica) runs only when listed: `1,2,3,4,5,6`.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<u32>>,
    /// Run only these variants of scenario 1, e.g. `b` (to profile one) or `ab`.
    #[arg(long)]
    variants: Option<String>,
    /// Scenario 2's request rate, instead of half of 1b's peak (to compare builds at one load).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Print the wall-clock edges of scenario 1's measurement windows (for benches/profile.py).
    #[arg(long)]
    windows: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let mut plan = Plan::new(args.quick);
    plan.only = args.only;
    plan.variants = args
        .variants
        .map(|list| list.chars().filter(char::is_ascii_lowercase).collect());
    plan.latency_rate = args.latency_rate;
    plan.windows = args.windows;
    runtime.block_on(run(plan))
}

async fn run(plan: Plan) -> anyhow::Result<()> {
    let started = Instant::now();
    let load_before = env::load_average();
    println!(
        "outbox benchmarks ({} mode)",
        if plan.quick { "quick" } else { "full" }
    );
    println!("hardware: {}", env::hardware());
    println!("versions: {}", env::versions());
    println!("load average at start: {load_before}");
    let nats = NatsServer::start().context("starting nats-server -js")?;
    let url = nats.url();
    let token = api::JwtKey::new(JWT_KEY)
        .sign("bench-user", "bench@example.com")
        .context("signing a JWT")?;
    let mut rows = Vec::new();

    let mut peak_b = None;
    if plan.runs(1) {
        println!(
            "\n[1] create-ticket throughput, {CLIENTS} clients (load {})",
            env::load_average()
        );
        peak_b = Some(throughput::scenario_throughput(&plan, &nats, &token, &mut rows).await?);
    }
    if plan.runs(2) {
        let peak_b = match (peak_b, plan.latency_rate) {
            (Some(p), _) => p,
            // The rate is given: no peak to measure.
            (None, Some(rate)) => rate * 2.0,
            (None, None) => {
                // Scenario 1 was not asked for: one 1b round gives the peak to pace against.
                let single = Plan {
                    http_rounds: 1,
                    only: None,
                    variants: Some(vec!['b']),
                    ..Plan::new(plan.quick)
                };
                throughput::scenario_throughput(&single, &nats, &token, &mut Vec::new()).await?
            }
        };
        println!(
            "\n[2] commit-to-receipt latency at {} (load {})",
            plan.latency_rate
                .map_or("50% of 1b's peak".to_owned(), |r| format!(
                    "{r:.0} req/s (--latency-rate)"
                )),
            env::load_average()
        );
        latency::scenario_latency(&plan, &url, &token, peak_b, &mut rows).await?;
    }
    let mut drained = None;
    if plan.runs(3) {
        println!(
            "\n[3] backlog drain of {} events (load {})",
            plan.backlog,
            env::load_average()
        );
        drained = Some(drain::scenario_drain(&plan, &url, &mut rows).await?);
    }
    if plan.runs(4) {
        println!(
            "\n[4] sweep cost versus backlog size (load {})",
            env::load_average()
        );
        sweep_cost::scenario_sweep_cost(&plan, &mut rows).await?;
    }
    if plan.runs(5) {
        println!(
            "\n[5] peak RSS of `ticketing all` draining the backlog (load {})",
            env::load_average()
        );
        peak_rss::scenario_memory(&plan, &url, &mut rows).await?;
        memory::sustained_load(&plan, &url, &token, &mut rows).await?;
    }
    if plan.runs(6) {
        println!(
            "\n[6] reconciliation past the duplicate window, {} events (load {})",
            plan.reconcile_backlog,
            env::load_average()
        );
        reconcile::scenario_reconcile(&plan, &url, drained, &mut rows).await?;
    }

    if plan.runs(CLUSTER_SCENARIO) {
        println!(
            "\n[7] three-replica stream against one replica, 3-node cluster (load {})",
            env::load_average()
        );
        cluster::scenario_cluster(&plan, &token, &mut rows).await?;
    }
    if plan.runs(8) {
        println!(
            "\n[8] order events in: {} order.created applied by the orders consumer (load {})",
            plan.orders,
            env::load_average()
        );
        orders_in::scenario_orders_in(&plan, &nats, &mut rows).await?;
    }

    println!(
        "\nhardware: {}\nversions: {}\nload average: {load_before} at start, {} at end; {:.0} s in all",
        env::hardware(),
        env::versions(),
        env::load_average(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "\n| # | scenario | measured | baseline (same run) | ratio | target | result |\n|---|---|---|---|---|---|---|"
    );
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.id, r.what, r.measured, r.baseline, r.ratio, r.target, r.verdict
        );
    }
    if plan.quick {
        println!("\n(quick mode: small sizes, figures indicative only; nothing is asserted)");
    }
    Ok(())
}
