//! What a driver error means for us, decided by plain functions: the few facts read off an
//! error ([`Facts`]) are all the decisions look at, so the decisions are tested without a server.

use crate::store::{StoreError, UpdateOutcome};
use mongodb::error::{
    ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT, WriteFailure,
};
use std::time::Duration;

/// 11000 DuplicateKey.
const DUPLICATE_KEY: i32 = 11000;
/// 112 WriteConflict: another transaction wrote the same document first (transactions do not
/// wait for each other's locks; the loser is aborted at once).
const WRITE_CONFLICT: i32 = 112;
/// 59 CommandNotFound (`hello` on servers before 4.4.2 / 4.2.10).
pub(super) const COMMAND_NOT_FOUND: i32 = 59;

/// What the decisions need to know of a driver error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Facts {
    /// The server's code, for command and write errors.
    pub code: Option<i32>,
    /// `TransientTransactionError`: the whole transaction may be run again.
    pub transient: bool,
    /// `UnknownTransactionCommitResult`: the commit may or may not have applied.
    pub unknown_commit: bool,
    pub message: String,
}

impl Facts {
    pub fn of(e: &mongodb::error::Error) -> Self {
        Self {
            code: command_code(e),
            transient: e.contains_label(TRANSIENT_TRANSACTION_ERROR),
            unknown_commit: e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT),
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

    const BUDGET: Budget = Budget {
        attempts: 5,
        time: Duration::from_secs(10),
    };

    fn facts(transient: bool, unknown_commit: bool, code: Option<i32>) -> Facts {
        Facts {
            code,
            transient,
            unknown_commit,
            message: String::new(),
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
        assert_eq!(BUDGET.next(&unknown, commit(1, 5), t), Next::GiveUp);
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
