//! Domain types. Values from the outside world enter through `parse`, so a `Title` or a `Price`
//! that exists is a valid one ("parse, don't validate").

use bson::oid::ObjectId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest accepted title, in characters (not bytes).
pub const TITLE_MAX_CHARS: usize = 200;
/// Highest accepted price.
pub const PRICE_MAX: f64 = 1_000_000.0;

/// An ObjectId's 24 lowercase hex characters, on the stack. bson's `to_hex` builds its `String`
/// one `char` at a time, and ids are formatted several times in every write (a profile of the
/// SQLite writer applying order events put 6 % of its time there).
pub struct Hex([u8; 24]);

impl Hex {
    fn of(id: &ObjectId) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0; 24];
        for (pair, byte) in out.chunks_exact_mut(2).zip(id.bytes()) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        Self(out)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and letters were written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Exactly 24 hex characters (either case), as bson accepts them, read without the
    /// intermediate `Vec` of bson's parser.
    fn parse(s: &str) -> Option<ObjectId> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let text: &[u8; 24] = s.as_bytes().try_into().ok()?;
        let mut bytes = [0; 12];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(ObjectId::from_bytes(bytes))
    }
}

macro_rules! object_id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(ObjectId);

        /// JSON carries the 24-character hex string (BSON documents are built by the adapter).
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.hex().as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not an ObjectId: {s:?}")))
            }
        }

        impl $name {
            pub fn new() -> Self {
                Self(ObjectId::new())
            }
            /// Accepts exactly a 24-character hex ObjectId.
            pub fn parse(s: &str) -> Option<Self> {
                Hex::parse(s).map(Self)
            }
            pub fn object_id(&self) -> ObjectId {
                self.0
            }
            pub fn from_object_id(id: ObjectId) -> Self {
                Self(id)
            }
            pub fn to_hex(&self) -> String {
                self.hex().as_str().to_owned()
            }
            /// The hex, without allocating (stores bind it as text).
            pub fn hex(&self) -> Hex {
                Hex::of(&self.0)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.hex().as_str())
            }
        }
    };
}

object_id_newtype!(
    /// A ticket's id: a MongoDB ObjectId in every store, so URLs look the same everywhere.
    TicketId
);
object_id_newtype!(
    /// An outbox event's id; also the `Nats-Msg-Id` that lets JetStream drop a re-publish.
    EventId
);

/// Why a title is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TitleError {
    #[error("Title is required")]
    Blank,
    #[error("Title must be at most {TITLE_MAX_CHARS} characters")]
    TooLong,
}

/// A ticket title: not only whitespace, at most [`TITLE_MAX_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Title(String);

