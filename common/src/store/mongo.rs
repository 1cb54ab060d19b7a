//! The production store: MongoDB (a replica set, or a sharded cluster through mongos), through
//! the official driver. It behaves like the SQLite reference adapter and passes the same
//! contract (`contract.rs`); where the two differ in mechanism, the comments say why.
//!
//! Collections (field names as the SQLite columns, camelCase):
//! - `tickets` `{_id: ObjectId, title, price: double, userId, version: long, orderId?}`
//! - `events` `{_id: ObjectId, subject, data: {..the ticket JSON..}, aggregateId: ObjectId,
//!   version, isLocked, lockedUntil: date, lockedBy: string|null, failures: [{at, error}],
//!   attempts, createdAt: date, alertedAt: date|null}`
//! - `alerts` `{_id: "{eventId}:{kind}", kind, event: {..an events document..}, createdAt,
//!   attempts, lockedUntil, lockedBy}`
//! - `feed_positions` `{_id: "change-feed", position: string}`
//!
//! Times are stored as BSON dates, which hold milliseconds: every time this adapter writes or
//! compares is truncated to the millisecond first, so what it returns equals what it stored.
//!
//! Consistency: the database handle forces primary reads and majority writes whatever the URI
//! says, so a claim read right after its update sees it, and an acknowledged write survives a
//! failover. Ticket writes are multi-document transactions (snapshot read concern, majority
//! write concern), retried a bounded number of times on the driver's transient labels.

use super::{
    Alert, AlertKind, ChangeFeed, FeedItem, FeedPosition, Lease, OutboxStats, Page, PendingVersion,
    Store, StoreError, UpdateOutcome,
};
use crate::domain::{
    EventId, FAILURES_KEPT, Failure, NewTicket, OutboxEvent, Payload, Subject, Ticket,
    TicketChanges, TicketId,
};
use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::{
    ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT, WriteFailure,
};
use mongodb::options::{
    ClientOptions, DatabaseOptions, IndexOptions, ReadConcern, ReadPreference, ReturnDocument,
    SelectionCriteria, WriteConcern,
};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const DEFAULT_DATABASE: &str = "tickets";
const FEED_NAME: &str = "change-feed";
/// Attempts of one transaction (and, separately, of its commit) before giving up.
const TXN_ATTEMPTS: u32 = 5;
/// Time budget of one transaction, retries included: an HTTP request (or a worker) is waiting.
const TXN_BUDGET: Duration = Duration::from_secs(10);
/// Rounds of one `claim_due` while concurrent claimers keep taking its candidates.
const CLAIM_ROUNDS: usize = 16;

#[derive(Debug, Clone)]
pub struct MongoOptions {
    /// How long a new event stays reserved for the change feed's first attempt before the sweep
    /// may take it (`OUTBOX_LOCK_SECS`).
    pub fresh_lock: Duration,
    /// Benchmark baseline only: write tickets without their events. Never in production.
    pub write_outbox: bool,
    /// Server selection timeout used when the URI sets none (`serverSelectionTimeoutMS`): how
    /// long an operation waits for a reachable server, so a missing server fails clearly.
    pub server_selection_timeout: Duration,
}

impl Default for MongoOptions {
    fn default() -> Self {
        Self {
            fresh_lock: Duration::from_secs(30),
            write_outbox: true,
            server_selection_timeout: Duration::from_secs(10),
        }
    }
}

/// Cheap to clone: the driver's client is a pool shared by the clones.
#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    db: Database,
    tickets: Collection<Document>,
    events: Collection<Document>,
    alerts: Collection<Document>,
    feed_positions: Collection<Document>,
    options: MongoOptions,
}

/// A failure while opening, with the message an operator needs and the driver's error below it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct OpenError {
    message: String,
    #[source]
    source: Option<mongodb::error::Error>,
}

impl MongoStore {
    /// Connects, checks that the deployment can run transactions and change streams (a replica
    /// set or mongos), and creates the indexes (idempotent). The database is the URI's path
    /// (`mongodb://host/tickets`), `tickets` when the URI names none.
    pub async fn open(uri: &str, options: MongoOptions) -> Result<Self, StoreError> {
        let mut client_options = ClientOptions::parse(uri).await.map_err(|e| {
            StoreError::backend(
                "open",
                OpenError {
                    message: "MONGO_URI is not a valid MongoDB connection string".into(),
                    source: Some(e),
                },
            )
        })?;
        let timeout = *client_options
            .server_selection_timeout
            .get_or_insert(options.server_selection_timeout);
        if client_options.app_name.is_none() {
            client_options.app_name = Some("ticketing".into());
        }
        // Hosts only: the URI itself may carry a password.
        let hosts = client_options
            .hosts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let name = client_options
            .default_database
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        let client = Client::with_options(client_options).map_err(|e| {
            StoreError::backend(
                "open",
                OpenError {
                    message: format!("cannot set up a MongoDB client for {hosts} (MONGO_URI)"),
                    source: Some(e),
                },
            )
        })?;
        let db = client.database_with_options(
            &name,
            DatabaseOptions::builder()
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                .write_concern(WriteConcern::majority())
                .build(),
        );
        check_replica_set(&db, &hosts, timeout).await?;
        let store = Self {
            tickets: db.collection("tickets"),
            events: db.collection("events"),
            alerts: db.collection("alerts"),
            feed_positions: db.collection("feed_positions"),
            client,
            db,
            options,
        };
        store.create_indexes().await?;
        tracing::debug!(%hosts, database = %name, "MongoDB store ready");
        Ok(store)
    }

    /// The database this store uses (for operators and tests, e.g. to drop a test database).
    pub fn database(&self) -> &Database {
        &self.db
    }

