//! Real servers for tests and benchmarks: a `nats-server -js` and a `redis-server` of their own,
//! on free loopback ports, in temp dirs, that can be stopped, paused and restarted (fault
//! injection). Binaries come from `NATS_SERVER_BIN` / `REDIS_SERVER_BIN`, else `PATH`, else
//! `/usr/sbin` and `/usr/bin`.

use anyhow::Context;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

fn find_binary(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found: install it or set {env}"))
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{what} exited during start-up: {status}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("{what} did not listen on port {port} within 20 s")
}

fn signal(child: &Child, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {sig} failed");
    Ok(())
}

/// A server process we own: stopped on drop.
struct Server {
    name: &'static str,
    binary: PathBuf,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = Command::new(&self.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        wait_for_port(self.port, &mut child, self.name)?;
        self.child = Some(child);
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn child(&self) -> anyhow::Result<&Child> {
        self.child.as_ref().context("server is stopped")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `nats-server -js` on a free port with its own JetStream store directory, kept across restarts.
pub struct NatsServer {
    server: Server,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// [`Self::start`] with `extra` arguments for nats-server (`--user alice --pass ...`,
    /// `--auth TOKEN`, TLS), kept across restarts.
    pub fn start_with(extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let store = dir.path().join("jetstream");
        let mut server = Server {
            name: "nats-server",
            binary: find_binary("NATS_SERVER_BIN", "nats-server")?,
            args: vec![
                "-js".into(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-sd".into(),
                store.display().to_string(),
            ]
            .into_iter()
            .chain(extra.iter().map(|a| a.to_string()))
            .collect(),
            port,
            child: None,
            log: dir.path().join("nats.log"),
        };
        server.spawn()?;
        Ok(Self { server, _dir: dir })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.server.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.child.as_ref().map(Child::id)
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Starts again on the same port with the same JetStream store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.server.stop();
        self.server.spawn()
    }

    /// SIGSTOP: connections stay open but nothing is answered.
    pub fn pause(&self) -> anyhow::Result<()> {
        signal(self.server.child()?, "-STOP")
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        signal(self.server.child()?, "-CONT")
    }

    pub fn log_path(&self) -> &Path {
        &self.server.log
    }
}

/// `redis-server` on a free port, keeping nothing on disk.
pub struct RedisServer {
    server: Server,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut server = Server {
            name: "redis-server",
            binary: find_binary("REDIS_SERVER_BIN", "redis-server")?,
            args: vec![
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
                "--dir".into(),
                dir.path().display().to_string(),
            ],
            port,
            child: None,
            log: dir.path().join("redis.log"),
        };
        server.spawn()?;
        Ok(Self { server, _dir: dir })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.server.port)
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.server.stop();
        self.server.spawn()
    }
}
