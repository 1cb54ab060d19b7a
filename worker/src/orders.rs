//! The orders consumer: order events in, through the inbox. One durable pull consumer
//! (`ORDERS_CONSUMER`, filter `order.>` with the singular `filter_subject` that nats-server 2.9
//! understands, explicit acks) on the orders stream (`ORDERS_STREAM`, created if missing), shared
//! by every replica. One step fetches a batch, applies it in ONE store transaction
//! ([`Inbox::apply_messages`]: the inbox decides in `common::inbox`), and only then acks each
//! message, or negatively acks it with a delay to retry it (unknown ticket). A crash between the
//! commit and the acks makes JetStream deliver the batch again; its records make it a no-op.
//!
//! The loop ([`run`]) also runs the inbox's retention sweep; tests drive [`OrdersConsumer::step`]
//! (or its parts: fetch, apply, settle) directly.

use async_nats::jetstream::{self, AckKind, consumer, stream};
use common::backoff::Backoff;
use common::error_chain;
use common::inbox::{
    InboxMessage, ORDER_CANCELLED, ORDER_CREATED, ORDERS_SUBJECTS, Outcome, RetentionTooShort,
    RetryPolicy, Verdict, check_retention, redelivery_horizon,
};
use common::store::{Inbox, InboxRetention, ParkedMessages, StoreError};
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Messages fetched (and applied in one transaction) per step.
pub const BATCH: usize = 1_000;
/// Full batches whose transactions may be queued or running while the next one is fetched: two,
/// so the store never waits for a fetch (a step acks the oldest before it fetches again).
pub const IN_FLIGHT: usize = 2;
/// How long JetStream waits for an ack before delivering a message again, for a consumer this
/// creates (an existing consumer keeps its own).
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// How long an idle step waits for a first message.
pub const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How often the loop runs the retention sweep.
pub const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// Records the retention sweep deletes per statement.
pub const RETENTION_BATCH: usize = 1_000;
/// Longest a fetch may take beyond its wait (a pull request whose answer never comes: the
/// connection dropped).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct OrdersConfig {
    /// `ORDERS_STREAM`.
    pub stream: String,
    /// `ORDERS_CONSUMER`.
    pub consumer: String,
    pub batch: usize,
    /// For a consumer this creates.
    pub ack_wait: Duration,
    /// Unknown tickets: redeliveries before parking.
    pub retry: RetryPolicy,
    /// `INBOX_RETENTION_HOURS`.
    pub retention: Duration,
}

