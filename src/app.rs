//! The composition root: [`App`] builds every part from the config and
//! holds what the request handlers share. It is also the query path's
//! [`keys::Context`]: the domain logic reads and asks through it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::cache::Caches;
use crate::config::Config;
use crate::federation::FederationClient;
use crate::keys::{KeysError, LocalReads, RemoteUser, UserQuery};
use crate::resync::Coordinator;
use crate::resync::pass::WriterPass;
use crate::store::Store;
use crate::{appservice_keys, http, keys, mas, metrics, replication};

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
    /// Device-list repairs of whole servers, started through the admin API.
    pub device_list_tasks: crate::device_lists::Tasks,
    /// What device-list health counted (the auditor, repairs, signals).
    pub device_list_stats: Arc<crate::device_lists::stats::HealthStats>,
    /// The database's Synapse schema, as last read (start-up, `/ready`).
    pub schema: Arc<crate::schema_window::SchemaStatus>,
}

/// The ways to other servers: the resync coordinator (device-lists writer
/// first), the federation client, and the pass-through of workers' other
/// replication calls to the writer.
#[derive(Debug)]
pub struct Remote {
    pub coordinator: Arc<Coordinator>,
    pub federation: Arc<FederationClient>,
    pub pass: Arc<WriterPass>,
}

impl App {
    pub fn new(config: Config, store: Store) -> anyhow::Result<Arc<Self>> {
        let federation = Arc::new(FederationClient::from_config(&config)?);
        let coordinator = Arc::new(Coordinator::new(&config, Arc::clone(&federation))?);
        let pass = Arc::new(WriterPass::from_config(&config)?);
        let schema = Arc::new(crate::schema_window::SchemaStatus::default());
        let caches = Arc::new(Caches::new(&config.worker, Arc::clone(&schema)));
        let replication = Arc::new(replication::Status::default());
        let invalidator = Arc::new(replication::Invalidator { caches: Arc::clone(&caches), coordinator: Arc::clone(&coordinator) });
        let probe_db =
            crate::store::ProbeConnection::new(store.clone(), std::time::Duration::from_millis(config.worker.db_acquire_timeout_ms));
        let barrier = Arc::new(replication::Barrier::new(
            probe_db,
            Arc::clone(&invalidator),
            config.synapse.device_lists_writers.clone(),
            Arc::clone(&replication.reported),
        ));
        let mas = mas::MasClient::from_config(&config)?.map(Arc::new);
        let device_list_stats = Arc::new(crate::device_lists::stats::HealthStats::default());
        let metrics = metrics::Metrics::new(metrics::Sources {
            mas: mas.clone(),
            caches: Arc::clone(&caches),
            coordinator: Arc::clone(&coordinator),
            federation: Arc::clone(&federation),
            pass: Arc::clone(&pass),
            replication: Arc::clone(&replication),
            barrier: Arc::clone(&barrier),
            store: store.clone(),
            device_lists: Arc::clone(&device_list_stats),
            audit_enabled: config.worker.device_list_audit.enabled,
            schema: Arc::clone(&schema),
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
            remote: Remote { coordinator, federation, pass },
            replication,
            invalidator,
            barrier,
            metrics,
            limiter,
            device_list_tasks: Default::default(),
            device_list_stats,
            schema,
        }))
    }

    /// What an operator should know about `config` before the first
    /// request: the parts it leaves out. Logged as warnings at start-up
    /// (the demo, which needs none of those parts, stays quiet).
    pub fn limitations(config: &Config) -> Vec<String> {
        let mut said = Vec::new();
        if config.worker.resync_cache_max_users.is_some() {
            said.push("keys_worker.resync_cache_max_users is no longer used: resync results are bounded by cache_max_bytes".to_owned());
        }
        if config.synapse.signing_key_path.is_none() {
            said.push("no signing_key_path: direct federation (the fallback when the writer is down) is disabled".to_owned());
        }
        match &config.synapse.device_lists_writer {
            Some(crate::config::synapse::InstanceLocation::Unix { path }) => said.push(format!(
                "the device-lists writer listens on a UNIX socket ({}), which is not supported: resyncs go to remote servers directly",
                path.display()
            )),
            None => said.push("no instance_map entry for the device-lists writer: resyncs go to remote servers directly".to_owned()),
            Some(_) => {}
        }
        said
    }

    /// What following Synapse's replication stream needs of this app.
    pub fn follower(&self) -> replication::Follower {
        replication::Follower {
            config: self.config.clone(),
            store: self.store.clone(),
            caches: Arc::clone(&self.caches),
            invalidator: Arc::clone(&self.invalidator),
            status: Arc::clone(&self.replication),
            barrier: Arc::clone(&self.barrier),
        }
    }

    /// Opens the database named by the config (lazily: no connection yet).
    pub fn from_config(config: Config) -> anyhow::Result<Arc<Self>> {
        let store = Store::connect(&config.synapse.database, &config.worker)?;
        Self::new(config, store)
    }
}

