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
use common::EventId;
use common::display::human_age;
use common::outbox::{Alert, AlertKind, Lease};
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
        let firing = self
            .alerts
            .claim_alerts(AlertKind::Firing, DIGEST_MAX_EVENTS, &lease)
            .await?;
        let firing_left = !firing.is_empty();
        if firing_left {
            if self.url.is_some()
                && !self
                    .alerts
                    .take_digest_turn(AlertKind::Firing, self.period)
                    .await?
            {
                // Not yet (or another sender's turn): they wait, merged into the next digest.
                self.alerts.release_alerts(&ids(&firing), false).await?;
                return Ok(round);
            }
            self.send(Digest::firing(&firing, Utc::now()), &firing, &mut round)
                .await?;
        }
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

/// What a digest says, from the alert records it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Digest {
    pub kind: AlertKind,
    /// Events it tells of.
    pub events: usize,
    /// Distinct tickets of those events.
    pub tickets: usize,
    /// Firing: the creation of the oldest of them.
    pub oldest_created_at: Option<DateTime<Utc>>,
    /// Firing: the fewest failed attempts among them (the threshold they reached).
    pub attempts: i64,
    /// Firing: the most common last errors, with how many events have each.
    pub errors: Vec<(String, usize)>,
    /// A few of the events, to look at with `ticketing outbox show`.
    pub samples: Vec<EventId>,
    /// Resolved: when the first of them fired.
    pub since: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

impl Digest {
    pub fn firing(alerts: &[Alert], now: DateTime<Utc>) -> Self {
        let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
        for a in alerts {
            *errors
                .entry(a.event.last_error().unwrap_or("unknown"))
                .or_default() += 1;
        }
        let mut errors: Vec<(String, usize)> =
            errors.into_iter().map(|(e, n)| (e.to_owned(), n)).collect();
        errors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        errors.truncate(DIGEST_ERRORS);
        Self {
            oldest_created_at: alerts.iter().map(|a| a.event.created_at).min(),
            attempts: alerts.iter().map(|a| a.event.attempts).min().unwrap_or(0),
            errors,
            ..Self::of(AlertKind::Firing, alerts, now)
        }
    }

    pub fn resolved(alerts: &[Alert], now: DateTime<Utc>) -> Self {
        Self {
            since: alerts.iter().filter_map(|a| a.event.alerted_at).min(),
            ..Self::of(AlertKind::Resolved, alerts, now)
        }
    }

    fn of(kind: AlertKind, alerts: &[Alert], now: DateTime<Utc>) -> Self {
        let tickets: HashSet<_> = alerts.iter().map(|a| a.event.aggregate_id).collect();
        Self {
            kind,
            events: alerts.len(),
            tickets: tickets.len(),
            oldest_created_at: None,
            attempts: 0,
            errors: Vec::new(),
            samples: alerts
                .iter()
                .take(DIGEST_SAMPLES)
                .map(|a| a.event.id)
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
        json!({
            "text": self.text(),
            "kind": self.kind.as_str(),
            "resolved": resolved,
            "events": self.events,
            "tickets": self.tickets,
            "attempts": (!resolved).then_some(self.attempts),
            "oldestCreatedAt": self.oldest_created_at,
            "oldestAgeSeconds": self.seconds_since(self.oldest_created_at),
            "errors": self.errors.iter().map(|(e, n)| json!({"error": e, "events": n})).collect::<Vec<_>>(),
            "sampleEventIds": self.samples,
            "since": self.since,
            "durationSeconds": self.seconds_since(self.since),
        })
    }

    pub fn text(&self) -> String {
        let events = plural(self.events, "outbox event", "outbox events");
        let tickets = plural(self.tickets, "ticket", "tickets");
        match self.kind {
            AlertKind::Resolved => {
                let since = self
                    .since
                    .map(|t| {
                        format!(
                            " since {} ({} ago)",
                            t.format("%Y-%m-%d %H:%M:%S UTC"),
                            human_age((self.now - t).num_seconds())
                        )
                    })
                    .unwrap_or_default();
                format!(
                    "RESOLVED: all {events} (on {tickets}) that kept failing to publish{since} \
                     are delivered to NATS."
                )
            }
            AlertKind::Firing => {
                let oldest = self
                    .oldest_created_at
                    .map(|t| {
                        format!(
                            "; the oldest was created {} ago",
                            human_age((self.now - t).num_seconds())
                        )
                    })
                    .unwrap_or_default();
                let errors = self
                    .errors
                    .iter()
                    .map(|(e, n)| format!("{e} ({n})"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let look = match self.samples.split_first() {
                    Some((first, [])) => {
                        format!(" Look at it: `ticketing outbox show {first}`.")
                    }
                    Some((first, rest)) => format!(
                        " Look at one: `ticketing outbox show {first}` (also {}); all of them: \
                         `ticketing outbox list --stuck`.",
                        rest.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => String::new(),
                };
                format!(
                    ":rotating_light: {events} (on {tickets}) failed to publish {} times or \
                     more{oldest}. Most common errors: {errors}.{look}",
                    self.attempts
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
            &format!("ticketing outbox show {}", alerts[0].event.id),
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
            alert.event.id
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
            .filter_map(|a| a.event.alerted_at)
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
}
