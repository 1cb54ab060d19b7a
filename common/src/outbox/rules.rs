//! The outbox's decisions, as plain functions: what a new event looks like, what a failed
//! attempt does to an event, when a human is alerted and when told it is over. Both stores call
//! these inside their own atomic step and store what they return; the tests here run them on
//! every build, whatever store a machine can run.

use crate::domain::{
    AttemptOutcome, EventId, FAILURES_KEPT, Failure, OutboxEvent, Subject, Ticket,
};
use crate::inbox::ParkedMessage;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Now, to the millisecond: what both stores keep of a time (SQLite's text, a BSON date), so
/// an event returned by a write equals the event read back.
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// The event a ticket write commits with the ticket: fresh, that is locked with no holder, so
/// that for `fresh_lock` only a change feed's first attempt takes it; after that the sweep may.
pub fn fresh_event(subject: Subject, ticket: &Ticket, fresh_lock: Duration) -> OutboxEvent {
    OutboxEvent::for_ticket(
        subject,
        ticket,
        now(),
        chrono::Duration::from_std(fresh_lock).unwrap_or(chrono::Duration::MAX),
    )
}

/// Whether an event a feed was handed can still be published under its claim: at least `margin`
/// of it is left. One that waited longer could lose its claim to a sweep while being published
/// (the sweep would publish it too), so it goes back to the sweep instead.
pub fn claim_left(event: &OutboxEvent, now: DateTime<Utc>, margin: Duration) -> bool {
    let margin = chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX);
    event.locked_until - now >= margin
}

/// A publish attempt that failed, with the threshold at which an event asks for a human.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedAttempt {
    pub failure: Failure,
    /// When the attempt was sent: the earliest the stream could have stored it.
    pub sent_at: DateTime<Utc>,
    /// `ALERT_THRESHOLD`: failed attempts after which an event alerts.
    pub alert_threshold: i64,
    /// A read of the stream, just before this attempt, showed the event absent: whatever an
    /// earlier attempt left unknown is known now.
    pub absent_before: bool,
}

impl FailedAttempt {
    /// An attempt sent at `sent_at` that failed now with `error`.
    pub fn new(
        error: impl Into<String>,
        outcome: AttemptOutcome,
        sent_at: DateTime<Utc>,
        alert_threshold: i64,
    ) -> Self {
        Self {
            failure: Failure {
                at: now(),
                error: error.into(),
                outcome,
            },
            sent_at,
            alert_threshold,
            absent_before: false,
        }
    }

    /// The same attempt, made right after a read of the stream showed the event absent.
    pub fn after_absent(mut self) -> Self {
        self.absent_before = true;
        self
    }

    /// The failure rule, for an event this attempt held: the failure is appended (the last
    /// [`FAILURES_KEPT`] are kept), the attempt counted, the event unlocked and due at once; an
    /// attempt whose outcome is unknown marks since when the stream may hold the event (the
    /// earliest such attempt counts); and when its attempts reach the threshold for the first
    /// time it is marked alerted and the "firing" alert returned, for the store to queue in the
    /// same atomic step.
    pub fn apply(&self, event: &mut OutboxEvent) -> Option<Alert> {
        let at = self.failure.at;
        event.failures.push(self.failure.clone());
        let excess = event.failures.len().saturating_sub(FAILURES_KEPT);
        event.failures.drain(..excess);
        event.attempts += 1;
        event.is_locked = false;
        event.locked_by = None;
        event.locked_until = at;
        if self.absent_before {
            event.unknown_since = None;
        }
        if self.failure.outcome == AttemptOutcome::Unknown && event.unknown_since.is_none() {
            event.unknown_since = Some(self.sent_at);
        }
        if event.attempts >= self.alert_threshold && event.alerted_at.is_none() {
            event.alerted_at = Some(at);
            return Some(Alert::new(AlertKind::Firing, event.clone(), at));
        }
        None
    }
}

/// Whether the stream must be read before `event` is published again: an attempt of unknown
/// outcome may have stored it, and the stream's duplicate window (`window`, counted from when
/// the server stored it, no earlier than the attempt was sent) may have passed, so a re-publish
/// would be stored a second time. A quarter of the window is kept as a margin for clocks and
/// latency. Within the window the server's deduplication by `Nats-Msg-Id` is enough.
pub fn needs_reconciling(event: &OutboxEvent, now: DateTime<Utc>, window: Duration) -> bool {
    let Some(since) = event.unknown_since else {
        return false;
    };
    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    now - since >= window - window / 4
}

/// Where a read of the stream for `events` starts: the earliest time any of them may have been
/// stored, less [`RECONCILE_MARGIN`] for the server's clock. `None` when none needs it.
pub fn reconcile_from<'a>(
    events: impl IntoIterator<Item = &'a OutboxEvent>,
) -> Option<DateTime<Utc>> {
    let earliest = events.into_iter().filter_map(|e| e.unknown_since).min()?;
    Some(earliest - chrono::Duration::from_std(RECONCILE_MARGIN).unwrap_or_default())
}

