//! Publishing outbox events to NATS JetStream. A publish succeeds only when its PubAck arrives;
//! every message carries `Nats-Msg-Id` = the event id, so JetStream drops a re-publish of an
//! event whose ack was lost (within the stream's duplicate window).

use crate::nats_auth::NatsAuth;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use common::domain::AttemptOutcome;
use common::{OutboxEvent, redact_url};
use futures::StreamExt;
use futures::future::join_all;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::Mutex;

#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port`, or several separated by commas; the `http://` scheme of the course's
    /// manifests is accepted. User info (`user:password@`, `token@`) is sent as credentials.
    pub url: String,
    /// The JetStream stream (`NATS_CLUSTER_ID`), created on first use if missing.
    pub stream: String,
    /// A credentials file and TLS, besides the URL's user info.
    pub auth: NatsAuth,
    /// The connection name (`NATS_CLIENT_ID`).
    pub client_name: String,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop duplicates.
    pub duplicate_window: Duration,
    /// How long a publish waits for its PubAck.
    pub ack_timeout: Duration,
}

/// How long a publish waits for a connection that is being (re)established before failing.
const CONNECT_GRACE: Duration = Duration::from_millis(500);

/// The subjects the stream captures.
pub const STREAM_SUBJECTS: &str = "ticket.>";

/// `http://nats-srv:4222` (the course's manifests) means `nats://nats-srv:4222`.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    for scheme in ["http://", "https://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            return format!("nats://{rest}");
        }
    }
    url.to_owned()
}

/// Why a publish failed. Its text is what the event's failures record and alerts show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// No connection to NATS right now: nothing was sent.
    #[error("NATS is not connected ({url})")]
    NotConnected { url: String },
    /// The stream could not be looked up or created: nothing was sent.
    #[error("cannot get or create JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    /// JetStream answered that no stream captures the subject (the stream was deleted).
    #[error("no JetStream stream captures this subject")]
    NoStream,
    /// The client could not take the message.
    #[error("{0}")]
    Send(String),
    /// JetStream (or the client, before sending) refused the message: it is not stored.
    #[error("{0}")]
    Refused(String),
    /// No answer: the PubAck timed out, or the connection dropped while waiting. The stream may
    /// hold the message.
    #[error("{0}")]
    NoAck(String),
}

impl PublishError {
    /// What the failure leaves known about the stream: only an attempt that was sent and got
    /// no answer may have stored the message.
    pub fn outcome(&self) -> AttemptOutcome {
        match self {
            PublishError::NoAck(_) => AttemptOutcome::Unknown,
            PublishError::NotConnected { .. }
            | PublishError::Stream { .. }
            | PublishError::NoStream
            | PublishError::Send(_)
            | PublishError::Refused(_) => AttemptOutcome::NotStored,
        }
    }

    /// A PubAck that did not come: `answered` when the server's answer was an error (a
    /// JetStream API error), as opposed to no answer at all.
    fn of_ack(kind: PublishErrorKind, answered: bool, text: String) -> Self {
        match kind {
            // "No responders": no stream listens on the subject (deleted, or no leader).
            PublishErrorKind::StreamNotFound => PublishError::NoStream,
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => PublishError::NoAck(text),
            PublishErrorKind::Other if !answered => PublishError::NoAck(text),
            _ => PublishError::Refused(text),
        }
    }
}

/// What JetStream said about one stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub sequence: u64,
    /// JetStream had this `Nats-Msg-Id` already: an earlier attempt did get through.
    pub duplicate: bool,
}

pub struct JetStreamPublisher {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    stream_ready: Mutex<bool>,
}

