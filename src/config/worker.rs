//! Our own settings: the `keys_worker` section of the YAML, each key
//! overridable by a `SYNAPSE_KEYS_WORKER_<KEY>` environment variable.
//! Unknown keys are an error that names the key.

use serde::Deserialize;
use yaml_serde::{Mapping, Value};

use super::ConfigError;

pub const SECTION: &str = "keys_worker";
pub const ENV_PREFIX: &str = "SYNAPSE_KEYS_WORKER_";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Address to serve HTTP on (`host:port`).
    pub listen: String,
    /// Largest request body accepted, in bytes (larger: 413 `M_TOO_LARGE`).
    pub max_body_bytes: usize,
    /// `/keys/query` timeout when the client gives none, in ms.
    pub default_timeout_ms: u64,
    /// Upper bound on a client-supplied `timeout`, in ms.
    pub max_timeout_ms: u64,
    /// Most database connections; unset means the `cp_max` of Synapse's
    /// `database.args`, else 10.
    pub db_max_connections: Option<u32>,
    /// How long a request waits for a free database connection, in ms.
    pub db_acquire_timeout_ms: u64,
    /// PostgreSQL `statement_timeout` for our queries, in ms (0 = none).
    pub db_statement_timeout_ms: u64,
    /// Emit logs as JSON lines instead of text.
    pub log_json: bool,
    /// How long a resync call to the device-lists writer may take, in ms,
    /// before the request goes to the remote server directly.
    /// (`master_timeout_ms` is read as this too.)
    #[serde(alias = "master_timeout_ms")]
    pub writer_timeout_ms: u64,
    /// While the writer hangs (no answer in time, `/health` silent), how
    /// often one resync still tries it, in ms; the others go to the remote
    /// directly. (`master_breaker_ms` is read as this too.)
    #[serde(alias = "master_breaker_ms")]
    pub writer_breaker_ms: u64,
    /// How long a replication call passed through to the writer may take,
    /// in ms, body included; above the 60 s Synapse gives each attempt, so
    /// its own timeout and retry apply (see `resync::pass`).
    pub replication_pass_timeout_ms: u64,
    /// How long a token introspection by MAS may take, in ms, before the
    /// request is answered 503 (delegated auth only).
    pub mas_timeout_ms: u64,
    /// While MAS hangs (no answer within `mas_timeout_ms`), how often one
    /// introspection still tries it, in ms; the others are refused at once
    /// (answers already kept still serve). Failures that come back fast are
    /// answered per request and never refuse the next.
    pub mas_breaker_ms: u64,
    /// How long a resync result is kept in memory, in ms.
    pub resync_cache_ttl_ms: u64,
    /// No longer used: resync results are weighed in bytes against
    /// `cache_max_bytes`, as the other caches. Still read, so older configs
    /// start (with a warning).
    pub resync_cache_max_users: Option<u64>,
    /// Most remote servers queried at once for one request.
    pub federation_concurrency: usize,
    /// Connect timeout for remote servers, in ms.
    pub federation_connect_timeout_ms: u64,
    /// Largest response accepted from a remote server, in bytes.
    pub federation_max_response_bytes: usize,
    /// First backoff after a remote server failed, in ms (doubles, jittered).
    pub federation_backoff_initial_ms: u64,
    /// Longest backoff, in ms.
    pub federation_backoff_max_ms: u64,
    /// How long server-discovery results are kept, in ms.
    pub discovery_cache_ttl_ms: u64,
    /// Use the memory caches (kept correct by the replication stream).
    pub caches_enabled: bool,
    /// Safety-net lifetime of any cached entry, in ms.
    pub cache_ttl_ms: u64,
    /// Bytes each data cache (device keys, cross-signing keys, signatures,
    /// remote devices) may hold.
    pub cache_max_bytes: u64,
    /// Access tokens kept in memory.
    pub token_cache_max_entries: u64,
    /// Lifetime of what is cached about remote users, in ms (Synapse emits
    /// no event when it marks a remote list stale, so keep this short).
    pub remote_status_ttl_ms: u64,
    /// With Redis disabled, how often the stream tables are polled, in ms.
    pub poll_interval_ms: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish, in ms.
    pub shutdown_grace_ms: u64,
    /// Concurrent `/keys/query` requests per (user, device), as Synapse's
    /// linearizer allows.
    pub max_concurrent_queries_per_device: usize,
    /// How long a request over that limit may wait for a slot before it is
    /// refused with 429, in ms.
    pub queue_wait_ms: u64,
    /// Take the client's address from the first `X-Forwarded-For` entry, as
    /// a Synapse listener with `x_forwarded: true` does. Only safe behind a
    /// proxy that sets the header.
    pub x_forwarded: bool,
    /// Let the admin API repair remote device lists: the one write this
    /// service can make to Synapse's database, Synapse's own stale mark
    /// (a row of `device_lists_remote_resync`). Off: the API only reads.
    pub device_list_repair: bool,
    /// A server's repair (the admin API) repairs at most this many of its
    /// users a second, one at a time.
    pub device_list_repair_per_second: u32,
    /// The device-list auditor (off by default: it makes federation
    /// requests).
    pub device_list_audit: AuditConfig,
}

