//! What a driver error means for us, decided by plain functions: the few facts read off an
//! error ([`Facts`]) are all the decisions look at, so the decisions are tested without a server.

use crate::store::{StoreError, UpdateOutcome};
use mongodb::error::{
    ErrorKind, InsertManyError, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR,
    UNKNOWN_TRANSACTION_COMMIT_RESULT, WriteConcernError, WriteFailure,
};
use std::time::Duration;

/// 11000 DuplicateKey.
const DUPLICATE_KEY: i32 = 11000;
/// 112 WriteConflict: another transaction wrote the same document first (transactions do not
/// wait for each other's locks; the loser is aborted at once).
const WRITE_CONFLICT: i32 = 112;
/// 59 CommandNotFound (`hello` on servers before 4.4.2 / 4.2.10).
pub(super) const COMMAND_NOT_FOUND: i32 = 59;
/// 64 WriteConcernFailed (named WriteConcernTimeout since 7.1): the write applied on the primary,
/// but not enough members confirmed it within `wtimeout`.
const WRITE_CONCERN_TIMEOUT: i32 = 64;
/// A server that is not (or no longer) the primary, or is stepping down, recovering or shutting
/// down: 10107 NotWritablePrimary, 13435 NotPrimaryNoSecondaryOk, 10058 LegacyNotPrimary,
/// 11600 InterruptedAtShutdown, 11602 InterruptedDueToReplStateChange, 13436
/// NotPrimaryOrSecondary, 189 PrimarySteppedDown, 91 ShutdownInProgress (the driver's SDAM
/// lists). A write refused with one of these did not apply, or applied and can be repeated.
const STATE_CHANGE: [i32; 8] = [10107, 13435, 10058, 11600, 11602, 13436, 189, 91];

/// What the decisions need to know of a driver error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Facts {
    /// The server's code, for command and write errors.
    pub code: Option<i32>,
    /// The code of a write concern error (the write applied; its confirmation failed).
    pub write_concern_code: Option<i32>,
    /// The write concern error says `wtimeout: true`.
    pub wtimeout: bool,
    /// `TransientTransactionError`: the whole transaction may be run again.
    pub transient: bool,
    /// `UnknownTransactionCommitResult`: the commit may or may not have applied.
    pub unknown_commit: bool,
    /// `RetryableWriteError`: the server (4.4+) or the driver says this write may be repeated.
    /// Only on writes the driver itself retries (single-document ones carry a transaction
    /// number); a multi-document write refused by a stepping-down primary has the code only.
    pub retryable_write: bool,
    /// The connection failed (I/O error, or the pool was cleared by another operation's failure).
    pub network: bool,
    pub message: String,
}

impl Facts {
    pub fn of(e: &mongodb::error::Error) -> Self {
        let concern = write_concern_error(e);
        Self {
            code: command_code(e),
            write_concern_code: concern.map(|w| w.code),
            wtimeout: concern
                .and_then(|w| w.details.as_ref())
                .is_some_and(|d| d.get_bool("wtimeout") == Ok(true)),
            transient: e.contains_label(TRANSIENT_TRANSACTION_ERROR),
            unknown_commit: e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT),
            retryable_write: e.contains_label(RETRYABLE_WRITE_ERROR),
            network: matches!(
                *e.kind,
                ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
            ),
            message: e.to_string(),
        }
    }

    pub fn is_duplicate_key(&self) -> bool {
        self.code == Some(DUPLICATE_KEY)
    }

    pub fn is_write_conflict(&self) -> bool {
        self.code == Some(WRITE_CONFLICT)
    }

    /// The change stream's resume token is no longer usable: it fell off the oplog (286
    /// ChangeStreamHistoryLost; 280 ChangeStreamFatalError "resume token was not found" on older
    /// servers) or is not a token this deployment understands (260 InvalidResumeToken).
    pub fn is_history_lost(&self) -> bool {
        matches!(self.code, Some(280 | 286 | 260))
            || self.message.contains("resume token was not found")
    }

    /// The write applied on the primary, but a majority did not confirm it within the write
    /// timeout (`MONGO_WRITE_TIMEOUT_SECS`): a member is down or lagging.
    pub fn is_write_timeout(&self) -> bool {
        self.wtimeout || self.write_concern_code == Some(WRITE_CONCERN_TIMEOUT)
    }

    /// The primary changed or is changing (stepped down, shutting down, not primary any more).
    pub fn is_state_change(&self) -> bool {
        [self.code, self.write_concern_code]
            .into_iter()
            .flatten()
            .any(|c| STATE_CHANGE.contains(&c))
    }

    /// A write that failed this way may be sent again (to the new primary): the retryable-write
    /// label, a network error, or a primary that stepped down. Not a write timeout: that write
    /// applied, and sending it again would wait for the same lagging members.
    pub fn is_retryable_write_failure(&self) -> bool {
        !self.is_write_timeout() && (self.retryable_write || self.network || self.is_state_change())
    }
}

