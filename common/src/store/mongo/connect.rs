//! Connecting: the start-up checks (the URI's database, what the deployment is), and the
//! messages an operator reads when they fail. When no server can be selected, the URI's hosts
//! are probed one by one with a direct connection, and what the first that answers says of
//! itself is classified ([`diagnose`]): with `?replicaSet=` in the URI the driver silently drops
//! a standalone server, ignores a member whose set is not initiated or has another name, and
//! gives up on members whose names this machine cannot resolve, and all the user would read is
//! a timeout. The decisions are plain functions of a `hello` reply, tested without a server.

use super::errors::{COMMAND_NOT_FOUND, Facts};
use crate::store::StoreError;
use bson::{Bson, Document, doc};
use chrono::{DateTime, Utc};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, ServerAddress, Tls};
use mongodb::{Client, Database};
use std::time::Duration;

/// The database when the URI's path names none.
pub(super) const DEFAULT_DATABASE: &str = "tickets";

/// Databases the server keeps for itself: transactions and change streams are refused in them.
const RESERVED_DATABASES: [&str; 3] = ["admin", "local", "config"];

/// How many of the URI's hosts a failed start probes, and how long each may take.
const PROBED_HOSTS: usize = 3;
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

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

/// The store's database: the URI's path, [`DEFAULT_DATABASE`] when it names none. `admin`,
/// `local` and `config` are refused with the fix: `/admin` is a common way to say "authenticate
/// against admin", which `authSource=admin` says without making the store use it.
pub(super) fn database_name(path: Option<&str>) -> Result<String, String> {
    match path.filter(|d| !d.is_empty()) {
        None => Ok(DEFAULT_DATABASE.to_owned()),
        Some(db) if RESERVED_DATABASES.contains(&db) => Err(format!(
            "MONGO_URI names the database `{db}` (the URI's path), which MongoDB keeps for \
             itself: transactions and change streams are refused there. Put the service's \
             database in the path and, if the user is defined in `{db}`, say so with \
             authSource: mongodb://USER:PASSWORD@HOST/{DEFAULT_DATABASE}?authSource={db}&replicaSet=rs0"
        )),
        Some(db) => Ok(db.to_owned()),
    }
}

/// What a `hello` reply says the deployment is (as the driver's own server types do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Deployment {
    ReplicaSet,
    /// A sharded cluster's router.
    Mongos,
    /// A single server that is not a replica set member: no transactions, no change streams.
    Standalone,
    /// Started with `--replSet`, but has no replica set configuration (never initiated, or
    /// removed from its set).
    NotInitiated,
}

pub(super) fn deployment(hello: &Document) -> Deployment {
    if hello.get_str("setName").is_ok() {
        Deployment::ReplicaSet
    } else if hello.get_str("msg") == Ok("isdbgrid") {
        Deployment::Mongos
    } else if hello.get_bool("isreplicaset") == Ok(true) {
        Deployment::NotInitiated
    } else {
        Deployment::Standalone
    }
}

/// The server's clock at the time of a `hello` reply.
pub(super) fn server_time(hello: &Document) -> Option<DateTime<Utc>> {
    match hello.get("localTime") {
        Some(Bson::DateTime(t)) => Some(t.to_chrono()),
        _ => None,
    }
}

fn is_writable_primary(hello: &Document) -> bool {
    hello.get_bool("isWritablePrimary") == Ok(true) || hello.get_bool("ismaster") == Ok(true)
}

/// A member's state, as `rs.status()` spells it.
pub(super) fn member_state(hello: &Document) -> &'static str {
    if is_writable_primary(hello) {
        "PRIMARY"
    } else if hello.get_bool("secondary") == Ok(true) {
        "SECONDARY"
    } else if hello.get_bool("arbiterOnly") == Ok(true) {
        "ARBITER"
    } else {
        "neither primary nor secondary (starting up, recovering or removed)"
    }
}

/// The replica set's members as its configuration names them: the names every client connects
/// to, whatever the URI lists.
pub(super) fn members(hello: &Document) -> Vec<String> {
    ["hosts", "passives", "arbiters"]
        .into_iter()
        .filter_map(|field| hello.get_array(field).ok())
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_owned))
        .collect()
}

