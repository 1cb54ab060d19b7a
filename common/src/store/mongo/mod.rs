//! The production store: MongoDB (a replica set, or a sharded cluster through mongos), through
//! the official driver. It behaves like the SQLite reference adapter and passes the same
//! contract (`testkit::contract`); where the two differ in mechanism, the comments say why.
//! It holds only what needs a server: the decisions it follows are plain functions tested
//! without one (`outbox::rules` above every store; here `errors` for what a driver error means
//! and when to retry, `connect` for what a deployment is, `codec` for documents).
//!
//! By capability: `tickets`, `outbox` (claims, outcomes, alerts), `feed` (where this store
//! picks its change feed: a change stream), `admin`; `txn` runs transactions.
//!
//! Times are stored as BSON dates, which hold milliseconds: every time this adapter writes or
//! compares is to the millisecond (`outbox::rules::now`), so what it returns equals what it
//! stored.
//!
//! Consistency: the database handle forces primary reads and majority writes whatever the URI
//! says, so a claim read right after its update sees it, and an acknowledged write survives a
//! failover. Ticket writes are multi-document transactions (snapshot read concern, majority
//! write concern), retried a bounded number of times on the driver's transient labels.

use crate::domain::OutboxEvent;
use crate::store::{Health, StoreError};
use bson::{Document, doc};
use codec::{event_from_doc, limit_i64};
use connect::{check_replica_set, open_error};
use futures::TryStreamExt;
use mongodb::options::{
    ClientOptions, DatabaseOptions, IndexOptions, ReadPreference, SelectionCriteria, WriteConcern,
};
use mongodb::{Client, Collection, Database, IndexModel};
use std::time::Duration;

mod admin;
mod codec;
mod connect;
mod errors;
mod feed;
mod outbox;
mod tickets;
mod txn;

const DEFAULT_DATABASE: &str = "tickets";

#[derive(Debug, Clone)]
pub struct MongoOptions {
    /// How long a new event stays reserved for the change feed's first attempt before the sweep
    /// may take it (`OUTBOX_LOCK_SECS`).
    pub fresh_lock: Duration,
    /// Server selection timeout used when the URI sets none (`serverSelectionTimeoutMS`): how
    /// long an operation waits for a reachable server, so a missing server fails clearly.
    pub server_selection_timeout: Duration,
}

impl Default for MongoOptions {
    fn default() -> Self {
        Self {
            fresh_lock: Duration::from_secs(30),
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
    /// `{_id: kind, sentAt}`: when the last digest of each kind was posted.
    alert_digests: Collection<Document>,
    feed_positions: Collection<Document>,
    options: MongoOptions,
}

impl MongoStore {
    /// Connects, checks that the deployment can run transactions and change streams (a replica
    /// set or mongos), and creates the indexes (idempotent). The database is the URI's path
    /// (`mongodb://host/tickets`), `tickets` when the URI names none.
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
        let name = client_options
            .default_database
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
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
                .write_concern(WriteConcern::majority())
                .build(),
        );
        check_replica_set(&db, &hosts, timeout).await?;
        let store = Self {
            tickets: db.collection("tickets"),
            events: db.collection("events"),
            alerts: db.collection("alerts"),
            alert_digests: db.collection("alert_digests"),
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
        Ok(())
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
            .map_err(|e| StoreError::backend(op, e))?
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(op, e))
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
            .map_err(|e| StoreError::backend("ping", e))
    }
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
}
