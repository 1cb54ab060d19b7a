//! The inbox's decisions, as plain functions: what an order message is (`classify`), what it
//! does to its ticket (`effect`: reserve, release, no-op, conflict), when a message that cannot
//! be applied is retried and when it is parked (`RetryPolicy`), a message's identity
//! (`message_key`), and, for a whole batch, what the store writes in its one transaction
//! (`Batch::plan`). Both stores read what a batch needs ([`Batch::reads`]), hand it to
//! [`Batch::plan`] and store what it returns; the tests here run on every build, whatever store a
//! machine can run.
//!
//! Exactly once: every message applied (or parked) leaves an `inbox` record keyed by its identity,
//! written in the transaction that changes the ticket, so a redelivered message finds its record
//! and changes nothing. The effect itself is idempotent too (a `created` for the order already
//! holding the ticket, or a `cancelled` for an order that does not hold it, changes nothing), and
//! an applied `cancelled` is remembered by its record, so a `created` of a cancelled order that
//! arrives after it is a no-op: the cancelled one wins whatever the delivery order.

use crate::domain::{Ticket, TicketId};
use crate::outbox::{Alert, AlertKind};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The subjects the inbox applies; any other `order.*` subject is acked and counted as ignored.
pub const ORDER_CREATED: &str = "order.created";
pub const ORDER_CANCELLED: &str = "order.cancelled";
/// What the orders consumer filters on (`filter_subject`, singular: nats-server 2.9 ignores the
/// plural `filter_subjects`), and what the orders stream captures when it creates it.
pub const ORDERS_SUBJECTS: &str = "order.>";
/// Longest order id accepted (it is stored on the ticket and published in its events).
pub const ORDER_ID_MAX: usize = 256;

/// One message as the consumer received it from JetStream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    /// [`message_key`]: the inbox record's id.
    pub id: String,
    pub stream: String,
    pub sequence: u64,
    pub subject: String,
    /// The payload as received (kept whole when the message is parked).
    pub payload: Vec<u8>,
    /// JetStream's delivery count, this delivery included (1 the first time).
    pub deliveries: i64,
}

impl InboxMessage {
    pub fn new(
        msg_id: Option<&str>,
        stream: &str,
        sequence: u64,
        subject: &str,
        payload: Vec<u8>,
        deliveries: i64,
    ) -> Self {
        Self {
            id: message_key(msg_id, stream, sequence),
            stream: stream.to_owned(),
            sequence,
            subject: subject.to_owned(),
            payload,
            deliveries,
        }
    }
}

/// A message's identity: its `Nats-Msg-Id` when it has one (the orders service publishing the
/// same event again gives it the same id), otherwise `{stream}:{sequence}` (a redelivery of
/// the same stored message).
pub fn message_key(msg_id: Option<&str>, stream: &str, sequence: u64) -> String {
    match msg_id.map(str::trim).filter(|id| !id.is_empty()) {
        Some(id) => id.to_owned(),
        None => format!("{stream}:{sequence}"),
    }
}

/// An order event the inbox applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    /// `order.created`: the order reserves the ticket.
    Created {
        order_id: String,
        ticket_id: TicketId,
    },
    /// `order.cancelled`: the order lets the ticket go.
    Cancelled {
        order_id: String,
        ticket_id: TicketId,
    },
}

impl OrderEvent {
    pub fn order_id(&self) -> &str {
        match self {
            OrderEvent::Created { order_id, .. } | OrderEvent::Cancelled { order_id, .. } => {
                order_id
            }
        }
    }

    pub fn ticket_id(&self) -> TicketId {
        match self {
            OrderEvent::Created { ticket_id, .. } | OrderEvent::Cancelled { ticket_id, .. } => {
                *ticket_id
            }
        }
    }
}

/// What a message is, from its subject and payload alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    Order(OrderEvent),
    /// A subject the inbox applies with a payload it cannot read: parked at once, with why.
    Malformed(String),
    /// Another subject: acked and counted as ignored, nothing recorded.
    Other,
}

/// `order.created` as the course's orders service sends it. Extra fields are allowed.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // every field is checked for its presence and type; only some are used
struct CreatedPayload<'a> {
    // Borrowed from the payload where they hold no escapes: read, checked, not kept.
    #[serde(borrow)]
    id: Cow<'a, str>,
    version: i64,
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    expires_at: Cow<'a, str>,
    #[serde(borrow)]
    ticket: CreatedTicket<'a>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct CreatedTicket<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    price: f64,
}