/// `keys_worker.device_list_audit`: a background check of Synapse's copies
/// of remote users' device lists against their servers' answers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub enabled: bool,
    /// How often a round starts, in ms.
    pub interval_ms: u64,
    /// Users checked per round, in all.
    pub users_per_interval: u32,
    /// Users checked per round on any one server: the most requests a
    /// server gets from the auditor per round.
    pub per_destination_per_interval: u32,
    /// Repair the drifted users found (needs `device_list_repair`).
    pub repair: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { enabled: false, interval_ms: 60_000, users_per_interval: 20, per_destination_per_interval: 2, repair: false }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8585".into(),
            max_body_bytes: 10 * 1024 * 1024,
            default_timeout_ms: 10_000,
            max_timeout_ms: 60_000,
            db_max_connections: None,
            db_acquire_timeout_ms: 5_000,
            db_statement_timeout_ms: 10_000,
            log_json: false,
            writer_timeout_ms: 3_000,
            writer_breaker_ms: 5_000,
            replication_pass_timeout_ms: 90_000,
            mas_timeout_ms: 3_000,
            mas_breaker_ms: 1_000,
            resync_cache_ttl_ms: 60_000,
            resync_cache_max_users: None,
            federation_concurrency: 10,
            federation_connect_timeout_ms: 5_000,
            federation_max_response_bytes: 16 * 1024 * 1024,
            federation_backoff_initial_ms: 30_000,
            federation_backoff_max_ms: 24 * 3600 * 1000,
            discovery_cache_ttl_ms: 3600 * 1000,
            caches_enabled: true,
            cache_ttl_ms: 300_000,
            cache_max_bytes: 256 * 1024 * 1024,
            token_cache_max_entries: 100_000,
            remote_status_ttl_ms: 30_000,
            poll_interval_ms: 500,
            shutdown_grace_ms: 10_000,
            max_concurrent_queries_per_device: 10,
            queue_wait_ms: 10_000,
            x_forwarded: false,
            device_list_repair: false,
            device_list_repair_per_second: 5,
            device_list_audit: AuditConfig::default(),
        }
    }
}

impl WorkerConfig {
    /// The remote-query budget for a request that asked for `requested_ms`.
    pub fn query_timeout(&self, requested_ms: Option<u64>) -> std::time::Duration {
        let ms = requested_ms.unwrap_or(self.default_timeout_ms).min(self.max_timeout_ms);
        std::time::Duration::from_millis(ms)
    }

    /// How long one database step of a request (a few statements and a
    /// connection wait) may take: the statement timeout, at least 1 s, or
    /// no bound when the statement timeout is 0 ("none").
    pub fn db_step_budget(&self) -> Option<std::time::Duration> {
        (self.db_statement_timeout_ms > 0).then(|| std::time::Duration::from_millis(self.db_statement_timeout_ms.max(1000)))
    }

