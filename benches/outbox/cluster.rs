//! Scenario 7 (opt-in, `--only 7`): a three-replica stream against a one-replica stream, both on
//! the same three-node cluster (testkit::NatsCluster on loopback), in alternating rounds: 1b's
//! create rate and the backlog drain rate. The service and the drain connect to the server that
//! leads the stream, so the figures differ by the replication alone (the three servers share
//! the machine's cores with the service: a figure, not a target).

use super::*;
use testkit::NatsCluster;

/// The node that leads the stream (or holds its one copy), once the cluster agrees on it.
async fn leader_url(cluster: &NatsCluster) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(node) = cluster.stream_leader(STREAM) {
            return Ok(cluster.url(node));
        }
        ensure!(
            Instant::now() < deadline,
            "the stream has no leader after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates the stream with `replicas` copies through any server; the leader's URL.
async fn fresh_stream(cluster: &NatsCluster, replicas: usize) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    // JetStream answers once the cluster has elected its meta leader.
    while let Err(e) = reset_stream_with(&cluster.url(0), replicas).await {
        ensure!(Instant::now() < deadline, "cannot create the stream: {e:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    leader_url(cluster).await
}

pub(crate) async fn scenario_cluster(
    plan: &Plan,
    token: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let cluster = NatsCluster::start(3).context("starting three clustered nats-servers")?;
    let backlog = plan.backlog / 5;
    let rounds = plan.http_rounds.min(3);
    let mut create: HashMap<usize, Vec<f64>> = HashMap::new();
    let mut drain: HashMap<usize, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        // R1 first in odd rounds, R3 first in even ones.
        let order = if round % 2 == 0 { [1, 3] } else { [3, 1] };
        for replicas in order {
            let url = fresh_stream(&cluster, replicas).await?;
            let service = Service::start_with(Variant::Outbox, &url, None, replicas as u64).await?;
            let t = load::closed_loop(
                service.addr,
                token,
                CLIENTS,
                plan.http_warmup,
                plan.http_measure,
                None,
            )
            .await?;
            let drained = service.wait_outbox_empty(Duration::from_secs(60)).await?;
            service.stop().await?;
            ensure!(
                t.errors == 0,
                "1b on R{replicas}: {} requests failed",
                t.errors
            );

            let url = fresh_stream(&cluster, replicas).await?;
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("tickets.db");
            let store = SqliteStore::open(&path, SqliteOptions::default()).await?;
            seed::backlog(&path, backlog, seed::Waiting::Failed)?;
            let took = drain::drain_backlog(&store, &path, backlog, &url, replicas).await?;
            let rate = backlog as f64 / took.as_secs_f64();
            println!(
                "  round {} R{replicas}: 1b {:>7.0} req/s (p99 {:.1} ms, outbox empty {:.0} ms \
                 after); drain of {backlog}: {rate:>7.0} events/s",
                round + 1,
                t.rps(),
                t.p99_ms,
                drained.as_secs_f64() * 1e3
            );
            create.entry(replicas).or_default().push(t.rps());
            drain.entry(replicas).or_default().push(rate);
        }
    }
    let median = |m: &HashMap<usize, Vec<f64>>, r: usize| load::median(&m[&r]);
    // R3 against R1 within each round (they ran back to back), then the median: slow drifts of
    // a shared machine's load cancel within a round.
    let paired = |m: &HashMap<usize, Vec<f64>>| -> Vec<f64> {
        m[&3].iter().zip(&m[&1]).map(|(r3, r1)| r3 / r1).collect()
    };
    let show = |r: &[f64]| {
        r.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  per-round R3/R1: 1b {}; drain {}",
        show(&paired(&create)),
        show(&paired(&drain))
    );
    let rounds_note = if rounds > 1 {
        format!(" (median of {rounds} rounds)")
    } else {
        String::new()
    };
    for (id, what, m) in [
        ("7 1b", "1b create rate", &create),
        ("7 drain", "backlog drain rate", &drain),
    ] {
        let (one, three) = (median(m, 1), median(m, 3));
        rows.push(Row {
            id: id.into(),
            what: format!(
                "{what} on a three-replica stream, 3-node cluster{rounds_note}; ratio: median of \
                 per-round R3/R1"
            ),
            measured: format!("R3: {three:.0}"),
            baseline: format!("R1 on the same cluster: {one:.0}"),
            ratio: format!("{:.2}", load::median(&paired(m))),
            target: "-".into(),
            verdict: "-",
        });
    }
    Ok(())
}