impl keys::Context for App {
    fn server_name(&self) -> &str {
        &self.config.synapse.server_name
    }

    fn destination_concurrency(&self) -> usize {
        self.config.worker.federation_concurrency
    }

    async fn catch_up(&self, remote_users: &[&str]) -> Result<Arc<HashSet<String>>, KeysError> {
        // With the caches off every local read is the database's, made after
        // the request arrived: nothing to catch up on unless remote users'
        // stale marks are wanted.
        if !self.config.worker.caches_enabled && remote_users.is_empty() {
            return Ok(Arc::default());
        }
        self.barrier.sync(remote_users).await.map_err(|e| KeysError::Unavailable(e.to_string()))
    }

    fn cache_changes(&self) -> u64 {
        self.caches.changes()
    }

    async fn local_reads<'a>(&self, local: &[&'a str], queried: &[&'a str], requester: &'a str) -> Result<LocalReads<'a>, KeysError> {
        Ok(self.caches.local_reads(&self.store, local, queried, requester).await?)
    }

    async fn appservice_devices(&self, local: &[UserQuery<'_>], deadline: Instant) -> Map<String, Value> {
        match &self.appservice_keys {
            Some(services) => services.query(local, deadline).await,
            None => Map::new(),
        }
    }

    async fn remote_users(&self, users: &[&str]) -> Result<HashMap<String, Arc<RemoteUser>>, KeysError> {
        Ok(self.caches.remote_users(&self.store, users).await?)
    }

    async fn destinations_in_backoff(&self, destinations: &[&str], not_before_ms: i64) -> Result<Vec<String>, KeysError> {
        Ok(self.store.destinations_in_backoff(destinations, not_before_ms).await?)
    }

    async fn users_sharing_a_room_with(&self, requester: &str, users: &[&str]) -> Result<Vec<String>, KeysError> {
        Ok(self.store.users_sharing_a_room_with(requester, users).await?)
    }

    async fn resync(&self, destination: &str, users: &[String], deadline: Instant, looked_at: Instant) -> HashMap<String, keys::Outcome> {
        self.remote.coordinator.resync(destination, users, deadline, looked_at).await
    }

    async fn user_keys_query(&self, destination: &str, query: &Value, timeout: Duration, deadline: Instant) -> Result<Value, Value> {
        self.remote.federation.user_keys_query(destination, query, timeout, deadline).await.map_err(|e| e.to_failure())
    }

    fn timed_out(&self, timeout: Duration) -> Value {
        crate::federation::FedError::timed_out(timeout).to_failure()
    }
}

impl From<sqlx::Error> for KeysError {
    fn from(e: sqlx::Error) -> Self {
        if crate::store::is_unavailable(&e) { Self::Unavailable(e.to_string()) } else { Self::Internal(e.to_string()) }
    }
}
