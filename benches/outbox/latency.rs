//! Scenario 2: commit-to-receipt latency under 1b at a fixed rate, open loop.

use super::*;

pub(crate) async fn scenario_latency(
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
pub(crate) const SLOW_MS: f64 = 20.0;

/// A stretch of the measurement in which events were slow (gaps under 50 ms joined).
pub(crate) struct SlowEpisode {
    from: f64,
    to: f64,
    events: usize,
    max_ms: f64,
    http_max_ms: f64,
}

/// When a p99 misses, whether it was one stall or a steady tail: the stretches of slow events,
/// with the slowest HTTP request of each (a stall the requests shared is the machine's, one they
/// did not is the outbox's).
pub(crate) fn slow_episodes(measured: &[load::Paced], latency_ms: &[f64]) -> Vec<SlowEpisode> {
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
