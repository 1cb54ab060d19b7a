//! `ticketing`: one binary, the subcommand picks the role. Everything lives in the library.

use clap::Parser;
use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: memory allocated on one thread and freed on another (a
/// request's write, freed by the SQLite writer thread; an event, by the publisher) is cheap there,
/// where glibc locks the allocating thread's arena (see BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    ticketing::cli::run(ticketing::cli::Cli::parse()).await
}