impl OrdersConfig {
    pub fn new(stream: &str, consumer: &str, retention: Duration) -> Self {
        Self {
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            batch: BATCH,
            ack_wait: ACK_WAIT,
            retry: RetryPolicy::DEFAULT,
            retention,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    #[error("NATS is not connected")]
    NotConnected,
    #[error("cannot set up the orders stream {stream} and its consumer {consumer}: {reason}")]
    Setup {
        stream: String,
        consumer: String,
        reason: String,
    },
    #[error("fetching order messages failed: {0}")]
    Fetch(String),
    #[error("applying order messages failed")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Retention(#[from] RetentionTooShort),
}

/// Messages fetched by one step, as JetStream delivered them and as the inbox reads them.
pub struct Fetched {
    delivered: Vec<jetstream::Message>,
    messages: Arc<[InboxMessage]>,
}

impl Fetched {
    pub fn messages(&self) -> &[InboxMessage] {
        &self.messages
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Messages applied (or not) and acked in this step.
    pub settled: usize,
    by_outcome: [usize; Outcome::ALL.len()],
}

impl StepOutcome {
    fn merge(&mut self, other: StepOutcome) {
        self.settled += other.settled;
        for (total, n) in self.by_outcome.iter_mut().zip(other.by_outcome) {
            *total += n;
        }
    }

    pub fn count(&self, outcome: Outcome) -> usize {
        Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.by_outcome[i])
    }

    fn add(&mut self, outcome: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.by_outcome[i] += 1;
        }
    }
}

/// A batch whose transaction was started and not yet awaited.
struct InFlight {
    fetched: Fetched,
    applying: tokio::task::JoinHandle<Result<Vec<Verdict>, StoreError>>,
}

/// What readiness reports.
#[derive(Debug, Clone, Default)]
struct Status {
    bound: bool,
    error: Option<String>,
}

pub struct OrdersConsumer {
    client: async_nats::Client,
    js: jetstream::Context,
    inbox: Arc<dyn Inbox>,
    retention: Arc<dyn InboxRetention>,
    parked: Arc<dyn ParkedMessages>,
    config: OrdersConfig,
    consumer: tokio::sync::Mutex<Option<consumer::PullConsumer>>,
    /// Full batches whose transactions run while the next step fetches the next batch, oldest
    /// first (at most [`IN_FLIGHT`]).
    in_flight: tokio::sync::Mutex<VecDeque<InFlight>>,
    status: Mutex<Status>,
}

impl OrdersConsumer {
    /// On `client`'s connection (the publisher's: one connection per process).
    pub fn new(
        client: async_nats::Client,
        inbox: Arc<dyn Inbox>,
        retention: Arc<dyn InboxRetention>,
        parked: Arc<dyn ParkedMessages>,
        config: OrdersConfig,
    ) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client.clone());
        Self {
            client,
            js,
            inbox,
            retention,
            parked,
            config,
            consumer: tokio::sync::Mutex::new(None),
            in_flight: tokio::sync::Mutex::new(VecDeque::new()),
            status: Mutex::new(Status::default()),
        }
    }

    pub fn config(&self) -> &OrdersConfig {
        &self.config
    }

    /// The durable consumer, set up once: the stream created if missing (`order.>`, file
    /// storage), the consumer created if missing, and the retention checked against its
    /// redelivery horizon (a retention too short is an error the role stops on).
    pub async fn bind(&self) -> Result<consumer::PullConsumer, OrdersError> {
        let mut bound = self.consumer.lock().await;
        if let Some(c) = bound.as_ref() {
            return Ok(c.clone());
        }
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(OrdersError::NotConnected);
        }
        let setup = |reason: String| OrdersError::Setup {
            stream: self.config.stream.clone(),
            consumer: self.config.consumer.clone(),
            reason,
        };
        let created = self
            .js
            .get_or_create_stream(stream::Config {
                name: self.config.stream.clone(),
                subjects: vec![ORDERS_SUBJECTS.to_owned()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await;
        let stream = match created {
            Ok(s) => s,
            // Another replica may have created it between our lookup and our create.
            Err(e) => self
                .js
                .get_stream(&self.config.stream)
                .await
                .map_err(|_| setup(e.to_string()))?,
        };
        let config = consumer::pull::Config {
            durable_name: Some(self.config.consumer.clone()),
            // Singular: nats-server 2.9 ignores the plural `filter_subjects` (every subject).
            filter_subject: ORDERS_SUBJECTS.to_owned(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_ack_pending: i64::try_from(self.config.batch * 4).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let consumer = match stream
            .get_or_create_consumer(&self.config.consumer, config)
            .await
        {
            Ok(c) => c,
            Err(e) => stream
                .get_consumer(&self.config.consumer)
                .await
                .map_err(|_| setup(e.to_string()))?,
        };
        let ack_wait = consumer.cached_info().config.ack_wait;
        let window = stream.cached_info().config.duplicate_window;
        check_retention(
            self.config.retention,
            redelivery_horizon(ack_wait, window, &self.config.retry),
        )?;
        tracing::info!(stream = %self.config.stream, consumer = %self.config.consumer,
            ack_wait_secs = ack_wait.as_secs(), "orders consumer bound");
        *bound = Some(consumer.clone());
        Ok(consumer)
    }

    /// Up to a batch of messages: what is waiting now; when nothing is, the first message that
    /// arrives within `wait` and what came with it.
    pub async fn fetch(&self, wait: Duration) -> Result<Fetched, OrdersError> {
        let consumer = self.bind().await?;
        let fetched = async {
            let mut delivered = self.fetch_now(&consumer, self.config.batch).await?;
            if delivered.is_empty() && !wait.is_zero() {
                delivered = self.wait_for_one(&consumer, wait).await?;
                if !delivered.is_empty() {
                    let more = self.fetch_now(&consumer, self.config.batch - 1).await?;
                    delivered.extend(more);
                }
            }
            Ok::<_, OrdersError>(delivered)
        }
        .await;
        let delivered = match fetched {
            Ok(d) => d,
            Err(e) => {
                // The consumer may be gone (deleted, the server restarted without it): set it
                // up again on the next step.
                self.consumer.lock().await.take();
                return Err(e);
            }
        };
        let messages: Arc<[InboxMessage]> =
            delivered.iter().map(|m| self.inbox_message(m)).collect();
        let pending = delivered
            .last()
            .and_then(|m| m.info().ok())
            .map_or(0, |i| i.pending);
        metrics::gauge!("inbox_consumer_pending").set(pending as f64);
        Ok(Fetched {
            delivered,
            messages,
        })
    }

    async fn fetch_now(
        &self,
        consumer: &consumer::PullConsumer,
        max: usize,
    ) -> Result<Vec<jetstream::Message>, OrdersError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let batch = consumer
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(|e| OrdersError::Fetch(e.to_string()))?;
        collect(batch, FETCH_TIMEOUT).await
    }

    async fn wait_for_one(
        &self,
        consumer: &consumer::PullConsumer,
        wait: Duration,
    ) -> Result<Vec<jetstream::Message>, OrdersError> {
        let batch = consumer
            .batch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| OrdersError::Fetch(e.to_string()))?;
        collect(batch, wait + FETCH_TIMEOUT).await
    }

    fn inbox_message(&self, m: &jetstream::Message) -> InboxMessage {
        let msg_id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned());
        let (stream, sequence, deliveries) = match m.info() {
            Ok(i) => (i.stream.to_owned(), i.stream_sequence, i.delivered),
            Err(_) => (self.config.stream.clone(), 0, 1),
        };
        InboxMessage::new(
            msg_id.as_deref(),
            &stream,
            sequence,
            m.subject.as_str(),
            m.payload.to_vec(),
            deliveries,
        )
    }

    /// Applies what was fetched in one store transaction. Nothing is acked here.
    pub async fn apply(&self, fetched: &Fetched) -> Result<Vec<Verdict>, OrdersError> {
        let started = Instant::now();
        let verdicts = self
            .inbox
            .apply_messages(fetched.messages.clone(), &self.config.retry)
            .await?;
        metrics::histogram!("inbox_apply_seconds").record(started.elapsed().as_secs_f64());
        Ok(verdicts)
    }

    /// After the commit: acks each message, or negatively acks it with its delay (a retry);
    /// counts and logs each verdict.
    pub async fn settle(&self, fetched: Fetched, verdicts: &[Verdict]) -> StepOutcome {
        let mut outcome = StepOutcome::default();
        let mut by_label = [StepOutcome::default(); SUBJECT_LABELS.len()];
        for ((delivered, message), verdict) in fetched
            .delivered
            .iter()
            .zip(fetched.messages.iter())
            .zip(verdicts)
        {
            let ack = match verdict.retry_after() {
                Some(delay) => delivered.ack_with(AckKind::Nak(Some(delay))).await,
                None => delivered.ack().await,
            };
            if let Err(e) = ack {
                // Delivered again after the ack wait; its record makes that a no-op.
                tracing::warn!(message = %message.id, error = %e, "cannot ack an order message");
            }
            log(message, verdict);
            by_label[subject_index(&message.subject)].add(verdict.outcome());
        }
        // Counted once per batch, not per message: a labelled counter is a registry look-up.
        for (subject, counts) in SUBJECT_LABELS.iter().zip(&by_label) {
            for o in Outcome::ALL {
                let n = counts.count(o);
                if n > 0 {
                    metrics::counter!("inbox_messages_total",
                        "subject" => *subject, "outcome" => o.as_str())
                    .increment(n as u64);
                }
            }
            outcome.merge(*counts);
        }
        outcome.settled = fetched.len();
        outcome
    }

    /// Starts a batch's transaction (queued to the store behind any other).
    fn start(&self, fetched: Fetched) -> InFlight {
        let (inbox, policy) = (self.inbox.clone(), self.config.retry);
        let messages = fetched.messages.clone();
        let applying = tokio::spawn(async move {
            let started = Instant::now();
            let result = inbox.apply_messages(messages, &policy).await;
            metrics::histogram!("inbox_apply_seconds").record(started.elapsed().as_secs_f64());
            result
        });
        InFlight { fetched, applying }
    }

    /// Waits for a started batch's commit, then settles it.
    async fn finish(&self, in_flight: InFlight) -> Result<StepOutcome, OrdersError> {
        let verdicts = in_flight
            .applying
            .await
            .map_err(|e| StoreError::backend("apply_messages", e))??;
        Ok(self.settle(in_flight.fetched, &verdicts).await)
    }

    /// One step: fetches a batch (waiting up to `wait` for a first message), applies it in one
    /// transaction, and acks it after the commit. A full batch says more is waiting: its
    /// transaction is left running (up to [`IN_FLIGHT`] of them, queued to the store in fetch
    /// order), and the next step fetches the next batch and queues its transaction behind them
    /// before it waits for the oldest and acks it, so the store always has the next batch at
    /// hand. A batch that is not full settles everything in flight. A failure leaves its batch
    /// unacked: JetStream delivers it again after the ack wait.
    pub async fn step(&self, wait: Duration) -> Result<StepOutcome, OrdersError> {
        let result = async {
            let mut in_flight = self.in_flight.lock().await;
            let wait = if in_flight.is_empty() {
                wait
            } else {
                Duration::ZERO
            };
            let (full, error) = match self.fetch(wait).await {
                Ok(f) => {
                    let full = f.len() >= self.config.batch;
                    if !f.is_empty() {
                        in_flight.push_back(self.start(f));
                    }
                    (full, None)
                }
                Err(e) => (false, Some(e)),
            };
            // After a failure, everything in flight is finished: the error is the step's answer.
            let keep = if full && error.is_none() {
                IN_FLIGHT
            } else {
                0
            };
            self.finish_down_to(&mut in_flight, keep, error).await
        }
        .await;
        self.record_status(&result);
        result
    }

    /// Finishes the batches a step left running (shutdown): their commits, then their acks.
    pub async fn finish_in_flight(&self) -> Result<StepOutcome, OrdersError> {
        let mut in_flight = self.in_flight.lock().await;
        self.finish_down_to(&mut in_flight, 0, None).await
    }

    /// Finishes batches in flight, oldest first, until `keep` are left; the first error (or
    /// `error`, one from before) after all of them.
    async fn finish_down_to(
        &self,
        in_flight: &mut VecDeque<InFlight>,
        keep: usize,
        mut error: Option<OrdersError>,
    ) -> Result<StepOutcome, OrdersError> {
        let mut outcome = StepOutcome::default();
        while in_flight.len() > keep {
            let Some(oldest) = in_flight.pop_front() else {
                break;
            };
            match self.finish(oldest).await {
                Ok(o) => outcome.merge(o),
                Err(e) => error = error.or(Some(e)),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }

    fn record_status(&self, result: &Result<StepOutcome, OrdersError>) {
        if let Ok(mut status) = self.status.lock() {
            match result {
                Ok(_) => {
                    *status = Status {
                        bound: true,
                        error: None,
                    }
                }
                Err(e) => status.error = Some(error_chain(e)),
            }
        }
    }

    /// The retention sweep: settled records older than the retention, deleted in bounded
    /// batches until none is left. Returns how many.
    pub async fn expire(&self) -> Result<u64, StoreError> {
        let retention =
            chrono::Duration::from_std(self.config.retention).unwrap_or(chrono::Duration::MAX);
        let before = chrono::Utc::now() - retention;
        let mut total = 0;
        loop {
            let n = self.retention.expire_inbox(before, RETENTION_BATCH).await?;
            total += n;
            if n < RETENTION_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Bound, and the last step went through: `(up, why not)`.
    pub fn readiness(&self) -> (bool, Option<String>) {
        match self.status.lock() {
            Ok(s) if s.bound && s.error.is_none() => (true, None),
            Ok(s) => (
                false,
                Some(
                    s.error
                        .clone()
                        .unwrap_or_else(|| "not bound to the orders stream yet".into()),
                ),
            ),
            Err(_) => (false, Some("status unavailable".into())),
        }
    }

    /// The parked gauge (`inbox_parked_messages`), read from the store.
    pub async fn refresh_gauges(&self) -> Result<(), StoreError> {
        let parked = self.parked.count_parked().await?;
        metrics::gauge!("inbox_parked_messages").set(parked as f64);
        Ok(())
    }
}

/// The messages of a pull request, within `timeout`.
async fn collect(
    mut batch: consumer::pull::Batch,
    timeout: Duration,
) -> Result<Vec<jetstream::Message>, OrdersError> {
    let all = async {
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            out.push(m.map_err(|e| OrdersError::Fetch(e.to_string()))?);
        }
        Ok(out)
    };
    tokio::time::timeout(timeout, all)
        .await
        .map_err(|_| OrdersError::Fetch(format!("no answer within {timeout:?}")))?
}

/// Every value of the message metrics' `subject` label: the two applied subjects, or `other`
/// (any `order.*` subject could come in: the label's values stay few).
const SUBJECT_LABELS: [&str; 3] = [ORDER_CREATED, ORDER_CANCELLED, "other"];

/// Where `subject`'s label is in [`SUBJECT_LABELS`].
fn subject_index(subject: &str) -> usize {
    match subject {
        ORDER_CREATED => 0,
        ORDER_CANCELLED => 1,
        _ => 2,
    }
}

fn log(message: &InboxMessage, verdict: &Verdict) {
    let id = message.id.as_str();
    match verdict {
        Verdict::Applied {
            ticket,
            order,
            version,
            reserved,
        } => {
            tracing::debug!(message = id, %ticket, order, version, reserved, "order message applied")
        }
        Verdict::Duplicate => {
            tracing::info!(
                message = id,
                "order message seen before: acked, nothing changed"
            )
        }
        Verdict::NoOp {
            ticket,
            order,
            reason,
        } => tracing::info!(message = id, %ticket, order, reason, "order message changed nothing"),
        Verdict::Conflict {
            ticket,
            order,
            holder,
        } => tracing::warn!(message = id, %ticket, order, holder,
            "order.created for a ticket another order holds: not applied"),
        Verdict::Retry { after, reason } => tracing::warn!(
            message = id,
            reason,
            deliveries = message.deliveries,
            retry_in_ms = after.as_millis() as u64,
            "order message cannot be applied yet; retrying"
        ),
        Verdict::Parked { reason } => tracing::error!(message = id, subject = %message.subject,
            reason, deliveries = message.deliveries,
            "order message parked: `ticketing inbox show` / `replay`"),
        Verdict::Ignored => {
            tracing::debug!(message = id, subject = %message.subject, "order subject ignored")
        }
    }
}

/// Steps until `stop`, with the retention sweep every [`RETENTION_EVERY`]. A step that fails
/// (NATS or the store away) is retried after a doubling wait; a retention too short for the
/// consumer's redelivery horizon stops the role. A step in flight finishes (commit and acks)
/// before it returns.
pub async fn run(consumer: Arc<OrdersConsumer>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut next_sweep = Instant::now();
    tracing::info!(stream = %consumer.config.stream, consumer = %consumer.config.consumer,
        "orders consumer started");
    while !stop.is_cancelled() {
        if Instant::now() >= next_sweep {
            next_sweep = Instant::now() + RETENTION_EVERY;
            match consumer.expire().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "inbox records past their retention deleted"),
                Err(e) => tracing::warn!(error = %error_chain(&e), "inbox retention sweep failed"),
            }
        }
        match consumer.step(IDLE_WAIT).await {
            Ok(_) => backoff.reset(),
            Err(OrdersError::Retention(e)) => return Err(e.into()),
            Err(e) => {
                if matches!(e, OrdersError::NotConnected) {
                    // The connection's own events are logged by the publisher.
                    tracing::debug!("orders consumer waiting for NATS");
                } else {
                    tracing::error!(error = %error_chain(&e), "orders consumer step failed; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
    if let Err(e) = consumer.finish_in_flight().await {
        tracing::error!(error = %error_chain(&e), "orders consumer: the last batch failed; JetStream delivers it again");
    }
    tracing::info!("orders consumer stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_subjects_stay_few() {
        let label = |subject| SUBJECT_LABELS[subject_index(subject)];
        assert_eq!(label("order.created"), "order.created");
        assert_eq!(label("order.cancelled"), "order.cancelled");
        assert_eq!(label("order.whatever.else"), "other");
    }

    #[test]
    fn a_step_counts_by_outcome() {
        let mut o = StepOutcome::default();
        o.add(Outcome::Applied);
        o.add(Outcome::Applied);
        o.add(Outcome::Parked);
        assert_eq!(o.count(Outcome::Applied), 2);
        assert_eq!(o.count(Outcome::Parked), 1);
        assert_eq!(o.count(Outcome::Duplicate), 0);
    }
}
