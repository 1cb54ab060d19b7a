//! Scenario 3: a backlog drained by sweeps, against raw JetStream publishing of the same messages.

use super::*;

pub(crate) fn publish_message(m: &seed::Message) -> jetstream::message::PublishMessage {
    jetstream::message::PublishMessage::build()
        .payload(m.payload.clone().into())
        .message_id(&m.msg_id)
}

/// Raw publishing with the dispatcher's pipelining: send a batch, then await all its acks.
pub(crate) async fn raw_batches(
    js: &jetstream::Context,
    msgs: &[seed::Message],
) -> anyhow::Result<Duration> {
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

/// Raw publishing with a sliding window of `BATCH` acks in flight (for reference).
pub(crate) async fn raw_window(
    js: &jetstream::Context,
    msgs: &[seed::Message],
) -> anyhow::Result<Duration> {
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

/// Sweeps of `BATCH` (RetryPublishingNATSEvents jobs) until the `n` events waiting in the store
/// at `path` are all delivered to the (existing) stream of `replicas` copies; how long it took.
pub(crate) async fn drain_backlog(
    store: &SqliteStore,
    path: &std::path::Path,
    n: usize,
    url: &str,
    replicas: usize,
) -> anyhow::Result<Duration> {
    let dispatcher = bench_dispatcher(store, url, "bench-drain", replicas).await?;
    let counter = seed::connect(path)?;
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
    let took = t.elapsed();
    ensure!(published == n, "published {published} of {n}");
    Ok(took)
}

/// Returns the drain rate, events/s (scenario 6's baseline).
pub(crate) async fn scenario_drain(
    plan: &Plan,
    url: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<f64> {
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
    let drain_time = drain_backlog(&store, &path, n, url, 1).await?;
    let drain = rate(drain_time);

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
    Ok(drain)
}