/// What is wrong with a deployment, from a `hello` reply of one of its servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Diagnosis {
    Standalone,
    NotInitiated,
    /// The URI's `replicaSet` is not the set's name: the driver ignores every member.
    OtherSetName {
        expected: String,
        actual: String,
    },
    /// Members named so that this machine cannot reach them (`(member, why)`); the usual Docker
    /// case: the set was initiated with container names, the client runs on the host.
    UnreachableMembers {
        set: String,
        members: Vec<String>,
        unreachable: Vec<(String, String)>,
    },
    /// No member is primary (no majority up, or an election under way).
    NoPrimary {
        set: String,
        state: &'static str,
    },
    /// The URI connects to this one member alone (`directConnection=true`), which is not the
    /// primary: writes would fail.
    NotPrimary {
        set: String,
        state: &'static str,
    },
    /// Nothing wrong that this reply shows.
    Answers {
        what: String,
    },
}

/// Classifies what a server said of itself. `expected_set` is the URI's `replicaSet`;
/// `unreachable` the members of its set (see [`members`]) this machine could not resolve or
/// connect to.
pub(super) fn diagnose(
    hello: &Document,
    expected_set: Option<&str>,
    unreachable: &[(String, String)],
) -> Diagnosis {
    let set = match deployment(hello) {
        Deployment::Standalone => return Diagnosis::Standalone,
        Deployment::NotInitiated => return Diagnosis::NotInitiated,
        Deployment::Mongos => {
            return Diagnosis::Answers {
                what: "a mongos router".into(),
            };
        }
        Deployment::ReplicaSet => hello.get_str("setName").unwrap_or_default().to_owned(),
    };
    match expected_set {
        Some(expected) if expected != set => {
            return Diagnosis::OtherSetName {
                expected: expected.to_owned(),
                actual: set,
            };
        }
        _ => {}
    }
    if !unreachable.is_empty() {
        return Diagnosis::UnreachableMembers {
            set,
            members: members(hello),
            unreachable: unreachable.to_vec(),
        };
    }
    let state = member_state(hello);
    if !is_writable_primary(hello) && hello.get_str("primary").is_err() {
        return Diagnosis::NoPrimary { set, state };
    }
    Diagnosis::Answers {
        what: format!("{state} of replica set `{set}`"),
    }
}