impl Title {
    pub fn parse(s: &str) -> Result<Self, TitleError> {
        if s.trim().is_empty() {
            return Err(TitleError::Blank);
        }
        if s.chars().count() > TITLE_MAX_CHARS {
            return Err(TitleError::TooLong);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a price is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// Not a finite number above 0 (or, as text, not plain decimal notation).
    #[error("Price must be greater than 0")]
    NotPositive,
    #[error("Price must be at most {PRICE_MAX}")]
    TooHigh,
}

/// A price: a finite number greater than 0 and at most [`PRICE_MAX`]; always stored as a number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price(f64);

impl Price {
    pub fn new(n: f64) -> Result<Self, PriceError> {
        if !n.is_finite() || n <= 0.0 {
            return Err(PriceError::NotPositive);
        }
        if n > PRICE_MAX {
            return Err(PriceError::TooHigh);
        }
        Ok(Self(n))
    }

    /// A price written as text, as the course's React client sends it (`"20.00"`): plain
    /// decimal notation only ("20", "20.00", ".5"; no "inf", "NaN", "1e3", hex), around spaces.
    pub fn parse(s: &str) -> Result<Self, PriceError> {
        let s = s.trim();
        let plain = !s.is_empty()
            && s.chars().all(|c| c.is_ascii_digit() || c == '.')
            && s.chars().filter(|&c| c == '.').count() <= 1
            && s.chars().any(|c| c.is_ascii_digit());
        if !plain {
            return Err(PriceError::NotPositive);
        }
        Self::new(s.parse::<f64>().map_err(|_| PriceError::NotPositive)?)
    }

    pub fn value(&self) -> f64 {
        self.0
    }
}

/// The id of a signed-in user: the `id` claim of their JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.trim().is_empty() && s.len() <= 256;
        ok.then(|| Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A ticket as stored and as served over HTTP. Its JSON is also the payload (`data`) of the
/// `ticket.created` / `ticket.updated` events: `{id, title, price, userId, version}` and
/// `orderId` only when set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ticket {
    /// MongoDB ObjectId, 24 hex characters.
    #[schema(value_type = String, pattern = "^[0-9a-f]{24}$")]
    pub id: TicketId,
    pub title: String,
    #[schema(exclusive_minimum = 0.0, maximum = 1000000.0)]
    pub price: f64,
    pub user_id: String,
    /// 0 when created, +1 per update.
    #[schema(minimum = 0)]
    pub version: i64,
    /// The order reserving the ticket; absent when it is not reserved.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(nullable = false)]
    pub order_id: Option<String>,
}

/// What a create request carries once parsed.
#[derive(Debug, Clone)]
pub struct NewTicket {
    pub title: Title,
    pub price: Price,
    pub user_id: UserId,
}

/// What an update request changes once parsed.
#[derive(Debug, Clone)]
pub struct TicketChanges {
    pub title: Title,
    pub price: Price,
}

/// Event subjects, as the course's `common` package names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Subject {
    #[serde(rename = "ticket.created")]
    TicketCreated,
    #[serde(rename = "ticket.updated")]
    TicketUpdated,
}

impl Subject {
    pub fn as_str(&self) -> &'static str {
        match self {
            Subject::TicketCreated => "ticket.created",
            Subject::TicketUpdated => "ticket.updated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ticket.created" => Some(Subject::TicketCreated),
            "ticket.updated" => Some(Subject::TicketUpdated),
            _ => None,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a failed attempt leaves known about the stream.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub enum AttemptOutcome {
    /// Refused before it was sent, or refused by the server: the stream does not hold it.
    NotStored,
    /// Sent, and no answer came (ack timeout, connection dropped): the stream may hold it. A
    /// record from before outcomes were kept reads as this, the safe assumption.
    #[default]
    Unknown,
}

impl AttemptOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            AttemptOutcome::NotStored => "notStored",
            AttemptOutcome::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "notStored" => Some(AttemptOutcome::NotStored),
            "unknown" => Some(AttemptOutcome::Unknown),
            _ => None,
        }
    }
}

/// One failed publish attempt, kept on the event (the last [`FAILURES_KEPT`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub at: DateTime<Utc>,
    pub error: String,
    #[serde(default)]
    pub outcome: AttemptOutcome,
}

/// How many failures an event keeps; `attempts` counts them all.
pub const FAILURES_KEPT: usize = 10;

/// An event's payload: JSON text, serialised once when the event is made and carried as that
/// text to the store, back from it, and to NATS (no `serde_json::Value` in between).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload(String);

impl Payload {
    /// The JSON of `value`.
    pub fn of<T: Serialize>(value: &T) -> serde_json::Result<Self> {
        serde_json::to_string(value).map(Self)
    }

    /// JSON text read back from a store: checked to be one JSON value, without building it.
    pub fn parse(text: String) -> serde_json::Result<Self> {
        serde_json::from_str::<serde::de::IgnoredAny>(&text)?;
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The payload as a JSON value (stores that keep documents, snapshots shown to people).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

/// In a serialised event (an alert's snapshot) the payload is the JSON value itself, not a string.
impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Payload::of(&value).map_err(serde::de::Error::custom)
    }
}

/// A row of the `events` table / a document of the `events` collection: one undelivered event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxEvent {
    pub id: EventId,
    pub subject: Subject,
    /// The payload published to NATS, built from the row as the transaction stored it.
    pub data: Payload,
    /// The ticket the event is about; events of one aggregate are published in `version` order.
    pub aggregate_id: TicketId,
    pub version: i64,
    pub is_locked: bool,
    pub locked_until: DateTime<Utc>,
    /// Who holds the lock: `None` on a fresh event (reserved for the change feed's first attempt).
    pub locked_by: Option<String>,
    pub failures: Vec<Failure>,
    pub attempts: i64,
    pub created_at: DateTime<Utc>,
    /// When the "needs a human" alert was queued, if it was.
    pub alerted_at: Option<DateTime<Utc>>,
    /// When the earliest attempt whose outcome is unknown was sent, while no read of the stream
    /// has shown it absent since: the stream may hold the event from then on.
    pub unknown_since: Option<DateTime<Utc>>,
}