/// `order.cancelled` as the course's orders service sends it.
#[derive(Deserialize)]
#[allow(dead_code)]
struct CancelledPayload<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    version: i64,
    #[serde(borrow)]
    ticket: CancelledTicket<'a>,
}

#[derive(Deserialize)]
struct CancelledTicket<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
}

/// Reads a message: its subject picks the shape its payload must have.
pub fn classify(subject: &str, payload: &[u8]) -> Classified {
    let parsed = match subject {
        ORDER_CREATED => serde_json::from_slice::<CreatedPayload>(payload)
            .map(|p| order_event(&p.id, &p.ticket.id, true)),
        ORDER_CANCELLED => serde_json::from_slice::<CancelledPayload>(payload)
            .map(|p| order_event(&p.id, &p.ticket.id, false)),
        _ => return Classified::Other,
    };
    match parsed {
        Ok(Ok(order)) => Classified::Order(order),
        Ok(Err(reason)) => Classified::Malformed(reason),
        Err(e) => Classified::Malformed(format!("not an {subject} payload: {e}")),
    }
}

fn order_event(order_id: &str, ticket: &str, created: bool) -> Result<OrderEvent, String> {
    if order_id.trim().is_empty() || order_id.chars().count() > ORDER_ID_MAX {
        return Err(format!(
            "the order id must be 1 to {ORDER_ID_MAX} characters, not {order_id:?}"
        ));
    }
    let ticket_id = TicketId::parse(ticket)
        .ok_or_else(|| format!("ticket.id is not a ticket id (24 hex characters): {ticket:?}"))?;
    let order_id = order_id.to_owned();
    Ok(if created {
        OrderEvent::Created {
            order_id,
            ticket_id,
        }
    } else {
        OrderEvent::Cancelled {
            order_id,
            ticket_id,
        }
    })
}

/// What an order event does to its ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `orderId` set to this order.
    Reserve(String),
    /// `orderId` removed.
    Release,
    /// Nothing to change, and nothing wrong: why.
    NoOp(String),
    /// A `created` for an order while another order holds the ticket: nothing changes.
    Conflict { holder: String },
}

/// The rule: `created` reserves an unreserved ticket (unless its order was already cancelled);
/// `cancelled` releases the ticket its order holds. Anything else changes nothing.
pub fn effect(order: &OrderEvent, ticket: &Ticket, order_cancelled: bool) -> Effect {
    match order {
        OrderEvent::Created { order_id, .. } => match &ticket.order_id {
            _ if order_cancelled => Effect::NoOp("the order was already cancelled".into()),
            Some(holder) if holder == order_id => {
                Effect::NoOp("the order already holds the ticket".into())
            }
            Some(holder) => Effect::Conflict {
                holder: holder.clone(),
            },
            None => Effect::Reserve(order_id.clone()),
        },
        OrderEvent::Cancelled { order_id, .. } => match &ticket.order_id {
            Some(holder) if holder == order_id => Effect::Release,
            Some(_) => Effect::NoOp("another order holds the ticket".into()),
            None => Effect::NoOp("the ticket is not reserved".into()),
        },
    }
}

/// How a message whose ticket is unknown is retried before it is parked (redelivered by
/// JetStream after a delay: a negative acknowledgement with that delay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Deliveries before parking (1: park at once).
    pub deliveries: i64,
    /// Wait before the second delivery; doubles after each, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The service's: 5 deliveries, 1, 2, 4 and 8 s apart.
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        deliveries: 5,
        first_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(30),
    };

    /// An operator's replay: applied now or parked again, no retry.
    pub const PARK_AT_ONCE: RetryPolicy = RetryPolicy {
        deliveries: 1,
        first_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
    };

    /// After delivery number `deliveries` found no ticket: the wait before the next delivery,
    /// or `None` when it is the last one (park it).
    pub fn retry_after(&self, deliveries: i64) -> Option<Duration> {
        if deliveries >= self.deliveries {
            return None;
        }
        let doublings = u32::try_from(deliveries.max(1) - 1)
            .unwrap_or(u32::MAX)
            .min(31);
        Some(
            self.first_delay
                .saturating_mul(1 << doublings)
                .min(self.max_delay),
        )
    }

    /// Every wait between the first delivery and the last.
    pub fn total_delay(&self) -> Duration {
        (1..self.deliveries)
            .filter_map(|d| self.retry_after(d))
            .fold(Duration::ZERO, Duration::saturating_add)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How long after a message's first delivery the inbox may still see it again: JetStream
/// redelivers a message that was not acknowledged `ack_wait` after each delivery (a worker that
/// died between its commit and its ack), a retried one after its delays, and the orders service
/// may publish an event again, dropped by JetStream within its stream's duplicate window.
pub fn redelivery_horizon(
    ack_wait: Duration,
    duplicate_window: Duration,
    policy: &RetryPolicy,
) -> Duration {
    let deliveries = u32::try_from(policy.deliveries.max(1)).unwrap_or(u32::MAX);
    let redeliveries = ack_wait
        .saturating_mul(deliveries)
        .saturating_add(policy.total_delay());
    redeliveries.max(duplicate_window)
}

/// `INBOX_RETENTION_HOURS` too short: a record could expire before its message is seen again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "INBOX_RETENTION_HOURS ({retention_hours} h) must be longer than the orders consumer's \
     redelivery horizon ({horizon_secs} s: its ack wait for each delivery, the retry delays, and \
     the orders stream's duplicate window): a message seen again after its record expired would \
     be applied twice"
)]
pub struct RetentionTooShort {
    pub retention_hours: u64,
    pub horizon_secs: u64,
}