    pub fn from_section(section: Value, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut map = match section {
            Value::Null => Mapping::new(),
            Value::Mapping(m) => m,
            _ => return Err(ConfigError::new(format!("`{SECTION}` must be a mapping"))),
        };
        for (name, raw) in env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else { continue };
            // A value is read as a YAML scalar, so numbers and booleans work.
            let value = yaml_serde::from_str::<Value>(&raw).unwrap_or(Value::String(raw));
            map.insert(Value::String(key.to_ascii_lowercase()), value);
        }
        let config: Self = yaml_serde::from_value(Value::Mapping(map))
            .map_err(|e| ConfigError::new(format!("invalid `{SECTION}` setting (in a config file or a {ENV_PREFIX}* variable): {e}")))?;
        if config.device_list_audit.repair && !config.device_list_repair {
            return Err(ConfigError::new(format!(
                "`{SECTION}.device_list_audit.repair` needs `{SECTION}.device_list_repair: true` (the auditor repairs as the admin API does)"
            )));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_when_absent() {
        assert_eq!(WorkerConfig::from_section(Value::Null, env(&[])).unwrap(), WorkerConfig::default());
    }

    #[test]
    fn env_overrides_file() {
        let section: Value = yaml_serde::from_str("listen: 1.2.3.4:1\nmax_body_bytes: 5").unwrap();
        let c = WorkerConfig::from_section(
            section,
            env(&[("SYNAPSE_KEYS_WORKER_LISTEN", "127.0.0.1:9"), ("OTHER", "x"), ("SYNAPSE_KEYS_WORKER_LOG_JSON", "true")]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9");
        assert_eq!(c.max_body_bytes, 5);
        assert!(c.log_json);
    }

    #[test]
    fn unknown_key_is_named() {
        let section: Value = yaml_serde::from_str("listne: x").unwrap();
        let err = WorkerConfig::from_section(section, env(&[])).unwrap_err().to_string();
        assert!(err.contains("listne"), "{err}");
        let err = WorkerConfig::from_section(Value::Null, env(&[("SYNAPSE_KEYS_WORKER_BOGUS", "1")])).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn the_writer_settings_keep_their_old_names() {
        let section: Value = yaml_serde::from_str("master_timeout_ms: 1234\nmaster_breaker_ms: 99").unwrap();
        let c = WorkerConfig::from_section(section, env(&[])).unwrap();
        assert_eq!((c.writer_timeout_ms, c.writer_breaker_ms), (1234, 99));
        let c = WorkerConfig::from_section(Value::Null, env(&[("SYNAPSE_KEYS_WORKER_MASTER_TIMEOUT_MS", "77")])).unwrap();
        assert_eq!(c.writer_timeout_ms, 77);
    }

    #[test]
    fn the_auditor_is_a_section_of_its_own_and_repairs_only_with_repair_on() {
        let section: Value = yaml_serde::from_str("device_list_audit: {enabled: true, users_per_interval: 7}").unwrap();
        let c = WorkerConfig::from_section(section, env(&[])).unwrap();
        assert!(c.device_list_audit.enabled);
        assert_eq!((c.device_list_audit.users_per_interval, c.device_list_audit.interval_ms), (7, 60_000));
        let section: Value = yaml_serde::from_str("device_list_audit: {repair: true}").unwrap();
        let err = WorkerConfig::from_section(section, env(&[])).unwrap_err().to_string();
        assert!(err.contains("device_list_repair"), "{err}");
        let c = WorkerConfig::from_section(Value::Null, env(&[("SYNAPSE_KEYS_WORKER_DEVICE_LIST_AUDIT", "{enabled: true, bogus: 1}")]));
        assert!(c.unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn wrong_type_is_an_error() {
        let section: Value = yaml_serde::from_str("max_body_bytes: lots").unwrap();
        assert!(WorkerConfig::from_section(section, env(&[])).is_err());
    }

    #[test]
    fn statement_timeout_zero_means_no_budget() {
        let budget = |ms| WorkerConfig { db_statement_timeout_ms: ms, ..WorkerConfig::default() }.db_step_budget();
        assert_eq!(budget(0), None, "0 is \"none\", not a short budget");
        assert_eq!(budget(200), Some(std::time::Duration::from_secs(1)));
        assert_eq!(budget(10_000), Some(std::time::Duration::from_secs(10)));
    }
}
