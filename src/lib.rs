//! synapse-keys-worker: serves Matrix `/keys/query` from a Synapse
//! homeserver's own database. See ARCHITECTURE.md for the map.

mod app;
pub mod appservice_keys;
pub mod breaker;
pub mod cache;
pub mod config;
pub mod demo;
pub mod device_lists;
pub mod error;
pub mod federation;
#[doc(hidden)]
pub mod fuzzing;
pub mod guest;
pub mod http;
pub mod ids;
pub mod keys;
pub mod mas;
pub mod metrics;
pub mod replication;
pub mod resync;
pub mod schema_window;
pub mod store;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use app::{App, Remote};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// A bound server, ready to run.
pub struct Server {
    listener: TcpListener,
    app: Arc<App>,
}

impl Server {
    pub async fn bind(app: Arc<App>, addr: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        Ok(Self { listener, app })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Starts following Synapse's replication stream, then serves until
    /// `shutdown` completes: from then on no new connections are accepted,
    /// and in-flight requests get `shutdown_grace_ms` to finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        replication::start(self.app.follower());
        device_lists::start(Arc::clone(&self.app));
        schema_window::recheck_periodically(Arc::clone(&self.app.schema), self.app.store.clone());
        let grace = std::time::Duration::from_millis(self.app.config.worker.shutdown_grace_ms);
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let service = http::router(self.app).into_make_service_with_connect_info::<SocketAddr>();
        let serve = axum::serve(self.listener, service).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = stopping_tx.send(());
        });
        let deadline = async move {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            done = serve => done,
            () = deadline => {
                tracing::warn!(?grace, "in-flight requests did not finish within the grace period");
                Ok(())
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
