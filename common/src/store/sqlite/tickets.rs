//! Tickets: each write is one of the writer's event writes (the ticket row, then its event row
//! built from the row as stored, committed together).

use super::SqliteStore;
use super::codec::{insert_events, ticket_from_row};
use crate::domain::{NewTicket, OutboxEvent, Subject, Ticket, TicketChanges, TicketId};
use crate::outbox::rules;
use crate::store::{Page, StoreError, Tickets, UpdateOutcome};
use rusqlite::{Connection, OptionalExtension, params};
use std::time::Duration;

/// Writes the event of a ticket write (see [`claimed_event`]).
pub(super) fn write_event(
    conn: &Connection,
    fresh_lock: Duration,
    claim: Option<&str>,
    subject: Subject,
    stored: &Ticket,
) -> rusqlite::Result<OutboxEvent> {
    let event = claimed_event(fresh_lock, claim, subject, stored);
    insert_events(conn, std::slice::from_ref(&event))?;
    Ok(event)
}

/// The event of a ticket write, claimed by the feed in this process when `claim` is its lease
/// token (see `writer`), fresh otherwise.
pub(super) fn claimed_event(
    fresh_lock: Duration,
    claim: Option<&str>,
    subject: Subject,
    stored: &Ticket,
) -> OutboxEvent {
    let mut event = rules::fresh_event(subject, stored, fresh_lock);
    event.locked_by = claim.map(str::to_owned);
    event
}

#[async_trait::async_trait]
impl Tickets for SqliteStore {
    async fn create_ticket(&self, new: &NewTicket) -> Result<Ticket, StoreError> {
        let new = new.clone();
        self.inner
            .writer
            .submit_event_write("create_ticket", move |conn, opts, claim| {
                // The event is built from the row as stored (RETURNING), never from the request.
                let stored = conn
                    .prepare_cached(concat!(
                        "INSERT INTO tickets (",
                        ticket_cols!(),
                        ") VALUES (?1, ?2, ?3, ?4, 0, NULL) \
                         RETURNING ",
                        ticket_cols!()
                    ))?
                    .query_row(
                        params![
                            TicketId::new().to_hex(),
                            new.title.as_str(),
                            new.price.value(),
                            new.user_id.as_str()
                        ],
                        ticket_from_row,
                    )?;
                let event = write_event(
                    conn,
                    opts.fresh_lock,
                    claim,
                    Subject::TicketCreated,
                    &stored,
                )?;
                Ok((stored, Some(event)))
            })
            .await
    }

    async fn get_ticket(&self, id: TicketId) -> Result<Option<Ticket>, StoreError> {
        self.read("get_ticket", move |c| {
            c.prepare_cached(concat!(
                "SELECT ",
                ticket_cols!(),
                " FROM tickets WHERE id = ?1"
            ))?
            .query_row([id.to_hex()], ticket_from_row)
            .optional()
        })
        .await
    }

    async fn list_unreserved(&self, page: Page) -> Result<Vec<Ticket>, StoreError> {
        self.read("list_unreserved", move |c| {
            let after = page.after.map(|a| a.to_hex()).unwrap_or_default();
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                ticket_cols!(),
                " FROM tickets WHERE order_id IS NULL AND id > ?1 \
                 ORDER BY id LIMIT ?2"
            ))?;
            stmt.query_map(params![after, page.limit], ticket_from_row)?
                .collect()
        })
        .await
    }

    async fn update_ticket(
        &self,
        id: TicketId,
        expected_version: i64,
        changes: &TicketChanges,
    ) -> Result<UpdateOutcome, StoreError> {
        let changes = changes.clone();
        self.inner
            .writer
            .submit_event_write("update_ticket", move |conn, opts, claim| {
                let stored = conn
                    .prepare_cached(concat!(
                        "UPDATE tickets SET title = ?1, price = ?2, version = version + 1 \
                         WHERE id = ?3 AND version = ?4 RETURNING ",
                        ticket_cols!()
                    ))?
                    .query_row(
                        params![
                            changes.title.as_str(),
                            changes.price.value(),
                            id.to_hex(),
                            expected_version
                        ],
                        ticket_from_row,
                    )
                    .optional()?;
                let Some(stored) = stored else {
                    let exists = conn
                        .prepare_cached("SELECT 1 FROM tickets WHERE id = ?1")?
                        .exists([id.to_hex()])?;
                    let outcome = if exists {
                        UpdateOutcome::Conflict
                    } else {
                        UpdateOutcome::NotFound
                    };
                    return Ok((outcome, None));
                };
                let event = write_event(
                    conn,
                    opts.fresh_lock,
                    claim,
                    Subject::TicketUpdated,
                    &stored,
                )?;
                Ok((UpdateOutcome::Updated(stored), Some(event)))
            })
            .await
    }
}
