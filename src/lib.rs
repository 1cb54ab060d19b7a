//! The `ticketing` binary's library: command line, start-up of each role, telemetry.

pub mod cli;
pub mod inbox_cmd;
pub mod ops;
pub mod outbox_cmd;
pub mod settings;
pub mod startup;
pub mod telemetry;
