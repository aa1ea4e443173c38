//! The one error type of the HTTP surface: a Matrix error response
//! (`{"errcode": "M_…", "error": "…"}` plus optional extra fields).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::device_lists::HealthError;
use crate::keys::KeysError;

#[derive(Debug, Clone, PartialEq)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// Extra top-level fields, such as `soft_logout` or `retry_after_ms`.
    pub extra: Map<String, Value>,
}

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self { status, errcode, message: message.into(), extra: Map::new() }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn missing_token(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", message)
    }

    /// Synapse always sends `soft_logout` with `M_UNKNOWN_TOKEN`.
    pub fn unknown_token(message: impl Into<String>, soft_logout: bool) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", message).with("soft_logout", soft_logout)
    }

    pub fn user_locked() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_USER_LOCKED", "User account has been locked").with("soft_logout", true)
    }

    pub fn not_json() -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", "Content not JSON.")
    }

    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", message)
    }

    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", message)
    }

    pub fn too_large() -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", "Request content is too large")
    }

    /// 429 with `retry_after_ms` (and a `Retry-After` header).
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", "Too many requests").with("retry_after_ms", retry_after_ms)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Unrecognized request")
    }

    /// An internal failure: logged with its cause, answered without details.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "Internal server error")
    }

    /// A dependency (the database) is unavailable: 503, so proxies may retry.
    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "dependency unavailable");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "Service temporarily unavailable")
    }

    pub fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("errcode".into(), self.errcode.into());
        body.insert("error".into(), self.message.clone().into());
        for (k, v) in &self.extra {
            body.insert(k.clone(), v.clone());
        }
        Value::Object(body)
    }
}

impl std::fmt::Display for MatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.errcode, self.message)
    }
}

impl std::error::Error for MatrixError {}

impl From<sqlx::Error> for MatrixError {
    /// The database being away (connection lost or refused, pool exhausted,
    /// statement cancelled or timed out, server shutting down) is a 503 the
    /// client may retry; anything else is our bug: 500.
    fn from(e: sqlx::Error) -> Self {
        if crate::store::is_unavailable(&e) { Self::unavailable(e) } else { Self::internal(e) }
    }
}

impl From<KeysError> for MatrixError {
    fn from(e: KeysError) -> Self {
        match e {
            KeysError::NotJson => Self::not_json(),
            KeysError::BadJson(message) => Self::bad_json(message),
            KeysError::Unavailable(cause) => Self::unavailable(cause),
            KeysError::Internal(cause) => Self::internal(cause),
        }
    }
}

impl From<HealthError> for MatrixError {
    fn from(e: HealthError) -> Self {
        match e {
            HealthError::BadRequest(m) => Self::invalid_param(m),
            HealthError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", m),
            HealthError::Conflict(m) => Self::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", m),
            HealthError::Refused(m) => Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", m),
            HealthError::WriterUnavailable(m) => {
                tracing::warn!(error = %m, "device-list repair: writer unavailable");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", m)
            }
            HealthError::Database(e) => e.into(),
            HealthError::Keys(e) => e.into(),
        }
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.body().to_string()).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(ms) = self.extra.get("retry_after_ms").and_then(Value::as_u64) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
        }
        resp
    }
}
