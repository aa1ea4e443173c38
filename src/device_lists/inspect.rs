//! `GET …/users/{userId}/device_list`: Synapse's view of one user's list;
//! for a remote user also Synapse's state of it, our resyncs, both sides'
//! retry state, and with a check the remote's own answer and the drift.

use std::time::Duration;

use serde::Serialize;

use super::view::{Drift, ListSummary, ListView};
use super::{HealthError, remote_user};
use crate::App;
use crate::resync::LastResync;
use crate::store::DestinationRow;

/// What the API answers about one user.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Inspection {
    Local(LocalInspection),
    Remote(Box<RemoteInspection>),
}

#[derive(Debug, Serialize)]
pub struct LocalInspection {
    pub user_id: String,
    pub local: bool,
    #[serde(flatten)]
    pub list: ListSummary,
}

#[derive(Debug, Serialize)]
pub struct RemoteInspection {
    pub user_id: String,
    pub local: bool,
    pub server_name: String,
    /// What Synapse holds.
    pub synapse: SynapseState,
    /// Rooms this server is in where the user is joined.
    pub shared_rooms: i64,
    pub destination: DestinationState,
    /// Our newest resync of the user (the last day's).
    pub last_resync: Option<LastResync>,
    /// With `check`: the remote's answer, or why there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteCheck>,
    /// With `check` and an answer: how Synapse's cache differs from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<Drift>,
}

#[derive(Debug, Serialize)]
pub struct SynapseState {
    /// Synapse keeps the user's list (it has a stream id for it).
    pub tracked: bool,
    /// Synapse marked the list stale then (ms since the epoch): it will
    /// refetch it, and meanwhile does not answer from it.
    pub stale_since_ts: Option<i64>,
    /// Synapse's `/keys/query` answers from this cache (tracked, not
    /// stale, and a room is shared: Synapse does not trust the copy of a
    /// user it shares no room with).
    pub answers_from_cache: bool,
    #[serde(flatten)]
    pub list: ListSummary,
}

#[derive(Debug, Serialize)]
pub struct DestinationState {
    /// Synapse's retry state for the server (`null`: no failure recorded).
    pub synapse_retry: Option<SynapseRetry>,
    /// We are backing off from the server after this failure.
    pub our_backoff: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SynapseRetry {
    pub failure_ts: Option<i64>,
    pub retry_last_ts: Option<i64>,
    pub retry_interval_ms: Option<i64>,
}

/// The remote's answer to `GET /user/devices/{userId}`, or why none came.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum RemoteCheck {
    Answered(ListSummary),
    Failed { error: String },
}

/// What Synapse holds about `user_id`; with `check`, the remote is asked
/// too (waiting `check` at most) and the drift computed.
pub async fn inspect(app: &App, user_id: &str, check: Option<Duration>) -> Result<Inspection, HealthError> {
    let ours = &app.config.synapse.server_name;
    if crate::ids::is_valid_user_id(user_id) && crate::ids::domain_of(user_id) == ours {
        return inspect_local(app, user_id).await;
    }
    let server = remote_user(ours, user_id)?;
    let store = &app.store;
    let state = store.remote_list_state(user_id).await?;
    let held = synapse_view(app, user_id, state.stream_id.as_deref()).await?;
    let (remote, drift) = match check {
        None => (None, None),
        Some(timeout) => match app.remote.federation.user_devices(server, user_id, timeout).await {
            Ok(answer) => match ListView::remote_answer(user_id, &answer) {
                Ok(truth) => (Some(RemoteCheck::Answered(truth.summary())), Some(held.drift_from(&truth))),
                Err(why) => (Some(RemoteCheck::Failed { error: format!("unusable answer: {why}") }), None),
            },
            Err(e) => (Some(RemoteCheck::Failed { error: e.to_string() }), None),
        },
    };
    let tracked = state.stream_id.is_some();
    let retry = store.destination_retry(server).await?;
    Ok(Inspection::Remote(Box::new(RemoteInspection {
        user_id: user_id.to_owned(),
        local: false,
        server_name: server.to_owned(),
        synapse: SynapseState {
            tracked,
            stale_since_ts: state.stale_since_ts,
            answers_from_cache: tracked
                && state.stream_id.as_deref() != Some("")
                && state.stale_since_ts.is_none()
                && state.shared_rooms > 0,
            list: held.summary(),
        },
        shared_rooms: state.shared_rooms,
        destination: DestinationState {
            synapse_retry: retry.filter(|r| r.failure_ts.is_some() || r.retry_interval.is_some_and(|i| i > 0)).map(
                |DestinationRow { failure_ts, retry_last_ts, retry_interval }| SynapseRetry {
                    failure_ts,
                    retry_last_ts,
                    retry_interval_ms: retry_interval,
                },
            ),
            our_backoff: app.remote.federation.backing_off(server).map(|e| e.to_string()),
        },
        last_resync: app.remote.coordinator.last_resync(user_id),
        remote,
        drift,
    })))
}

/// Synapse's cache of a remote user's list.
pub(super) async fn synapse_view(app: &App, user_id: &str, stream_id: Option<&str>) -> Result<ListView, HealthError> {
    let store = &app.store;
    let rows = store.remote_cached_devices(&[user_id]).await?;
    let cross_signing = store.cross_signing_keys_of(user_id).await?;
    Ok(ListView::remote_cache(user_id, &rows, &cross_signing, stream_id))
}

async fn inspect_local(app: &App, user_id: &str) -> Result<Inspection, HealthError> {
    let store = &app.store;
    if !store.user_exists(user_id).await? {
        return Err(HealthError::NotFound(format!("{user_id} is not a user of this server")));
    }
    let devices = store.local_devices(user_id).await?;
    let own = store.self_signatures(user_id).await?;
    let cross_signing = store.cross_signing_keys_of(user_id).await?;
    let list = ListView::local(user_id, &devices, &own, &cross_signing).summary();
    Ok(Inspection::Local(LocalInspection { user_id: user_id.to_owned(), local: true, list }))
}
