//! Real servers for tests and benchmarks: a `nats-server -js`, a three-node JetStream cluster and
//! a `redis-server` of their own, on free loopback ports, in temp dirs, that can be stopped (a
//! SIGKILL), paused and restarted (fault injection). Binaries come from `NATS_SERVER_BIN` / `REDIS_SERVER_BIN`, else `PATH`, else
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

/// Three (or more) `nats-server -js` clustered on loopback: each with its server name (`n1`,
/// `n2`, ...), client port, route port, monitoring port and JetStream store directory, routes to
/// every other. A node can be killed with SIGKILL and restarted on the same ports with its store.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    _dir: tempfile::TempDir,
}

struct ClusterNode {
    name: String,
    server: Server,
    monitor_port: u16,
}

impl NatsCluster {
    /// Starts `size` clustered servers. JetStream answers once they have elected a meta leader
    /// (about a second): wait for what the test needs.
    pub fn start(size: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let binary = find_binary("NATS_SERVER_BIN", "nats-server")?;
        let ports = (0..size)
            .map(|_| Ok((free_port()?, free_port()?, free_port()?)))
            .collect::<anyhow::Result<Vec<(u16, u16, u16)>>>()?;
        let mut nodes = Vec::with_capacity(size);
        for (i, &(port, route_port, monitor_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, route, _))| format!("nats://127.0.0.1:{route}"))
                .collect();
            let args = [
                "-n",
                &name,
                "-js",
                "-sd",
                &dir.path().join(&name).display().to_string(),
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor_port.to_string(),
                "--cluster_name",
                "testkit",
                "--cluster",
                &format!("nats://127.0.0.1:{route_port}"),
                "--routes",
                &routes.join(","),
            ]
            .map(str::to_owned)
            .to_vec();
            nodes.push(ClusterNode {
                server: Server {
                    name: "nats-server (cluster node)",
                    binary: binary.clone(),
                    args,
                    port,
                    child: None,
                    log: dir.path().join(format!("{name}.log")),
                },
                name,
                monitor_port,
            });
        }
        for node in &mut nodes {
            node.server.spawn()?;
        }
        Ok(Self { nodes, _dir: dir })
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Every node's client URL, comma-separated (as `NATS_URL` takes them).
    pub fn urls(&self) -> String {
        (0..self.size())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[node].server.port)
    }

    /// The node's server name (`-n`), as JetStream names leaders and peers.
    pub fn name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    /// The node of a server name.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node].server.child.is_some()
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.size()).filter(|&i| self.is_running(i)).collect()
    }

    /// SIGKILL: the server dies at once, its store left as it was.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].server.stop();
    }

    /// Starts a killed node again on the same ports with the same store directory.
    pub fn restart(&mut self, node: usize) -> anyhow::Result<()> {
        self.nodes[node].server.stop();
        self.nodes[node].server.spawn()
    }

    pub fn log_path(&self, node: usize) -> &Path {
        &self.nodes[node].server.log
    }

    /// `GET path` of the node's monitoring endpoint, as JSON (`/jsz?streams=true`, `/connz`).
    pub fn monitor(&self, node: usize, path: &str) -> anyhow::Result<serde_json::Value> {
        http_get_json(self.nodes[node].monitor_port, path)
    }

    /// The stream as the node holds it (`/jsz?streams=true`): `None` when the node is down or
    /// holds no copy of it.
    pub fn stream_on(&self, node: usize, stream: &str) -> Option<serde_json::Value> {
        if !self.is_running(node) {
            return None;
        }
        let jsz = self.monitor(node, "/jsz?streams=true&config=true").ok()?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .filter_map(|a| a["stream_detail"].as_array())
            .flatten()
            .find(|s| s["name"] == stream)
            .cloned()
    }

    /// The messages the node's copy of the stream holds.
    pub fn stream_messages_on(&self, node: usize, stream: &str) -> Option<u64> {
        self.stream_on(node, stream)?["state"]["messages"].as_u64()
    }

    /// The running node leading the stream, as the running nodes holding a copy report it: named
    /// by all of them, by at least two if it has several replicas (a restarted node may name
    /// itself for a moment; nodes that lost the leader keep naming it until they elect another).
    /// A stream of one replica: the node holding it.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        let copies: Vec<serde_json::Value> = self
            .running()
            .into_iter()
            .filter_map(|i| self.stream_on(i, stream))
            .collect();
        let replicas = copies.first()?["config"]["num_replicas"]
            .as_u64()
            .unwrap_or(1);
        let named: Vec<&str> = copies
            .iter()
            .filter_map(|s| s["cluster"]["leader"].as_str())
            .collect();
        let first = *named.first()?;
        let leader = self.node_named(first)?;
        let quorum = if replicas > 1 { 2 } else { 1 };
        (named.len() >= quorum && named.iter().all(|n| *n == first) && self.is_running(leader))
            .then_some(leader)
    }

    /// Whether every copy of the stream is current with its leader, as the leader reports it
    /// (a restarted node that has caught up).
    pub fn stream_current(&self, stream: &str) -> bool {
        let Some(leader) = self.stream_leader(stream) else {
            return false;
        };
        let Some(copy) = self.stream_on(leader, stream) else {
            return false;
        };
        let replicas = copy["config"]["num_replicas"].as_u64().unwrap_or(1) as usize;
        let followers = copy["cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        followers.len() + 1 == replicas && followers.iter().all(|r| r["current"] == true)
    }

    /// The node a client connection named `name` is connected to (`/connz`).
    pub fn connected_node(&self, name: &str) -> Option<usize> {
        self.running().into_iter().find(|&i| {
            self.monitor(i, "/connz").ok().is_some_and(|c| {
                c["connections"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["name"] == name))
            })
        })
    }
}

/// A plain HTTP/1.0 GET on loopback, read to the end, its body parsed as JSON.
fn http_get_json(port: u16, path: &str) -> anyhow::Result<serde_json::Value> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header end")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.split(' ').nth(1) == Some("200"),
        "GET {path}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(serde_json::from_str(body)?)
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
