//! Plumbing of the client test: the test world's environment, our service
//! in-process, nginx in front of it and Synapse with the README's routing
//! rule, and its access log.

// The SDK's futures are deep: proving the sync loop `Send` needs more.
#![recursion_limit = "256"]

pub mod nginx;
pub mod party;

use std::sync::Arc;
use std::time::{Duration, Instant};

use synapse_keys_worker::config::Config;
use synapse_keys_worker::{App, Server};

/// A variable scripts/test.sh exported (through scripts/world.py).
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run this test through `bash scripts/test.sh`"))
}

/// The polling loop of this crate (the main suite's `eventually_some`):
/// polls `check` every 10 ms until it gives a value; fails the test with
/// `what` after `limit`.
pub async fn eventually_some<T, F: Future<Output = Option<T>>>(what: &str, limit: Duration, mut check: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Our service, configured from a Synapse's homeserver.yaml, on a free
/// loopback port, once its caches are trusted.
pub struct Worker {
    /// `127.0.0.1:port`, as nginx logs the upstream.
    pub addr: String,
    pub app: Arc<App>,
}

impl Worker {
    pub async fn start(homeserver_yaml: &str) -> Self {
        let config = Config::load(&[homeserver_yaml.into()], Vec::new()).expect("homeserver.yaml loads");
        let app = App::from_config(config).expect("app builds");
        let server = Server::bind(app.clone(), "127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().to_string();
        tokio::spawn(server.run_until(std::future::pending()));
        let trusted = app.clone();
        eventually_some("our caches trusted", Duration::from_secs(10), || std::future::ready(trusted.caches.trusted().then_some(()))).await;
        Worker { addr, app }
    }

    /// `/keys/query` requests we answered with `status`, from our own
    /// `/metrics`.
    pub async fn keys_queries_answered(&self, status: u16) -> u64 {
        let text = reqwest::get(format!("http://{}/metrics", self.addr)).await.expect("GET /metrics").text().await.expect("metrics body");
        let status = format!("status=\"{status}\"");
        text.lines()
            .filter(|l| l.starts_with("synapse_keys_worker_http_requests_total{") && l.contains("keys/query") && l.contains(&status))
            .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).expect("a counter value") as u64)
            .sum()
    }
}
