//! `ticketing`: one binary, the subcommand picks the role. Everything lives in the library.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    ticketing::cli::run(ticketing::cli::Cli::parse()).await
}
