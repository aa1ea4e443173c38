//! `POST …/users/{userId}/device_list/resync`: Synapse's stale mark, then
//! its device-lists writer's resync. The writer's resync alone answers from
//! Synapse's cache for a user it holds unmarked
//! (`_user_device_resync_returning_failed`); with the mark it refetches the
//! list from the remote, rewrites its cache, deletes the mark and tells
//! clients through `/sync`, as for any resync it makes.

use std::time::Duration;

use serde::Serialize;

use super::inspect::synapse_view;
use super::stats::Trigger;
use super::view::{Drift, ListSummary};
use super::{HealthError, remote_user};
use crate::App;
use crate::resync::writer::WriterError;
use crate::store::StaleMarker;

/// The stale-mark writer, when repair is on and possible.
pub(super) fn repair_allowed(app: &App) -> Result<StaleMarker, HealthError> {
    if !app.config.worker.device_list_repair {
        return Err(HealthError::Refused(
            "Device-list repair is off: set keys_worker.device_list_repair: true to let this service write Synapse's stale marks \
             (see docs/device-lists.md)"
                .into(),
        ));
    }
    app.store
        .stale_marker()
        .ok_or_else(|| HealthError::Refused("Device-list repair needs Synapse on PostgreSQL: its SQLite file is never written".into()))
}

/// What a repair did.
#[derive(Debug, Serialize)]
pub struct Repair {
    pub user_id: String,
    /// The stale mark was written by this call (false: Synapse had one).
    pub marked: bool,
    /// The writer gave the remote's list, and Synapse now holds it.
    pub repaired: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Synapse's cache before and after.
    pub before: ListSummary,
    pub after: ListSummary,
    /// How the list before differs from the list after (`missing_devices`:
    /// added by the repair, `extra_devices`: removed by it).
    pub diff: Drift,
}

/// Marks `user_id`'s list stale in Synapse and has the writer resync it,
/// waiting `timeout` for the writer at most; `trigger`: who asked (logged
/// and counted).
pub async fn repair(app: &App, user_id: &str, timeout: Duration, trigger: Trigger<'_>) -> Result<Repair, HealthError> {
    let result = repair_once(app, user_id, timeout, trigger).await;
    let outcome = match &result {
        Ok(r) if !r.repaired => "failed",
        Ok(r) if r.diff.any() => "repaired",
        Ok(_) => "unchanged",
        Err(HealthError::WriterUnavailable(_)) => "writer_unavailable",
        Err(_) => return result,
    };
    app.device_list_stats.repaired(trigger, outcome);
    result
}

async fn repair_once(app: &App, user_id: &str, timeout: Duration, trigger: Trigger<'_>) -> Result<Repair, HealthError> {
    let marker = repair_allowed(app)?;
    let server = remote_user(&app.config.synapse.server_name, user_id)?;
    if !app.remote.federation.is_domain_allowed(server) {
        // Synapse never resyncs from it (`FederationDeniedError`), and would
        // keep the mark for good, no longer answering from its copy.
        return Err(HealthError::BadRequest(format!("{server} is not in federation_domain_whitelist: Synapse would never resync it")));
    }
    let state = app.store.remote_list_state(user_id).await?;
    if state.stream_id.is_none() && state.shared_rooms == 0 {
        return Err(HealthError::NotFound(format!("Synapse does not track {user_id}'s device list and shares no room with them")));
    }
    let before = synapse_view(app, user_id, state.stream_id.as_deref()).await?;
    let marked = marker.mark(user_id, crate::now_ms()).await?;
    let by = match trigger {
        Trigger::Admin(who) => who,
        other => other.label(),
    };
    tracing::info!(user_id, newly = marked, by, "marked a remote device list stale in Synapse, for a repair");
    let users = [user_id.to_owned()];
    let outcome = match app.remote.coordinator.resync_through_writer(&users, timeout).await {
        Ok(mut outcomes) => outcomes.remove(user_id),
        // Alive, but still waiting on the remote: this user's resync, not
        // the writer, is what failed (Synapse keeps the mark and retries).
        Err(WriterError::Busy(waited)) => Some(Err(serde_json::json!({
            "message": format!("the writer was still fetching from {server} after {waited:?}; Synapse keeps its mark and retries")
        }))),
        Err(e) => {
            return Err(HealthError::WriterUnavailable(format!(
                "The device-lists writer could not be reached ({e}). Synapse's stale mark for {user_id} stays: Synapse retries it \
                 by itself within about 30 seconds"
            )));
        }
    };
    let state = app.store.remote_list_state(user_id).await?;
    let error = match outcome {
        Some(Ok(devices)) if devices.is_resync_result => None,
        // Synapse's own retry loop took the mark first and refetched the
        // list; the writer then answered from what it had just stored.
        Some(Ok(_)) if state.stale_since_ts.is_none() => None,
        Some(Ok(_)) => Some("the writer answered from its cache: it did not see the stale mark".to_owned()),
        Some(Err(failure)) => Some(failure.get("message").and_then(|m| m.as_str()).unwrap_or("resync failed").to_owned()),
        None => Some("the writer gave no result for the user".to_owned()),
    };
    let after = synapse_view(app, user_id, state.stream_id.as_deref()).await?;
    let diff = before.drift_from(&after);
    Ok(Repair {
        user_id: user_id.to_owned(),
        marked,
        repaired: error.is_none(),
        error,
        before: before.summary(),
        after: after.summary(),
        diff,
    })
}

/// With repair on, what stands in its way, in one line (checked at
/// start-up): Synapse on SQLite, or a database role that may not insert
/// into `device_lists_remote_resync`. `None` when repair is off or ready.
pub async fn repair_readiness(app: &App) -> Option<String> {
    if !app.config.worker.device_list_repair {
        return None;
    }
    let Some(marker) = app.store.stale_marker() else {
        return Some(
            "keys_worker.device_list_repair is on, but Synapse's database is SQLite, which is never written: repairs are refused".into(),
        );
    };
    match marker.may_mark().await {
        Ok(true) => None,
        Ok(false) => Some(
            "keys_worker.device_list_repair is on, but our database role may not insert into device_lists_remote_resync: \
             repairs will fail until it may (GRANT INSERT ON device_lists_remote_resync TO <role>; see docs/device-lists.md)"
                .into(),
        ),
        Err(e) => Some(format!(
            "keys_worker.device_list_repair is on, but whether our role may write stale marks could not be checked ({})",
            crate::store::short_reason(&e)
        )),
    }
}
