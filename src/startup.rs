//! Building and running each role. `Application` binds its port first (port 0 in tests), so
//! callers learn the port before serving starts.

use crate::settings::StoreSettings;
use anyhow::Context;
use api::{ApiContext, JwtKey};
use common::Store;
use common::store::SqliteStore;
use common::store::sqlite::SqliteOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long in-flight requests may take to finish after a shutdown signal.
pub const HTTP_DRAIN: Duration = Duration::from_secs(10);

/// Opens the configured store: MongoDB when `MONGO_URI` is set, else the SQLite file.
pub async fn open_store(settings: &StoreSettings) -> anyhow::Result<Arc<dyn Store>> {
    if settings.mongo_uri.is_some() {
        anyhow::bail!(
            "MONGO_URI is set, but the MongoDB store is not supported yet: unset MONGO_URI to use \
             the embedded SQLite store (SQLITE_PATH)"
        );
    }
    let options = SqliteOptions {
        fresh_lock: settings.lease(),
        ..Default::default()
    };
    let store = SqliteStore::open(&settings.sqlite_path, options)
        .await
        .with_context(|| {
            format!(
                "opening the SQLite store {}",
                settings.sqlite_path.display()
            )
        })?;
    tracing::info!(path = %settings.sqlite_path.display(), "using the embedded SQLite store");
    Ok(Arc::new(store))
}

/// The HTTP API, bound and ready to serve.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
}

impl Application {
    pub async fn build(
        addr: SocketAddr,
        store: Arc<dyn Store>,
        jwt_key: &str,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP port {addr}"))?;
        let router = api::router(ApiContext {
            store,
            jwt: JwtKey::new(jwt_key),
        });
        Ok(Self { listener, router })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` fires, then stops accepting and lets in-flight requests finish
    /// (at most [`HTTP_DRAIN`]).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr()?, "HTTP API listening");
        let graceful = shutdown.clone();
        let server = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { graceful.cancelled().await });
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            res = &mut server => return res.context("HTTP server failed"),
            _ = shutdown.cancelled() => {}
        }
        match tokio::time::timeout(HTTP_DRAIN, server).await {
            Ok(res) => res.context("HTTP server failed"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within {HTTP_DRAIN:?}; stopping");
                Ok(())
            }
        }
    }
}

/// Cancels the token on SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        token.cancel();
    });
}
