//! Per-request bookkeeping, as tower layers: a request ID (tower-http's
//! `SetRequestId`: the proxy's `X-Request-Id` when it sends a sane one,
//! else a fresh one; echoed back by `PropagateRequestId`), a tracing span
//! carrying it on every log line of the request and one access-log line
//! (tower-http's `Trace`), and the request metrics. Logs name the path
//! only: query strings can hold access tokens.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;
use rand::distr::Alphanumeric;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::request_id::{MakeRequestId, RequestId};
use tower_http::trace::TraceLayer;

use crate::App;
use crate::metrics::RequestLabels;

pub const REQUEST_ID: &str = "x-request-id";

/// A fresh ID for a request that came without a usable one.
#[derive(Clone, Copy, Default)]
pub struct FreshId;

impl MakeRequestId for FreshId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id: String = rand::rng().sample_iter(&Alphanumeric).take(16).map(char::from).collect();
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

/// Drops an `X-Request-Id` we would not want in our logs (empty, longer
/// than 128 bytes, or with spaces or control bytes), so a fresh one is made.
pub async fn drop_odd_request_id(mut req: Request, next: Next) -> Response {
    let sane = |v: &HeaderValue| !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic);
    if req.headers().get(REQUEST_ID).is_some_and(|v| !sane(v)) {
        req.headers_mut().remove(REQUEST_ID);
    }
    next.run(req).await
}

type AccessLog = TraceLayer<
    SharedClassifier<ServerErrorsAsFailures>,
    fn(&Request) -> tracing::Span,
    (),
    fn(&Response, Duration, &tracing::Span),
    (),
    (),
    (),
>;

/// The span every log line of a request is in, and its access-log line.
pub fn access_log() -> AccessLog {
    fn span(req: &Request) -> tracing::Span {
        let id = req.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("-");
        tracing::info_span!("request", request_id = %id, method = %method_label(req.method()), path = %req.uri().path())
    }
    fn log(resp: &Response, elapsed: Duration, _: &tracing::Span) {
        tracing::info!(status = resp.status().as_u16(), elapsed_ms = elapsed.as_secs_f64() * 1000.0, "request");
    }
    TraceLayer::new_for_http()
        .make_span_with(span as fn(&Request) -> tracing::Span)
        .on_request(())
        .on_response(log as fn(&Response, Duration, &tracing::Span))
        .on_body_chunk(())
        .on_eos(())
        .on_failure(())
}

/// The request metrics: in flight, count and duration by route, method
/// and status.
pub async fn metrics(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let _in_flight = InFlight::enter(&app.metrics.in_flight);
    let resp = next.run(req).await;
    let labels = RequestLabels { route, method: method.to_owned(), status: resp.status().as_u16() };
    app.metrics.requests.get_or_create(&labels).inc();
    app.metrics.duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    resp
}

/// The method as a metric label: the standard ones by name, anything else a
/// client invents as `other` (labels must not grow with input).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
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