impl OutboxEvent {
    /// The event a ticket change produces, locked for the change feed until `lease` has passed.
    pub fn for_ticket(
        subject: Subject,
        ticket: &Ticket,
        now: DateTime<Utc>,
        lease: chrono::Duration,
    ) -> Self {
        Self {
            id: EventId::new(),
            subject,
            // A `Ticket` has no map with non-string keys: serialising it cannot fail.
            data: Payload::of(ticket).unwrap_or_else(|_| Payload("null".to_owned())),
            aggregate_id: ticket.id,
            version: ticket.version,
            is_locked: true,
            locked_until: now + lease,
            locked_by: None,
            failures: Vec::new(),
            attempts: 0,
            created_at: now,
            alerted_at: None,
            unknown_since: None,
        }
    }

    pub fn last_error(&self) -> Option<&str> {
        self.failures.last().map(|f| f.error.as_str())
    }

    /// What people are shown of an event (alerts, `ticketing outbox list --json`): id, subject,
    /// aggregateId, version, attempts, lastError, createdAt.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "subject": self.subject,
            "aggregateId": self.aggregate_id,
            "version": self.version,
            "attempts": self.attempts,
            "lastError": self.last_error(),
            "createdAt": self.created_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::str::FromStr;

    #[test]
    fn title_rejects_empty_blank_and_too_long() {
        for raw in ["", "   \t"] {
            assert_eq!(Title::parse(raw), Err(TitleError::Blank));
        }
        assert_eq!(TitleError::Blank.to_string(), "Title is required");
        let long = "é".repeat(TITLE_MAX_CHARS + 1);
        assert_eq!(Title::parse(&long), Err(TitleError::TooLong));
        let max = "é".repeat(TITLE_MAX_CHARS);
        assert_eq!(Title::parse(&max).unwrap().as_str(), max);
    }

    #[test]
    fn price_accepts_numbers_and_decimal_text() {
        assert_eq!(Price::new(20.0).unwrap().value(), 20.0);
        assert_eq!(Price::parse("20.00").unwrap().value(), 20.0);
        assert_eq!(Price::parse(" 0.5 ").unwrap().value(), 0.5);
        assert_eq!(Price::parse(".5").unwrap().value(), 0.5);
        assert_eq!(Price::new(PRICE_MAX).unwrap().value(), PRICE_MAX);
    }

    #[test]
    fn price_rejects_non_positive_non_finite_and_non_decimal() {
        for n in [0.0, -10.0, f64::NAN, f64::INFINITY] {
            assert_eq!(Price::new(n), Err(PriceError::NotPositive), "{n}");
        }
        for text in [
            "abc", "NaN", "inf", "1e3", "-1", "", ".", "0", "1.2.3", "0x10",
        ] {
            assert_eq!(Price::parse(text), Err(PriceError::NotPositive), "{text:?}");
        }
        assert_eq!(Price::new(PRICE_MAX * 2.0), Err(PriceError::TooHigh));
        assert_eq!(
            PriceError::TooHigh.to_string(),
            "Price must be at most 1000000"
        );
    }

    #[test]
    fn ticket_json_has_order_id_only_when_set() {
        let mut t = Ticket {
            id: TicketId::new(),
            title: "concert".into(),
            price: 10.0,
            user_id: "u1".into(),
            version: 0,
            order_id: None,
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 5);
        assert_eq!(v["id"], json!(t.id.to_hex()));
        assert_eq!(v["userId"], json!("u1"));
        t.order_id = Some("o1".into());
        assert_eq!(serde_json::to_value(&t).unwrap()["orderId"], json!("o1"));
    }

    #[test]
    fn ids_parse_only_object_id_hex() {
        assert!(TicketId::parse("not-an-id").is_none());
        assert!(TicketId::parse("507f1f77bcf86cd79943901").is_none());
        let id = TicketId::new();
        assert_eq!(TicketId::parse(&id.to_hex()), Some(id));
    }

