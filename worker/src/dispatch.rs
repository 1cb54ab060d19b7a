//! One step of the outbox: take the events a claim returned, apply the per-ticket order rule,
//! publish, and record each outcome through the claim. Every route to NATS ends here: the
//! change feed's batches (`FreshFeed::next`) and the sweep's claims (`sweep_once`). Loops (the
//! change feed, the sweep schedule) live elsewhere; tests drive these steps directly.

use crate::publisher::JetStreamPublisher;
use crate::publisher::{PublishError, StreamRead};
use common::domain::AttemptOutcome;
use common::outbox::{Claimed, Claimer, FailedAttempt, rules};
use common::store::{Outbox, StoreError};
use common::{EventId, OutboxEvent, TicketId};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Who claims: the worker's name (`NATS_CLIENT_ID`), written into `lockedBy`.
    pub claimer: String,
    /// How long a claim holds (`OUTBOX_LOCK_SECS`).
    pub lease: Duration,
    /// Attempts after which an event alerts a human (`ALERT_THRESHOLD`).
    pub alert_threshold: i64,
    /// Events claimed per sweep step.
    pub sweep_batch: usize,
    /// JetStream's duplicate window (`NATS_DUPLICATE_WINDOW_SECS`): past it, an event an
    /// attempt of unknown outcome may have stored is looked up in the stream before it is
    /// published again.
    pub duplicate_window: Duration,
}

/// Which path made an attempt: the change feed's first attempt or the sweep's retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    ChangeFeed,
    Sweep,
}

impl Path {
    pub fn as_str(&self) -> &'static str {
        match self {
            Path::ChangeFeed => "change_feed",
            Path::Sweep => "sweep",
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Events this step locked.
    pub claimed: usize,
    /// Acknowledged by JetStream and deleted from the outbox.
    pub published: usize,
    /// Of those, how many JetStream recognised as duplicates of an earlier publish.
    pub duplicates: usize,
    /// Publish failed: unlocked with a failure recorded.
    pub failed: usize,
    /// Left for the sweep, not a failure: an older event of the same ticket is still waiting.
    pub deferred: usize,
    /// Found in the stream after the duplicate window (an earlier attempt of unknown outcome
    /// had stored it), and completed without publishing it again.
    pub reconciled: usize,
}

impl Outcome {
    fn add(&mut self, o: Outcome) {
        self.claimed += o.claimed;
        self.published += o.published;
        self.duplicates += o.duplicates;
        self.failed += o.failed;
        self.deferred += o.deferred;
        self.reconciled += o.reconciled;
    }
}

/// Concurrent claim-publish-delete loops in one sweep: while one waits for its acks, the others
/// claim or delete, so neither NATS nor the store waits for the other.
pub const SWEEP_LANES: usize = 3;

pub struct Dispatcher {
    outbox: Arc<dyn Outbox>,
    publisher: Arc<JetStreamPublisher>,
    config: DispatchConfig,
}

impl Dispatcher {
    pub fn new(
        outbox: Arc<dyn Outbox>,
        publisher: Arc<JetStreamPublisher>,
        config: DispatchConfig,
    ) -> Self {
        Self {
            outbox,
            publisher,
            config,
        }
    }

    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// Who this dispatcher claims as, with its lease.
    pub fn claimer(&self) -> Claimer {
        Claimer::new(self.config.claimer.clone(), self.config.lease)
    }

    /// One sweep step: claims up to `sweep_batch` unlocked or lock-expired events and retries
    /// them.
    pub async fn sweep_once(&self) -> Result<Outcome, StoreError> {
        let claimed = self.claim_step().await?;
        self.dispatch(claimed, Path::Sweep).await
    }

    async fn claim_step(&self) -> Result<Claimed, StoreError> {
        Claimed::due(
            self.outbox.clone(),
            self.config.sweep_batch,
            self.claimer().lease(),
        )
        .await
    }

    /// Sweep steps, in [`SWEEP_LANES`] concurrent lanes, each until the outbox has nothing due,
    /// a step of its own saw a failure (NATS is down: wait for the next tick) or delivered
    /// nothing, `budget` is spent, or `stop` is cancelled (a step in flight finishes). While a
    /// full step publishes, the lane's next claim runs alongside it; a claim made for a step that
    /// will not run is released (not a failure). Lanes never hold the same event (claims are
    /// exclusive), and the order rule holds across them: an event waits while an older one of
    /// its ticket is held by another lane.
    pub async fn sweep(
        &self,
        budget: Duration,
        stop: &CancellationToken,
    ) -> Result<Outcome, StoreError> {
        metrics::counter!("outbox_sweeps_total").increment(1);
        let started = Instant::now();
        let lanes = (0..SWEEP_LANES).map(|_| self.sweep_lane(started, budget, stop));
        let mut total = Outcome::default();
        for lane in futures::future::join_all(lanes).await {
            total.add(lane?);
        }
        Ok(total)
    }

