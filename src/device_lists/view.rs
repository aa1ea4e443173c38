//! A user's device list as one side holds it (Synapse's remote cache, the
//! remote server's `/user/devices` answer, Synapse's own tables for a
//! local user), what an operator is shown of it, and the drift between
//! two of them.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::store::{LocalDeviceRow, RemoteDeviceRow, SelfSignatureRow};

/// One device: its keys (without `unsigned`) if it has any, its name.
#[derive(Debug, Clone, PartialEq)]
struct Device {
    keys: Option<Map<String, Value>>,
    display_name: Option<String>,
}

/// A user's device list as one side holds it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListView {
    user_id: String,
    devices: BTreeMap<String, Device>,
    master: Option<Map<String, Value>>,
    self_signing: Option<Map<String, Value>>,
    /// The remote's device-list stream id this view is at, when known.
    pub stream_id: Option<i64>,
}

/// A device as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceSummary {
    pub device_id: String,
    pub display_name: Option<String>,
    /// A short hash of the device's keys and signatures (`None`: no keys):
    /// equal on both sides when they hold the same keys.
    pub fingerprint: Option<String>,
    /// Signed by its owner's current self-signing key.
    pub cross_signed: bool,
}

/// A cross-signing key as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeySummary {
    pub public_key: Option<String>,
    pub fingerprint: String,
}

/// What the API shows of one side's list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListSummary {
    pub stream_id: Option<i64>,
    pub devices: Vec<DeviceSummary>,
    pub master_key: Option<KeySummary>,
    pub self_signing_key: Option<KeySummary>,
    /// Devices with keys but without their owner's self-signing signature
    /// (empty when the owner has no self-signing key): since MSC4153,
    /// clients refuse to share room keys with them.
    pub unsigned_devices: Vec<String>,
}

/// How a held list differs from the truth (or an old list from a new one).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Drift {
    /// In the truth, not held.
    pub missing_devices: Vec<String>,
    /// Held, not in the truth.
    pub extra_devices: Vec<String>,
    /// In both, with different keys or signatures.
    pub changed_devices: Vec<String>,
    /// `master`, `self_signing`: held differently, or only on one side.
    pub cross_signing_changed: Vec<&'static str>,
    /// The held stream id is behind the truth's.
    pub stream_behind: bool,
}

impl Drift {
    /// Whether the held list differs from the truth at all.
    pub fn any(&self) -> bool {
        *self != Drift::default()
    }
}

impl ListView {
    /// Synapse's cache of a remote user's list: `device_lists_remote_cache`
    /// rows, the newest cross-signing keys, the stream id it holds.
    pub fn remote_cache(user_id: &str, rows: &[RemoteDeviceRow], cross_signing: &[(String, String)], stream_id: Option<&str>) -> Self {
        let devices = rows
            .iter()
            .filter_map(|r| {
                let content: Map<String, Value> = serde_json::from_str(&r.content).ok()?;
                Some((r.device_id.clone(), device_of(&content)))
            })
            .collect();
        let mut view = Self { user_id: user_id.to_owned(), devices, ..Self::default() };
        view.set_cross_signing(cross_signing);
        view.stream_id = stream_id.and_then(|s| s.parse().ok());
        view
    }

    /// A remote server's `GET /user/devices/{userId}` answer.
    pub fn remote_answer(user_id: &str, answer: &Value) -> Result<Self, String> {
        let devices = answer.get("devices").and_then(Value::as_array).ok_or("the answer has no `devices` list")?;
        let devices = devices
            .iter()
            .filter_map(|d| {
                let d = d.as_object()?;
                Some((d.get("device_id")?.as_str()?.to_owned(), device_of(d)))
            })
            .collect();
        Ok(Self {
            user_id: user_id.to_owned(),
            devices,
            master: answer.get("master_key").and_then(Value::as_object).map(without_unsigned),
            self_signing: answer.get("self_signing_key").and_then(Value::as_object).map(without_unsigned),
            stream_id: answer.get("stream_id").and_then(Value::as_i64),
        })
    }

    /// A local user's list from Synapse's own tables, the user's signatures
    /// on their own devices and keys merged as Synapse's answers merge them.
    pub fn local(user_id: &str, rows: &[LocalDeviceRow], own: &[SelfSignatureRow], cross_signing: &[(String, String)]) -> Self {
        let devices = rows
            .iter()
            .map(|r| {
                let keys = r.key_json.as_deref().and_then(|j| serde_json::from_str::<Map<String, Value>>(j).ok()).filter(|k| !k.is_empty());
                (r.device_id.clone(), Device { keys: keys.as_ref().map(without_unsigned), display_name: r.display_name.clone() })
            })
            .collect();
        let mut view = Self { user_id: user_id.to_owned(), devices, ..Self::default() };
        view.set_cross_signing(cross_signing);
        for s in own {
            let target = match view.devices.get_mut(&s.target_device_id) {
                Some(d) => d.keys.as_mut(),
                None => [view.master.as_mut(), view.self_signing.as_mut()]
                    .into_iter()
                    .flatten()
                    .find(|k| public_key(k).as_deref() == Some(s.target_device_id.as_str())),
            };
            if let Some(keys) = target {
                add_signature(keys, user_id, &s.key_id, &s.signature);
            }
        }
        view
    }

