//! Why a federation request failed, and the `failures` entry Synapse would
//! write for it (`_exception_to_failure`).

use reqwest::StatusCode;
use serde_json::{Value, json};

#[derive(Debug, Clone, thiserror::Error)]
pub enum FedError {
    /// The destination is backing off.
    #[error("Not ready for retry")]
    NotReady,
    /// No signing key configured.
    #[error("federation is not configured (no signing_key_path)")]
    Disabled,
    #[error("destination {0} resolves only to blocked IP addresses")]
    Blocked(String),
    /// Could not connect, or no (complete) answer in time.
    #[error("Failed to send request: {0}")]
    Transport(String),
    /// The remote answered with an error status.
    #[error("{status}: {message}")]
    Http { status: u16, errcode: Option<String>, message: String },
    /// The remote answered 200 with something unusable.
    #[error("Invalid response from remote: {0}")]
    BadResponse(String),
}

impl FedError {
    pub fn from_reqwest(e: reqwest::Error) -> Self {
        // The innermost cause names the problem (DNS, refused, TLS, ...).
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        if e.is_timeout() {
            FedError::Transport(format!("TimeoutError: {cause}"))
        } else if e.is_connect() {
            FedError::Transport(format!("ConnectError: {cause}"))
        } else {
            FedError::Transport(cause.to_string())
        }
    }

    pub fn http(status: StatusCode, body: &[u8]) -> Self {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let errcode = parsed.as_ref().and_then(|v| v.get("errcode")).and_then(Value::as_str).map(str::to_owned);
        let message = status.canonical_reason().unwrap_or("Unknown").to_owned();
        FedError::Http { status: status.as_u16(), errcode, message }
    }

    /// Whether this failure says the destination is down (back off) rather
    /// than that it answered (a 4xx such as an unknown user).
    pub fn backs_off(&self) -> bool {
        match self {
            FedError::Transport(_) | FedError::BadResponse(_) => true,
            FedError::Http { status, .. } => *status >= 500 || *status == 429,
            FedError::NotReady | FedError::Disabled | FedError::Blocked(_) => false,
        }
    }

    /// The `failures[destination]` value. For an error status Synapse
    /// writes `{"status", "message": "<code>: <reason>"}` (its
    /// `HttpResponseException` carries no errcode), and so do we; the
    /// remote's errcode is kept for logs only.
    pub fn to_failure(&self) -> Value {
        match self {
            FedError::Http { status, .. } => json!({"status": status, "message": self.to_string()}),
            other => json!({"status": 503, "message": other.to_string()}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_shapes() {
        assert_eq!(FedError::NotReady.to_failure(), json!({"status": 503, "message": "Not ready for retry"}));
        let e = FedError::http(StatusCode::BAD_REQUEST, br#"{"errcode":"M_FORBIDDEN","error":"no"}"#);
        assert_eq!(e.to_failure(), json!({"status": 400, "message": "400: Bad Request"}));
        assert!(matches!(e, FedError::Http { errcode: Some(ref c), .. } if c == "M_FORBIDDEN"));
        assert!(!e.backs_off());
        let e = FedError::http(StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(e.to_failure(), json!({"status": 502, "message": "502: Bad Gateway"}));
        assert!(e.backs_off());
        let t = FedError::Transport("ConnectError: refused".into());
        assert_eq!(t.to_failure()["message"], "Failed to send request: ConnectError: refused");
    }
}
