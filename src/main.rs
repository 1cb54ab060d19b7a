//! `ticketing`: one binary, the subcommand picks the role. Everything lives in the library.

use clap::Parser;
use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: much of what one thread allocates another frees (a
/// request's write, freed by the SQLite writer thread; an event, by the publisher), and glibc's
/// `free` was 15 % of the writer thread's time (see BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    ticketing::cli::run(ticketing::cli::Cli::parse()).await
}