/// Attempts of one multi-document write. MongoDB retries only single-document writes by itself
/// (`update_many` and `delete_many` are not retryable writes), so a step-down fails the claim,
/// release, unlock and delete-after-PubAck; each of them is idempotent, and sent once more.
pub(super) const MULTI_WRITE_ATTEMPTS: u32 = 2;

/// The retry policy of a multi-document write that failed with `e` after `attempts` attempts.
pub(super) fn retry_multi_write(e: &Facts, attempts: u32) -> bool {
    attempts < MULTI_WRITE_ATTEMPTS && e.is_retryable_write_failure()
}

/// The server's error code, for command errors and write errors, looking through wrapped errors.
fn command_code(e: &mongodb::error::Error) -> Option<i32> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(m) = err.downcast_ref::<mongodb::error::Error>() {
            match &*m.kind {
                ErrorKind::Command(c) => return Some(c.code),
                ErrorKind::Write(WriteFailure::WriteError(w)) => return Some(w.code),
                _ => {}
            }
        }
        current = err.source();
    }
    None
}

/// The write concern error of a write, looking through wrapped errors.
fn write_concern_error(e: &mongodb::error::Error) -> Option<&WriteConcernError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(m) = err.downcast_ref::<mongodb::error::Error>() {
            match &*m.kind {
                ErrorKind::Write(WriteFailure::WriteConcernError(w)) => return Some(w),
                ErrorKind::InsertMany(InsertManyError {
                    write_concern_error: Some(w),
                    ..
                }) => return Some(w),
                _ => {}
            }
        }
        current = err.source();
    }
    None
}

/// A write that a majority did not confirm in time. The message says what to look at; the
/// API answers 503 as for any store failure (a transaction is never half-written).
#[derive(Debug, thiserror::Error)]
#[error(
    "a majority of the replica set did not confirm the write within the write timeout \
     (MONGO_WRITE_TIMEOUT_SECS): a member is down or lagging"
)]
pub(super) struct WriteTimeout {
    #[source]
    pub source: mongodb::error::Error,
}

/// A transaction whose commit may or may not have applied (the primary changed or the write was
/// not confirmed in time, past the retries), and that was not found committed on reading back.
#[derive(Debug, thiserror::Error)]
#[error("the transaction's commit outcome is unknown, and it was not found committed")]
pub(super) struct CommitUnknown {
    #[source]
    pub source: mongodb::error::Error,
}

/// The store error for a driver error of operation `op`, naming a write timeout as one.
pub(super) fn backend(op: &'static str, e: mongodb::error::Error) -> StoreError {
    if Facts::of(&e).is_write_timeout() {
        StoreError::backend(op, WriteTimeout { source: e })
    } else {
        StoreError::backend(op, e)
    }
}

/// Whether `e` is a transaction's unknown commit outcome ([`CommitUnknown`]).
pub(super) fn is_commit_unknown(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend { source, .. } if source.is::<CommitUnknown>())
}

/// How often a transaction has run, and how often its last run's commit (0: it failed before
/// committing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tries {
    pub transaction: u32,
    pub commit: u32,
}

/// What to do after a transaction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Run the whole transaction again (after a jittered pause).
    RetryTransaction,
    /// Commit again: the driver retries a commit with majority write concern, which is safe
    /// whether or not the first one applied.
    RetryCommit,
    /// Another writer kept winning the documents: [`Contended`].
    Contended,
    /// The commit may have applied, and the retries are spent: read back what it would have
    /// written before answering ([`CommitUnknown`] when it is not there).
    OutcomeUnknown,
    GiveUp,
}

/// The retry budget of one transaction: attempts of the transaction and, separately, of its
/// commit, within a time budget (an HTTP request, or a worker, is waiting).
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    pub attempts: u32,
    pub time: Duration,
}