    fn set_cross_signing(&mut self, rows: &[(String, String)]) {
        for (keytype, keydata) in rows {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(keydata) else { continue };
            match keytype.as_str() {
                "master" => self.master = Some(without_unsigned(&key)),
                "self_signing" => self.self_signing = Some(without_unsigned(&key)),
                _ => {}
            }
        }
    }

    /// What the API shows of this list.
    pub fn summary(&self) -> ListSummary {
        let ssk_ids: Vec<String> = self.self_signing.as_ref().map(key_ids).unwrap_or_default();
        let cross_signed = |keys: &Map<String, Value>| {
            let by_owner = keys.get("signatures").and_then(|s| s.get(&self.user_id)).and_then(Value::as_object);
            by_owner.is_some_and(|sigs| ssk_ids.iter().any(|id| sigs.contains_key(id)))
        };
        let devices: Vec<DeviceSummary> = self
            .devices
            .iter()
            .map(|(id, d)| DeviceSummary {
                device_id: id.clone(),
                display_name: d.display_name.clone(),
                fingerprint: d.keys.as_ref().map(fingerprint),
                cross_signed: d.keys.as_ref().is_some_and(cross_signed),
            })
            .collect();
        let unsigned_devices = if ssk_ids.is_empty() {
            Vec::new()
        } else {
            devices.iter().filter(|d| d.fingerprint.is_some() && !d.cross_signed).map(|d| d.device_id.clone()).collect()
        };
        let key = |k: &Map<String, Value>| KeySummary { public_key: public_key(k), fingerprint: fingerprint(k) };
        ListSummary {
            stream_id: self.stream_id,
            devices,
            master_key: self.master.as_ref().map(key),
            self_signing_key: self.self_signing.as_ref().map(key),
            unsigned_devices,
        }
    }

    /// How this (held) list differs from `truth`.
    pub fn drift_from(&self, truth: &ListView) -> Drift {
        let only_in = |a: &ListView, b: &ListView| a.devices.keys().filter(|id| !b.devices.contains_key(*id)).cloned().collect();
        let changed = self
            .devices
            .iter()
            .filter(|(id, d)| truth.devices.get(*id).is_some_and(|t| t.keys != d.keys))
            .map(|(id, _)| id.clone())
            .collect();
        let mut cross_signing_changed = Vec::new();
        if self.master != truth.master {
            cross_signing_changed.push("master");
        }
        if self.self_signing != truth.self_signing {
            cross_signing_changed.push("self_signing");
        }
        Drift {
            missing_devices: only_in(truth, self),
            extra_devices: only_in(self, truth),
            changed_devices: changed,
            cross_signing_changed,
            stream_behind: match (self.stream_id, truth.stream_id) {
                (Some(held), Some(now)) => held < now,
                (None, Some(_)) => true,
                _ => false,
            },
        }
    }
}

/// A device entry (`{device_id, keys, device_display_name}`) as held.
fn device_of(entry: &Map<String, Value>) -> Device {
    let keys = entry.get("keys").and_then(Value::as_object).filter(|k| !k.is_empty()).map(without_unsigned);
    let display_name = entry.get("device_display_name").and_then(Value::as_str).map(str::to_owned);
    Device { keys, display_name }
}

fn without_unsigned(o: &Map<String, Value>) -> Map<String, Value> {
    let mut o = o.clone();
    o.remove("unsigned");
    o
}

fn add_signature(keys: &mut Map<String, Value>, signer: &str, key_id: &str, signature: &str) {
    let sigs = keys.entry("signatures").or_insert_with(|| Value::Object(Map::new()));
    let by_signer = sigs.as_object_mut().map(|s| s.entry(signer).or_insert_with(|| Value::Object(Map::new())));
    if let Some(m) = by_signer.and_then(Value::as_object_mut) {
        m.insert(key_id.to_owned(), Value::String(signature.to_owned()));
    }
}

/// The key IDs (`ed25519:…`) of a cross-signing key.
fn key_ids(key: &Map<String, Value>) -> Vec<String> {
    key.get("keys").and_then(Value::as_object).map(|k| k.keys().cloned().collect()).unwrap_or_default()
}

/// A cross-signing key's public part (the value of its one key).
fn public_key(key: &Map<String, Value>) -> Option<String> {
    key.get("keys").and_then(Value::as_object)?.values().next()?.as_str().map(str::to_owned)
}

