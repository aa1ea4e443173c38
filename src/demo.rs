//! The demo: with no `-c`, a throw-away SQLite database with the schema
//! subset and a few users, devices and cross-signing keys, and a fresh
//! access token, so a newcomer can `curl` the service in a minute.

use std::path::PathBuf;

use rand::Rng;
use rand::distr::Alphanumeric;

use crate::config::{Config, DatabaseConfig, SynapseConfig, WorkerConfig};
use crate::store::Store;

pub const SERVER_NAME: &str = "demo.localhost";

pub struct Demo {
    pub config: Config,
    pub store: Store,
    pub token: String,
    pub db_path: PathBuf,
}

impl Demo {
    /// Whether `listen` (an address to bind) is on loopback only: an IP
    /// literal of 127.0.0.0/8 or ::1, or `localhost`.
    pub fn is_loopback(listen: &str) -> bool {
        if let Ok(addr) = listen.parse::<std::net::SocketAddr>() {
            return addr.ip().is_loopback();
        }
        listen.rsplit_once(':').is_some_and(|(host, port)| host.eq_ignore_ascii_case("localhost") && port.parse::<u16>().is_ok())
    }

    pub async fn create(worker: WorkerConfig) -> anyhow::Result<Self> {
        let db_path = std::env::temp_dir().join(format!("synapse-keys-worker-demo-{}.db", std::process::id()));
        let token: String = format!("syt_demo_{}", rand::rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect::<String>());
        let store = Store::create_demo(&db_path, SERVER_NAME, &token).await?;
        let mut synapse_yaml = yaml_serde::Mapping::new();
        synapse_yaml.insert("server_name".into(), SERVER_NAME.into());
        let database: yaml_serde::Value =
            yaml_serde::from_str(&format!("{{name: sqlite3, args: {{database: {:?}}}}}", db_path.display().to_string()))?;
        synapse_yaml.insert("database".into(), database);
        let synapse = SynapseConfig::from_mapping(&synapse_yaml)?;
        debug_assert!(matches!(synapse.database, DatabaseConfig::Sqlite { .. }));
        Ok(Self { config: Config { synapse, worker }, store, token, db_path })
    }

    /// The ready-to-paste request printed at start-up.
    pub fn curl_command(&self, addr: std::net::SocketAddr) -> String {
        format!(
            "curl -s -X POST 'http://{addr}/_matrix/client/v3/keys/query' \\\n  -H 'Authorization: Bearer {}' \\\n  -d '{{\"device_keys\": {{\"@alice:{SERVER_NAME}\": [], \"@bob:{SERVER_NAME}\": []}}}}'",
            self.token
        )
    }

    /// What the demo prints when it is up: what it serves, the request to
    /// paste, and where the metrics and health checks are.
    pub fn introduction(&self, addr: std::net::SocketAddr) -> String {
        format!(
            "synapse-keys-worker demo: answering /keys/query for {SERVER_NAME} (users @alice and @bob, with devices and \
             cross-signing keys) on http://{addr}\n\nAsk for their keys:\n\n{}\n\nMetrics: http://{addr}/metrics   \
             Health: http://{addr}/health   Stop: Ctrl-C\nTo serve a real homeserver: synapse-keys-worker -c homeserver.yaml\n",
            self.curl_command(addr)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Demo;

    #[test]
    fn the_demo_listens_on_loopback_only() {
        for ok in ["127.0.0.1:8585", "127.9.9.9:0", "[::1]:8585", "localhost:8585"] {
            assert!(Demo::is_loopback(ok), "{ok}");
        }
        for bad in ["0.0.0.0:8585", "[::]:8585", "10.0.0.1:80", "example.org:8585", "localhost", "8585"] {
            assert!(!Demo::is_loopback(bad), "{bad}");
        }
    }
}
