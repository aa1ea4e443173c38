//! `GET …/users/{userId}/device_list` (inspect, `?check=true` asks the
//! remote too, within `?timeout_ms`) and `POST …/device_list/resync`
//! (repair).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::Response;

use super::{Admin, path_param};
use crate::App;
use crate::device_lists::stats::Trigger;
use crate::error::MatrixError;
use crate::http::json_response;
use crate::http::params::QueryParams;

pub async fn inspect(
    State(app): State<Arc<App>>,
    _admin: Admin,
    user_id: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Response, MatrixError> {
    let params = QueryParams::parse(uri.query());
    let check = params.boolean("check", false)?.then(|| timeout(&app, &params)).transpose()?;
    let inspection = crate::device_lists::inspect(&app, &path_param(user_id, "user ID")?, check).await?;
    Ok(json_response(StatusCode::OK, &inspection))
}

pub async fn repair(
    State(app): State<Arc<App>>,
    admin: Admin,
    user_id: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Response, MatrixError> {
    let wait = timeout(&app, &QueryParams::parse(uri.query()))?;
    let repair = crate::device_lists::repair(&app, &path_param(user_id, "user ID")?, wait, Trigger::Admin(&admin.user_id)).await?;
    Ok(json_response(StatusCode::OK, &repair))
}

/// `?timeout_ms=`: how long the remote (or the writer asking it) may take;
/// the service's default `/keys/query` timeout when absent, at most its
/// longest.
pub(super) fn timeout(app: &App, params: &QueryParams) -> Result<Duration, MatrixError> {
    Ok(app.config.worker.query_timeout(params.non_negative_int("timeout_ms")?))
}
