//! The servers and the service under test: the variants of scenario 1, the publisher the drain
//! and 1d use, and waits with deadlines.

use super::*;
use common::store::{OutboxAdmin, Tickets};
use stores::TicketsOnly;
use ticketing::startup::Stores;

pub(crate) fn delivery_settings(url: &str, client: &str) -> DeliverySettings {
    DeliverySettings {
        nats: NatsSettings {
            nats_url: url.to_owned(),
            nats_cluster_id: STREAM.to_owned(),
            nats_client_id: Some(client.to_owned()),
            nats_duplicate_window_secs: 120,
            nats_ack_timeout_secs: 5,
            nats_stream_max_age_secs: worker::stream::DEFAULT_MAX_AGE.as_secs(),
            nats_stream_max_bytes: None,
            nats_stream_replicas: 1,
            auth: Default::default(),
        },
        alert_webhook_url: None,
        alert_digest_secs: 60,
        alert_threshold: 5,
        sweep_batch_size: BATCH as u64,
        orders: Default::default(),
    }
}

/// A JetStream context configured as the product's publisher is.
pub(crate) async fn jetstream(url: &str) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to NATS")?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(5_000)
        .build(client))
}

/// Deletes the stream (its messages and its duplicate-detection state) and creates it again as
/// the product does, so each phase starts from an empty stream.
pub(crate) async fn reset_stream(url: &str) -> anyhow::Result<jetstream::Context> {
    reset_stream_with(url, 1).await
}

