//! Local users' keys rendered once, when they are cached, as the answer
//! shows them to anyone: a warm `/keys/query` copies their JSON text into
//! the answer instead of parsing and re-serialising stored JSON.
//!
//! What depends on the requester is left out and merged per request: the
//! requester's signatures on other users' cross-signing keys. A user's
//! rendered devices depend on their device rows and on their own
//! signatures, so the cache holding them is invalidated by either (see
//! `crate::cache`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::{RawValue, to_raw_value};
use serde_json::{Map, Value};

use super::json::{KeyObject, last_key_value, merge_signatures, parse_object, set_unsigned_display_name};
use crate::store::{CrossSigningKeyRow, DeviceKeyRow, RemoteDeviceRow, SignatureRow};

/// A user's devices with keys, as the answer shows them, sorted by device
/// ID: a local user's from Synapse's device tables, a remote user's from
/// Synapse's device-list cache.
#[derive(Debug, Default)]
pub struct RenderedDevices {
    devices: Vec<(String, Box<RawValue>)>,
    /// The owner-entry rule a local user's devices were rendered under
    /// (see [`Self::local`]); `None` for a remote user's.
    pub owner_entry_always: Option<bool>,
}

/// A row of Synapse's remote device cache (`device_lists_remote_cache`).
#[derive(Deserialize)]
struct CachedContent {
    keys: Option<Box<RawValue>>,
    device_display_name: Option<Value>,
}

impl RenderedDevices {
    /// A remote user's devices from Synapse's device-list cache, as Synapse
    /// renders them: each device's `keys` with `unsigned` kept (or an empty
    /// object) and the display name added when it is truthy. Rows whose
    /// content or `keys` is not an object, or whose `keys` is empty, are
    /// skipped.
    pub fn remote_cached(rows: &[RemoteDeviceRow]) -> Self {
        let mut devices: BTreeMap<&str, Box<RawValue>> = BTreeMap::new();
        for row in rows {
            let Ok(content) = serde_json::from_str::<CachedContent>(&row.content) else { continue };
            let Some(mut keys) = content.keys.as_deref().and_then(|k| parse_object(k.get())) else { continue };
            if keys.is_empty() {
                continue;
            }
            let mut unsigned: Map<String, Value> =
                keys.get("unsigned").and_then(|u| serde_json::from_str(u.get()).ok()).unwrap_or_default();
            if let Some(name) = content.device_display_name.filter(is_truthy) {
                unsigned.insert("device_display_name".into(), name);
            }
            keys.insert("unsigned".into(), to_raw_value(&unsigned).expect("a map serialises"));
            devices.insert(&row.device_id, to_raw_value(&keys).expect("a key object serialises"));
        }
        Self { devices: devices.into_iter().map(|(id, json)| (id.to_owned(), json)).collect(), owner_entry_always: None }
    }

    /// A local user's devices (Synapse's `query_local_devices`): each
    /// device's keys with the owner's cross-signatures merged into
    /// `signatures` and `unsigned` holding its display name.
    /// `rows` are one user's, `own_signatures` the signatures
    /// that user made; those on their own devices are merged). Rows whose
    /// key JSON is empty or not an object are skipped, as Synapse skips
    /// them. `owner_entry_always`: Synapse 1.139 and later give every
    /// device a `signatures[owner]` entry, even an empty one; earlier
    /// releases only when the owner cross-signed it.
    pub fn local(rows: &[DeviceKeyRow], own_signatures: &[SignatureRow], owner_entry_always: bool) -> Self {
        let mut by_device: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
        for s in own_signatures.iter().filter(|s| s.user_id == s.target_user_id) {
            by_device.entry(&s.target_device_id).or_default().push((&s.key_id, &s.signature));
        }
        let mut devices: BTreeMap<&str, Box<RawValue>> = BTreeMap::new();
        for r in rows {
            let Some(mut keys) = r.key_json.as_deref().filter(|j| !j.is_empty()).and_then(parse_object) else { continue };
            let sigs = by_device.get(r.device_id.as_str()).map_or(&[][..], Vec::as_slice);
            merge_signatures(&mut keys, &r.user_id, sigs, owner_entry_always);
            set_unsigned_display_name(&mut keys, r.display_name.as_deref());
            devices.insert(&r.device_id, to_raw_value(&keys).expect("a key object serialises"));
        }
        Self {
            devices: devices.into_iter().map(|(id, json)| (id.to_owned(), json)).collect(),
            owner_entry_always: Some(owner_entry_always),
        }
    }

