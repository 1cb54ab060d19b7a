//! HTTP load generators: closed loop (N clients, each sends its next request when the previous
//! answered) for throughput, open loop (requests start on a fixed schedule, whatever the
//! answers) for latency.

use anyhow::Context;
use common::TicketId;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn body() -> serde_json::Value {
    serde_json::json!({"title": "concert", "price": "20.00"})
}

fn client(connections: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// What a closed-loop run measured over its window (warm-up excluded).
#[derive(Debug, Clone)]
pub struct Throughput {
    pub created: u64,
    pub errors: u64,
    pub secs: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU used over the measurement window.
    pub cpu: Option<CpuUse>,
}

impl Throughput {
    pub fn rps(&self) -> f64 {
        self.created as f64 / self.secs
    }

    /// CPU time per created ticket (this process and the NATS server), in microseconds.
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        let cpu = self.cpu.as_ref()?;
        Some((cpu.ours + cpu.nats) / self.created.max(1) as f64 * 1e6)
    }
}

/// CPU time over a measurement window: this process (service and load generator), the NATS
/// server, and the machine's busy and stolen shares.
#[derive(Debug, Clone)]
pub struct CpuUse {
    pub ours: f64,
    pub nats: f64,
    pub busy: f64,
    pub steal: f64,
    /// The window's edges on the wall clock (UNIX seconds), to match it with the samples of
    /// `perf record -k realtime` (benches/profile.py).
    pub wall: (f64, f64),
}

impl CpuUse {
    /// nats-server's share of all the CPU spent in the window (this process and nats-server).
    pub fn nats_share(&self) -> f64 {
        self.nats / (self.ours + self.nats)
    }
}

struct CpuSample {
    ours: f64,
    nats: f64,
    machine: (u64, u64, u64),
    wall: f64,
}

impl CpuSample {
    fn take(nats_pid: Option<u32>) -> Option<Self> {
        let nats = match nats_pid {
            Some(pid) => super::env::cpu_secs(&pid.to_string())?,
            None => 0.0,
        };
        Some(Self {
            ours: super::env::cpu_secs("self")?,
            nats,
            machine: super::env::machine_ticks()?,
            wall: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs_f64(),
        })
    }

    fn until(&self, later: &Self) -> CpuUse {
        let all = later.machine.0.saturating_sub(self.machine.0).max(1) as f64;
        let idle = later.machine.1.saturating_sub(self.machine.1) as f64;
        let steal = later.machine.2.saturating_sub(self.machine.2) as f64;
        CpuUse {
            ours: later.ours - self.ours,
            nats: later.nats - self.nats,
            busy: 1.0 - idle / all,
            steal: steal / all,
            wall: (self.wall, later.wall),
        }
    }
}

/// `clients` concurrent clients creating tickets for `warmup + measure`; counts the 201s that
/// completed inside the measurement window.
pub async fn closed_loop(
    addr: SocketAddr,
    token: &str,
    clients: usize,
    warmup: Duration,
    measure: Duration,
    nats_pid: Option<u32>,
) -> anyhow::Result<Throughput> {
    let http = client(clients)?;
    let url = format!("http://{addr}/api/tickets");
    let from = Instant::now() + warmup;
    let until = from + measure;
    // CPU times at the edges of the measurement window.
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let start = CpuSample::take(nats_pid);
        tokio::time::sleep_until(until.into()).await;
        let end = CpuSample::take(nats_pid);
        Some(start?.until(&end?))
    });
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (http, url, token) = (http.clone(), url.clone(), token.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            loop {
                let started = Instant::now();
                if started >= until {
                    break;
                }
                let resp = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body())
                    .send()
                    .await;
                let ok = match resp {
                    Ok(r) => {
                        let status = r.status();
                        // Read the body: the answer is complete only then.
                        let _ = r.bytes().await;
                        status == reqwest::StatusCode::CREATED
                    }
                    Err(_) => false,
                };
                let done = Instant::now();
                if done >= from && done < until {
                    if ok {
                        latencies.push(done - started);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.context("client task")?;
        all.extend(l);
        errors += e;
    }
    let mut ms: Vec<f64> = all.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    Ok(Throughput {
        created: all.len() as u64,
        errors,
        secs: measure.as_secs_f64(),
        p50_ms: percentile(&mut ms, 50.0),
        p99_ms: percentile(&mut ms, 99.0),
        cpu: cpu.await.context("CPU sampler")?,
    })
}

/// One paced request: when it was due and answered, how long it waited for a connection, and
/// the ticket it created.
#[derive(Debug, Clone)]
pub struct Paced {
    pub due: Instant,
    /// How long it waited for a free connection, if all were busy when it was due.
    pub waited_for_connection: Option<Duration>,
    pub answered: Instant,
    pub ticket: Option<TicketId>,
}

/// Connections of the open-loop generator: opened before the schedule starts and never more.
/// Without the bound, every short stall of a 2-core machine made the generator open hundreds of
/// new connections (one per request beyond the idle ones) and close them again, and that churn,
/// paid by the service and the generator on the same two cores, stretched the stall it answered.
pub const OPEN_LOOP_CONNECTIONS: usize = 256;

/// Open loop: request `i` is due at `start + i / rate`, each on its own task, over at most
/// [`OPEN_LOOP_CONNECTIONS`] keep-alive connections (a request due while all are busy waits for
/// one, and that wait counts in its latency: latencies run from `due`).
pub async fn open_loop(
    addr: SocketAddr,
    token: &str,
    rate: f64,
    count: usize,
) -> anyhow::Result<Vec<Paced>> {
    let http = client(OPEN_LOOP_CONNECTIONS)?;
    warm_pool(&http, addr, OPEN_LOOP_CONNECTIONS).await?;
    let slots = Arc::new(tokio::sync::Semaphore::new(OPEN_LOOP_CONNECTIONS));
    let url = Arc::new(format!("http://{addr}/api/tickets"));
    let token: Arc<str> = Arc::from(token);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (http, url, token, slots) = (http.clone(), url.clone(), token.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            let (_slot, waited_for_connection) = match slots.clone().try_acquire_owned() {
                Ok(slot) => (Ok(slot), None),
                Err(_) => {
                    let t = Instant::now();
                    (slots.acquire_owned().await, Some(t.elapsed()))
                }
            };
            let resp = http
                .post(url.as_str())
                .bearer_auth(&*token)
                .json(&body())
                .send()
                .await;
            let ticket = match resp {
                Ok(r) if r.status() == reqwest::StatusCode::CREATED => r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["id"].as_str().and_then(TicketId::parse)),
                _ => None,
            };
            Paced {
                due,
                waited_for_connection,
                answered: Instant::now(),
                ticket,
            }
        }));
    }
    let mut out = Vec::with_capacity(count);
    for t in tasks {
        out.push(t.await.context("paced request task")?);
    }
    Ok(out)
}

/// Opens `connections` keep-alive connections (as many requests at once), so the schedule does
/// not start with a burst of connects.
async fn warm_pool(
    http: &reqwest::Client,
    addr: SocketAddr,
    connections: usize,
) -> anyhow::Result<()> {
    let url = format!("http://{addr}/api/tickets?limit=1");
    let requests = (0..connections).map(|_| async {
        let resp = http.get(&url).send().await?.error_for_status()?;
        resp.bytes().await
    });
    for r in futures::future::join_all(requests).await {
        r.context("warming the connection pool")?;
    }
    Ok(())
}

/// Nearest-rank percentile; sorts `v`. NaN when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    percentile(&mut v, 50.0)
}
