//! Publishing outbox events to NATS JetStream. A publish succeeds only when its PubAck arrives;
//! every message carries `Nats-Msg-Id` = the event id, so JetStream drops a re-publish of an
//! event whose ack was lost (within the stream's duplicate window).

use crate::nats_auth::NatsAuth;
use crate::stream::StreamPolicy;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use common::domain::AttemptOutcome;
use common::{OutboxEvent, redact_url};
use futures::StreamExt;
use futures::future::join_all;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// The limits and replicas the stream is created with (`NATS_STREAM_MAX_AGE_SECS`,
    /// `NATS_STREAM_MAX_BYTES`, `NATS_STREAM_REPLICAS`); an existing stream is left as it is.
    pub policy: StreamPolicy,
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
    /// No stream answered for the subject ("no responders"): the stream was deleted, or its
    /// servers are electing a leader (a JetStream cluster, for a few seconds).
    #[error("no JetStream stream answered for this subject (deleted, or electing a leader)")]
    NoStream,
    /// The client could not take the message.
    #[error("{0}")]
    Send(String),
    /// JetStream refused the message for want of room: the stream (a limit with discard new)
    /// or the server's (or account's) JetStream storage is full.
    #[error("NATS is full: {reason}")]
    StorageFull { reason: String },
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
            | PublishError::StorageFull { .. }
            | PublishError::Refused(_) => AttemptOutcome::NotStored,
        }
    }
}

impl PublishError {
    /// What kind of failure this is: the `kind` label of `outbox_publish_failures_total`.
    pub fn kind(&self) -> FailureKind {
        match self {
            PublishError::NotConnected { .. } => FailureKind::NotConnected,
            PublishError::Stream { .. } => FailureKind::Stream,
            PublishError::NoStream => FailureKind::NoStream,
            PublishError::Send(_) => FailureKind::Send,
            PublishError::StorageFull { .. } => FailureKind::StorageFull,
            PublishError::Refused(_) => FailureKind::Refused,
            PublishError::NoAck(_) => FailureKind::NoAck,
        }
    }
}

/// The kinds of publish failure, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    NotConnected,
    Stream,
    NoStream,
    Send,
    StorageFull,
    Refused,
    NoAck,
}

impl FailureKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            FailureKind::NotConnected => "not_connected",
            FailureKind::Stream => "stream",
            FailureKind::NoStream => "no_stream",
            FailureKind::Send => "send",
            FailureKind::StorageFull => "storage_full",
            FailureKind::Refused => "refused",
            FailureKind::NoAck => "no_ack",
        }
    }
}

