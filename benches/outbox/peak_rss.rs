//! Scenario 5: peak RSS of a real `ticketing all` draining a backlog.

use super::*;

/// A child process killed on drop.
pub(crate) struct Child(pub(crate) std::process::Child);

impl Child {
    /// A real `ticketing all` on a free port, its SQLite file `tickets.db` and its log in `dir`,
    /// publishing to `url`, once it listens. Returns it, its port and the log's path.
    pub(crate) async fn start_all(
        dir: &std::path::Path,
        url: &str,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<(Self, u16, std::path::PathBuf)> {
        let port = free_port()?;
        let log_path = dir.join("ticketing-all.log");
        let log = std::fs::File::create(&log_path)?;
        let bin = env!("CARGO_BIN_EXE_ticketing");
        let child = std::process::Command::new(bin)
            .arg("all")
            .env_remove("MONGO_URI")
            .env("JWT_KEY", JWT_KEY)
            .env("PORT", port.to_string())
            .env("SQLITE_PATH", dir.join("tickets.db"))
            .env("NATS_URL", url)
            .env("NATS_CLUSTER_ID", STREAM)
            .env("NATS_CLIENT_ID", name)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let mut child = Child(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        wait_listening(addr, || matches!(child.0.try_wait(), Ok(Some(_))))
            .await
            .with_context(|| {
                format!(
                    "ticketing all did not start: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            })?;
        Ok((child, port, log_path))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) async fn scenario_memory(
    plan: &Plan,
    url: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let n = plan.backlog;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tickets.db");
    // Migrate, then let go of the file: the child owns it.
    drop(SqliteStore::open(&path, SqliteOptions::default()).await?);
    seed::backlog(&path, n, seed::Waiting::Failed)?;
    reset_stream(url).await?;
    let (child, _port, log_path) = Child::start_all(
        dir.path(),
        url,
        "bench-all-child",
        // Every second, so the drain starts within a second instead of up to ten.
        &[("RETRY_SCHEDULE", "* * * * * *")],
    )
    .await?;
    let mut child = child;
    let pid = child.0.id();
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