/// The operator's message for `d`, seen at `host`.
pub(super) fn explain(d: &Diagnosis, host: &str) -> String {
    match d {
        Diagnosis::Standalone => format!(
            "MongoDB at {host} (MONGO_URI) is a standalone server, not a replica set member: \
             transactions and change streams need a replica set. Start mongod with --replSet rs0 \
             and run rs.initiate() once (a single-node replica set is enough)"
        ),
        Diagnosis::NotInitiated => format!(
            "MongoDB at {host} (MONGO_URI) was started with --replSet, but its replica set is not \
             initiated (or it was removed from it): run rs.initiate() once, with member host \
             names this service can resolve, e.g. mongosh --eval \"rs.initiate({{_id: 'rs0', \
             members: [{{_id: 0, host: '{host}'}}]}})\""
        ),
        Diagnosis::OtherSetName { expected, actual } => format!(
            "MongoDB at {host} (MONGO_URI) belongs to the replica set `{actual}`, but MONGO_URI \
             says replicaSet={expected}, so the driver ignores it: use replicaSet={actual}"
        ),
        Diagnosis::UnreachableMembers {
            set,
            members,
            unreachable,
        } => {
            let why = unreachable
                .iter()
                .map(|(_, why)| why.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            format!(
                "MongoDB at {host} (MONGO_URI) answers, but its replica set `{set}` names its \
                 members {}, and the driver connects to those names, not to the URI's hosts: {why}. \
                 Make those names resolvable and reachable from here (a Docker network alias, an \
                 /etc/hosts entry), or reconfigure the set with names that are (rs.reconfig), \
                 or, for one member, add directConnection=true to MONGO_URI",
                members.join(", ")
            )
        }
        Diagnosis::NoPrimary { set, state } => format!(
            "MongoDB at {host} (MONGO_URI) is {state} of the replica set `{set}`, which has no \
             primary: a majority of its members must be up to elect one (rs.status() shows them)"
        ),
        Diagnosis::NotPrimary { set, state } => format!(
            "MongoDB at {host} (MONGO_URI) is {state} of the replica set `{set}`, and MONGO_URI \
             connects to it alone (directConnection=true): writes need the primary. Name the \
             members with replicaSet={set} instead of directConnection, or point at the primary"
        ),
        Diagnosis::Answers { what } => format!(
            "MongoDB at {host} (MONGO_URI) answers as {what}, but no server could be selected \
             for the store"
        ),
    }
}

/// What the start-up check needs of the URI: whether it connects to one member alone, and, for
/// a failed start, what to probe the URI's hosts with (their addresses, TLS as the URI asks, the
/// set name it expects).
#[derive(Debug, Clone)]
pub(super) struct Probe {
    hosts: Vec<ServerAddress>,
    tls: Option<Tls>,
    expected_set: Option<String>,
    direct: bool,
    timeout: Duration,
}

impl Probe {
    pub fn of(options: &ClientOptions, selection_timeout: Duration) -> Self {
        Self {
            hosts: options.hosts.iter().take(PROBED_HOSTS).cloned().collect(),
            tls: options.tls.clone(),
            expected_set: options.repl_set_name.clone(),
            direct: options.direct_connection == Some(true),
            timeout: selection_timeout.min(PROBE_TIMEOUT),
        }
    }

    /// The first host that answers a direct `hello`, with the reply. No credentials: `hello`
    /// needs none, and a wrong password is another mistake with its own message.
    async fn first_answer(&self) -> Option<(String, Document)> {
        for host in &self.hosts {
            let options = ClientOptions::builder()
                .hosts(vec![host.clone()])
                .direct_connection(true)
                .tls(self.tls.clone())
                .server_selection_timeout(self.timeout)
                .connect_timeout(self.timeout)
                .app_name("ticketing start-up probe".to_owned())
                .build();
            let Ok(client) = Client::with_options(options) else {
                continue;
            };
            let reply = hello(&client.database("admin")).await;
            client.shutdown().immediate(true).await;
            match reply {
                Ok(reply) => return Some((host.to_string(), reply)),
                Err(e) => tracing::debug!(%host, error = %e, "start-up probe: no answer"),
            }
        }
        None
    }

    /// Why selection failed, if a host says so; `None` when none answers.
    async fn diagnose(&self) -> Option<String> {
        let (host, reply) = self.first_answer().await?;
        let mut unreachable = Vec::new();
        if deployment(&reply) == Deployment::ReplicaSet {
            for member in members(&reply) {
                if let Err(why) = reach(&member, self.timeout).await {
                    unreachable.push((member, why));
                }
            }
        }
        let d = diagnose(&reply, self.expected_set.as_deref(), &unreachable);
        Some(explain(&d, &host))
    }
}

/// Whether `member` (`host:port`) resolves and accepts a TCP connection from here.
async fn reach(member: &str, timeout: Duration) -> Result<(), String> {
    let addrs = match tokio::time::timeout(timeout, tokio::net::lookup_host(member)).await {
        Err(_) => return Err(format!("resolving {member} timed out")),
        Ok(Err(e)) => return Err(format!("{member} does not resolve here ({e})")),
        Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
    };
    let mut last = format!("{member} resolves to no address");
    for addr in addrs {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = format!("{member} ({addr}) refuses connections from here ({e})"),
            Err(_) => last = format!("{member} ({addr}) does not answer from here"),
        }
    }
    Err(last)
}

/// `hello`, or the legacy `isMaster` on servers before 4.4.2 (and 4.2.10).
async fn hello(db: &Database) -> mongodb::error::Result<Document> {
    match db.run_command(doc! {"hello": 1}).await {
        Err(e) if Facts::of(&e).code == Some(COMMAND_NOT_FOUND) => {
            db.run_command(doc! {"isMaster": 1}).await
        }
        other => other,
    }
}

