//! synapse-keys-worker: serves Matrix `/keys/query` from a Synapse
//! homeserver's own database. See ARCHITECTURE.md for the map.

pub mod appservice_keys;
pub mod breaker;
pub mod cache;
pub mod config;
pub mod demo;
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
pub mod store;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::cache::Caches;
use crate::config::Config;
use crate::federation::FederationClient;
use crate::resync::Coordinator;
use crate::store::Store;

/// What every request handler shares.
#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub store: Store,
    pub caches: Arc<Caches>,
    pub remote: Remote,
    pub replication: Arc<replication::Status>,
    /// Applies Synapse's invalidations (from the stream and the barrier).
    pub invalidator: Arc<replication::Invalidator>,
    /// Waited on before the caches are read: see `replication::Barrier`.
    pub barrier: Arc<replication::Barrier>,
    pub metrics: metrics::Metrics,
    pub limiter: http::limit::DeviceLimiter,
    /// MSC3984: application services asked for their users' keys.
    pub appservice_keys: Option<appservice_keys::AppServiceKeys>,
    /// Delegated auth: MAS introspects user tokens.
    pub mas: Option<Arc<mas::MasClient>>,
}

/// The ways to other servers: the resync coordinator (device-lists writer
/// first) and the federation client.
#[derive(Debug)]
pub struct Remote {
    pub coordinator: Arc<Coordinator>,
    pub federation: Arc<FederationClient>,
}

impl App {
    pub fn new(config: Config, store: Store) -> anyhow::Result<Arc<Self>> {
        let federation = Arc::new(FederationClient::from_config(&config)?);
        let coordinator = Arc::new(Coordinator::new(&config, Arc::clone(&federation))?);
        let caches = Arc::new(Caches::new(&config.worker));
        let replication = Arc::new(replication::Status::default());
        let invalidator = Arc::new(replication::Invalidator { caches: Arc::clone(&caches), coordinator: Arc::clone(&coordinator) });
        let probe_db = store::ProbeConnection::new(store.clone(), std::time::Duration::from_millis(config.worker.db_acquire_timeout_ms));
        let barrier = Arc::new(replication::Barrier::new(probe_db, Arc::clone(&invalidator), config.synapse.device_lists_writers.clone()));
        let mas = mas::MasClient::from_config(&config)?.map(Arc::new);
        let metrics = metrics::Metrics::new(metrics::Sources {
            mas: mas.clone(),
            caches: Arc::clone(&caches),
            coordinator: Arc::clone(&coordinator),
            federation: Arc::clone(&federation),
            replication: Arc::clone(&replication),
            barrier: Arc::clone(&barrier),
            store: store.clone(),
        });
        let limiter = http::limit::DeviceLimiter::new(
            config.worker.max_concurrent_queries_per_device,
            std::time::Duration::from_millis(config.worker.queue_wait_ms),
        );
        let appservice_keys = appservice_keys::AppServiceKeys::from_config(&config)?;
        Ok(Arc::new(Self {
            appservice_keys,
            mas,
            config,
            store,
            caches,
            remote: Remote { coordinator, federation },
            replication,
            invalidator,
            barrier,
            metrics,
            limiter,
        }))
    }

    /// Opens the database named by the config (lazily: no connection yet).
    pub fn from_config(config: Config) -> anyhow::Result<Arc<Self>> {
        let store = Store::connect(&config.synapse.database, &config.worker)?;
        Self::new(config, store)
    }
}

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
        replication::start(&self.app);
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