    async fn create_indexes(&self) -> Result<(), StoreError> {
        let model = |name: &str, keys: Document, unique: bool, partial: Option<Document>| {
            IndexModel::builder()
                .keys(keys)
                .options(
                    IndexOptions::builder()
                        .name(name.to_owned())
                        .unique(unique.then_some(true))
                        .partial_filter_expression(partial)
                        .build(),
                )
                .build()
        };
        let index = |name: &str, keys: Document, unique: bool| model(name, keys, unique, None);
        let err = |e| StoreError::backend("open: create indexes", e);
        self.events
            .create_indexes([
                // The sweep: "unlocked or lock expired" is `lockedUntil <= now`, one range scan,
                // already in claim order.
                index("events_due", doc! {"lockedUntil": 1, "_id": 1}, false),
                // The per-ticket order rule, and one event per ticket version.
                index(
                    "events_aggregate_version",
                    doc! {"aggregateId": 1, "version": 1},
                    true,
                ),
                // Operators: oldest first (`list_events`, `outbox_stats`) without a scan.
                index("events_created", doc! {"createdAt": 1, "_id": 1}, false),
                // Partial indexes hold only the rare events they are for, so the happy path
                // (insert, deliver, delete) never writes them. Events that alerted: a delivery
                // finds the ones that need a "resolved" alert without reading the others (an
                // empty index wins the planner's trial at once).
                model(
                    "events_alerted",
                    doc! {"alertedAt": 1},
                    false,
                    Some(doc! {"alertedAt": {"$type": "date"}}),
                ),
                // Events that failed at least once: the past-threshold gauge (`attempts >= t`,
                // t >= 1) counts index keys instead of reading every waiting document.
                model(
                    "events_failing",
                    doc! {"attempts": 1},
                    false,
                    Some(doc! {"attempts": {"$gt": 0_i64}}),
                ),
            ])
            .await
            .map_err(err)?;
        // The listing of unreserved tickets: `{orderId: null, _id: {$gt: after}}` sorted by
        // `_id`. A plain compound index rather than a partial one: a partial filter cannot say
        // "orderId is missing" (`$exists: false` is not allowed there, and `{orderId: null}`
        // equality is refused by servers before 7.0), and unreserved tickets are the bulk of the
        // collection anyway.
        self.tickets
            .create_indexes([index(
                "tickets_unreserved",
                doc! {"orderId": 1, "_id": 1},
                false,
            )])
            .await
            .map_err(err)?;
        self.alerts
            .create_indexes([index("alerts_due", doc! {"lockedUntil": 1}, false)])
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Runs `body` in a multi-document transaction (snapshot reads, majority writes), retrying
    /// the whole transaction on `TransientTransactionError` and the commit on
    /// `UnknownTransactionCommitResult`, at most [`TXN_ATTEMPTS`] times each and within
    /// [`TXN_BUDGET`]. `body` may run several times: it must build what it writes itself.
    async fn transaction<T, F>(&self, op: &'static str, mut body: F) -> Result<T, StoreError>
    where
        T: Send,
        F: FnMut(&mut ClientSession) -> BoxFuture<'_, Result<T, TxnError>> + Send,
    {
        let started = Instant::now();
        let mut session = self
            .client
            .start_session()
            .await
            .map_err(|e| StoreError::backend(op, e))?;
        let may_retry = |attempt: u32| attempt < TXN_ATTEMPTS && started.elapsed() < TXN_BUDGET;
        let mut attempt = 0;
        'transaction: loop {
            attempt += 1;
            session
                .start_transaction()
                .read_concern(ReadConcern::snapshot())
                .write_concern(WriteConcern::majority())
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                .await
                .map_err(|e| StoreError::backend(op, e))?;
            let value = match body(&mut session).await {
                Ok(v) => v,
                Err(failure) => {
                    // Best effort: the server may have aborted it already.
                    let _ = session.abort_transaction().await;
                    match failure {
                        TxnError::Driver(e)
                            if e.contains_label(TRANSIENT_TRANSACTION_ERROR)
                                && may_retry(attempt) =>
                        {
                            tracing::debug!(op, attempt, error = %e, "transient transaction error; retrying");
                            tokio::time::sleep(backoff(attempt)).await;
                            continue 'transaction;
                        }
                        TxnError::Driver(e) if is_write_conflict(&e) => {
                            return Err(contended(op, attempt, e));
                        }
                        TxnError::Driver(e) => return Err(StoreError::backend(op, e)),
                        TxnError::Store(e) => return Err(e),
                    }
                }
            };
            let mut commits = 0;
            loop {
                commits += 1;
                match session.commit_transaction().await {
                    Ok(()) => return Ok(value),
                    // The commit may or may not have applied: committing again is safe (the
                    // driver retries it with majority write concern).
                    Err(e)
                        if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                            && may_retry(commits) =>
                    {
                        tracing::debug!(op, commits, error = %e, "unknown commit result; committing again");
                    }
                    Err(e)
                        if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && may_retry(attempt) =>
                    {
                        tracing::debug!(op, attempt, error = %e, "transient commit error; retrying the transaction");
                        tokio::time::sleep(backoff(attempt)).await;
                        continue 'transaction;
                    }
                    Err(e) if is_write_conflict(&e) => return Err(contended(op, attempt, e)),
                    Err(e) => return Err(StoreError::backend(op, e)),
                }
            }
        }
    }

    /// Locks those of `ids` that still match `condition` under `lease`, and returns them in the
    /// order of `ids`. Each document's update is atomic and re-checks the filter, so of several
    /// claimers exactly one matches each event; the token is unique per claim, so what carries it
    /// is what this claim won.
    async fn claim_ids(
        &self,
        op: &'static str,
        ids: &[ObjectId],
        condition: Document,
        lease: &Lease,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let mut filter = doc! {"_id": {"$in": ids}};
        filter.extend(condition);
        self.events
            .update_many(
                filter,
                doc! {"$set": {
                    "isLocked": true,
                    "lockedBy": &lease.token,
                    "lockedUntil": to_bson_date(lease.until),
                }},
            )
            .await
            .map_err(|e| StoreError::backend(op, e))?;
        let claimed = self
            .find_events(op, doc! {"_id": {"$in": ids}, "lockedBy": &lease.token})
            .await?;
        Ok(in_order_of(claimed, ids))
    }

    async fn find_docs(
        &self,
        op: &'static str,
        coll: &Collection<Document>,
        filter: Document,
        sort: Option<Document>,
        limit: Option<usize>,
        projection: Option<Document>,
    ) -> Result<Vec<Document>, StoreError> {
        let mut find = coll.find(filter);
        if let Some(sort) = sort {
            find = find.sort(sort);
        }
        if let Some(limit) = limit {
            find = find.limit(limit_i64(limit));
        }
        if let Some(projection) = projection {
            find = find.projection(projection);
        }
        find.await
            .map_err(|e| StoreError::backend(op, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(op, e))
    }

    async fn find_events(
        &self,
        op: &'static str,
        filter: Document,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.find_docs(op, &self.events, filter, None, None, None)
            .await?
            .iter()
            .map(event_from_doc)
            .collect()
    }

    /// Queues an alert unless one with its id is queued already (then this is a no-op).
    async fn queue_alert(&self, op: &'static str, alert: &Alert) -> Result<(), StoreError> {
        let mut fields = alert_doc(alert);
        fields.remove("_id");
        let result = self
            .alerts
            .update_one(doc! {"_id": &alert.id}, doc! {"$setOnInsert": fields})
            .upsert(true)
            .await;
        match result {
            Ok(_) => Ok(()),
            // Two upserts of one id raced: the other one queued it.
            Err(e) if is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(StoreError::backend(op, e)),
        }
    }

    async fn open_change_stream(
        &self,
        from: Option<ResumeToken>,
    ) -> mongodb::error::Result<
        mongodb::change_stream::ChangeStream<
            mongodb::change_stream::event::ChangeStreamEvent<Document>,
        >,
    > {
        let pipeline = [
            doc! {"$match": {"operationType": "insert"}},
            // Only what the feed needs (the driver requires `_id`, `operationType` and `ns`):
            // not the whole inserted document.
            doc! {"$project": {"operationType": 1, "ns": 1, "documentKey": 1}},
        ];
        self.events
            .watch()
            .pipeline(pipeline)
            .resume_after(from)
            .await
    }
}

/// Checks the deployment can run multi-document transactions and change streams.
async fn check_replica_set(
    db: &Database,
    hosts: &str,
    timeout: Duration,
) -> Result<(), StoreError> {
    let unreachable = |e: mongodb::error::Error| {
        let message = if matches!(*e.kind, ErrorKind::ServerSelection { .. }) {
            format!(
                "cannot reach MongoDB at {hosts} (MONGO_URI) within {timeout:?}: is it running, \
                 and is the URI right?"
            )
        } else {
            format!("cannot talk to MongoDB at {hosts} (MONGO_URI)")
        };
        StoreError::backend(
            "open",
            OpenError {
                message,
                source: Some(e),
            },
        )
    };
    let hello = match db.run_command(doc! {"hello": 1}).await {
        Ok(reply) => reply,
        // Servers before 4.4.2 (and 4.2.10) know only the legacy name.
        Err(e) if command_code(&e) == Some(59) => db
            .run_command(doc! {"isMaster": 1})
            .await
            .map_err(unreachable)?,
        Err(e) => return Err(unreachable(e)),
    };
    let replica_set = hello.get_str("setName").is_ok();
    let mongos = hello.get_str("msg") == Ok("isdbgrid");
    if replica_set || mongos {
        return Ok(());
    }
    Err(StoreError::backend(
        "open",
        OpenError {
            message: format!(
                "MongoDB at {hosts} (MONGO_URI) is not a replica set: transactions and change \
                 streams need one; start mongod with --replSet rs0 and run rs.initiate() (a \
                 single-node replica set is enough)"
            ),
            source: None,
        },
    ))
}

/// What a transaction body can fail with: the driver (maybe retryable) or the data.
enum TxnError {
    Driver(mongodb::error::Error),
    Store(StoreError),
}

impl From<mongodb::error::Error> for TxnError {
    fn from(e: mongodb::error::Error) -> Self {
        Self::Driver(e)
    }
}

impl From<StoreError> for TxnError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Inserts the outbox event of a ticket write, in that write's transaction.
async fn insert_event(
    events: &Collection<Document>,
    session: &mut ClientSession,
    subject: Subject,
    stored: &Ticket,
    fresh_lock: Duration,
) -> Result<(), TxnError> {
    let event = OutboxEvent::for_ticket(
        subject,
        stored,
        now_ms(),
        chrono::Duration::from_std(fresh_lock).unwrap_or_default(),
    );
    events
        .insert_one(event_doc(&event))
        .session(session)
        .await?;
    Ok(())
}

/// 5 ms doubling per attempt, at most 200 ms, with jitter so that conflicting writers drift apart.
fn backoff(attempt: u32) -> Duration {
    let base = 5u64.saturating_mul(1 << attempt.min(6)).min(200);
    let jitter = u64::from(Utc::now().timestamp_subsec_nanos()) % (base / 2 + 1);
    Duration::from_millis(base / 2 + jitter)
}

fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The server's error code, for command errors and write errors, looking through wrapped errors.
fn command_code(e: &mongodb::error::Error) -> Option<i32> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(m) = err.downcast_ref::<mongodb::error::Error>() {
            match &*m.kind {
                ErrorKind::Command(c) => return Some(c.code),
                ErrorKind::Write(WriteFailure::WriteError(w)) => return Some(w.code),
                _ => {}
            }
        }
        current = err.source();
    }
    None
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    command_code(e) == Some(11000)
}