/// Checks the deployment can run multi-document transactions and change streams, and that
/// writes can reach its primary; says what is wrong otherwise.
pub(super) async fn check_deployment(
    db: &Database,
    hosts: &str,
    timeout: Duration,
    probe: &Probe,
) -> Result<(), StoreError> {
    let reply = match hello(db).await {
        Ok(reply) => reply,
        Err(e) if matches!(*e.kind, ErrorKind::ServerSelection { .. }) => {
            let message = match probe.diagnose().await {
                Some(message) => message,
                None => format!(
                    "cannot reach MongoDB at {hosts} (MONGO_URI) within {timeout:?}: is it \
                     running, and is the URI right?"
                ),
            };
            return Err(open_error(message, Some(e)));
        }
        Err(e) => {
            return Err(open_error(
                format!("cannot talk to MongoDB at {hosts} (MONGO_URI)"),
                Some(e),
            ));
        }
    };
    let problem = match deployment(&reply) {
        Deployment::Mongos => None,
        Deployment::Standalone => Some(Diagnosis::Standalone),
        Deployment::NotInitiated => Some(Diagnosis::NotInitiated),
        // Only a direct connection selects a member that is not the primary (otherwise the
        // primary answered, and may have stepped down since: writes will find the next one).
        Deployment::ReplicaSet if probe.direct && !is_writable_primary(&reply) => {
            Some(Diagnosis::NotPrimary {
                set: reply.get_str("setName").unwrap_or_default().to_owned(),
                state: member_state(&reply),
            })
        }
        Deployment::ReplicaSet => None,
    };
    match problem {
        Some(d) => Err(open_error(explain(&d, hosts), None)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> Document {
        doc! {
            "isWritablePrimary": true, "secondary": false, "setName": "rs0",
            "hosts": ["mongo-0:27017", "mongo-1:27017"], "arbiters": ["mongo-2:27017"],
            "primary": "mongo-0:27017", "me": "mongo-0:27017",
            "localTime": bson::DateTime::from_millis(1_700_000_000_123),
        }
    }

    #[test]
    fn a_hello_reply_names_the_deployment() {
        assert_eq!(deployment(&primary()), Deployment::ReplicaSet);
        let router = doc! {"isWritablePrimary": true, "msg": "isdbgrid"};
        assert_eq!(deployment(&router), Deployment::Mongos);
        let single = doc! {"isWritablePrimary": true, "maxWireVersion": 21};
        assert_eq!(deployment(&single), Deployment::Standalone);
        // What a `--replSet` member answers before rs.initiate().
        let ghost = doc! {
            "isWritablePrimary": false, "secondary": false, "isreplicaset": true,
            "info": "Does not have a valid replica set config",
        };
        assert_eq!(deployment(&ghost), Deployment::NotInitiated);
    }

    #[test]
    fn the_uri_database_is_never_one_the_server_keeps() {
        assert_eq!(database_name(None).as_deref(), Ok("tickets"));
        assert_eq!(database_name(Some("")).as_deref(), Ok("tickets"));
        assert_eq!(database_name(Some("shop")).as_deref(), Ok("shop"));
        for reserved in ["admin", "local", "config"] {
            let message = database_name(Some(reserved)).expect_err(reserved);
            assert!(message.contains(&format!("`{reserved}`")), "{message}");
            assert!(
                message.contains(&format!("/tickets?authSource={reserved}")),
                "the fix: {message}"
            );
        }
    }

    #[test]
    fn the_server_time_is_read_off_hello() {
        let t = server_time(&primary()).expect("localTime");
        assert_eq!(t.timestamp_millis(), 1_700_000_000_123);
        assert_eq!(server_time(&doc! {"ok": 1}), None);
    }

    #[test]
    fn members_are_the_names_the_set_configuration_gives() {
        assert_eq!(
            members(&primary()),
            ["mongo-0:27017", "mongo-1:27017", "mongo-2:27017"]
        );
        assert!(members(&doc! {"ismaster": true}).is_empty());
    }

    #[test]
    fn a_standalone_server_is_told_to_start_as_a_replica_set() {
        let d = diagnose(&doc! {"isWritablePrimary": true}, Some("rs0"), &[]);
        assert_eq!(d, Diagnosis::Standalone);
        let message = explain(&d, "localhost:27017");
        assert!(message.contains("--replSet"), "{message}");
        assert!(message.contains("localhost:27017"), "{message}");
    }

    #[test]
    fn an_uninitiated_member_is_told_to_run_rs_initiate() {
        let ghost = doc! {"ismaster": false, "secondary": false, "isreplicaset": true};
        let d = diagnose(&ghost, Some("rs0"), &[]);
        assert_eq!(d, Diagnosis::NotInitiated);
        assert!(explain(&d, "h:27017").contains("rs.initiate()"));
    }

    #[test]
    fn another_set_name_is_named_with_the_fix() {
        let d = diagnose(&primary(), Some("rs1"), &[]);
        assert_eq!(
            d,
            Diagnosis::OtherSetName {
                expected: "rs1".into(),
                actual: "rs0".into()
            }
        );
        let message = explain(&d, "h:27017");
        assert!(message.contains("use replicaSet=rs0"), "{message}");
        // No replicaSet in the URI: any name will do.
        assert!(matches!(
            diagnose(&primary(), None, &[]),
            Diagnosis::Answers { .. }
        ));
    }

    #[test]
    fn members_this_machine_cannot_resolve_are_listed_with_the_fix() {
        let unreachable = vec![(
            "mongo-1:27017".to_owned(),
            "mongo-1:27017 does not resolve here (failed to lookup address information)".to_owned(),
        )];
        let d = diagnose(&primary(), Some("rs0"), &unreachable);
        let Diagnosis::UnreachableMembers { set, members, .. } = &d else {
            panic!("expected UnreachableMembers, got {d:?}");
        };
        assert_eq!(set, "rs0");
        assert_eq!(members.len(), 3);
        let message = explain(&d, "localhost:27017");
        assert!(
            message.contains("mongo-0:27017, mongo-1:27017"),
            "{message}"
        );
        assert!(message.contains("does not resolve here"), "{message}");
        assert!(message.contains("directConnection=true"), "{message}");
        // The set name is checked first: the URI's mistake is the one to fix first.
        assert!(matches!(
            diagnose(&primary(), Some("other"), &unreachable),
            Diagnosis::OtherSetName { .. }
        ));
    }

    #[test]
    fn a_set_without_a_primary_says_so() {
        let secondary = doc! {
            "isWritablePrimary": false, "secondary": true, "setName": "rs0",
            "hosts": ["a:1", "b:1", "c:1"],
        };
        let d = diagnose(&secondary, Some("rs0"), &[]);
        assert_eq!(
            d,
            Diagnosis::NoPrimary {
                set: "rs0".into(),
                state: "SECONDARY"
            }
        );
        assert!(explain(&d, "a:1").contains("has no primary"));
        // A secondary that knows its primary: nothing wrong seen from here.
        let mut with_primary = secondary.clone();
        with_primary.insert("primary", "b:1");
        assert_eq!(
            diagnose(&with_primary, Some("rs0"), &[]),
            Diagnosis::Answers {
                what: "SECONDARY of replica set `rs0`".into()
            }
        );
    }

    #[test]
    fn a_direct_connection_to_a_secondary_is_refused_with_the_fix() {
        let d = Diagnosis::NotPrimary {
            set: "rs0".into(),
            state: "SECONDARY",
        };
        let message = explain(&d, "mongo-1:27017");
        assert!(message.contains("directConnection=true"), "{message}");
        assert!(message.contains("replicaSet=rs0"), "{message}");
    }

    #[tokio::test]
    async fn a_member_is_reachable_only_if_it_resolves_and_accepts_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("addr");
        let timeout = Duration::from_secs(2);
        assert_eq!(reach(&open.to_string(), timeout).await, Ok(()));
        drop(listener);
        let refused = reach(&open.to_string(), timeout).await.expect_err("closed");
        assert!(refused.contains("refuses connections"), "{refused}");
        // `.invalid` never resolves (RFC 2606): the Docker container name seen from the host.
        let unknown = reach("mongo-0.invalid:27017", timeout)
            .await
            .expect_err("does not resolve");
        assert!(unknown.contains("mongo-0.invalid:27017"), "{unknown}");
    }

    #[test]
    fn the_probe_covers_the_first_hosts_within_a_short_timeout() {
        let options = ClientOptions::builder()
            .hosts(
                (0..5)
                    .map(|i| ServerAddress::Tcp {
                        host: format!("h{i}"),
                        port: Some(27017),
                    })
                    .collect::<Vec<_>>(),
            )
            .repl_set_name("rs0".to_owned())
            .build();
        let probe = Probe::of(&options, Duration::from_secs(30));
        assert_eq!(probe.hosts.len(), PROBED_HOSTS);
        assert_eq!(probe.expected_set.as_deref(), Some("rs0"));
        assert!(!probe.direct);
        assert_eq!(probe.timeout, PROBE_TIMEOUT);
        assert_eq!(
            Probe::of(&options, Duration::from_millis(300)).timeout,
            Duration::from_millis(300)
        );
    }
}