    #[test]
    fn ids_print_as_bson_prints_them() {
        for hex in [
            "000000000000000000000000",
            "507f1f77bcf86cd799439011",
            "ffffffffffffffffffffffff",
        ] {
            let id = TicketId::parse(hex).unwrap();
            assert_eq!(id.to_hex(), id.object_id().to_hex());
            assert_eq!(id.to_hex(), hex);
            assert_eq!(id.to_string(), hex);
            assert_eq!(serde_json::to_value(id).unwrap(), json!(hex));
        }
        let id = EventId::new();
        assert_eq!(id.to_hex(), id.object_id().to_hex());
    }

    #[test]
    fn ids_parse_as_bson_parses_them() {
        let cases = [
            "507f1f77bcf86cd799439011",
            "507F1F77BCF86CD799439011",
            "507f1f77bcf86cd79943901",
            "507f1f77bcf86cd7994390111",
            "507f1f77bcf86cd79943901g",
            "507f1f77bcf86cd79943901-",
            " 07f1f77bcf86cd799439011",
            "",
            "ééééééééééé",
            "507f1f77bcf86cd79943901é",
        ];
        for s in cases {
            let ours = TicketId::parse(s).map(|t| t.object_id());
            assert_eq!(ours, ObjectId::from_str(s).ok(), "{s:?}");
        }
    }

    #[test]
    fn a_payload_is_the_json_text_and_an_event_snapshot_embeds_it_as_json() {
        let ticket = Ticket {
            id: TicketId::new(),
            title: "concert".into(),
            price: 20.5,
            user_id: "u1".into(),
            version: 3,
            order_id: None,
        };
        let event = OutboxEvent::for_ticket(
            Subject::TicketUpdated,
            &ticket,
            Utc::now(),
            chrono::Duration::seconds(30),
        );
        assert_eq!(
            event.data.as_str(),
            serde_json::to_string(&ticket).expect("json")
        );
        // In a snapshot (alerts) `data` is the ticket object, not a string, and comes back equal.
        let snapshot = serde_json::to_value(&event).expect("snapshot");
        assert_eq!(snapshot["data"]["title"], json!("concert"));
        let back: OutboxEvent = serde_json::from_value(snapshot).expect("back");
        assert_eq!(back.data, event.data);
        // Text read back from a store must be one JSON value.
        assert!(Payload::parse(r#"{"id":"x"}"#.to_owned()).is_ok());
        assert!(Payload::parse("{\"id\":".to_owned()).is_err());
        assert!(Payload::parse("{} {}".to_owned()).is_err());
    }

    /// A double that needs all 17 digits, one of those JSON parsing without `float_roundtrip`
    /// reads one unit in the last place off (about 10 % of random doubles under 1,000,000 were).
    const SEVENTEEN_DIGITS: f64 = 394_301.338_356_336_75;

    #[test]
    fn a_price_sent_as_a_number_or_as_text_is_the_nearest_double() {
        let body: serde_json::Value =
            serde_json::from_str(r#"{"n": 394301.33835633675}"#).expect("json");
        let number = body["n"].as_f64().expect("a number");
        for price in [Price::new(number), Price::parse("394301.33835633675")] {
            let price = price.expect("valid price");
            assert_eq!(price.value().to_bits(), SEVENTEEN_DIGITS.to_bits());
        }
    }

    #[test]
    fn a_payload_keeps_the_price_bit_for_bit_through_a_json_value() {
        // The MongoDB adapter stores a payload as a document: text -> Value -> BSON.
        let ticket = Ticket {
            id: TicketId::new(),
            title: "concert".into(),
            price: SEVENTEEN_DIGITS,
            user_id: "u1".into(),
            version: 0,
            order_id: None,
        };
        let payload = Payload::of(&ticket).expect("json");
        let price = payload.to_value()["price"].as_f64().expect("a number");
        assert_eq!(price.to_bits(), ticket.price.to_bits());
        let back: Ticket = serde_json::from_value(payload.to_value()).expect("a ticket");
        assert_eq!(back, ticket);
    }
}