    async fn sweep_lane(
        &self,
        started: Instant,
        budget: Duration,
        stop: &CancellationToken,
    ) -> Result<Outcome, StoreError> {
        let mut total = Outcome::default();
        let mut next = Some(self.claim_step().await?);
        while let Some(claimed) = next.take() {
            let full = claimed.len() >= self.config.sweep_batch;
            let (step, prefetched) = if full && started.elapsed() < budget && !stop.is_cancelled() {
                let (step, prefetched) =
                    tokio::join!(self.dispatch(claimed, Path::Sweep), self.claim_step());
                (step, Some(prefetched))
            } else {
                (self.dispatch(claimed, Path::Sweep).await, None)
            };
            let prefetched = prefetched.transpose();
            let (step, prefetched) = match (step, prefetched) {
                (Ok(step), Ok(prefetched)) => (step, prefetched),
                (Err(e), Ok(Some(claimed))) => {
                    release_all(&claimed).await?;
                    return Err(e);
                }
                (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
            };
            total.add(step);
            let drained = step.claimed < self.config.sweep_batch;
            // A full batch that delivered nothing was all waiting behind older events held
            // elsewhere: claiming it again now would spin.
            let stuck = step.published == 0;
            let done = drained
                || stuck
                || step.failed > 0
                || started.elapsed() >= budget
                || stop.is_cancelled();
            match prefetched {
                Some(claimed) if done => release_all(&claimed).await?,
                prefetched => next = prefetched,
            }
        }
        Ok(total)
    }

    /// Publishes what `claimed` holds, oldest version first per ticket, and records the
    /// outcomes through it. An event whose claim has less than half of a lease left (one
    /// handed over late) goes back to the sweep instead: a sweep could take it over while it is
    /// being published.
    pub async fn dispatch(&self, mut claimed: Claimed, path: Path) -> Result<Outcome, StoreError> {
        let mut outcome = Outcome {
            claimed: claimed.len(),
            ..Default::default()
        };
        metrics::counter!("outbox_events_claimed_total", "path" => path.as_str())
            .increment(claimed.len() as u64);
        if claimed.is_empty() {
            return Ok(outcome);
        }
        let now = rules::now();
        let (events, late): (Vec<OutboxEvent>, Vec<OutboxEvent>) = claimed
            .take_events()
            .into_iter()
            .partition(|e| rules::claim_left(e, now, self.config.lease / 2));
        if !late.is_empty() {
            tracing::warn!(
                events = late.len(),
                "events waited too long to be handed over; released to the sweep"
            );
            outcome.deferred += late.len();
            claimed.release(&ids_of(&late)).await?;
        }
        let (events, absent) = self.reconcile(&claimed, events, &mut outcome).await?;
        let (mut chains, blocked) = self.order_chains(events).await?;
        if !blocked.is_empty() {
            outcome.deferred += blocked.len();
            claimed.release(&blocked).await?;
        }
        let path_label = path.as_str();
        let puback_latency = metrics::histogram!("outbox_commit_to_puback_seconds");
        // Waves: the first pending event of every ticket, then the second, ... A ticket whose
        // event failed publishes nothing more in this step.
        loop {
            let wave: Vec<OutboxEvent> =
                chains.iter_mut().filter_map(VecDeque::pop_front).collect();
            if wave.is_empty() {
                break;
            }
            let sent_at = rules::now();
            let results = self.publisher.publish_batch(&wave).await;
            metrics::counter!("outbox_publish_attempts_total", "path" => path_label)
                .increment(wave.len() as u64);
            let acked_at = chrono::Utc::now();
            let mut delivered = Vec::new();
            // By error text and kind (the metric label), the outcome, and whether a read just
            // showed the event absent.
            type Key = (String, &'static str, AttemptOutcome, bool);
            let mut failures: BTreeMap<Key, Vec<EventId>> = BTreeMap::new();
            let mut failed_tickets = HashSet::new();
            for (event, result) in wave.iter().zip(results) {
                match result {
                    Ok(ack) => {
                        if ack.duplicate {
                            outcome.duplicates += 1;
                            metrics::counter!("outbox_publish_duplicates_total", "path" => path_label)
                                .increment(1);
                            tracing::warn!(event.id = %event.id, seq = ack.sequence,
                                "JetStream dropped a duplicate: an earlier attempt got through");
                        }
                        let latency = (acked_at - event.created_at).to_std().unwrap_or_default();
                        puback_latency.record(latency.as_secs_f64());
                        delivered.push(event.id);
                    }
                    Err(error) => {
                        failed_tickets.insert(event.aggregate_id);
                        let key = (
                            error.to_string(),
                            error.kind().as_str(),
                            error.outcome(),
                            absent.contains(&event.id),
                        );
                        failures.entry(key).or_default().push(event.id);
                    }
                }
            }
            if !delivered.is_empty() {
                claimed.complete(&delivered).await?;
                outcome.published += delivered.len();
                metrics::counter!("outbox_publish_successes_total", "path" => path_label)
                    .increment(delivered.len() as u64);
            }
            for ((error, kind, attempt_outcome, was_absent), ids) in failures {
                metrics::counter!("outbox_publish_failures_total", "path" => path_label, "kind" => kind)
                    .increment(ids.len() as u64);
                tracing::warn!(path = path.as_str(), events = ids.len(), kind, %error,
                    outcome = attempt_outcome.as_str(), "publish failed");
                let attempt = FailedAttempt::new(
                    error,
                    attempt_outcome,
                    sent_at,
                    self.config.alert_threshold,
                );
                let attempt = if was_absent {
                    attempt.after_absent()
                } else {
                    attempt
                };
                self.record_failure(&claimed, &ids, &attempt, &mut outcome)
                    .await?;
            }
            if !failed_tickets.is_empty() {
                let mut waiting = Vec::new();
                for chain in chains.iter_mut() {
                    if chain
                        .front()
                        .is_some_and(|e| failed_tickets.contains(&e.aggregate_id))
                    {
                        waiting.extend(chain.drain(..).map(|e| e.id));
                    }
                }
                if !waiting.is_empty() {
                    outcome.deferred += waiting.len();
                    claimed.release(&waiting).await?;
                }
            }
        }
        if outcome.published + outcome.failed > 0 {
            tracing::debug!(path = path.as_str(), ?outcome, "dispatch step done");
        }
        Ok(outcome)
    }

    /// Records a failed attempt on `ids` and says which of them alerted.
    async fn record_failure(
        &self,
        claimed: &Claimed,
        ids: &[EventId],
        attempt: &FailedAttempt,
        outcome: &mut Outcome,
    ) -> Result<(), StoreError> {
        outcome.failed += ids.len();
        for e in claimed.fail(ids, attempt).await? {
            tracing::error!(event.id = %e.id, subject = %e.subject, aggregate = %e.aggregate_id,
                version = e.version, attempts = e.attempts, last_error = e.last_error().unwrap_or(""),
                "outbox event keeps failing to publish: a human should look (ticketing outbox show)");
        }
        Ok(())
    }

    /// Exactly once past the duplicate window: of `events`, those an attempt of unknown outcome
    /// may have stored before the window may have passed are looked up in the stream first
    /// (one read, headers only, from the earliest such attempt). Those the stream holds are
    /// completed without publishing them again; the others are returned with the rest, and
    /// their ids (known absent now) as the second value. When the stream cannot be read, they
    /// are not published (that could store them twice): a failed attempt that sent nothing.
    async fn reconcile(
        &self,
        claimed: &Claimed,
        events: Vec<OutboxEvent>,
        outcome: &mut Outcome,
    ) -> Result<(Vec<OutboxEvent>, HashSet<EventId>), StoreError> {
        let now = rules::now();
        let window = self.config.duplicate_window;
        let (check, mut events): (Vec<OutboxEvent>, Vec<OutboxEvent>) = events
            .into_iter()
            .partition(|e| rules::needs_reconciling(e, now, window));
        if check.is_empty() {
            return Ok((events, HashSet::new()));
        }
        let read = match self.read_stream_for(&check).await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(events = check.len(), error = %e,
                    "cannot read the stream to check for events an unknown attempt may have stored; not publishing them");
                let attempt = FailedAttempt::new(
                    format!("cannot check whether the stream already holds it: {e}"),
                    AttemptOutcome::NotStored,
                    now,
                    self.config.alert_threshold,
                );
                self.record_failure(claimed, &ids_of(&check), &attempt, outcome)
                    .await?;
                return Ok((events, HashSet::new()));
            }
        };
        metrics::counter!("outbox_reconcile_messages_read_total").increment(read.messages);
        let (held, absent): (Vec<OutboxEvent>, Vec<OutboxEvent>) = check
            .into_iter()
            .partition(|e| read.held.contains(&e.id.to_hex()));
        metrics::counter!("outbox_reconciled_total", "result" => "already_stored")
            .increment(held.len() as u64);
        metrics::counter!("outbox_reconciled_total", "result" => "not_stored")
            .increment(absent.len() as u64);
        tracing::info!(
            already_stored = held.len(),
            not_stored = absent.len(),
            messages_read = read.messages,
            "past the duplicate window, looked up events an unknown attempt may have stored: \
             those already in the stream are completed without publishing them again"
        );
        if !held.is_empty() {
            claimed.complete(&ids_of(&held)).await?;
            outcome.reconciled += held.len();
        }
        let absent_ids = absent.iter().map(|e| e.id).collect();
        events.extend(absent);
        Ok((events, absent_ids))
    }