/// A PubAck that did not come, as a [`PublishError`]: an answer of the server's is a refusal
/// (JetStream's "no room" answers are [`PublishError::StorageFull`]); no answer at all (a
/// timeout, the connection dropped while waiting) leaves the outcome unknown.
fn ack_error(e: &jetstream::context::PublishError) -> PublishError {
    let text = e.to_string();
    let refusal = std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
    match (e.kind(), refusal) {
        // "No responders": no stream listens on the subject (deleted, or electing a leader).
        (PublishErrorKind::StreamNotFound, _) => PublishError::NoStream,
        (_, Some(r)) if crate::stream::is_full(r.error_code().0, &r.to_string()) => {
            PublishError::StorageFull {
                reason: r.to_string(),
            }
        }
        (_, Some(_)) => PublishError::Refused(text),
        (
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::Other,
            None,
        ) => PublishError::NoAck(text),
        // Refused by the client before sending (too large, too many acks pending).
        _ => PublishError::Refused(text),
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
    /// An existing stream whose limits differ is reported once per process.
    reported: AtomicBool,
    /// The stream was found ready once: later checks (after "no responders", as during every
    /// leader election of a cluster) log at debug.
    was_ready: AtomicBool,
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
            reported: AtomicBool::new(false),
            was_ready: AtomicBool::new(false),
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

    /// The configuration the stream is created with: file storage, `ticket.>`, the duplicate
    /// window and the limits of the policy.
    pub fn stream_config(&self) -> stream::Config {
        self.config.policy.apply(stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![STREAM_SUBJECTS.to_owned()],
            storage: stream::StorageType::File,
            duplicate_window: self.config.duplicate_window,
            ..Default::default()
        })
    }

    /// Gets or creates the stream ([`Self::stream_config`]), once. An existing stream is left
    /// as it is; if its limits differ, that is logged once (warn).
    pub async fn ensure_stream(&self) -> Result<(), PublishError> {
        let mut ready = self.stream_ready.lock().await;
        if *ready {
            return Ok(());
        }
        let wanted = self.stream_config();
        let existing = match self.js.get_or_create_stream(wanted.clone()).await {
            Ok(stream) => stream.cached_info().config.clone(),
            // Another worker may have created it between our lookup and our create.
            Err(e) => match self.js.get_stream(&self.config.stream).await {
                Ok(stream) => stream.cached_info().config.clone(),
                Err(_) => {
                    return Err(PublishError::Stream {
                        stream: self.config.stream.clone(),
                        reason: e.to_string(),
                    });
                }
            },
        };
        let differences = crate::stream::differences(&wanted, &existing);
        if !differences.is_empty() && !self.reported.swap(true, Ordering::Relaxed) {
            tracing::warn!(stream = %self.config.stream, differences = %differences.join("; "),
                "the JetStream stream exists with other limits or replicas than configured; it is \
                 left as it is (`nats stream edit` changes it)");
        }
        if self.was_ready.swap(true, Ordering::Relaxed) {
            tracing::debug!(stream = %self.config.stream, "JetStream stream ready");
        } else {
            tracing::info!(stream = %self.config.stream, "JetStream stream ready");
        }
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
            let ack = sent?.await.map_err(|e| ack_error(&e))?;
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

    /// A refusal as nats-server 2.9 sends it in a PubAck.
    fn refused(code: u64, description: &str) -> jetstream::context::PublishError {
        let error: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 503, "err_code": code, "description": description
        }))
        .expect("a JetStream error");
        jetstream::context::PublishError::with_source(PublishErrorKind::Other, error)
    }

    fn no_answer(kind: PublishErrorKind) -> jetstream::context::PublishError {
        jetstream::context::PublishError::new(kind)
    }

    #[test]
    fn a_full_stream_or_server_is_its_own_failure_saying_so() {
        for (code, description) in [
            (10023, "insufficient resources"),
            (10077, "maximum bytes exceeded"),
        ] {
            let e = ack_error(&refused(code, description));
            assert_eq!(e.kind().as_str(), "storage_full");
            let text = e.to_string();
            assert!(
                text.starts_with("NATS is full: ") && text.contains(description),
                "{text}"
            );
        }
        let other = ack_error(&refused(10060, "expected stream does not match"));
        assert_eq!(other.kind().as_str(), "refused");
        let gone = ack_error(&no_answer(PublishErrorKind::StreamNotFound));
        assert_eq!(gone, PublishError::NoStream);
        assert_eq!(gone.kind().as_str(), "no_stream");
    }

    #[test]
    fn only_a_publish_that_got_no_answer_may_have_been_stored() {
        for (e, outcome) in [
            (
                no_answer(PublishErrorKind::TimedOut),
                AttemptOutcome::Unknown,
            ),
            (
                no_answer(PublishErrorKind::BrokenPipe),
                AttemptOutcome::Unknown,
            ),
            (no_answer(PublishErrorKind::Other), AttemptOutcome::Unknown),
            (
                refused(10060, "expected stream does not match"),
                AttemptOutcome::NotStored,
            ),
            (
                refused(10077, "maximum bytes exceeded"),
                AttemptOutcome::NotStored,
            ),
            (
                no_answer(PublishErrorKind::StreamNotFound),
                AttemptOutcome::NotStored,
            ),
            (
                no_answer(PublishErrorKind::MaxPayloadExceeded),
                AttemptOutcome::NotStored,
            ),
        ] {
            let failure = ack_error(&e);
            assert_eq!(failure.outcome(), outcome, "{failure:?}");
        }
        assert_eq!(
            ack_error(&no_answer(PublishErrorKind::TimedOut))
                .kind()
                .as_str(),
            "no_ack"
        );
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
