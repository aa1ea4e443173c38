//! A resynced device list, from either of the shapes the device-lists
//! writer answers with, or from a remote's `GET /user/devices`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

pub use crate::keys::UserDevices;

#[derive(Deserialize)]
struct Entry {
    device_id: String,
    keys: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Cached {
    keys: Option<Box<RawValue>>,
}

impl UserDevices {
    /// Accepts `{"devices": [...], "master_key"?, "self_signing_key"?, ...}`
    /// and the bare `{device_id: content}` map the writer sends for a user
    /// it already had cached. Devices without keys are left out.
    pub fn parse(raw: Box<RawValue>, stream_pos: Option<Arc<RawValue>>) -> Option<Self> {
        let mut top: BTreeMap<String, Box<RawValue>> = serde_json::from_str(raw.get()).ok()?;
        let is_resync_result = top.contains_key("devices");
        let (devices, master_key, self_signing_key) = match top.remove("devices") {
            Some(list) => {
                let entries: Vec<Entry> = serde_json::from_str(list.get()).ok()?;
                let devices = entries.into_iter().filter_map(|e| Some((e.device_id, e.keys?))).collect();
                (devices, non_null(top.remove("master_key")), non_null(top.remove("self_signing_key")))
            }
            None => {
                let devices = top
                    .into_iter()
                    .filter_map(|(id, content)| {
                        let c: Cached = serde_json::from_str(content.get()).ok()?;
                        Some((id, c.keys?))
                    })
                    .collect();
                (devices, None, None)
            }
        };
        Some(Self { raw, devices, master_key, self_signing_key, stream_pos, is_resync_result })
    }
}

fn non_null(v: Option<Box<RawValue>>) -> Option<Box<RawValue>> {
    v.filter(|r| r.get() != "null")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn full_shape() {
        let d = UserDevices::parse(
            raw(r#"{"user_id":"@a:r","stream_id":3,"devices":[{"device_id":"D1","keys":{"k":1}},{"device_id":"D2"}],"master_key":{"m":1},"self_signing_key":null}"#),
            None,
        )
        .unwrap();
        assert!(d.is_resync_result);
        assert_eq!(d.devices.len(), 1);
        assert_eq!(d.devices[0].0, "D1");
        assert_eq!(d.devices[0].1.get(), r#"{"k":1}"#);
        assert_eq!(d.master_key.unwrap().get(), r#"{"m":1}"#);
        assert!(d.self_signing_key.is_none());
    }

    #[test]
    fn bare_cached_shape() {
        let d =
            UserDevices::parse(raw(r#"{"D1":{"device_id":"D1","keys":{"k":2},"device_display_name":"x"},"D2":{"deleted":true}}"#), None)
                .unwrap();
        assert_eq!(d.devices.len(), 1);
        assert_eq!(d.devices[0].1.get(), r#"{"k":2}"#);
        assert!(d.master_key.is_none());
        assert!(!d.is_resync_result);
    }

    #[test]
    fn garbage_rejected() {
        assert!(UserDevices::parse(raw("[1]"), None).is_none());
        assert!(UserDevices::parse(raw(r#"{"devices": 5}"#), None).is_none());
    }
}
