//! Outages of any length, end to end. Exactly once: a `ticketing all` process publishes through a
//! TCP proxy of the test's own that lets publishes reach a real nats-server but swallows their
//! PubAcks, so the outcome of those attempts is unknown while the stream stored them; then NATS
//! goes away, for longer than JetStream's duplicate window or not, and comes back. Alerts: an
//! outage with thousands of events past the threshold is told in a few digests.

mod support;

use std::net::SocketAddr;
use support::delivery::{
    LONG, Role, Setup, StoredMessage, Webhook, assert_once_each, messages_when, spawn_role,
};
use support::eventually;
use testkit::{AckSwallowingProxy, NatsServer, free_port};

/// The loopback address a `nats://127.0.0.1:PORT` URL names.
fn address(url: &str) -> SocketAddr {
    url.trim_start_matches("nats://").parse().expect("address")
}

/// Sum of a Prometheus counter over the series whose labels contain `needle`.
async fn counter(client: &reqwest::Client, port: u16, name: &str, needle: &str) -> f64 {
    let page = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Events whose attempts so far include one of unknown outcome (`unknown_since` is set).
fn unknown_events(setup: &Setup) -> i64 {
    setup
        .db()
        .query_row(
            "SELECT COUNT(*) FROM events WHERE unknown_since IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap_or(-1)
}

/// Seconds since the latest `unknown_since` of the outbox (how long ago the last event that may
/// be in the stream was sent).
fn seconds_since_last_unknown(setup: &Setup) -> f64 {
    setup
        .db()
        .query_row(
            "SELECT (julianday('now') - julianday(MAX(unknown_since))) * 86400.0 FROM events",
            [],
            |r| r.get::<_, Option<f64>>(0),
        )
        .ok()
        .flatten()
        .unwrap_or(0.0)
}

/// A `ticketing all` process whose last `burst` events reached the stream with their PubAcks
/// lost: each failed with an unknown outcome.
struct LostAcks {
    nats: NatsServer,
    proxy: AckSwallowingProxy,
    setup: Setup,
    all: Role,
    port: u16,
    burst: usize,
}

impl LostAcks {
    /// `ticketing all` through the proxy, with a stream whose duplicate window is `window`
    /// seconds. Creates one ticket that is delivered (the stream exists), then `burst` tickets
    /// whose PubAcks the proxy swallows, and waits until each of those failed with an unknown
    /// outcome and the stream holds it.
    async fn start(window: u64, burst: usize) -> Self {
        let nats = NatsServer::start().expect("nats");
        let proxy = AckSwallowingProxy::start(address(&nats.url()))
            .await
            .expect("proxy");
        let setup = Setup::new();
        let port = free_port().expect("port");
        let env = setup.env(
            &nats,
            &[
                ("PORT", port.to_string()),
                ("NATS_URL", proxy.url()),
                ("NATS_DUPLICATE_WINDOW_SECS", window.to_string()),
                ("OUTBOX_LOCK_SECS", "1".to_owned()),
                ("NATS_ACK_TIMEOUT_SECS", "1".to_owned()),
                ("ALERT_THRESHOLD", "1000".to_owned()),
            ],
        );
        let all = spawn_role("all", &env, setup.log("all"));
        setup.wait_api(port).await;
        setup.create(port, "before").await;
        messages_when(&nats, 1).await;

        proxy.swallow_acks(true);
        for i in 0..burst {
            setup.create(port, &format!("acks lost {i}")).await;
        }
        eventually(LONG, "every attempt's outcome unknown", || async {
            (unknown_events(&setup) == burst as i64).then_some(())
        })
        .await;
        assert!(proxy.swallowed() >= burst as u64);
        messages_when(&nats, 1 + burst).await;
        Self {
            nats,
            proxy,
            setup,
            all,
            port,
            burst,
        }
    }

    /// NATS goes away: the server stops, the proxy forwards acks again and drops the
    /// connections it carried.
    fn nats_away(&mut self) {
        self.nats.stop();
        self.proxy.swallow_acks(false);
        self.proxy.drop_connections();
    }

    /// NATS is back; once the outbox is empty, the stream holds every event exactly once.
    async fn back_and_drained_once_each(&mut self) {
        self.nats.restart().expect("restart");
        eventually(LONG, "the outbox to drain", || async {
            (self.setup.events() == 0).then_some(())
        })
        .await;
        let messages: Vec<StoredMessage> = messages_when(&self.nats, 1 + self.burst).await;
        assert_once_each(&messages, 1 + self.burst);
    }

    async fn counter(&self, name: &str, needle: &str) -> f64 {
        counter(&self.setup.client, self.port, name, needle).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stored_before_an_outage_longer_than_the_window_are_found_not_stored_again() {
    let mut lost = LostAcks::start(3, 5).await;
    // NATS goes away for longer than the 3 s duplicate window: a re-publish now would be
    // stored a second time.
    lost.nats_away();
    eventually(
        LONG,
        "the duplicate window to pass while NATS is down",
        || async { (seconds_since_last_unknown(&lost.setup) > 4.0).then_some(()) },
    )
    .await;
    lost.back_and_drained_once_each().await;
    let found = lost
        .counter("outbox_reconciled_total", "already_stored")
        .await;
    assert_eq!(found, 5.0, "each found in the stream by the read");
    let logged = lost
        .all
        .logged("looked up events an unknown attempt may have stored");
    assert!(!logged.is_empty(), "the reconciliation is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_the_window_the_servers_deduplication_is_enough() {
    let mut lost = LostAcks::start(60, 5).await;
    lost.nats_away();
    lost.back_and_drained_once_each().await;
    let dropped = lost.counter("outbox_publish_duplicates_total", "").await;
    assert!(
        dropped >= 5.0,
        "JetStream dropped the re-publishes: {dropped}"
    );
    let read = lost.counter("outbox_reconciled_total", "").await;
    assert_eq!(read, 0.0, "no read of the stream within the window");
}

/// Events that alerted and are still in the outbox.
fn alerted_events(setup: &Setup) -> i64 {
    setup
        .db()
        .query_row(
            "SELECT COUNT(*) FROM events WHERE alerted_at IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_told_in_a_few_digests_and_one_resolved() {
    let mut nats = NatsServer::start().expect("nats");
    let webhook = Webhook::start().await;
    webhook.set_down(true);
    let setup = Setup::new();
    let port = free_port().expect("port");
    let all = spawn_role(
        "all",
        &setup.env(
            &nats,
            &[
                ("PORT", port.to_string()),
                ("ALERT_THRESHOLD", "1".to_owned()),
                ("ALERT_WEBHOOK_URL", webhook.url()),
                ("ALERT_DIGEST_SECS", "2".to_owned()),
            ],
        ),
        setup.log("all"),
    );
    setup.wait_api(port).await;
    nats.stop();

    // 2,000 tickets during the outage, from 8 clients: each event fails and passes the
    // threshold (1), while the webhook is down too.
    let total = 2_000;
    let clients = (0..8).map(|c| {
        let setup = &setup;
        async move {
            for i in 0..total / 8 {
                setup.create(port, &format!("outage {c}-{i}")).await;
            }
        }
    });
    futures::future::join_all(clients).await;
    eventually(LONG, "every event past the threshold", || async {
        (alerted_events(&setup) == total).then_some(())
    })
    .await;
    eventually(LONG, "a digest refused by the webhook", || async {
        (webhook.refused() > 0).then_some(())
    })
    .await;
    assert!(webhook.bodies().is_empty());

    // The webhook answers again: what waited goes out merged, not one digest per period missed.
    webhook.set_down(false);
    eventually(LONG, "digests telling of the 2,000 events", || async {
        (webhook.events_told("firing") >= total as u64).then_some(())
    })
    .await;
    let firing = webhook.digests("firing");
    assert_eq!(
        webhook.events_told("firing"),
        total as u64,
        "each event once"
    );
    assert!(firing.len() <= 3, "a handful of digests: {}", firing.len());
    let told_tickets: u64 = firing.iter().filter_map(|d| d["tickets"].as_u64()).sum();
    assert_eq!(told_tickets, total as u64, "one event per ticket here");
    assert!(
        firing[0]["errors"][0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("NATS is not connected")),
        "{}",
        firing[0]
    );

    nats.restart().expect("restart");
    eventually(LONG, "the outbox to drain", || async {
        (setup.events() == 0).then_some(())
    })
    .await;
    let resolved = eventually(LONG, "the resolved digest", || async {
        let r = webhook.digests("resolved");
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(resolved.len(), 1, "one resolved digest for the episode");
    assert_eq!(resolved[0]["events"], total);
    assert!(
        resolved[0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("RESOLVED: all 2000 outbox events")),
        "{}",
        resolved[0]
    );
    assert!(!all.logged("alert digest sent to the webhook").is_empty());
}