impl Budget {
    /// The retry policy, after a failure `e` of a transaction that has run `tries` and taken
    /// `elapsed` so far.
    pub fn next(&self, e: &Facts, tries: Tries, elapsed: Duration) -> Next {
        let may_retry = |n: u32| n < self.attempts && elapsed < self.time;
        if tries.commit > 0 && e.unknown_commit && may_retry(tries.commit) {
            Next::RetryCommit
        } else if e.transient && may_retry(tries.transaction) {
            Next::RetryTransaction
        } else if e.is_write_conflict() {
            Next::Contended
        } else if tries.commit > 0 && e.unknown_commit {
            Next::OutcomeUnknown
        } else {
            Next::GiveUp
        }
    }
}

/// A transaction that kept losing write conflicts until its retries ran out.
#[derive(Debug, thiserror::Error)]
#[error("gave up after {attempts} attempts that lost a write conflict")]
pub(super) struct Contended {
    pub attempts: u32,
    #[source]
    pub source: mongodb::error::Error,
}

/// Other writers kept winning the ticket: what a version mismatch answers too (the API re-reads
/// the ticket and checks again), not a failure of the database.
pub(super) fn conflict_if_contended(e: StoreError) -> Result<UpdateOutcome, StoreError> {
    match e {
        StoreError::Backend { source, .. } if source.is::<Contended>() => {
            Ok(UpdateOutcome::Conflict)
        }
        other => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    pub(crate) fn command_error(code: i32, message: &str) -> mongodb::error::Error {
        let c: mongodb::error::CommandError =
            bson::from_document(doc! {"code": code, "codeName": "X", "errmsg": message})
                .expect("command error");
        ErrorKind::Command(c).into()
    }

    #[test]
    fn codes_are_read_off_command_errors() {
        let lost = Facts::of(&command_error(286, "history lost"));
        assert!(lost.is_history_lost());
        let old = Facts::of(&command_error(
            280,
            "cannot resume stream; the resume token was not found",
        ));
        assert!(old.is_history_lost());
        let denied = Facts::of(&command_error(13, "unauthorized"));
        assert!(!denied.is_history_lost() && !denied.is_duplicate_key());
        assert!(Facts::of(&command_error(11000, "E11000 duplicate key")).is_duplicate_key());
        assert!(Facts::of(&command_error(112, "WriteConflict")).is_write_conflict());
    }

    /// A write concern error as the server sends it, with the labels it may carry.
    fn write_concern_error(code: i32, wtimeout: bool, labels: &[&str]) -> mongodb::error::Error {
        let mut d = doc! {"code": code, "codeName": "X", "errmsg": "waiting for replication"};
        if wtimeout {
            d.insert("errInfo", doc! {"wtimeout": true});
        }
        d.insert("errorLabels", labels.to_vec());
        let w: WriteConcernError = bson::from_document(d).expect("write concern error");
        ErrorKind::Write(WriteFailure::WriteConcernError(w)).into()
    }

    fn network_error() -> mongodb::error::Error {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        ErrorKind::Io(std::sync::Arc::new(io)).into()
    }

    #[test]
    fn a_write_timeout_is_named_and_is_not_retried() {
        // A commit that majority did not confirm in time, as the driver labels it.
        let commit = write_concern_error(64, true, &[UNKNOWN_TRANSACTION_COMMIT_RESULT]);
        let facts = Facts::of(&commit);
        assert!(facts.is_write_timeout() && facts.unknown_commit);
        assert!(!facts.is_retryable_write_failure());
        assert!(!retry_multi_write(&facts, 1));
        // The code alone (errInfo is optional) is enough.
        assert!(Facts::of(&write_concern_error(64, false, &[])).is_write_timeout());
        assert!(!Facts::of(&command_error(50, "MaxTimeMSExpired")).is_write_timeout());
        // Named as one in the store error's chain: what an operator reads behind the 503.
        let e = backend("claim_due", write_concern_error(64, true, &[]));
        let chain = crate::error_chain(&e);
        assert!(chain.contains("MONGO_WRITE_TIMEOUT_SECS"), "{chain}");
        let other = backend("claim_due", command_error(13, "unauthorized"));
        assert!(!crate::error_chain(&other).contains("MONGO_WRITE_TIMEOUT_SECS"));
    }

    #[test]
    fn a_multi_document_write_is_sent_once_more_after_a_step_down_or_a_network_error() {
        let retried = [
            // The connection broke: the driver labels nothing on a multi-document write.
            Facts::of(&network_error()),
            // The primary stepped down under the write, or it went to a former primary.
            Facts::of(&command_error(11602, "InterruptedDueToReplStateChange")),
            Facts::of(&command_error(10107, "not primary")),
            Facts::of(&command_error(189, "PrimarySteppedDown")),
            // A shutdown interrupted the write concern wait, labelled by the server.
            Facts::of(&write_concern_error(91, false, &[RETRYABLE_WRITE_ERROR])),
        ];
        for facts in &retried {
            assert!(facts.is_retryable_write_failure(), "{facts:?}");
            assert!(retry_multi_write(facts, 1), "once: {facts:?}");
            assert!(!retry_multi_write(facts, 2), "only once: {facts:?}");
        }
        assert!(Facts::of(&network_error()).network);
        let label = Facts::of(&write_concern_error(91, false, &[RETRYABLE_WRITE_ERROR]));
        assert!(label.retryable_write);
        for code in [11000, 13, 2, 112] {
            let facts = Facts::of(&command_error(code, "x"));
            assert!(!retry_multi_write(&facts, 1), "code {code}");
        }
    }

    #[test]
    fn an_unknown_commit_outcome_is_recognised_behind_the_store_error() {
        let e = StoreError::backend(
            "create_ticket",
            CommitUnknown {
                source: network_error(),
            },
        );
        assert!(is_commit_unknown(&e));
        assert!(!is_commit_unknown(&backend(
            "create_ticket",
            network_error()
        )));
        assert!(!is_commit_unknown(&StoreError::Corrupt("x".into())));
    }

    const BUDGET: Budget = Budget {
        attempts: 5,
        time: Duration::from_secs(10),
    };

    fn facts(transient: bool, unknown_commit: bool, code: Option<i32>) -> Facts {
        Facts {
            code,
            transient,
            unknown_commit,
            ..Facts::default()
        }
    }

    fn body(transaction: u32) -> Tries {
        Tries {
            transaction,
            commit: 0,
        }
    }

    fn commit(transaction: u32, commit: u32) -> Tries {
        Tries {
            transaction,
            commit,
        }
    }

    #[test]
    fn transient_errors_run_the_transaction_again_within_the_budget() {
        let transient = facts(true, false, None);
        let second = Duration::from_secs(1);
        assert_eq!(
            BUDGET.next(&transient, body(1), second),
            Next::RetryTransaction
        );
        assert_eq!(
            BUDGET.next(&transient, commit(4, 1), second),
            Next::RetryTransaction
        );
        assert_eq!(BUDGET.next(&transient, body(5), second), Next::GiveUp);
        let late = Duration::from_secs(11);
        assert_eq!(BUDGET.next(&transient, body(1), late), Next::GiveUp);
    }

    #[test]
    fn an_unknown_commit_result_commits_again_only_at_commit() {
        let unknown = facts(false, true, None);
        let t = Duration::ZERO;
        assert_eq!(BUDGET.next(&unknown, commit(1, 1), t), Next::RetryCommit);
        // Past the retries, or past the time budget (an election longer than it): the commit
        // may have applied.
        assert_eq!(BUDGET.next(&unknown, commit(1, 5), t), Next::OutcomeUnknown);
        let late = Duration::from_secs(11);
        assert_eq!(
            BUDGET.next(&unknown, commit(1, 1), late),
            Next::OutcomeUnknown
        );
        assert_eq!(BUDGET.next(&unknown, body(1), t), Next::GiveUp);
    }

    #[test]
    fn a_write_conflict_past_its_retries_is_contention_not_a_failure() {
        let conflict = facts(true, false, Some(112));
        let t = Duration::ZERO;
        assert_eq!(BUDGET.next(&conflict, body(1), t), Next::RetryTransaction);
        assert_eq!(BUDGET.next(&conflict, body(5), t), Next::Contended);
        assert_eq!(BUDGET.next(&conflict, commit(5, 1), t), Next::Contended);
        let other = facts(false, false, Some(13));
        assert_eq!(BUDGET.next(&other, body(1), t), Next::GiveUp);
    }

    #[test]
    fn contention_answers_conflict_and_other_errors_stay_errors() {
        let contended = StoreError::backend(
            "update_ticket",
            Contended {
                attempts: 5,
                source: command_error(112, "WriteConflict"),
            },
        );
        assert_eq!(
            conflict_if_contended(contended).expect("a conflict"),
            UpdateOutcome::Conflict
        );
        let down = StoreError::backend("update_ticket", "down");
        assert!(conflict_if_contended(down).is_err());
    }
}