/// The retention is longer than the redelivery horizon, checked when the consumer starts.
pub fn check_retention(retention: Duration, horizon: Duration) -> Result<(), RetentionTooShort> {
    if retention > horizon {
        return Ok(());
    }
    Err(RetentionTooShort {
        retention_hours: retention.as_secs() / 3600,
        horizon_secs: horizon.as_secs(),
    })
}

/// What became of a message, as recorded and as counted (`inbox_messages_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The ticket changed (reserved or released), with its `ticket.updated` event.
    Applied,
    /// Its record was already there: a redelivery, or the same event published again.
    Duplicate,
    /// Applied, and it changed nothing (see [`effect`]).
    NoOp,
    /// A `created` while another order holds the ticket: nothing changed.
    Conflict,
    /// Not applied now: redelivered after a delay (unknown ticket).
    Retried,
    /// Cannot be applied: kept with its raw message and why, for an operator.
    Parked,
    /// Not a subject the inbox applies.
    Ignored,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Applied,
        Outcome::Duplicate,
        Outcome::NoOp,
        Outcome::Conflict,
        Outcome::Retried,
        Outcome::Parked,
        Outcome::Ignored,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::NoOp => "no_op",
            Outcome::Conflict => "conflict",
            Outcome::Retried => "retried",
            Outcome::Parked => "parked",
            Outcome::Ignored => "ignored",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the consumer does with one message after the batch's commit, and what it logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Acked: the ticket changed to `version`, reserved by `order` or released.
    Applied {
        ticket: TicketId,
        order: String,
        version: i64,
        reserved: bool,
    },
    /// Acked: recorded before.
    Duplicate,
    /// Acked: nothing to change.
    NoOp {
        ticket: TicketId,
        order: String,
        reason: String,
    },
    /// Acked: `order` wanted the ticket `holder` holds. Logged at warn with both ids.
    Conflict {
        ticket: TicketId,
        order: String,
        holder: String,
    },
    /// Negatively acknowledged: JetStream redelivers it after `after`.
    Retry { after: Duration, reason: String },
    /// Acked, kept as parked, an alert queued.
    Parked { reason: String },
    /// Acked: not an order subject the inbox applies.
    Ignored,
}

impl Verdict {
    pub fn outcome(&self) -> Outcome {
        match self {
            Verdict::Applied { .. } => Outcome::Applied,
            Verdict::Duplicate => Outcome::Duplicate,
            Verdict::NoOp { .. } => Outcome::NoOp,
            Verdict::Conflict { .. } => Outcome::Conflict,
            Verdict::Retry { .. } => Outcome::Retried,
            Verdict::Parked { .. } => Outcome::Parked,
            Verdict::Ignored => Outcome::Ignored,
        }
    }

    /// The delay of a negative acknowledgement, for a message to retry.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Verdict::Retry { after, .. } => Some(*after),
            _ => None,
        }
    }
}

