//! Remote users in a `/keys/query` (steps 6–7 of Synapse's
//! `query_devices`): answered from Synapse's device-list cache when it is
//! trusted, else per destination through the resync coordinator (users
//! queried for all devices who share a room with us) and federation
//! `/user/keys/query` (the rest), destinations in parallel, all within the
//! request's deadline.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use futures::StreamExt;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::UserQuery;
use super::json::{KeyObject, parse_object};
use super::query::{KeysQueryResponse, Provenance, Source};
use super::rendered::DeviceMap;
use super::{Context, KeysError};
use crate::ids::domain_of;

/// How long remote servers may take: the client's `timeout` (Synapse's
/// wording of timeouts names it) and the instant it runs out.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub timeout: std::time::Duration,
    pub deadline: Instant,
}

/// Synapse's grace period: destinations due for a retry within a minute are
/// tried anyway.
const RETRY_GRACE_MS: i64 = 60_000;

fn not_ready() -> Value {
    json!({"status": 503, "message": "Not ready for retry"})
}

/// Fills `resp` for the remote users of a query.
pub async fn add_remote_users(
    ctx: &impl Context,
    resp: &mut KeysQueryResponse,
    remote: &[UserQuery<'_>],
    stale_marks: &HashSet<String>,
    budget: Budget,
    now_ms: i64,
    explain: bool,
) -> Result<(), KeysError> {
    if remote.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = remote.iter().map(|(u, _)| *u).collect();
    let known = ctx.remote_users(&users).await?;
    let looked_at = Instant::now();
    let sharing: HashSet<&str> = users.iter().copied().filter(|u| known.get(*u).is_some_and(|k| k.shares_a_room)).collect();
    // Cached users the server no longer shares a room with are not trusted,
    // nor those Synapse has marked stale since we read its tables.
    let cached: HashSet<&str> =
        users.iter().copied().filter(|u| sharing.contains(u) && known[*u].in_synapse_cache && !stale_marks.contains(*u)).collect();
    for (user, wanted) in remote.iter().filter(|(u, _)| cached.contains(u)) {
        resp.device_keys.insert((*user).to_owned(), DeviceMap::Rendered(known[*user].devices.clone(), wanted.to_vec()));
    }

    // Not cached, or only one of master / self-signing key known: ask.
    let mut by_destination: BTreeMap<&str, Vec<UserQuery>> = BTreeMap::new();
    for (user, devices) in remote {
        let half_keys = resp.master_keys.contains_key(*user) != resp.self_signing_keys.contains_key(*user);
        if !cached.contains(user) || half_keys {
            by_destination.entry(domain_of(user)).or_default().push((user, devices));
        }
    }
    let mut sources: HashMap<String, Asked> = HashMap::new();
    if by_destination.is_empty() {
        if explain {
            record(resp, &users, &known, &cached, stale_marks, sources);
        }
        return Ok(());
    }
    let destinations: Vec<&str> = by_destination.keys().copied().collect();
    // Only Synapse's own view decides that a destination is skipped (our
    // backoff covers our direct requests, in the federation client).
    let synapse_backoff = ctx.destinations_in_backoff(&destinations, now_ms + RETRY_GRACE_MS).await?;
    let mut ask: Vec<(&str, Vec<UserQuery>)> = Vec::new();
    for (dest, queries) in by_destination {
        if synapse_backoff.iter().any(|d| d == dest) {
            resp.failures.insert(dest.to_owned(), not_ready());
        } else {
            ask.push((dest, queries));
        }
    }
    let sharing = &sharing;
    // The federation requests are bounded by the deadline themselves; this
    // is the safety net for everything else a destination waits on (the
    // answer is due at the deadline, not after it).
    let safety_net = budget.deadline;
    let queries: Vec<_> = ask
        .into_iter()
        .map(|(dest, queries)| async move {
            let work = query_destination(ctx, dest, queries, sharing, budget, looked_at, explain);
            match tokio::time::timeout_at(safety_net.into(), work).await {
                Ok(answer) => answer,
                Err(_) => DestinationAnswer::failed(dest, ctx.timed_out(budget.timeout)),
            }
        })
        .collect();
    let answers: Vec<DestinationAnswer> =
        futures::stream::iter(queries).buffer_unordered(ctx.destination_concurrency().max(1)).collect().await;
    for mut a in answers {
        sources.extend(a.sources.drain(..));
        a.merge_into(resp);
    }
    if explain {
        record(resp, &users, &known, &cached, stale_marks, sources);
    }
    Ok(())
}

/// How a user's destination was asked about them.
#[derive(Debug, Default)]
struct Asked {
    source: Option<Source>,
    remote_stream_id: Option<i64>,
    resync_failure: Option<Value>,
}

/// Fills `resp.provenance` for the remote `users`.
fn record(
    resp: &mut KeysQueryResponse,
    users: &[&str],
    known: &HashMap<String, std::sync::Arc<super::RemoteUser>>,
    cached: &HashSet<&str>,
    stale_marks: &HashSet<String>,
    mut asked: HashMap<String, Asked>,
) {
    for user in users {
        let asked = asked.remove(*user).unwrap_or_default();
        let failure = resp.failures.get(domain_of(user)).cloned();
        let source = match asked.source {
            Some(source) => source,
            None if cached.contains(user) => Source::SynapseCache,
            None => Source::Failure,
        };
        let k = known.get(*user);
        resp.provenance.insert(
            (*user).to_owned(),
            Provenance {
                source,
                stale_mark_seen: stale_marks.contains(*user),
                in_synapse_cache: k.is_some_and(|k| k.in_synapse_cache),
                shares_a_room: k.is_some_and(|k| k.shares_a_room),
                remote_stream_id: asked.remote_stream_id,
                resync_failure: asked.resync_failure,
                failure: (source == Source::Failure).then_some(failure).flatten(),
            },
        );
    }
}

/// What one destination contributed.
#[derive(Default)]
pub(crate) struct DestinationAnswer {
    destination: String,
    /// Resync results, merged into what the user already has (an entry is
    /// made even with no devices).
    resynced: Vec<(String, Vec<(String, KeyObject)>)>,
    /// Devices replacing the user's entry (federation `/user/keys/query`).
    replaced_devices: Vec<(String, BTreeMap<String, KeyObject>)>,
    master_keys: Vec<(String, KeyObject)>,
    self_signing_keys: Vec<(String, KeyObject)>,
    failure: Option<Value>,
    /// How each user asked about was answered (for explain).
    sources: Vec<(String, Asked)>,
}

impl DestinationAnswer {
    fn failed(dest: &str, failure: Value) -> Self {
        Self { destination: dest.to_owned(), failure: Some(failure), ..Default::default() }
    }

    fn merge_into(self, resp: &mut KeysQueryResponse) {
        for (user, devices) in self.resynced {
            resp.device_keys.entry(user).or_default().built().extend(devices);
        }
        for (user, devices) in self.replaced_devices {
            resp.device_keys.insert(user, DeviceMap::Built(devices));
        }
        resp.master_keys.extend(self.master_keys.into_iter().map(|(u, k)| (u, k.into())));
        resp.self_signing_keys.extend(self.self_signing_keys.into_iter().map(|(u, k)| (u, k.into())));
        if let Some(f) = self.failure {
            resp.failures.insert(self.destination, f);
        }
    }
}

/// A cross-signing key from a resync result, when Synapse would take it
/// (`if master_key:`: present and not empty).
fn resync_key(raw: Option<&RawValue>) -> Option<KeyObject> {
    raw.and_then(|k| parse_object(k.get())).filter(|k| !k.is_empty())
}

/// Synapse's `_query_devices_for_destination`: users asked for all their
/// devices who share a room with us are resynced (through the writer);
/// everyone not resynced, including users whose resync failed, goes to the
/// destination's `/user/keys/query`. The last failure seen is reported.
async fn query_destination(
    ctx: &impl Context,
    dest: &str,
    queries: Vec<UserQuery<'_>>,
    sharing: &HashSet<&str>,
    budget: Budget,
    looked_at: Instant,
    explain: bool,
) -> DestinationAnswer {
    let mut answer = DestinationAnswer { destination: dest.to_owned(), ..Default::default() };
    let resync: Vec<String> =
        queries.iter().filter(|(u, devices)| devices.is_empty() && sharing.contains(*u)).map(|(u, _)| (*u).to_owned()).collect();
    let mut updated: HashSet<String> = HashSet::new();
    let mut resync_failures: HashMap<String, Value> = HashMap::new();
    if !resync.is_empty() {
        let outcomes = ctx.resync(dest, &resync, budget.deadline, looked_at).await;
        for user in resync {
            match outcomes.get(&user) {
                Some(Ok(d)) if d.is_resync_result => {
                    let source = if d.stream_pos.is_some() { Source::ResyncWriter } else { Source::ResyncDirect };
                    let stream_id = explain.then(|| serde_json::from_str::<Value>(d.raw.get()).ok()?.get("stream_id")?.as_i64()).flatten();
                    answer.sources.push((user.clone(), Asked { source: Some(source), remote_stream_id: stream_id, resync_failure: None }));
                    let devices = d.devices.iter().filter_map(|(id, k)| Some((id.clone(), parse_object(k.get())?))).collect();
                    answer.resynced.push((user.clone(), devices));
                    if let Some(k) = resync_key(d.master_key.as_deref()) {
                        answer.master_keys.push((user.clone(), k));
                    }
                    if let Some(k) = resync_key(d.self_signing_key.as_deref()) {
                        answer.self_signing_keys.push((user.clone(), k));
                    }
                    updated.insert(user);
                }
                // The writer's bare `{device_id: content}` map (it had the
                // user cached) is no resync result for Synapse either.
                Some(Ok(_)) | None => {}
                Some(Err(f)) => {
                    answer.failure = Some(f.clone());
                    resync_failures.insert(user, f.clone());
                }
            }
        }
    }
    let direct: Vec<&UserQuery> = queries.iter().filter(|(u, _)| !updated.contains(*u)).collect();
    if direct.is_empty() {
        return answer;
    }
    let query: Map<String, Value> = direct.iter().map(|(u, d)| ((*u).to_owned(), json!(d))).collect();
    let source = match ctx.user_keys_query(dest, &Value::Object(query.clone()), budget.timeout, budget.deadline).await {
        Ok(remote) => {
            answer.take_user_keys(&query, &remote);
            Source::FederationQuery
        }
        Err(failure) => {
            answer.failure = Some(failure);
            Source::Failure
        }
    };
    for (user, _) in direct {
        let asked = Asked { source: Some(source), remote_stream_id: None, resync_failure: resync_failures.remove(*user) };
        answer.sources.push(((*user).to_owned(), asked));
    }
    answer
}

impl DestinationAnswer {
    /// What a remote's `/user/keys/query` answer gives for the users of
    /// `query` (anything else it sends, or that is not an object, is left
    /// out).
    pub(crate) fn take_user_keys(&mut self, query: &Map<String, Value>, remote: &Value) {
        let pick = |field: &str| -> Vec<(String, KeyObject)> {
            remote
                .get(field)
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter(|(u, _)| query.contains_key(*u))
                        .filter_map(|(u, k)| Some((u.clone(), parse_object(&k.to_string())?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        if let Some(devices) = remote.get("device_keys").and_then(Value::as_object) {
            for (user, devs) in devices.iter().filter(|(u, _)| query.contains_key(*u)) {
                let parsed: HashMap<_, _> = devs
                    .as_object()
                    .map(|m| m.iter().filter_map(|(d, k)| Some((d.clone(), parse_object(&k.to_string())?))).collect())
                    .unwrap_or_default();
                self.replaced_devices.push((user.clone(), parsed.into_iter().collect()));
            }
        }
        self.master_keys.extend(pick("master_keys"));
        self.self_signing_keys.extend(pick("self_signing_keys"));
    }

    /// Merges a destination's answers into a fresh response (fuzzing).
    #[doc(hidden)]
    pub fn merged(self) -> KeysQueryResponse {
        let mut resp = KeysQueryResponse::default();
        self.merge_into(&mut resp);
        resp
    }
}
