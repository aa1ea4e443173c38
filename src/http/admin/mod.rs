//! The device-list health API, `/_keys_worker/admin/v1/`: one prefix a
//! reverse proxy can route. Only Synapse's server admins may call it,
//! decided as Synapse's admin API decides (`assert_user_is_admin`):
//! `users.admin` under Synapse's own tokens, the `urn:synapse:admin:*`
//! scope under MAS; guests never. Every call is logged with who made it
//! (never a token, never the query string). The handlers are thin: the
//! work is [`crate::device_lists`]'.

mod device_list;
mod explain;
mod queue;
mod tasks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::{MethodRouter, get, post};

use super::auth::{authenticate, client_ip};
use super::params::QueryParams;
use super::within;
use crate::App;
use crate::error::MatrixError;

/// The API's routes (see `http::route_table`).
pub fn route_table() -> Vec<(Method, &'static str, MethodRouter<Arc<App>>)> {
    vec![
        (Method::GET, "/_keys_worker/admin/v1/users/{user_id}/device_list", get(device_list::inspect)),
        (Method::POST, "/_keys_worker/admin/v1/users/{user_id}/device_list/resync", post(device_list::repair)),
        (Method::GET, "/_keys_worker/admin/v1/resync_queue", get(queue::queue)),
        (Method::POST, "/_keys_worker/admin/v1/keys/query/explain", post(explain::explain)),
        (Method::POST, "/_keys_worker/admin/v1/destinations/{server_name}/device_list/resync", post(tasks::repair_server)),
        (Method::GET, "/_keys_worker/admin/v1/tasks/{task_id}", get(tasks::task)),
    ]
}

/// A path parameter, or 400 naming `what` it should have been.
fn path_param(
    param: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    what: &str,
) -> Result<String, MatrixError> {
    param.map(|axum::extract::Path(p)| p).map_err(|e| MatrixError::invalid_param(format!("Invalid {what} in the path: {e}")))
}

/// A server admin of this homeserver made the request.
#[derive(Debug)]
pub struct Admin {
    pub user_id: String,
}

impl FromRequestParts<Arc<App>> for Admin {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, MatrixError> {
        let params = QueryParams::parse(parts.uri.query());
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().cloned().map(Extension);
        let ip = client_ip(&parts.headers, peer, app.config.worker.x_forwarded);
        let (method, path) = (&parts.method, parts.uri.path());
        let mas_wait = Duration::from_millis(if app.mas.is_some() { app.config.worker.mas_timeout_ms } else { 0 });
        let budget = app.config.worker.db_step_budget().map(|b| b * 2 + mas_wait);
        let mut who = None;
        let decided = within(budget, admin_of(app, &parts.headers, &params, ip, &mut who)).await;
        let who = who.as_deref().unwrap_or("-");
        match decided {
            Ok(()) => {
                tracing::info!(admin = who, %method, path, "admin API call");
                Ok(Admin { user_id: who.to_owned() })
            }
            Err(e) => {
                tracing::warn!(user = who, %method, path, errcode = e.errcode, "admin API call refused");
                Err(e)
            }
        }
    }
}

/// Synapse's `get_user_by_req` (guests refused) then `assert_user_is_admin`;
/// `who` is set once the requester is known.
async fn admin_of(
    app: &App,
    headers: &HeaderMap,
    params: &QueryParams,
    ip: Option<std::net::IpAddr>,
    who: &mut Option<String>,
) -> Result<(), MatrixError> {
    let requester = authenticate(app, headers, params, ip, crate::now_ms()).await?;
    *who = Some(requester.user_id.clone());
    if requester.is_guest {
        return Err(MatrixError::new(StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN", "Guest access not allowed"));
    }
    let is_admin = match &app.mas {
        Some(_) => requester.admin_scope,
        None => app.store.is_server_admin(&requester.user_id).await?,
    };
    if !is_admin {
        return Err(MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "You are not a server admin"));
    }
    Ok(())
}
