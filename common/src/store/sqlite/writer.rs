//! Group commit. One thread owns the writer connection; writes queue on a channel. The thread
//! takes every write that queued while the previous group was committing, runs them inside one
//! `BEGIN IMMEDIATE ... COMMIT` and answers them all after that one COMMIT. A write that fails
//! undoes only itself: the group is then rolled back and run again with each write in its own
//! savepoint (see [`run_group`] for why not always). A ticket write still answers only once
//! it is on disk (`synchronous=FULL` for any group that holds one), but the writes that queued
//! behind an fsync share the next one instead of paying one each.
//!
//! Checkpoints (copying the WAL back into the database file, with its own fsync) run on a
//! second thread with its own connection, so a write rarely waits behind one (the writer's own
//! checkpoint is a backstop for long bursts, and then finds most of the work done).
//!
//! The thread also hands fresh events to a change feed in the same process (`LocalFeed`): an
//! event write may insert its event already claimed by that feed, and the thread passes the
//! event over a channel once its group has committed, so the feed never reads it back.

use super::SqliteOptions;
use crate::domain::OutboxEvent;
use crate::store::StoreError;
use rusqlite::{Connection, params};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::{Notify, oneshot};

/// Most writes committed together: bounds how long the first of a group waits for the others.
const MAX_GROUP: usize = 256;
/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// WAL pages after which the writer checkpoints itself (SQLite's default is 1,000).
const WRITER_CHECKPOINT_PAGES: i64 = 4_000;
/// Bytes a restarted WAL file is truncated to.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    /// A ticket write: on disk (fsync) before it answers.
    Durable,
    /// Outbox bookkeeping: committed without waiting for an fsync (see `write_bookkeeping`).
    Bookkeeping,
}

/// Why a write that succeeded on its own was not committed: the group's transaction failed.
#[derive(Debug, thiserror::Error)]
#[error("the group commit it was part of failed: {0}")]
struct GroupFailed(String);

/// Where fresh events go when a change feed runs in this process: `token` is the lease they are
/// inserted under, `events` the feed's channel.
#[derive(Clone)]
pub(super) struct Handoff {
    pub(super) token: String,
    pub(super) events: tokio::sync::mpsc::Sender<OutboxEvent>,
}

/// What one group does with the events its writes produce.
struct GroupEvents<'a> {
    handoff: Option<&'a Handoff>,
    /// Free places in the feed's channel when the group started (the thread is its only sender).
    room: usize,
    handed: Vec<OutboxEvent>,
    /// An event was written unclaimed: the change feed that tails the table should look.
    fresh: bool,
}

impl GroupEvents<'_> {
    /// The group was rolled back: the events its writes produced so far are gone.
    fn forget(&mut self) {
        self.handed.clear();
        self.fresh = false;
    }

    /// The lease to insert the next event under, if the local feed has room for it.
    fn claim_token(&self) -> Option<&str> {
        self.handoff
            .filter(|_| self.handed.len() < self.room)
            .map(|h| h.token.as_str())
    }
}

/// One queued write, type-erased so writes of any result type share the queue.
trait Job: Send {
    fn durability(&self) -> Durability;
    /// Runs the write in the open transaction; false if it failed. A write may run more than
    /// once (its group is run again when another write of it failed): only the last run counts.
    fn run(&mut self, conn: &Connection, options: &SqliteOptions, events: &mut GroupEvents)
    -> bool;
    /// Answers the caller once the group's fate is known.
    fn answer(self: Box<Self>, group: Result<(), &str>);
}

