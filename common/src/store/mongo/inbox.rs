//! The inbox: a batch of order messages is one multi-document transaction (`txn`). Inside it,
//! what the batch needs is read (one `$in` query per collection), `inbox::Batch::plan` decides,
//! and the plan is stored: each ticket change with its `ticket.updated` event, the inbox
//! records, the alerts of parked messages. A redelivery racing its first delivery on another
//! replica loses a write conflict on the record's `_id`, and its transaction runs again and
//! finds the record.

use super::MongoStore;
use super::codec::{
    alert_upsert, event_doc, inbox_doc, inbox_from_doc, limit_i64, ticket_from_doc, to_bson_date,
};
use super::txn::TxnError;
use crate::domain::{Subject, TicketId};
use crate::inbox::{
    Batch, InboxMessage, InboxRecord, Known, Outcome, Plan, Reads, RetryPolicy, Verdict,
};
use crate::outbox::rules;
use crate::store::{Inbox, InboxRetention, ParkedMessages, StoreError};
use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use chrono::{DateTime, Utc};
use futures::{FutureExt, TryStreamExt};
use mongodb::options::ReturnDocument;
use mongodb::{ClientSession, Collection};
use std::sync::Arc;
use std::time::Duration;

/// A ticket this transaction read changed before it wrote it (a snapshot read makes that a
/// write conflict, retried; this is the case that cannot happen).
#[derive(Debug, thiserror::Error)]
#[error("ticket {0} changed while the inbox applied a batch")]
struct TicketMoved(TicketId);

/// The collections a batch touches, cloned into each run of its transaction.
#[derive(Clone)]
struct Colls {
    tickets: Collection<Document>,
    events: Collection<Document>,
    alerts: Collection<Document>,
    inbox: Collection<Document>,
    fresh_lock: Duration,
}

impl Colls {
    fn of(store: &MongoStore) -> Self {
        Self {
            tickets: store.tickets.clone(),
            events: store.events.clone(),
            alerts: store.alerts.clone(),
            inbox: store.inbox.clone(),
            fresh_lock: store.options.fresh_lock,
        }
    }

    async fn find(
        coll: &Collection<Document>,
        s: &mut ClientSession,
        filter: Document,
        projection: Option<Document>,
    ) -> Result<Vec<Document>, TxnError> {
        let mut find = coll.find(filter);
        if let Some(p) = projection {
            find = find.projection(p);
        }
        let mut cursor = find.session(&mut *s).await?;
        let mut docs = Vec::new();
        while let Some(d) = cursor.next(&mut *s).await.transpose()? {
            docs.push(d);
        }
        Ok(docs)
    }

    async fn read_known(&self, s: &mut ClientSession, reads: &Reads) -> Result<Known, TxnError> {
        let mut known = Known::default();
        if !reads.message_ids.is_empty() {
            let docs = Self::find(
                &self.inbox,
                s,
                doc! {"_id": {"$in": &reads.message_ids}},
                Some(doc! {"_id": 1}),
            )
            .await?;
            known.recorded.extend(
                docs.iter()
                    .filter_map(|d| d.get_str("_id").ok().map(str::to_owned)),
            );
        }
        if !reads.created_orders.is_empty() {
            // The filter states `inbox_cancelled`'s own, so the planner may use it.
            let docs = Self::find(
                &self.inbox,
                s,
                doc! {
                    "subject": "order.cancelled",
                    "doneAt": {"$type": "date"},
                    "orderId": {"$in": &reads.created_orders},
                },
                Some(doc! {"orderId": 1}),
            )
            .await?;
            known.cancelled_orders.extend(
                docs.iter()
                    .filter_map(|d| d.get_str("orderId").ok().map(str::to_owned)),
            );
        }
        if !reads.tickets.is_empty() {
            let ids: Vec<ObjectId> = reads.tickets.iter().map(TicketId::object_id).collect();
            for d in Self::find(&self.tickets, s, doc! {"_id": {"$in": ids}}, None).await? {
                let ticket = ticket_from_doc(&d)?;
                known.tickets.insert(ticket.id, ticket);
            }
        }
        Ok(known)
    }

    async fn store_plan(&self, s: &mut ClientSession, plan: &Plan) -> Result<(), TxnError> {
        let mut events = Vec::with_capacity(plan.changes.len());
        for change in &plan.changes {
            let id = change.ticket.id;
            let set_order = match &change.ticket.order_id {
                Some(order) => doc! {"$set": {"orderId": order}},
                None => doc! {"$unset": {"orderId": ""}},
            };
            let mut update = set_order;
            update.insert("$inc", doc! {"version": 1_i64});
            let stored = self
                .tickets
                .find_one_and_update(
                    doc! {"_id": id.object_id(), "version": change.expected_version},
                    update,
                )
                .return_document(ReturnDocument::After)
                .session(&mut *s)
                .await?
                .ok_or_else(|| StoreError::backend("apply_messages", TicketMoved(id)))?;
            // The event is built from the document as this transaction stored it.
            let stored = ticket_from_doc(&stored)?;
            let event = rules::fresh_event(Subject::TicketUpdated, &stored, self.fresh_lock);
            events.push(event_doc(&event));
        }
        if !events.is_empty() {
            self.events.insert_many(events).session(&mut *s).await?;
        }
        if !plan.records.is_empty() {
            let records: Vec<Document> = plan.records.iter().map(inbox_doc).collect();
            self.inbox.insert_many(records).session(&mut *s).await?;
        }
        for alert in &plan.alerts {
            let (filter, update) = alert_upsert(alert);
            self.alerts
                .update_one(filter, update)
                .upsert(true)
                .session(&mut *s)
                .await?;
        }
        Ok(())
    }

