//! The HTTP surface: routes, Synapse-compatible fallbacks (404/405 as
//! `M_UNRECOGNIZED`, `OPTIONS` and CORS as Synapse answers them), body
//! limit and panic safety net. Handlers are thin: they parse, call into
//! [`crate::keys`], and serialise.

mod admin;
pub mod auth;
mod health;
mod keys_query;
pub mod limit;
mod observe;
pub mod params;
mod ready;
mod replication_pass;
mod resync_rpc;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;

use crate::App;
use crate::error::MatrixError;

/// The client-API versions Synapse serves `/keys/query` under.
pub const KEYS_QUERY_PATHS: [&str; 3] =
    ["/_matrix/client/r0/keys/query", "/_matrix/client/v3/keys/query", "/_matrix/client/unstable/keys/query"];

/// Every route: method, path, handler. The one list the router is built
/// from and `openapi/openapi.yaml` is checked against.
fn route_table() -> Vec<(Method, &'static str, MethodRouter<Arc<App>>)> {
    let mut t = vec![
        (Method::GET, "/health", get(health::health)),
        (Method::GET, "/ready", get(ready::ready)),
        (Method::GET, "/metrics", get(metrics)),
    ];
    for path in KEYS_QUERY_PATHS {
        t.push((Method::POST, path, post(keys_query::keys_query)));
    }
    t.extend(admin::route_table());
    t.push((Method::POST, "/_synapse/replication/multi_user_device_resync/{txn_id}", post(resync_rpc::resync_rpc)));
    // Every other replication call goes on to the device-lists writer.
    let pass = replication_pass::replication_pass;
    for (method, handler) in [
        (Method::GET, get(pass)),
        (Method::POST, post(pass)),
        (Method::PUT, put(pass)),
        (Method::DELETE, delete(pass)),
        (Method::PATCH, patch(pass)),
    ] {
        t.push((method, REPLICATION_PASS_PATH, handler));
    }
    t
}

/// The pass-through's route: any path under `/_synapse/replication/`.
pub const REPLICATION_PASS_PATH: &str = "/_synapse/replication/{*path}";

/// (method, path) of every route served.
pub fn routes() -> Vec<(Method, &'static str)> {
    route_table().into_iter().map(|(m, p, _)| (m, p)).collect()
}

pub fn router(app: Arc<App>) -> Router {
    let max_body = app.config.worker.max_body_bytes;
    let mut r = Router::new();
    for (_, path, handler) in route_table() {
        r = r.route(path, handler);
    }
    r.fallback(|| async { MatrixError::not_found() })
        .method_not_allowed_fallback(|| async { MatrixError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(|_| MatrixError::internal("handler panicked").into_response()))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), observe::edge))
        .with_state(app)
}

/// `GET /metrics`: Prometheus (OpenMetrics text).
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut resp = app.metrics.render().into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    resp
}

/// A JSON response with the headers Synapse sends on API answers. The
/// buffer starts at the size of the previous answer (answers to one
/// deployment's clients are alike), so it is seldom grown and copied.
pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    static LAST_LEN: AtomicUsize = AtomicUsize::new(0);
    let mut bytes = Vec::with_capacity(LAST_LEN.load(Ordering::Relaxed).clamp(256, 1 << 20));
    match serde_json::to_writer(&mut bytes, body) {
        Ok(()) => {
            LAST_LEN.store(bytes.len(), Ordering::Relaxed);
            let mut resp = (status, bytes).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-store, must-revalidate"));
            resp
        }
        Err(e) => MatrixError::internal(e).into_response(),
    }
}

/// A request body as Synapse reads one: too large is 413 `M_TOO_LARGE`,
/// any other failure to read it 400 `M_BAD_JSON`.
pub fn read_body(body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>) -> Result<axum::body::Bytes, MatrixError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => MatrixError::too_large(),
        _ => MatrixError::bad_json("Error reading JSON content."),
    })
}

/// `work`, or 503 if it has not finished within `budget` (if bounded).
async fn within<T>(budget: Option<std::time::Duration>, work: impl Future<Output = Result<T, MatrixError>>) -> Result<T, MatrixError> {
    let Some(budget) = budget else {
        return work.await;
    };
    tokio::time::timeout(budget, work).await.unwrap_or_else(|_| Err(MatrixError::unavailable(format!("no answer within {budget:?}"))))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use yaml_serde::Value;

    /// `openapi/openapi.yaml` describes exactly the routes the router serves.
    #[test]
    fn openapi_paths_match_router() {
        let doc: Value = yaml_serde::from_str(include_str!("../../openapi/openapi.yaml")).unwrap();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_mapping().unwrap() {
            let item = match item.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    let name = r.strip_prefix("#/components/pathItems/").expect("path items are refs to components");
                    &doc["components"]["pathItems"][name]
                }
                None => item,
            };
            for method in item.as_mapping().unwrap().keys() {
                documented.insert((method.as_str().unwrap().to_uppercase(), path.as_str().unwrap().to_owned()));
            }
        }
        // OpenAPI has no catch-all: `{*path}` is documented as `{path}`.
        let served: BTreeSet<_> = super::routes().into_iter().map(|(m, p)| (m.to_string(), p.replace("{*", "{"))).collect();
        assert_eq!(served, documented, "left: router, right: openapi.yaml");
    }
}
