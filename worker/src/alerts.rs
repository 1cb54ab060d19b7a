//! Telling humans. Alerts are queued by the store in the same write that records the failure
//! (or the delivery), then posted to `ALERT_WEBHOOK_URL` by this sender: a webhook that is down
//! or slow delays no publish and loses no alert; it is retried on the next sweep.

use common::outbox::{Alert, AlertKind, Lease};
use common::store::{AlertQueue, StoreError};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Longest a webhook call may take.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Alerts sent per round.
const ALERTS_PER_ROUND: usize = 100;

pub struct Alerter {
    alerts: Arc<dyn AlertQueue>,
    client: reqwest::Client,
    url: Option<String>,
    claimer: String,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AlertRound {
    pub sent: usize,
    pub failed: usize,
}

impl Alerter {
    pub fn new(
        alerts: Arc<dyn AlertQueue>,
        url: Option<String>,
        claimer: String,
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
        })
    }

    /// Sends the queued alerts once. Without a webhook, they were logged at error level when
    /// queued and are dropped here so the queue does not grow.
    pub async fn send_pending(&self) -> Result<AlertRound, StoreError> {
        let mut round = AlertRound::default();
        let lease = Lease::new(&self.claimer, WEBHOOK_TIMEOUT * 3);
        let alerts = self.alerts.claim_alerts(ALERTS_PER_ROUND, &lease).await?;
        for alert in alerts {
            let Some(url) = &self.url else {
                self.alerts.delete_alert(&alert.id).await?;
                continue;
            };
            match self.post(url, &alert).await {
                Ok(()) => {
                    self.alerts.delete_alert(&alert.id).await?;
                    round.sent += 1;
                    metrics::counter!("outbox_alerts_sent_total", "kind" => alert.kind.as_str())
                        .increment(1);
                    tracing::info!(alert = %alert.id, "alert sent to the webhook");
                }
                Err(e) => {
                    self.alerts.release_alert(&alert.id).await?;
                    round.failed += 1;
                    metrics::counter!("outbox_alerts_failed_total").increment(1);
                    tracing::error!(alert = %alert.id, error = %e, "alert webhook failed; retrying on the next sweep");
                }
            }
        }
        Ok(round)
    }

    async fn post(&self, url: &str, alert: &Alert) -> Result<(), String> {
        let res = self
            .client
            .post(url)
            .json(&payload(alert))
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

/// The webhook body: a Slack-compatible `text`, `resolved`, and the event.
pub fn payload(alert: &Alert) -> Value {
    let e = &alert.event;
    let resolved = alert.kind == AlertKind::Resolved;
    let text = if resolved {
        format!(
            "RESOLVED: outbox event {} ({} of ticket {} v{}) was delivered to NATS after {} failed attempts.",
            e.id, e.subject, e.aggregate_id, e.version, e.attempts
        )
    } else {
        format!(
            ":rotating_light: Outbox event {} ({} of ticket {} v{}) failed to publish {} times. Last error: {}. \
             Inspect with `ticketing outbox show {}`.",
            e.id,
            e.subject,
            e.aggregate_id,
            e.version,
            e.attempts,
            e.last_error().unwrap_or("unknown"),
            e.id
        )
    };
    json!({
        "text": text,
        "resolved": resolved,
        "event": e.summary(),
    })
}
