//! Telling humans, in digests. The store queues one alert record per event (firing when its
//! attempts reach `ALERT_THRESHOLD`, resolved when an event that fired is delivered) in the same
//! write that records the failure or the delivery. This sender posts them to `ALERT_WEBHOOK_URL`
//! as digests a person can read during an outage:
//! - at most one firing digest per `ALERT_DIGEST_SECS` (across replicas: the store hands out the
//!   turns), saying how many events newly passed the threshold, on how many tickets, the oldest,
//!   the most common errors with counts, and a few event ids to look at;
//! - one resolved digest when every event that fired is delivered, with how long it lasted and
//!   how many there were.
//!
//! A webhook that is down or slow delays no publish and loses nothing: what a digest did not
//! carry stays queued, and the next one carries it too (merged, not one per missed period).

use chrono::{DateTime, Utc};
use common::OutboxEvent;
use common::display::human_age;
use common::inbox::ParkedMessage;
use common::outbox::{Alert, AlertAbout, AlertKind, Lease};
use common::store::{AlertQueue, StoreError};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Longest a webhook call may take.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most alert records one digest carries (the rest go in the next one).
const DIGEST_MAX_EVENTS: usize = 100_000;
/// Errors a digest names, the most common first.
const DIGEST_ERRORS: usize = 3;
/// Event ids a digest names as examples.
const DIGEST_SAMPLES: usize = 3;

pub struct Alerter {
    alerts: Arc<dyn AlertQueue>,
    client: reqwest::Client,
    url: Option<String>,
    claimer: String,
    /// `ALERT_DIGEST_SECS`: at most one firing digest per period.
    period: Duration,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AlertRound {
    /// Digests posted.
    pub sent: usize,
    /// Posts that failed (their alerts stay queued).
    pub failed: usize,
}

impl Alerter {
    pub fn new(
        alerts: Arc<dyn AlertQueue>,
        url: Option<String>,
        claimer: String,
        period: Duration,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .connect_timeout(WEBHOOK_TIMEOUT)
            .build()?;
        Ok(Self {
            alerts,
            client,
            url: url.filter(|u| !u.trim().is_empty()),
            claimer,
            period,
        })
    }

    /// One round: the firing digest when one is due, then the resolved digest when the
    /// episode is over. Without a webhook, the alerts were logged at error level when they
    /// fired and are dropped here so the queue does not grow.
    pub async fn send_pending(&self) -> Result<AlertRound, StoreError> {
        let mut round = AlertRound::default();
        let lease = Lease::new(&self.claimer, WEBHOOK_TIMEOUT * 3);
        let firing_left = self
            .digest_of(AlertKind::Firing, &lease, &mut round)
            .await?;
        self.digest_of(AlertKind::Parked, &lease, &mut round)
            .await?;
        // The episode is over when no event that fired is left undelivered; its resolved
        // digest waits for the last firing one.
        if firing_left || self.alerts.alerted_events().await? > 0 {
            return Ok(round);
        }
        let resolved = self
            .alerts
            .claim_alerts(AlertKind::Resolved, DIGEST_MAX_EVENTS, &lease)
            .await?;
        if !resolved.is_empty() {
            self.send(
                Digest::resolved(&resolved, Utc::now()),
                &resolved,
                &mut round,
            )
            .await?;
        }
        Ok(round)
    }

    /// The digest of the queued alerts of `kind` (firing, parked) when it is this sender's turn
    /// (at most one per period); otherwise they wait, merged into the next one. Whether any
    /// was queued.
    async fn digest_of(
        &self,
        kind: AlertKind,
        lease: &Lease,
        round: &mut AlertRound,
    ) -> Result<bool, StoreError> {
        let alerts = self
            .alerts
            .claim_alerts(kind, DIGEST_MAX_EVENTS, lease)
            .await?;
        if alerts.is_empty() {
            return Ok(false);
        }
        if self.url.is_some() && !self.alerts.take_digest_turn(kind, self.period).await? {
            self.alerts.release_alerts(&ids(&alerts), false).await?;
            return Ok(true);
        }
        let digest = match kind {
            AlertKind::Parked => Digest::parked(&alerts, Utc::now()),
            _ => Digest::firing(&alerts, Utc::now()),
        };
        self.send(digest, &alerts, round).await?;
        Ok(true)
    }

