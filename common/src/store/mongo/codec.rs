//! Documents to values and back. Field names are the SQLite columns' in camelCase; times are
//! BSON dates (milliseconds, as every time the outbox makes: `outbox::rules::now`); an event's
//! payload is stored as a document, so it is converted through a JSON value both ways.
//!
//! - `tickets` `{_id: ObjectId, title, price: double, userId, version: long, orderId?}`
//! - `events` `{_id: ObjectId, subject, data: {..the ticket JSON..}, aggregateId: ObjectId,
//!   version, isLocked, lockedUntil: date, lockedBy: string|null, failures: [{at, error,
//!   outcome}], attempts, createdAt: date, alertedAt: date|null, unknownSince: date|null}`
//! - `alerts` `{_id: "{eventId}:{kind}", kind, event: {..an events document..}, createdAt,
//!   attempts, lockedUntil, lockedBy}`; a parked message's: `{_id: "inbox:{messageId}:parked",
//!   kind: "parked", message: {..its snapshot..}, ...}`
//! - `feed_positions` `{_id: "change-feed", position: string}`
//! - `inbox` `{_id: messageId, subject, stream, sequence: long, orderId: string|null, ticketId:
//!   ObjectId|null, outcome, reason: string|null, deliveries: long, payload: binary, receivedAt:
//!   date, doneAt: date|null}`
//! - `alert_digests` `{_id: kind, sentAt: date}`
//!
//! Writes of `lockedUntil` are update pipelines that take the time from the server (`$$NOW`):
//! a lease is measured on one clock, the primary's, whatever the pods' clocks say. Every other
//! value in a pipeline is a `$literal`, so a string starting with `$` (a title, a claimer's
//! name) is never read as a field path.

use crate::domain::{
    AttemptOutcome, EventId, Failure, OutboxEvent, Payload, Subject, Ticket, TicketId,
};
use crate::inbox::{InboxRecord, Outcome};
use crate::outbox::{Alert, AlertAbout, AlertKind};
use crate::store::StoreError;
use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use chrono::{DateTime, Utc};
use std::collections::HashMap;

/// A `find` limit: MongoDB takes an i64.
pub(super) fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

pub(super) fn to_bson_date(t: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis())
}

fn corrupt(collection: &str, d: &Document, field: &str, what: &str) -> StoreError {
    let id = d
        .get("_id")
        .map(ToString::to_string)
        .unwrap_or_else(|| "?".into());
    StoreError::Corrupt(format!("{collection} {id}: field `{field}` {what}"))
}

/// Typed field access with [`StoreError::Corrupt`] naming the document and the field.
pub(super) struct Fields<'a> {
    collection: &'static str,
    doc: &'a Document,
}

impl<'a> Fields<'a> {
    pub(super) fn new(collection: &'static str, doc: &'a Document) -> Self {
        Self { collection, doc }
    }

    pub(super) fn bad(&self, field: &str, what: &str) -> StoreError {
        corrupt(self.collection, self.doc, field, what)
    }

