//! The shared library of the tickets service: the domain (tickets, outbox events, subjects),
//! and the store trait with its adapters. Mirrors the course's `common` package.

pub mod domain;
pub mod jobs;
pub mod store;

pub use domain::{
    EventId, Failure, NewTicket, OutboxEvent, Payload, Price, Subject, Ticket, TicketChanges,
    TicketId, Title, UserId, ValidationError,
};
pub use store::{Store, StoreError};
