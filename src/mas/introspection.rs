//! What MAS says about a token, read as strictly as Synapse's pydantic
//! `IntrospectionResponse`, and the claims Synapse takes from it
//! (`MasDelegatedAuth.get_user_by_access_token`), in Synapse's order.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

pub const UNSTABLE_SCOPE_MATRIX_API: &str = "urn:matrix:org.matrix.msc2967.client:api:*";
pub const UNSTABLE_SCOPE_MATRIX_DEVICE_PREFIX: &str = "urn:matrix:org.matrix.msc2967.client:device:";
pub const STABLE_SCOPE_MATRIX_API: &str = "urn:matrix:client:api:*";
pub const STABLE_SCOPE_MATRIX_DEVICE_PREFIX: &str = "urn:matrix:client:device:";
/// The scope that makes a token a server admin's (`MasDelegatedAuth.is_server_admin`).
pub const ADMIN_SCOPE: &str = "urn:synapse:admin:*";

/// A valid introspection answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Introspection {
    /// When we received it (Unix ms): `expires_in` counts from here.
    pub retrieved_at_ms: i64,
    pub active: bool,
    pub scope: Option<String>,
    pub username: Option<String>,
    pub device_id: Option<String>,
    /// Seconds; integers only, of any size.
    pub expires_in: Option<i128>,
}

/// Why a token is refused, with Synapse's words. The first two are the
/// client's (401); the others are faults of the auth server, which Synapse
/// answers 500 `M_FORBIDDEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("Token is not active")]
    Inactive,
    #[error("Token doesn't grant access to the Matrix C-S API")]
    NoApiScope,
    #[error("Invalid username claim in the introspection result")]
    NoUsername,
    #[error("User not found")]
    UnknownUser,
    #[error("Multiple device IDs in scope")]
    MultipleDevices,
    #[error("Invalid device ID in introspection result")]
    InvalidDevice,
}

impl Introspection {
    /// Parses MAS's answer body; any deviation from the model (not UTF-8,
    /// not JSON, not an object, a field of the wrong type, `active`
    /// missing) is an error, as it is for Synapse.
    pub fn parse(body: &[u8], retrieved_at_ms: i64) -> Result<Self, String> {
        let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(map) = value else { return Err("not a JSON object".into()) };
        // Synapse passes the fields as keyword arguments next to its own
        // `retrieved_at_ms`: the same key from MAS is an error there.
        if map.contains_key("retrieved_at_ms") {
            return Err("unexpected `retrieved_at_ms`".into());
        }
        let active = match map.get("active") {
            Some(Value::Bool(b)) => *b,
            _ => return Err("`active` is not a boolean".into()),
        };
        // `sub` is validated though unused, as the model does.
        optional_string(&map, "sub")?;
        let expires_in = match map.get("expires_in") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.as_i64().map(i128::from).or(n.as_u64().map(i128::from)),
            Some(_) => return Err("`expires_in` is not an integer".into()),
        };
        Ok(Self {
            retrieved_at_ms,
            active,
            scope: optional_string(&map, "scope")?,
            username: optional_string(&map, "username")?,
            device_id: optional_string(&map, "device_id")?,
            expires_in,
        })
    }

    /// Active, and not past `expires_in` (compatibility tokens have none).
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.active && self.expires_in.is_none_or(|s| i128::from(now_ms) < s * 1000 + i128::from(self.retrieved_at_ms))
    }

    /// The scope's tokens (space-separated, empty ones skipped).
    pub fn scopes(&self) -> BTreeSet<&str> {
        self.scope.as_deref().map(|s| s.split(' ').filter(|t| !t.is_empty()).collect()).unwrap_or_default()
    }

    /// The user's localpart, once the token is active and grants the
    /// client-server API.
    pub fn localpart(&self, now_ms: i64) -> Result<&str, Rejection> {
        if !self.is_active(now_ms) {
            return Err(Rejection::Inactive);
        }
        let scopes = self.scopes();
        if !scopes.contains(UNSTABLE_SCOPE_MATRIX_API) && !scopes.contains(STABLE_SCOPE_MATRIX_API) {
            return Err(Rejection::NoApiScope);
        }
        self.username.as_deref().ok_or(Rejection::NoUsername)
    }

    /// The device: the explicit `device_id` (compatibility sessions), else
    /// the one device scope; at most 255 characters, at least one.
    pub fn device(&self) -> Result<Option<&str>, Rejection> {
        let device = match self.device_id.as_deref() {
            Some(d) => Some(d),
            None => {
                let scopes = self.scopes();
                let in_scope: BTreeSet<&str> = scopes
                    .iter()
                    .filter_map(|t| {
                        t.strip_prefix(UNSTABLE_SCOPE_MATRIX_DEVICE_PREFIX).or_else(|| t.strip_prefix(STABLE_SCOPE_MATRIX_DEVICE_PREFIX))
                    })
                    .collect();
                if in_scope.len() > 1 {
                    return Err(Rejection::MultipleDevices);
                }
                in_scope.into_iter().next()
            }
        };
        match device {
            Some(d) if d.is_empty() || d.chars().count() > 255 => Err(Rejection::InvalidDevice),
            other => Ok(other),
        }
    }
}

