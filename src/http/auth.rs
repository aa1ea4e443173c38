//! Who is asking: the access token from the request, checked the way
//! Synapse's `InternalAuth.get_user_by_req` checks it.

use axum::http::{HeaderMap, header};

use super::params::QueryParams;
use crate::error::MatrixError;
use crate::cache::Caches;
use crate::store::Store;

const INVALID_TOKEN: &str = "Invalid access token passed.";

#[derive(Debug, Clone, PartialEq)]
pub struct Requester {
    pub user_id: String,
    pub device_id: Option<String>,
    pub is_guest: bool,
}

/// `Authorization: Bearer <token>` or `?access_token=`, never both.
pub fn extract_token(headers: &HeaderMap, params: &QueryParams) -> Result<String, MatrixError> {
    let mut auth_headers = headers.get_all(header::AUTHORIZATION).iter();
    let query_token = params.first("access_token");
    match auth_headers.next() {
        Some(first) => {
            if query_token.is_some() {
                return Err(MatrixError::missing_token(
                    "Mixing Authorization headers and access_token query parameters.",
                ));
            }
            if auth_headers.next().is_some() {
                return Err(MatrixError::missing_token("Too many Authorization headers."));
            }
            let parts: Vec<&[u8]> = first.as_bytes().split(|b| *b == b' ').collect();
            match parts.as_slice() {
                [b"Bearer", token] => match std::str::from_utf8(token) {
                    Ok(t) if t.is_ascii() => Ok(t.to_owned()),
                    _ => Err(MatrixError::unknown_token(INVALID_TOKEN, false)),
                },
                _ => Err(MatrixError::missing_token("Invalid Authorization header.")),
            }
        }
        None => query_token
            .map(str::to_owned)
            .ok_or_else(|| MatrixError::missing_token("Missing access token")),
    }
}

/// The requester behind the token: unknown, expired (soft logout), locked
/// and deactivated accounts are refused; a puppeted token acts as the
/// puppeted user.
pub async fn authenticate(
    store: &Store,
    caches: &Caches,
    headers: &HeaderMap,
    params: &QueryParams,
    now_ms: i64,
) -> Result<Requester, MatrixError> {
    let token = extract_token(headers, params)?;
    // Synapse then tries the token as a guest macaroon; for anything that
    // is not one, this is its answer.
    let Some(row) = caches.token(store, &token).await? else {
        return Err(MatrixError::unknown_token(INVALID_TOKEN, false));
    };
    if row.valid_until_ms.is_some_and(|until| until < now_ms) {
        return Err(MatrixError::unknown_token("Access token has expired", true));
    }
    if row.locked {
        return Err(MatrixError::user_locked());
    }
    // Synapse deletes a deactivated user's tokens; one left over is refused.
    if row.deactivated {
        return Err(MatrixError::unknown_token(INVALID_TOKEN, false));
    }
    Ok(Requester { user_id: row.user_id.clone(), device_id: row.device_id.clone(), is_guest: row.is_guest })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn token(auth: &[&str], query: &str) -> Result<String, (&'static str, String)> {
        let mut h = HeaderMap::new();
        for a in auth {
            h.append(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        extract_token(&h, &QueryParams::parse(Some(query))).map_err(|e| (e.errcode, e.message))
    }

    #[test]
    fn token_sources() {
        assert_eq!(token(&["Bearer abc"], ""), Ok("abc".into()));
        assert_eq!(token(&[], "access_token=xyz&access_token=2"), Ok("xyz".into()));
        assert_eq!(token(&[], "access_token="), Ok("".into()));
        assert_eq!(token(&[], "").unwrap_err().0, "M_MISSING_TOKEN");
        assert_eq!(token(&["Bearer a"], "access_token=b").unwrap_err().0, "M_MISSING_TOKEN");
        assert_eq!(token(&["Bearer a", "Bearer b"], "").unwrap_err().0, "M_MISSING_TOKEN");
        for bad in ["Basic abc", "Bearer", "Bearer  abc", "bearer abc", "Bearer a b"] {
            assert_eq!(token(&[bad], "").unwrap_err().0, "M_MISSING_TOKEN", "{bad}");
        }
    }
}