struct Pending<T, F> {
    op: &'static str,
    durability: Durability,
    write: F,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnMut(&Connection, &SqliteOptions) -> rusqlite::Result<T> + Send,
{
    fn durability(&self) -> Durability {
        self.durability
    }

    fn run(&mut self, conn: &Connection, options: &SqliteOptions, _: &mut GroupEvents) -> bool {
        let write = &mut self.write;
        let result = guarded(self.op, || write(conn, options));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, group: Result<(), &str>) {
        reply(self.op, self.result, group, self.reply);
    }
}

/// A ticket write that also writes its outbox events: the closure gets the lease to insert the
/// events under when the local feed can take them, and returns the events it wrote (one for a
/// ticket write, `Option`; those of a batch of order messages, `Vec`).
struct EventWrite<T, F> {
    inner: Pending<T, F>,
}

impl<T, E, F> Job for EventWrite<T, F>
where
    T: Send,
    E: IntoIterator<Item = OutboxEvent>,
    F: FnMut(&Connection, &SqliteOptions, Option<&str>) -> rusqlite::Result<(T, E)> + Send,
{
    fn durability(&self) -> Durability {
        self.inner.durability
    }

    fn run(
        &mut self,
        conn: &Connection,
        options: &SqliteOptions,
        events: &mut GroupEvents,
    ) -> bool {
        let write = &mut self.inner.write;
        let token = events.claim_token().map(str::to_owned);
        let result = guarded(self.inner.op, || write(conn, options, token.as_deref()));
        let result = result.map(|(value, written)| {
            for e in written {
                if e.locked_by.is_some() && e.locked_by == token {
                    events.handed.push(e);
                } else {
                    events.fresh = true;
                }
            }
            value
        });
        let ok = result.is_ok();
        self.inner.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, group: Result<(), &str>) {
        let Pending {
            op,
            result,
            reply: tx,
            ..
        } = self.inner;
        reply(op, result, group, tx);
    }
}

/// Runs a write; a panicking write must not take the writer thread (and every later write)
/// with it.
fn guarded<T>(
    op: &'static str,
    write: impl FnOnce() -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    match std::panic::catch_unwind(AssertUnwindSafe(write)) {
        Ok(r) => r.map_err(|e| StoreError::backend(op, e)),
        Err(_) => Err(StoreError::backend(op, "the write panicked")),
    }
}

fn reply<T>(
    op: &'static str,
    result: Option<Result<T, StoreError>>,
    group: Result<(), &str>,
    tx: oneshot::Sender<Result<T, StoreError>>,
) {
    let answer = match (result, group) {
        (Some(Ok(value)), Ok(())) => Ok(value),
        (Some(Err(e)), _) => Err(e),
        (Some(Ok(_)) | None, Err(e)) => Err(StoreError::backend(op, GroupFailed(e.to_owned()))),
        (None, Ok(())) => Err(StoreError::backend(op, "the write was not run")),
    };
    // The caller may have gone away (a cancelled request): the write stands regardless.
    let _ = tx.send(answer);
}

/// The handle the store keeps: a queue into the writer thread.
pub(super) struct Writer {
    queue: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Dropping it stops the checkpointer.
    stop_checkpoints: Mutex<Option<mpsc::Sender<()>>>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    handoff: Arc<Mutex<Option<Handoff>>>,
}

/// What the writer thread shares with the store.
struct Shared {
    options: SqliteOptions,
    handoff: Arc<Mutex<Option<Handoff>>>,
    /// Woken after a commit that wrote an unclaimed event, for a change feed tailing the table.
    committed: Arc<Notify>,
}

impl Writer {
    /// `conn` becomes the writer (its automatic checkpoints a backstop); `checkpoints` is a second
    /// connection to the same file for the checkpointer.
    pub(super) fn spawn(
        conn: Connection,
        checkpoints: Connection,
        options: SqliteOptions,
        committed: Arc<Notify>,
    ) -> std::io::Result<Self> {
        // A backstop only: the checkpointer keeps the WAL copied back, so when a long burst of
        // writes makes the WAL reach this size the writer's own checkpoint finds little left
        // to copy, and the WAL restarts from its beginning instead of growing.
        // A statement that changes many rows inside a transaction (a claim of 1,000) and a
        // savepoint keep the pages they change in a sub-journal; in memory, it does not spill
        // to a temporary file.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .and_then(|()| conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES))
            .and_then(|()| conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT))
            .map_err(std::io::Error::other)?;
        let (stop_checkpoints, stop) = mpsc::channel::<()>();
        let checkpointer = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run_checkpointer(&checkpoints, &stop))?;
        let (queue, jobs) = mpsc::channel::<Box<dyn Job>>();
        let handoff = Arc::new(Mutex::new(None));
        let shared = Shared {
            options,
            handoff: handoff.clone(),
            committed,
        };
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run_writer(conn, &jobs, &shared))?;
        Ok(Self {
            queue: Mutex::new(Some(queue)),
            thread: Mutex::new(Some(thread)),
            stop_checkpoints: Mutex::new(Some(stop_checkpoints)),
            checkpointer: Mutex::new(Some(checkpointer)),
            handoff,
        })
    }

    /// From now on, events are inserted claimed under `handoff.token` while its channel has room,
    /// and sent to it after their commit.
    pub(super) fn set_handoff(&self, handoff: Handoff) {
        if let Ok(mut h) = self.handoff.lock() {
            *h = Some(handoff);
        }
    }

    /// Queues `write` and waits for the COMMIT of the group it ran in.
    pub(super) async fn submit<T, F>(
        &self,
        op: &'static str,
        durability: Durability,
        write: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &SqliteOptions) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending {
            op,
            durability,
            write,
            result: None,
            reply,
        });
        self.queue_and_wait(op, job, answer).await
    }

    /// Queues a durable write that writes outbox events (see [`EventWrite`]).
    pub(super) async fn submit_event_write<T, E, F>(
        &self,
        op: &'static str,
        write: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        E: IntoIterator<Item = OutboxEvent> + 'static,
        F: FnMut(&Connection, &SqliteOptions, Option<&str>) -> rusqlite::Result<(T, E)>
            + Send
            + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(EventWrite {
            inner: Pending {
                op,
                durability: Durability::Durable,
                write,
                result: None,
                reply,
            },
        });
        self.queue_and_wait(op, job, answer).await
    }

    async fn queue_and_wait<T>(
        &self,
        op: &'static str,
        job: Box<dyn Job>,
        answer: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let queued = match self.queue.lock() {
            Ok(queue) => queue.as_ref().is_some_and(|q| q.send(job).is_ok()),
            Err(_) => false,
        };
        if !queued {
            return Err(StoreError::backend(
                op,
                "the SQLite writer thread has stopped",
            ));
        }
        answer
            .await
            .map_err(|_| StoreError::backend(op, "the SQLite writer thread has stopped"))?
    }
}

