//! `/keys/query` assembly (Synapse's `E2eKeysHandler.query_devices`):
//! local device keys with their owners' cross-signatures, and cross-signing
//! keys with the requester's signatures. Three store round trips in all:
//! device keys and cross-signing keys side by side, then the signatures
//! both need.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::json::{KeyObject, last_key_value, merge_signatures, parse_object, set_unsigned_display_name};
use super::remote::add_remote_users;
use super::request::KeysQuery;
use crate::App;
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

/// Answers `query` for `requester`: local users from the database, remote
/// users through [`add_remote_users`] within `query.timeout`.
pub async fn query_keys(app: &App, requester: &str, query: &KeysQuery, now_ms: i64) -> Result<KeysQueryResponse, sqlx::Error> {
    let deadline = Instant::now() + query.timeout;
    let store = &app.store;
    let mut all_devices_of: Vec<&str> = Vec::new();
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    let mut local_users: Vec<&str> = Vec::new();
    let mut remote: Vec<(&str, &[String])> = Vec::new();
    for (user_id, devices) in &query.users {
        if domain_of(user_id) != app.config.synapse.server_name {
            remote.push((user_id, devices));
            continue;
        }
        local_users.push(user_id);
        if devices.is_empty() {
            all_devices_of.push(user_id);
        } else {
            pairs.extend(devices.iter().map(|d| (user_id.as_str(), d.as_str())));
        }
    }
    let queried: Vec<&str> = query.users.iter().map(|(u, _)| u.as_str()).collect();

    let (device_rows, key_rows) =
        tokio::try_join!(store.device_keys(&all_devices_of, &pairs), store.cross_signing_keys(&queried))?;

    let mut resp = KeysQueryResponse::default();
    for user in &local_users {
        resp.device_keys.insert((*user).to_owned(), BTreeMap::new());
    }
    let devices = parse_devices(device_rows);
    let keys = parse_cross_signing_keys(key_rows);

    let owners: Vec<&str> = uniq(devices.iter().map(|d| d.user_id.as_str()));
    let key_owners: Vec<&str> = uniq(keys.iter().map(|k| k.user_id.as_str()));
    let sig_rows = store.cross_signatures(&owners, requester, &key_owners).await?;

    add_devices(&mut resp, devices, &sig_rows);
    add_cross_signing_keys(&mut resp, keys, &sig_rows, requester);
    add_remote_users(app, &mut resp, &remote, deadline, now_ms).await?;
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

fn parse_devices(rows: Vec<DeviceKeyRow>) -> Vec<Device> {
    rows.into_iter()
        .filter_map(|r| {
            // Synapse skips rows whose key_json is empty.
            let keys = parse_object(r.key_json.as_deref().filter(|j| !j.is_empty())?)?;
            Some(Device { user_id: r.user_id, device_id: r.device_id, display_name: r.display_name, keys })
        })
        .collect()
}

fn parse_cross_signing_keys(rows: Vec<CrossSigningKeyRow>) -> Vec<CrossSigningKey> {
    rows.into_iter()
        .filter_map(|r| {
            let data = parse_object(&r.keydata)?;
            Some(CrossSigningKey { public_key: last_key_value(&data), user_id: r.user_id, keytype: r.keytype, data })
        })
        .collect()
}

/// Each device gets its owner's cross-signatures merged into `signatures`
/// and a fresh `unsigned` with its display name.
fn add_devices(resp: &mut KeysQueryResponse, devices: Vec<Device>, sigs: &[SignatureRow]) {
    let mut by_target: HashMap<(&str, &str), Vec<(&str, &str)>> = HashMap::new();
    for s in sigs.iter().filter(|s| s.user_id == s.target_user_id) {
        by_target
            .entry((&s.target_user_id, &s.target_device_id))
            .or_default()
            .push((&s.key_id, &s.signature));
    }
    for mut d in devices {
        let found = by_target.get(&(d.user_id.as_str(), d.device_id.as_str()));
        merge_signatures(&mut d.keys, &d.user_id, found.map_or(&[][..], Vec::as_slice), true);
        set_unsigned_display_name(&mut d.keys, d.display_name.as_deref());
        resp.device_keys.entry(d.user_id).or_default().insert(d.device_id, d.keys);
    }
}

/// Master and self-signing keys for everyone, the user-signing key only to
/// its owner; the requester's own signatures merged into each.
fn add_cross_signing_keys(
    resp: &mut KeysQueryResponse,
    keys: Vec<CrossSigningKey>,
    sigs: &[SignatureRow],
    requester: &str,
) {
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

fn uniq<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    it.filter(|u| seen.insert(*u)).collect()
}