fn optional_string(map: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("`{key}` is not a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Introspection, String> {
        Introspection::parse(json.as_bytes(), 1_000_000)
    }

    #[test]
    fn strict_like_the_pydantic_model() {
        assert!(parse(r#"{"active": true, "extra": [1], "sub": null}"#).is_ok());
        for bad in [
            "",
            "[]",
            "null",
            r#"{"active": "true"}"#,
            r#"{"active": 1}"#,
            r#"{}"#,
            r#"{"active": true, "scope": 5}"#,
            r#"{"active": true, "sub": 5}"#,
            r#"{"active": true, "username": ["a"]}"#,
            r#"{"active": true, "device_id": 7}"#,
            r#"{"active": true, "expires_in": 1.5}"#,
            r#"{"active": true, "expires_in": 2.0}"#,
            r#"{"active": true, "expires_in": true}"#,
            r#"{"active": true, "expires_in": "60"}"#,
            r#"{"active": true, "retrieved_at_ms": 1}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(Introspection::parse(b"{\"active\": true, \"x\": \"\xff\"}", 0).is_err(), "not UTF-8");
    }

    #[test]
    fn expiry_counts_from_retrieval() {
        let t = parse(r#"{"active": true, "expires_in": 60}"#).unwrap();
        assert!(t.is_active(1_000_000 + 59_999));
        assert!(!t.is_active(1_000_000 + 60_000));
        assert!(parse(r#"{"active": true}"#).unwrap().is_active(i64::MAX), "no expiry");
        assert!(parse(r#"{"active": true, "expires_in": 18446744073709551615}"#).unwrap().is_active(i64::MAX));
        assert!(!parse(r#"{"active": false}"#).unwrap().is_active(0));
        assert!(!parse(r#"{"active": true, "expires_in": -1}"#).unwrap().is_active(1_000_000));
    }

    #[test]
    fn claims_in_synapses_order() {
        let claims = |json: &str| {
            let t = parse(json).unwrap();
            t.localpart(1_000_000).map(str::to_owned).and_then(|u| Ok((u, t.device()?.map(str::to_owned))))
        };
        let ok = |u: &str, d: Option<&str>| Ok((u.to_owned(), d.map(str::to_owned)));
        assert_eq!(
            claims(r#"{"active": true, "scope": "urn:matrix:client:api:* urn:matrix:client:device:D1", "username": "al"}"#),
            ok("al", Some("D1"))
        );
        assert_eq!(
            claims(
                r#"{"active": true, "scope": "  urn:matrix:org.matrix.msc2967.client:api:*  urn:matrix:org.matrix.msc2967.client:device:D2", "username": "al"}"#
            ),
            ok("al", Some("D2"))
        );
        assert_eq!(
            claims(
                r#"{"active": true, "scope": "urn:matrix:client:api:* urn:matrix:client:device:D1", "device_id": "D9", "username": "al"}"#
            ),
            ok("al", Some("D9")),
            "the explicit device wins"
        );
        assert_eq!(claims(r#"{"active": true, "scope": "urn:matrix:client:api:*", "username": "al"}"#), ok("al", None));
        assert_eq!(
            claims(
                r#"{"active": true, "scope": "urn:matrix:client:api:* urn:matrix:client:device:D urn:matrix:org.matrix.msc2967.client:device:D", "username": "al"}"#
            ),
            ok("al", Some("D")),
            "one device named twice"
        );
        assert_eq!(claims(r#"{"active": false, "scope": "urn:matrix:client:api:*", "username": "al"}"#), Err(Rejection::Inactive));
        assert_eq!(claims(r#"{"active": true, "scope": "openid urn:matrix:client:api", "username": "al"}"#), Err(Rejection::NoApiScope));
        assert_eq!(claims(r#"{"active": true, "scope": "urn:matrix:client:api:*"}"#), Err(Rejection::NoUsername));
        assert_eq!(
            claims(
                r#"{"active": true, "scope": "urn:matrix:client:api:* urn:matrix:client:device:A urn:matrix:client:device:B", "username": "al"}"#
            ),
            Err(Rejection::MultipleDevices)
        );
        assert_eq!(
            claims(r#"{"active": true, "scope": "urn:matrix:client:api:*", "device_id": "", "username": "al"}"#),
            Err(Rejection::InvalidDevice)
        );
        assert_eq!(
            claims(r#"{"active": true, "scope": "urn:matrix:client:api:* urn:matrix:client:device:", "username": "al"}"#),
            Err(Rejection::InvalidDevice)
        );
        let long =
            format!(r#"{{"active": true, "scope": "urn:matrix:client:api:*", "device_id": "{}", "username": "al"}}"#, "é".repeat(255));
        assert_eq!(claims(&long), ok("al", Some(&"é".repeat(255))), "255 characters, not bytes");
        let longer = long.replace(&"é".repeat(255), &"é".repeat(256));
        assert_eq!(claims(&longer), Err(Rejection::InvalidDevice));
    }
}