    /// One read of the stream for `events`: from the earliest time any of them may have been
    /// stored, on their subject when they share one.
    async fn read_stream_for(&self, events: &[OutboxEvent]) -> Result<StreamRead, PublishError> {
        let since = rules::reconcile_from(events).unwrap_or_else(rules::now);
        let subjects: HashSet<&str> = events.iter().map(|e| e.subject.as_str()).collect();
        let subject = match subjects.iter().next() {
            Some(only) if subjects.len() == 1 => Some(*only),
            _ => None,
        };
        let ids = events.iter().map(|e| e.id.to_hex()).collect();
        self.publisher.stored_ids(since, subject, &ids).await
    }

    /// Splits claimed events into per-ticket chains that may be published now (each chain is the
    /// oldest events of its ticket still in the outbox, in version order) and events that must
    /// wait because an older event of their ticket is held by someone else.
    async fn order_chains(
        &self,
        claimed: Vec<OutboxEvent>,
    ) -> Result<(Vec<VecDeque<OutboxEvent>>, Vec<EventId>), StoreError> {
        let mut by_ticket: BTreeMap<TicketId, Vec<OutboxEvent>> = BTreeMap::new();
        for event in claimed {
            by_ticket.entry(event.aggregate_id).or_default().push(event);
        }
        let mut chains = Vec::with_capacity(by_ticket.len());
        let mut mine: HashMap<EventId, OutboxEvent> = HashMap::new();
        let mut tickets: Vec<TicketId> = Vec::new();
        for (ticket, mut events) in by_ticket {
            events.sort_by_key(|e| e.version);
            // Versions 0, 1, ..., k all held here: nothing older can be waiting anywhere, so
            // no lookup is needed (every `ticket.created` event, the bulk of a backlog).
            let from_zero = events
                .iter()
                .enumerate()
                .all(|(i, e)| i64::try_from(i).is_ok_and(|i| i == e.version));
            if from_zero {
                chains.push(VecDeque::from(events));
            } else {
                tickets.push(ticket);
                mine.extend(events.into_iter().map(|e| (e.id, e)));
            }
        }
        if tickets.is_empty() {
            return Ok((chains, Vec::new()));
        }
        let mut pending = self.outbox.pending_versions(&tickets).await?;
        pending.sort_by_key(|p| (p.aggregate_id, p.version));
        let mut looked_up: BTreeMap<TicketId, VecDeque<OutboxEvent>> = BTreeMap::new();
        let mut open: HashSet<TicketId> = tickets.iter().copied().collect();
        for p in pending {
            if !open.contains(&p.aggregate_id) {
                continue;
            }
            match mine.remove(&p.event_id) {
                Some(event) => looked_up
                    .entry(p.aggregate_id)
                    .or_default()
                    .push_back(event),
                // An older event of this ticket is not ours: everything after it waits.
                None => {
                    open.remove(&p.aggregate_id);
                }
            }
        }
        chains.extend(looked_up.into_values());
        // Whatever is left was not reachable in order (or vanished meanwhile): it waits.
        let blocked: Vec<EventId> = mine.into_keys().collect();
        Ok((chains, blocked))
    }
}

fn ids_of(events: &[OutboxEvent]) -> Vec<EventId> {
    events.iter().map(|e| e.id).collect()
}

/// Gives a claim made for a step that will not run back to the sweep (not a failure).
async fn release_all(claimed: &Claimed) -> Result<(), StoreError> {
    claimed.release(&ids_of(claimed.events())).await
}
