//! Multi-document transactions, retried by the policy in `errors` ([`Budget::next`]).

use super::MongoStore;
use super::errors::{self, Budget, CommitUnknown, Contended, Facts, Next, Tries};
use crate::backoff::{Backoff, jittered};
use crate::store::StoreError;
use futures::future::BoxFuture;
use mongodb::ClientSession;
use mongodb::options::{ReadConcern, ReadPreference, SelectionCriteria};
use std::time::{Duration, Instant};

/// Attempts of one transaction (and, separately, of its commit), and the time they may take:
/// an HTTP request (or a worker) is waiting.
const BUDGET: Budget = Budget {
    attempts: 5,
    time: Duration::from_secs(10),
};

/// What a transaction body can fail with: the driver (maybe retryable) or the data.
pub(super) enum TxnError {
    Driver(mongodb::error::Error),
    Store(StoreError),
}

impl From<mongodb::error::Error> for TxnError {
    fn from(e: mongodb::error::Error) -> Self {
        Self::Driver(e)
    }
}

impl From<StoreError> for TxnError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl MongoStore {
    /// Runs `body` in a multi-document transaction (snapshot reads, majority writes within the
    /// write timeout), retried as [`Budget::next`] decides. `body` may run several times: it must
    /// build what it writes itself. A commit whose outcome stayed unknown fails with
    /// [`CommitUnknown`]: the caller reads back what it wrote (`tickets::settle`).
    pub(super) async fn transaction<T, F>(
        &self,
        op: &'static str,
        mut body: F,
    ) -> Result<T, StoreError>
    where
        T: Send,
        F: FnMut(&mut ClientSession) -> BoxFuture<'_, Result<T, TxnError>> + Send,
    {
        let started = Instant::now();
        let mut session = self
            .client
            .start_session()
            .await
            .map_err(|e| StoreError::backend(op, e))?;
        // Jittered, so that writers that lost one conflict drift apart.
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
        let mut tries = Tries {
            transaction: 0,
            commit: 0,
        };
        'transaction: loop {
            tries.transaction += 1;
            tries.commit = 0;
            session
                .start_transaction()
                .read_concern(ReadConcern::snapshot())
                .write_concern(self.write_concern())
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                .await
                .map_err(|e| StoreError::backend(op, e))?;
            let value = match body(&mut session).await {
                Ok(v) => v,
                Err(TxnError::Store(e)) => {
                    let _ = session.abort_transaction().await;
                    return Err(e);
                }
                Err(TxnError::Driver(e)) => {
                    // Best effort: the server may have aborted it already.
                    let _ = session.abort_transaction().await;
                    match BUDGET.next(&Facts::of(&e), tries, started.elapsed()) {
                        Next::RetryTransaction => {
                            tracing::debug!(op, attempt = tries.transaction, error = %e, "transient transaction error; retrying");
                            tokio::time::sleep(jittered(backoff.next_delay())).await;
                            continue 'transaction;
                        }
                        next => return Err(give_up(op, next, tries, e)),
                    }
                }
            };
            loop {
                tries.commit += 1;
                let Err(e) = session.commit_transaction().await else {
                    return Ok(value);
                };
                match BUDGET.next(&Facts::of(&e), tries, started.elapsed()) {
                    Next::RetryCommit => {
                        tracing::debug!(op, commits = tries.commit, error = %e, "unknown commit result; committing again");
                    }
                    Next::RetryTransaction => {
                        tracing::debug!(op, attempt = tries.transaction, error = %e, "transient commit error; retrying the transaction");
                        tokio::time::sleep(jittered(backoff.next_delay())).await;
                        continue 'transaction;
                    }
                    next => return Err(give_up(op, next, tries, e)),
                }
            }
        }
    }
}

fn give_up(op: &'static str, next: Next, tries: Tries, e: mongodb::error::Error) -> StoreError {
    match next {
        Next::Contended => StoreError::backend(
            op,
            Contended {
                attempts: tries.transaction,
                source: e,
            },
        ),
        Next::OutcomeUnknown => {
            tracing::warn!(op, commits = tries.commit, error = %e, "the commit's outcome is unknown past the retries; reading back what it wrote");
            StoreError::backend(op, CommitUnknown { source: e })
        }
        _ => errors::backend(op, e),
    }
}