/// 112 WriteConflict: another transaction wrote the same document first (transactions do not
/// wait for each other's locks; the loser is aborted at once).
fn is_write_conflict(e: &mongodb::error::Error) -> bool {
    command_code(e) == Some(112)
}

/// A transaction that kept losing write conflicts until its retries ran out.
#[derive(Debug, thiserror::Error)]
#[error("gave up after {attempts} attempts that lost a write conflict")]
struct Contended {
    attempts: u32,
    #[source]
    source: mongodb::error::Error,
}

fn contended(op: &'static str, attempts: u32, source: mongodb::error::Error) -> StoreError {
    StoreError::backend(op, Contended { attempts, source })
}

/// Other writers kept winning the ticket: what a version mismatch answers too (the API re-reads
/// the ticket and checks again), not a failure of the database.
fn conflict_if_contended(e: StoreError) -> Result<UpdateOutcome, StoreError> {
    match e {
        StoreError::Backend { source, .. } if source.is::<Contended>() => {
            Ok(UpdateOutcome::Conflict)
        }
        other => Err(other),
    }
}

/// The resume token is no longer usable: it fell off the oplog (286 ChangeStreamHistoryLost;
/// 280 ChangeStreamFatalError "resume token was not found" on older servers) or is not a token
/// this deployment understands (260 InvalidResumeToken).
fn is_history_lost(e: &mongodb::error::Error) -> bool {
    matches!(command_code(e), Some(280 | 286 | 260))
        || e.to_string().contains("resume token was not found")
}