    pub(super) fn get(&self, field: &str) -> Result<&'a Bson, StoreError> {
        self.doc
            .get(field)
            .ok_or_else(|| self.bad(field, "is missing"))
    }

    /// `None` when missing or null.
    pub(super) fn opt(&self, field: &str) -> Option<&'a Bson> {
        self.doc.get(field).filter(|v| !matches!(v, Bson::Null))
    }

    pub(super) fn oid(&self, field: &str) -> Result<ObjectId, StoreError> {
        match self.get(field)? {
            Bson::ObjectId(id) => Ok(*id),
            _ => Err(self.bad(field, "is not an ObjectId")),
        }
    }

    pub(super) fn str(&self, field: &str) -> Result<&'a str, StoreError> {
        match self.get(field)? {
            Bson::String(s) => Ok(s),
            _ => Err(self.bad(field, "is not a string")),
        }
    }

    pub(super) fn opt_str(&self, field: &str) -> Result<Option<String>, StoreError> {
        match self.opt(field) {
            None => Ok(None),
            Some(Bson::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(field, "is not a string")),
        }
    }

    pub(super) fn i64(&self, field: &str) -> Result<i64, StoreError> {
        match self.get(field)? {
            Bson::Int64(n) => Ok(*n),
            Bson::Int32(n) => Ok(i64::from(*n)),
            _ => Err(self.bad(field, "is not an integer")),
        }
    }

    pub(super) fn f64(&self, field: &str) -> Result<f64, StoreError> {
        match self.get(field)? {
            Bson::Double(n) => Ok(*n),
            Bson::Int32(n) => Ok(f64::from(*n)),
            Bson::Int64(n) => Ok(*n as f64),
            _ => Err(self.bad(field, "is not a number")),
        }
    }

    pub(super) fn bool(&self, field: &str) -> Result<bool, StoreError> {
        match self.get(field)? {
            Bson::Boolean(b) => Ok(*b),
            _ => Err(self.bad(field, "is not a boolean")),
        }
    }

    pub(super) fn date(&self, field: &str) -> Result<DateTime<Utc>, StoreError> {
        match self.get(field)? {
            Bson::DateTime(t) => Ok(t.to_chrono()),
            _ => Err(self.bad(field, "is not a date")),
        }
    }

    pub(super) fn opt_date(&self, field: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self.opt(field) {
            None => Ok(None),
            Some(Bson::DateTime(t)) => Ok(Some(t.to_chrono())),
            Some(_) => Err(self.bad(field, "is not a date")),
        }
    }

    pub(super) fn doc(&self, field: &str) -> Result<&'a Document, StoreError> {
        match self.get(field)? {
            Bson::Document(d) => Ok(d),
            _ => Err(self.bad(field, "is not a document")),
        }
    }

    pub(super) fn array(&self, field: &str) -> Result<&'a Vec<Bson>, StoreError> {
        match self.get(field)? {
            Bson::Array(a) => Ok(a),
            _ => Err(self.bad(field, "is not an array")),
        }
    }
}

pub(super) fn ticket_doc(t: &Ticket) -> Document {
    let mut d = doc! {
        "_id": t.id.object_id(),
        "title": &t.title,
        "price": t.price,
        "userId": &t.user_id,
        "version": t.version,
    };
    if let Some(order) = &t.order_id {
        d.insert("orderId", order);
    }
    d
}

pub(super) fn ticket_from_doc(d: &Document) -> Result<Ticket, StoreError> {
    let f = Fields::new("tickets", d);
    Ok(Ticket {
        id: TicketId::from_object_id(f.oid("_id")?),
        title: f.str("title")?.to_owned(),
        price: f.f64("price")?,
        user_id: f.str("userId")?.to_owned(),
        version: f.i64("version")?,
        order_id: f.opt_str("orderId")?,
    })
}

pub(super) fn event_doc(e: &OutboxEvent) -> Document {
    let mut d = doc! {
        "_id": e.id.object_id(),
        "subject": e.subject.as_str(),
        "data": json_to_bson(&e.data.to_value()),
        "aggregateId": e.aggregate_id.object_id(),
        "version": e.version,
        "createdAt": to_bson_date(e.created_at),
    };
    d.extend(event_state(e));
    d
}

/// The fields of an event that its claims and attempts change (a failure writes all of them).
pub(super) fn event_state(e: &OutboxEvent) -> Document {
    let failures: Vec<Bson> = e
        .failures
        .iter()
        .map(|f| {
            Bson::Document(doc! {
                "at": to_bson_date(f.at),
                "error": &f.error,
                "outcome": f.outcome.as_str(),
            })
        })
        .collect();
    doc! {
        "isLocked": e.is_locked,
        "lockedUntil": to_bson_date(e.locked_until),
        "lockedBy": e.locked_by.clone().map_or(Bson::Null, Bson::String),
        "failures": failures,
        "attempts": e.attempts,
        "alertedAt": e.alerted_at.map_or(Bson::Null, |t| Bson::DateTime(to_bson_date(t))),
        "unknownSince": e.unknown_since.map_or(Bson::Null, |t| Bson::DateTime(to_bson_date(t))),
    }
}

