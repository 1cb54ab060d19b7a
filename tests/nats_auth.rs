//! NATS that asks who is connecting, a real nats-server each time: the user and password, or the
//! token, in NATS_URL reach it and the events are delivered, as they are with a credentials file
//! of NATS accounts (NATS_CREDS) and with TLS and a client certificate (NATS_TLS_*). And the
//! password shows nowhere: not in the log, the failure records (`ticketing outbox list`), the
//! alerts, `/readyz`, `--help` or errors at start.

mod support;

use async_nats::ConnectOptions;
use base64::Engine;
use nkeys::KeyPair;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::delivery::{BIN, Role, Webhook, spawn_role};
use support::{eventually, session_cookie};
use testkit::{NatsServer, free_port};

/// Texts that show nowhere else, to look for.
const PASSWORD: &str = "pw-9f3c1d7e";
const TOKEN: &str = "tok-4b8e2a61";
const STREAM: &str = "ticketing";
const LONG: Duration = Duration::from_secs(30);

/// `nats.url()` with `user_info@` before the host.
fn with_user_info(nats: &NatsServer, user_info: &str) -> String {
    nats.url()
        .replacen("nats://", &format!("nats://{user_info}@"), 1)
}

/// `ticketing all` on its own SQLite file, sweeping every second, without Redis.
struct All {
    dir: tempfile::TempDir,
    port: u16,
    role: Role,
    client: reqwest::Client,
}

