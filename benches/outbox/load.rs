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
}

impl Throughput {
    pub fn rps(&self) -> f64 {
        self.created as f64 / self.secs
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
) -> anyhow::Result<Throughput> {
    let http = client(clients)?;
    let url = format!("http://{addr}/api/tickets");
    let from = Instant::now() + warmup;
    let until = from + measure;
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
    })
}

/// One paced request: when it was due and sent, when its 201 arrived, the ticket it created.
#[derive(Debug, Clone)]
pub struct Paced {
    pub sent: Instant,
    pub answered: Instant,
    pub ticket: Option<TicketId>,
}

/// Open loop: request `i` starts at `start + i / rate`, each on its own task.
pub async fn open_loop(
    addr: SocketAddr,
    token: &str,
    rate: f64,
    count: usize,
) -> anyhow::Result<Vec<Paced>> {
    let http = client(256)?;
    let url = Arc::new(format!("http://{addr}/api/tickets"));
    let token: Arc<str> = Arc::from(token);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
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
                sent,
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
