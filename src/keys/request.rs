//! Parsing a `/keys/query` body exactly as Synapse's `KeyQueryServlet` does.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::body::Body;
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
    /// The request already waited for a read-barrier probe that started
    /// after it arrived (authentication did, under MAS).
    pub caught_up: bool,
    /// Record where each remote user's part of the answer came from
    /// (the admin API's explain), in [`super::KeysQueryResponse::provenance`].
    pub explain: bool,
}

impl KeysQuery {
    pub fn parse(body: &[u8]) -> Result<Self, KeysError> {
        let text = std::str::from_utf8(body).map_err(|_| KeysError::NotJson)?;
        let body = Body::read(text).map_err(|_| KeysError::NotJson)?;
        if !body.object {
            return Err(KeysError::BadJson("Content must be a JSON object."));
        }
        let Some(mut entries) = body.device_keys else {
            return Err(KeysError::BadJson("'device_keys' must be a JSON object"));
        };
        // As the dict Synapse reads: of duplicate user IDs the last sent
        // wins (reversed, then a stable sort puts it first of its run).
        entries.reverse();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|later, first| later.0 == first.0);
        let mut users = Vec::with_capacity(entries.len());
        let mut all_lists = true;
        for (user_id, devices) in entries {
            let Some(devices) = devices else {
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
        Ok(Self {
            users,
            body_timeout_ms: body.timeout,
            timeout: Duration::from_secs(10),
            arrived: Instant::now(),
            caught_up: false,
            explain: false,
        })
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

    /// The users with their devices and the timeout, or the error's words.
    type Reading = Result<(Vec<(String, Vec<String>)>, Option<u64>), &'static str>;

    /// The reading this module replaced (a `serde_json::Value` tree, read
    /// as Synapse reads its dict), kept as the oracle for the one-pass one.
    fn reference(body: &[u8]) -> Reading {
        use serde_json::Value;
        let text = std::str::from_utf8(body).map_err(|_| "not JSON")?;
        let value: Value = serde_json::from_str(text).map_err(|_| "not JSON")?;
        let Value::Object(mut obj) = value else { return Err("Content must be a JSON object.") };
        let Some(Value::Object(device_keys)) = obj.remove("device_keys") else { return Err("'device_keys' must be a JSON object") };
        let mut users = Vec::new();
        let mut all_lists = true;
        for (user_id, devices) in device_keys {
            let list = match devices {
                Value::Array(items) => items.into_iter().map(|i| if let Value::String(s) = i { Some(s) } else { None }).collect(),
                _ => None,
            };
            let Some(list) = list else {
                all_lists = false;
                continue;
            };
            if is_valid_user_id(&user_id) {
                users.push((user_id, list));
            }
        }
        if !all_lists {
            return Err("'device_keys' values must be a list of strings");
        }
        Ok((users, obj.get("timeout").and_then(Value::as_u64)))
    }

    fn ours(body: &[u8]) -> Reading {
        match KeysQuery::parse(body) {
            Ok(q) => Ok((q.users, q.body_timeout_ms)),
            Err(KeysError::NotJson) => Err("not JSON"),
            Err(KeysError::BadJson(m)) => Err(m),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    /// Every body of a corpus (hand-picked shapes, and every combination of
    /// a few top-level and `device_keys` fragments) reads as it did.
    #[test]
    fn one_pass_reading_agrees_with_the_value_tree() {
        let mut bodies: Vec<String> = [
            "",
            " ",
            "{",
            "}",
            "[]",
            "[1,",
            "null",
            "true",
            "3",
            "-0",
            "\"s\"",
            "{} x",
            "{}  ",
            "{\"a\": NaN}",
            "{\"device_keys\": {}} {}",
            "{\"device_keys\": {\"@a:hs\": []}, \"device_keys\": 5}",
            "{\"device_keys\": 5, \"device_keys\": {\"@a:hs\": []}}",
            "{\"device_keys\": {\"@a:hs\": [\"D\"], \"@a:hs\": [\"E\"]}}",
            "{\"device_keys\": {\"@a:hs\": 5, \"@a:hs\": []}}",
            "{\"device_keys\": {\"@a:hs\": [], \"@a:hs\": 5}}",
            "{\"device_keys\": {\"\\u0040b:hs\": [\"\\u0044\"], \"@a:hs\": []}}",
            "{\"device_keys\": {\"@a:hs\": [[\"D\"]]}}",
            "{\"device_keys\": {\"@a:hs\": [\"D\", 1]}}",
            "{\"device_keys\": {\"@a:hs\": [\"D\",]}}",
            "{\"device_keys\": {\"@a:hs\": []}, \"x\": [[[[{\"y\": [1.5e300, -1, null]}]]]]}",
            "\u{feff}{\"device_keys\": {}}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let deep = format!("{{\"device_keys\": {{}}, \"x\": {}{}}}", "[".repeat(200), "]".repeat(200));
        bodies.push(deep);
        let tops = [
            "",
            "\"timeout\": 2500",
            "\"timeout\": -1",
            "\"timeout\": 2.5",
            "\"timeout\": 18446744073709551616",
            "\"timeout\": \"9\"",
            "\"timeout\": 1, \"timeout\": null",
            "\"timeout\": -0",
            "\"other\": {\"device_keys\": 1}",
        ];
        let entries = [
            "",
            "\"@a:hs\": []",
            "\"@c:hs\": [\"D1\", \"D2\"]",
            "\"bad\": []",
            "\"@b:h_s\": [\"X\"]",
            "\"nope\": \"D\"",
            "\"@d:hs\": {\"D\": true}",
            "\"@e:hs\": null",
            "\"@a:hs\": [\"Z\"]",
            "\"@\\u00e9:hs\": []",
        ];
        for top in tops {
            for (i, a) in entries.iter().enumerate() {
                for b in &entries[i..] {
                    let inner = [*a, *b].iter().filter(|e| !e.is_empty()).copied().collect::<Vec<_>>().join(", ");
                    let fields = [format!("\"device_keys\": {{{inner}}}"), top.to_owned()];
                    let fields = fields.iter().filter(|f| !f.is_empty()).cloned().collect::<Vec<_>>();
                    bodies.push(format!("{{{}}}", fields.join(", ")));
                    bodies.push(format!("{{{}}}", fields.iter().rev().cloned().collect::<Vec<_>>().join(", ")));
                }
            }
            bodies.push(format!("{{{top}}}"));
        }
        assert!(bodies.len() > 900, "{} bodies", bodies.len());
        for body in &bodies {
            assert_eq!(ours(body.as_bytes()), reference(body.as_bytes()), "body: {body}");
        }
        assert_eq!(ours(&[0xff, 0xfe]), reference(&[0xff, 0xfe]));
    }
}
