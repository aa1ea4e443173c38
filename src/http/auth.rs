//! Who is asking: the access token from the request, checked the way
//! Synapse's `InternalAuth.get_user_by_req` checks it, or, with delegated
//! auth, `MasDelegatedAuth.get_user_by_req`.

use axum::Extension;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, header};
use std::net::SocketAddr;

use super::params::QueryParams;
use crate::error::MatrixError;
use std::net::IpAddr;

use axum::http::StatusCode;
use subtle::ConstantTimeEq;

use crate::App;
use crate::config::appservice::AppService;
use crate::mas::{MasClient, Rejection};
use crate::store::Store;

const INVALID_TOKEN: &str = "Invalid access token passed.";

#[derive(Debug, Clone, PartialEq)]
pub struct Requester {
    pub user_id: String,
    pub device_id: Option<String>,
    pub is_guest: bool,
    /// Authentication waited for the read barrier (MAS, to check the
    /// device): the caches are already as fresh as the request needs.
    pub caught_up: bool,
    /// Delegated auth: the token's scope grants Synapse's admin API
    /// (`urn:synapse:admin:*`), which is what makes a server admin there.
    pub admin_scope: bool,
}

/// `Authorization: Bearer <token>` or `?access_token=`, never both.
pub fn extract_token(headers: &HeaderMap, params: &QueryParams) -> Result<String, MatrixError> {
    let mut auth_headers = headers.get_all(header::AUTHORIZATION).iter();
    let query_token = params.first("access_token");
    match auth_headers.next() {
        Some(first) => {
            if query_token.is_some() {
                return Err(MatrixError::missing_token("Mixing Authorization headers and access_token query parameters."));
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
        // Synapse fails to decode a non-ASCII token (a 500); it can be no token.
        None => match query_token {
            Some(t) if t.is_ascii() => Ok(t.to_owned()),
            Some(_) => Err(MatrixError::unknown_token(INVALID_TOKEN, false)),
            None => Err(MatrixError::missing_token("Missing access token")),
        },
    }
}

/// The requester behind the token: an application service (acting as its
/// sender or, with `?user_id=`, a user of its namespace), else a user's
/// token, where unknown and expired tokens (soft logout), locked accounts
/// and, with `account_validity` on, expired accounts are refused, and a
/// puppeted token acts as the puppeted user. As in Synapse, deactivation
/// itself is not checked: it deletes the user's own tokens, and an admin's
/// puppet token for the user keeps working.
pub async fn authenticate(
    app: &App,
    headers: &HeaderMap,
    params: &QueryParams,
    client_ip: Option<IpAddr>,
    now_ms: i64,
) -> Result<Requester, MatrixError> {
    let (store, caches) = (&app.store, &app.caches);
    let token = extract_token(headers, params)?;
    if let Some(service) = app_service_for(&app.config.synapse.app_services, &token, client_ip) {
        return app_service_requester(store, service, params).await;
    }
    if let Some(mas) = &app.mas {
        return mas_requester(app, mas, &token).await;
    }
    // Synapse then tries the token as a guest macaroon; for anything that
    // is not one, this is its answer.
    let Some(row) = caches.token(store, &token).await? else {
        return guest_requester(app, &token, now_ms).await;
    };
    if row.valid_until_ms.is_some_and(|until| until < now_ms) {
        return Err(MatrixError::unknown_token("Access token has expired", true));
    }
    if row.locked {
        return Err(MatrixError::user_locked());
    }
    check_account_validity(app, row.expiration_ts, now_ms)?;
    Ok(Requester {
        user_id: row.user_id.clone(),
        device_id: row.device_id.clone(),
        is_guest: row.is_guest,
        caught_up: false,
        admin_scope: false,
    })
}

/// Delegated auth (Synapse's `MasDelegatedAuth.get_user_by_access_token`):
/// MAS's answer, the user it names, and its device, which must still exist.
/// A device deleted before the request arrived is seen as deleted (the read
/// barrier), without a database read while the user's devices are cached.
async fn mas_requester(app: &App, mas: &MasClient, token: &str) -> Result<Requester, MatrixError> {
    let answer = mas
        .introspect(token)
        .await
        .map_err(|_| MatrixError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "Unable to introspect the access token"))?;
    // Synapse reads the clock once the answer is in.
    let localpart = answer.localpart(crate::now_ms()).map_err(rejected)?;
    let user_id = format!("@{localpart}:{}", app.config.synapse.server_name);
    // No such user can exist (and PostgreSQL refuses NUL in text).
    if user_id.contains('\0') || !app.caches.user_exists(&app.store, &user_id).await? {
        return Err(rejected(Rejection::UnknownUser));
    }
    let device_id = answer.device().map_err(rejected)?.map(str::to_owned);
    let caught_up = device_id.is_some();
    let admin_scope = answer.scopes().contains(crate::mas::ADMIN_SCOPE);
    if let Some(device) = &device_id {
        app.barrier.sync(&[]).await.map_err(MatrixError::unavailable)?;
        if device.contains('\0') || !app.caches.device_exists(&app.store, &user_id, device).await? {
            mas.forget(token).await;
            return Err(rejected(Rejection::Inactive));
        }
    }
    Ok(Requester { user_id, device_id, is_guest: false, caught_up, admin_scope })
}

/// Synapse's answer to each refusal: the client's token (401), or a fault
/// of the auth server (500 `M_FORBIDDEN`, as its `AuthError(500, …)`).
fn rejected(why: Rejection) -> MatrixError {
    match why {
        Rejection::Inactive | Rejection::NoApiScope => MatrixError::unknown_token(why.to_string(), false),
        _ => MatrixError::new(StatusCode::INTERNAL_SERVER_ERROR, "M_FORBIDDEN", why.to_string()),
    }
}

/// A token not in the database may be a guest's macaroon (Synapse's
/// `get_user_by_access_token`, second half).
async fn guest_requester(app: &App, token: &str, now_ms: i64) -> Result<Requester, MatrixError> {
    let user_id = app
        .config
        .synapse
        .macaroon_secret
        .as_deref()
        .and_then(|secret| crate::guest::verify_guest_token(token, secret, now_ms))
        .ok_or_else(|| MatrixError::unknown_token(INVALID_TOKEN, false))?;
    match app.store.guest_status(&user_id).await? {
        None => Err(MatrixError::unknown_token(format!("Unknown user_id {user_id}"), false)),
        Some((false, _, _)) => Err(MatrixError::unknown_token("Guest access token used for regular user", false)),
        Some((true, true, _)) => Err(MatrixError::user_locked()),
        Some((true, false, expiration_ts)) => {
            check_account_validity(app, expiration_ts, now_ms)?;
            Ok(Requester { user_id, device_id: Some("guest_device".into()), is_guest: true, caught_up: false, admin_scope: false })
        }
    }
}

/// The legacy `account_validity` check (`is_account_expired`), done for
/// users and guests, not application services.
fn check_account_validity(app: &App, expiration_ts: Option<i64>, now_ms: i64) -> Result<(), MatrixError> {
    if app.config.synapse.account_validity_enabled && expiration_ts.is_some_and(|ts| now_ms >= ts) {
        return Err(MatrixError::new(StatusCode::FORBIDDEN, "ORG_MATRIX_EXPIRED_ACCOUNT", "User account has expired"));
    }
    Ok(())
}

/// The registration whose `as_token` this is, if the client address is one
/// it allows.
fn app_service_for<'a>(services: &'a [AppService], token: &str, client_ip: Option<IpAddr>) -> Option<&'a AppService> {
    let service = services.iter().find(|s| bool::from(s.as_token.as_bytes().ct_eq(token.as_bytes())))?;
    match (&service.ip_range_whitelist, client_ip) {
        (None, _) => Some(service),
        (Some(ranges), Some(ip)) if ranges.iter().any(|r| r.contains(&ip)) => Some(service),
        _ => None,
    }
}

