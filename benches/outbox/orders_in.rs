//! Scenario 8: order events in. `order.created` messages waiting in the orders stream, one per
//! ticket, applied by the product's orders consumer (a step: fetch a batch, apply it in one
//! store transaction that reserves each ticket and writes its `ticket.updated` event and its
//! inbox record, then ack), against raw JetStream fetch-and-ack of the same messages by another
//! durable consumer of the same stream, in the same process (before and after, averaged).

use super::*;
use common::EventId;
use common::inbox::Outcome;
use worker::orders::{self, OrdersConfig, OrdersConsumer};

const ORDERS_STREAM: &str = "orders";

/// CPU seconds used so far: this process, its SQLite writer thread, and nats-server; and how
/// long the writer thread has waited for a CPU while it could run (`schedstat`).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    ours: f64,
    writer: f64,
    writer_waited: f64,
    nats: f64,
}

impl Cpu {
    fn now(nats: &NatsServer) -> Self {
        let nats = nats
            .pid()
            .and_then(|p| env::cpu_secs(&p.to_string()))
            .unwrap_or(0.0);
        let writers: Vec<String> = std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "sqlite-writer")
            })
            .map(|t| format!("self/task/{}", t.file_name().to_string_lossy()))
            .collect();
        let writer = writers.iter().filter_map(|t| env::cpu_secs(t)).sum();
        let writer_waited = writers
            .iter()
            .filter_map(|t| {
                let stat = std::fs::read_to_string(format!("/proc/{t}/schedstat")).ok()?;
                let waited: f64 = stat.split_whitespace().nth(1)?.parse().ok()?;
                Some(waited / 1e9)
            })
            .sum();
        Self {
            ours: env::cpu_secs("self").unwrap_or(0.0),
            writer,
            writer_waited,
            nats,
        }
    }

    /// Microseconds per message since `before`: (this process, its writer thread, the writer's
    /// wait for a CPU, nats-server).
    fn per_message_since(&self, before: &Self, n: usize) -> (f64, f64, f64, f64) {
        let us = |a: f64, b: f64| (a - b) / n as f64 * 1e6;
        (
            us(self.ours, before.ours),
            us(self.writer, before.writer),
            us(self.writer_waited, before.writer_waited),
            us(self.nats, before.nats),
        )
    }
}

/// Messages per fetch, for both: the consumer's batch.
const FETCH: usize = orders::BATCH;