/// A row of `inbox` / a document of the `inbox` collection: a message applied, or parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRecord {
    /// [`message_key`].
    pub id: String,
    pub subject: String,
    pub stream: String,
    pub sequence: u64,
    /// `None` when the payload could not be read.
    pub order_id: Option<String>,
    pub ticket_id: Option<TicketId>,
    /// Applied, no-op, conflict or parked.
    pub outcome: Outcome,
    /// Why it changed nothing, or why it is parked.
    pub reason: Option<String>,
    pub deliveries: i64,
    /// The raw message, kept while it is parked (a replay applies it again); empty once settled
    /// (what it did is the record: order, ticket, outcome).
    pub payload: Vec<u8>,
    pub received_at: DateTime<Utc>,
    /// When it was settled; `None` while parked, so the retention sweep never takes a parked
    /// message (an operator replays or drops it).
    pub done_at: Option<DateTime<Utc>>,
}

impl InboxRecord {
    pub fn is_parked(&self) -> bool {
        self.outcome == Outcome::Parked
    }

    /// The payload as text (lossy for bytes that are not UTF-8).
    pub fn payload_text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The message again, as the consumer received it (an operator's replay).
    pub fn message(&self) -> InboxMessage {
        InboxMessage {
            id: self.id.clone(),
            stream: self.stream.clone(),
            sequence: self.sequence,
            subject: self.subject.clone(),
            payload: self.payload.clone(),
            deliveries: self.deliveries,
        }
    }

    /// What people and alerts are shown of a record (without its payload).
    pub fn snapshot(&self) -> ParkedMessage {
        ParkedMessage {
            id: self.id.clone(),
            subject: self.subject.clone(),
            stream: self.stream.clone(),
            sequence: self.sequence,
            order_id: self.order_id.clone(),
            ticket_id: self.ticket_id.map(|t| t.to_hex()),
            outcome: self.outcome,
            reason: self.reason.clone(),
            deliveries: self.deliveries,
            received_at: self.received_at,
        }
    }

    /// The whole record for `ticketing inbox show`: the snapshot, `doneAt` and, while it is
    /// parked, the payload (as JSON when it is JSON, else as text).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.snapshot()).unwrap_or(serde_json::Value::Null);
        v["doneAt"] = serde_json::json!(self.done_at);
        if self.is_parked() {
            v["payload"] = serde_json::from_slice(&self.payload)
                .unwrap_or_else(|_| serde_json::Value::String(self.payload_text()));
        }
        v
    }
}

/// An inbox record as people and alerts see it: everything but the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParkedMessage {
    pub id: String,
    pub subject: String,
    pub stream: String,
    pub sequence: u64,
    pub order_id: Option<String>,
    pub ticket_id: Option<String>,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub deliveries: i64,
    pub received_at: DateTime<Utc>,
}

/// The alert a parked message queues, in the transaction that parks it.
pub fn parked_alert(record: &InboxRecord, now: DateTime<Utc>) -> Alert {
    Alert::about_message(AlertKind::Parked, record.snapshot(), now)
}

/// A ticket write of a batch: `ticket` as it must be stored, from `expected_version`.
#[derive(Debug, Clone, PartialEq)]
pub struct TicketChange {
    pub expected_version: i64,
    /// The ticket after the change (`version` = `expected_version` + 1).
    pub ticket: Ticket,
}

/// What a store reads before planning a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    /// Of these message ids, which have a record already.
    pub message_ids: Vec<String>,
    /// The tickets the orders are about.
    pub tickets: Vec<TicketId>,
    /// Of these orders (those of `created` messages), which have an applied `cancelled` record.
    pub created_orders: Vec<String>,
}

/// What the store holds, as far as a batch cares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Known {
    pub recorded: HashSet<String>,
    pub tickets: HashMap<TicketId, Ticket>,
    /// Orders whose `cancelled` was applied (not parked).
    pub cancelled_orders: HashSet<String>,
}

/// What one batch writes in its transaction, and the verdict of each message, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub verdicts: Vec<Verdict>,
    /// In order; a ticket may change more than once in a batch (each from the previous version).
    pub changes: Vec<TicketChange>,
    pub records: Vec<InboxRecord>,
    pub alerts: Vec<Alert>,
}

/// Messages fetched together, read once (a store builds it before its transaction, which may
/// run more than once). The messages are shared, not copied: the consumer keeps them to ack.
#[derive(Debug, Clone)]
pub struct Batch {
    messages: Arc<[InboxMessage]>,
    kinds: Vec<Classified>,
}