/// Synapse's `get_appservice_user`.
async fn app_service_requester(store: &Store, service: &AppService, params: &QueryParams) -> Result<Requester, MatrixError> {
    let user_id = match params.first("user_id") {
        None => service.sender.clone(),
        Some(uid) if uid == service.sender => uid.to_owned(),
        Some(uid) if !service.is_interested_in_user(uid) => {
            return Err(MatrixError::new(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                format!("Application service cannot masquerade as this user ({uid})."),
            ));
        }
        Some(uid) if !store.user_exists(uid).await? => {
            return Err(MatrixError::new(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                format!("Application service has not registered this user ({uid})"),
            ));
        }
        Some(uid) => uid.to_owned(),
    };
    let device_id = match params.first("device_id") {
        Some(d) if !store.device_exists(&user_id, d).await? => {
            return Err(MatrixError::new(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN_DEVICE",
                format!("Application service trying to use a device that doesn't exist ('{d}' for {user_id})"),
            ));
        }
        Some(d) => Some(d.to_owned()),
        None => None,
    };
    Ok(Requester { user_id, device_id, is_guest: false, caught_up: false, admin_scope: false })
}

/// The client's address: with `x_forwarded` on, the first `X-Forwarded-For`
/// entry when there is one (as Synapse's `XForwardedForRequest`), else the
/// peer.
pub fn client_ip(headers: &HeaderMap, peer: Option<Extension<ConnectInfo<SocketAddr>>>, x_forwarded: bool) -> Option<IpAddr> {
    let forwarded = || {
        let first = headers.get("x-forwarded-for")?.to_str().ok()?.split(',').next()?;
        first.trim().parse().ok()
    };
    x_forwarded.then(forwarded).flatten().or(peer.map(|Extension(ConnectInfo(addr))| addr.ip()))
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
        assert_eq!(token(&[], "access_token=%C3%A9").unwrap_err().0, "M_UNKNOWN_TOKEN");
        assert_eq!(token(&[], "").unwrap_err().0, "M_MISSING_TOKEN");
        assert_eq!(token(&["Bearer a"], "access_token=b").unwrap_err().0, "M_MISSING_TOKEN");
        assert_eq!(token(&["Bearer a", "Bearer b"], "").unwrap_err().0, "M_MISSING_TOKEN");
        for bad in ["Basic abc", "Bearer", "Bearer  abc", "bearer abc", "Bearer a b"] {
            assert_eq!(token(&[bad], "").unwrap_err().0, "M_MISSING_TOKEN", "{bad}");
        }
    }
}