// ---- value mapping ----

/// Now, to the millisecond: the precision of a BSON date.
fn now_ms() -> DateTime<Utc> {
    truncate_ms(Utc::now())
}

fn truncate_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

fn to_bson_date(t: DateTime<Utc>) -> bson::DateTime {
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
struct Fields<'a> {
    collection: &'static str,
    doc: &'a Document,
}

impl<'a> Fields<'a> {
    fn new(collection: &'static str, doc: &'a Document) -> Self {
        Self { collection, doc }
    }

    fn bad(&self, field: &str, what: &str) -> StoreError {
        corrupt(self.collection, self.doc, field, what)
    }

    fn get(&self, field: &str) -> Result<&'a Bson, StoreError> {
        self.doc
            .get(field)
            .ok_or_else(|| self.bad(field, "is missing"))
    }

    /// `None` when missing or null.
    fn opt(&self, field: &str) -> Option<&'a Bson> {
        self.doc.get(field).filter(|v| !matches!(v, Bson::Null))
    }

    fn oid(&self, field: &str) -> Result<ObjectId, StoreError> {
        match self.get(field)? {
            Bson::ObjectId(id) => Ok(*id),
            _ => Err(self.bad(field, "is not an ObjectId")),
        }
    }

    fn str(&self, field: &str) -> Result<&'a str, StoreError> {
        match self.get(field)? {
            Bson::String(s) => Ok(s),
            _ => Err(self.bad(field, "is not a string")),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<String>, StoreError> {
        match self.opt(field) {
            None => Ok(None),
            Some(Bson::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(field, "is not a string")),
        }
    }

    fn i64(&self, field: &str) -> Result<i64, StoreError> {
        match self.get(field)? {
            Bson::Int64(n) => Ok(*n),
            Bson::Int32(n) => Ok(i64::from(*n)),
            _ => Err(self.bad(field, "is not an integer")),
        }
    }

    fn f64(&self, field: &str) -> Result<f64, StoreError> {
        match self.get(field)? {
            Bson::Double(n) => Ok(*n),
            Bson::Int32(n) => Ok(f64::from(*n)),
            Bson::Int64(n) => Ok(*n as f64),
            _ => Err(self.bad(field, "is not a number")),
        }
    }

    fn bool(&self, field: &str) -> Result<bool, StoreError> {
        match self.get(field)? {
            Bson::Boolean(b) => Ok(*b),
            _ => Err(self.bad(field, "is not a boolean")),
        }
    }

    fn date(&self, field: &str) -> Result<DateTime<Utc>, StoreError> {
        match self.get(field)? {
            Bson::DateTime(t) => Ok(t.to_chrono()),
            _ => Err(self.bad(field, "is not a date")),
        }
    }

    fn opt_date(&self, field: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self.opt(field) {
            None => Ok(None),
            Some(Bson::DateTime(t)) => Ok(Some(t.to_chrono())),
            Some(_) => Err(self.bad(field, "is not a date")),
        }
    }

    fn doc(&self, field: &str) -> Result<&'a Document, StoreError> {
        match self.get(field)? {
            Bson::Document(d) => Ok(d),
            _ => Err(self.bad(field, "is not a document")),
        }
    }

    fn array(&self, field: &str) -> Result<&'a Vec<Bson>, StoreError> {
        match self.get(field)? {
            Bson::Array(a) => Ok(a),
            _ => Err(self.bad(field, "is not an array")),
        }
    }
}