    /// One device's rendered key JSON.
    pub fn device_json(&self, device_id: &str) -> Option<&RawValue> {
        self.devices.iter().find(|(id, _)| id == device_id).map(|(_, json)| &**json)
    }

    /// Bytes held, for the cache's weigher.
    pub fn weight(&self) -> usize {
        self.devices.iter().map(|(id, json)| id.len() + json.get().len() + 48).sum()
    }

    fn wanted<'a>(&'a self, wanted: &'a [String]) -> impl Iterator<Item = &'a (String, Box<RawValue>)> {
        self.devices.iter().filter(move |(id, _)| wanted.is_empty() || wanted.contains(id))
    }
}

/// A cross-signing key, parsed once: its type, public part (the last value
/// of its `keys`, what signatures on it name as their target) and JSON,
/// with where its `signatures` sit in that text, so a requester's
/// signatures are spliced in without parsing the rest again.
#[derive(Debug)]
pub struct CrossSigningKey {
    pub user_id: String,
    pub keytype: String,
    pub public_key: Option<String>,
    json: Box<RawValue>,
    signatures: SignaturesAt,
}

/// Where `signatures` is in a rendered key's text (its fields sorted).
#[derive(Debug, Clone, Copy)]
enum SignaturesAt {
    /// `json[start..end]` is `"signatures":<value>`.
    Field { start: usize, end: usize },
    /// No such field: it would start at `at` (the first field after it in
    /// order, or the closing brace when none follows).
    Absent { at: usize, followed: bool },
}

const SIGNATURES_KEY: &str = "\"signatures\":";

impl CrossSigningKey {
    /// `None` when the stored key data is not a JSON object (Synapse
    /// could not have stored it; such rows are skipped).
    pub fn parse(row: &CrossSigningKeyRow) -> Option<Self> {
        let data = parse_object(&row.keydata)?;
        // Written as serde_json writes the map (compact, in key order),
        // noting where `signatures` is or would be.
        let mut text = String::with_capacity(row.keydata.len() + 2);
        text.push('{');
        let mut signatures = None;
        for (i, (k, v)) in data.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            if signatures.is_none() && k.as_str() > "signatures" {
                signatures = Some(SignaturesAt::Absent { at: text.len(), followed: true });
            }
            let start = text.len();
            text.push_str(&serde_json::to_string(k).expect("a string serialises"));
            text.push(':');
            text.push_str(v.get());
            if k == "signatures" {
                signatures = Some(SignaturesAt::Field { start, end: text.len() });
            }
        }
        let signatures = signatures.unwrap_or(SignaturesAt::Absent { at: text.len(), followed: false });
        text.push('}');
        let json = RawValue::from_string(text).expect("written from a parsed object");
        Some(Self { public_key: last_key_value(&data), user_id: row.user_id.clone(), keytype: row.keytype.clone(), json, signatures })
    }

    pub fn weight(&self) -> usize {
        self.user_id.len() + self.keytype.len() + self.public_key.as_ref().map_or(0, String::len) + self.json.get().len() + 80
    }

    /// The key with `signer`'s signatures `sigs` merged in (as
    /// [`merge_signatures`] merges them), only its `signatures` re-read.
    pub fn signed_by(&self, signer: &str, sigs: &[(&str, &str)]) -> Box<RawValue> {
        let text = self.json.get();
        let mut field = KeyObject::new();
        if let SignaturesAt::Field { start, end } = self.signatures {
            let value = &text[start + SIGNATURES_KEY.len()..end];
            field.insert("signatures".into(), RawValue::from_string(value.to_owned()).expect("a value of the parsed object"));
        }
        merge_signatures(&mut field, signer, sigs, false);
        let Some(merged) = field.get("signatures") else { return self.json.clone() };
        let mut out = String::with_capacity(text.len() + merged.get().len() + 16);
        match self.signatures {
            SignaturesAt::Field { start, end } => {
                out.push_str(&text[..start]);
                out.push_str(SIGNATURES_KEY);
                out.push_str(merged.get());
                out.push_str(&text[end..]);
            }
            SignaturesAt::Absent { at, followed } => {
                out.push_str(&text[..at]);
                if !followed && at > 1 {
                    out.push(',');
                }
                out.push_str(SIGNATURES_KEY);
                out.push_str(merged.get());
                if followed {
                    out.push(',');
                }
                out.push_str(&text[at..]);
            }
        }
        RawValue::from_string(out).expect("spliced from valid JSON")
    }
}

