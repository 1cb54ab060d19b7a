//! The shared library of the tickets service: the domain (tickets, outbox events, subjects),
//! the outbox's rules (`outbox`), the store's capabilities with their adapters (`store`), and
//! the redaction of connection strings for display (`redact`). Mirrors the course's `common`
//! package.

pub mod backoff;
pub mod display;
pub mod domain;
pub mod errors;
pub mod inbox;
pub mod jobs;
pub mod outbox;
pub mod redact;
pub mod store;

pub use domain::{
    EventId, Failure, NewTicket, OutboxEvent, Payload, Price, PriceError, Subject, Ticket,
    TicketChanges, TicketId, Title, TitleError, UserId,
};
pub use errors::error_chain;
pub use redact::redact_url;
pub use store::{Store, StoreError};
