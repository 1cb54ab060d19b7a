//! Tickets: each write is one transaction holding the ticket and its event.

use super::MongoStore;
use super::codec::{event_doc, ticket_doc, ticket_from_doc};
use super::errors::conflict_if_contended;
use super::txn::TxnError;
use crate::domain::{NewTicket, Subject, Ticket, TicketChanges, TicketId};
use crate::outbox::rules;
use crate::store::{Page, StoreError, Tickets, UpdateOutcome};
use bson::{Bson, Document, doc};
use futures::FutureExt;
use mongodb::options::ReturnDocument;
use mongodb::{ClientSession, Collection};
use std::time::Duration;

/// Inserts the outbox event of a ticket write, in that write's transaction.
async fn insert_event(
    events: &Collection<Document>,
    session: &mut ClientSession,
    subject: Subject,
    stored: &Ticket,
    fresh_lock: Duration,
) -> Result<(), TxnError> {
    let event = rules::fresh_event(subject, stored, fresh_lock);
    events
        .insert_one(event_doc(&event))
        .session(session)
        .await?;
    Ok(())
}

#[async_trait::async_trait]
impl Tickets for MongoStore {
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
        let fresh_lock = self.options.fresh_lock;
        self.transaction("create_ticket", move |s| {
            let (tickets, events) = (tickets.clone(), events.clone());
            let (stored_doc, stored) = (stored_doc.clone(), stored.clone());
            async move {
                tickets.insert_one(&stored_doc).session(&mut *s).await?;
                insert_event(&events, s, Subject::TicketCreated, &stored, fresh_lock).await?;
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
        let fresh_lock = self.options.fresh_lock;
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
                insert_event(&events, s, Subject::TicketUpdated, &stored, fresh_lock).await?;
                Ok(UpdateOutcome::Updated(stored))
            }
            .boxed()
        })
        .await
        .or_else(conflict_if_contended)
    }
}
