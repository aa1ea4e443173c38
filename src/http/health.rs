//! `GET /health`: liveness, answered like Synapse's `HealthResource`.

use axum::http::header;
use axum::response::IntoResponse;

pub async fn health() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain")], "OK")
}