/// How much earlier than an attempt's send time a stream read starts: the server's clock may
/// be behind ours by this much.
pub const RECONCILE_MARGIN: Duration = Duration::from_secs(30);

/// Delivered at last: the "resolved" alert for an event that had alerted, to queue with its
/// deletion. `None` for every other event (nobody was told it was failing).
pub fn resolution(event: &OutboxEvent, now: DateTime<Utc>) -> Option<Alert> {
    event
        .alerted_at
        .map(|_| Alert::new(AlertKind::Resolved, event.clone(), now))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    /// An event reached the alert threshold.
    Firing,
    /// An event that had alerted was delivered.
    Resolved,
    /// An order message was parked by the inbox (`crate::inbox::parked_alert`).
    Parked,
}

impl AlertKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            AlertKind::Firing => "firing",
            AlertKind::Resolved => "resolved",
            AlertKind::Parked => "parked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "firing" => Some(AlertKind::Firing),
            "resolved" => Some(AlertKind::Resolved),
            "parked" => Some(AlertKind::Parked),
            _ => None,
        }
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A webhook notification waiting to be sent: alerts go through an outbox of their own, so a
/// webhook that is down delays nothing and loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// [`Alert::id_of`] (or `inbox:{messageId}:parked`): queueing the same alert twice is a no-op.
    pub id: String,
    pub kind: AlertKind,
    /// What the alert is about, as it was when the alert was queued.
    pub about: AlertAbout,
    pub created_at: DateTime<Utc>,
    pub attempts: i64,
}

/// What an alert is about: an outbox event (`firing`, `resolved`) or a parked inbox message
/// (`parked`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AlertAbout {
    Event(OutboxEvent),
    Message(ParkedMessage),
}

impl Alert {
    /// An alert about an outbox event.
    pub fn new(kind: AlertKind, event: OutboxEvent, now: DateTime<Utc>) -> Self {
        Self {
            id: Self::id_of(event.id, kind),
            kind,
            about: AlertAbout::Event(event),
            created_at: now,
            attempts: 0,
        }
    }

    /// An alert about an inbox message: `inbox:{messageId}:{kind}`.
    pub fn about_message(kind: AlertKind, message: ParkedMessage, now: DateTime<Utc>) -> Self {
        Self {
            id: format!("inbox:{}:{kind}", message.id),
            kind,
            about: AlertAbout::Message(message),
            created_at: now,
            attempts: 0,
        }
    }

    /// `{eventId}:{kind}`: one alert of each kind per event.
    pub fn id_of(event: EventId, kind: AlertKind) -> String {
        format!("{event}:{kind}")
    }

