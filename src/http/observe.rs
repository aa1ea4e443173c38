//! What every request goes through, in one middleware ([`edge`]): a
//! request ID (the proxy's `X-Request-Id` when it sends a sane one, else a
//! fresh one; passed on with the request and echoed back), a tracing span
//! carrying it on every log line of the request and one access-log line,
//! the request metrics, and the CORS answer and headers Synapse sends.
//! Logs name the path only: query strings can hold access tokens. One
//! middleware instead of a layer each: every layer axum stacks on a route
//! is boxed and cloned for every request.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use rand::distr::Alphanumeric;
use tracing::Instrument;

use crate::App;
use crate::metrics::RequestLabels;

pub const REQUEST_ID: &str = "x-request-id";

pub async fn edge(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = match req.headers().get(REQUEST_ID) {
        Some(v) if sane_request_id(v) => v.clone(),
        _ => {
            let id = fresh_request_id();
            req.headers_mut().insert(REQUEST_ID, id.clone());
            id
        }
    };
    let method = method_label(req.method());
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let is_client_api = req.uri().path().starts_with("/_matrix/");
    let options = req.method() == Method::OPTIONS;
    let span = tracing::info_span!("request", request_id = %id.to_str().unwrap_or("-"), method = %method, path = %req.uri().path());
    let in_flight = InFlight::enter(&app.metrics.in_flight);
    // Synapse answers `OPTIONS` on any path with 204 and CORS headers.
    let mut resp = if options { StatusCode::NO_CONTENT.into_response() } else { next.run(req).instrument(span.clone()).await };
    drop(in_flight);
    if is_client_api || options {
        set_cors_headers(&mut resp);
    }
    resp.headers_mut().insert(REQUEST_ID, id);
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    span.in_scope(|| tracing::info!(status, elapsed_ms = elapsed.as_secs_f64() * 1000.0, "request"));
    let labels = RequestLabels { route, method: method.to_owned(), status };
    app.metrics.requests.get_or_create(&labels).inc();
    app.metrics.duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    resp
}

/// An `X-Request-Id` we would log: not empty, at most 128 bytes, no spaces
/// or control bytes. Any other is replaced by a fresh one.
fn sane_request_id(v: &HeaderValue) -> bool {
    !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic)
}

fn fresh_request_id() -> HeaderValue {
    let id: String = rand::rng().sample_iter(&Alphanumeric).take(16).map(char::from).collect();
    HeaderValue::from_str(&id).expect("alphanumeric")
}

/// The CORS headers Synapse sets on its client-API responses, so browser
/// clients work through us too.
fn set_cors_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("X-Requested-With, Content-Type, Authorization, Date"));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Synapse-Trace-Id, Server"));
}

/// The method as a metric label: the standard ones by name, anything else a
/// client invents as `other` (labels must not grow with input).
fn method_label(method: &Method) -> &'static str {
    [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::HEAD, Method::OPTIONS, Method::PATCH, Method::CONNECT, Method::TRACE]
        .iter()
        .find(|m| *m == method)
        .map_or("other", |m| m.as_str())
}

/// Counts a request in flight until it is answered or dropped.
struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