    /// Posts `digest`; its alerts are forgotten once it is posted, made due again otherwise.
    async fn send(
        &self,
        digest: Digest,
        alerts: &[Alert],
        round: &mut AlertRound,
    ) -> Result<(), StoreError> {
        let Some(url) = &self.url else {
            return self.alerts.delete_alerts(&ids(alerts)).await;
        };
        match self.post(url, &digest.body()).await {
            Ok(()) => {
                self.alerts.delete_alerts(&ids(alerts)).await?;
                round.sent += 1;
                metrics::counter!("outbox_alerts_sent_total", "kind" => digest.kind.as_str())
                    .increment(1);
                tracing::info!(
                    kind = digest.kind.as_str(),
                    events = digest.events,
                    "alert digest sent to the webhook"
                );
            }
            Err(e) => {
                self.alerts.release_alerts(&ids(alerts), true).await?;
                round.failed += 1;
                metrics::counter!("outbox_alerts_failed_total").increment(1);
                tracing::error!(kind = digest.kind.as_str(), events = digest.events, error = %e,
                    "alert webhook failed; the digest waits and is sent with what comes next");
            }
        }
        Ok(())
    }

    async fn post(&self, url: &str, body: &Value) -> Result<(), String> {
        let res = self
            .client
            .post(url)
            .json(body)
            .send()
            .await
            // Without the URL: a Slack webhook's URL is itself a secret.
            .map_err(|e| common::error_chain(&e.without_url()))?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("webhook answered {}", res.status()))
        }
    }
}

fn ids(alerts: &[Alert]) -> Vec<String> {
    alerts.iter().map(|a| a.id.clone()).collect()
}

/// What a digest says, from the alert records it carries (about outbox events for firing and
/// resolved; about order messages the inbox parked for parked).
#[derive(Debug, Clone, PartialEq)]
pub struct Digest {
    pub kind: AlertKind,
    /// Events (or parked messages) it tells of.
    pub events: usize,
    /// Distinct tickets of those.
    pub tickets: usize,
    /// Firing: the creation of the oldest event; parked: the oldest message's receipt.
    pub oldest_created_at: Option<DateTime<Utc>>,
    /// Firing: the fewest failed attempts among them (the threshold they reached).
    pub attempts: i64,
    /// Firing: the most common last errors; parked: the most common reasons; with counts.
    pub errors: Vec<(String, usize)>,
    /// A few ids, to look at with `ticketing outbox show` (`ticketing inbox show` when parked).
    pub samples: Vec<String>,
    /// Resolved: when the first of them fired.
    pub since: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// The most common of `reasons`, with counts, most common first.
fn most_common<'a>(reasons: impl Iterator<Item = &'a str>) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in reasons {
        *counts.entry(r).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> =
        counts.into_iter().map(|(e, n)| (e.to_owned(), n)).collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.truncate(DIGEST_ERRORS);
    counts
}

impl Digest {
    pub fn firing(alerts: &[Alert], now: DateTime<Utc>) -> Self {
        let events: Vec<&OutboxEvent> = alerts.iter().filter_map(Alert::event).collect();
        Self {
            oldest_created_at: events.iter().map(|e| e.created_at).min(),
            attempts: events.iter().map(|e| e.attempts).min().unwrap_or(0),
            errors: most_common(events.iter().map(|e| e.last_error().unwrap_or("unknown"))),
            ..Self::of_events(AlertKind::Firing, &events, now)
        }
    }

    pub fn resolved(alerts: &[Alert], now: DateTime<Utc>) -> Self {
        let events: Vec<&OutboxEvent> = alerts.iter().filter_map(Alert::event).collect();
        Self {
            since: events.iter().filter_map(|e| e.alerted_at).min(),
            ..Self::of_events(AlertKind::Resolved, &events, now)
        }
    }

    /// Order messages the inbox parked.
    pub fn parked(alerts: &[Alert], now: DateTime<Utc>) -> Self {
        let messages: Vec<&ParkedMessage> = alerts
            .iter()
            .filter_map(|a| match &a.about {
                AlertAbout::Message(m) => Some(m),
                AlertAbout::Event(_) => None,
            })
            .collect();
        let tickets: HashSet<_> = messages
            .iter()
            .filter_map(|m| m.ticket_id.as_ref())
            .collect();
        Self {
            kind: AlertKind::Parked,
            events: messages.len(),
            tickets: tickets.len(),
            oldest_created_at: messages.iter().map(|m| m.received_at).min(),
            attempts: 0,
            errors: most_common(
                messages
                    .iter()
                    .map(|m| m.reason.as_deref().unwrap_or("unknown")),
            ),
            samples: messages
                .iter()
                .take(DIGEST_SAMPLES)
                .map(|m| m.id.clone())
                .collect(),
            since: None,
            now,
        }
    }

    fn of_events(kind: AlertKind, events: &[&OutboxEvent], now: DateTime<Utc>) -> Self {
        let tickets: HashSet<_> = events.iter().map(|e| e.aggregate_id).collect();
        Self {
            kind,
            events: events.len(),
            tickets: tickets.len(),
            oldest_created_at: None,
            attempts: 0,
            errors: Vec::new(),
            samples: events
                .iter()
                .take(DIGEST_SAMPLES)
                .map(|e| e.id.to_string())
                .collect(),
            since: None,
            now,
        }
    }