/// [`reset_stream`] with `replicas` copies of the stream (on a cluster).
pub(crate) async fn reset_stream_with(
    url: &str,
    replicas: usize,
) -> anyhow::Result<jetstream::Context> {
    let js = jetstream(url).await?;
    // Absent on first use: not an error.
    let _ = js.delete_stream(STREAM).await;
    let policy = worker::StreamPolicy {
        replicas,
        ..Default::default()
    };
    js.create_stream(policy.apply(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["ticket.>".to_owned()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }))
    .await
    .context("creating the JetStream stream")?;
    Ok(js)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Variant {
    StoreOnly,
    Outbox,
    Naive,
    Floor,
}

impl Variant {
    pub(crate) fn letter(self) -> char {
        match self {
            Variant::StoreOnly => 'a',
            Variant::Outbox => 'b',
            Variant::Naive => 'c',
            Variant::Floor => 'd',
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Variant::StoreOnly => "1a store only (tickets without events)",
            Variant::Outbox => "1b outbox + change feed (`ticketing all`)",
            Variant::Naive => "1c save, then publish + await PubAck",
            Variant::Floor => "1d save, then hand to a publisher (no outbox)",
        }
    }
}

pub(crate) struct Service {
    pub(crate) addr: SocketAddr,
    pub(crate) store: SqliteStore,
    pub(crate) shutdown: CancellationToken,
    pub(crate) task: JoinHandle<anyhow::Result<()>>,
    /// 1d: the counts of events handed over, and the publisher that takes them.
    pub(crate) handed: Option<(Arc<Handed>, JoinHandle<()>)>,
    _dir: tempfile::TempDir,
}

impl Service {
    pub(crate) async fn start(
        variant: Variant,
        url: &str,
        clock: Option<CommitTimes>,
    ) -> anyhow::Result<Self> {
        Self::start_with(variant, url, clock, 1).await
    }

    /// [`Self::start`] publishing to a stream of `replicas` copies (1b on a cluster).
    pub(crate) async fn start_with(
        variant: Variant,
        url: &str,
        clock: Option<CommitTimes>,
        replicas: u64,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store =
            SqliteStore::open(dir.path().join("tickets.db"), SqliteOptions::default()).await?;
        let shutdown = CancellationToken::new();
        let mut handed = None;
        // 1b writes tickets with their events; the others without (the baseline, and the
        // designs that publish without an outbox).
        let base: Arc<dyn Tickets> = if variant == Variant::Outbox {
            Arc::new(store.clone())
        } else {
            Arc::new(TicketsOnly(store.clone()))
        };
        let tickets: Arc<dyn Tickets> = match (variant, clock) {
            (Variant::Naive, _) => Arc::new(Decorated::new(
                base,
                AfterWrite::Publish(Box::new(jetstream(url).await?)),
            )),
            (Variant::Floor, _) => {
                let (tx, rx) = mpsc::channel(SqliteOptions::default().handover_capacity);
                let counts = Arc::new(Handed::default());
                let publisher = ready_publisher(url, "bench-floor").await?;
                let task = tokio::spawn(publish_handed(publisher, rx, counts.clone()));
                handed = Some((counts.clone(), task));
                Arc::new(Decorated::new(base, AfterWrite::Hand(tx, counts)))
            }
            (_, Some(times)) => Arc::new(Decorated::new(base, AfterWrite::Clock(times))),
            _ => base,
        };
        let (addr, task) = if variant == Variant::Outbox {
            // What `ticketing all` runs: the API, the change feed, the in-process sweep schedule.
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let schedule = cron::Schedule::from_str("*/10 * * * * *")?;
            let mut settings = delivery_settings(url, "bench-all");
            settings.nats.nats_stream_replicas = replicas;
            let token = shutdown.clone();
            let stores = Stores {
                tickets,
                ..Stores::of(Arc::new(store.clone()))
            };
            let task = tokio::spawn(async move {
                run_all(addr, JWT_KEY, stores, &settings, schedule, LEASE, token).await
            });
            wait_listening(addr, || task.is_finished()).await?;
            (addr, task)
        } else {
            // What `ticketing api` serves (its probes, the metrics recorder), on a free port.
            let probes = Arc::new(Probes {
                role: "api",
                store: Some(Arc::new(store.clone())),
                outbox: Some(Arc::new(store.clone())),
                nats: None,
                nats_required: false,
                orders: None,
                redis: None,
                jobs: None,
                alert_threshold: i64::MAX,
            });
            let app = Application::build((Ipv4Addr::LOCALHOST, 0).into(), tickets, JWT_KEY, probes)
                .await?;
            let addr = app.local_addr()?;
            (addr, tokio::spawn(app.run_until_stopped(shutdown.clone())))
        };
        Ok(Self {
            addr,
            store,
            shutdown,
            task,
            handed,
            _dir: dir,
        })
    }

    /// 1d: polls until JetStream answered every event handed over; returns how long that took.
    pub(crate) async fn wait_handed_answered(&self, within: Duration) -> anyhow::Result<Duration> {
        let Some((counts, _)) = &self.handed else {
            return Ok(Duration::ZERO);
        };
        wait_none_left(
            within,
            "the handed-over events were not all answered",
            || async { Ok(counts.unanswered()) },
        )
        .await
    }

    pub(crate) async fn outbox_depth(&self) -> anyhow::Result<u64> {
        Ok(self.store.outbox_stats(5).await?.depth)
    }

    /// Polls until the outbox is empty; returns how long that took.
    pub(crate) async fn wait_outbox_empty(&self, within: Duration) -> anyhow::Result<Duration> {
        wait_none_left(within, "the outbox did not drain", || self.outbox_depth()).await
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the service did not stop within 30 s")?
            .context("service task")??;
        if let Some((counts, publisher)) = self.handed {
            // The service dropped its store, and with it the sender: the publisher ends.
            tokio::time::timeout(Duration::from_secs(30), publisher)
                .await
                .context("1d's publisher did not stop within 30 s")?
                .context("1d's publisher task")?;
            let failed = counts.failed.load(Ordering::Acquire);
            ensure!(failed == 0, "1d: {failed} publishes failed");
        }
        Ok(())
    }
}

/// Polls `left` every 10 ms until it reports 0; returns how long that took, or `what` if not
/// within `within`.
pub(crate) async fn wait_none_left<F, Fut>(
    within: Duration,
    what: &str,
    mut left: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let t = Instant::now();
    while left().await? > 0 {
        ensure!(t.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(t.elapsed())
}

/// 1d's publisher: takes what the store decorator hands over, as the local change feed takes
/// its events (up to `FEED_CHUNK` at a time, published pipelined with the product's publisher).
pub(crate) async fn publish_handed(
    publisher: JetStreamPublisher,
    mut events: mpsc::Receiver<common::OutboxEvent>,
    counts: Arc<Handed>,
) {
    let mut batch = Vec::with_capacity(FEED_CHUNK);
    while events.recv_many(&mut batch, FEED_CHUNK).await > 0 {
        let results = publisher.publish_batch(&batch).await;
        let acked = results.iter().filter(|r| r.is_ok()).count() as u64;
        counts.acked.fetch_add(acked, Ordering::AcqRel);
        counts
            .failed
            .fetch_add(results.len() as u64 - acked, Ordering::AcqRel);
        batch.clear();
    }
}

pub(crate) async fn wait_listening(
    addr: SocketAddr,
    mut exited: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        ensure!(!exited(), "the service exited during start-up");
        ensure!(
            Instant::now() < deadline,
            "nothing listens on {addr} after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The product's publisher, connected, with its stream ready (the drain's and 1d's).
pub(crate) async fn ready_publisher(url: &str, name: &str) -> anyhow::Result<JetStreamPublisher> {
    ready_publisher_with(url, name, 1).await
}

/// [`ready_publisher`] for a stream of `replicas` copies.
pub(crate) async fn ready_publisher_with(
    url: &str,
    name: &str,
    replicas: usize,
) -> anyhow::Result<JetStreamPublisher> {
    let publisher = JetStreamPublisher::connect(NatsConfig {
        url: url.to_owned(),
        auth: Default::default(),
        stream: STREAM.to_owned(),
        client_name: name.to_owned(),
        duplicate_window: Duration::from_secs(120),
        ack_timeout: Duration::from_secs(5),
        policy: worker::StreamPolicy {
            replicas,
            ..Default::default()
        },
    })
    .await?;
    ensure!(
        publisher.wait_connected(Duration::from_secs(10)).await,
        "publisher did not connect"
    );
    publisher
        .ensure_stream()
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(publisher)
}

/// The product's dispatcher over `store`, as `ticketing all` configures it, with its publisher
/// ready for a stream of `replicas` copies (the drain's and the reconciliation's sweeps).
pub(crate) async fn bench_dispatcher(
    store: &SqliteStore,
    url: &str,
    name: &str,
    replicas: usize,
) -> anyhow::Result<Dispatcher> {
    let publisher = Arc::new(ready_publisher_with(url, name, replicas).await?);
    Ok(Dispatcher::new(
        Arc::new(store.clone()),
        publisher,
        DispatchConfig {
            claimer: name.to_owned(),
            lease: LEASE,
            alert_threshold: 5,
            sweep_batch: BATCH,
            duplicate_window: Duration::from_secs(120),
        },
    ))
}
