//! What the JetStream streams this service creates keep, and on how many servers, as plain
//! functions: the limits and replicas a stream is created with, how an existing stream differs
//! from them (reported, never changed), whether the limits keep what the outbox relies on, and
//! whether a refused publish means NATS is full.

use async_nats::jetstream::stream::{self, DiscardPolicy};
use std::time::Duration;

/// Retention and replication of the streams this service creates (`NATS_STREAM_MAX_AGE_SECS`,
/// `NATS_STREAM_MAX_BYTES`, `NATS_STREAM_REPLICAS`): past either limit the oldest messages are
/// discarded, so a full stream never refuses an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPolicy {
    /// Messages older than this are discarded.
    pub max_age: Duration,
    /// The stream's size cap in bytes; `None`: only the server's storage bounds it.
    pub max_bytes: Option<u64>,
    /// Servers holding a copy of the stream: 3 keeps it writable while one of them is down.
    pub replicas: usize,
}

/// `NATS_STREAM_MAX_AGE_SECS`' default: 7 days.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for StreamPolicy {
    fn default() -> Self {
        Self {
            max_age: DEFAULT_MAX_AGE,
            max_bytes: None,
            replicas: 1,
        }
    }
}

impl StreamPolicy {
    /// `config` with this policy's limits and replicas, discarding the oldest messages.
    pub fn apply(&self, config: stream::Config) -> stream::Config {
        stream::Config {
            max_age: self.max_age,
            max_bytes: self
                .max_bytes
                .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            discard: DiscardPolicy::Old,
            num_replicas: self.replicas,
            ..config
        }
    }
}

/// How an existing stream's limits and replicas differ from those this service would create it
/// with, one phrase each ("max age unlimited, not 604800 s"); empty when they agree. The server
/// writes "unlimited" as 0 (age) or -1 (bytes, messages), and one replica as 0 or 1.
pub fn differences(wanted: &stream::Config, existing: &stream::Config) -> Vec<String> {
    let mut found = Vec::new();
    if existing.num_replicas.max(1) != wanted.num_replicas.max(1) {
        found.push(format!(
            "replicas {}, not {}",
            existing.num_replicas.max(1),
            wanted.num_replicas.max(1)
        ));
    }
    if existing.max_age != wanted.max_age {
        found.push(format!(
            "max age {}, not {}",
            age(existing.max_age),
            age(wanted.max_age)
        ));
    }
    if bytes_limit(existing.max_bytes) != bytes_limit(wanted.max_bytes) {
        found.push(format!(
            "max bytes {}, not {}",
            bytes(existing.max_bytes),
            bytes(wanted.max_bytes)
        ));
    }
    if bytes_limit(existing.max_messages) != bytes_limit(wanted.max_messages) {
        found.push(format!(
            "max messages {}, not {}",
            bytes(existing.max_messages),
            bytes(wanted.max_messages)
        ));
    }
    if existing.discard != wanted.discard {
        found.push(format!(
            "discard {}, not {}",
            discard(existing.discard),
            discard(wanted.discard)
        ));
    }
    if existing.duplicate_window != wanted.duplicate_window {
        found.push(format!(
            "duplicate window {} s, not {} s",
            existing.duplicate_window.as_secs(),
            wanted.duplicate_window.as_secs()
        ));
    }
    found
}

fn bytes_limit(limit: i64) -> Option<i64> {
    (limit > 0).then_some(limit)
}

fn age(d: Duration) -> String {
    if d.is_zero() {
        "unlimited".to_owned()
    } else {
        format!("{} s", d.as_secs())
    }
}

fn bytes(limit: i64) -> String {
    bytes_limit(limit).map_or_else(|| "unlimited".to_owned(), |b| b.to_string())
}

fn discard(policy: DiscardPolicy) -> &'static str {
    match policy {
        DiscardPolicy::Old => "old",
        DiscardPolicy::New => "new",
    }
}

/// What the outbox needs a stream to keep, for its guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionNeeds {
    /// `NATS_DUPLICATE_WINDOW_SECS`: a re-publish within it is dropped as a duplicate; the
    /// stream's max age must exceed it, or JetStream shortens the window to the age.
    pub duplicate_window: Duration,
    /// The retry horizon that looking up a possibly-stored event needs (the outages issue,
    /// #17): how old a message the outbox may still look for in the stream to learn whether an
    /// attempt whose ack was lost got through. `None` while nothing looks events up.
    pub lookup_horizon: Option<Duration>,
}

/// Why `max_age` is too short for `needs`, or `None` when it keeps what the outbox relies on.
pub fn retention_problem(max_age: Duration, needs: &RetentionNeeds) -> Option<String> {
    if max_age <= needs.duplicate_window {
        return Some(format!(
            "NATS_STREAM_MAX_AGE_SECS ({}) must be longer than NATS_DUPLICATE_WINDOW_SECS ({}): \
             JetStream drops a re-published event as a duplicate only while it remembers the \
             first copy",
            max_age.as_secs(),
            needs.duplicate_window.as_secs()
        ));
    }
    if let Some(horizon) = needs.lookup_horizon
        && max_age <= horizon
    {
        return Some(format!(
            "NATS_STREAM_MAX_AGE_SECS ({}) must be longer than the {} s during which the outbox \
             may look an event up in the stream to learn whether an earlier attempt stored it",
            max_age.as_secs(),
            horizon.as_secs()
        ));
    }
    None
}