impl All {
    fn spawn(nats_url: &str, extra: &[(&'static str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let port = free_port().expect("port");
        let mut env = vec![
            ("SQLITE_PATH", db_path(dir.path()).display().to_string()),
            ("NATS_URL", nats_url.to_owned()),
            ("NATS_CLUSTER_ID", STREAM.to_owned()),
            ("RETRY_SCHEDULE", "* * * * * *".to_owned()),
            ("PORT", port.to_string()),
        ];
        env.extend_from_slice(extra);
        let role = spawn_role("all", &env, dir.path().join("all.log"));
        Self {
            dir,
            port,
            role,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn readyz(&self) -> Option<Value> {
        let res = self.client.get(self.url("/readyz")).send().await.ok()?;
        res.json().await.ok()
    }

    /// Waits until the API answers and the publisher is connected to NATS.
    async fn wait_nats_up(&self) {
        eventually(LONG, "/readyz to show NATS up", || async {
            let body = self.readyz().await?;
            (body["checks"]["nats"]["status"] == "up").then_some(())
        })
        .await;
    }

    async fn create(&self, title: &str) {
        let res = self
            .client
            .post(self.url("/api/tickets"))
            .header("cookie", session_cookie("seller"))
            .json(&json!({"title": title, "price": 10}))
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 201);
    }

    /// Events still in the outbox.
    fn events(&self) -> i64 {
        let db = rusqlite::Connection::open(db_path(self.dir.path())).expect("db");
        db.busy_timeout(Duration::from_secs(10)).expect("busy");
        db.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap_or(-1)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.role.log).unwrap_or_default()
    }
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("tickets.db")
}

/// Creates tickets through `all` and waits for JetStream to hold them, read back by a client
/// connected with `options`.
async fn delivered_through(all: &All, nats: &NatsServer, options: ConnectOptions) {
    all.wait_nats_up().await;
    for i in 0..3 {
        all.create(&format!("show {i}")).await;
    }
    eventually(LONG, "the outbox to empty", || async {
        (all.events() == 0).then_some(())
    })
    .await;
    let client = options.connect(nats.url()).await.expect("connect");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(STREAM)
        .await
        .expect("stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.state.messages, 3, "every event stored once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_and_password_in_nats_url_reach_the_server() {
    let nats = NatsServer::start_with(&["--user", "alice", "--pass", PASSWORD]).expect("nats");
    assert!(
        async_nats::connect(nats.url()).await.is_err(),
        "the server refuses clients without credentials"
    );
    let all = All::spawn(&with_user_info(&nats, &format!("alice:{PASSWORD}")), &[]);
    let options = ConnectOptions::with_user_and_password("alice".into(), PASSWORD.into());
    delivered_through(&all, &nats, options).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_nats_url_reaches_the_server() {
    let nats = NatsServer::start_with(&["--auth", TOKEN]).expect("nats");
    assert!(
        async_nats::connect(nats.url()).await.is_err(),
        "the server refuses clients without the token"
    );
    let all = All::spawn(&with_user_info(&nats, TOKEN), &[]);
    delivered_through(&all, &nats, ConnectOptions::with_token(TOKEN.into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_down_the_password_shows_nowhere() {
    let mut nats = NatsServer::start_with(&["--user", "alice", "--pass", PASSWORD]).expect("nats");
    let url = with_user_info(&nats, &format!("alice:{PASSWORD}"));
    let webhook = Webhook::start().await;
    // Everything at debug, async-nats' own lines included.
    let all = All::spawn(
        &url,
        &[
            ("ALERT_THRESHOLD", "1".into()),
            ("ALERT_WEBHOOK_URL", webhook.url()),
            ("RUST_LOG", "debug".into()),
        ],
    );
    all.wait_nats_up().await;
    nats.stop();
    all.create("during the outage 1").await;
    all.create("during the outage 2").await;
    let alerts = eventually(LONG, "a firing digest of both events", || async {
        (webhook.events_told("firing") >= 2).then(|| Value::from(webhook.bodies()).to_string())
    })
    .await;
    let readyz = all.readyz().await.expect("/readyz");
    assert_eq!(readyz["checks"]["nats"]["status"], "down", "{readyz}");
    let readyz = readyz.to_string();
    let list = ticketing_output(
        &["outbox", "list", "--json"],
        &[("SQLITE_PATH", db_path(all.dir.path()).display().to_string())],
    )
    .await;
    let help = ticketing_output(&["all", "--help"], &[("NATS_URL", url.clone())]).await;
    let log = all.log();

    let shown = format!(
        "alice:***@127.0.0.1:{}",
        url.rsplit(':').next().expect("port")
    );
    for (what, text) in [
        ("the log", &log),
        ("outbox list --json", &list),
        ("the alerts", &alerts),
        ("/readyz", &readyz),
        ("all --help", &help),
    ] {
        assert!(!text.contains(PASSWORD), "{what} shows the password");
    }
    for (what, text) in [
        ("the log", &log),
        ("outbox list --json", &list),
        ("the alerts", &alerts),
    ] {
        assert!(text.contains(&shown), "{what} shows no {shown}: {text}");
    }
}

#[tokio::test]
async fn errors_at_start_show_nats_url_redacted() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = ("SQLITE_PATH", db_path(dir.path()).display().to_string());
    let bad_port = format!("nats://alice:{PASSWORD}@127.0.0.1:99999");
    let stderr = ticketing_failure(&["all"], &[db.clone(), ("NATS_URL", bad_port)]).await;
    assert!(
        stderr.contains("invalid NATS_URL nats://alice:***@127.0.0.1:99999"),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "{stderr}");

    let creds = dir.path().join("broken.creds");
    std::fs::write(&creds, "not a credentials file").expect("write");
    let stderr = ticketing_failure(
        &["all"],
        &[db.clone(), ("NATS_CREDS", creds.display().to_string())],
    )
    .await;
    assert!(
        stderr.contains("cannot use the NATS_CREDS file"),
        "{stderr}"
    );

    let stderr = ticketing_failure(&["worker"], &[db, ("NATS_TLS_CERT", "c.pem".into())]).await;
    assert!(
        stderr.contains("NATS_TLS_CERT and NATS_TLS_KEY go together"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let Some(pki) = Pki::make(dir.path()) else {
        eprintln!("skipped tls_with_a_client_certificate: no openssl to make certificates");
        return;
    };
    let file = |name: &str| dir.path().join(name).display().to_string();
    let (ca, server_cert, server_key) = (file("ca.pem"), file("server.pem"), file("server.key"));
    let nats = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        &server_cert,
        "--tlskey",
        &server_key,
        "--tlsverify",
        "--tlscacert",
        &ca,
    ])
    .expect("nats");
    let all = All::spawn(
        &nats.url(),
        &[
            ("NATS_TLS_CA", pki.ca.display().to_string()),
            ("NATS_TLS_CERT", pki.client_cert.display().to_string()),
            ("NATS_TLS_KEY", pki.client_key.display().to_string()),
        ],
    );
    let options = ConnectOptions::new()
        .add_root_certificates(pki.ca.clone())
        .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
        .require_tls(true);
    delivered_through(&all, &nats, options).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentials_file_of_nats_accounts() {
    let dir = tempfile::tempdir().expect("tmp");
    let (operator, system, account, user) = (
        KeyPair::new_operator(),
        KeyPair::new_account(),
        KeyPair::new_account(),
        KeyPair::new_user(),
    );
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        json!({"type": "operator"}),
    );
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1});
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        json!({"type": "account", "limits": unlimited}),
    );
    let mut limits = unlimited.clone();
    for jetstream in ["mem_storage", "disk_storage", "streams", "consumer"] {
        limits[jetstream] = json!(-1);
    }
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        json!({"type": "account", "limits": limits}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        json!({"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    let conf = dir.path().join("nats.conf");
    let (system_key, account_key) = (system.public_key(), account.public_key());
    std::fs::write(
        &conf,
        format!(
            "operator: \"{operator_jwt}\"\nsystem_account: {system_key}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {system_key}: \"{system_jwt}\"\n  \
             {account_key}: \"{account_jwt}\"\n}}\n"
        ),
    )
    .expect("write nats.conf");
    let creds = dir.path().join("tickets.creds");
    let seed = user.seed().expect("seed");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .expect("write creds");

    let nats = NatsServer::start_with(&["-c", &conf.display().to_string()]).expect("nats");
    assert!(
        async_nats::connect(nats.url()).await.is_err(),
        "the server refuses clients without credentials"
    );
    let all = All::spawn(&nats.url(), &[("NATS_CREDS", creds.display().to_string())]);
    let options = ConnectOptions::with_credentials_file(&creds)
        .await
        .expect("creds");
    delivered_through(&all, &nats, options).await;
}

/// A NATS JWT (v2) about `subject`, signed by `issuer`.
fn jwt(issuer: &KeyPair, subject: &str, mut nats: Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    nats["version"] = json!(2);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let claims = json!({"jti": format!("{subject}-{iat}"), "iat": iat,
        "iss": issuer.public_key(), "sub": subject, "name": "test", "nats": nats});
    let signed = format!(
        "{}.{}",
        b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64(&signature))
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate (P-256), by `openssl`.
struct Pki {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn make(dir: &Path) -> Option<Self> {
        let openssl = |args: String| {
            std::process::Command::new("openssl")
                .args(args.split_whitespace())
                .current_dir(dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        if !openssl(format!(
            "req -x509 {ec} -keyout ca.key -out ca.pem -days 1 -subj /CN=test-ca"
        )) {
            return None;
        }
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).ok()?;
            let made = openssl(format!(
                "req {ec} -keyout {name}.key -out {name}.csr -subj /CN={name}"
            )) && openssl(format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
                 -out {name}.pem -extfile {name}.ext"
            ));
            if !made {
                return None;
            }
        }
        Some(Self {
            ca: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        })
    }
}

/// What `ticketing args` prints (stdout and stderr), with `env` and the test's JWT key.
async fn ticketing_output(args: &[&str], env: &[(&str, String)]) -> String {
    let out = run(args, env).await;
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The stderr of `ticketing args`, which must fail at start.
async fn ticketing_failure(args: &[&str], env: &[(&str, String)]) -> String {
    let out = run(args, env).await;
    assert!(
        !out.status.success(),
        "`ticketing {args:?}` must refuse to start"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn run(args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("MONGO_URI")
        .env("JWT_KEY", support::JWT_KEY)
        .env("PORT", "0")
        .env("HEALTH_PORT", "0")
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(LONG, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`ticketing {args:?}` still runs after {LONG:?}"))
        .expect("run ticketing")
}