impl Drop for Writer {
    /// Closes the queue and waits for the thread to finish what it holds and close the
    /// connection, so the file can be reopened at once.
    fn drop(&mut self) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.take();
        }
        if let Ok(mut stop) = self.stop_checkpoints.lock() {
            stop.take();
        }
        for thread in [&self.thread, &self.checkpointer] {
            let thread = thread.lock().ok().and_then(|mut t| t.take());
            if let Some(thread) = thread
                && thread.thread().id() != std::thread::current().id()
            {
                let _ = thread.join();
            }
        }
    }
}

/// A PASSIVE checkpoint every [`CHECKPOINT_EVERY`]: it copies what is committed without blocking
/// the writer or readers.
fn run_checkpointer(conn: &Connection, stop: &mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "SQLite checkpoint failed; retrying");
        }
    }
    // Last one on the way out, so the file is whole without its WAL.
    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
}

fn run_writer(conn: Connection, jobs: &mpsc::Receiver<Box<dyn Job>>, shared: &Shared) {
    let mut synchronous: Option<&'static str> = None;
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let level = if group.iter().any(|j| j.durability() == Durability::Durable) {
            "FULL"
        } else {
            "NORMAL"
        };
        let handoff = shared
            .handoff
            .lock()
            .ok()
            .and_then(|h| h.clone())
            .filter(|h| !h.events.is_closed());
        let mut events = GroupEvents {
            room: handoff.as_ref().map_or(0, |h| h.events.capacity()),
            handoff: handoff.as_ref(),
            handed: Vec::new(),
            fresh: false,
        };
        let outcome = leave_failed_transaction(&conn)
            .and_then(|()| set_synchronous(&conn, &mut synchronous, level))
            .and_then(|()| run_group(&conn, &mut group, &shared.options, &mut events));
        let outcome = outcome.map_err(|e| crate::error_chain(&e));
        // Hand the events over before answering: when a write returns, its event is with the
        // feed (or fresh again for the tailing one).
        if outcome.is_ok() {
            let GroupEvents { handed, fresh, .. } = events;
            let unsent = hand_over(handoff.as_ref(), handed);
            if !unsent.is_empty() {
                unclaim(&conn, handoff.as_ref(), &unsent);
            }
            if fresh || !unsent.is_empty() {
                shared.committed.notify_one();
            }
        }
        for job in group {
            job.answer(outcome.as_ref().map(|_| ()).map_err(String::as_str));
        }
    }
}

/// Sends committed events to the local feed; returns the ids of those it could not take (it
/// stopped meanwhile).
fn hand_over(handoff: Option<&Handoff>, events: Vec<OutboxEvent>) -> Vec<String> {
    let Some(handoff) = handoff else {
        return Vec::new();
    };
    let mut unsent = Vec::new();
    for event in events {
        if let Err(e) = handoff.events.try_send(event) {
            let event = match e {
                tokio::sync::mpsc::error::TrySendError::Full(e)
                | tokio::sync::mpsc::error::TrySendError::Closed(e) => e,
            };
            unsent.push(event.id.to_hex());
        }
    }
    unsent
}

