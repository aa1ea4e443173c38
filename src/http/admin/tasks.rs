//! `POST …/destinations/{serverName}/device_list/resync` (start repairing
//! a server) and `GET …/tasks/{taskId}` (its progress).

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::Response;

use super::device_list::timeout;
use super::{Admin, path_param};
use crate::App;
use crate::error::MatrixError;
use crate::http::json_response;
use crate::http::params::QueryParams;

pub async fn repair_server(
    State(app): State<Arc<App>>,
    admin: Admin,
    server_name: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Response, MatrixError> {
    let server_name = path_param(server_name, "server name")?;
    let wait = timeout(&app, &QueryParams::parse(uri.query()))?;
    let started = crate::device_lists::repair_server(&app, &server_name, wait, &admin.user_id).await?;
    Ok(json_response(StatusCode::OK, &started))
}

pub async fn task(
    State(app): State<Arc<App>>,
    _admin: Admin,
    task_id: Result<Path<String>, PathRejection>,
) -> Result<Response, MatrixError> {
    let task_id = path_param(task_id, "task ID")?;
    let task = app.device_list_tasks.get(&task_id).ok_or_else(|| {
        MatrixError::new(
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            format!("No task {task_id} (tasks are kept a day, by the replica that ran them)"),
        )
    })?;
    Ok(json_response(StatusCode::OK, &task.status()))
}
