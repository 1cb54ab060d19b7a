//! Scenario 4: the cost of a sweep step (an empty claim, a claim of 1,000) against the backlog size.

use super::*;
use common::store::Outbox;

/// One `claim_due(BATCH)` through the store, in microseconds. With `release`, the claimed events
/// are made due again (at the back of the queue) for the next repetition, untimed.
pub(crate) async fn time_claim(
    store: &SqliteStore,
    expect: usize,
    release: bool,
) -> anyhow::Result<f64> {
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

pub(crate) struct SweepDb {
    rows: usize,
    path: std::path::PathBuf,
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

pub(crate) async fn scenario_sweep_cost(plan: &Plan, rows: &mut Vec<Row>) -> anyhow::Result<()> {
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