/// An empty orders stream holding `order.>`, as the consumer creates it.
async fn reset_orders_stream(js: &jetstream::Context) -> anyhow::Result<()> {
    let _ = js.delete_stream(ORDERS_STREAM).await;
    js.create_stream(stream::Config {
        name: ORDERS_STREAM.to_owned(),
        subjects: vec!["order.>".to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("creating the orders stream")?;
    Ok(())
}

/// `order.created` for each ticket, as the course's orders service sends it, published
/// pipelined (batches of 1,000 acks awaited together).
async fn publish_orders(js: &jetstream::Context, tickets: &[TicketId]) -> anyhow::Result<()> {
    for chunk in tickets.chunks(BATCH) {
        let mut acks = Vec::with_capacity(chunk.len());
        for id in chunk {
            let order = EventId::new().to_hex();
            let payload = serde_json::json!({
                "id": order, "version": 0, "status": "created", "userId": "bench-buyer",
                "expiresAt": "2026-12-01T10:15:00.000Z", "ticket": {"id": id, "price": 20},
            });
            let message = jetstream::message::PublishMessage::build()
                .payload(payload.to_string().into())
                .message_id(format!("{order}:created"));
            acks.push(
                js.send_publish("order.created", message)
                    .await?
                    .into_future(),
            );
        }
        for ack in futures::future::join_all(acks).await {
            ack?;
        }
    }
    Ok(())
}

/// Raw fetch-and-ack of every message by a new durable consumer `name`: fetches of [`FETCH`]
/// (no wait), each message acked, the acks flushed.
async fn raw_fetch_and_ack(
    client: &async_nats::Client,
    name: &str,
    n: usize,
) -> anyhow::Result<Duration> {
    let js = jetstream::new(client.clone());
    let consumer = js
        .get_stream(ORDERS_STREAM)
        .await?
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: "order.>".to_owned(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: (FETCH * 4) as i64,
            ..Default::default()
        })
        .await
        .context("creating the raw consumer")?;
    let t = Instant::now();
    let mut acked = 0;
    while acked < n {
        let mut batch = consumer.fetch().max_messages(FETCH).messages().await?;
        while let Some(m) = batch.next().await {
            m.map_err(|e| anyhow::anyhow!(e))?
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            acked += 1;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(300),
            "raw fetch-and-ack took over 5 minutes"
        );
    }
    client.flush().await?;
    Ok(t.elapsed())
}

/// One round's figures.
struct Round {
    /// Raw fetch-and-ack before and after the consumer, msg/s.
    raw: (f64, f64),
    /// The orders consumer, msg/s, and how long it took.
    ours: f64,
    secs: f64,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.ours / ((self.raw.0 + self.raw.1) / 2.0)
    }
}

pub(crate) async fn scenario_orders_in(
    plan: &Plan,
    nats: &NatsServer,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let n = plan.orders;
    let client = async_nats::connect(&nats.url())
        .await
        .context("connecting to NATS")?;
    // A round lasts about a tenth of a second on 2 cores: single rounds scatter with whatever
    // else the machine does, so the row is the median round (by ratio).
    let mut rounds = Vec::with_capacity(plan.order_rounds);
    for i in 0..plan.order_rounds {
        println!("  round {} of {}:", i + 1, plan.order_rounds);
        rounds.push(round(n, nats, &client).await?);
    }
    rounds.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    let ratios: Vec<String> = rounds.iter().map(|r| format!("{:.2}", r.ratio())).collect();
    let mid = &rounds[rounds.len() / 2];
    let raw = (mid.raw.0 + mid.raw.1) / 2.0;
    println!(
        "  ratios by round, sorted: {}; the median round: orders consumer {:.0} msg/s, raw {raw:.0}",
        ratios.join(", "),
        mid.ours
    );
    rows.push(Row {
        id: "8".into(),
        what: format!(
            "order events in, {n} order.created, fetches of {FETCH}, msg/s (median of {} rounds)",
            rounds.len()
        ),
        measured: format!("{:.0} ({:.2} s)", mid.ours, mid.secs),
        baseline: format!("raw JetStream fetch-and-ack: {raw:.0}"),
        ratio: format!("{:.2}", mid.ratio()),
        target: ">= 0.50".into(),
        verdict: verdict(mid.ratio() >= 0.5),
    });
    Ok(())
}

/// A round: a fresh store with `n` tickets, a fresh orders stream with an `order.created` for
/// each, raw fetch-and-ack of them, the orders consumer applying them, raw again.
async fn round(n: usize, nats: &NatsServer, client: &async_nats::Client) -> anyhow::Result<Round> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("tickets.db"), SqliteOptions::default()).await?;
    let tickets: Vec<TicketId> = (0..n).map(|_| TicketId::new()).collect();
    let rows_to_seed = tickets.clone();
    store
        .write("seed tickets", move |conn| {
            let mut insert = conn.prepare_cached(
                "INSERT INTO tickets (id, title, price, user_id, version, order_id) \
                 VALUES (?1, 'concert', 20.0, 'bench-seller', 0, NULL)",
            )?;
            for id in &rows_to_seed {
                insert.execute([id.to_hex()])?;
            }
            Ok(())
        })
        .await?;
    let js = jetstream::new(client.clone());
    reset_orders_stream(&js).await?;
    let t = Instant::now();
    publish_orders(&js, &tickets).await?;
    println!(
        "    seeded {n} tickets and published {n} order.created in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let cpu = Cpu::now(nats);
    let raw1 = rate(raw_fetch_and_ack(client, "bench-raw-1", n).await?);
    let (raw_ours, _, _, raw_nats) = Cpu::now(nats).per_message_since(&cpu, n);

    // The product's consumer, on its own durable consumer of the same stream.
    let consumer = OrdersConsumer::new(
        client.clone(),
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        OrdersConfig::new(
            ORDERS_STREAM,
            "tickets-service",
            Duration::from_secs(168 * 3600),
        ),
    );
    consumer.bind().await?;
    let cpu = Cpu::now(nats);
    let t = Instant::now();
    let (mut settled, mut applied) = (0, 0);
    while settled < n {
        let step = consumer.step(Duration::ZERO).await?;
        settled += step.settled;
        applied += step.count(Outcome::Applied);
        ensure!(
            t.elapsed() < Duration::from_secs(300),
            "applying took over 5 minutes"
        );
    }
    client.flush().await?;
    let applied_time = t.elapsed();
    let (cpu_ours, cpu_writer, writer_waited, cpu_nats) = Cpu::now(nats).per_message_since(&cpu, n);
    let ours = rate(applied_time);
    ensure!(applied == n, "applied {applied} of {n}");
    let reserved: i64 = seed::connect(store.path())?.query_row(
        "SELECT COUNT(*) FROM tickets WHERE order_id IS NOT NULL AND version = 1",
        [],
        |r| r.get(0),
    )?;
    ensure!(reserved == n as i64, "{reserved} of {n} tickets reserved");

    let raw2 = rate(raw_fetch_and_ack(client, "bench-raw-2", n).await?);
    let round = Round {
        raw: (raw1, raw2),
        ours,
        secs: applied_time.as_secs_f64(),
    };
    println!(
        "    raw fetch-and-ack, fetches of {FETCH}: {raw1:.0} and {raw2:.0} msg/s (before / after); \
         orders consumer: {ours:.0} msg/s ({:.2} s, one transaction per fetch): ratio {:.2}",
        round.secs,
        round.ratio()
    );
    println!(
        "    CPU per message: raw {raw_ours:.1} us here + {raw_nats:.1} us nats-server; orders \
         consumer {cpu_ours:.1} us here (SQLite writer thread {cpu_writer:.1}, and \
         {writer_waited:.1} waiting for a CPU) + {cpu_nats:.1} us nats-server; wall {:.1} us",
        round.secs / n as f64 * 1e6
    );
    Ok(round)
}
