//! Connecting: the start-up check that the deployment can run transactions and change streams,
//! and the messages an operator reads when it cannot.

use super::errors::{COMMAND_NOT_FOUND, Facts};
use crate::store::StoreError;
use bson::{Document, doc};
use mongodb::Database;
use mongodb::error::ErrorKind;
use std::time::Duration;

/// A failure while opening, with the message an operator needs and the driver's error below it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct OpenError {
    pub message: String,
    #[source]
    pub source: Option<mongodb::error::Error>,
}

pub(super) fn open_error(message: String, source: Option<mongodb::error::Error>) -> StoreError {
    StoreError::backend("open", OpenError { message, source })
}

/// What a `hello` reply says the deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Deployment {
    ReplicaSet,
    /// A sharded cluster's router.
    Mongos,
    /// A single server that is not a replica set member: no transactions, no change streams.
    Standalone,
}

pub(super) fn deployment(hello: &Document) -> Deployment {
    if hello.get_str("setName").is_ok() {
        Deployment::ReplicaSet
    } else if hello.get_str("msg") == Ok("isdbgrid") {
        Deployment::Mongos
    } else {
        Deployment::Standalone
    }
}

/// Checks the deployment can run multi-document transactions and change streams.
pub(super) async fn check_replica_set(
    db: &Database,
    hosts: &str,
    timeout: Duration,
) -> Result<(), StoreError> {
    let unreachable = |e: mongodb::error::Error| {
        let message = if matches!(*e.kind, ErrorKind::ServerSelection { .. }) {
            format!(
                "cannot reach MongoDB at {hosts} (MONGO_URI) within {timeout:?}: is it running, \
                 and is the URI right?"
            )
        } else {
            format!("cannot talk to MongoDB at {hosts} (MONGO_URI)")
        };
        open_error(message, Some(e))
    };
    let hello = match db.run_command(doc! {"hello": 1}).await {
        Ok(reply) => reply,
        // Servers before 4.4.2 (and 4.2.10) know only the legacy name.
        Err(e) if Facts::of(&e).code == Some(COMMAND_NOT_FOUND) => db
            .run_command(doc! {"isMaster": 1})
            .await
            .map_err(unreachable)?,
        Err(e) => return Err(unreachable(e)),
    };
    match deployment(&hello) {
        Deployment::ReplicaSet | Deployment::Mongos => Ok(()),
        Deployment::Standalone => Err(open_error(
            format!(
                "MongoDB at {hosts} (MONGO_URI) is not a replica set: transactions and change \
                 streams need one; start mongod with --replSet rs0 and run rs.initiate() (a \
                 single-node replica set is enough)"
            ),
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_reply_names_the_deployment() {
        let member = doc! {"isWritablePrimary": true, "setName": "rs0", "hosts": ["h:27017"]};
        assert_eq!(deployment(&member), Deployment::ReplicaSet);
        let router = doc! {"isWritablePrimary": true, "msg": "isdbgrid"};
        assert_eq!(deployment(&router), Deployment::Mongos);
        let single = doc! {"isWritablePrimary": true, "maxWireVersion": 21};
        assert_eq!(deployment(&single), Deployment::Standalone);
    }
}