/// The first 64 bits of the SHA-256 of the canonical JSON, unpadded base64.
fn fingerprint(o: &Map<String, Value>) -> String {
    let value = Value::Object(o.clone());
    let text = ruma::canonical_json::to_canonical_value(&value).map_or_else(|_| value.to_string(), |c| c.to_string());
    STANDARD_NO_PAD.encode(&Sha256::digest(text.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const U: &str = "@bob:remote";

    fn cache_row(device: &str, keys: Value) -> RemoteDeviceRow {
        RemoteDeviceRow { user_id: U.into(), device_id: device.into(), content: json!({"device_id": device, "keys": keys}).to_string() }
    }

    fn keys(device: &str, sigs: Value) -> Value {
        json!({"user_id": U, "device_id": device, "keys": {format!("ed25519:{device}"): device}, "signatures": sigs})
    }

    fn ssk(public: &str) -> (String, String) {
        ("self_signing".into(), json!({"user_id": U, "usage": ["self_signing"], "keys": {format!("ed25519:{public}"): public}}).to_string())
    }

    #[test]
    fn each_kind_of_drift_is_named() {
        let signed = json!({U: {"ed25519:A": "a", "ed25519:SSK": "s"}});
        let held = ListView::remote_cache(
            U,
            &[cache_row("A", keys("A", signed.clone())), cache_row("B", keys("B", json!({}))), cache_row("OLD", keys("OLD", json!({})))],
            &[ssk("SSK")],
            Some("5"),
        );
        let answer = json!({
            "user_id": U, "stream_id": 9,
            "devices": [
                {"device_id": "A", "keys": keys("A", signed)},
                {"device_id": "B", "keys": keys("B", json!({U: {"ed25519:SSK": "s"}}))},
                {"device_id": "NEW", "keys": keys("NEW", json!({}))},
            ],
            "self_signing_key": {"user_id": U, "usage": ["self_signing"], "keys": {"ed25519:SSK2": "SSK2"}},
        });
        let truth = ListView::remote_answer(U, &answer).unwrap();
        let drift = held.drift_from(&truth);
        assert_eq!(drift.missing_devices, ["NEW"]);
        assert_eq!(drift.extra_devices, ["OLD"]);
        assert_eq!(drift.changed_devices, ["B"], "a signature added is a change");
        assert_eq!(drift.cross_signing_changed, ["self_signing"]);
        assert!(drift.stream_behind && drift.any());
        assert!(!truth.drift_from(&truth).any());
    }

    #[test]
    fn unsigned_devices_are_those_without_the_current_self_signing_signature() {
        let rows =
            [cache_row("A", keys("A", json!({U: {"ed25519:SSK": "s"}}))), cache_row("B", keys("B", json!({U: {"ed25519:OLD": "s"}})))];
        let summary = ListView::remote_cache(U, &rows, &[ssk("SSK")], None).summary();
        assert_eq!(summary.unsigned_devices, ["B"]);
        assert!(summary.devices[0].cross_signed);
        assert_eq!(summary.self_signing_key.unwrap().public_key.as_deref(), Some("SSK"));
        let no_ssk = ListView::remote_cache(U, &rows, &[], None).summary();
        assert!(no_ssk.unsigned_devices.is_empty(), "without a self-signing key nothing is said unsigned");
    }

    #[test]
    fn local_signatures_are_merged_before_checking() {
        let rows = [LocalDeviceRow {
            device_id: "A".into(),
            display_name: Some("Phone".into()),
            key_json: Some(keys("A", json!({})).to_string()),
        }];
        let own = [SelfSignatureRow { key_id: "ed25519:SSK".into(), target_device_id: "A".into(), signature: "s".into() }];
        let signed = ListView::local(U, &rows, &own, &[ssk("SSK")]).summary();
        assert!(signed.unsigned_devices.is_empty());
        assert_eq!(signed.devices[0].display_name.as_deref(), Some("Phone"));
        let unsigned = ListView::local(U, &rows, &[], &[ssk("SSK")]).summary();
        assert_eq!(unsigned.unsigned_devices, ["A"]);
        assert_ne!(signed.devices[0].fingerprint, unsigned.devices[0].fingerprint);
    }

    #[test]
    fn fingerprints_ignore_key_order_and_unsigned() {
        let a: Map<String, Value> = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":1}}"#).unwrap();
        let b: Map<String, Value> = serde_json::from_str(r#"{"a":{"x":1,"y":2},"b":1}"#).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 11);
        let with_unsigned = ListView::remote_cache(U, &[cache_row("A", json!({"k": 1, "unsigned": {"x": 1}}))], &[], None);
        let without = ListView::remote_cache(U, &[cache_row("A", json!({"k": 1}))], &[], None);
        assert!(!with_unsigned.drift_from(&without).any());
    }
}
