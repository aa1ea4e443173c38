//! Parsing a `/keys/query` body exactly as Synapse's `KeyQueryServlet` does.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Context, KeysError};
use crate::ids::is_valid_user_id;

/// A parsed query: the valid user IDs (sorted; of duplicate keys the last
/// wins, as in Synapse) with the devices asked for (empty = all).
#[derive(Debug, Clone, PartialEq)]
pub struct KeysQuery {
    pub users: Vec<(String, Vec<String>)>,
    /// The spec's body `timeout` (ms), when it is a non-negative integer.
    pub body_timeout_ms: Option<u64>,
    /// How long remote servers may take, resolved by the caller from the
    /// query string (Synapse) or the body (spec), bounded by our settings.
    pub timeout: Duration,
    /// When the request arrived: the answer is due `timeout` after it.
    pub arrived: Instant,
}

impl KeysQuery {
    pub fn parse(body: &[u8]) -> Result<Self, KeysError> {
        let text = std::str::from_utf8(body).map_err(|_| KeysError::NotJson)?;
        let value: Value = serde_json::from_str(text).map_err(|_| KeysError::NotJson)?;
        let Value::Object(mut obj) = value else {
            return Err(KeysError::BadJson("Content must be a JSON object."));
        };
        let Some(Value::Object(device_keys)) = obj.remove("device_keys") else {
            return Err(KeysError::BadJson("'device_keys' must be a JSON object"));
        };
        let mut users = Vec::with_capacity(device_keys.len());
        let mut all_lists = true;
        for (user_id, devices) in device_keys {
            let Some(devices) = string_list(devices) else {
                all_lists = false;
                continue;
            };
            if is_valid_user_id(&user_id) {
                users.push((user_id, devices));
            }
        }
        if !all_lists {
            return Err(KeysError::BadJson("'device_keys' values must be a list of strings"));
        }
        let body_timeout_ms = obj.get("timeout").and_then(Value::as_u64);
        Ok(Self { users, body_timeout_ms, timeout: Duration::from_secs(10), arrived: Instant::now() })
    }
}

impl KeysQuery {
    /// When the remote part must be done: `timeout` after the request
    /// arrived, whatever the steps before it (auth, a queue for the
    /// device's slot, the read barrier) took.
    pub fn deadline(&self) -> Instant {
        self.arrived + self.timeout
    }

    /// MSC4263: drops the users who share no joined or invited room with
    /// `requester` (the requester too, when in no room at all).
    pub async fn keep_users_sharing_a_room_with(&mut self, ctx: &impl Context, requester: &str) -> Result<(), KeysError> {
        let users: Vec<&str> = self.users.iter().map(|(u, _)| u.as_str()).collect();
        let allowed: HashSet<String> = ctx.users_sharing_a_room_with(requester, &users).await?.into_iter().collect();
        self.users.retain(|(u, _)| allowed.contains(u));
        Ok(())
    }
}

fn string_list(v: Value) -> Option<Vec<String>> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> &'static str {
        match KeysQuery::parse(body.as_bytes()).unwrap_err() {
            KeysError::NotJson => "not JSON",
            KeysError::BadJson(_) => "bad JSON",
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn shapes_rejected_like_synapse() {
        assert_eq!(err(""), "not JSON");
        assert_eq!(err("{"), "not JSON");
        assert_eq!(err("{\"a\": NaN}"), "not JSON");
        assert_eq!(err("[]"), "bad JSON");
        assert_eq!(err("{}"), "bad JSON");
        assert_eq!(err("{\"device_keys\": []}"), "bad JSON");
        assert_eq!(err("{\"device_keys\": {\"@a:hs\": {\"D\": true}}}"), "bad JSON");
        assert_eq!(err("{\"device_keys\": {\"@a:hs\": [1]}}"), "bad JSON");
        // A bad value is an error even under an invalid user ID.
        assert_eq!(err("{\"device_keys\": {\"nope\": \"D\"}}"), "bad JSON");
        assert!(KeysQuery::parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn invalid_user_ids_dropped_and_timeout_read() {
        let q = KeysQuery::parse(br#"{"device_keys": {"@a:hs": [], "bad": [], "@b:h_s": ["X"], "@c:hs": ["D1", "D2"]}, "timeout": 2500}"#)
            .unwrap();
        assert_eq!(q.users, vec![("@a:hs".to_string(), vec![]), ("@c:hs".to_string(), vec!["D1".to_string(), "D2".to_string()])]);
        assert_eq!(q.body_timeout_ms, Some(2500));
        let q = KeysQuery::parse(br#"{"device_keys": {}, "timeout": "soon"}"#).unwrap();
        assert_eq!(q.body_timeout_ms, None);
    }
}