/// One user's `device_keys` entry in an answer.
#[derive(Debug)]
pub enum DeviceMap {
    /// A user's rendered devices, those asked for (all when empty).
    Rendered(Arc<RenderedDevices>, Vec<String>),
    /// Devices built for this answer (remote users, application services).
    Built(BTreeMap<String, KeyObject>),
}

impl Default for DeviceMap {
    fn default() -> Self {
        Self::Built(BTreeMap::new())
    }
}

impl DeviceMap {
    /// The entry as a map to change (a local user's rendered devices are
    /// parsed first: only MSC3984's merge does that).
    pub fn built(&mut self) -> &mut BTreeMap<String, KeyObject> {
        if let Self::Rendered(devices, wanted) = self {
            let map = devices.wanted(wanted).filter_map(|(id, json)| Some((id.clone(), parse_object(json.get())?))).collect();
            *self = Self::Built(map);
        }
        match self {
            Self::Built(map) => map,
            Self::Rendered(..) => unreachable!("just built"),
        }
    }
}

impl Serialize for DeviceMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Built(map) => map.serialize(s),
            Self::Rendered(devices, wanted) => {
                let mut map = s.serialize_map(None)?;
                for (id, json) in devices.wanted(wanted) {
                    map.serialize_entry(id, &**json)?;
                }
                map.end()
            }
        }
    }
}

/// Python's truthiness of a JSON value.
fn is_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// One user's cross-signing key in an answer.
#[derive(Debug)]
pub enum KeyJson {
    /// As rendered: `.1` indexes the user's keys.
    Shared(Arc<Vec<CrossSigningKey>>, usize),
    /// Built for this answer (a remote user's).
    Built(KeyObject),
    /// Rendered for this answer (the requester's signatures spliced in).
    Raw(Box<RawValue>),
}

impl From<KeyObject> for KeyJson {
    fn from(k: KeyObject) -> Self {
        Self::Built(k)
    }
}