pub(super) fn event_from_doc(d: &Document) -> Result<OutboxEvent, StoreError> {
    let f = Fields::new("events", d);
    let subject = f.str("subject")?;
    let failures = f
        .array("failures")?
        .iter()
        .map(|item| match item {
            Bson::Document(fd) => {
                let ff = Fields::new("events", fd);
                // A failure stored before outcomes were kept reads as unknown (the safe side).
                let outcome = match ff.opt_str("outcome")? {
                    None => AttemptOutcome::Unknown,
                    Some(o) => AttemptOutcome::parse(&o).ok_or_else(|| {
                        f.bad("failures", &format!("holds an unknown outcome {o:?}"))
                    })?,
                };
                Ok(Failure {
                    at: ff.date("at")?,
                    error: ff.str("error")?.to_owned(),
                    outcome,
                })
            }
            _ => Err(f.bad("failures", "holds a value that is not a document")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(OutboxEvent {
        id: EventId::from_object_id(f.oid("_id")?),
        subject: Subject::parse(subject)
            .ok_or_else(|| f.bad("subject", &format!("is unknown: {subject:?}")))?,
        data: Payload::of(&bson_to_json(&Bson::Document(f.doc("data")?.clone())))
            .map_err(|e| f.bad("data", &format!("cannot be encoded as JSON: {e}")))?,
        aggregate_id: TicketId::from_object_id(f.oid("aggregateId")?),
        version: f.i64("version")?,
        is_locked: f.bool("isLocked")?,
        locked_until: f.date("lockedUntil")?,
        locked_by: f.opt_str("lockedBy")?,
        failures,
        attempts: f.i64("attempts")?,
        created_at: f.date("createdAt")?,
        alerted_at: f.opt_date("alertedAt")?,
        unknown_since: f.opt_date("unknownSince")?,
    })
}

/// A new alert's document: due at once, held by nobody. What it is about is `event` (an events
/// document) or, for `parked`, `message` (the parked message's snapshot).
pub(super) fn alert_doc(a: &Alert) -> Document {
    let created = to_bson_date(a.created_at);
    let mut d = doc! {"_id": &a.id, "kind": a.kind.as_str()};
    match &a.about {
        AlertAbout::Event(e) => d.insert("event", event_doc(e)),
        AlertAbout::Message(m) => d.insert(
            "message",
            json_to_bson(&serde_json::to_value(m).unwrap_or_default()),
        ),
    };
    d.extend(doc! {
        "createdAt": created,
        "attempts": a.attempts,
        "lockedUntil": created,
        "lockedBy": Bson::Null,
    });
    d
}

/// The upsert (filter, pipeline) that queues an alert, due at the server's now, unless one with
/// its id is queued already: then every field keeps its value (`$ifNull`, the pipeline form of
/// `$setOnInsert`; no field of a queued alert is null but `lockedBy`, which stays null).
pub(super) fn alert_upsert(a: &Alert) -> (Document, Vec<Document>) {
    let mut fields = alert_doc(a);
    fields.remove("_id");
    fields.remove("lockedUntil");
    let mut set: Document = fields
        .into_iter()
        .map(|(k, v)| {
            let keep = Bson::Document(doc! {"$ifNull": [format!("${k}"), literal(v)]});
            (k, keep)
        })
        .collect();
    set.insert("lockedUntil", doc! {"$ifNull": ["$lockedUntil", "$$NOW"]});
    (doc! {"_id": &a.id}, vec![doc! {"$set": set}])
}

pub(super) fn alert_from_doc(d: &Document) -> Result<Alert, StoreError> {
    let f = Fields::new("alerts", d);
    let kind = f.str("kind")?;
    let kind =
        AlertKind::parse(kind).ok_or_else(|| f.bad("kind", &format!("is unknown: {kind:?}")))?;
    let about = match kind {
        AlertKind::Parked => {
            let message = bson_to_json(&Bson::Document(f.doc("message")?.clone()));
            AlertAbout::Message(
                serde_json::from_value(message).map_err(|e| f.bad("message", &e.to_string()))?,
            )
        }
        AlertKind::Firing | AlertKind::Resolved => {
            AlertAbout::Event(event_from_doc(f.doc("event")?)?)
        }
    };
    Ok(Alert {
        id: f.str("_id")?.to_owned(),
        kind,
        about,
        created_at: f.date("createdAt")?,
        attempts: f.i64("attempts")?,
    })
}

/// A value a pipeline stage takes as it is (see the module's comment).
pub(super) fn literal(v: impl Into<Bson>) -> Bson {
    Bson::Document(doc! {"$literal": v.into()})
}

/// The `$set` fields of `fields`, each as a [`literal`].
fn literals(fields: Document) -> Document {
    fields.into_iter().map(|(k, v)| (k, literal(v))).collect()
}

/// The server's time now plus `ms` milliseconds (negative: in the past).
fn server_now_plus(ms: i64) -> Bson {
    Bson::Document(doc! {"$add": ["$$NOW", ms]})
}

/// What is left of a lease, in milliseconds (negative when it has run out), measured on the
/// claimer's clock, where the lease was made: the stored lease runs as long from the server's
/// now, so skew between the pods' clocks does not move it.
pub(super) fn lease_left_ms(until: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    (until - now).num_milliseconds()
}

/// The upsert (filter, pipeline) of a ticket write's event: inserted as [`event_doc`] says, but
/// reserved for the change feed until the server's now plus `fresh_lock_ms`. An upsert that
/// inserts is an insert for the change stream, and for the unique `(aggregateId, version)`.
pub(super) fn fresh_event_upsert(e: &OutboxEvent, fresh_lock_ms: i64) -> (Document, Vec<Document>) {
    let mut fields = event_doc(e);
    fields.remove("_id");
    fields.remove("lockedUntil");
    let mut set = literals(fields);
    set.insert("lockedUntil", server_now_plus(fresh_lock_ms));
    (doc! {"_id": e.id.object_id()}, vec![doc! {"$set": set}])
}

/// The pipeline that claims an event for `token` until the server's now plus `lease_ms`.
pub(super) fn claim_pipeline(token: &str, lease_ms: i64) -> Vec<Document> {
    vec![doc! {"$set": {
        "isLocked": literal(true),
        "lockedBy": literal(token),
        "lockedUntil": server_now_plus(lease_ms),
    }}]
}

/// The pipeline that unlocks an event, held by nobody and due at the server's now.
pub(super) fn unlock_pipeline() -> Vec<Document> {
    vec![doc! {"$set": {
        "isLocked": literal(false),
        "lockedBy": literal(Bson::Null),
        "lockedUntil": "$$NOW",
    }}]
}

/// The pipeline that stores a failed attempt ([`event_state`] as the failure rule left it),
/// due at the server's now.
pub(super) fn failed_pipeline(e: &OutboxEvent) -> Vec<Document> {
    let mut state = event_state(e);
    state.remove("lockedUntil");
    let mut set = literals(state);
    set.insert("lockedUntil", "$$NOW");
    vec![doc! {"$set": set}]
}

/// The pipeline that claims an alert for `token` until the server's now plus `lease_ms`.
pub(super) fn alert_claim_pipeline(token: &str, lease_ms: i64) -> Vec<Document> {
    vec![doc! {"$set": {
        "lockedBy": literal(token),
        "lockedUntil": server_now_plus(lease_ms),
    }}]
}

/// The pipeline that puts back an alert that was not sent: one more attempt, due at the
/// server's now.
pub(super) fn alert_release_pipeline(attempted: bool) -> Vec<Document> {
    vec![doc! {"$set": {
        "attempts": {"$add": ["$attempts", i64::from(attempted)]},
        "lockedBy": literal(Bson::Null),
        "lockedUntil": "$$NOW",
    }}]
}

/// An inbox record's document; `doneAt` is null while it is parked.
pub(super) fn inbox_doc(r: &InboxRecord) -> Document {
    let opt_str = |v: &Option<String>| v.clone().map_or(Bson::Null, Bson::String);
    doc! {
        "_id": &r.id,
        "subject": &r.subject,
        "stream": &r.stream,
        "sequence": i64::try_from(r.sequence).unwrap_or(i64::MAX),
        "orderId": opt_str(&r.order_id),
        "ticketId": r.ticket_id.map_or(Bson::Null, |t| Bson::ObjectId(t.object_id())),
        "outcome": r.outcome.as_str(),
        "reason": opt_str(&r.reason),
        "deliveries": r.deliveries,
        "payload": bson::Binary {
            subtype: bson::spec::BinarySubtype::Generic,
            bytes: r.payload.clone(),
        },
        "receivedAt": to_bson_date(r.received_at),
        "doneAt": r.done_at.map_or(Bson::Null, |t| Bson::DateTime(to_bson_date(t))),
    }
}

pub(super) fn inbox_from_doc(d: &Document) -> Result<InboxRecord, StoreError> {
    let f = Fields::new("inbox", d);
    let outcome = f.str("outcome")?;
    let ticket_id = match f.opt("ticketId") {
        None => None,
        Some(Bson::ObjectId(id)) => Some(TicketId::from_object_id(*id)),
        Some(_) => return Err(f.bad("ticketId", "is not an ObjectId")),
    };
    let payload = match f.get("payload")? {
        Bson::Binary(b) => b.bytes.clone(),
        Bson::String(s) => s.clone().into_bytes(),
        _ => return Err(f.bad("payload", "is not binary")),
    };
    Ok(InboxRecord {
        id: f.str("_id")?.to_owned(),
        subject: f.str("subject")?.to_owned(),
        stream: f.str("stream")?.to_owned(),
        sequence: u64::try_from(f.i64("sequence")?)
            .map_err(|_| f.bad("sequence", "is negative"))?,
        order_id: f.opt_str("orderId")?,
        ticket_id,
        outcome: Outcome::parse(outcome)
            .ok_or_else(|| f.bad("outcome", &format!("is unknown: {outcome:?}")))?,
        reason: f.opt_str("reason")?,
        deliveries: f.i64("deliveries")?,
        payload,
        received_at: f.date("receivedAt")?,
        done_at: f.opt_date("doneAt")?,
    })
}

/// JSON to BSON, explicitly: integers stay integers (Int64), other numbers are doubles, so the
/// payload reads back equal to `serde_json::to_value(ticket)`.
pub(super) fn json_to_bson(v: &serde_json::Value) -> Bson {
    use serde_json::Value;
    match v {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Bson::Int64(i),
            (None, Some(f)) => Bson::Double(f),
            (None, None) => Bson::Null,
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(items) => Bson::Array(items.iter().map(json_to_bson).collect()),
        Value::Object(map) => Bson::Document(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_bson(v)))
                .collect(),
        ),
    }
}

pub(super) fn bson_to_json(v: &Bson) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::Int32(n) => Value::from(*n),
        Bson::Int64(n) => Value::from(*n),
        Bson::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Bson::String(s) => Value::String(s.clone()),
        Bson::Array(items) => Value::Array(items.iter().map(bson_to_json).collect()),
        Bson::Document(d) => Value::Object(
            d.iter()
                .map(|(k, v)| (k.clone(), bson_to_json(v)))
                .collect(),
        ),
        Bson::ObjectId(id) => Value::String(id.to_hex()),
        Bson::DateTime(t) => Value::String(
            t.to_chrono()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        other => other.clone().into_relaxed_extjson(),
    }
}

