//! Every `/_synapse/replication/...` call but the resync RPC, passed through
//! to the device-lists writer our config names: for deployments that point
//! the writer's `instance_map` entry at this service. The replication secret
//! is checked first (nothing is forwarded without it); then method, path and
//! query, headers (but hop-by-hop ones) and the body go on as they came, and
//! the writer's status, headers and body come back, streamed both ways.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use http_body::{Frame, SizeHint};

use super::resync_rpc::check_secret;
use crate::App;
use crate::error::MatrixError;
use crate::resync::pass::PassOutcome;

pub async fn replication_pass(State(app): State<Arc<App>>, req: Request) -> Result<Response, MatrixError> {
    let pass = &app.remote.pass;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if let Err(refused) = check_secret(app.config.synapse.worker_replication_secret.as_deref(), &parts.headers) {
        pass.count(path, PassOutcome::Refused);
        return Err(refused);
    }
    let path_and_query = parts.uri.path_and_query().map_or(path, |p| p.as_str());
    let body = reqwest::Body::wrap(SyncBody(Mutex::new(body)));
    match pass.send(parts.method.clone(), path_and_query, end_to_end(&parts.headers), body).await {
        Ok(answer) => {
            pass.count(path, PassOutcome::Answered);
            let mut resp = axum::http::Response::<reqwest::Body>::from(answer).map(Body::new);
            *resp.headers_mut() = end_to_end(resp.headers());
            Ok(resp)
        }
        Err(outcome) => {
            pass.count(path, outcome);
            Err(failure(outcome))
        }
    }
}

/// What a reverse proxy answers when the upstream fails: Synapse's
/// replication client retries no status, it hands the error (errcode and
/// message) to its own caller, so the answer is prompt and says what failed.
fn failure(outcome: PassOutcome) -> MatrixError {
    let (status, message) = match outcome {
        PassOutcome::Timeout => (StatusCode::GATEWAY_TIMEOUT, "The device-lists writer did not answer in time"),
        PassOutcome::NoWriter => (StatusCode::BAD_GATEWAY, "No device-lists writer is configured to pass this call to"),
        _ => (StatusCode::BAD_GATEWAY, "The device-lists writer could not be reached"),
    };
    MatrixError::new(status, "M_UNKNOWN", message)
}

/// `headers` without the hop-by-hop ones (RFC 9110 7.6.1, and whatever
/// `Connection` names), `Expect` (answered here already), `Host` (the
/// writer's, set by the client) and `Content-Length` (set from the
/// streamed body's own length).
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    let hop = |name: &str| {
        matches!(
            name,
            "connection"
                | "keep-alive"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "proxy-connection"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "expect"
                | "host"
                | "content-length"
        ) || named.iter().any(|n| n == name)
    };
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !hop(name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// A request body reqwest can send (it wants `Sync`; axum's body is only
/// `Send`). The mutex is never contended: polling has `&mut` access.
struct SyncBody(Mutex<Body>);

impl HttpBody for SyncBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let body = self.get_mut().0.get_mut().unwrap_or_else(PoisonError::into_inner);
        Pin::new(body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer s"),
            ("content-type", "application/json"),
            ("connection", "keep-alive, X-Private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("host", "us:8585"),
            ("expect", "100-continue"),
            ("content-length", "12"),
            ("uber-trace-id", "abc"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        h.append("uber-trace-id", HeaderValue::from_static("def"));
        let out = end_to_end(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["authorization", "content-type", "uber-trace-id"]);
        assert_eq!(out.get_all("uber-trace-id").iter().count(), 2);
    }

    #[test]
    fn failures_are_matrix_errors_a_worker_passes_on() {
        assert_eq!(failure(PassOutcome::Timeout).status, StatusCode::GATEWAY_TIMEOUT);
        for o in [PassOutcome::Unreachable, PassOutcome::NoWriter] {
            let e = failure(o);
            assert_eq!((e.status, e.errcode), (StatusCode::BAD_GATEWAY, "M_UNKNOWN"));
        }
    }
}