impl Batch {
    pub fn new(messages: impl Into<Arc<[InboxMessage]>>) -> Self {
        let messages = messages.into();
        let kinds = messages
            .iter()
            .map(|m| classify(&m.subject, &m.payload))
            .collect();
        Self { messages, kinds }
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    fn items(&self) -> impl Iterator<Item = (&InboxMessage, &Classified)> {
        self.messages.iter().zip(&self.kinds)
    }

    /// What the store must read before [`Batch::plan`].
    pub fn reads(&self) -> Reads {
        let mut reads = Reads::default();
        for (message, kind) in self.items() {
            if *kind == Classified::Other {
                continue;
            }
            reads.message_ids.push(message.id.clone());
            if let Classified::Order(order) = kind {
                reads.tickets.push(order.ticket_id());
                if let OrderEvent::Created { order_id, .. } = order {
                    reads.created_orders.push(order_id.clone());
                }
            }
        }
        for list in [&mut reads.message_ids, &mut reads.created_orders] {
            list.sort();
            list.dedup();
        }
        reads.tickets.sort();
        reads.tickets.dedup();
        reads
    }

    /// Decides every message in order, each seeing what the ones before it did (a `created`
    /// and its `cancelled` in one batch, the same message twice).
    pub fn plan(&self, mut known: Known, policy: &RetryPolicy, now: DateTime<Utc>) -> Plan {
        let mut plan = Plan::default();
        for (message, kind) in self.items() {
            let verdict = match kind {
                Classified::Other => Verdict::Ignored,
                _ if known.recorded.contains(&message.id) => Verdict::Duplicate,
                Classified::Malformed(reason) => park(&mut plan, message, None, reason, now),
                Classified::Order(order) => {
                    decide(&mut plan, &mut known, message, order, policy, now)
                }
            };
            if !matches!(
                verdict,
                Verdict::Ignored | Verdict::Duplicate | Verdict::Retry { .. }
            ) {
                known.recorded.insert(message.id.clone());
            }
            plan.verdicts.push(verdict);
        }
        plan
    }
}

fn decide(
    plan: &mut Plan,
    known: &mut Known,
    message: &InboxMessage,
    order: &OrderEvent,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Verdict {
    let ticket_id = order.ticket_id();
    let Some(ticket) = known.tickets.get(&ticket_id) else {
        let reason = format!("unknown ticket {ticket_id}");
        return match policy.retry_after(message.deliveries) {
            Some(after) => Verdict::Retry { after, reason },
            None => {
                let reason = format!("{reason} (after {} deliveries)", message.deliveries);
                park(plan, message, Some(order), &reason, now)
            }
        };
    };
    let order_id = order.order_id().to_owned();
    let cancelled = known.cancelled_orders.contains(&order_id);
    let (verdict, outcome, reason) = match effect(order, ticket, cancelled) {
        change @ (Effect::Reserve(_) | Effect::Release) => {
            let mut after = ticket.clone();
            after.version += 1;
            after.order_id = match change {
                Effect::Reserve(o) => Some(o),
                _ => None,
            };
            let verdict = Verdict::Applied {
                ticket: ticket_id,
                order: order_id.clone(),
                version: after.version,
                reserved: after.order_id.is_some(),
            };
            plan.changes.push(TicketChange {
                expected_version: ticket.version,
                ticket: after.clone(),
            });
            known.tickets.insert(ticket_id, after);
            (verdict, Outcome::Applied, None)
        }
        Effect::NoOp(reason) => {
            let verdict = Verdict::NoOp {
                ticket: ticket_id,
                order: order_id.clone(),
                reason: reason.clone(),
            };
            (verdict, Outcome::NoOp, Some(reason))
        }
        Effect::Conflict { holder } => {
            let reason = format!("order {holder} holds the ticket");
            let verdict = Verdict::Conflict {
                ticket: ticket_id,
                order: order_id.clone(),
                holder,
            };
            (verdict, Outcome::Conflict, Some(reason))
        }
    };
    if matches!(order, OrderEvent::Cancelled { .. }) {
        known.cancelled_orders.insert(order_id);
    }
    plan.records
        .push(record(message, Some(order), outcome, reason, now));
    verdict
}

fn park(
    plan: &mut Plan,
    message: &InboxMessage,
    order: Option<&OrderEvent>,
    reason: &str,
    now: DateTime<Utc>,
) -> Verdict {
    let record = record(
        message,
        order,
        Outcome::Parked,
        Some(reason.to_owned()),
        now,
    );
    plan.alerts.push(parked_alert(&record, now));
    plan.records.push(record);
    Verdict::Parked {
        reason: reason.to_owned(),
    }
}

fn record(
    message: &InboxMessage,
    order: Option<&OrderEvent>,
    outcome: Outcome,
    reason: Option<String>,
    now: DateTime<Utc>,
) -> InboxRecord {
    InboxRecord {
        id: message.id.clone(),
        subject: message.subject.clone(),
        stream: message.stream.clone(),
        sequence: message.sequence,
        order_id: order.map(|o| o.order_id().to_owned()),
        ticket_id: order.map(OrderEvent::ticket_id),
        outcome,
        reason,
        deliveries: message.deliveries,
        payload: if outcome == Outcome::Parked {
            message.payload.clone()
        } else {
            Vec::new()
        },
        received_at: now,
        done_at: (outcome != Outcome::Parked).then_some(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::rules::now;
    use serde_json::json;

    fn ticket(order: Option<&str>) -> Ticket {
        Ticket {
            id: TicketId::new(),
            title: "concert".into(),
            price: 20.0,
            user_id: "u1".into(),
            version: 0,
            order_id: order.map(str::to_owned),
        }
    }

    fn created(order: &str, ticket: TicketId) -> Vec<u8> {
        json!({"id": order, "version": 0, "status": "created", "userId": "buyer",
               "expiresAt": "2026-12-01T10:15:00.000Z",
               "ticket": {"id": ticket.to_hex(), "price": 20}})
        .to_string()
        .into_bytes()
    }

    fn cancelled(order: &str, ticket: TicketId) -> Vec<u8> {
        json!({"id": order, "version": 1, "ticket": {"id": ticket.to_hex()}})
            .to_string()
            .into_bytes()
    }

    fn message(id: &str, subject: &str, payload: Vec<u8>) -> InboxMessage {
        InboxMessage::new(Some(id), "orders", 1, subject, payload, 1)
    }

    fn known_with(tickets: &[&Ticket]) -> Known {
        Known {
            tickets: tickets.iter().map(|t| (t.id, (*t).clone())).collect(),
            ..Known::default()
        }
    }

    #[test]
    fn the_identity_is_the_msg_id_or_the_stream_and_sequence() {
        assert_eq!(
            message_key(Some("order-1:created"), "orders", 7),
            "order-1:created"
        );
        assert_eq!(message_key(None, "orders", 7), "orders:7");
        assert_eq!(message_key(Some("  "), "orders", 7), "orders:7");
    }

    #[test]
    fn the_course_payloads_are_read_and_anything_else_is_malformed() {
        let t = TicketId::new();
        assert_eq!(
            classify(ORDER_CREATED, &created("o1", t)),
            Classified::Order(OrderEvent::Created {
                order_id: "o1".into(),
                ticket_id: t
            })
        );
        assert_eq!(
            classify(ORDER_CANCELLED, &cancelled("o1", t)),
            Classified::Order(OrderEvent::Cancelled {
                order_id: "o1".into(),
                ticket_id: t
            })
        );
        assert_eq!(classify("order.updated", b"whatever"), Classified::Other);
        let bad = [
            (
                ORDER_CREATED,
                b"not json".to_vec(),
                "not an order.created payload",
            ),
            (ORDER_CREATED, cancelled("o1", t), "missing field"),
            (
                ORDER_CANCELLED,
                br#"{"id":"o1","version":1,"ticket":{}}"#.to_vec(),
                "`id`",
            ),
            (
                ORDER_CANCELLED,
                cancelled("o1", TicketId::new()).repeat(2),
                "trailing",
            ),
            (ORDER_CANCELLED, cancelled("", t), "order id"),
            (
                ORDER_CANCELLED,
                cancelled(&"x".repeat(ORDER_ID_MAX + 1), t),
                "order id",
            ),
            (
                ORDER_CANCELLED,
                br#"{"id":"o1","version":1,"ticket":{"id":"abc"}}"#.to_vec(),
                "ticket.id is not a ticket id",
            ),
            (
                ORDER_CREATED,
                vec![0xff, 0xfe],
                "not an order.created payload",
            ),
        ];
        for (subject, payload, why) in bad {
            match classify(subject, &payload) {
                Classified::Malformed(reason) => assert!(reason.contains(why), "{reason}"),
                other => panic!(
                    "{subject} {:?}: {other:?}",
                    String::from_utf8_lossy(&payload)
                ),
            }
        }
    }

    #[test]
    fn created_reserves_cancelled_releases_and_the_rest_changes_nothing() {
        let free = ticket(None);
        let held = ticket(Some("A"));
        let created = |o: &str| OrderEvent::Created {
            order_id: o.into(),
            ticket_id: free.id,
        };
        let cancelled = |o: &str| OrderEvent::Cancelled {
            order_id: o.into(),
            ticket_id: free.id,
        };
        assert_eq!(
            effect(&created("A"), &free, false),
            Effect::Reserve("A".into())
        );
        assert!(matches!(
            effect(&created("A"), &held, false),
            Effect::NoOp(_)
        ));
        assert_eq!(
            effect(&created("B"), &held, false),
            Effect::Conflict { holder: "A".into() }
        );
        assert!(
            matches!(effect(&created("A"), &free, true), Effect::NoOp(_)),
            "cancelled wins"
        );
        assert_eq!(effect(&cancelled("A"), &held, false), Effect::Release);
        assert!(matches!(
            effect(&cancelled("B"), &held, false),
            Effect::NoOp(_)
        ));
        assert!(matches!(
            effect(&cancelled("A"), &free, false),
            Effect::NoOp(_)
        ));
    }

    #[test]
    fn an_unknown_ticket_is_retried_with_doubling_waits_then_parked() {
        let p = RetryPolicy::DEFAULT;
        let waits: Vec<_> = (1..=5).map(|d| p.retry_after(d)).collect();
        let s = Duration::from_secs;
        assert_eq!(
            waits,
            [Some(s(1)), Some(s(2)), Some(s(4)), Some(s(8)), None]
        );
        assert_eq!(p.total_delay(), s(15));
        assert_eq!(RetryPolicy::PARK_AT_ONCE.retry_after(1), None);
        let capped = RetryPolicy {
            deliveries: 100,
            first_delay: s(1),
            max_delay: s(30),
        };
        assert_eq!(capped.retry_after(60), Some(s(30)));
    }

    #[test]
    fn the_retention_must_outlast_every_redelivery() {
        let p = RetryPolicy::DEFAULT;
        let horizon = redelivery_horizon(Duration::from_secs(30), Duration::from_secs(120), &p);
        assert_eq!(horizon, Duration::from_secs(30 * 5 + 15));
        let long_window =
            redelivery_horizon(Duration::from_secs(30), Duration::from_secs(86_400), &p);
        assert_eq!(long_window, Duration::from_secs(86_400));
        assert!(check_retention(Duration::from_secs(168 * 3600), horizon).is_ok());
        let err = check_retention(Duration::from_secs(3600), long_window).expect_err("too short");
        assert!(
            err.to_string().contains("INBOX_RETENTION_HOURS (1 h)"),
            "{err}"
        );
    }

    #[test]
    fn a_batch_reserves_then_releases_each_change_from_the_previous_version() {
        let t = ticket(None);
        let batch = Batch::new([
            message("m1", ORDER_CREATED, created("A", t.id)),
            message("m2", ORDER_CANCELLED, cancelled("A", t.id)),
        ]);
        let reads = batch.reads();
        assert_eq!(reads.tickets, [t.id]);
        assert_eq!(reads.created_orders, ["A"]);
        assert_eq!(reads.message_ids, ["m1", "m2"]);
        let plan = batch.plan(known_with(&[&t]), &RetryPolicy::DEFAULT, now());
        assert_eq!(plan.changes.len(), 2);
        assert_eq!(plan.changes[0].expected_version, 0);
        assert_eq!(plan.changes[0].ticket.order_id.as_deref(), Some("A"));
        assert_eq!(plan.changes[1].expected_version, 1);
        assert_eq!(plan.changes[1].ticket.order_id, None);
        assert_eq!(plan.changes[1].ticket.version, 2);
        assert_eq!(
            plan.verdicts
                .iter()
                .map(Verdict::outcome)
                .collect::<Vec<_>>(),
            [Outcome::Applied, Outcome::Applied]
        );
        assert_eq!(plan.records.len(), 2);
        assert!(plan.records.iter().all(|r| r.done_at.is_some()));
        assert!(
            plan.records.iter().all(|r| r.payload.is_empty()),
            "a settled record does not keep the payload"
        );
        assert!(plan.alerts.is_empty());
    }

    #[test]
    fn a_message_seen_before_or_twice_in_a_batch_is_a_duplicate() {
        let t = ticket(None);
        let m = message("m1", ORDER_CREATED, created("A", t.id));
        let plan = Batch::new([m.clone(), m.clone()]).plan(
            known_with(&[&t]),
            &RetryPolicy::DEFAULT,
            now(),
        );
        assert_eq!(
            plan.verdicts
                .iter()
                .map(Verdict::outcome)
                .collect::<Vec<_>>(),
            [Outcome::Applied, Outcome::Duplicate]
        );
        assert_eq!((plan.changes.len(), plan.records.len()), (1, 1));
        let mut known = known_with(&[&t]);
        known.recorded.insert("m1".into());
        let plan = Batch::new([m]).plan(known, &RetryPolicy::DEFAULT, now());
        assert_eq!(plan.verdicts, [Verdict::Duplicate]);
        assert!(plan.changes.is_empty() && plan.records.is_empty());
    }

    #[test]
    fn a_cancelled_before_its_created_wins() {
        let t = ticket(None);
        let plan = Batch::new([
            message("c", ORDER_CANCELLED, cancelled("A", t.id)),
            message("r", ORDER_CREATED, created("A", t.id)),
        ])
        .plan(known_with(&[&t]), &RetryPolicy::DEFAULT, now());
        assert_eq!(
            plan.verdicts
                .iter()
                .map(Verdict::outcome)
                .collect::<Vec<_>>(),
            [Outcome::NoOp, Outcome::NoOp]
        );
        assert!(plan.changes.is_empty());
        // In another batch: the store remembers the applied cancelled (its record).
        let mut known = known_with(&[&t]);
        known.cancelled_orders.insert("A".into());
        let plan = Batch::new([message("r", ORDER_CREATED, created("A", t.id))]).plan(
            known,
            &RetryPolicy::DEFAULT,
            now(),
        );
        assert_eq!(plan.verdicts[0].outcome(), Outcome::NoOp);
        assert_eq!(
            plan.records[0].reason.as_deref(),
            Some("the order was already cancelled")
        );
    }

    #[test]
    fn a_conflicting_order_changes_nothing_and_names_the_holder() {
        let t = ticket(Some("A"));
        let plan = Batch::new([message("m", ORDER_CREATED, created("B", t.id))]).plan(
            known_with(&[&t]),
            &RetryPolicy::DEFAULT,
            now(),
        );
        assert_eq!(
            plan.verdicts,
            [Verdict::Conflict {
                ticket: t.id,
                order: "B".into(),
                holder: "A".into()
            }]
        );
        assert!(plan.changes.is_empty());
        assert_eq!(plan.records[0].outcome, Outcome::Conflict);
    }

    #[test]
    fn unknown_tickets_retry_until_the_last_delivery_and_malformed_messages_park_at_once() {
        let missing = TicketId::new();
        let mut first = message("u", ORDER_CREATED, created("A", missing));
        let policy = RetryPolicy {
            deliveries: 3,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let plan = Batch::new(std::slice::from_ref(&first)).plan(Known::default(), &policy, now());
        assert_eq!(
            plan.verdicts[0].retry_after(),
            Some(Duration::from_millis(100))
        );
        assert!(
            plan.records.is_empty() && plan.alerts.is_empty(),
            "nothing written"
        );
        first.deliveries = 3;
        let poison = message("p", ORDER_CANCELLED, b"{oops".to_vec());
        let other = message("o", "order.updated", b"{}".to_vec());
        let plan = Batch::new([first, poison, other]).plan(Known::default(), &policy, now());
        assert_eq!(
            plan.verdicts
                .iter()
                .map(Verdict::outcome)
                .collect::<Vec<_>>(),
            [Outcome::Parked, Outcome::Parked, Outcome::Ignored]
        );
        let parked = &plan.records[0];
        assert_eq!(
            parked.reason.as_deref(),
            Some(format!("unknown ticket {missing} (after 3 deliveries)").as_str())
        );
        assert_eq!(
            (parked.done_at, parked.order_id.as_deref()),
            (None, Some("A"))
        );
        assert_eq!(plan.records[1].order_id, None);
        assert_eq!(plan.records[1].payload, b"{oops");
        assert_eq!(plan.alerts.len(), 2, "one alert per parked message");
        assert_eq!(plan.alerts[0].id, "inbox:u:parked");
        assert_eq!(plan.records.len(), 2, "ignored subjects leave no record");
    }

    #[test]
    fn outcomes_are_spelled_one_way() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
            assert_eq!(serde_json::to_value(o).expect("json"), json!(o.as_str()));
        }
    }
}
