//! Tickets: each write is one transaction holding the ticket and its event. A commit whose
//! outcome stayed unknown (a primary that crashed mid-commit, an election longer than the retry
//! budget, a majority that did not confirm in time) is read back ([`settle`]): the ticket's id
//! and the version a write makes are fixed before the transaction, so what it would have
//! written is found or not, and the client is answered with the stored ticket rather than a 503
//! that its retry would turn into a second ticket.

use super::MongoStore;
use super::codec::{fresh_event_upsert, ticket_doc, ticket_from_doc};
use super::errors::{self, conflict_if_contended, is_commit_unknown};
use super::txn::TxnError;
use crate::domain::{NewTicket, Subject, Ticket, TicketChanges, TicketId};
use crate::outbox::rules;
use crate::store::{Page, StoreError, Tickets, UpdateOutcome};
use bson::{Bson, Document, doc};
use futures::FutureExt;
use mongodb::options::{ReadConcern, ReturnDocument};
use mongodb::{ClientSession, Collection};
use std::future::Future;
use std::time::Duration;

/// Inserts the outbox event of a ticket write, in that write's transaction, reserved for the
/// change feed for `fresh_lock` on the server's clock.
async fn insert_event(
    events: &Collection<Document>,
    session: &mut ClientSession,
    subject: Subject,
    stored: &Ticket,
    fresh_lock: Duration,
) -> Result<(), TxnError> {
    let event = rules::fresh_event(subject, stored, fresh_lock);
    let fresh_lock_ms = i64::try_from(fresh_lock.as_millis()).unwrap_or(i64::MAX);
    let (filter, pipeline) = fresh_event_upsert(&event, fresh_lock_ms);
    events
        .update_one(filter, pipeline)
        .upsert(true)
        .session(session)
        .await?;
    Ok(())
}

/// A write's answer once its outcome is settled: when its transaction failed with an unknown
/// commit outcome, `read_back` looks for what it would have written, and finding it answers as
/// a confirmed commit would have; otherwise (not there, or the read failed) the error stands.
pub(super) async fn settle<T, F, Fut>(
    result: Result<T, StoreError>,
    read_back: F,
) -> Result<T, StoreError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Option<T>, StoreError>>,
{
    match result {
        Err(e) if is_commit_unknown(&e) => match read_back().await {
            Ok(Some(stored)) => {
                tracing::warn!("the commit's outcome was unknown; it is committed (read back)");
                Ok(stored)
            }
            Ok(None) => Err(e),
            Err(read) => {
                tracing::warn!(error = %crate::error_chain(&read), "cannot read back a commit of unknown outcome");
                Err(e)
            }
        },
        other => other,
    }
}

/// Whether `stored` (the ticket read back at `expected_version + 1`) is what this update would
/// have written. One version has one writer (the update applies only to `expected_version`), so
/// a ticket at the next version with other contents is another writer's, and ours did not
/// commit.
pub(super) fn update_applied(
    stored: Option<Ticket>,
    expected_version: i64,
    title: &str,
    price: f64,
) -> Option<Ticket> {
    stored.filter(|t| {
        t.version == expected_version + 1
            && t.title == title
            && t.price.to_bits() == price.to_bits()
    })
}

