//! Scenario 1: create-ticket throughput over HTTP, variants a to d, in paired rounds.

use super::*;

/// Returns 1b's median throughput (the peak the latency scenario paces against).
pub(crate) async fn scenario_throughput(
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
