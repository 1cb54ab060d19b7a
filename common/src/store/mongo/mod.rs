//! The production store: MongoDB (a replica set, or a sharded cluster through mongos), through
//! the official driver. It behaves like the SQLite reference adapter and passes the same
//! contract (`testkit::contract`); where the two differ in mechanism, the comments say why.
//! It holds only what needs a server: the decisions it follows are plain functions tested
//! without one (`outbox::rules` above every store; here `errors` for what a driver error means
//! and when to retry, `connect` for what a deployment is, `codec` for documents).
//!
//! By capability: `tickets`, `outbox` (claims, outcomes, alerts), `feed` (where this store
//! picks its change feed: a change stream), `admin`, `inbox` (order messages in: a batch is one
//! transaction); `txn` runs transactions.
//!
//! Times are stored as BSON dates, which hold milliseconds: every time this adapter writes or
//! compares is to the millisecond (`outbox::rules::now`), so what it returns equals what it
//! stored.
//!
//! Consistency: the database handle forces primary reads and majority writes (with a write
//! timeout) whatever the URI says, so a claim read right after its update sees it, an
//! acknowledged write survives a failover, and a lagging majority fails a write instead of
//! hanging it. Ticket writes are multi-document transactions (snapshot read concern, majority
//! write concern), retried a bounded number of times on the driver's transient labels; a commit
//! whose outcome stays unknown is read back. Multi-document outbox writes are sent once more
//! after a step-down (`errors::retry_multi_write`).
//!
//! Leases run on the server's clock: a claim's `lockedUntil` is `$$NOW` plus what is left of
//! the claimer's lease, and "due" means `lockedUntil <= ` the primary's `hello.localTime`, so
//! pods whose clocks disagree still agree on who holds what (ARCHITECTURE.md).

use crate::domain::OutboxEvent;
use crate::store::{Health, StoreError};
use bson::{Document, doc};
use chrono::{DateTime, Utc};
use codec::{event_from_doc, limit_i64};
use connect::{Probe, check_deployment, database_name, open_error, server_time};
use errors::{Facts, retry_multi_write};
use futures::TryStreamExt;
use mongodb::options::{
    Acknowledgment, ClientOptions, DatabaseOptions, IndexOptions, ReadPreference,
    SelectionCriteria, WriteConcern,
};
use mongodb::{Client, Collection, Database, IndexModel};
use std::future::Future;
use std::time::Duration;

mod admin;
mod codec;
mod connect;
mod errors;
mod feed;
mod inbox;
mod outbox;
mod tickets;
mod txn;

#[derive(Debug, Clone)]
pub struct MongoOptions {
    /// How long a new event stays reserved for the change feed's first attempt before the sweep
    /// may take it (`OUTBOX_LOCK_SECS`).
    pub fresh_lock: Duration,
    /// Server selection timeout used when the URI sets none (`serverSelectionTimeoutMS`): how
    /// long an operation waits for a reachable server, so a missing server fails clearly.
    pub server_selection_timeout: Duration,
    /// How long a write waits for a majority of the replica set to confirm it (`wtimeout`,
    /// `MONGO_WRITE_TIMEOUT_SECS`) before it fails as "unavailable" instead of hanging.
    pub write_timeout: Duration,
}