/// Makes events the local feed could not take fresh again (unclaimed, still reserved for a change
/// feed's first attempt), so the feed that tails the table or the sweep takes them. If even this
/// fails, their claim expires like any other.
fn unclaim(conn: &Connection, handoff: Option<&Handoff>, ids: &[String]) {
    let Some(handoff) = handoff else {
        return;
    };
    let result = (|| -> rusqlite::Result<()> {
        let mut stmt = conn.prepare_cached(
            "UPDATE events SET locked_by = NULL WHERE id = ?1 AND locked_by = ?2",
        )?;
        for id in ids {
            stmt.execute(params![id, handoff.token])?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, events = ids.len(),
            "cannot unclaim events the local change feed did not take; the sweep takes them when their claim expires");
    }
}

fn set_synchronous(
    conn: &Connection,
    current: &mut Option<&'static str>,
    level: &'static str,
) -> rusqlite::Result<()> {
    if *current != Some(level) {
        conn.pragma_update(None, "synchronous", level)?;
        *current = Some(level);
    }
    Ok(())
}

/// Runs the group in one transaction. First without savepoints: a savepoint makes SQLite copy
/// every page a write touches into its sub-journal (and the writes of a group all touch the
/// same few pages: the ends of each table and index), which cost the writer more than the
/// writes themselves, and writes almost never fail. If one does, the whole transaction is
/// rolled back and the group runs again with each write in its own savepoint, so that only the
/// failing write is undone (a write alone in its group is not run again: the rollback was all).
fn run_group(
    conn: &Connection,
    group: &mut [Box<dyn Job>],
    options: &SqliteOptions,
    events: &mut GroupEvents,
) -> rusqlite::Result<()> {
    let ran = (|| {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        if run_jobs(conn, group, options, events, Isolation::Together)? {
            return conn.execute_batch("COMMIT");
        }
        // A write failed with the others' effects around it.
        leave_failed_transaction(conn)?;
        events.forget();
        if group.len() == 1 {
            return Ok(()); // it was alone: the rollback undid just it
        }
        // Start again, one savepoint each.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        run_jobs(conn, group, options, events, Isolation::EachInSavepoint)?;
        conn.execute_batch("COMMIT")
    })();
    // Nothing of the group is kept; the error is what every caller hears.
    if ran.is_err()
        && let Err(e) = leave_failed_transaction(conn)
    {
        tracing::error!(error = %e, "SQLite writer: cannot roll back a failed group; retrying before the next one");
    }
    ran
}

/// Rolls back a transaction still open: a failed group's, and before each group, one whose
/// ROLLBACK failed (it would hold the write lock); if that fails too, the next group fails
/// with the reason and it is tried again after it.
fn leave_failed_transaction(conn: &Connection) -> rusqlite::Result<()> {
    if conn.is_autocommit() {
        return Ok(());
    }
    conn.execute_batch("ROLLBACK")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// All writes in the transaction as they are: the first failure stops the run.
    Together,
    /// Each write in a savepoint, rolled back if it fails; the others go on.
    EachInSavepoint,
}

/// Runs the writes of a group in the open transaction. `Ok(false)`: a write failed and
/// `Together` stopped there (the transaction holds partial work and must be rolled back).
fn run_jobs(
    conn: &Connection,
    group: &mut [Box<dyn Job>],
    options: &SqliteOptions,
    events: &mut GroupEvents,
    isolation: Isolation,
) -> rusqlite::Result<bool> {
    if isolation == Isolation::Together {
        return Ok(group.iter_mut().all(|job| job.run(conn, options, events)));
    }
    let mut savepoint = conn.prepare_cached("SAVEPOINT write")?;
    let mut release = conn.prepare_cached("RELEASE write")?;
    let mut rollback = conn.prepare_cached("ROLLBACK TO write")?;
    for job in group.iter_mut() {
        savepoint.execute([])?;
        if job.run(conn, options, events) {
            release.execute([])?;
        } else {
            if conn.is_autocommit() {
                // Some errors (disk full, I/O) make SQLite roll back the whole transaction.
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                    Some("a write's error rolled back the group's transaction".into()),
                ));
            }
            rollback.execute([])?;
            release.execute([])?;
        }
    }
    Ok(true)
}