impl JetStreamPublisher {
    /// Connects in the background: a NATS server that is down now is not an error, the client
    /// keeps reconnecting and says so in the log.
    /// The user info of `config.url` (`user:password@` or `token@`) is sent as credentials, with
    /// the credentials file and TLS of `config.auth`.
    pub async fn connect(config: NatsConfig) -> anyhow::Result<Self> {
        let options = async_nats::ConnectOptions::new()
            .name(&config.client_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2_000))
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("disconnected from NATS; reconnecting")
                    }
                    other => tracing::warn!(event = %other, "NATS connection event"),
                }
            });
        let (options, servers) =
            crate::nats_auth::configure(options, &config.url, &config.auth).await?;
        let client = options.connect(servers).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to NATS_URL {}: {e}",
                redact_url(&config.url)
            )
        })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .max_ack_inflight(5_000)
            .build(client.clone());
        Ok(Self {
            client,
            js,
            config,
            stream_ready: Mutex::new(false),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Waits up to `grace` for the connection (start-up, a reconnect in progress).
    pub async fn wait_connected(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        while !self.is_connected() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        true
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn stream_name(&self) -> &str {
        &self.config.stream
    }

    /// Gets or creates the stream (file storage, `ticket.>`, the duplicate window), once.
    pub async fn ensure_stream(&self) -> Result<(), PublishError> {
        let mut ready = self.stream_ready.lock().await;
        if *ready {
            return Ok(());
        }
        let created = self
            .js
            .get_or_create_stream(stream::Config {
                name: self.config.stream.clone(),
                subjects: vec![STREAM_SUBJECTS.to_owned()],
                storage: stream::StorageType::File,
                duplicate_window: self.config.duplicate_window,
                ..Default::default()
            })
            .await;
        if let Err(e) = created {
            // Another worker may have created it between our lookup and our create.
            if self.js.get_stream(&self.config.stream).await.is_err() {
                return Err(PublishError::Stream {
                    stream: self.config.stream.clone(),
                    reason: e.to_string(),
                });
            }
        }
        tracing::info!(stream = %self.config.stream, "JetStream stream ready");
        *ready = true;
        Ok(())
    }

    /// Publishes the events pipelined (all sent, then all acks awaited together) and returns one
    /// result per event, in order. Fails fast while the connection is down instead of letting the
    /// client buffer messages.
    pub async fn publish_batch(
        &self,
        events: &[OutboxEvent],
    ) -> Vec<Result<Published, PublishError>> {
        if !self.wait_connected(CONNECT_GRACE).await {
            let e = PublishError::NotConnected {
                url: redact_url(&normalize_url(&self.config.url)),
            };
            return events.iter().map(|_| Err(e.clone())).collect();
        }
        if let Err(e) = self.ensure_stream().await {
            return events.iter().map(|_| Err(e.clone())).collect();
        }
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            // The payload is the JSON text as stored: no serialisation here.
            let payload = event.data.as_str().as_bytes().to_vec();
            let message = jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .message_id(event.id.to_hex());
            let sent = self.js.send_publish(event.subject.as_str(), message).await;
            pending.push(sent.map_err(|e| PublishError::Send(e.to_string())));
        }
        let acks = pending.into_iter().map(|sent| async move {
            let ack = sent?.await.map_err(|e| {
                let answered = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<async_nats::jetstream::Error>());
                PublishError::of_ack(e.kind(), answered, e.to_string())
            })?;
            Ok(Published {
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            })
        });
        let results: Vec<Result<Published, PublishError>> = join_all(acks).await;
        if results
            .iter()
            .any(|r| matches!(r, Err(PublishError::NoStream)))
        {
            // The stream was deleted under us: create it again before the next batch.
            *self.stream_ready.lock().await = false;
        }
        results
    }
}

/// What a read of the stream found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamRead {
    /// Those of the ids looked for that the stream holds.
    pub held: HashSet<String>,
    /// Messages read (headers only).
    pub messages: u64,
}

impl JetStreamPublisher {
    /// Which of `ids` (`Nats-Msg-Id`s) the stream holds among the messages stored since
    /// `since` on `subject` (`None`: any subject of the stream). Reads headers only, with an
    /// ordered consumer, up to the last message stored when the read began (or until every id
    /// is found).
    pub async fn stored_ids(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        subject: Option<&str>,
        ids: &HashSet<String>,
    ) -> Result<StreamRead, PublishError> {
        let failed = |e: &dyn std::fmt::Display| {
            PublishError::NoAck(format!(
                "cannot read JetStream stream {}: {e}",
                self.config.stream
            ))
        };
        if !self.wait_connected(CONNECT_GRACE).await {
            return Err(PublishError::NotConnected {
                url: redact_url(&normalize_url(&self.config.url)),
            });
        }
        let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
            since.timestamp_nanos_opt().unwrap_or(0),
        ))
        .map_err(|e| failed(&e))?;
        let stream = self
            .js
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| failed(&e))?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject.unwrap_or_default().to_owned(),
                headers_only: true,
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartTime { start_time },
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        let pending = consumer.cached_info().num_pending;
        let mut read = StreamRead::default();
        if pending == 0 {
            return Ok(read);
        }
        let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
        while read.messages < pending && read.held.len() < ids.len() {
            let next = tokio::time::timeout(self.config.ack_timeout, messages.next())
                .await
                .map_err(|_| failed(&"timed out"))?;
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(failed(&e)),
                None => return Err(failed(&"the read ended early")),
            };
            read.messages += 1;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned());
            if let Some(id) = id.filter(|id| ids.contains(id)) {
                read.held.insert(id);
            }
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_publish_that_got_no_answer_may_have_been_stored() {
        let text = || "x".to_owned();
        for (kind, answered, outcome) in [
            (PublishErrorKind::TimedOut, false, AttemptOutcome::Unknown),
            (PublishErrorKind::BrokenPipe, false, AttemptOutcome::Unknown),
            (PublishErrorKind::Other, false, AttemptOutcome::Unknown),
            (PublishErrorKind::Other, true, AttemptOutcome::NotStored),
            (
                PublishErrorKind::StreamNotFound,
                false,
                AttemptOutcome::NotStored,
            ),
            (
                PublishErrorKind::MaxPayloadExceeded,
                false,
                AttemptOutcome::NotStored,
            ),
        ] {
            let e = PublishError::of_ack(kind, answered, text());
            assert_eq!(e.outcome(), outcome, "{kind:?} answered={answered}");
        }
        let down = PublishError::NotConnected {
            url: "nats://h".into(),
        };
        assert_eq!(down.outcome(), AttemptOutcome::NotStored);
    }

    #[test]
    fn http_scheme_of_the_course_manifests_is_accepted() {
        assert_eq!(
            normalize_url("http://nats-srv:4222"),
            "nats://nats-srv:4222"
        );
        assert_eq!(
            normalize_url("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(normalize_url(" 127.0.0.1:4222 "), "127.0.0.1:4222");
    }
}