    async fn apply(
        &self,
        s: &mut ClientSession,
        messages: Arc<[InboxMessage]>,
        policy: &RetryPolicy,
        alerts: bool,
    ) -> Result<Vec<Verdict>, TxnError> {
        let batch = Batch::new(messages);
        let known = self.read_known(s, &batch.reads()).await?;
        let mut plan = batch.plan(known, policy, rules::now());
        if !alerts {
            plan.alerts.clear();
        }
        self.store_plan(s, &plan).await?;
        Ok(plan.verdicts)
    }
}

#[async_trait::async_trait]
impl Inbox for MongoStore {
    async fn apply_messages(
        &self,
        messages: Arc<[InboxMessage]>,
        policy: &RetryPolicy,
    ) -> Result<Vec<Verdict>, StoreError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let colls = Colls::of(self);
        let policy = *policy;
        self.transaction("apply_messages", move |s| {
            let (colls, messages) = (colls.clone(), messages.clone());
            async move { colls.apply(s, messages, &policy, true).await }.boxed()
        })
        .await
    }
}

#[async_trait::async_trait]
impl ParkedMessages for MongoStore {
    async fn list_parked(&self, limit: usize) -> Result<Vec<InboxRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.find_docs(
            "list_parked",
            &self.inbox,
            doc! {"outcome": Outcome::Parked.as_str()},
            Some(doc! {"receivedAt": 1, "_id": 1}),
            Some(limit),
            None,
        )
        .await?
        .iter()
        .map(inbox_from_doc)
        .collect()
    }

    async fn count_parked(&self) -> Result<u64, StoreError> {
        self.inbox
            .count_documents(doc! {"outcome": Outcome::Parked.as_str()})
            .await
            .map_err(|e| StoreError::backend("count_parked", e))
    }

    async fn get_message(&self, id: &str) -> Result<Option<InboxRecord>, StoreError> {
        self.inbox
            .find_one(doc! {"_id": id})
            .await
            .map_err(|e| StoreError::backend("get_message", e))?
            .as_ref()
            .map(inbox_from_doc)
            .transpose()
    }

    async fn replay_parked(&self, id: &str) -> Result<Option<Verdict>, StoreError> {
        let colls = Colls::of(self);
        let id = id.to_owned();
        self.transaction("replay_parked", move |s| {
            let (colls, id) = (colls.clone(), id.clone());
            async move {
                let parked = colls
                    .inbox
                    .find_one_and_delete(doc! {"_id": &id, "outcome": Outcome::Parked.as_str()})
                    .session(&mut *s)
                    .await?;
                let Some(parked) = parked else {
                    return Ok(None);
                };
                let message = inbox_from_doc(&parked)?.message();
                // The operator is looking at it: no new alert if it is parked again.
                let verdicts = colls
                    .apply(s, Arc::from([message]), &RetryPolicy::PARK_AT_ONCE, false)
                    .await?;
                Ok(verdicts.into_iter().next())
            }
            .boxed()
        })
        .await
    }

    async fn drop_parked(&self, id: &str) -> Result<Option<InboxRecord>, StoreError> {
        self.inbox
            .find_one_and_delete(doc! {"_id": id, "outcome": Outcome::Parked.as_str()})
            .await
            .map_err(|e| StoreError::backend("drop_parked", e))?
            .as_ref()
            .map(inbox_from_doc)
            .transpose()
    }
}

#[async_trait::async_trait]
impl InboxRetention for MongoStore {
    async fn expire_inbox(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        // One range over `inbox_done` (the filter states its own), ids only, then those deleted.
        let expired = doc! {"doneAt": {"$type": "date", "$lt": to_bson_date(before)}};
        let ids: Vec<Bson> = self
            .inbox
            .find(expired.clone())
            .sort(doc! {"doneAt": 1})
            .limit(limit_i64(limit))
            .projection(doc! {"_id": 1})
            .await
            .map_err(|e| StoreError::backend("expire_inbox", e))?
            .try_collect::<Vec<Document>>()
            .await
            .map_err(|e| StoreError::backend("expire_inbox", e))?
            .into_iter()
            .filter_map(|mut d| d.remove("_id"))
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut filter = expired;
        filter.insert("_id", doc! {"$in": ids});
        self.inbox
            .delete_many(filter)
            .await
            .map(|r| r.deleted_count)
            .map_err(|e| StoreError::backend("expire_inbox", e))
    }
}