/// JetStream error codes that mean "no room": the server's or the account's storage is used up
/// (10023 insufficient resources, 10047 insufficient storage, 10028 insufficient memory,
/// 10002 account resource limits).
const FULL_CODES: [u64; 4] = [10023, 10047, 10028, 10002];
/// "Stream store failed" (10077) is "no room" when its text says a stream limit was reached
/// (a stream that discards new messages).
const STORE_FAILED: u64 = 10077;

/// Whether JetStream refused a message because the stream or the server is full: its error code
/// and its text.
pub fn is_full(error_code: u64, text: &str) -> bool {
    FULL_CODES.contains(&error_code)
        || (error_code == STORE_FAILED
            && ["maximum bytes exceeded", "maximum messages exceeded"]
                .iter()
                .any(|t| text.contains(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> stream::Config {
        StreamPolicy::default().apply(stream::Config {
            name: "ticketing".into(),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
    }

    #[test]
    fn a_stream_is_created_with_the_policy_discarding_old_messages() {
        let config = StreamPolicy {
            max_age: Duration::from_secs(3600),
            max_bytes: Some(1 << 30),
            replicas: 3,
        }
        .apply(stream::Config::default());
        assert_eq!(config.max_age, Duration::from_secs(3600));
        assert_eq!(config.max_bytes, 1 << 30);
        assert_eq!(config.discard, DiscardPolicy::Old);
        assert_eq!(config.num_replicas, 3);
        let unbounded = StreamPolicy::default().apply(stream::Config::default());
        assert_eq!(unbounded.max_age, Duration::from_secs(604_800));
        assert_eq!(unbounded.max_bytes, -1, "-1: no byte limit");
        assert_eq!(unbounded.num_replicas, 1);
    }

    #[test]
    fn the_same_limits_as_the_server_writes_them_do_not_differ() {
        let mut existing = wanted();
        existing.num_replicas = 1;
        existing.max_messages = -1;
        assert!(differences(&wanted(), &existing).is_empty());
        let mut zero = wanted();
        zero.max_bytes = 0;
        zero.num_replicas = 0;
        assert!(differences(&wanted(), &zero).is_empty(), "0 and -1: none");
    }

    #[test]
    fn each_other_limit_is_named() {
        // A stream of an earlier release: no limits at all.
        let old = stream::Config {
            name: "ticketing".into(),
            duplicate_window: Duration::from_secs(120),
            max_bytes: -1,
            max_messages: -1,
            ..Default::default()
        };
        assert_eq!(
            differences(&wanted(), &old),
            ["max age unlimited, not 604800 s"]
        );
        let mut other = wanted();
        other.max_bytes = 1000;
        other.max_messages = 10;
        other.discard = DiscardPolicy::New;
        other.duplicate_window = Duration::from_secs(60);
        other.num_replicas = 3;
        assert_eq!(
            differences(&wanted(), &other),
            [
                "replicas 3, not 1",
                "max bytes 1000, not unlimited",
                "max messages 10, not unlimited",
                "discard new, not old",
                "duplicate window 60 s, not 120 s",
            ]
        );
    }

    #[test]
    fn the_age_must_outlast_the_duplicate_window_and_the_lookup_horizon() {
        let needs = RetentionNeeds {
            duplicate_window: Duration::from_secs(120),
            lookup_horizon: None,
        };
        assert_eq!(retention_problem(DEFAULT_MAX_AGE, &needs), None);
        assert_eq!(retention_problem(Duration::from_secs(121), &needs), None);
        let refused = retention_problem(Duration::from_secs(120), &needs).expect("refused");
        assert!(
            refused.contains("NATS_STREAM_MAX_AGE_SECS (120)")
                && refused.contains("NATS_DUPLICATE_WINDOW_SECS (120)"),
            "{refused}"
        );
        let looking = RetentionNeeds {
            lookup_horizon: Some(Duration::from_secs(86_400)),
            ..needs
        };
        assert_eq!(retention_problem(DEFAULT_MAX_AGE, &looking), None);
        let short = retention_problem(Duration::from_secs(3600), &looking).expect("refused");
        assert!(short.contains("86400 s"), "{short}");
    }

    #[test]
    fn full_is_told_from_other_refusals() {
        // As nats-server 2.9 answers: a full server, a stream full with discard new.
        assert!(is_full(
            10023,
            "insufficient resources (code 503, error code 10023)"
        ));
        assert!(is_full(
            10077,
            "maximum bytes exceeded (code 503, error code 10077)"
        ));
        assert!(is_full(10047, "insufficient storage resources available"));
        assert!(!is_full(10077, "message too large"));
        assert!(!is_full(10060, "expected stream does not match"));
        assert!(!is_full(0, "timed out: didn't receive ack in time"));
    }
}
