//! `POST …/keys/query/explain` with `{"requester": "@user:ourserver",
//! "query": <a /keys/query body>}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;

use super::Admin;
use crate::App;
use crate::error::MatrixError;
use crate::http::{json_response, read_body};

pub async fn explain(State(app): State<Arc<App>>, _admin: Admin, body: Result<Bytes, BytesRejection>) -> Result<Response, MatrixError> {
    let body = read_body(body)?;
    let body: Value = serde_json::from_slice(&body).map_err(|_| MatrixError::not_json())?;
    let requester = body.get("requester").and_then(Value::as_str).ok_or_else(|| MatrixError::bad_json("'requester' must be a user ID"))?;
    let query = body.get("query").filter(|q| q.is_object()).ok_or_else(|| MatrixError::bad_json("'query' must be a /keys/query body"))?;
    let query = serde_json::to_vec(query).expect("a JSON value serialises");
    let explanation = crate::device_lists::explain(&app, requester, &query).await?;
    Ok(json_response(StatusCode::OK, &explanation))
}
