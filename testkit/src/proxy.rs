//! A TCP proxy of the tests' own between a NATS client and a nats-server, for faults a stopped
//! server cannot make: it forwards everything the client sends (publishes reach the stream) and,
//! while told to, swallows the messages the server delivers to reply inboxes (the PubAcks), so
//! the client's publish outcome is unknown although the stream stored the message; and it drops
//! every connection it carries on demand.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct AckSwallowingProxy {
    addr: SocketAddr,
    swallow: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
    /// Bumped to drop every connection open now.
    generation: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl AckSwallowingProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let swallow = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicU64::new(0));
        let (generation, _) = watch::channel(0);
        let accept = {
            let (swallow, swallowed, generation) =
                (swallow.clone(), swallowed.clone(), generation.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (swallow, swallowed) = (swallow.clone(), swallowed.clone());
                    let dropped = generation.subscribe();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(upstream).await {
                            carry(client, server, swallow, swallowed, dropped).await;
                        }
                    });
                }
            })
        };
        Ok(Self {
            addr,
            swallow,
            swallowed,
            generation,
            accept,
        })
    }

    /// `nats://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// While on, messages the server sends to `_INBOX.` subjects (PubAcks, API answers) are
    /// dropped instead of forwarded.
    pub fn swallow_acks(&self, on: bool) {
        self.swallow.store(on, Ordering::SeqCst);
    }

    /// How many inbox messages were swallowed so far.
    pub fn swallowed(&self) -> u64 {
        self.swallowed.load(Ordering::SeqCst)
    }

    /// Closes every connection open now (new ones are carried as before).
    pub fn drop_connections(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for AckSwallowingProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
    }
}

async fn carry(
    client: TcpStream,
    server: TcpStream,
    swallow: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
    mut dropped: watch::Receiver<u64>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = tokio::io::copy(&mut client_read, &mut server_write);
    let downstream = async {
        let mut from_server = BufReader::new(&mut server_read);
        let mut line = Vec::new();
        loop {
            line.clear();
            if from_server.read_until(b'\n', &mut line).await? == 0 {
                return Ok::<_, std::io::Error>(());
            }
            // `MSG <subject> <sid> [reply] <bytes>` and `HMSG <subject> <sid> [reply] <header
            // bytes> <total bytes>`: the payload (and its CRLF) follows the line.
            let text = String::from_utf8_lossy(&line);
            let words: Vec<&str> = text.split_whitespace().collect();
            let payload = match words.first() {
                Some(&"MSG") | Some(&"HMSG") => {
                    let total: usize = words.last().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let mut payload = vec![0; total + 2];
                    from_server.read_exact(&mut payload).await?;
                    Some(payload)
                }
                _ => None,
            };
            let to_inbox = words.get(1).is_some_and(|s| s.starts_with("_INBOX."));
            if payload.is_some() && to_inbox && swallow.load(Ordering::SeqCst) {
                swallowed.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            client_write.write_all(&line).await?;
            if let Some(payload) = payload {
                client_write.write_all(&payload).await?;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
        _ = dropped.changed() => {}
    }
}