impl Serialize for KeyJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Shared(keys, i) => keys[*i].json.serialize(s),
            Self::Built(k) => k.serialize(s),
            Self::Raw(k) => k.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, json: Option<&str>, name: Option<&str>) -> DeviceKeyRow {
        DeviceKeyRow { user_id: "@u:hs".into(), device_id: id.into(), display_name: name.map(Into::into), key_json: json.map(Into::into) }
    }

    fn sig(target_user: &str, target: &str, key_id: &str) -> SignatureRow {
        SignatureRow {
            user_id: "@u:hs".into(),
            key_id: key_id.into(),
            target_user_id: target_user.into(),
            target_device_id: target.into(),
            signature: format!("sig-{key_id}"),
        }
    }

    #[test]
    fn devices_sorted_signed_named_and_filtered() {
        let rows = [
            device("B", Some(r#"{"keys":{"k":"v"},"unsigned":{"x":1}}"#), Some("Phone")),
            device("A", Some(r#"{"keys":{},"signatures":{"@u:hs":{"ed25519:A":"s"}}}"#), None),
            device("E", Some(""), None),
            device("N", None, None),
            device("X", Some("[1]"), None),
        ];
        let sigs = [sig("@u:hs", "A", "ed25519:SSK"), sig("@v:hs", "A", "ed25519:USK")];
        let d = Arc::new(RenderedDevices::local(&rows, &sigs, true));
        let all = serde_json::to_value(DeviceMap::Rendered(d.clone(), vec![])).unwrap();
        assert_eq!(
            all,
            serde_json::json!({
                "A": {"keys": {}, "signatures": {"@u:hs": {"ed25519:A": "s", "ed25519:SSK": "sig-ed25519:SSK"}}, "unsigned": {}},
                "B": {"keys": {"k": "v"}, "signatures": {"@u:hs": {}}, "unsigned": {"device_display_name": "Phone"}},
            })
        );
        let text = serde_json::to_string(&DeviceMap::Rendered(d.clone(), vec![])).unwrap();
        assert!(text.find("\"A\"").unwrap() < text.find("\"B\"").unwrap(), "sorted by device ID: {text}");
        let only_b = serde_json::to_value(DeviceMap::Rendered(d.clone(), vec!["B".into(), "Z".into()])).unwrap();
        assert_eq!(only_b.as_object().unwrap().keys().collect::<Vec<_>>(), ["B"]);
        let mut built = DeviceMap::Rendered(d, vec!["A".into()]);
        assert_eq!(built.built().keys().collect::<Vec<_>>(), ["A"]);
        assert_eq!(serde_json::to_value(&built).unwrap()["A"]["unsigned"], serde_json::json!({}));
    }

    #[test]
    fn remote_cached_devices_as_synapse_renders_them() {
        let row = |id: &str, content: &str| RemoteDeviceRow { user_id: "@r:remote".into(), device_id: id.into(), content: content.into() };
        let rows = [
            row("B", r#"{"keys":{"k":1,"unsigned":{"x":1}},"device_display_name":"Phone"}"#),
            row("A", r#"{"keys":{"k":2},"device_display_name":""}"#),
            row("C", r#"{"keys":{}}"#),
            row("D", r#"{"keys":[1]}"#),
            row("E", "not json"),
            row("F", r#"{"device_display_name":"x"}"#),
        ];
        let d = Arc::new(RenderedDevices::remote_cached(&rows));
        assert_eq!(
            serde_json::to_value(DeviceMap::Rendered(d, vec![])).unwrap(),
            serde_json::json!({
                "A": {"k": 2, "unsigned": {}},
                "B": {"k": 1, "unsigned": {"x": 1, "device_display_name": "Phone"}},
            })
        );
    }

    #[test]
    fn cross_signing_key_parsed_once_and_signed_on_demand() {
        let row = CrossSigningKeyRow {
            user_id: "@u:hs".into(),
            keytype: "master".into(),
            keydata: r#"{"keys":{"ed25519:b":"B","ed25519:a":"A"},"usage":["master"]}"#.into(),
        };
        let k = CrossSigningKey::parse(&row).unwrap();
        assert_eq!(k.public_key.as_deref(), Some("A"));
        let shared = KeyJson::Shared(Arc::new(vec![k]), 0);
        assert_eq!(serde_json::to_value(&shared).unwrap()["usage"], serde_json::json!(["master"]));
        let KeyJson::Shared(keys, _) = &shared else { unreachable!() };
        let signed = keys[0].signed_by("@r:hs", &[("ed25519:USK", "s")]);
        assert_eq!(serde_json::to_value(&signed).unwrap()["signatures"], serde_json::json!({"@r:hs": {"ed25519:USK": "s"}}));
        assert!(CrossSigningKey::parse(&CrossSigningKeyRow { keydata: "1".into(), ..row }).is_none());
    }

    #[test]
    fn a_requesters_signatures_are_spliced_in_as_merging_them_would() {
        let shapes = [
            r#"{"keys":{"ed25519:a":"A"},"signatures":{"@u:hs":{"ed25519:d":"s"}},"usage":["master"],"user_id":"@u:hs"}"#,
            r#"{"keys":{"ed25519:a":"A"},"signatures":{"@r:hs":{"ed25519:old":"o"}},"usage":["master"]}"#,
            r#"{"usage":["master"],"keys":{"ed25519:a":"A"},"user_id":"@u:hs"}"#,
            r#"{"keys":{"ed25519:a":"A"},"a":1}"#,
            r#"{"keys":{"ed25519:a":"A"},"zz":"\u00e9\"","signatures":"not an object"}"#,
            r#"{"signatures":{}}"#,
            r#"{"keys":{"ed25519:a":"A"},"signatures":{"@r:hs":[1]}}"#,
            r#"{}"#,
        ];
        for keydata in shapes {
            let row = CrossSigningKeyRow { user_id: "@u:hs".into(), keytype: "master".into(), keydata: keydata.into() };
            let key = CrossSigningKey::parse(&row).unwrap();
            let unsigned: Value = serde_json::from_str(key.json.get()).unwrap();
            assert_eq!(unsigned, serde_json::from_str::<Value>(keydata).unwrap(), "{keydata}");
            for sigs in [&[][..], &[("ed25519:USK", "s1")][..], &[("ed25519:USK", "s1"), ("ed25519:old", "s2")][..]] {
                let mut expected = parse_object(keydata).unwrap();
                merge_signatures(&mut expected, "@r:hs", sigs, false);
                let spliced: Value = serde_json::from_str(key.signed_by("@r:hs", sigs).get()).unwrap();
                assert_eq!(spliced, serde_json::to_value(&expected).unwrap(), "{keydata} {sigs:?}");
            }
        }
    }
}
