//! `/keys/query` assembly (Synapse's `E2eKeysHandler.query_devices`):
//! local device keys with their owners' cross-signatures, and cross-signing
//! keys with the requester's signatures. Device keys, cross-signing keys and
//! signatures are read side by side (one round trip when nothing is
//! cached, none when everything is).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::Value;

use super::UserQuery;
use super::json::{KeyObject, last_key_value, merge_signatures, parse_object, set_unsigned_display_name};
use super::remote::{Budget, add_remote_users};
use super::request::KeysQuery;
use super::{Context, KeysError};
use crate::ids::domain_of;
use crate::store::{CrossSigningKeyRow, DeviceKeyRow, SignatureRow};

/// The answer, with all five top-level keys always present.
#[derive(Debug, Default, Serialize)]
pub struct KeysQueryResponse {
    pub device_keys: BTreeMap<String, BTreeMap<String, KeyObject>>,
    pub failures: BTreeMap<String, Value>,
    pub master_keys: BTreeMap<String, KeyObject>,
    pub self_signing_keys: BTreeMap<String, KeyObject>,
    pub user_signing_keys: BTreeMap<String, KeyObject>,
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
    // Owners sign their own devices; the requester's signatures on anyone's
    // keys are shown to the requester.
    let mut signers = local_users.clone();
    signers.push(requester);
    let remote_users: Vec<&str> = remote.iter().map(|(u, _)| *u).collect();
    // Nothing Synapse has announced may be older in our answer.
    let stale_marks = ctx.catch_up(&remote_users).await?;

    let reads = async { tokio::try_join!(ctx.device_keys(&local_users), ctx.cross_signing_keys(&queried), ctx.signatures_by(&signers)) };
    let appservices = async { if local.is_empty() { Default::default() } else { ctx.appservice_devices(&local, deadline).await } };
    let (reads, appservice_answer) = tokio::join!(reads, appservices);
    let (device_map, key_map, sig_map) = reads?;

    let mut resp = KeysQueryResponse::default();
    let mut devices = Vec::new();
    for (user, wanted) in &local {
        resp.device_keys.insert((*user).to_owned(), BTreeMap::new());
        let rows = device_map.get(*user).map(|v| v.as_slice()).unwrap_or_default();
        devices.extend(parse_devices(rows.iter().filter(|r| wanted.is_empty() || wanted.contains(&r.device_id))));
    }
    let keys = parse_cross_signing_keys(queried.iter().filter_map(|u| key_map.get(*u)).flat_map(|v| v.iter()));
    let sig_rows: Vec<&SignatureRow> = sig_map.values().flat_map(|v| v.iter()).collect();

    add_devices(&mut resp, devices, &sig_rows);
    add_appservice_devices(&mut resp, &appservice_answer);
    add_cross_signing_keys(&mut resp, keys, &sig_rows, requester);
    let budget = Budget { timeout: query.timeout, deadline };
    add_remote_users(ctx, &mut resp, &remote, &stale_marks, budget, now_ms).await?;
    Ok(resp)
}

struct Device {
    user_id: String,
    device_id: String,
    display_name: Option<String>,
    keys: KeyObject,
}

struct CrossSigningKey {
    user_id: String,
    keytype: String,
    /// The key's public part, the `target_device_id` of signatures on it.
    public_key: Option<String>,
    data: KeyObject,
}

fn parse_devices<'a>(rows: impl Iterator<Item = &'a DeviceKeyRow>) -> impl Iterator<Item = Device> {
    rows.filter_map(|r| {
        // Synapse skips rows whose key_json is empty.
        let keys = parse_object(r.key_json.as_deref().filter(|j| !j.is_empty())?)?;
        Some(Device { user_id: r.user_id.clone(), device_id: r.device_id.clone(), display_name: r.display_name.clone(), keys })
    })
}

fn parse_cross_signing_keys<'a>(rows: impl Iterator<Item = &'a CrossSigningKeyRow>) -> Vec<CrossSigningKey> {
    rows.filter_map(|r| {
        let data = parse_object(&r.keydata)?;
        Some(CrossSigningKey { public_key: last_key_value(&data), user_id: r.user_id.clone(), keytype: r.keytype.clone(), data })
    })
    .collect()
}

/// Each device gets its owner's cross-signatures merged into `signatures`
/// and a fresh `unsigned` with its display name.
fn add_devices(resp: &mut KeysQueryResponse, devices: Vec<Device>, sigs: &[&SignatureRow]) {
    let mut by_target: HashMap<(&str, &str), Vec<(&str, &str)>> = HashMap::new();
    for s in sigs.iter().filter(|s| s.user_id == s.target_user_id) {
        by_target.entry((&s.target_user_id, &s.target_device_id)).or_default().push((&s.key_id, &s.signature));
    }
    for mut d in devices {
        let found = by_target.get(&(d.user_id.as_str(), d.device_id.as_str()));
        merge_signatures(&mut d.keys, &d.user_id, found.map_or(&[][..], Vec::as_slice), true);
        set_unsigned_display_name(&mut d.keys, d.display_name.as_deref());
        resp.device_keys.entry(d.user_id).or_default().insert(d.device_id, d.keys);
    }
}

/// MSC3984: the devices application services gave replace or join the
/// local users' devices (Synapse's `results.setdefault(user).update(devices)`).
/// Users that were not asked about are left out: in Synapse they raise a
/// `KeyError` (a 500).
fn add_appservice_devices(resp: &mut KeysQueryResponse, answer: &serde_json::Map<String, Value>) {
    let Some(Value::Object(users)) = answer.get("device_keys") else { return };
    for (user, devices) in users {
        let (Some(entry), Value::Object(devices)) = (resp.device_keys.get_mut(user), devices) else { continue };
        for (device_id, keys) in devices {
            if let Some(keys) = parse_object(&keys.to_string()) {
                entry.insert(device_id.clone(), keys);
            }
        }
    }
}

/// Master and self-signing keys for everyone, the user-signing key only to
/// its owner; the requester's own signatures merged into each.
fn add_cross_signing_keys(resp: &mut KeysQueryResponse, keys: Vec<CrossSigningKey>, sigs: &[&SignatureRow], requester: &str) {
    // Synapse maps (user, public key) to one key type, the last one seen.
    let mut index_of: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        if let Some(pk) = &k.public_key {
            index_of.insert((&k.user_id, pk), i);
        }
    }
    let mut found: HashMap<usize, Vec<(&str, &str)>> = HashMap::new();
    for s in sigs.iter().filter(|s| s.user_id == requester) {
        if let Some(i) = index_of.get(&(s.target_user_id.as_str(), s.target_device_id.as_str())) {
            found.entry(*i).or_default().push((&s.key_id, &s.signature));
        }
    }
    drop(index_of);
    let mut signed: Vec<(String, String, KeyObject)> = Vec::with_capacity(keys.len());
    for (i, mut k) in keys.into_iter().enumerate() {
        if let Some(list) = found.get(&i) {
            merge_signatures(&mut k.data, requester, list, false);
        }
        signed.push((k.user_id, k.keytype, k.data));
    }
    for (user_id, keytype, data) in signed {
        let target = match keytype.as_str() {
            "master" => &mut resp.master_keys,
            "self_signing" => &mut resp.self_signing_keys,
            "user_signing" if user_id == requester => &mut resp.user_signing_keys,
            _ => continue,
        };
        target.insert(user_id, data);
    }
}
