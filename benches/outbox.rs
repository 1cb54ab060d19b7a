//! Outbox benchmarks: `cargo bench --bench outbox` (full) or `cargo bench --bench outbox --
//! --quick` (CI smoke run: small sizes, no assertion on speed). `-- --only 1,3` runs some of the
//! scenarios, `-- --only 1 --variants b` one variant of scenario 1 (to profile it), and
//! `-- --only 2 --latency-rate 7200` scenario 2 at a given rate instead of half of 1b's peak.
//! `-- --windows` prints the wall-clock edges of scenario 1's measurement windows, which
//! `benches/profile.py` matches with `perf record` samples (CPU per request by component).
//!
//! Starts its own `nats-server -js` (ticketing::harness::NatsServer), runs the service in-process
//! (and `ticketing all` as a child process for the memory scenario), and prints one table. Every
//! scenario measures its own baseline in the same run, so the figures that matter are ratios:
//! the machine is small (2 cores) and shared.
//!
//! 1. Create-ticket throughput over HTTP, 64 clients: (a) store only, outbox write disabled,
//!    (b) the real path (`run_all`: ticket + event in one transaction, the change feed publishing
//!    concurrently), (c) save then publish to JetStream and await the PubAck before answering,
//!    (d) save, then hand the event to an in-process publisher and answer at once (no event row):
//!    the least a delivery with the product's publisher costs, so 1d/1a is where 1b/1a tops out.
//! 2. Commit-to-receipt latency under (b) at 50% of its measured peak, open loop.
//! 3. Backlog drain by sweeps of 1,000 against raw JetStream publishing of the same messages.
//! 4. Sweep cost (empty claim, 1,000-event claim) with 1k / 100k / 1M rows waiting.
//! 5. Peak RSS of `ticketing all` draining the scenario-3 backlog; its anonymous RSS under a
//!    sustained create load that nothing scrapes (benches/outbox/memory.rs).

#[path = "outbox/env.rs"]
mod env;
#[path = "outbox/load.rs"]
mod load;
#[path = "outbox/memory.rs"]
mod memory;
#[path = "outbox/seed.rs"]
mod seed;
#[path = "outbox/stores.rs"]
mod stores;

use anyhow::{Context, bail, ensure};
use async_nats::jetstream::{self, stream};
use common::store::sqlite::SqliteOptions;
use common::store::{Lease, SqliteStore};
use common::{Store, TicketId};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stores::{AfterWrite, CommitTimes, Decorated, Handed};
use ticketing::harness::{NatsServer, free_port};
use ticketing::ops::Probes;
use ticketing::settings::{DeliverySettings, NatsSettings};
use ticketing::startup::{Application, SWEEP_BUDGET, run_all};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::feed::{FEED_CHUNK, LOCAL_FEED_CAPACITY};
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

