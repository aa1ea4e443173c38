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
    user_namespaces: Vec<Regex>,
    /// When set, only these client addresses may use the token.
    pub ip_range_whitelist: Option<Vec<IpNet>>,
}

#[derive(Deserialize)]
struct Registration {
    id: String,
    as_token: String,
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
}

impl AppService {
    pub fn load(path: &Path, server_name: &str) -> Result<Self, ConfigError> {
        let err = |e: &dyn std::fmt::Display| ConfigError::new(format!("application service file {}: {e}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| err(&e))?;
        let r: Registration = serde_yaml::from_str(&text).map_err(|e| err(&e))?;
        let user_namespaces = r
            .namespaces
            .users
            .iter()
            // Python's re.match anchors at the start only.
            .map(|n| Regex::new(&format!("^(?:{})", n.regex)).map_err(|e| err(&format!("user namespace regex `{}`: {e}", n.regex))))
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
        })
    }

    /// Synapse's `is_interested_in_user`: the sender, or a user-namespace match.
    pub fn is_interested_in_user(&self, user_id: &str) -> bool {
        user_id == self.sender || self.user_namespaces.iter().any(|r| r.is_match(user_id))
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
        std::fs::write(&p, "id: x\n").unwrap();
        assert!(AppService::load(&p, "hs").unwrap_err().to_string().contains("bridge.yaml"));
    }
}