impl MongoStore {
    /// The ticket `filter` finds, majority-committed (so it survives a failover): what a read
    /// back after an unknown commit outcome may answer with.
    async fn committed_ticket(
        &self,
        op: &'static str,
        filter: Document,
    ) -> Result<Option<Ticket>, StoreError> {
        self.tickets
            .find_one(filter)
            .read_concern(ReadConcern::majority())
            .await
            .map_err(|e| errors::backend(op, e))?
            .as_ref()
            .map(ticket_from_doc)
            .transpose()
    }
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
        let id = ticket.id.object_id();
        let result = self
            .transaction("create_ticket", move |s| {
                let (tickets, events) = (tickets.clone(), events.clone());
                let (stored_doc, stored) = (stored_doc.clone(), stored.clone());
                async move {
                    tickets.insert_one(&stored_doc).session(&mut *s).await?;
                    insert_event(&events, s, Subject::TicketCreated, &stored, fresh_lock).await?;
                    Ok(stored)
                }
                .boxed()
            })
            .await;
        // The id is ours alone: a ticket with it is the one this transaction committed.
        settle(result, || {
            self.committed_ticket("create_ticket", doc! {"_id": id})
        })
        .await
    }

    async fn get_ticket(&self, id: TicketId) -> Result<Option<Ticket>, StoreError> {
        self.tickets
            .find_one(doc! {"_id": id.object_id()})
            .await
            .map_err(|e| errors::backend("get_ticket", e))?
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
        let written = title.clone();
        let result = self
            .transaction("update_ticket", move |s| {
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
            .await;
        settle(result, || async {
            let next = doc! {"_id": oid, "version": expected_version + 1};
            let stored = self.committed_ticket("update_ticket", next).await?;
            Ok(update_applied(stored, expected_version, &written, price)
                .map(UpdateOutcome::Updated))
        })
        .await
        .or_else(conflict_if_contended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mongo::errors::CommitUnknown;

    fn ticket(version: i64, title: &str, price: f64) -> Ticket {
        Ticket {
            id: TicketId::new(),
            title: title.into(),
            price,
            user_id: "u".into(),
            version,
            order_id: None,
        }
    }

    fn unknown() -> StoreError {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let source = mongodb::error::ErrorKind::Io(std::sync::Arc::new(io)).into();
        StoreError::backend("create_ticket", CommitUnknown { source })
    }

    #[tokio::test]
    async fn a_commit_of_unknown_outcome_that_applied_answers_with_the_stored_ticket() {
        let stored = ticket(0, "concert", 20.0);
        let found = stored.clone();
        let answer = settle(Err(unknown()), || async move { Ok(Some(found)) }).await;
        assert_eq!(answer.expect("the stored ticket"), stored);
    }

    #[tokio::test]
    async fn a_commit_of_unknown_outcome_that_is_not_found_stays_an_error() {
        let answer: Result<Ticket, _> = settle(Err(unknown()), || async { Ok(None) }).await;
        assert!(is_commit_unknown(&answer.expect_err("not committed")));
        // A read back that fails leaves the original error.
        let answer: Result<Ticket, _> = settle(Err(unknown()), || async {
            Err(StoreError::backend("create_ticket", "no primary"))
        })
        .await;
        assert!(is_commit_unknown(&answer.expect_err("still unknown")));
    }

    #[tokio::test]
    async fn only_an_unknown_commit_outcome_is_read_back() {
        let mut read = false;
        let answer: Result<Ticket, _> =
            settle(Err(StoreError::backend("create_ticket", "down")), || {
                read = true;
                async { Ok(None) }
            })
            .await;
        assert!(answer.is_err());
        assert!(!read, "a failure that did not commit is not read back");
        let ok = ticket(0, "a", 1.0);
        let answer = settle(Ok(ok.clone()), || async { Ok(None) }).await;
        assert_eq!(answer.expect("ok"), ok);
    }

    #[test]
    fn an_update_read_back_is_ours_only_at_the_next_version_with_our_contents() {
        let ours = ticket(4, "renamed", 12.5);
        assert_eq!(
            update_applied(Some(ours.clone()), 3, "renamed", 12.5),
            Some(ours.clone())
        );
        // Another writer's version 4, or nothing there: not ours.
        assert_eq!(update_applied(Some(ours.clone()), 3, "other", 12.5), None);
        assert_eq!(update_applied(Some(ours.clone()), 3, "renamed", 12.0), None);
        assert_eq!(update_applied(Some(ours), 4, "renamed", 12.5), None);
        assert_eq!(update_applied(None, 3, "renamed", 12.5), None);
    }
}