fn ticket_doc(t: &Ticket) -> Document {
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

fn ticket_from_doc(d: &Document) -> Result<Ticket, StoreError> {
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

fn event_doc(e: &OutboxEvent) -> Document {
    let failures: Vec<Bson> = e
        .failures
        .iter()
        .map(|f| Bson::Document(doc! {"at": to_bson_date(f.at), "error": &f.error}))
        .collect();
    doc! {
        "_id": e.id.object_id(),
        "subject": e.subject.as_str(),
        "data": json_to_bson(&e.data.to_value()),
        "aggregateId": e.aggregate_id.object_id(),
        "version": e.version,
        "isLocked": e.is_locked,
        "lockedUntil": to_bson_date(e.locked_until),
        "lockedBy": e.locked_by.clone().map_or(Bson::Null, Bson::String),
        "failures": failures,
        "attempts": e.attempts,
        "createdAt": to_bson_date(e.created_at),
        "alertedAt": e.alerted_at.map_or(Bson::Null, |t| Bson::DateTime(to_bson_date(t))),
    }
}

fn event_from_doc(d: &Document) -> Result<OutboxEvent, StoreError> {
    let f = Fields::new("events", d);
    let subject = f.str("subject")?;
    let failures = f
        .array("failures")?
        .iter()
        .map(|item| match item {
            Bson::Document(fd) => {
                let ff = Fields::new("events", fd);
                Ok(Failure {
                    at: ff.date("at")?,
                    error: ff.str("error")?.to_owned(),
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
    })
}

fn alert_kind_name(kind: AlertKind) -> &'static str {
    match kind {
        AlertKind::Firing => "firing",
        AlertKind::Resolved => "resolved",
    }
}

/// A new alert's document: due at once, held by nobody.
fn alert_doc(a: &Alert) -> Document {
    let created = to_bson_date(a.created_at);
    doc! {
        "_id": &a.id,
        "kind": alert_kind_name(a.kind),
        "event": event_doc(&a.event),
        "createdAt": created,
        "attempts": a.attempts,
        "lockedUntil": created,
        "lockedBy": Bson::Null,
    }
}

fn alert_from_doc(d: &Document) -> Result<Alert, StoreError> {
    let f = Fields::new("alerts", d);
    let kind = match f.str("kind")? {
        "firing" => AlertKind::Firing,
        "resolved" => AlertKind::Resolved,
        other => return Err(f.bad("kind", &format!("is unknown: {other:?}"))),
    };
    Ok(Alert {
        id: f.str("_id")?.to_owned(),
        kind,
        event: event_from_doc(f.doc("event")?)?,
        created_at: f.date("createdAt")?,
        attempts: f.i64("attempts")?,
    })
}

/// JSON to BSON, explicitly: integers stay integers (Int64), other numbers are doubles, so the
/// payload reads back equal to `serde_json::to_value(ticket)`.
fn json_to_bson(v: &serde_json::Value) -> Bson {
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

fn bson_to_json(v: &Bson) -> serde_json::Value {
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

fn object_ids<'a, I: IntoIterator<Item = &'a EventId>>(ids: I) -> Vec<ObjectId> {
    ids.into_iter().map(EventId::object_id).collect()
}

/// `events` reordered as `order` lists their ids (any not in `order` last).
fn in_order_of(mut events: Vec<OutboxEvent>, order: &[ObjectId]) -> Vec<OutboxEvent> {
    let rank: HashMap<ObjectId, usize> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    events.sort_by_key(|e| rank.get(&e.id.object_id()).copied().unwrap_or(usize::MAX));
    events
}

/// `uri` with its database (the path) replaced by `database`, keeping hosts and options. When
/// the URI has credentials but no `authSource`, the old database (or `admin`) stays the one
/// authenticated against. For tests and tools that need a database of their own.
pub fn with_database(uri: &str, database: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, old_db) = match before_query.split_once('/') {
        Some((a, p)) => (a, p),
        None => (before_query, ""),
    };
    let mut options: Vec<String> = query
        .filter(|q| !q.is_empty())
        .map(|q| q.split('&').map(str::to_owned).collect())
        .unwrap_or_default();
    let has_auth_source = options
        .iter()
        .any(|o| o.to_ascii_lowercase().starts_with("authsource="));
    if authority.contains('@') && !has_auth_source {
        let auth_db = if old_db.is_empty() { "admin" } else { old_db };
        options.push(format!("authSource={auth_db}"));
    }
    let mut out = format!("{scheme}://{authority}/{database}");
    if !options.is_empty() {
        out.push('?');
        out.push_str(&options.join("&"));
    }
    out
}

#[async_trait::async_trait]
impl Store for MongoStore {
    fn kind(&self) -> &'static str {
        "mongodb"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run_command(doc! {"ping": 1})
            .await
            .map(drop)
            .map_err(|e| StoreError::backend("ping", e))
    }

    async fn create_ticket(&self, new: &NewTicket) -> Result<Ticket, StoreError> {
        let ticket = Ticket {
            id: TicketId::new(),
            title: new.title.as_str().to_owned(),
            price: new.price.value(),
            user_id: new.user_id.as_str().to_owned(),
            version: 0,
            order_id: None,
        };
        let stored_doc = ticket_doc(&ticket);
        // The event is built from the document as stored, never from the request.
        let stored = ticket_from_doc(&stored_doc)?;
        let (tickets, events) = (self.tickets.clone(), self.events.clone());
        let (write_outbox, fresh_lock) = (self.options.write_outbox, self.options.fresh_lock);
        self.transaction("create_ticket", move |s| {
            let (tickets, events) = (tickets.clone(), events.clone());
            let (stored_doc, stored) = (stored_doc.clone(), stored.clone());
            async move {
                tickets.insert_one(&stored_doc).session(&mut *s).await?;
                if write_outbox {
                    insert_event(&events, s, Subject::TicketCreated, &stored, fresh_lock).await?;
                }
                Ok(stored)
            }
            .boxed()
        })
        .await
    }

    async fn get_ticket(&self, id: TicketId) -> Result<Option<Ticket>, StoreError> {
        self.tickets
            .find_one(doc! {"_id": id.object_id()})
            .await
            .map_err(|e| StoreError::backend("get_ticket", e))?
            .as_ref()
            .map(ticket_from_doc)
            .transpose()
    }

    async fn list_unreserved(&self, page: Page) -> Result<Vec<Ticket>, StoreError> {
        if page.limit == 0 {
            return Ok(Vec::new()); // a limit of 0 means "no limit" to MongoDB
        }
        // `orderId: null` matches tickets without the field (it is written only when set).
        let mut filter = doc! {"orderId": Bson::Null};
        if let Some(after) = page.after {
            filter.insert("_id", doc! {"$gt": after.object_id()});
        }
        self.find_docs(
            "list_unreserved",
            &self.tickets,
            filter,
            Some(doc! {"_id": 1}),
            Some(page.limit as usize),
            None,
        )
        .await?
        .iter()
        .map(ticket_from_doc)
        .collect()
    }

    async fn update_ticket(
        &self,
        id: TicketId,
        expected_version: i64,
        changes: &TicketChanges,
    ) -> Result<UpdateOutcome, StoreError> {
        let (tickets, events) = (self.tickets.clone(), self.events.clone());
        let (write_outbox, fresh_lock) = (self.options.write_outbox, self.options.fresh_lock);
        let (title, price) = (changes.title.as_str().to_owned(), changes.price.value());
        let oid = id.object_id();
        self.transaction("update_ticket", move |s| {
            let (tickets, events, title) = (tickets.clone(), events.clone(), title.clone());
            async move {
                let updated = tickets
                    .find_one_and_update(
                        doc! {"_id": oid, "version": expected_version},
                        doc! {"$set": {"title": title, "price": price}, "$inc": {"version": 1_i64}},
                    )
                    .return_document(ReturnDocument::After)
                    .session(&mut *s)
                    .await?;
                let Some(updated) = updated else {
                    let exists = tickets
                        .find_one(doc! {"_id": oid})
                        .projection(doc! {"_id": 1})
                        .session(&mut *s)
                        .await?
                        .is_some();
                    return Ok(if exists {
                        UpdateOutcome::Conflict
                    } else {
                        UpdateOutcome::NotFound
                    });
                };
                // The event is built from the document as this transaction stored it.
                let stored = ticket_from_doc(&updated)?;
                if write_outbox {
                    insert_event(&events, s, Subject::TicketUpdated, &stored, fresh_lock).await?;
                }
                Ok(UpdateOutcome::Updated(stored))
            }
            .boxed()
        })
        .await
        .or_else(conflict_if_contended)
    }

    async fn claim_fresh(
        &self,
        ids: &[EventId],
        lease: &Lease,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = object_ids(ids);
        self.claim_ids(
            "claim_fresh",
            &ids,
            doc! {"isLocked": true, "lockedBy": Bson::Null},
            lease,
        )
        .await
    }

    async fn claim_due(&self, limit: usize, lease: &Lease) -> Result<Vec<OutboxEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        // What this claim takes is no longer due once locked until `lease.until`; a lease that
        // has already run out (only tests make one) would find the same events again.
        let rounds = if lease.until > now { CLAIM_ROUNDS } else { 1 };
        let now = to_bson_date(now);
        let mut claimed = Vec::with_capacity(limit);
        // Sweep lanes claim side by side and read the same first candidates; each document goes
        // to one of them, so a round can come back short while more is due. Another round then
        // reads past what was taken (claimed events are no longer due): a claim is short only
        // when fewer events were due, as the contract says (SQLite's single writer gets that
        // for free). Bounded, so a claim under heavy contention still returns.
        for _ in 0..rounds {
            let want = limit - claimed.len();
            // Candidates: one range over `events_due`, covered (only `_id` is read).
            let candidates: Vec<ObjectId> = self
                .find_docs(
                    "claim_due",
                    &self.events,
                    doc! {"lockedUntil": {"$lte": now}},
                    Some(doc! {"lockedUntil": 1, "_id": 1}),
                    Some(want),
                    Some(doc! {"_id": 1}),
                )
                .await?
                .iter()
                .filter_map(|d| d.get_object_id("_id").ok())
                .collect();
            let fewer_due = candidates.len() < want;
            if candidates.is_empty() {
                break;
            }
            // Re-checked per document: a candidate another sweeper took meanwhile is not due.
            claimed.extend(
                self.claim_ids(
                    "claim_due",
                    &candidates,
                    doc! {"lockedUntil": {"$lte": now}},
                    lease,
                )
                .await?,
            );
            if fewer_due || claimed.len() >= limit {
                break;
            }
        }
        Ok(claimed)
    }

    async fn pending_versions(
        &self,
        aggregates: &[TicketId],
    ) -> Result<Vec<PendingVersion>, StoreError> {
        if aggregates.is_empty() {
            return Ok(Vec::new());
        }
        let oids: Vec<ObjectId> = aggregates.iter().map(TicketId::object_id).collect();
        let docs = self
            .find_docs(
                "pending_versions",
                &self.events,
                doc! {"aggregateId": {"$in": &oids}},
                Some(doc! {"aggregateId": 1, "version": 1}),
                None,
                Some(doc! {"_id": 1, "aggregateId": 1, "version": 1}),
            )
            .await?;
        let mut by_aggregate: HashMap<ObjectId, Vec<PendingVersion>> = HashMap::new();
        for d in &docs {
            let f = Fields::new("events", d);
            let aggregate = f.oid("aggregateId")?;
            by_aggregate
                .entry(aggregate)
                .or_default()
                .push(PendingVersion {
                    aggregate_id: TicketId::from_object_id(aggregate),
                    version: f.i64("version")?,
                    event_id: EventId::from_object_id(f.oid("_id")?),
                });
        }
        // Per ticket in the order asked, each by version (SQLite answers in ticket-id order;
        // the dispatcher sorts what it gets either way).
        Ok(oids
            .iter()
            .flat_map(|a| by_aggregate.get(a).cloned().unwrap_or_default())
            .collect())
    }

    async fn complete(&self, ids: &[EventId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = object_ids(ids);
        let now = now_ms();
        // Resolved alerts first, then the delete: a crash in between leaves the events, and
        // completing them again queues nothing twice (the alert id is fixed).
        let alerted = self
            .find_events(
                "complete",
                // `$type: date` (alertedAt is a date or null) matches `events_alerted`'s filter.
                doc! {"_id": {"$in": &ids}, "alertedAt": {"$type": "date"}},
            )
            .await?;
        for event in alerted {
            self.queue_alert("complete", &Alert::new(AlertKind::Resolved, event, now))
                .await?;
        }
        self.events
            .delete_many(doc! {"_id": {"$in": &ids}})
            .await
            .map_err(|e| StoreError::backend("complete", e))?;
        Ok(())
    }

    async fn release(&self, ids: &[EventId], lease: &Lease) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.events
            .update_many(
                doc! {"_id": {"$in": object_ids(ids)}, "lockedBy": &lease.token},
                doc! {"$set": {
                    "isLocked": false,
                    "lockedBy": Bson::Null,
                    "lockedUntil": to_bson_date(now_ms()),
                }},
            )
            .await
            .map(drop)
            .map_err(|e| StoreError::backend("release", e))
    }

    async fn record_failure(
        &self,
        ids: &[EventId],
        lease: &Lease,
        error: &str,
        alert_threshold: i64,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = object_ids(ids);
        let kept = i64::try_from(FAILURES_KEPT).unwrap_or(i64::MAX);
        let (events, alerts) = (self.events.clone(), self.alerts.clone());
        let (token, error) = (lease.token.clone(), error.to_owned());
        // One transaction, as SQLite's one write: no sweeper can take the event between its
        // unlock and its alert being queued and marked (it would deliver it without queueing
        // the "resolved" alert), and only events this call held can alert.
        self.transaction("record_failure", move |s| {
            let (events, alerts, ids) = (events.clone(), alerts.clone(), ids.clone());
            let (token, error) = (token.clone(), error.clone());
            async move {
                let now = now_ms();
                let at = to_bson_date(now);
                // Only events still held under this lease: a late worker changes nothing.
                let mut cursor = events
                    .find(doc! {"_id": {"$in": &ids}, "lockedBy": &token})
                    .projection(doc! {"_id": 1})
                    .session(&mut *s)
                    .await?;
                let mut held = Vec::new();
                while let Some(d) = cursor.next(&mut *s).await.transpose()? {
                    held.extend(d.get_object_id("_id").ok());
                }
                if held.is_empty() {
                    return Ok(Vec::new());
                }
                events
                    .update_many(
                        doc! {"_id": {"$in": &held}, "lockedBy": &token},
                        doc! {
                            "$push": {"failures": {"$each": [{"at": at, "error": &error}], "$slice": -kept}},
                            "$inc": {"attempts": 1_i64},
                            "$set": {"isLocked": false, "lockedBy": Bson::Null, "lockedUntil": at},
                        },
                    )
                    .session(&mut *s)
                    .await?;
                // Those of them that reached the threshold and never alerted, as this
                // transaction left them: one "firing" alert each, and `alertedAt` set.
                let mut cursor = events
                    .find(doc! {
                        "_id": {"$in": &held},
                        "attempts": {"$gte": alert_threshold},
                        "alertedAt": Bson::Null,
                    })
                    .session(&mut *s)
                    .await?;
                let mut reached = Vec::new();
                while let Some(d) = cursor.next(&mut *s).await.transpose()? {
                    reached.push(event_from_doc(&d)?);
                }
                let mut alerted = Vec::new();
                for mut event in in_order_of(reached, &ids) {
                    event.alerted_at = Some(now);
                    let alert = Alert::new(AlertKind::Firing, event.clone(), now);
                    let mut fields = alert_doc(&alert);
                    fields.remove("_id");
                    alerts
                        .update_one(doc! {"_id": &alert.id}, doc! {"$setOnInsert": fields})
                        .upsert(true)
                        .session(&mut *s)
                        .await?;
                    let marked = events
                        .update_one(
                            doc! {"_id": event.id.object_id(), "alertedAt": Bson::Null},
                            doc! {"$set": {"alertedAt": at}},
                        )
                        .session(&mut *s)
                        .await?;
                    if marked.modified_count == 1 {
                        alerted.push(event);
                    }
                }
                Ok(alerted)
            }
            .boxed()
        })
        .await
    }

    async fn claim_alerts(&self, limit: usize, lease: &Lease) -> Result<Vec<Alert>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = to_bson_date(now_ms());
        let candidates: Vec<Bson> = self
            .find_docs(
                "claim_alerts",
                &self.alerts,
                doc! {"lockedUntil": {"$lte": now}},
                Some(doc! {"lockedUntil": 1}),
                Some(limit),
                Some(doc! {"_id": 1}),
            )
            .await?
            .into_iter()
            .filter_map(|mut d| d.remove("_id"))
            .collect();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        self.alerts
            .update_many(
                doc! {"_id": {"$in": &candidates}, "lockedUntil": {"$lte": now}},
                doc! {"$set": {"lockedBy": &lease.token, "lockedUntil": to_bson_date(lease.until)}},
            )
            .await
            .map_err(|e| StoreError::backend("claim_alerts", e))?;
        let mut alerts = self
            .find_docs(
                "claim_alerts",
                &self.alerts,
                doc! {"_id": {"$in": &candidates}, "lockedBy": &lease.token},
                None,
                None,
                None,
            )
            .await?
            .iter()
            .map(alert_from_doc)
            .collect::<Result<Vec<_>, _>>()?;
        alerts.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(alerts)
    }

    async fn delete_alert(&self, id: &str) -> Result<(), StoreError> {
        self.alerts
            .delete_one(doc! {"_id": id})
            .await
            .map(drop)
            .map_err(|e| StoreError::backend("delete_alert", e))
    }

    async fn release_alert(&self, id: &str) -> Result<(), StoreError> {
        self.alerts
            .update_one(
                doc! {"_id": id},
                doc! {
                    "$inc": {"attempts": 1_i64},
                    "$set": {"lockedUntil": to_bson_date(now_ms()), "lockedBy": Bson::Null},
                },
            )
            .await
            .map(drop)
            .map_err(|e| StoreError::backend("release_alert", e))
    }

    async fn change_feed(&self, from: Option<FeedPosition>) -> Result<ChangeFeed, StoreError> {
        let token = from.and_then(|p| match serde_json::from_str::<ResumeToken>(&p.0) {
            Ok(t) => Some(t),
            Err(e) => {
                // The position is a hint: the sweep covers whatever the feed skips.
                tracing::warn!(position = %p.0, error = %e,
                    "change feed: the saved position is not a resume token; starting from now");
                None
            }
        });
        let resuming = token.is_some();
        let stream = match self.open_change_stream(token).await {
            Ok(stream) => stream,
            Err(e) if resuming && is_history_lost(&e) => {
                // The events in the gap are still in the outbox, locked for the change feed
                // until their fresh lock expires; then the sweep takes them.
                tracing::warn!(error = %super::error_chain(&e),
                    "change feed: the saved position fell off the oplog; starting from now \
                     (the sweep delivers what was missed)");
                self.open_change_stream(None)
                    .await
                    .map_err(|e| StoreError::backend("change_feed", e))?
            }
            Err(e) => return Err(StoreError::backend("change_feed", e)),
        };
        let feed = stream.filter_map(|item| async move {
            let change = match item {
                Ok(change) => change,
                Err(e) => return Some(Err(StoreError::backend("change_feed", e))),
            };
            let id = change
                .document_key
                .as_ref()
                .and_then(|k| k.get_object_id("_id").ok());
            let Some(id) = id else {
                tracing::warn!(key = ?change.document_key, "change feed: an insert without an ObjectId _id; skipped");
                return None;
            };
            let position = match serde_json::to_string(&change.id) {
                Ok(p) => FeedPosition(p),
                Err(e) => return Some(Err(StoreError::backend("change_feed", e))),
            };
            Some(Ok(FeedItem {
                event_id: EventId::from_object_id(id),
                position,
            }))
        });
        Ok(Box::pin(feed))
    }

    async fn load_feed_position(&self) -> Result<Option<FeedPosition>, StoreError> {
        let found = self
            .feed_positions
            .find_one(doc! {"_id": FEED_NAME})
            .await
            .map_err(|e| StoreError::backend("load_feed_position", e))?;
        found
            .map(|d| {
                Fields::new("feed_positions", &d)
                    .str("position")
                    .map(|p| FeedPosition(p.to_owned()))
            })
            .transpose()
    }

    async fn save_feed_position(&self, position: &FeedPosition) -> Result<(), StoreError> {
        self.feed_positions
            .update_one(
                doc! {"_id": FEED_NAME},
                doc! {"$set": {"position": &position.0}},
            )
            .upsert(true)
            .await
            .map(drop)
            .map_err(|e| StoreError::backend("save_feed_position", e))
    }

    async fn outbox_stats(&self, alert_threshold: i64) -> Result<OutboxStats, StoreError> {
        let err = |e| StoreError::backend("outbox_stats", e);
        let now = to_bson_date(now_ms());
        // The collection's metadata count: O(1) however deep the outbox is (exact after a clean
        // shutdown, which is all a gauge needs).
        let depth = self.events.estimated_document_count().await.map_err(err)?;
        let unlocked = self
            .events
            .count_documents(doc! {"lockedUntil": {"$lte": now}})
            .await
            .map_err(err)?;
        let oldest = self
            .events
            .find_one(doc! {})
            .sort(doc! {"createdAt": 1, "_id": 1})
            .projection(doc! {"_id": 1, "createdAt": 1})
            .await
            .map_err(err)?
            .map(|d| Fields::new("events", &d).date("createdAt"))
            .transpose()?;
        let past = self
            .events
            .count_documents(doc! {"attempts": {"$gte": alert_threshold}})
            .await
            .map_err(err)?;
        let pending_alerts = self.alerts.estimated_document_count().await.map_err(err)?;
        Ok(OutboxStats {
            depth,
            locked: depth.saturating_sub(unlocked),
            unlocked,
            oldest_created_at: oldest,
            past_alert_threshold: past,
            pending_alerts,
        })
    }

    async fn get_event(&self, id: EventId) -> Result<Option<OutboxEvent>, StoreError> {
        self.events
            .find_one(doc! {"_id": id.object_id()})
            .await
            .map_err(|e| StoreError::backend("get_event", e))?
            .as_ref()
            .map(event_from_doc)
            .transpose()
    }

    async fn list_events(
        &self,
        limit: usize,
        stuck_threshold: Option<i64>,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let filter = match stuck_threshold {
            Some(t) => doc! {"attempts": {"$gte": t}},
            None => doc! {},
        };
        self.find_docs(
            "list_events",
            &self.events,
            filter,
            Some(doc! {"createdAt": 1, "_id": 1}),
            Some(limit),
            None,
        )
        .await?
        .iter()
        .map(event_from_doc)
        .collect()
    }

    async fn unlock_events(&self, ids: &[EventId]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.events
            .update_many(
                doc! {"_id": {"$in": object_ids(ids)}},
                doc! {"$set": {
                    "isLocked": false,
                    "lockedBy": Bson::Null,
                    "lockedUntil": to_bson_date(now_ms()),
                }},
            )
            .await
            .map(|r| r.matched_count)
            .map_err(|e| StoreError::backend("unlock_events", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            now_ms(),
            chrono::Duration::seconds(30),
        );
        e.failures.push(Failure {
            at: now_ms(),
            error: "nats down".into(),
        });
        e.alerted_at = Some(now_ms());
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
            now_ms(),
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
            now_ms(),
            chrono::Duration::seconds(30),
        );
        let a = Alert::new(AlertKind::Firing, e, now_ms());
        let d = alert_doc(&a);
        assert_eq!(d.get_str("_id").expect("id"), a.id);
        assert_eq!(d.get("lockedUntil"), d.get("createdAt"));
        assert_eq!(alert_from_doc(&d).expect("parse"), a);
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

    #[test]
    fn times_are_truncated_to_milliseconds() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.006789Z")
            .expect("t")
            .with_timezone(&Utc);
        let ms = truncate_ms(t);
        assert_eq!(ms.timestamp_subsec_nanos(), 6_000_000);
        assert_eq!(to_bson_date(ms).to_chrono(), ms);
        assert_eq!(now_ms().timestamp_subsec_nanos() % 1_000_000, 0);
    }

    #[test]
    fn resume_tokens_survive_a_json_round_trip() {
        let json = r#"{"_data":"8265A1B2C3000000012B022C0100296E5A1004"}"#;
        let token: ResumeToken = serde_json::from_str(json).expect("parse token");
        assert_eq!(serde_json::to_string(&token).expect("write token"), json);
    }

    fn command_error(code: i32, message: &str) -> mongodb::error::Error {
        let c: mongodb::error::CommandError =
            bson::from_document(doc! {"code": code, "codeName": "X", "errmsg": message})
                .expect("command error");
        ErrorKind::Command(c).into()
    }

    #[test]
    fn lost_history_is_recognised() {
        assert!(is_history_lost(&command_error(286, "history lost")));
        assert!(is_history_lost(&command_error(
            280,
            "cannot resume stream; the resume token was not found"
        )));
        assert!(!is_history_lost(&command_error(13, "unauthorized")));
        assert!(is_duplicate_key(&command_error(
            11000,
            "E11000 duplicate key"
        )));
    }

    #[test]
    fn uris_get_another_database() {
        for (uri, want) in [
            ("mongodb://h:1", "mongodb://h:1/x"),
            ("mongodb://h:1/", "mongodb://h:1/x"),
            (
                "mongodb://h1,h2/old?replicaSet=rs0",
                "mongodb://h1,h2/x?replicaSet=rs0",
            ),
            ("mongodb://h?a=b", "mongodb://h/x?a=b"),
            ("mongodb://u:p@h/old", "mongodb://u:p@h/x?authSource=old"),
            (
                "mongodb+srv://u:p@c.example.net",
                "mongodb+srv://u:p@c.example.net/x?authSource=admin",
            ),
            (
                "mongodb://u:p@h/old?authSource=admin&w=1",
                "mongodb://u:p@h/x?authSource=admin&w=1",
            ),
        ] {
            assert_eq!(with_database(uri, "x"), want, "{uri}");
        }
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..20 {
            assert!(backoff(attempt) <= Duration::from_millis(200));
        }
    }

    #[tokio::test]
    async fn a_missing_server_fails_clearly_and_in_bounded_time() {
        let started = Instant::now();
        let err = MongoStore::open(
            "mongodb://127.0.0.1:1/tickets?serverSelectionTimeoutMS=300",
            MongoOptions::default(),
        )
        .await
        .err()
        .expect("no server on port 1");
        let chain = super::super::error_chain(&err);
        assert!(chain.contains("MONGO_URI"), "{chain}");
        assert!(chain.contains("127.0.0.1:1"), "{chain}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