    fn seconds_since(&self, t: Option<DateTime<Utc>>) -> Option<i64> {
        t.map(|t| (self.now - t).num_seconds().max(0))
    }

    /// The webhook body: a Slack-compatible `text`, and the same facts as fields.
    pub fn body(&self) -> Value {
        let resolved = self.kind == AlertKind::Resolved;
        let samples = if self.kind == AlertKind::Parked {
            "sampleMessageIds"
        } else {
            "sampleEventIds"
        };
        json!({
            "text": self.text(),
            "kind": self.kind.as_str(),
            "resolved": resolved,
            "events": self.events,
            "tickets": self.tickets,
            "attempts": (self.kind == AlertKind::Firing).then_some(self.attempts),
            "oldestCreatedAt": self.oldest_created_at,
            "oldestAgeSeconds": self.seconds_since(self.oldest_created_at),
            "errors": self.errors.iter().map(|(e, n)| json!({"error": e, "events": n})).collect::<Vec<_>>(),
            samples: self.samples,
            "since": self.since,
            "durationSeconds": self.seconds_since(self.since),
        })
    }

    fn errors_text(&self) -> String {
        self.errors
            .iter()
            .map(|(e, n)| format!("{e} ({n})"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// ` Look at one: `show a` (also b, c); all of them: `all`.`
    fn look(&self, show: &str, all: &str) -> String {
        match self.samples.split_first() {
            Some((first, [])) => format!(" Look at it: `{show} {first}`."),
            Some((first, rest)) => format!(
                " Look at one: `{show} {first}` (also {}); all of them: `{all}`.",
                rest.join(", ")
            ),
            None => String::new(),
        }
    }

    pub fn text(&self) -> String {
        let tickets = plural(self.tickets, "ticket", "tickets");
        let age = |t: DateTime<Utc>| human_age((self.now - t).num_seconds());
        match self.kind {
            AlertKind::Resolved => {
                let events = plural(self.events, "outbox event", "outbox events");
                let since = self
                    .since
                    .map(|t| {
                        format!(
                            " since {} ({} ago)",
                            t.format("%Y-%m-%d %H:%M:%S UTC"),
                            age(t)
                        )
                    })
                    .unwrap_or_default();
                format!(
                    "RESOLVED: all {events} (on {tickets}) that kept failing to publish{since} \
                     are delivered to NATS."
                )
            }
            AlertKind::Firing => {
                let events = plural(self.events, "outbox event", "outbox events");
                let oldest = self
                    .oldest_created_at
                    .map(|t| format!("; the oldest was created {} ago", age(t)))
                    .unwrap_or_default();
                format!(
                    ":rotating_light: {events} (on {tickets}) failed to publish {} times or \
                     more{oldest}. Most common errors: {}.{}",
                    self.attempts,
                    self.errors_text(),
                    self.look("ticketing outbox show", "ticketing outbox list --stuck")
                )
            }
            AlertKind::Parked => {
                let messages = plural(self.events, "order message", "order messages");
                let oldest = self
                    .oldest_created_at
                    .map(|t| format!("; the oldest came {} ago", age(t)))
                    .unwrap_or_default();
                format!(
                    ":warning: {messages} (on {tickets}) could not be applied and were parked{oldest}. \
                     Most common reasons: {}.{} Apply one again with `ticketing inbox replay ID`.",
                    self.errors_text(),
                    self.look("ticketing inbox show", "ticketing inbox list")
                )
            }
        }
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::domain::AttemptOutcome;
    use common::outbox::{FailedAttempt, rules};
    use common::{Subject, Ticket, TicketId};

    /// The firing alert of an event of `ticket` whose attempts all failed with `error`.
    fn fired(ticket: TicketId, error: &str, age_secs: i64) -> Alert {
        let t = Ticket {
            id: ticket,
            title: "concert".into(),
            price: 20.0,
            user_id: "u".into(),
            version: 0,
            order_id: None,
        };
        let mut e = rules::fresh_event(Subject::TicketCreated, &t, Duration::from_secs(30));
        e.created_at -= chrono::Duration::seconds(age_secs);
        let attempt = FailedAttempt::new(error, AttemptOutcome::NotStored, rules::now(), 3);
        let mut alert = None;
        while alert.is_none() {
            alert = attempt.apply(&mut e);
        }
        alert.expect("fired")
    }

    #[test]
    fn a_firing_digest_counts_events_tickets_errors_and_names_a_few() {
        let (a, b) = (TicketId::new(), TicketId::new());
        let alerts = vec![
            fired(a, "NATS is not connected (nats://h:4222)", 30),
            fired(a, "NATS is not connected (nats://h:4222)", 600),
            fired(b, "NATS is not connected (nats://h:4222)", 60),
            fired(b, "no JetStream stream captures this subject", 5),
        ];
        let d = Digest::firing(&alerts, Utc::now());
        assert_eq!((d.events, d.tickets, d.attempts), (4, 2, 3));
        assert_eq!(
            d.errors,
            [
                ("NATS is not connected (nats://h:4222)".to_owned(), 3),
                ("no JetStream stream captures this subject".to_owned(), 1)
            ]
        );
        assert_eq!(d.samples.len(), 3);
        let body = d.body();
        assert_eq!(body["kind"], "firing");
        assert_eq!(body["resolved"], false);
        assert_eq!(body["events"], 4);
        assert!(body["oldestAgeSeconds"].as_i64().is_some_and(|s| s >= 600));
        let text = body["text"].as_str().expect("text");
        for part in [
            "4 outbox events (on 2 tickets) failed to publish 3 times or more",
            "the oldest was created 10m",
            "NATS is not connected (nats://h:4222) (3)",
            &format!(
                "ticketing outbox show {}",
                alerts[0].event().expect("an event").id
            ),
            "ticketing outbox list --stuck",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
    }

    #[test]
    fn a_single_stuck_event_gets_a_digest_of_one() {
        let alert = fired(TicketId::new(), "boom", 10);
        let text = Digest::firing(std::slice::from_ref(&alert), Utc::now()).text();
        assert!(text.contains("1 outbox event (on 1 ticket)"), "{text}");
        assert!(text.contains(&format!(
            "Look at it: `ticketing outbox show {}`",
            alert.event().expect("an event").id
        )));
    }

    #[test]
    fn a_resolved_digest_says_how_many_and_since_when() {
        let alerts: Vec<Alert> = (0..5)
            .map(|_| {
                let mut a = fired(TicketId::new(), "boom", 10);
                a.kind = AlertKind::Resolved;
                a
            })
            .collect();
        let first = alerts
            .iter()
            .filter_map(|a| a.event().and_then(|e| e.alerted_at))
            .min()
            .expect("fired");
        let d = Digest::resolved(&alerts, first + chrono::Duration::seconds(125));
        let body = d.body();
        assert_eq!(body["resolved"], true);
        assert_eq!(body["events"], 5);
        assert_eq!(body["durationSeconds"], 125);
        let text = body["text"].as_str().expect("text");
        assert!(
            text.starts_with("RESOLVED: all 5 outbox events (on 5 tickets)"),
            "{text}"
        );
        assert!(text.contains("(2m 05s ago)"), "{text}");
    }

    fn parked(id: &str, ticket: Option<&str>, reason: &str, age_secs: i64) -> Alert {
        let message = ParkedMessage {
            id: id.into(),
            subject: "order.created".into(),
            stream: "ORDERS".into(),
            sequence: 1,
            order_id: Some("order-1".into()),
            ticket_id: ticket.map(Into::into),
            outcome: common::inbox::Outcome::Parked,
            reason: Some(reason.into()),
            deliveries: 5,
            received_at: Utc::now() - chrono::Duration::seconds(age_secs),
        };
        Alert::about_message(AlertKind::Parked, message, Utc::now())
    }

    #[test]
    fn a_parked_digest_counts_messages_and_reasons_and_names_message_ids() {
        let alerts = vec![
            parked("order-1:created", Some("t1"), "unknown ticket t1", 30),
            parked("order-2:created", Some("t1"), "unknown ticket t1", 400),
            parked("ORDERS:17", None, "malformed payload: expected value", 5),
        ];
        let d = Digest::parked(&alerts, Utc::now());
        assert_eq!((d.events, d.tickets), (3, 1));
        assert_eq!(d.errors[0], ("unknown ticket t1".to_owned(), 2));
        let body = d.body();
        assert_eq!(body["kind"], "parked");
        assert_eq!(body["resolved"], false);
        assert_eq!(body["attempts"], Value::Null);
        assert_eq!(body["sampleMessageIds"][0], "order-1:created");
        assert!(body.get("sampleEventIds").is_none());
        assert!(body["oldestAgeSeconds"].as_i64().is_some_and(|s| s >= 400));
        let text = body["text"].as_str().expect("text");
        for part in [
            "3 order messages (on 1 ticket) could not be applied and were parked",
            "the oldest came 6m",
            "unknown ticket t1 (2)",
            "ticketing inbox show order-1:created",
            "ticketing inbox replay ID",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
    }
}
