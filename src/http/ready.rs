//! `GET /ready`: 200 only when the database answers with a Synapse schema
//! we can read; the body says how the database (its schema version and
//! whether we test it), the replication stream and the device-lists writer
//! are doing (a failing database in a few words; its error is logged).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::json_response;
use crate::{App, schema_window};

pub async fn ready(State(app): State<Arc<App>>) -> Response {
    let db = tokio::time::timeout(Duration::from_secs(2), app.store.ping()).await;
    let (db_ok, db_error) = match db {
        Ok(Ok(())) => (true, None),
        Ok(Err(e)) => {
            // The detail (it can name hosts and roles) goes to the log only.
            tracing::warn!(error = %e, "readiness check: the database failed");
            (false, Some(crate::store::short_reason(&e)))
        }
        Err(_) => (false, Some("no answer within 2s")),
    };
    // Re-read at every probe: Synapse may have been upgraded under us.
    let verdict = if db_ok { app.schema.check(&app.store).await.ok().map(|(v, _)| v) } else { None };
    let schema = app.schema.last().map(|(s, v)| {
        json!({
            "version": s.version,
            "compat_version": s.compat_version,
            "window": v.as_str(),
            "tested": format!("{} (schema {} to {})", schema_window::RELEASES, schema_window::OLDEST, schema_window::NEWEST),
        })
    });
    let ok = db_ok && verdict != Some(schema_window::Verdict::Refused);
    let r = &app.replication;
    let last = r.last_seen_ms();
    let body = json!({
        "database": {"ok": db_ok, "backend": app.store.backend(), "error": db_error, "schema": schema},
        "replication": {
            "mode": r.mode(),
            "connected": r.connected(),
            "caught_up": r.caught_up(),
            "caches_trusted": app.caches.trusted(),
            "reconnects": r.reconnects(),
            "last_seen_ms_ago": (last > 0).then(|| crate::now_ms() - last),
        },
        "writer": {"breaker": if app.remote.coordinator.writer_breaker_open() { "open" } else { "closed" }},
    });
    json_response(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}
