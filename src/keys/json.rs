//! Key objects as stored JSON, opened one level deep: top-level fields keep
//! their raw text and only `signatures` and `unsigned` are ever rebuilt, so
//! the rest of a stored key passes through untouched.

use std::collections::BTreeMap;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::{RawValue, to_raw_value};
use serde_json::{Map, Value};

/// A JSON object whose values are kept as raw JSON text.
pub type KeyObject = BTreeMap<String, Box<RawValue>>;

pub fn parse_object(text: &str) -> Option<KeyObject> {
    serde_json::from_str(text).ok()
}

/// `obj.signatures[signer][key_id] = signature` for each pair, as Synapse's
/// `setdefault` chain does. With `ensure_entry`, `signatures[signer]` is
/// created even when there is nothing to add (Synapse does that for every
/// device it looks cross-signatures up for). A `signatures` value that is
/// not an object is left alone.
pub fn merge_signatures(obj: &mut KeyObject, signer: &str, sigs: &[(&str, &str)], ensure_entry: bool) {
    if sigs.is_empty() && !ensure_entry {
        return;
    }
    let mut all: Map<String, Value> = match obj.get("signatures") {
        None => Map::new(),
        Some(raw) => match serde_json::from_str(raw.get()) {
            Ok(m) => m,
            Err(_) => return,
        },
    };
    let existed = all.contains_key(signer);
    let entry = all.entry(signer.to_owned()).or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(m) = entry {
        for (key_id, sig) in sigs {
            m.insert((*key_id).to_owned(), Value::String((*sig).to_owned()));
        }
    }
    if existed && sigs.is_empty() {
        return;
    }
    obj.insert("signatures".into(), to_raw_value(&all).expect("JSON map serialises"));
}

/// `unsigned` as Synapse sets it on local devices: replaced by an object
/// holding only the display name, when there is one.
pub fn set_unsigned_display_name(obj: &mut KeyObject, display_name: Option<&str>) {
    let unsigned = match display_name {
        Some(name) => to_raw_value(&serde_json::json!({ "device_display_name": name })),
        None => to_raw_value(&Map::new()),
    };
    obj.insert("unsigned".into(), unsigned.expect("JSON object serialises"));
}

/// The last value, in text order, of the `keys` object of a cross-signing
/// key: what Synapse takes as the key's "device ID" (its public part) when
/// looking up signatures on it. `None` unless it is a string.
pub fn last_key_value(obj: &KeyObject) -> Option<String> {
    struct LastString;
    impl<'de> Visitor<'de> for LastString {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut last = None;
            while let Some((_, v)) = map.next_entry::<IgnoredAny, Value>()? {
                last = Some(v);
            }
            Ok(match last {
                Some(Value::String(s)) => Some(s),
                _ => None,
            })
        }
    }
    let raw = obj.get("keys")?;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.deserialize_map(LastString).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> KeyObject {
        parse_object(s).unwrap()
    }

    fn value(o: &KeyObject) -> Value {
        serde_json::to_value(o).unwrap()
    }

    #[test]
    fn merge_creates_and_extends() {
        let mut o = obj(r#"{"keys":{"a":"b"},"signatures":{"@u:hs":{"ed25519:D":"s1"}}}"#);
        merge_signatures(&mut o, "@u:hs", &[("ed25519:SSK", "s2")], true);
        assert_eq!(value(&o)["signatures"]["@u:hs"], serde_json::json!({"ed25519:D": "s1", "ed25519:SSK": "s2"}));
        let mut o = obj(r#"{"keys":{}}"#);
        merge_signatures(&mut o, "@u:hs", &[], true);
        assert_eq!(value(&o)["signatures"], serde_json::json!({"@u:hs": {}}));
        let mut o = obj(r#"{"keys":{}}"#);
        merge_signatures(&mut o, "@u:hs", &[], false);
        assert!(!o.contains_key("signatures"));
        let mut o = obj(r#"{"signatures":"odd"}"#);
        merge_signatures(&mut o, "@u:hs", &[("k", "s")], true);
        assert_eq!(value(&o)["signatures"], "odd");
    }

    #[test]
    fn unsigned_replaced() {
        let mut o = obj(r#"{"unsigned":{"x":1}}"#);
        set_unsigned_display_name(&mut o, Some("Phone"));
        assert_eq!(value(&o)["unsigned"], serde_json::json!({"device_display_name": "Phone"}));
        set_unsigned_display_name(&mut o, None);
        assert_eq!(value(&o)["unsigned"], serde_json::json!({}));
    }

    #[test]
    fn last_key_in_text_order() {
        assert_eq!(last_key_value(&obj(r#"{"keys":{"ed25519:b":"B","ed25519:a":"A"}}"#)).as_deref(), Some("A"));
        assert_eq!(last_key_value(&obj(r#"{"keys":{"ed25519:a":1}}"#)), None);
        assert_eq!(last_key_value(&obj(r#"{"x":1}"#)), None);
    }
}
