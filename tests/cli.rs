//! Black-box tests of the `ticketing` binary.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ticketing");

fn ticketing(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("JWT_KEY")
        .env_remove("MONGO_URI")
        .env("RUST_LOG", "warn");
    c
}

#[test]
fn roles_refuse_to_start_without_jwt_key() {
    for role in ["api", "all"] {
        let out = ticketing(&[role]).output().expect("run");
        assert!(!out.status.success(), "{role} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("JWT_KEY must be defined"),
            "{role}: {stderr}"
        );
    }
    let out = ticketing(&["token", "--user-id", "u", "--email", "e@x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JWT_KEY must be defined"));
}

#[test]
fn delivering_roles_refuse_a_lease_as_long_as_the_duplicate_window() {
    let dir = tempfile::tempdir().expect("tmp");
    for role in ["all", "worker"] {
        let mut role_cmd = ticketing(&[role]);
        role_cmd
            .env("JWT_KEY", "k")
            .env("SQLITE_PATH", dir.path().join("t.db"))
            .env("OUTBOX_LOCK_SECS", "120")
            .env("NATS_DUPLICATE_WINDOW_SECS", "120")
            .env("HEALTH_PORT", "0")
            .env("PORT", "0");
        let out = exited_within(&mut role_cmd, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("`ticketing {role}` started instead of refusing"));
        assert!(!out.status.success(), "{role} must refuse to start");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "OUTBOX_LOCK_SECS (120) must be shorter than NATS_DUPLICATE_WINDOW_SECS (120)"
            ),
            "{role}: {stderr}"
        );
    }
}

#[test]
fn an_unreachable_mongo_uri_fails_clearly_and_in_bounded_time() {
    let mut api = ticketing(&["api"]);
    api.env("JWT_KEY", "k").env(
        "MONGO_URI",
        "mongodb://127.0.0.1:1/tickets?serverSelectionTimeoutMS=500",
    );
    let out = exited_within(&mut api, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("`ticketing api` with an unreachable MONGO_URI still runs"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MONGO_URI"), "{stderr}");
}

/// Runs `cmd` (no stdin, stderr captured); its output once it has exited, or `None` (and the
/// process killed) if it still runs after `limit`.
fn exited_within(cmd: &mut Command, limit: Duration) -> Option<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().expect("output"))
}

#[test]
fn help_describes_every_setting() {
    let out = ticketing(&["api", "--help"]).output().expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "PORT",
        "JWT_KEY",
        "SQLITE_PATH",
        "MONGO_URI",
        "OUTBOX_LOCK_SECS",
        "MONGO_WRITE_TIMEOUT_SECS",
    ] {
        assert!(
            help.contains(&format!("[env: {var}")),
            "{var} missing from:\n{help}"
        );
    }
}

#[tokio::test]
async fn token_output_signs_in_to_a_running_all() {
    let out = ticketing(&["token", "--user-id", "user-42", "--email", "a@b.c"])
        .env("JWT_KEY", "cli-key")
        .output()
        .expect("run");
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let mut lines = stdout.lines();
    let jwt = lines.next().expect("jwt line").to_owned();
    let cookie = lines
        .next()
        .and_then(|l| l.strip_prefix("Cookie: "))
        .expect("cookie line")
        .to_owned();
    assert_eq!(jwt.split('.').count(), 3);

    let dir = tempfile::tempdir().expect("tmp");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut child = ticketing(&["all"])
        .env("JWT_KEY", "cli-key")
        .env("PORT", port.to_string())
        .env("SQLITE_PATH", dir.path().join("a/b/tickets.db"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/api/tickets");
    let created = support::eventually(Duration::from_secs(20), "the API to answer", || {
        let (client, url, cookie) = (&client, &url, &cookie);
        async move {
            client
                .post(url)
                .header("cookie", cookie)
                .json(&serde_json::json!({"title": "t", "price": 3}))
                .send()
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(created.status(), 201);
    let body: serde_json::Value = created.json().await.expect("json");
    assert_eq!(body["userId"], "user-42");
    let bearer = client
        .post(&url)
        .bearer_auth(&jwt)
        .json(&serde_json::json!({"title": "t", "price": 3}))
        .send()
        .await
        .expect("request");
    assert_eq!(bearer.status(), 201);
    assert!(
        dir.path().join("a/b/tickets.db").exists(),
        "parent folders created"
    );
    // SIGTERM: a clean exit.
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}
