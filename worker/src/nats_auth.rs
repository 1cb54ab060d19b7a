//! How the publisher proves who it is to NATS and secures the connection: the user and password,
//! or the token, in `NATS_URL`'s user info; a `.creds` file of NATS accounts (`NATS_CREDS`); TLS
//! (`NATS_TLS_CA`, and `NATS_TLS_CERT` with `NATS_TLS_KEY` for a server that verifies clients).
//!
//! async-nats sends only the credentials set on its `ConnectOptions`, never the user info of the
//! URLs it is given, so the user info is taken out of every address and set as options: it then
//! reaches the server, and no log line of the client that prints an address.

use crate::publisher::normalize_url;
use anyhow::Context;
use async_nats::{ConnectOptions, ServerAddr};
use common::redact_url;
use std::path::{Path, PathBuf};

/// What the publisher authenticates with besides `NATS_URL`'s user info, and TLS.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    /// A NATS credentials file: the user's JWT and NKey seed.
    pub creds: Option<PathBuf>,
    /// The CA certificates (PEM) the server's certificate is checked against, instead of the
    /// system's roots.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM), with its key, for a server that verifies its clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl NatsAuth {
    fn tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some()
    }
}

/// The user info of a server address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credentials {
    UserPassword(String, String),
    Token(String),
}

/// The servers of `url` (comma-separated, `http://` meaning `nats://`) without their user info,
/// and `options` with the user info, the credentials file and TLS. Any TLS setting makes TLS
/// required. Files are checked at once, so a wrong path stops the start instead of failing
/// every connection attempt. Errors show `url` redacted.
pub async fn configure(
    options: ConnectOptions,
    url: &str,
    auth: &NatsAuth,
) -> anyhow::Result<(ConnectOptions, Vec<ServerAddr>)> {
    let (servers, credentials) = parse_servers(url)?;
    let mut options = match credentials {
        Some(Credentials::UserPassword(user, password)) => {
            options.user_and_password(user, password)
        }
        Some(Credentials::Token(token)) => options.token(token),
        None => options,
    };
    if let Some(creds) = &auth.creds {
        options = options
            .credentials_file(creds)
            .await
            .with_context(|| format!("cannot use the NATS_CREDS file {}", creds.display()))?;
    }
    if let Some(ca) = &auth.tls_ca {
        readable(ca, "NATS_TLS_CA")?;
        options = options.add_root_certificates(ca.clone());
    }
    match (&auth.tls_cert, &auth.tls_key) {
        (Some(cert), Some(key)) => {
            readable(cert, "NATS_TLS_CERT")?;
            readable(key, "NATS_TLS_KEY")?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => anyhow::bail!(
            "NATS_TLS_CERT and NATS_TLS_KEY go together: a client certificate and its key"
        ),
    }
    if auth.tls() {
        options = options.require_tls(true);
    }
    Ok((options, servers))
}

fn readable(path: &Path, setting: &str) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .with_context(|| format!("cannot read the {setting} file {}", path.display()))
}

/// Each server of `url` without user info, and the user info they carry (one set for all).
fn parse_servers(url: &str) -> anyhow::Result<(Vec<ServerAddr>, Option<Credentials>)> {
    let invalid = || format!("invalid NATS_URL {}", redact_url(url));
    let mut servers = Vec::new();
    let mut credentials: Option<Credentials> = None;
    for entry in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr: ServerAddr = normalize_url(entry).parse().with_context(invalid)?;
        let mut inner = addr.into_inner();
        let found = match (inner.username(), inner.password()) {
            ("", None) => None,
            (user, Some(password)) => {
                Some(Credentials::UserPassword(decode(user), decode(password)))
            }
            (token, None) => Some(Credentials::Token(decode(token))),
        };
        if let Some(found) = found {
            anyhow::ensure!(
                credentials.as_ref().is_none_or(|c| *c == found),
                "{}: its servers carry different credentials, and one set is sent to every server",
                invalid()
            );
            credentials = Some(found);
            let stripped = inner
                .set_password(None)
                .and_then(|()| inner.set_username(""));
            anyhow::ensure!(stripped.is_ok(), "{}", invalid());
        }
        servers.push(ServerAddr::from_url(inner).with_context(invalid)?);
    }
    anyhow::ensure!(!servers.is_empty(), "{}: no server", invalid());
    Ok((servers, credentials))
}

/// User info as the server expects it: `%40` in the URL is `@` in the password.
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::{Credentials, parse_servers};

    fn hosts(url: &str) -> Vec<String> {
        let (servers, _) = parse_servers(url).expect("valid");
        servers
            .into_iter()
            .map(|s| s.into_inner().to_string())
            .collect()
    }

    #[test]
    fn user_and_password_leave_the_address_for_the_options() {
        let (servers, credentials) =
            parse_servers("nats://alice:s3cr3t@127.0.0.1:4222").expect("valid");
        assert_eq!(
            credentials,
            Some(Credentials::UserPassword("alice".into(), "s3cr3t".into()))
        );
        assert_eq!(servers.len(), 1);
        assert!(!servers[0].has_user_pass());
        assert_eq!(servers[0].as_url_str(), "nats://127.0.0.1:4222");
    }

    #[test]
    fn a_user_alone_is_a_token() {
        let (servers, credentials) = parse_servers("t0k3n@nats-srv:4222").expect("valid");
        assert_eq!(credentials, Some(Credentials::Token("t0k3n".into())));
        assert_eq!(servers[0].as_url_str(), "nats://nats-srv:4222");
    }

    #[test]
    fn percent_encoded_user_info_is_decoded() {
        let (_, credentials) = parse_servers("nats://al%40ice:p%40ss%2Cw%2Fd@host").expect("ok");
        assert_eq!(
            credentials,
            Some(Credentials::UserPassword(
                "al@ice".into(),
                "p@ss,w/d".into()
            ))
        );
    }

    #[test]
    fn several_servers_and_the_http_scheme() {
        assert_eq!(
            hosts("http://alice:pw@a:4222, nats://alice:pw@b:4222,c"),
            ["nats://a:4222", "nats://b:4222", "nats://c"]
        );
        let (_, credentials) = parse_servers("nats://a:4222,nats://tok@b:4222").expect("valid");
        assert_eq!(credentials, Some(Credentials::Token("tok".into())));
        assert_eq!(hosts("nats://127.0.0.1:4222"), ["nats://127.0.0.1:4222"]);
    }

    #[test]
    fn errors_never_show_the_password() {
        for url in [
            "nats://alice:s3cr3t@a:4222,nats://bob:s3cr3t@b:4222",
            "nats://alice:s3cr3t@a:99999",
            "ftp://alice:s3cr3t@a:4222",
            " , ",
        ] {
            let e = format!("{:#}", parse_servers(url).expect_err(url));
            assert!(e.contains("invalid NATS_URL"), "{e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
    }
}
