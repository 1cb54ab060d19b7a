//! The shared library of the tickets service: the domain (tickets, outbox events, subjects),
//! the store trait with its adapters, and the redaction of connection strings for display.
//! Mirrors the course's `common` package.

pub mod domain;
pub mod jobs;
pub mod redact;
pub mod store;

pub use domain::{
    EventId, Failure, NewTicket, OutboxEvent, Payload, Price, Subject, Ticket, TicketChanges,
    TicketId, Title, UserId, ValidationError,
};
pub use redact::redact_url;
pub use store::{Store, StoreError};
