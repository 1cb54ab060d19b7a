//! Scenario 6: exactly once past the duplicate window. A backlog whose every event was sent ten
//! minutes ago without a PubAck (the outcome unknown), half of which the stream does hold, among
//! as many other messages stored since: the sweeps read the stream once per step (headers only,
//! from the earliest such attempt) and complete what it holds without publishing it again.

use super::*;
use common::EventId;

pub(crate) async fn scenario_reconcile(
    plan: &Plan,
    url: &str,
    drained: Option<f64>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let n = plan.reconcile_backlog;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tickets.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).await?;
    seed::backlog(&path, n, seed::Waiting::Unknown)?;
    let msgs = seed::messages(&path)?;
    ensure!(
        msgs.len() == n,
        "seeded {} events, expected {n}",
        msgs.len()
    );
    // The stream: every other event (stored by its lost attempt), and as many other messages.
    let js = reset_stream(url).await?;
    let stored: Vec<seed::Message> = msgs.iter().step_by(2).map(seed::Message::clone).collect();
    let others: Vec<seed::Message> = (0..n)
        .map(|i| seed::Message {
            subject: "ticket.updated".to_owned(),
            payload: format!("{{\"other\":{i}}}").into_bytes(),
            msg_id: EventId::new().to_hex(),
        })
        .collect();
    drain::raw_batches(&js, &stored).await?;
    drain::raw_batches(&js, &others).await?;
    drop(js);

    let dispatcher = bench_dispatcher(&store, url, "bench-reconcile", 1).await?;
    let counter = seed::connect(&path)?;
    let never = CancellationToken::new();
    let t = Instant::now();
    let deadline = t + Duration::from_secs(600);
    let (mut reconciled, mut published) = (0, 0);
    loop {
        let sweep = dispatcher.sweep(SWEEP_BUDGET, &never).await?;
        reconciled += sweep.reconciled;
        published += sweep.published;
        ensure!(
            sweep.failed == 0,
            "publishing failed during the reconciliation"
        );
        if seed::count_events(&counter)? == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the reconciliation took over 10 minutes"
        );
    }
    let elapsed = t.elapsed();
    let rate = n as f64 / elapsed.as_secs_f64();
    ensure!(
        reconciled == stored.len() && published == n - stored.len(),
        "reconciled {reconciled} and published {published} of {n}"
    );
    let in_stream = jetstream(url)
        .await?
        .get_stream(STREAM)
        .await?
        .info()
        .await?
        .state
        .messages;
    ensure!(
        in_stream == (n + others.len()) as u64,
        "the stream holds {in_stream} messages, expected {}",
        n + others.len()
    );
    println!(
        "  {n} events past the window ({reconciled} already stored, {published} not) among \
         {} other messages: {rate:.0} events/s ({:.2} s)",
        others.len(),
        elapsed.as_secs_f64()
    );
    let (baseline, ratio) = match drained {
        Some(d) => (format!("drain (3): {d:.0}"), format!("{:.2}", rate / d)),
        None => ("drain (3) not run".to_owned(), "-".to_owned()),
    };
    rows.push(Row {
        id: "6".into(),
        what: format!(
            "reconciliation past the duplicate window: {n} events of unknown outcome, half in \
             the stream among {n} other messages, events/s"
        ),
        measured: format!("{rate:.0} ({:.2} s)", elapsed.as_secs_f64()),
        baseline,
        ratio,
        target: "-".into(),
        verdict: "-",
    });
    Ok(())
}
