//! The HTTP surface: routes, Synapse-compatible fallbacks (404/405 as
//! `M_UNRECOGNIZED`, `OPTIONS` and CORS as Synapse answers them), body
//! limit and panic safety net. Handlers are thin: they parse, call into
//! [`crate::keys`], and serialise.

pub mod auth;
mod health;
mod keys_query;
pub mod params;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::App;
use crate::error::MatrixError;

/// The client-API versions Synapse serves `/keys/query` under.
pub const KEYS_QUERY_PATHS: [&str; 3] = [
    "/_matrix/client/r0/keys/query",
    "/_matrix/client/v3/keys/query",
    "/_matrix/client/unstable/keys/query",
];

pub fn router(app: Arc<App>) -> Router {
    let max_body = app.config.worker.max_body_bytes;
    let mut r = Router::new().route("/health", get(health::health));
    for path in KEYS_QUERY_PATHS {
        r = r.route(path, post(keys_query::keys_query));
    }
    r.fallback(|| async { MatrixError::not_found() })
        .method_not_allowed_fallback(|| async { MatrixError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(cors))
        .layer(CatchPanicLayer::custom(|_| MatrixError::internal("handler panicked").into_response()))
        .layer(TraceLayer::new_for_http())
        .with_state(app)
}

/// Synapse answers `OPTIONS` on any path with 204 and sets CORS headers on
/// its client-API responses, so browser clients work through us too.
async fn cors(req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        set_cors_headers(&mut resp);
        return resp;
    }
    let is_client_api = req.uri().path().starts_with("/_matrix/");
    let mut resp = next.run(req).await;
    if is_client_api {
        set_cors_headers(&mut resp);
    }
    resp
}

fn set_cors_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization, Date"),
    );
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Synapse-Trace-Id, Server"));
}

/// A JSON response with the headers Synapse sends on API answers.
pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut resp = (status, bytes).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-store, must-revalidate"));
            resp
        }
        Err(e) => MatrixError::internal(e).into_response(),
    }
}
