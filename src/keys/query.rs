//! `/keys/query` assembly (Synapse's `E2eKeysHandler.query_devices`):
//! local device keys with their owners' cross-signatures, and cross-signing
//! keys with the requester's signatures. Device keys, cross-signing keys and
//! signatures are read side by side (one round trip when nothing is
//! cached, none when everything is).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::UserQuery;
use super::json::parse_object;
use super::remote::{Budget, add_remote_users};
use super::rendered::{CrossSigningKey, DeviceMap, KeyJson};
use super::request::KeysQuery;
use super::{Context, KeysError, LocalReads};
use crate::ids::domain_of;
use crate::store::SignatureRow;

/// The answer, with all five top-level keys always present.
#[derive(Debug, Default, Serialize)]
pub struct KeysQueryResponse {
    pub device_keys: BTreeMap<String, DeviceMap>,
    pub failures: BTreeMap<String, Value>,
    pub master_keys: BTreeMap<String, KeyJson>,
    pub self_signing_keys: BTreeMap<String, KeyJson>,
    pub user_signing_keys: BTreeMap<String, KeyJson>,
    /// With [`KeysQuery::explain`]: where each remote user's part came from.
    #[serde(skip)]
    pub provenance: BTreeMap<String, Provenance>,
}

/// Where one remote user's part of an answer came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Provenance {
    pub source: Source,
    /// Synapse had marked the user's list stale when the request's read
    /// barrier looked (its cache was not used).
    pub stale_mark_seen: bool,
    /// Synapse held the list and trusted it (tracked, not marked).
    pub in_synapse_cache: bool,
    /// The user is joined to a room this server is in.
    pub shares_a_room: bool,
    /// The remote's device-list stream id of a resync's result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_stream_id: Option<i64>,
    /// A resync tried before the federation query, and how it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_failure: Option<Value>,
    /// The `failures` entry of the user's server, when the answer has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Synapse's device-list cache, read from its database.
    SynapseCache,
    /// A resync by the device-lists writer (Synapse now holds the result).
    ResyncWriter,
    /// A resync we made ourselves, the writer unreachable (only our
    /// memory holds the result).
    ResyncDirect,
    /// The remote's federation `/user/keys/query`.
    FederationQuery,
    /// Nothing: the user's server failed, timed out or is backed off from.
    Failure,
}

/// Answers `query` for `requester`: local users from memory or the
/// database, remote users through [`add_remote_users`] within
/// `query.timeout`.
pub async fn query_keys(ctx: &impl Context, requester: &str, query: &KeysQuery, now_ms: i64) -> Result<KeysQueryResponse, KeysError> {
    let deadline = query.deadline();
    let server_name = ctx.server_name();
    let (local, remote): (Vec<UserQuery>, Vec<UserQuery>) =
        query.users.iter().map(|(u, d)| (u.as_str(), d.as_slice())).partition(|(u, _)| domain_of(u) == server_name);
    let local_users: Vec<&str> = local.iter().map(|(u, _)| *u).collect();
    let queried: Vec<&str> = query.users.iter().map(|(u, _)| u.as_str()).collect();
    let remote_users: Vec<&str> = remote.iter().map(|(u, _)| *u).collect();
    // Nothing Synapse has announced may be older in our answer. Once is
    // enough: a request that already waited for a probe only needs one for
    // remote users' stale marks.
    let barrier = async { if query.caught_up && remote_users.is_empty() { Ok(Arc::default()) } else { ctx.catch_up(&remote_users).await } };

    // Owners' signatures on their own devices are in the rendered devices;
    // the requester's signatures on anyone's keys are shown to the
    // requester. Read while the barrier's probe is out: if no cached entry
    // was invalidated meanwhile (the probe applies what it finds before it
    // returns), what was read is what a read after it would give; else read
    // again.
    let changes = ctx.cache_changes();
    let reads = ctx.local_reads(&local_users, &queried, requester);
    let appservices = async { if local.is_empty() { Default::default() } else { ctx.appservice_devices(&local, deadline).await } };
    let (stale_marks, reads, appservice_answer) = tokio::join!(barrier, reads, appservices);
    let stale_marks = stale_marks?;
    let reads = match ctx.cache_changes() == changes {
        true => reads,
        false => ctx.local_reads(&local_users, &queried, requester).await,
    };
    let LocalReads { devices: device_map, cross_signing_keys: key_map, requester_signatures: requester_sigs } = reads?;

    let mut resp = KeysQueryResponse::default();
    for (user, wanted) in &local {
        let devices = device_map.get(user).cloned().unwrap_or_default();
        resp.device_keys.insert((*user).to_owned(), DeviceMap::Rendered(devices, wanted.to_vec()));
    }
    add_appservice_devices(&mut resp, &appservice_answer);
    let keys = queried.iter().filter_map(|u| key_map.get(u));
    add_cross_signing_keys(&mut resp, keys, &requester_sigs, requester);
    let budget = Budget { timeout: query.timeout, deadline };
    add_remote_users(ctx, &mut resp, &remote, &stale_marks, budget, now_ms, query.explain).await?;
    Ok(resp)
}

/// MSC3984: the devices application services gave replace or join the
/// local users' devices (Synapse's `results.setdefault(user).update(devices)`).
/// Users that were not asked about are left out: in Synapse they raise a
/// `KeyError` (a 500).
fn add_appservice_devices(resp: &mut KeysQueryResponse, answer: &serde_json::Map<String, Value>) {
    let Some(Value::Object(users)) = answer.get("device_keys") else { return };
    for (user, devices) in users {
        let (Some(entry), Value::Object(devices)) = (resp.device_keys.get_mut(user), devices) else { continue };
        let entry = entry.built();
        for (device_id, keys) in devices {
            if let Some(keys) = parse_object(&keys.to_string()) {
                entry.insert(device_id.clone(), keys);
            }
        }
    }
}

