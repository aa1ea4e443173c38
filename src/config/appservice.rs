//! Application-service registrations (Synapse's `app_service_config_files`):
//! bridges authenticate with their `as_token` and may act as users in their
//! namespace (`?user_id=`), as Synapse's `get_appservice_user` allows.

use std::path::Path;

use ipnet::IpNet;
use regex::Regex;
use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone)]
pub struct AppService {
    pub id: String,
    pub as_token: String,
    /// `@sender_localpart:server_name`.
    pub sender: String,
    /// User-namespace regexes, each with its `exclusive` flag, in order.
    user_namespaces: Vec<(Regex, bool)>,
    /// When set, only these client addresses may use the token.
    pub ip_range_whitelist: Option<Vec<IpNet>>,
    /// Where Synapse reaches the service (`url`; `None` when null).
    pub url: Option<String>,
    /// The token Synapse presents to the service.
    pub hs_token: String,
}

#[derive(Deserialize)]
struct Registration {
    id: String,
    as_token: String,
    #[serde(default)]
    hs_token: String,
    url: Option<String>,
    sender_localpart: String,
    #[serde(default)]
    namespaces: Namespaces,
    ip_range_whitelist: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct Namespaces {
    #[serde(default)]
    users: Vec<NamespaceEntry>,
}

#[derive(Deserialize)]
struct NamespaceEntry {
    regex: String,
    #[serde(default)]
    exclusive: bool,
}

impl AppService {
    pub fn load(path: &Path, server_name: &str) -> Result<Self, ConfigError> {
        let err = |e: &dyn std::fmt::Display| ConfigError::new(format!("application service file {}: {e}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| err(&e))?;
        let r: Registration = yaml_serde::from_str(&text).map_err(|e| err(&e))?;
        let user_namespaces = r
            .namespaces
            .users
            .iter()
            // Python's re.match anchors at the start only.
            .map(|n| {
                let regex =
                    Regex::new(&format!("^(?:{})", n.regex)).map_err(|e| err(&format!("user namespace regex `{}`: {e}", n.regex)))?;
                Ok((regex, n.exclusive))
            })
            .collect::<Result<_, _>>()?;
        let ip_range_whitelist = match r.ip_range_whitelist {
            Some(list) => Some(
                list.iter()
                    .map(|s| s.parse::<IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from)).map_err(|e| err(&e)))
                    .collect::<Result<_, _>>()?,
            ),
            None => None,
        };
        Ok(Self {
            sender: format!("@{}:{server_name}", r.sender_localpart),
            id: r.id,
            as_token: r.as_token,
            user_namespaces,
            ip_range_whitelist,
            url: r.url,
            hs_token: r.hs_token,
        })
    }

    /// Synapse's `is_interested_in_user`: the sender, or a user-namespace match.
    pub fn is_interested_in_user(&self, user_id: &str) -> bool {
        user_id == self.sender || self.user_namespaces.iter().any(|(r, _)| r.is_match(user_id))
    }

    /// Synapse's `is_exclusive_user`: the first user namespace matching is
    /// exclusive, or the user is the sender.
    pub fn is_exclusive_user(&self, user_id: &str) -> bool {
        user_id == self.sender || self.user_namespaces.iter().find(|(r, _)| r.is_match(user_id)).is_some_and(|(_, exclusive)| *exclusive)
    }

    /// Whether an exclusive user namespace matches (Synapse's
    /// `exclusive_user_regex`, which does not include the sender).
    pub fn has_exclusive_namespace_for(&self, user_id: &str) -> bool {
        self.user_namespaces.iter().any(|(r, exclusive)| *exclusive && r.is_match(user_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_and_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bridge.yaml");
        std::fs::write(
            &p,
            "id: bridge\nurl: null\nas_token: AS\nhs_token: HS\nsender_localpart: bot\nnamespaces:\n  users:\n    - {regex: '@bridged_.*', exclusive: true}\n",
        )
        .unwrap();
        let a = AppService::load(&p, "hs").unwrap();
        assert_eq!(a.sender, "@bot:hs");
        assert!(a.is_interested_in_user("@bot:hs"));
        assert!(a.is_interested_in_user("@bridged_x:hs"));
        assert!(!a.is_interested_in_user("@x_bridged_y:hs"), "anchored at the start like re.match");
        assert!(a.ip_range_whitelist.is_none());
        assert_eq!((a.url.as_deref(), a.hs_token.as_str()), (None, "HS"));
        assert!(a.is_exclusive_user("@bridged_x:hs") && a.is_exclusive_user("@bot:hs") && !a.is_exclusive_user("@x:hs"));
        assert!(a.has_exclusive_namespace_for("@bridged_x:hs") && !a.has_exclusive_namespace_for("@bot:hs"));
        std::fs::write(&p, "id: x\n").unwrap();
        assert!(AppService::load(&p, "hs").unwrap_err().to_string().contains("bridge.yaml"));
    }
}