impl Plan {
    fn runs(&self, scenario: u32) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&scenario))
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

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only 1,3`: run some scenarios (to iterate on one); the default runs all five.
    let only: Option<Vec<u32>> = flag_value(&args, "--only").map(|list| {
        list.split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let mut plan = Plan::new(quick);
    plan.only = only;
    plan.variants = flag_value(&args, "--variants")
        .map(|list| list.chars().filter(char::is_ascii_lowercase).collect());
    plan.latency_rate = flag_value(&args, "--latency-rate").and_then(|r| r.parse().ok());
    plan.windows = args.iter().any(|a| a == "--windows");
    runtime.block_on(run(plan))
}

/// The argument after `flag`, if given.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
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
        peak_b = Some(scenario_throughput(&plan, &nats, &token, &mut rows).await?);
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
                scenario_throughput(&single, &nats, &token, &mut Vec::new()).await?
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
        scenario_latency(&plan, &url, &token, peak_b, &mut rows).await?;
    }
    if plan.runs(3) {
        println!(
            "\n[3] backlog drain of {} events (load {})",
            plan.backlog,
            env::load_average()
        );
        scenario_drain(&plan, &url, &mut rows).await?;
    }
    if plan.runs(4) {
        println!(
            "\n[4] sweep cost versus backlog size (load {})",
            env::load_average()
        );
        scenario_sweep_cost(&plan, &mut rows).await?;
    }
    if plan.runs(5) {
        println!(
            "\n[5] peak RSS of `ticketing all` draining the backlog (load {})",
            env::load_average()
        );
        scenario_memory(&plan, &url, &mut rows).await?;
        memory::sustained_load(&plan, &url, &token, &mut rows).await?;
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

// ---------------------------------------------------------------------------------------------
// Servers and services

fn delivery_settings(url: &str, client: &str) -> DeliverySettings {
    DeliverySettings {
        nats: NatsSettings {
            nats_url: url.to_owned(),
            nats_cluster_id: STREAM.to_owned(),
            nats_client_id: Some(client.to_owned()),
            nats_duplicate_window_secs: 120,
            nats_ack_timeout_secs: 5,
        },
        alert_webhook_url: None,
        alert_threshold: 5,
        sweep_batch_size: BATCH as u64,
    }
}

/// A JetStream context configured as the product's publisher is.
async fn jetstream(url: &str) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to NATS")?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(5_000)
        .build(client))
}

/// Deletes the stream (its messages and its duplicate-detection state) and creates it again as
/// the product does, so each phase starts from an empty stream.
async fn reset_stream(url: &str) -> anyhow::Result<jetstream::Context> {
    let js = jetstream(url).await?;
    // Absent on first use: not an error.
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["ticket.>".to_owned()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("creating the JetStream stream")?;
    Ok(js)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Variant {
    StoreOnly,
    Outbox,
    Naive,
    Floor,
}

impl Variant {
    fn letter(self) -> char {
        match self {
            Variant::StoreOnly => 'a',
            Variant::Outbox => 'b',
            Variant::Naive => 'c',
            Variant::Floor => 'd',
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::StoreOnly => "1a store only (outbox write off)",
            Variant::Outbox => "1b outbox + change feed (`ticketing all`)",
            Variant::Naive => "1c save, then publish + await PubAck",
            Variant::Floor => "1d save, then hand to a publisher (no outbox)",
        }
    }
}

struct Service {
    addr: SocketAddr,
    store: SqliteStore,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    /// 1d: the counts of events handed over, and the publisher that takes them.
    handed: Option<(Arc<Handed>, JoinHandle<()>)>,
    _dir: tempfile::TempDir,
}

impl Service {
    async fn start(
        variant: Variant,
        url: &str,
        clock: Option<CommitTimes>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(
            dir.path().join("tickets.db"),
            SqliteOptions {
                write_outbox: variant == Variant::Outbox,
                ..Default::default()
            },
        )
        .await?;
        let shutdown = CancellationToken::new();
        let mut handed = None;
        let api_store: Arc<dyn Store> = match (variant, clock) {
            (Variant::Naive, _) => Arc::new(Decorated::new(
                store.clone(),
                AfterWrite::Publish(Box::new(jetstream(url).await?)),
            )),
            (Variant::Floor, _) => {
                let (tx, rx) = mpsc::channel(LOCAL_FEED_CAPACITY);
                let counts = Arc::new(Handed::default());
                let publisher = ready_publisher(url, "bench-floor").await?;
                let task = tokio::spawn(publish_handed(publisher, rx, counts.clone()));
                handed = Some((counts.clone(), task));
                Arc::new(Decorated::new(store.clone(), AfterWrite::Hand(tx, counts)))
            }
            (_, Some(times)) => Arc::new(Decorated::new(store.clone(), AfterWrite::Clock(times))),
            _ => Arc::new(store.clone()),
        };
        let (addr, task) = if variant == Variant::Outbox {
            // What `ticketing all` runs: the API, the change feed, the in-process sweep schedule.
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let schedule = cron::Schedule::from_str("*/10 * * * * *")?;
            let settings = delivery_settings(url, "bench-all");
            let token = shutdown.clone();
            let task = tokio::spawn(async move {
                run_all(addr, JWT_KEY, api_store, &settings, schedule, LEASE, token).await
            });
            wait_listening(addr, || task.is_finished()).await?;
            (addr, task)
        } else {
            // What `ticketing api` serves (its probes, the metrics recorder), on a free port.
            let probes = Arc::new(Probes {
                role: "api",
                store: Some(api_store.clone()),
                nats: None,
                nats_required: false,
                redis: None,
                jobs: None,
                alert_threshold: i64::MAX,
            });
            let app =
                Application::build((Ipv4Addr::LOCALHOST, 0).into(), api_store, JWT_KEY, probes)
                    .await?;
            let addr = app.local_addr()?;
            (addr, tokio::spawn(app.run_until_stopped(shutdown.clone())))
        };
        Ok(Self {
            addr,
            store,
            shutdown,
            task,
            handed,
            _dir: dir,
        })
    }

    /// 1d: polls until JetStream answered every event handed over; returns how long that took.
    async fn wait_handed_answered(&self, within: Duration) -> anyhow::Result<Duration> {
        let Some((counts, _)) = &self.handed else {
            return Ok(Duration::ZERO);
        };
        wait_none_left(
            within,
            "the handed-over events were not all answered",
            || async { Ok(counts.unanswered()) },
        )
        .await
    }

    async fn outbox_depth(&self) -> anyhow::Result<u64> {
        Ok(self.store.outbox_stats(5).await?.depth)
    }

    /// Polls until the outbox is empty; returns how long that took.
    async fn wait_outbox_empty(&self, within: Duration) -> anyhow::Result<Duration> {
        wait_none_left(within, "the outbox did not drain", || self.outbox_depth()).await
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the service did not stop within 30 s")?
            .context("service task")??;
        if let Some((counts, publisher)) = self.handed {
            // The service dropped its store, and with it the sender: the publisher ends.
            tokio::time::timeout(Duration::from_secs(30), publisher)
                .await
                .context("1d's publisher did not stop within 30 s")?
                .context("1d's publisher task")?;
            let failed = counts.failed.load(Ordering::Acquire);
            ensure!(failed == 0, "1d: {failed} publishes failed");
        }
        Ok(())
    }
}

/// Polls `left` every 10 ms until it reports 0; returns how long that took, or `what` if not
/// within `within`.
async fn wait_none_left<F, Fut>(
    within: Duration,
    what: &str,
    mut left: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let t = Instant::now();
    while left().await? > 0 {
        ensure!(t.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(t.elapsed())
}

/// 1d's publisher: takes what the store decorator hands over, as the local change feed takes
/// its events (up to `FEED_CHUNK` at a time, published pipelined with the product's publisher).
async fn publish_handed(
    publisher: JetStreamPublisher,
    mut events: mpsc::Receiver<common::OutboxEvent>,
    counts: Arc<Handed>,
) {
    let mut batch = Vec::with_capacity(FEED_CHUNK);
    while events.recv_many(&mut batch, FEED_CHUNK).await > 0 {
        let results = publisher.publish_batch(&batch).await;
        let acked = results.iter().filter(|r| r.is_ok()).count() as u64;
        counts.acked.fetch_add(acked, Ordering::AcqRel);
        counts
            .failed
            .fetch_add(results.len() as u64 - acked, Ordering::AcqRel);
        batch.clear();
    }
}

async fn wait_listening(addr: SocketAddr, mut exited: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        ensure!(!exited(), "the service exited during start-up");
        ensure!(
            Instant::now() < deadline,
            "nothing listens on {addr} after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 1

/// Returns 1b's median throughput (the peak the latency scenario paces against).
async fn scenario_throughput(
    plan: &Plan,
    nats: &NatsServer,
    token: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<f64> {
    let (url, nats_pid) = (nats.url(), nats.pid());
    let url = url.as_str();
    let all = [
        Variant::StoreOnly,
        Variant::Outbox,
        Variant::Naive,
        Variant::Floor,
    ];
    // `--variants b` (for profiling one variant): the ratios then print as NaN.
    let variants: Vec<Variant> = all
        .into_iter()
        .filter(|v| {
            plan.variants
                .as_ref()
                .is_none_or(|only| only.contains(&v.letter()))
        })
        .collect();
    let mut runs: HashMap<Variant, Vec<f64>> = HashMap::new();
    let mut client_p99: HashMap<Variant, Vec<f64>> = HashMap::new();
    // CPU per request (this process and nats-server): steadier than req/s on a shared machine.
    let mut cpu_us: HashMap<Variant, Vec<f64>> = HashMap::new();
    // Each window's CPU use, for the "1 NATS" row.
    let mut windows: HashMap<Variant, Vec<load::CpuUse>> = HashMap::new();
    for round in 0..plan.http_rounds {
        // Rotate the order each round so no variant always runs first (or last).
        for k in 0..variants.len() {
            let variant = variants[(round + k) % variants.len()];
            reset_stream(url).await?;
            let service = Service::start(variant, url, None).await?;
            let t = load::closed_loop(
                service.addr,
                token,
                CLIENTS,
                plan.http_warmup,
                plan.http_measure,
                nats_pid,
            )
            .await?;
            let mut extra = String::new();
            if variant == Variant::Outbox {
                let left = service.outbox_depth().await?;
                let drained = service.wait_outbox_empty(Duration::from_secs(60)).await?;
                extra = format!(
                    "; outbox when the load stopped: {left} events, empty {:.0} ms later",
                    drained.as_secs_f64() * 1e3
                );
            }
            if let Some((counts, _)) = &service.handed {
                let left = counts.unanswered();
                let drained = service
                    .wait_handed_answered(Duration::from_secs(60))
                    .await?;
                extra = format!(
                    "; unacked when the load stopped: {left} events, none {:.0} ms later",
                    drained.as_secs_f64() * 1e3
                );
            }
            service.stop().await?;
            ensure!(
                t.errors == 0,
                "{}: {} requests failed",
                variant.label(),
                t.errors
            );
            println!(
                "  round {} {:<44} {:>8.0} req/s  (client latency p50 {:.1} ms, p99 {:.1} ms){extra}",
                round + 1,
                variant.label(),
                t.rps(),
                t.p50_ms,
                t.p99_ms
            );
            if let (Some(us), Some(cpu)) = (t.cpu_us_per_request(), &t.cpu) {
                println!(
                    "          CPU per request {us:.1} us (this process {:.1}, nats-server {:.1}); \
                     machine {:.0} % busy, {:.1} % stolen",
                    cpu.ours / t.created.max(1) as f64 * 1e6,
                    cpu.nats / t.created.max(1) as f64 * 1e6,
                    cpu.busy * 100.0,
                    cpu.steal * 100.0
                );
                if plan.windows {
                    println!(
                        "          window 1{} {:.6} {:.6} {us:.3}",
                        variant.letter(),
                        cpu.wall.0,
                        cpu.wall.1
                    );
                }
                cpu_us.entry(variant).or_default().push(us);
                windows.entry(variant).or_default().push(cpu.clone());
            }
            runs.entry(variant).or_default().push(t.rps());
            client_p99.entry(variant).or_default().push(t.p99_ms);
        }
    }
    let rates = |v: Variant| runs.get(&v).cloned().unwrap_or_default();
    let (ra, rb, rc, rd) = (
        rates(Variant::StoreOnly),
        rates(Variant::Outbox),
        rates(Variant::Naive),
        rates(Variant::Floor),
    );
    let (a, b, c, d) = (
        load::median(&ra),
        load::median(&rb),
        load::median(&rc),
        load::median(&rd),
    );
    // Ratios are taken within each round (the variants ran back to back) and then the
    // median over rounds: slow drifts of the machine's load cancel within a round.
    let paired = |x: &[f64], y: &[f64]| {
        let r: Vec<f64> = x.iter().zip(y).map(|(x, y)| x / y).collect();
        load::median(&r)
    };
    let (ba, ca, bc) = (paired(&rb, &ra), paired(&rc, &ra), paired(&rb, &rc));
    let (da, bd) = (paired(&rd, &ra), paired(&rb, &rd));
    let per_round = |x: &[f64], y: &[f64]| {
        x.iter()
            .zip(y)
            .map(|(x, y)| format!("{:.2}", x / y))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  per-round ratios: 1b/1a {}; 1b/1c {}; 1d/1a {}; 1b/1d {}",
        per_round(&rb, &ra),
        per_round(&rb, &rc),
        per_round(&rd, &ra),
        per_round(&rb, &rd)
    );
    let rounds = if plan.http_rounds > 1 {
        format!(" (median of {} rounds)", plan.http_rounds)
    } else {
        String::new()
    };
    rows.push(Row {
        id: "1a".into(),
        what: format!("{}, req/s{rounds}", Variant::StoreOnly.label()),
        measured: format!("{a:.0}"),
        baseline: "(baseline)".into(),
        ratio: "1.00".into(),
        target: "-".into(),
        verdict: "-",
    });
    rows.push(Row {
        id: "1b".into(),
        what: format!("{}, req/s{rounds}", Variant::Outbox.label()),
        measured: format!("{b:.0}"),
        baseline: format!("1a: {a:.0}"),
        ratio: format!("{ba:.2}"),
        target: ">= 0.85 x 1a".into(),
        verdict: verdict(ba >= 0.85),
    });
    rows.push(Row {
        id: "1c".into(),
        what: format!("{}, req/s{rounds}", Variant::Naive.label()),
        measured: format!("{c:.0}"),
        baseline: format!("1a: {a:.0}"),
        ratio: format!("{ca:.2}"),
        target: "-".into(),
        verdict: "-",
    });
    rows.push(Row {
        id: "1b/1c".into(),
        what: "outbox path versus publishing in the request".into(),
        measured: format!("1b: {b:.0}"),
        baseline: format!("1c: {c:.0}"),
        ratio: format!("{bc:.2}"),
        target: ">= 1.00".into(),
        verdict: verdict(bc >= 1.0),
    });
    rows.push(Row {
        id: "1d".into(),
        what: format!(
            "{}, req/s{rounds}: where 1b/1a tops out",
            Variant::Floor.label()
        ),
        measured: format!("{d:.0}"),
        baseline: format!("1a: {a:.0}"),
        ratio: format!("{da:.2}"),
        target: "-".into(),
        verdict: "-",
    });
    // Where the cores are kept busy, req/s goes as 1 / (CPU per request): the same ratios from
    // the CPU each request cost, whatever share of the machine a variant got (printed per round).
    let cpu = |v: Variant| cpu_us.get(&v).cloned().unwrap_or_default();
    let (ua, ub, ud) = (
        cpu(Variant::StoreOnly),
        cpu(Variant::Outbox),
        cpu(Variant::Floor),
    );
    let (cpu_ba, cpu_da) = (paired(&ua, &ub), paired(&ua, &ud));
    let of_windows = |v: Variant, f: fn(&load::CpuUse) -> f64| -> Vec<f64> {
        windows
            .get(&v)
            .map_or_else(Vec::new, |w| w.iter().map(f).collect())
    };
    let nats_share_d = of_windows(Variant::Floor, load::CpuUse::nats_share);
    println!(
        "  per-round CPU ratios: 1a/1b {}; 1a/1d {}; nats-server's share of 1d's CPU {}",
        per_round(&ua, &ub),
        per_round(&ua, &ud),
        nats_share_d
            .iter()
            .map(|s| format!("{:.1} %", s * 100.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    rows.push(Row {
        id: "1 CPU".into(),
        what: "CPU per request (this process + nats-server), us: 1a / 1b / 1d".into(),
        measured: format!("{:.1} / {:.1}", load::median(&ub), load::median(&ud)),
        baseline: format!("1a: {:.1}", load::median(&ua)),
        ratio: format!("1a/1b {cpu_ba:.2}, 1a/1d {cpu_da:.2}"),
        target: "-".into(),
        verdict: "-",
    });
    // nats-server's share of all CPU in 1d's window (both figures from the same window, so it
    // holds whatever the machine's speed then): the CPU that even an outbox costing nothing in
    // this process would add. It would bound 1b/1a at `1 - share` only if 1a used every core;
    // 1a leaves some idle (printed beside it), which 1b's extra work can use, so it is a
    // share, not a hard bound.
    let share = load::median(&nats_share_d);
    let busy_a_each = of_windows(Variant::StoreOnly, |c| c.busy);
    let busy_a = load::median(&busy_a_each);
    rows.push(Row {
        id: "1 NATS".into(),
        what: "nats-server's share of 1d's CPU (same window); 1a's machine busy share".into(),
        measured: format!("{:.1} %", share * 100.0),
        baseline: format!("1a busy: {:.0} %", busy_a * 100.0),
        ratio: format!("1 - share = {:.2}", 1.0 - share),
        target: "-".into(),
        verdict: "-",
    });
    // req/s = busy share x cores / CPU per request, so 1b/1a = (busy 1b / busy 1a) x (CPU 1a /
    // CPU 1b). At the busy share 1b reached, 1b/1a >= 0.85 allows 1b this much CPU per request
    // over 1a; nats-server's own work for 1b's events comes out of it, and what is left is all
    // the outbox may cost in this process (the event row, the hand-over, publishing, the delete).
    let busy_b = of_windows(Variant::Outbox, |c| c.busy);
    let nats_share_b = of_windows(Variant::Outbox, load::CpuUse::nats_share);
    let (allowed, nats_b): (Vec<f64>, Vec<f64>) = ua
        .iter()
        .zip(&ub)
        .zip(busy_a_each.iter().zip(&busy_b))
        .zip(&nats_share_b)
        .map(|(((cpu_a, cpu_b), (busy_a, busy_b)), share)| {
            (cpu_a * (busy_b / busy_a) / 0.85 - cpu_a, cpu_b * share)
        })
        .unzip();
    let left: Vec<f64> = allowed.iter().zip(&nats_b).map(|(a, n)| a - n).collect();
    rows.push(Row {
        id: "1 budget".into(),
        what: "CPU per request 1b may add over 1a for 0.85, at 1b's busy share (median of rounds)"
            .into(),
        measured: format!("{:.1} us", load::median(&allowed)),
        baseline: format!("nats-server in 1b: {:.1} us", load::median(&nats_b)),
        ratio: format!("left for the outbox: {:.1} us", load::median(&left)),
        target: "-".into(),
        verdict: "-",
    });
    rows.push(Row {
        id: "1b/1d".into(),
        what: "outbox path versus the same publishing with no event row".into(),
        measured: format!("1b: {b:.0}"),
        baseline: format!("1d: {d:.0}"),
        ratio: format!("{bd:.2}"),
        target: "-".into(),
        verdict: "-",
    });
    Ok(b)
}

// ---------------------------------------------------------------------------------------------
// Scenario 2

async fn scenario_latency(
    plan: &Plan,
    url: &str,
    token: &str,
    peak_b: f64,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // Baseline: what one JetStream publish costs from this process, publish to PubAck.
    let js = reset_stream(url).await?;
    let mut rtt = Vec::with_capacity(plan.rtt_samples);
    for i in 0..plan.rtt_samples {
        let message = jetstream::message::PublishMessage::build()
            .payload(format!("{{\"rtt\":{i}}}").into_bytes().into())
            .message_id(format!("rtt-{i}"));
        let t = Instant::now();
        js.send_publish("ticket.rtt", message).await?.await?;
        rtt.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (rtt50, rtt99) = (
        load::percentile(&mut rtt, 50.0),
        load::percentile(&mut rtt, 99.0),
    );
    drop(js);

    reset_stream(url).await?;
    let commits: CommitTimes = Arc::default();
    let service = Service::start(Variant::Outbox, url, Some(commits.clone())).await?;
    // A core NATS subscriber on ticket.> sees each message when the server routes the publish
    // (the same moment JetStream stores it and answers the PubAck).
    let sub_client = async_nats::connect(url).await?;
    let mut sub = sub_client.subscribe("ticket.>").await?;
    sub_client.flush().await?;
    let received: Arc<Mutex<HashMap<TicketId, Instant>>> = Arc::default();
    let receiver = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let at = Instant::now();
                let id = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                    .ok()
                    .and_then(|v| v["id"].as_str().and_then(TicketId::parse));
                if let (Some(id), Ok(mut map)) = (id, received.lock()) {
                    map.insert(id, at);
                }
            }
        })
    };
    let rate = plan.latency_rate.unwrap_or((peak_b * 0.5).max(1.0));
    let warm = (rate * plan.latency_warmup_secs) as usize;
    let count = (rate * plan.latency_secs).max(10.0) as usize;
    // Wall-clock of one instant, so slow episodes can be matched against other logs.
    let (wall0, inst0) = (chrono::Utc::now(), Instant::now());
    let paced = load::open_loop(service.addr, token, rate, warm + count).await?;
    let measured: Vec<_> = paced[warm..].to_vec();
    let ids: Vec<TicketId> = measured.iter().filter_map(|p| p.ticket).collect();
    ensure!(
        ids.len() == measured.len(),
        "{} paced requests failed",
        measured.len() - ids.len()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = {
            let map = received.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            ids.iter().filter(|id| map.contains_key(id)).count()
        };
        if got == ids.len() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {got} of {} events reached NATS within 60 s",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    receiver.abort();
    service.stop().await?;
    let commits = commits.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let received = received.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut from_commit = Vec::with_capacity(ids.len());
    let mut from_201 = Vec::with_capacity(ids.len());
    for p in &measured {
        let id = p.ticket.context("ticket id")?;
        let recv = *received.get(&id).context("received")?;
        let commit = *commits.get(&id).context("commit time")?;
        from_commit.push(recv.saturating_duration_since(commit).as_secs_f64() * 1e3);
        // Signed: the event may reach NATS before the client has read its 201.
        let signed = if recv >= p.answered {
            recv.duration_since(p.answered).as_secs_f64()
        } else {
            -p.answered.duration_since(recv).as_secs_f64()
        };
        from_201.push(signed * 1e3);
    }
    let episodes = slow_episodes(&measured, &from_commit);
    let (p50, p99, max) = (
        load::percentile(&mut from_commit, 50.0),
        load::percentile(&mut from_commit, 99.0),
        load::percentile(&mut from_commit, 100.0),
    );
    let (h50, h99) = (
        load::percentile(&mut from_201, 50.0),
        load::percentile(&mut from_201, 99.0),
    );
    let mut http: Vec<f64> = measured
        .iter()
        .map(|p| p.answered.duration_since(p.due).as_secs_f64() * 1e3)
        .collect();
    let http99 = load::percentile(&mut http, 99.0);
    // Requests that found all the generator's connections busy and waited for one.
    let queued: Vec<f64> = measured
        .iter()
        .filter_map(|p| p.waited_for_connection)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    println!(
        "  {} paced requests at {rate:.0} req/s: commit->receipt p50 {p50:.2} ms, p99 {p99:.2} ms, \
         max {max:.2} ms; 201->receipt p50 {h50:.2} ms, p99 {h99:.2} ms; HTTP request (from its \
         due time) p99 {http99:.2} ms; {} waited for one of the {} connections (max \
         {:.1} ms); raw publish->PubAck p50 {rtt50:.2} ms, p99 {rtt99:.2} ms",
        ids.len(),
        queued.len(),
        load::OPEN_LOOP_CONNECTIONS,
        queued.iter().copied().fold(0.0, f64::max)
    );
    if let Some(first) = measured.first() {
        let offset = chrono::Duration::from_std(first.due.saturating_duration_since(inst0))?;
        let at = |secs: f64| {
            (wall0 + offset + chrono::Duration::microseconds((secs * 1e6) as i64))
                .format("%H:%M:%S%.3f")
        };
        for e in &episodes {
            println!(
                "  slow episode {:.2}-{:.2} s into the measurement ({}-{} UTC): {} events over \
                 {SLOW_MS} ms (max {:.1} ms), HTTP requests sent then up to {:.1} ms",
                e.from,
                e.to,
                at(e.from),
                at(e.to),
                e.events,
                e.max_ms,
                e.http_max_ms
            );
        }
    }
    rows.push(Row {
        id: "2".into(),
        what: format!(
            "commit -> JetStream receipt under 1b at {rate:.0} req/s ({}), {} events",
            if plan.latency_rate.is_some() {
                "--latency-rate"
            } else {
                "50% of peak"
            },
            ids.len()
        ),
        measured: format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
        baseline: format!("raw publish->PubAck p50 {rtt50:.2} ms, p99 {rtt99:.2} ms"),
        ratio: format!("p99 {:.1}x", p99 / rtt99),
        target: "p99 < 20 ms".into(),
        verdict: verdict(p99 < 20.0),
    });
    Ok(())
}

/// Commit-to-receipt latency above which an event counts as slow in [`slow_episodes`].
const SLOW_MS: f64 = 20.0;

/// A stretch of the measurement in which events were slow (gaps under 50 ms joined).
struct SlowEpisode {
    from: f64,
    to: f64,
    events: usize,
    max_ms: f64,
    http_max_ms: f64,
}

/// When a p99 misses, whether it was one stall or a steady tail: the stretches of slow events,
/// with the slowest HTTP request of each (a stall the requests shared is the machine's, one they
/// did not is the outbox's).
fn slow_episodes(measured: &[load::Paced], latency_ms: &[f64]) -> Vec<SlowEpisode> {
    let Some(first) = measured.first() else {
        return Vec::new();
    };
    let mut episodes: Vec<SlowEpisode> = Vec::new();
    for (p, &ms) in measured.iter().zip(latency_ms) {
        if ms <= SLOW_MS {
            continue;
        }
        let at = p.due.duration_since(first.due).as_secs_f64();
        let http = p.answered.duration_since(p.due).as_secs_f64() * 1e3;
        match episodes.last_mut() {
            Some(e) if at - e.to < 0.05 => {
                e.to = at;
                e.events += 1;
                e.max_ms = e.max_ms.max(ms);
                e.http_max_ms = e.http_max_ms.max(http);
            }
            _ => episodes.push(SlowEpisode {
                from: at,
                to: at,
                events: 1,
                max_ms: ms,
                http_max_ms: http,
            }),
        }
    }
    episodes
}

// ---------------------------------------------------------------------------------------------
// Scenario 3

fn publish_message(m: &seed::Message) -> jetstream::message::PublishMessage {
    jetstream::message::PublishMessage::build()
        .payload(m.payload.clone().into())
        .message_id(&m.msg_id)
}

/// Raw publishing with the dispatcher's pipelining: send a batch, then await all its acks.
async fn raw_batches(js: &jetstream::Context, msgs: &[seed::Message]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    for chunk in msgs.chunks(BATCH) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            acks.push(
                js.send_publish(m.subject.clone(), publish_message(m))
                    .await?
                    .into_future(),
            );
        }
        for ack in futures::future::join_all(acks).await {
            let ack = ack?;
            ensure!(!ack.duplicate, "unexpected duplicate");
        }
    }
    Ok(t.elapsed())
}

/// The product's publisher, connected, with its stream ready (the drain's and 1d's).
async fn ready_publisher(url: &str, name: &str) -> anyhow::Result<JetStreamPublisher> {
    let publisher = JetStreamPublisher::connect(NatsConfig {
        url: url.to_owned(),
        stream: STREAM.to_owned(),
        client_name: name.to_owned(),
        duplicate_window: Duration::from_secs(120),
        ack_timeout: Duration::from_secs(5),
    })
    .await?;
    ensure!(
        publisher.wait_connected(Duration::from_secs(10)).await,
        "publisher did not connect"
    );
    publisher
        .ensure_stream()
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(publisher)
}

/// Raw publishing with a sliding window of `BATCH` acks in flight (for reference).
async fn raw_window(js: &jetstream::Context, msgs: &[seed::Message]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for m in msgs {
        if inflight.len() >= BATCH
            && let Some(ack) = inflight.next().await
        {
            let _: async_nats::jetstream::publish::PublishAck = ack?;
        }
        inflight.push(
            js.send_publish(m.subject.clone(), publish_message(m))
                .await?
                .into_future(),
        );
    }
    while let Some(ack) = inflight.next().await {
        ack?;
    }
    Ok(t.elapsed())
}

async fn scenario_drain(plan: &Plan, url: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n = plan.backlog;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tickets.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).await?;
    let t = Instant::now();
    seed::backlog(&path, n, seed::Waiting::Failed)?;
    println!(
        "  seeded {n} failed, unlocked events in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let msgs = seed::messages(&path)?;
    ensure!(
        msgs.len() == n,
        "seeded {} events, expected {n}",
        msgs.len()
    );
    let rate = |d: Duration| n as f64 / d.as_secs_f64();

    let js = reset_stream(url).await?;
    let ceiling1 = rate(raw_batches(&js, &msgs).await?);
    let js = reset_stream(url).await?;
    let window = rate(raw_window(&js, &msgs).await?);
    drop(js);

    // The drain: NATS is back, sweeps of 1,000 (RetryPublishingNATSEvents) until `events` is empty.
    reset_stream(url).await?;
    let publisher = Arc::new(ready_publisher(url, "bench-drain").await?);
    let dispatcher = Dispatcher::new(
        Arc::new(store.clone()),
        publisher,
        DispatchConfig {
            claimer: "bench-drain".to_owned(),
            lease: LEASE,
            alert_threshold: 5,
            sweep_batch: BATCH,
        },
    );
    let counter = seed::connect(&path)?;
    let t = Instant::now();
    let deadline = t + Duration::from_secs(600);
    let mut published = 0;
    let never = CancellationToken::new();
    loop {
        // One RetryPublishingNATSEvents job: steps of BATCH until nothing is due (or its budget).
        let sweep = dispatcher.sweep(SWEEP_BUDGET, &never).await?;
        published += sweep.published;
        ensure!(sweep.failed == 0, "publishing failed during the drain");
        if seed::count_events(&counter)? == 0 {
            break;
        }
        ensure!(Instant::now() < deadline, "the drain took over 10 minutes");
    }
    let drain_time = t.elapsed();
    let drain = rate(drain_time);
    ensure!(published == n, "published {published} of {n}");

    let js = reset_stream(url).await?;
    let ceiling2 = rate(raw_batches(&js, &msgs).await?);
    drop(js);
    let ceiling = (ceiling1 + ceiling2) / 2.0;
    println!(
        "  raw batches of {BATCH}: {ceiling1:.0} and {ceiling2:.0} msg/s (before / after the drain); \
         raw sliding window of {BATCH}: {window:.0} msg/s; drain: {drain:.0} events/s ({:.2} s)",
        drain_time.as_secs_f64()
    );
    rows.push(Row {
        id: "3".into(),
        what: format!("backlog drain, {n} events, sweeps of {BATCH}, events/s"),
        measured: format!("{drain:.0} ({:.2} s)", drain_time.as_secs_f64()),
        baseline: format!("raw JetStream, batches of {BATCH}: {ceiling:.0}"),
        ratio: format!("{:.2}", drain / ceiling),
        target: ">= 0.50".into(),
        verdict: verdict(drain / ceiling >= 0.5),
    });
    rows.push(Row {
        id: "3'".into(),
        what: format!("(reference) raw JetStream, sliding window of {BATCH} acks, msg/s"),
        measured: format!("{window:.0}"),
        baseline: format!("drain: {drain:.0}"),
        ratio: format!("{:.2}", drain / window),
        target: "-".into(),
        verdict: "-",
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 4

/// One `claim_due(BATCH)` through the store, in microseconds. With `release`, the claimed events
/// are made due again (at the back of the queue) for the next repetition, untimed.
async fn time_claim(store: &SqliteStore, expect: usize, release: bool) -> anyhow::Result<f64> {
    let lease = Lease::new("bench-sweep", LEASE);
    let t = Instant::now();
    let claimed = store.claim_due(BATCH, &lease).await?;
    let micros = t.elapsed().as_secs_f64() * 1e6;
    ensure!(
        claimed.len() == expect,
        "claimed {}, expected {expect}",
        claimed.len()
    );
    if release && !claimed.is_empty() {
        let ids: Vec<_> = claimed.iter().map(|e| e.id).collect();
        store.release(&ids, &lease).await?;
    }
    Ok(micros)
}

struct SweepDb {
    rows: usize,
    path: std::path::PathBuf,
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

async fn scenario_sweep_cost(plan: &Plan, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    // One store per size, all seeded first, then every repetition times each size in turn, so
    // whatever else the machine does falls on all sizes alike.
    let mut dbs = Vec::new();
    for &n in &plan.sweep_sizes {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tickets.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).await?;
        let t = Instant::now();
        seed::backlog(&path, n, seed::Waiting::LockedFuture)?;
        println!(
            "  seeded {n} events locked for an hour in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // Warm the statement cache and the page cache once.
        time_claim(&store, 0, false).await?;
        dbs.push(SweepDb {
            rows: n,
            path,
            store,
            _dir: dir,
        });
    }
    let mut empty = vec![Vec::new(); dbs.len()];
    for _ in 0..plan.empty_reps {
        for (i, db) in dbs.iter().enumerate() {
            empty[i].push(time_claim(&db.store, 0, false).await?);
        }
    }
    for db in &dbs {
        seed::make_all_due(&db.path)?;
        time_claim(&db.store, BATCH.min(db.rows), true).await?;
    }
    let mut claim = vec![Vec::new(); dbs.len()];
    for _ in 0..plan.sweep_reps {
        for (i, db) in dbs.iter().enumerate() {
            claim[i].push(time_claim(&db.store, BATCH.min(db.rows), true).await?);
        }
    }
    for line in seed::claim_due_plan(&dbs[0].path)? {
        println!("  claim_due query plan: {line}");
    }
    let results: Vec<(usize, f64, f64)> = dbs
        .iter()
        .enumerate()
        .map(|(i, db)| (db.rows, load::median(&empty[i]), load::median(&claim[i])))
        .collect();
    for &(n, e, c) in &results {
        println!(
            "  {n:>9} rows: empty sweep {e:.0} us (median of {}), claim of {} {c:.0} us (median of {})",
            plan.empty_reps,
            BATCH.min(n),
            plan.sweep_reps
        );
    }
    let (n0, empty0, claim0) = results[0];
    for &(n, empty, claim) in &results {
        let first = n == n0;
        rows.push(Row {
            id: "4".into(),
            what: format!("empty sweep (claim_due finds 0), {n} rows locked, median us"),
            measured: format!("{empty:.0}"),
            baseline: if first {
                "(baseline)".into()
            } else {
                format!("{n0} rows: {empty0:.0}")
            },
            ratio: format!("{:.2}", empty / empty0),
            target: if first { "-".into() } else { "<= 2.0".into() },
            verdict: if first {
                "-"
            } else {
                verdict(empty / empty0 <= 2.0)
            },
        });
        rows.push(Row {
            id: "4".into(),
            what: format!("claim_due of {BATCH}, {n} rows due, median us"),
            measured: format!("{claim:.0}"),
            baseline: if first {
                "(baseline)".into()
            } else {
                format!("{n0} rows: {claim0:.0}")
            },
            ratio: format!("{:.2}", claim / claim0),
            target: if first { "-".into() } else { "<= 2.0".into() },
            verdict: if first {
                "-"
            } else {
                verdict(claim / claim0 <= 2.0)
            },
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 5

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn scenario_memory(plan: &Plan, url: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n = plan.backlog;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tickets.db");
    // Migrate, then let go of the file: the child owns it.
    drop(SqliteStore::open(&path, SqliteOptions::default()).await?);
    seed::backlog(&path, n, seed::Waiting::Failed)?;
    reset_stream(url).await?;
    let port = free_port()?;
    let log_path = dir.path().join("ticketing-all.log");
    let log = std::fs::File::create(&log_path)?;
    let bin = env!("CARGO_BIN_EXE_ticketing");
    let child = std::process::Command::new(bin)
        .arg("all")
        .env_remove("MONGO_URI")
        .env("JWT_KEY", JWT_KEY)
        .env("PORT", port.to_string())
        .env("SQLITE_PATH", &path)
        .env("NATS_URL", url)
        .env("NATS_CLUSTER_ID", STREAM)
        .env("NATS_CLIENT_ID", "bench-all-child")
        // Every second, so the drain starts within a second instead of up to ten.
        .env("RETRY_SCHEDULE", "* * * * * *")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let mut child = Child(child);
    let pid = child.0.id();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    wait_listening(addr, || matches!(child.0.try_wait(), Ok(Some(_))))
        .await
        .with_context(|| {
            format!(
                "ticketing all did not start: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        })?;
    let (_, idle_rss) = env::memory_kib(pid).context("reading /proc/PID/status")?;
    let counter = seed::connect(&path)?;
    let t = Instant::now();
    let deadline = t + Duration::from_secs(600);
    let mut peak = 0;
    loop {
        if let Some((hwm, _)) = env::memory_kib(pid) {
            peak = peak.max(hwm);
        }
        if seed::count_events(&counter)? == 0 {
            break;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            bail!(
                "ticketing all exited ({status}) during the drain: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        ensure!(Instant::now() < deadline, "the drain took over 10 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = t.elapsed();
    if let Some((hwm, _)) = env::memory_kib(pid) {
        peak = peak.max(hwm);
    }
    drop(child);
    let peak_mib = peak as f64 / MIB;
    let idle_mib = idle_rss as f64 / MIB;
    println!(
        "  ticketing all (pid {pid}): RSS {idle_mib:.1} MiB when listening, VmHWM {peak_mib:.1} MiB \
         after draining {n} events in {:.1} s (including the wait for the first 1 s tick)",
        drained.as_secs_f64()
    );
    rows.push(Row {
        id: "5".into(),
        what: format!("peak RSS (VmHWM) of `ticketing all` draining {n} events"),
        measured: format!("{peak_mib:.1} MiB"),
        baseline: format!("idle RSS {idle_mib:.1} MiB"),
        ratio: format!("{:.2}", peak_mib / idle_mib),
        target: "< 150 MiB".into(),
        verdict: verdict(peak_mib < 150.0),
    });
    Ok(())
}