/// Master and self-signing keys for everyone, the user-signing key only to
/// its owner; the requester's own signatures merged into each.
fn add_cross_signing_keys<'k>(
    resp: &mut KeysQueryResponse,
    per_user: impl Iterator<Item = &'k Arc<Vec<CrossSigningKey>>>,
    requester_sigs: &[SignatureRow],
    requester: &str,
) {
    let keys: Vec<(&Arc<Vec<CrossSigningKey>>, usize)> = per_user.flat_map(|list| (0..list.len()).map(move |i| (list, i))).collect();
    // foldhash: built for every answer that carries the requester's
    // signatures (a verified user's every query).
    let mut found: HashMap<usize, Vec<(&str, &str)>, foldhash::fast::RandomState> = HashMap::default();
    if !requester_sigs.is_empty() {
        // Synapse maps (user, public key) to one key type, the last one seen.
        let mut index_of: HashMap<(&str, &str), usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(keys.len(), Default::default());
        for (n, (list, i)) in keys.iter().enumerate() {
            let k = &list[*i];
            if let Some(pk) = &k.public_key {
                index_of.insert((&k.user_id, pk), n);
            }
        }
        for s in requester_sigs {
            if let Some(n) = index_of.get(&(s.target_user_id.as_str(), s.target_device_id.as_str())) {
                found.entry(*n).or_default().push((&s.key_id, &s.signature));
            }
        }
    }
    for (n, (list, i)) in keys.into_iter().enumerate() {
        let k = &list[i];
        let target = match k.keytype.as_str() {
            "master" => &mut resp.master_keys,
            "self_signing" => &mut resp.self_signing_keys,
            "user_signing" if k.user_id == requester => &mut resp.user_signing_keys,
            _ => continue,
        };
        let json = match found.get(&n) {
            Some(sigs) => KeyJson::Raw(k.signed_by(requester, sigs)),
            None => KeyJson::Shared(Arc::clone(list), i),
        };
        target.insert(k.user_id.clone(), json);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use serde_json::{Map, json};

    use super::super::rendered::RenderedDevices;
    use super::super::{Outcome, RemoteUser};
    use super::*;
    use crate::store::DeviceKeyRow;

    /// A context whose barrier applies one change (a new device of `@u:hs`)
    /// after the first reads have been made.
    #[derive(Default)]
    struct ChangeDuringProbe {
        changes: AtomicU64,
        reads: AtomicU64,
    }

    impl Context for ChangeDuringProbe {
        fn server_name(&self) -> &str {
            "hs"
        }
        fn destination_concurrency(&self) -> usize {
            1
        }
        async fn catch_up(&self, _: &[&str]) -> Result<Arc<HashSet<String>>, KeysError> {
            // The probe's round trip: the reads run meanwhile.
            tokio::task::yield_now().await;
            self.changes.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::default())
        }
        fn cache_changes(&self) -> u64 {
            self.changes.load(Ordering::SeqCst)
        }
        async fn local_reads<'a>(&self, local: &[&'a str], _: &[&'a str], _: &'a str) -> Result<LocalReads<'a>, KeysError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let device = if self.changes.load(Ordering::SeqCst) == 0 { "OLD" } else { "NEW" };
            let row = DeviceKeyRow { user_id: "@u:hs".into(), device_id: device.into(), display_name: None, key_json: Some("{}".into()) };
            let mut reads = LocalReads::default();
            reads.devices.insert(local[0], Arc::new(RenderedDevices::local(&[row], &[], true)));
            Ok(reads)
        }
        async fn appservice_devices(&self, _: &[UserQuery<'_>], _: Instant) -> Map<String, Value> {
            Map::new()
        }
        async fn remote_users(&self, _: &[&str]) -> Result<HashMap<String, Arc<RemoteUser>>, KeysError> {
            unreachable!("no remote users")
        }
        async fn destinations_in_backoff(&self, _: &[&str], _: i64) -> Result<Vec<String>, KeysError> {
            unreachable!("no remote users")
        }
        async fn users_sharing_a_room_with(&self, _: &str, _: &[&str]) -> Result<Vec<String>, KeysError> {
            unreachable!("not asked")
        }
        async fn resync(&self, _: &str, _: &[String], _: Instant, _: Instant) -> HashMap<String, Outcome> {
            unreachable!("no remote users")
        }
        async fn user_keys_query(&self, _: &str, _: &Value, _: Duration, _: Instant) -> Result<Value, Value> {
            unreachable!("no remote users")
        }
        fn timed_out(&self, _: Duration) -> Value {
            unreachable!("no remote users")
        }
    }

    #[tokio::test]
    async fn reads_made_while_the_probe_applied_a_change_are_made_again() {
        let ctx = ChangeDuringProbe::default();
        let query = KeysQuery::parse(br#"{"device_keys": {"@u:hs": []}}"#).unwrap();
        let answer = serde_json::to_value(query_keys(&ctx, "@u:hs", &query, 0).await.unwrap()).unwrap();
        assert_eq!(answer["device_keys"]["@u:hs"], json!({"NEW": {"signatures": {"@u:hs": {}}, "unsigned": {}}}));
        assert_eq!(ctx.reads.load(Ordering::SeqCst), 2, "read while the probe was out, then again");
    }
}
