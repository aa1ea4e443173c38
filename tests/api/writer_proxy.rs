//! A counting HTTP proxy in front of the real Synapse's replication
//! listener, to count the resync calls our service makes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use synapse_keys_worker::config::Config;
use synapse_keys_worker::config::synapse::InstanceLocation;

use crate::helpers::{env, http};

pub struct CountingProxy {
    pub port: u16,
    calls: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct Shared {
    upstream: String,
    calls: Arc<AtomicUsize>,
}

impl CountingProxy {
    pub async fn start() -> Self {
        Self::start_for(&Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap()).await
    }

    /// In front of the device-lists writer `config` names.
    pub async fn start_for(config: &Config) -> Self {
        let Some(InstanceLocation::Tcp { host, port, .. }) = &config.synapse.device_lists_writer else {
            panic!("the harness configures instance_map.main over TCP")
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let shared = Shared { upstream: format!("http://{host}:{port}"), calls: calls.clone() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = Router::new().fallback(forward).with_state(shared);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { port, calls }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn forward(State(s): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if parts.uri.path().starts_with("/_synapse/replication/multi_user_device_resync/") {
        s.calls.fetch_add(1, Ordering::SeqCst);
    }
    let body: Bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut upstream = http().request(parts.method, format!("{}{path}", s.upstream)).body(body);
    for name in ["authorization", "content-type"] {
        if let Some(v) = parts.headers.get(name) {
            upstream = upstream.header(name, v);
        }
    }
    match upstream.send().await {
        Ok(resp) => {
            let status = resp.status();
            (status, resp.bytes().await.unwrap_or_default()).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
