//! `GET …/resync_queue?from=&limit=`: Synapse's stale marks, oldest first.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Response;

use super::Admin;
use crate::App;
use crate::error::MatrixError;
use crate::http::json_response;
use crate::http::params::QueryParams;

/// Marks per page unless `limit` says otherwise, and the most.
const DEFAULT_LIMIT: u64 = 100;
const MAX_LIMIT: u64 = 1000;

pub async fn queue(State(app): State<Arc<App>>, _admin: Admin, uri: Uri) -> Result<Response, MatrixError> {
    let params = QueryParams::parse(uri.query());
    let limit = params.non_negative_int("limit")?.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(MatrixError::invalid_param(format!("Query parameter limit must be between 1 and {MAX_LIMIT}")));
    }
    let limit = i64::try_from(limit).expect("at most MAX_LIMIT");
    let queue = crate::device_lists::queue(&app, params.first("from"), limit).await?;
    Ok(json_response(StatusCode::OK, &queue))
}
