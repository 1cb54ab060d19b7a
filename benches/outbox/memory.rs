//! Scenario 5, second part: the anonymous RSS of a real `ticketing all` under a sustained create
//! load that nothing scrapes. The Prometheus recorder keeps every histogram sample until they are
//! folded into their buckets; before the timed upkeep (issue #21) only a scrape of `/metrics` did
//! that, and a process nobody scraped grew by about 47 bytes per request, without end.
//!
//! `RssAnon` (from `/proc/PID/status`) rather than `VmRSS`: the SQLite file's mapped pages and
//! the binary's own are file-backed, and come and go with the page cache.

use super::peak_rss::Child;
use super::{MIB, Plan, Row, load, reset_stream, verdict};
use anyhow::{Context, bail};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Connections creating tickets, each sending its next request when the previous one answered.
const CLIENTS: usize = 32;
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// What "flat within noise" allows: growth from the first to the last window, in bytes per
/// request in between (the leak of issue #21 was about 47). A ratio of the two windows would
/// also count the process's warm-up, which runs well into the first minute.
const FLAT_BYTES_PER_REQUEST: f64 = 5.0;
/// Issue #21's target for this load: well under 64 MiB.
const TARGET_MIB: f64 = 64.0;

/// `RssAnon` of a process, in KiB.
fn rss_anon_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("RssAnon:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Median of the samples taken in `[from, to)` seconds after the load started, in MiB.
fn window_median(samples: &[(f64, u64)], from: f64, to: f64) -> f64 {
    let v: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, kib)| *kib as f64 / MIB)
        .collect();
    load::median(&v)
}

pub async fn sustained_load(
    plan: &Plan,
    url: &str,
    token: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // Full: five minutes at the create rate of this machine (a few million requests); the
    // first and the last minute are compared. Quick: seconds.
    let (run, window) = if plan.quick {
        (Duration::from_secs(6), Duration::from_secs(2))
    } else {
        (Duration::from_secs(300), Duration::from_secs(60))
    };
    println!(
        "  then {CLIENTS} clients creating tickets for {} s, nothing scraping /metrics",
        run.as_secs()
    );
    let dir = tempfile::tempdir()?;
    reset_stream(url).await?;
    let (mut child, port, log_path) =
        Child::start_all(dir.path(), url, "bench-load-child", &[]).await?;
    let pid = child.0.id();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let idle = rss_anon_kib(pid).context("reading RssAnon")? as f64 / MIB;

    let started = Instant::now();
    let token = token.to_owned();
    let load = tokio::spawn(async move {
        load::closed_loop(addr, &token, CLIENTS, Duration::ZERO, run, None).await
    });
    let mut samples: Vec<(f64, u64)> = Vec::new();
    while !load.is_finished() {
        if let Some(kib) = rss_anon_kib(pid) {
            samples.push((started.elapsed().as_secs_f64(), kib));
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            bail!(
                "ticketing all exited ({status}) under load: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let done = load.await.context("load task")??;
    let final_mib = rss_anon_kib(pid).context("reading RssAnon")? as f64 / MIB;
    drop(child);

    let secs = run.as_secs_f64();
    let w = window.as_secs_f64();
    let first = window_median(&samples, 0.0, w);
    let last = window_median(&samples, secs - w, secs + 1.0);
    let peak = samples.iter().map(|(_, kib)| *kib).max().unwrap_or(0) as f64 / MIB;
    let requests = done.created + done.errors;
    // Growth per request between the two windows' middles.
    let between = requests as f64 * (secs - w) / secs;
    let per_request = (last - first) * MIB * 1024.0 / between.max(1.0);
    println!(
        "  ticketing all (pid {pid}): {} created ({} errors) in {secs:.0} s = {:.0}/s; RssAnon idle \
         {idle:.1} MiB, first {w:.0} s {first:.1} MiB, last {w:.0} s {last:.1} MiB (medians; {per_request:+.1} \
         bytes per request between them), peak {peak:.1} MiB, final {final_mib:.1} MiB",
        done.created,
        done.errors,
        done.rps(),
    );
    let trace: Vec<String> = (0..(secs / w).ceil() as usize)
        .map(|i| {
            format!(
                "{:.1}",
                window_median(&samples, i as f64 * w, (i + 1) as f64 * w)
            )
        })
        .collect();
    println!(
        "  RssAnon medians by {w:.0} s window: {} MiB",
        trace.join(", ")
    );
    rows.push(Row {
        id: "5b".into(),
        what: format!(
            "anonymous RSS of `ticketing all`, {} creates in {secs:.0} s, no scrapes: \
             growth from the first {w:.0} s to the last (medians)",
            done.created
        ),
        measured: format!("{per_request:+.1} B/request (last {last:.1} MiB)"),
        baseline: format!("first {first:.1} MiB"),
        ratio: format!("{:.2}", last / first),
        target: format!("< {FLAT_BYTES_PER_REQUEST:.0} B/request"),
        verdict: verdict(per_request < FLAT_BYTES_PER_REQUEST),
    });
    rows.push(Row {
        id: "5c".into(),
        what: "peak / final anonymous RSS under that load".into(),
        measured: format!("{peak:.1} / {final_mib:.1} MiB"),
        baseline: format!("idle {idle:.1} MiB"),
        ratio: format!("{:.2}", peak / idle),
        target: format!("< {TARGET_MIB:.0} MiB"),
        verdict: verdict(peak < TARGET_MIB),
    });
    Ok(())
}
