//! `POST /_synapse/replication/multi_user_device_resync/{txn_id}`: Synapse's
//! replication endpoint, served for client_reader workers through the same
//! coordinator (so they get coalescing, the cache and the fallback), behind
//! the replication secret.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::json_response;
use crate::App;
use crate::error::MatrixError;
use crate::ids::{domain_of, is_valid_user_id};

pub async fn resync_rpc(
    State(app): State<Arc<App>>,
    Path(_txn_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    check_secret(app.config.synapse.worker_replication_secret.as_deref(), &headers)?;
    let body = body.map_err(|_| MatrixError::too_large())?;
    let users = parse_user_ids(&body)?;
    let deadline = Instant::now() + Duration::from_millis(app.config.worker.max_timeout_ms);
    // Results cached before a change the caller may already know of are dropped first.
    app.barrier.sync(&[]).await.map_err(MatrixError::unavailable)?;
    let looked_at = Instant::now();
    let mut out: Map<String, Value> = Map::new();
    let mut stream_pos: Option<Arc<RawValue>> = None;
    if let Some(first) = users.first() {
        let outcomes = app.remote.coordinator.resync(domain_of(first), &users, deadline, looked_at).await;
        for user in &users {
            let value = match outcomes.get(user) {
                Some(Ok(d)) => {
                    stream_pos = stream_pos.or_else(|| d.stream_pos.clone());
                    serde_json::from_str(d.raw.get()).unwrap_or(Value::Null)
                }
                _ => Value::Null,
            };
            out.insert(user.clone(), value);
        }
    }
    if let Some(pos) = stream_pos.and_then(|p| serde_json::from_str(p.get()).ok()) {
        out.insert("_INT_STREAM_POS".into(), pos);
    }
    Ok(json_response(StatusCode::OK, &out))
}

/// Exactly one `Authorization: Bearer <secret>`, compared in constant time.
/// Without a configured secret the endpoint serves nobody.
pub(super) fn check_secret(secret: Option<&str>, headers: &HeaderMap) -> Result<(), MatrixError> {
    let denied = || MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "Invalid or missing replication secret");
    let secret = secret.ok_or_else(denied)?;
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(denied());
    };
    let token = value.as_bytes().strip_prefix(b"Bearer ").ok_or_else(denied)?;
    if bool::from(token.ct_eq(secret.as_bytes())) { Ok(()) } else { Err(denied()) }
}

/// `{"user_ids": [...]}`, all valid user IDs of one server.
fn parse_user_ids(body: &[u8]) -> Result<Vec<String>, MatrixError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| MatrixError::not_json())?;
    let ids =
        value.get("user_ids").and_then(Value::as_array).ok_or_else(|| MatrixError::bad_json("'user_ids' must be a list of user IDs"))?;
    let users: Vec<String> = ids
        .iter()
        .map(|v| v.as_str().filter(|s| is_valid_user_id(s)).map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or_else(|| MatrixError::bad_json("'user_ids' must be a list of user IDs"))?;
    if let Some(first) = users.first()
        && users.iter().any(|u| domain_of(u) != domain_of(first))
    {
        return Err(MatrixError::bad_json("Only one origin permitted"));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn secret_required() {
        assert!(check_secret(Some("s3cret"), &headers(&["Bearer s3cret"])).is_ok());
        for bad in [&[][..], &["Bearer wrong"], &["Bearer s3cre"], &["s3cret"], &["Bearer s3cret", "Bearer s3cret"]] {
            assert_eq!(check_secret(Some("s3cret"), &headers(bad)).unwrap_err().status, StatusCode::UNAUTHORIZED);
        }
        assert!(check_secret(None, &headers(&["Bearer "])).is_err());
    }

    #[test]
    fn user_ids_validated() {
        assert_eq!(parse_user_ids(br#"{"user_ids": ["@a:r.org", "@b:r.org"]}"#).unwrap().len(), 2);
        assert_eq!(parse_user_ids(br#"{"user_ids": []}"#).unwrap().len(), 0);
        for bad in [&br#"{"user_ids": ["@a:r.org", "@b:s.org"]}"#[..], br#"{"user_ids": [1]}"#, br#"{}"#, br#"{"user_ids": ["x"]}"#] {
            assert_eq!(parse_user_ids(bad).unwrap_err().status, StatusCode::BAD_REQUEST);
        }
        assert_eq!(parse_user_ids(b"nope").unwrap_err().errcode, "M_NOT_JSON");
    }
}
