//! `POST /_matrix/client/{r0,v3,unstable}/keys/query`: authenticate, parse,
//! take one of the device's request slots, hand over to [`crate::keys`],
//! serialise. Errors come out in Synapse's order: body too large, then
//! auth, then `timeout`, then the body's shape.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::auth::{authenticate, client_ip};
use super::params::QueryParams;
use super::{json_response, read_body, within};
use crate::App;
use crate::error::MatrixError;
use crate::keys::{KeysQuery, query_keys};

pub async fn keys_query(
    State(app): State<Arc<App>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MatrixError> {
    let arrived = std::time::Instant::now();
    let body = read_body(body)?;
    let params = QueryParams::parse(uri.query());
    let now = crate::now_ms();
    // Nothing behind us may hold a request: the database gets its statement
    // budget per step, the remote part the client's timeout on top.
    let db_budget = app.config.worker.db_step_budget();
    // Under delegated auth, authentication also waits for MAS (bounded by
    // its own timeout, which gives MAS's failure its own answer).
    let mas_wait = Duration::from_millis(if app.mas.is_some() { app.config.worker.mas_timeout_ms } else { 0 });
    let requester = within(
        db_budget.map(|b| b + mas_wait),
        authenticate(&app, &headers, &params, client_ip(&headers, peer, app.config.worker.x_forwarded), now),
    )
    .await?;
    let query_timeout = params.non_negative_int("timeout")?;
    let mut query = KeysQuery::parse(&body)?;
    query.timeout = app.config.worker.query_timeout(query_timeout.or(query.body_timeout_ms));
    query.arrived = arrived;
    query.caught_up = requester.caught_up;
    let _slot = app.limiter.acquire(&requester.user_id, requester.device_id.as_deref()).await?;
    if app.config.synapse.msc4263_limit_key_queries_to_users_who_share_rooms {
        within(db_budget, async { Ok(query.keep_users_sharing_a_room_with(&*app, &requester.user_id).await?) }).await?;
    }
    let answer =
        within(db_budget.map(|b| b + query.timeout), async { Ok(query_keys(&*app, &requester.user_id, &query, now).await?) }).await?;
    Ok(json_response(StatusCode::OK, &answer))
}