pub(super) fn object_ids<'a, I: IntoIterator<Item = &'a EventId>>(ids: I) -> Vec<ObjectId> {
    ids.into_iter().map(EventId::object_id).collect()
}

/// `events` reordered as `order` lists their ids (any not in `order` last).
pub(super) fn in_order_of(mut events: Vec<OutboxEvent>, order: &[ObjectId]) -> Vec<OutboxEvent> {
    let rank: HashMap<ObjectId, usize> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    events.sort_by_key(|e| rank.get(&e.id.object_id()).copied().unwrap_or(usize::MAX));
    events
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
            user_id: "user-1".into(),
            version: 3,
            order_id: order.map(str::to_owned),
        }
    }

    #[test]
    fn tickets_round_trip_with_order_id_only_when_set() {
        for t in [ticket(None), ticket(Some("o1"))] {
            let d = ticket_doc(&t);
            assert_eq!(d.contains_key("orderId"), t.order_id.is_some());
            assert!(matches!(d.get("price"), Some(Bson::Double(_))));
            assert!(matches!(d.get("_id"), Some(Bson::ObjectId(_))));
            assert_eq!(ticket_from_doc(&d).expect("parse"), t);
        }
    }

    #[test]
    fn events_round_trip_and_payload_equals_the_ticket_json() {
        let t = ticket(Some("o1"));
        let mut e = OutboxEvent::for_ticket(
            Subject::TicketUpdated,
            &t,
            now(),
            chrono::Duration::seconds(30),
        );
        e.failures.push(Failure {
            at: now(),
            error: "nats down".into(),
            outcome: AttemptOutcome::NotStored,
        });
        e.alerted_at = Some(now());
        e.unknown_since = Some(now());
        e.locked_by = Some("w/1".into());
        let d = event_doc(&e);
        assert!(matches!(d.get("aggregateId"), Some(Bson::ObjectId(_))));
        assert!(matches!(d.get("lockedUntil"), Some(Bson::DateTime(_))));
        let data = d.get_document("data").expect("data is a document");
        assert!(matches!(data.get("id"), Some(Bson::String(_))));
        let back = event_from_doc(&d).expect("parse");
        assert_eq!(back, e);
        assert_eq!(
            back.data.to_value(),
            serde_json::to_value(&t).expect("json")
        );
        // A fresh event: no holder, not alerted.
        let fresh = OutboxEvent::for_ticket(
            Subject::TicketCreated,
            &ticket(None),
            now(),
            chrono::Duration::seconds(30),
        );
        let d = event_doc(&fresh);
        assert_eq!(d.get("lockedBy"), Some(&Bson::Null));
        assert_eq!(d.get("alertedAt"), Some(&Bson::Null));
        assert_eq!(event_from_doc(&d).expect("parse"), fresh);
    }

    #[test]
    fn alerts_round_trip() {
        let e = OutboxEvent::for_ticket(
            Subject::TicketCreated,
            &ticket(None),
            now(),
            chrono::Duration::seconds(30),
        );
        let a = Alert::new(AlertKind::Firing, e, now());
        let d = alert_doc(&a);
        assert_eq!(d.get_str("_id").expect("id"), a.id);
        assert_eq!(d.get("lockedUntil"), d.get("createdAt"));
        assert_eq!(alert_from_doc(&d).expect("parse"), a);
    }

    #[test]
    fn parked_alerts_and_inbox_records_round_trip() {
        let record = InboxRecord {
            id: "order-1:created".into(),
            subject: "order.created".into(),
            stream: "orders".into(),
            sequence: 7,
            order_id: Some("order-1".into()),
            ticket_id: Some(TicketId::new()),
            outcome: Outcome::Parked,
            reason: Some("unknown ticket".into()),
            deliveries: 5,
            payload: vec![0xff, b'{'],
            received_at: now(),
            done_at: None,
        };
        let d = inbox_doc(&record);
        assert_eq!(d.get("doneAt"), Some(&Bson::Null));
        assert_eq!(inbox_from_doc(&d).expect("parse"), record);
        let applied = InboxRecord {
            outcome: Outcome::Applied,
            order_id: None,
            ticket_id: None,
            reason: None,
            done_at: Some(now()),
            ..record.clone()
        };
        assert_eq!(
            inbox_from_doc(&inbox_doc(&applied)).expect("parse"),
            applied
        );
        let alert = crate::inbox::parked_alert(&record, now());
        let d = alert_doc(&alert);
        assert!(d.contains_key("message") && !d.contains_key("event"));
        assert_eq!(alert_from_doc(&d).expect("parse"), alert);
    }

    #[test]
    fn corrupt_documents_name_the_field() {
        let mut d = ticket_doc(&ticket(None));
        d.insert("version", "three");
        let err = ticket_from_doc(&d).expect_err("corrupt");
        assert!(err.to_string().contains("`version`"), "{err}");
    }

    #[test]
    fn json_numbers_keep_their_kind() {
        let v = json!({"i": 3, "f": 2.5, "whole": 20.0, "n": null, "a": [1, "x"], "neg": -4});
        assert_eq!(bson_to_json(&json_to_bson(&v)), v);
    }

    /// The `$set` fields of a one-stage pipeline.
    fn set_of(pipeline: &[Document]) -> &Document {
        assert_eq!(pipeline.len(), 1);
        pipeline[0].get_document("$set").expect("a $set stage")
    }

    #[test]
    fn a_fresh_event_is_inserted_literally_and_reserved_on_the_server_clock() {
        let mut t = ticket(None);
        t.title = "$price".into(); // a field path, were it not a literal
        let e = OutboxEvent::for_ticket(
            Subject::TicketCreated,
            &t,
            now(),
            chrono::Duration::seconds(30),
        );
        let (filter, pipeline) = fresh_event_upsert(&e, 30_000);
        assert_eq!(filter, doc! {"_id": e.id.object_id()});
        let set = set_of(&pipeline);
        assert!(!set.contains_key("_id"));
        assert_eq!(
            set.get("lockedUntil"),
            Some(&Bson::Document(doc! {"$add": ["$$NOW", 30_000_i64]}))
        );
        // Every other field of the event document, as a literal of the same value.
        let mut want = event_doc(&e);
        want.remove("_id");
        want.remove("lockedUntil");
        assert_eq!(set.len(), want.len() + 1);
        for (k, v) in &want {
            assert_eq!(set.get(k), Some(&literal(v.clone())), "{k}");
        }
        let data = set
            .get_document("data")
            .expect("data")
            .get_document("$literal");
        assert_eq!(
            data.expect("literal").get_str("title"),
            Ok("$price"),
            "the title stays a string"
        );
    }

    #[test]
    fn claims_and_unlocks_take_the_time_from_the_server() {
        let set = set_of(&claim_pipeline("$feed/1", -1_000)).clone();
        assert_eq!(
            set,
            doc! {
                "isLocked": {"$literal": true},
                "lockedBy": {"$literal": "$feed/1"},
                "lockedUntil": {"$add": ["$$NOW", -1_000_i64]},
            }
        );
        assert_eq!(
            set_of(&unlock_pipeline()).clone(),
            doc! {
                "isLocked": {"$literal": false},
                "lockedBy": {"$literal": null},
                "lockedUntil": "$$NOW",
            }
        );
        assert_eq!(
            set_of(&alert_claim_pipeline("a/1", 5)).clone(),
            doc! {"lockedBy": {"$literal": "a/1"}, "lockedUntil": {"$add": ["$$NOW", 5_i64]}}
        );
        assert_eq!(
            set_of(&alert_release_pipeline(true)).clone(),
            doc! {
                "attempts": {"$add": ["$attempts", 1_i64]},
                "lockedBy": {"$literal": null},
                "lockedUntil": "$$NOW",
            }
        );
        assert_eq!(
            set_of(&alert_release_pipeline(false))
                .get_document("attempts")
                .ok(),
            Some(&doc! {"$add": ["$attempts", 0_i64]}),
            "a post not made does not count"
        );
    }

    #[test]
    fn a_failure_is_stored_whole_and_due_at_the_server_now() {
        let mut e = OutboxEvent::for_ticket(
            Subject::TicketCreated,
            &ticket(None),
            now(),
            chrono::Duration::seconds(30),
        );
        e.failures.push(Failure {
            at: now(),
            error: "$nats down".into(),
            outcome: AttemptOutcome::Unknown,
        });
        e.unknown_since = Some(now());
        let pipeline = failed_pipeline(&e);
        let set = set_of(&pipeline);
        let mut state = event_state(&e);
        state.remove("lockedUntil");
        for (k, v) in &state {
            assert_eq!(set.get(k), Some(&literal(v.clone())), "{k}");
        }
        assert_eq!(set.get_str("lockedUntil"), Ok("$$NOW"));
    }

    #[test]
    fn an_alert_is_queued_once_due_at_the_server_now() {
        let e = OutboxEvent::for_ticket(
            Subject::TicketCreated,
            &ticket(None),
            now(),
            chrono::Duration::seconds(30),
        );
        let a = Alert::new(AlertKind::Firing, e, now());
        let (filter, pipeline) = alert_upsert(&a);
        assert_eq!(filter, doc! {"_id": &a.id});
        let set = set_of(&pipeline);
        assert_eq!(
            set.get_document("kind").expect("kind").clone(),
            doc! {"$ifNull": ["$kind", {"$literal": "firing"}]}
        );
        assert_eq!(
            set.get_document("lockedUntil")
                .expect("lockedUntil")
                .clone(),
            doc! {"$ifNull": ["$lockedUntil", "$$NOW"]}
        );
        let mut fields = alert_doc(&a);
        fields.remove("_id");
        assert_eq!(set.len(), fields.len(), "every field of a queued alert");
    }

    #[test]
    fn what_is_left_of_a_lease_is_measured_on_the_claimers_clock() {
        let t = now();
        assert_eq!(lease_left_ms(t + chrono::Duration::seconds(30), t), 30_000);
        assert_eq!(lease_left_ms(t - chrono::Duration::seconds(1), t), -1_000);
    }

    #[test]
    fn the_outbox_times_survive_a_bson_date() {
        let t = now();
        assert_eq!(to_bson_date(t).to_chrono(), t);
    }
}