    /// The outbox event the alert is about, if it is about one.
    pub fn event(&self) -> Option<&OutboxEvent> {
        match &self.about {
            AlertAbout::Event(e) => Some(e),
            AlertAbout::Message(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TicketId;

    fn event() -> OutboxEvent {
        let ticket = Ticket {
            id: TicketId::new(),
            title: "concert".into(),
            price: 20.0,
            user_id: "u1".into(),
            version: 0,
            order_id: None,
        };
        let mut e = fresh_event(Subject::TicketCreated, &ticket, Duration::from_secs(30));
        e.locked_by = Some("worker/1".into());
        e
    }

    /// An attempt refused before it reached the stream.
    fn known(error: impl Into<String>, threshold: i64) -> FailedAttempt {
        FailedAttempt::new(error, AttemptOutcome::NotStored, now(), threshold)
    }

    fn unknown(sent_at: DateTime<Utc>) -> FailedAttempt {
        FailedAttempt::new("timed out", AttemptOutcome::Unknown, sent_at, 100)
    }

    #[test]
    fn an_unknown_outcome_marks_since_when_the_stream_may_hold_the_event() {
        let mut e = event();
        known("not connected", 100).apply(&mut e);
        assert_eq!(
            e.unknown_since, None,
            "refused before sending: certainly not stored"
        );
        let first = now() - chrono::Duration::seconds(50);
        unknown(first).apply(&mut e);
        assert_eq!(e.unknown_since, Some(first));
        unknown(now()).apply(&mut e);
        known("not connected", 100).apply(&mut e);
        assert_eq!(
            e.unknown_since,
            Some(first),
            "the earliest such attempt counts"
        );
        assert_eq!(
            e.failures.iter().map(|f| f.outcome).collect::<Vec<_>>(),
            [
                AttemptOutcome::NotStored,
                AttemptOutcome::Unknown,
                AttemptOutcome::Unknown,
                AttemptOutcome::NotStored
            ]
        );
        // A read showed it absent: known again, until the next unknown attempt.
        known("not connected", 100).after_absent().apply(&mut e);
        assert_eq!(e.unknown_since, None);
        let later = now();
        unknown(later).after_absent().apply(&mut e);
        assert_eq!(e.unknown_since, Some(later));
    }

    #[test]
    fn the_stream_is_read_only_once_the_duplicate_window_may_have_passed() {
        let window = Duration::from_secs(120);
        let mut e = event();
        let t = now();
        assert!(!needs_reconciling(&e, t, window), "no unknown attempt");
        e.unknown_since = Some(t);
        assert!(!needs_reconciling(
            &e,
            t + chrono::Duration::seconds(60),
            window
        ));
        assert!(!needs_reconciling(
            &e,
            t + chrono::Duration::seconds(89),
            window
        ));
        assert!(
            needs_reconciling(&e, t + chrono::Duration::seconds(90), window),
            "a quarter early"
        );
        assert!(needs_reconciling(
            &e,
            t + chrono::Duration::seconds(600),
            window
        ));
        let mut other = event();
        other.unknown_since = Some(t - chrono::Duration::seconds(10));
        assert_eq!(
            reconcile_from([&e, &other, &event()]),
            Some(t - chrono::Duration::seconds(40)),
            "the earliest, less the margin"
        );
        assert_eq!(reconcile_from([&event()]), None);
    }

    #[test]
    fn a_fresh_event_is_locked_for_the_feed_by_nobody_in_milliseconds() {
        let e = fresh_event(
            Subject::TicketUpdated,
            &Ticket {
                id: TicketId::new(),
                title: "t".into(),
                price: 1.0,
                user_id: "u".into(),
                version: 3,
                order_id: Some("o".into()),
            },
            Duration::from_secs(30),
        );
        assert!(e.is_locked && e.locked_by.is_none());
        assert_eq!(e.locked_until - e.created_at, chrono::Duration::seconds(30));
        assert_eq!(e.created_at.timestamp_subsec_nanos() % 1_000_000, 0);
        assert_eq!((e.version, e.attempts, e.alerted_at), (3, 0, None));
    }

    #[test]
    fn a_failure_unlocks_counts_and_keeps_the_last_ten() {
        let mut e = event();
        for n in 1..=12 {
            let alert = known(format!("error {n}"), 100).apply(&mut e);
            assert!(alert.is_none());
        }
        assert_eq!(e.attempts, 12);
        assert_eq!(e.failures.len(), FAILURES_KEPT);
        assert_eq!(e.failures[0].error, "error 3");
        assert_eq!(e.last_error(), Some("error 12"));
        assert!(!e.is_locked && e.locked_by.is_none());
        assert_eq!(e.locked_until, e.failures[9].at, "due at once");
    }

    #[test]
    fn an_event_alerts_once_when_its_attempts_reach_the_threshold() {
        let mut e = event();
        let fired: Vec<Alert> = (0..6)
            .filter_map(|n| known(format!("error {n}"), 3).apply(&mut e))
            .collect();
        assert_eq!(fired.len(), 1, "one alert per event, not one per attempt");
        let alert = &fired[0];
        assert_eq!(alert.kind, AlertKind::Firing);
        assert_eq!(alert.id, format!("{}:firing", e.id));
        let fired_event = alert.event().expect("about the event");
        assert_eq!(
            fired_event.attempts, 3,
            "the event as it stood when it fired"
        );
        assert_eq!(fired_event.last_error(), Some("error 2"));
        assert_eq!(e.alerted_at, Some(alert.created_at));
        // A threshold already passed alerts at the next failure of an event that never alerted.
        let mut late = event();
        late.attempts = 7;
        assert!(known("x", 3).apply(&mut late).is_some());
    }

    #[test]
    fn only_an_event_that_alerted_resolves() {
        let mut e = event();
        assert!(resolution(&e, now()).is_none());
        known("down", 1).apply(&mut e);
        let resolved = resolution(&e, now()).expect("it had alerted");
        assert_eq!(resolved.kind, AlertKind::Resolved);
        assert_eq!(resolved.id, format!("{}:resolved", e.id));
    }

    #[test]
    fn alert_kinds_are_spelled_and_read_one_way() {
        for kind in [AlertKind::Firing, AlertKind::Resolved, AlertKind::Parked] {
            assert_eq!(AlertKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).expect("json"),
                serde_json::json!(kind.as_str())
            );
        }
        assert_eq!(AlertKind::parse("pending"), None);
    }

    #[test]
    fn an_event_handed_over_late_has_too_little_claim_left() {
        let e = event();
        let margin = Duration::from_secs(15);
        assert!(claim_left(&e, e.created_at, margin));
        let late = e.created_at + chrono::Duration::seconds(16);
        assert!(!claim_left(&e, late, margin));
    }
}
