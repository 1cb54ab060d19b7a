//! The setup mistakes README's MongoDB section lists, against real servers made that way, and
//! the messages they produce at start (the driver alone would report a selection timeout). Each
//! check runs where its variable names such a server (the GitHub workflow starts them), and says
//! that it skipped otherwise:
//!
//! - `TICKETS_TEST_MONGO_STANDALONE_URI`: a mongod started without `--replSet`;
//! - `TICKETS_TEST_MONGO_UNINITIATED_URI`: a mongod started with `--replSet`, never initiated;
//! - `TICKETS_TEST_MONGO_HIDDEN_MEMBERS_URI`: a replica set whose member names (a container's
//!   host name) this machine cannot resolve, as with Docker when the client runs on the host.

use common::store::mongo::{MongoOptions, MongoStore};
use std::io::Write;
use std::time::{Duration, Instant};

/// The URI in `var` with a short selection timeout, or `None` after saying that `test` skipped.
fn uri(var: &str, test: &str) -> Option<String> {
    let Some(uri) = std::env::var(var).ok().filter(|u| !u.trim().is_empty()) else {
        // Straight to stderr, past the test harness' capture: a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "skipped {test}: no such MongoDB server (set {var} to run it)"
        );
        return None;
    };
    let separator = if uri.contains('?') { '&' } else { '?' };
    Some(format!("{uri}{separator}serverSelectionTimeoutMS=3000"))
}

/// Opens the store at `uri` and returns the message it fails with.
async fn open_error(uri: &str) -> String {
    let started = Instant::now();
    let err = MongoStore::open(uri, MongoOptions::default())
        .await
        .err()
        .expect("the store must refuse this deployment");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "told within the selection timeout and the probe's"
    );
    common::error_chain(&err)
}

#[tokio::test]
async fn a_standalone_server_is_told_to_start_with_repl_set() {
    let Some(uri) = uri("TICKETS_TEST_MONGO_STANDALONE_URI", "the standalone check") else {
        return;
    };
    let message = open_error(&uri).await;
    assert!(message.contains("is a standalone server"), "{message}");
    assert!(message.contains("--replSet"), "{message}");
}

#[tokio::test]
async fn an_uninitiated_member_is_told_to_run_rs_initiate() {
    let Some(uri) = uri(
        "TICKETS_TEST_MONGO_UNINITIATED_URI",
        "the uninitiated check",
    ) else {
        return;
    };
    let message = open_error(&uri).await;
    assert!(message.contains("is not initiated"), "{message}");
    assert!(message.contains("rs.initiate()"), "{message}");
}

#[tokio::test]
async fn members_this_machine_cannot_resolve_are_named() {
    let Some(uri) = uri(
        "TICKETS_TEST_MONGO_HIDDEN_MEMBERS_URI",
        "the unresolvable-members check",
    ) else {
        return;
    };
    let message = open_error(&uri).await;
    assert!(message.contains("names its members"), "{message}");
    assert!(message.contains("does not resolve here"), "{message}");
    assert!(message.contains("directConnection=true"), "{message}");
}