impl Default for MongoOptions {
    fn default() -> Self {
        Self {
            fresh_lock: Duration::from_secs(30),
            server_selection_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
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
    /// `{_id: kind, sentAt}`: when the last digest of each kind was posted.
    alert_digests: Collection<Document>,
    feed_positions: Collection<Document>,
    inbox: Collection<Document>,
    options: MongoOptions,
}

impl MongoStore {
    /// Connects, checks that the deployment can run transactions and change streams (a replica
    /// set or mongos), and creates the indexes (idempotent). The database is the URI's path
    /// (`mongodb://host/tickets`), `tickets` when the URI names none; `admin`, `local` and
    /// `config` are refused. When no server can be selected, the URI's hosts are probed one by
    /// one to say what is wrong (`connect::diagnose`).
    pub async fn open(uri: &str, options: MongoOptions) -> Result<Self, StoreError> {
        let mut client_options = ClientOptions::parse(uri).await.map_err(|e| {
            open_error(
                "MONGO_URI is not a valid MongoDB connection string".into(),
                Some(e),
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
        let name = database_name(client_options.default_database.as_deref())
            .map_err(|message| open_error(message, None))?;
        let probe = Probe::of(&client_options, timeout);
        let client = Client::with_options(client_options).map_err(|e| {
            open_error(
                format!("cannot set up a MongoDB client for {hosts} (MONGO_URI)"),
                Some(e),
            )
        })?;
        let db = client.database_with_options(
            &name,
            DatabaseOptions::builder()
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                .write_concern(majority_within(options.write_timeout))
                .build(),
        );
        check_deployment(&db, &hosts, timeout, &probe).await?;
        let store = Self {
            tickets: db.collection("tickets"),
            events: db.collection("events"),
            alerts: db.collection("alerts"),
            alert_digests: db.collection("alert_digests"),
            feed_positions: db.collection("feed_positions"),
            inbox: db.collection("inbox"),
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

    /// Majority, within the write timeout: what every write of this store asks for.
    pub(super) fn write_concern(&self) -> WriteConcern {
        majority_within(self.options.write_timeout)
    }

    /// The primary's clock, now (`hello.localTime`): what "due" is compared with, as the claims
    /// that wrote `lockedUntil` used its `$$NOW`.
    pub(super) async fn server_now(&self, op: &'static str) -> Result<DateTime<Utc>, StoreError> {
        let reply = self
            .db
            .run_command(doc! {"hello": 1})
            .await
            .map_err(|e| errors::backend(op, e))?;
        server_time(&reply).ok_or_else(|| {
            StoreError::Corrupt(format!("{op}: the server's hello reply has no localTime"))
        })
    }

    /// Runs a multi-document write (`update_many`, `delete_many`), sent once more when it failed
    /// as [`retry_multi_write`] allows: MongoDB does not retry these itself, and each of ours is
    /// idempotent (it re-checks its filter, or deletes what is gone already).
    pub(super) async fn multi_write<T, F, Fut>(
        &self,
        op: &'static str,
        mut write: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = mongodb::error::Result<T>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match write().await {
                Ok(v) => return Ok(v),
                Err(e) if retry_multi_write(&Facts::of(&e), attempts) => {
                    tracing::warn!(op, error = %e, "multi-document write failed as the primary changed; sending it once more");
                }
                Err(e) => return Err(errors::backend(op, e)),
            }
        }
    }

    async fn create_indexes(&self) -> Result<(), StoreError> {
        let err = |e| errors::backend("open: create indexes", e);
        self.create_event_indexes().await?;
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
            .create_indexes([
                index("alerts_due", doc! {"lockedUntil": 1}, false),
                // Digests claim one kind at a time.
                index(
                    "alerts_due_by_kind",
                    doc! {"kind": 1, "lockedUntil": 1},
                    false,
                ),
            ])
            .await
            .map_err(err)?;
        // The inbox's `_id` is the message's identity (unique by itself). Partial indexes, as
        // for the events: the retention sweep's range holds settled records only (`doneAt` is
        // null while parked), the parked list holds parked ones only, and the cancelled-orders
        // lookup only applied `order.cancelled` records.
        self.inbox
            .create_indexes([
                model(
                    "inbox_done",
                    doc! {"doneAt": 1},
                    false,
                    Some(doc! {"doneAt": {"$type": "date"}}),
                ),
                model(
                    "inbox_parked",
                    doc! {"receivedAt": 1, "_id": 1},
                    false,
                    Some(doc! {"outcome": "parked"}),
                ),
                model(
                    "inbox_cancelled",
                    doc! {"orderId": 1},
                    false,
                    Some(doc! {"subject": "order.cancelled", "doneAt": {"$type": "date"}}),
                ),
            ])
            .await
            .map_err(err)?;
        Ok(())
    }

    /// The indexes of `events` (idempotent: a no-op when they exist). Also run whenever the
    /// change stream is (re)opened: a dropped `events` collection is recreated by the next
    /// insert without them, the unique `(aggregateId, version)` among them, and the stream it
    /// invalidated is reopened (`feed`).
    pub(super) async fn create_event_indexes(&self) -> Result<(), StoreError> {
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
            .map(drop)
            .map_err(|e| errors::backend("create event indexes", e))
    }

    pub(super) async fn find_docs(
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
            .map_err(|e| errors::backend(op, e))?
            .try_collect()
            .await
            .map_err(|e| errors::backend(op, e))
    }

    pub(super) async fn find_events(
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
}

#[async_trait::async_trait]
impl Health for MongoStore {
    fn kind(&self) -> &'static str {
        "mongodb"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run_command(doc! {"ping": 1})
            .await
            .map(drop)
            .map_err(|e| errors::backend("ping", e))
    }
}

/// `w: majority` with `wtimeout`: a write that a majority does not confirm in time fails
/// (as "unavailable") instead of hanging every request behind a lagging secondary.
fn majority_within(write_timeout: Duration) -> WriteConcern {
    let mut concern = WriteConcern::from(Acknowledgment::Majority);
    concern.w_timeout = Some(write_timeout);
    concern
}

fn model(name: &str, keys: Document, unique: bool, partial: Option<Document>) -> IndexModel {
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
}

fn index(name: &str, keys: Document, unique: bool) -> IndexModel {
    model(name, keys, unique, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
        let chain = crate::error_chain(&err);
        assert!(chain.contains("MONGO_URI"), "{chain}");
        assert!(chain.contains("127.0.0.1:1"), "{chain}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// With `replicaSet=` the driver waits out the selection timeout whatever is wrong; the probe
    /// that follows (nothing answers here either) stays within its own short timeout.
    #[tokio::test]
    async fn a_missing_replica_set_is_probed_and_fails_in_bounded_time() {
        let started = Instant::now();
        let err = MongoStore::open(
            "mongodb://127.0.0.1:1,127.0.0.1:2/tickets?replicaSet=rs0&serverSelectionTimeoutMS=300",
            MongoOptions::default(),
        )
        .await
        .err()
        .expect("no server on ports 1 and 2");
        let chain = crate::error_chain(&err);
        assert!(chain.contains("cannot reach MongoDB"), "{chain}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn the_admin_database_is_refused_before_connecting() {
        let started = Instant::now();
        let err = MongoStore::open(
            "mongodb://user:secret@127.0.0.1:1/admin?replicaSet=rs0",
            MongoOptions::default(),
        )
        .await
        .err()
        .expect("admin is refused");
        let chain = crate::error_chain(&err);
        assert!(chain.contains("`admin`"), "{chain}");
        assert!(chain.contains("authSource=admin"), "the fix: {chain}");
        assert!(!chain.contains("secret"), "{chain}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once"
        );
    }

    #[test]
    fn every_write_asks_a_majority_within_the_write_timeout() {
        let concern = majority_within(Duration::from_secs(5));
        assert_eq!(concern.w, Some(Acknowledgment::Majority));
        assert_eq!(concern.w_timeout, Some(Duration::from_secs(5)));
    }
}
