//! Why a federation request failed, and the `failures` entry Synapse would
//! write for it (`_exception_to_failure`).

use reqwest::StatusCode;
use serde_json::{Value, json};

#[derive(Debug, Clone, thiserror::Error)]
pub enum FedError {
    /// We are backing off from the destination: the failure that started
    /// it, answered again instead of retrying.
    #[error("{0}")]
    BackingOff(Box<FedError>),
    /// No signing key configured.
    #[error("federation is not configured (no signing_key_path)")]
    Disabled,
    /// Not in `federation_domain_whitelist`: Synapse's `FederationDeniedError`.
    #[error("403: Federation denied with {0}.")]
    Denied(String),
    /// Could not connect, no (complete) answer in time, or (as Synapse
    /// counts them) a 5xx or 429 answer: Synapse's `RequestSendFailed`.
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
            if let Some(dns) = next.downcast_ref::<super::dns::ResolveError>() {
                return FedError::Transport(format!("DNSLookupError: {dns}"));
            }
            cause = next;
        }
        let refused = cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        if refused {
            // Twisted's `ConnectionRefusedError`, as Synapse words it.
            return FedError::Transport("ConnectionRefusedError: Connection was refused by other side: 111: Connection refused.".into());
        }
        if e.is_timeout() {
            FedError::Transport(format!("TimeoutError: {cause}"))
        } else if e.is_connect() {
            FedError::Transport(format!("ConnectError: {cause}"))
        } else {
            FedError::Transport(cause.to_string())
        }
    }

    /// An error status. Synapse retries 5xx and 429 and reports them as a
    /// failure to send (`HttpResponseException` inside `RequestSendFailed`);
    /// other statuses are the remote's answer.
    pub fn http(status: StatusCode, body: &[u8]) -> Self {
        let reason = status.canonical_reason().unwrap_or("Unknown");
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return FedError::Transport(format!("HttpResponseException: {}: {reason}", status.as_u16()));
        }
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let errcode = parsed.as_ref().and_then(|v| v.get("errcode")).and_then(Value::as_str).map(str::to_owned);
        FedError::Http { status: status.as_u16(), errcode, message: reason.to_owned() }
    }

    /// No answer within `timeout`, worded as Synapse's
    /// `TimeoutError("Timed out after %gs")`.
    pub fn timed_out(timeout: std::time::Duration) -> Self {
        FedError::Transport(format!("TimeoutError: Timed out after {}s", python_g(timeout.as_secs_f64())))
    }

    /// No answer in time (from [`Self::timed_out`] or the HTTP client).
    pub fn is_timeout(&self) -> bool {
        matches!(self, FedError::Transport(m) if m.starts_with("TimeoutError"))
    }

    /// Whether this failure says the destination is down (back off) rather
    /// than that it answered (a 4xx such as an unknown user).
    pub fn backs_off(&self) -> bool {
        match self {
            FedError::Transport(_) | FedError::BadResponse(_) => true,
            // 5xx and 429 are `Transport` (see `http`): an `Http` error is
            // the remote's answer.
            FedError::Http { .. } | FedError::BackingOff(_) | FedError::Disabled | FedError::Denied(_) => false,
        }
    }

    /// The `failures[destination]` value. For an error status Synapse
    /// writes `{"status", "message": "<code>: <reason>"}` (its
    /// `HttpResponseException` carries no errcode), and so do we; the
    /// remote's errcode is kept for logs only.
    pub fn to_failure(&self) -> Value {
        match self {
            FedError::BackingOff(first) => first.to_failure(),
            FedError::Denied(_) => json!({"status": 403, "errcode": "M_FORBIDDEN", "message": self.to_string()}),
            FedError::Http { status, .. } => json!({"status": status, "message": self.to_string()}),
            other => json!({"status": 503, "message": other.to_string()}),
        }
    }
}

/// Python's `"%g" % x`: six significant digits, trailing zeros dropped,
/// exponent form outside 1e-4 ..= 1e6.
fn python_g(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let exp = x.abs().log10().floor() as i32;
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_owned() } else { s };
    if !(-4..6).contains(&exp) {
        let mantissa = trim(format!("{:.5}", x / 10f64.powi(exp)));
        return format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let decimals = usize::try_from(5 - exp).unwrap_or(0);
    trim(format!("{x:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_shapes() {
        let t = FedError::timed_out(std::time::Duration::from_millis(1500));
        assert_eq!(t.to_failure(), json!({"status": 503, "message": "Failed to send request: TimeoutError: Timed out after 1.5s"}));
        assert_eq!(FedError::BackingOff(Box::new(t.clone())).to_failure(), t.to_failure());
        assert!(!FedError::BackingOff(Box::new(t)).backs_off());
        let e = FedError::http(StatusCode::BAD_REQUEST, br#"{"errcode":"M_FORBIDDEN","error":"no"}"#);
        assert_eq!(e.to_failure(), json!({"status": 400, "message": "400: Bad Request"}));
        assert!(matches!(e, FedError::Http { errcode: Some(ref c), .. } if c == "M_FORBIDDEN"));
        assert!(!e.backs_off());
        let e = FedError::http(StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(e.to_failure(), json!({"status": 503, "message": "Failed to send request: HttpResponseException: 502: Bad Gateway"}));
        assert!(e.backs_off());
        let e = FedError::http(StatusCode::TOO_MANY_REQUESTS, b"{}");
        assert_eq!(e.to_failure()["message"], "Failed to send request: HttpResponseException: 429: Too Many Requests");
        assert_eq!(
            FedError::Denied("x.org".into()).to_failure(),
            json!({"status": 403, "errcode": "M_FORBIDDEN", "message": "403: Federation denied with x.org."})
        );
        let t = FedError::Transport("ConnectError: refused".into());
        assert_eq!(t.to_failure()["message"], "Failed to send request: ConnectError: refused");
    }
}

#[cfg(test)]
mod g_tests {
    #[test]
    fn python_percent_g() {
        for (x, want) in [
            (10.0, "10"),
            (1.5, "1.5"),
            (0.001, "0.001"),
            (60.0, "60"),
            (123456.0, "123456"),
            (1234567.0, "1.23457e+06"),
            (0.00001, "1e-05"),
            (2.25, "2.25"),
        ] {
            assert_eq!(super::python_g(x), want, "{x}");
        }
    }
}
