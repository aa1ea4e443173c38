//! The keys of Synapse's own `homeserver.yaml` / worker YAML that we use.
//! Everything else in those files is ignored, as Synapse workers ignore
//! settings that are not theirs.

use std::path::PathBuf;

use serde::Deserialize;
use yaml_serde::{Mapping, Value};

use super::{ConfigError, DatabaseConfig};

#[derive(Debug, Clone)]
pub struct SynapseConfig {
    pub server_name: String,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    /// The shared secret of the replication HTTP API, if set.
    pub worker_replication_secret: Option<String>,
    /// Where to send resync requests: `instance_map` entry of the first
    /// `stream_writers.device_lists` instance, else `main`.
    pub device_lists_writer: Option<InstanceLocation>,
    /// The instances writing the device-list stream, named as Synapse names
    /// them in its tables (`main` is `master`).
    pub device_lists_writers: Vec<String>,
    pub signing_key_path: Option<PathBuf>,
    /// How outbound federation requests are made and where they may go.
    pub federation: super::federation::FederationSettings,
    pub msc4263_limit_key_queries_to_users_who_share_rooms: bool,
    /// `experimental_features.msc3984_appservice_key_query`: application
    /// services are asked for their exclusive users' device keys.
    pub msc3984_appservice_key_query: bool,
    /// `account_validity.enabled`: expired accounts are refused (403).
    pub account_validity_enabled: bool,
    /// Registrations from `app_service_config_files`.
    pub app_services: Vec<super::appservice::AppService>,
    /// The key guest-token macaroons are signed with, found as Synapse finds
    /// it: `macaroon_secret_key(_path)`, else `registration_shared_secret`,
    /// else the SHA-256 of the signing key's seed.
    pub macaroon_secret: Option<Vec<u8>>,
    /// `matrix_authentication_service`, when enabled: user tokens are
    /// introspected by MAS instead of looked up in `access_tokens`.
    pub mas: Option<super::mas::MasConfig>,
}

/// Synapse's `redis` section (`synapse/config/redis.py`): TCP, TLS or a
/// UNIX socket `path`; `password_path` is read when the config is loaded,
/// into `password`, as Synapse reads it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct RedisConfig {
    pub enabled: bool,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub dbid: Option<i64>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_path: Option<PathBuf>,
    pub use_tls: bool,
    /// A client certificate (PEM) presented to Redis, with its key.
    pub certificate_file: Option<PathBuf>,
    pub private_key_file: Option<PathBuf>,
    /// The CA that signs Redis's certificate: a PEM file, or a directory
    /// of them (`ca_file` wins when both are set, as in Synapse).
    pub ca_file: Option<PathBuf>,
    pub ca_path: Option<PathBuf>,
}

impl RedisConfig {
    /// Synapse's checks, for an enabled section: `password` and
    /// `password_path` exclude each other, the file is read (trimmed), and
    /// a `username` needs a password.
    fn load_secrets(&mut self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if let Some(path) = &self.password_path {
            if self.password.as_deref().is_some_and(|p| !p.is_empty()) {
                return Err(ConfigError::new(
                    "You have configured both `redis.password` and `redis.password_path`. These are mutually incompatible.",
                ));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new(format!("cannot read redis.password_path {}: {e}", path.display())))?;
            self.password = Some(text.trim().to_owned());
        }
        if self.username.is_some() && self.password.is_none() {
            return Err(ConfigError::new(
                "`redis.username` was set without `redis.password` (or `redis.password_path`). \
                 Redis username authentication requires a password to also be configured.",
            ));
        }
        Ok(())
    }
}

/// An `instance_map` entry: TCP (`host`, `port`, `tls`) or a UNIX socket.
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceLocation {
    Tcp { host: String, port: u16, tls: bool },
    Unix { path: PathBuf },
}

#[derive(Deserialize)]
struct InstanceEntry {
    host: Option<String>,
    port: Option<u16>,
    #[serde(default)]
    tls: bool,
    path: Option<PathBuf>,
}

impl SynapseConfig {
    pub fn from_mapping(m: &Mapping) -> Result<Self, ConfigError> {
        let server_name = match m.get("server_name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(ConfigError::new("`server_name` must be a non-empty string")),
            None => {
                return Err(ConfigError::new("`server_name` is missing from the config files"));
            }
        };
        let database = DatabaseConfig::from_mapping(m)?;
        let mut redis = match m.get("redis") {
            None | Some(Value::Null) => RedisConfig::default(),
            Some(v) => yaml_serde::from_value(v.clone()).map_err(|e| ConfigError::new(format!("invalid `redis` section: {e}")))?,
        };
        redis.load_secrets()?;
        let worker_replication_secret = match (str_key(m, "worker_replication_secret")?, m.get("worker_replication_secret_path")) {
            (Some(s), _) => Some(s),
            (None, Some(Value::String(path))) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::new(format!("cannot read worker_replication_secret_path {path}: {e}")))?
                    .trim()
                    .to_owned(),
            ),
            _ => None,
        };
        let federation = super::federation::FederationSettings::from_mapping(m, worker_replication_secret.as_deref())?;
        Ok(Self {
            database,
            redis,
            federation,
            worker_replication_secret,
            device_lists_writer: device_lists_writer(m)?,
            device_lists_writers: writer_names(m),
            signing_key_path: str_key(m, "signing_key_path")?.map(PathBuf::from),
            msc4263_limit_key_queries_to_users_who_share_rooms: section_flag(
                m,
                "experimental_features",
                "msc4263_limit_key_queries_to_users_who_share_rooms",
            )?,
            msc3984_appservice_key_query: section_flag(m, "experimental_features", "msc3984_appservice_key_query")?,
            account_validity_enabled: section_flag(m, "account_validity", "enabled")?,
            macaroon_secret: macaroon_secret(m)?,
            mas: super::mas::MasConfig::from_mapping(m)?,
            app_services: string_list(m, "app_service_config_files")?
                .unwrap_or_default()
                .iter()
                .map(|p| super::appservice::AppService::load(std::path::Path::new(p), &server_name))
                .collect::<Result<_, _>>()?,
            server_name,
        })
    }
}

fn macaroon_secret(m: &Mapping) -> Result<Option<Vec<u8>>, ConfigError> {
    let read = |key: &str| -> Result<Option<String>, ConfigError> {
        match str_key(m, key)? {
            Some(path) => std::fs::read_to_string(&path)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| ConfigError::new(format!("cannot read {key} {path}: {e}"))),
            None => Ok(None),
        }
    };
    // A secret given inline or in a file (`<key>_path`), never both (Synapse:
    // `config/key.py`, `config/registration.py`); empty counts as unset.
    let secret = |key: &str| -> Result<Option<String>, ConfigError> {
        let inline = str_key(m, key)?.filter(|s| !s.is_empty());
        let path_key = format!("{key}_path");
        if str_key(m, &path_key)?.is_some_and(|p| !p.is_empty()) {
            if inline.is_some() {
                return Err(ConfigError::new(format!("Conflicting options '{key}' and '{path_key}' are both defined in config file.")));
            }
            return Ok(read(&path_key)?.filter(|s| !s.is_empty()));
        }
        Ok(inline)
    };
    let configured = match secret("macaroon_secret_key")? {
        Some(s) => Some(s),
        None => secret("registration_shared_secret")?,
    };
    if let Some(secret) = configured {
        return Ok(Some(secret.into_bytes()));
    }
    // Synapse's last resort: derived from the signing key.
    let Some(text) = read("signing_key_path").ok().flatten() else {
        return Ok(None);
    };
    Ok(super::signing_key::first_key(&text).ok().map(|(_, seed)| {
        use sha2::Digest;
        sha2::Sha256::digest(seed).to_vec()
    }))
}

/// `stream_writers.device_lists` (a name or a list), `main` when unset.
fn configured_writers(m: &Mapping) -> Vec<String> {
    let names: Vec<String> = match m.get("stream_writers").and_then(|s| s.get("device_lists")) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Sequence(seq)) => seq.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    if names.is_empty() { vec!["main".into()] } else { names }
}

/// The writers as Synapse's tables name them: `main` is `master` there.
fn writer_names(m: &Mapping) -> Vec<String> {
    configured_writers(m).into_iter().map(|w| if w == "main" { "master".into() } else { w }).collect()
}

fn device_lists_writer(m: &Mapping) -> Result<Option<InstanceLocation>, ConfigError> {
    let writer = configured_writers(m).swap_remove(0);
    // Synapse renames `main` to `master` internally; accept either.
    let map = match m.get("instance_map") {
        Some(Value::Mapping(map)) => map,
        _ => return Ok(None),
    };
    let aliases: Vec<&str> = match writer.as_str() {
        "main" | "master" => vec!["main", "master"],
        other => vec![other],
    };
    let Some(entry) = aliases.iter().find_map(|a| map.get(*a)) else {
        return Ok(None);
    };
    instance_location(&writer, entry).map(Some)
}

/// One `instance_map` entry.
pub(super) fn instance_location(name: &str, entry: &Value) -> Result<InstanceLocation, ConfigError> {
    let e: InstanceEntry =
        yaml_serde::from_value(entry.clone()).map_err(|e| ConfigError::new(format!("invalid `instance_map.{name}`: {e}")))?;
    match (e.path, e.host, e.port) {
        (Some(path), _, _) => Ok(InstanceLocation::Unix { path }),
        (None, Some(host), Some(port)) => Ok(InstanceLocation::Tcp { host, port, tls: e.tls }),
        _ => Err(ConfigError::new(format!("`instance_map.{name}` needs `host` and `port`, or `path`"))),
    }
}

/// A boolean inside a section (`experimental_features.x`), false when the
/// section or the key is missing.
fn section_flag(m: &Mapping, section: &str, key: &str) -> Result<bool, ConfigError> {
    match m.get(section) {
        Some(Value::Mapping(x)) => bool_key(x, key, false),
        _ => Ok(false),
    }
}

pub(super) fn str_key(m: &Mapping, key: &str) -> Result<Option<String>, ConfigError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ConfigError::new(format!("`{key}` must be a string"))),
    }
}

pub(super) fn bool_key(m: &Mapping, key: &str, default: bool) -> Result<bool, ConfigError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ConfigError::new(format!("`{key}` must be true or false"))),
    }
}

pub(super) fn string_list(m: &Mapping, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => yaml_serde::from_value(v.clone()).map(Some).map_err(|_| ConfigError::new(format!("`{key}` must be a list of strings"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<SynapseConfig, ConfigError> {
        SynapseConfig::from_mapping(&yaml_serde::from_str(yaml).unwrap())
    }

    const DB: &str = "database: {name: sqlite3, args: {database: x.db}}\n";

    #[test]
    fn server_name_required() {
        let err = parse(DB).unwrap_err().to_string();
        assert!(err.contains("server_name"), "{err}");
    }

    #[test]
    fn writer_defaults_to_main() {
        let c = parse(&format!("{DB}server_name: hs\ninstance_map: {{main: {{host: 127.0.0.1, port: 9093}}}}\n")).unwrap();
        assert_eq!(c.device_lists_writer, Some(InstanceLocation::Tcp { host: "127.0.0.1".into(), port: 9093, tls: false }));
        assert!(c.federation.verify_certificates);
        assert_eq!(c.federation.ip_range_blocklist, None);
        assert_eq!(c.device_lists_writers, ["master"]);
    }

    #[test]
    fn writer_follows_stream_writers() {
        let c = parse(&format!(
            "{DB}server_name: hs\nstream_writers: {{device_lists: [dl1, dl2]}}\ninstance_map: {{main: {{host: a, port: 1}}, dl1: {{path: /run/dl1.sock}}}}\n"
        ))
        .unwrap();
        assert_eq!(c.device_lists_writer, Some(InstanceLocation::Unix { path: "/run/dl1.sock".into() }));
        assert_eq!(c.device_lists_writers, ["dl1", "dl2"]);
    }

    #[test]
    fn synapse_keys_read() {
        let c = parse(&format!(
            "{DB}server_name: hs\nworker_replication_secret: s3\nip_range_blacklist: [10.0.0.0/8]\nfederation_verify_certificates: false\nexperimental_features: {{msc4263_limit_key_queries_to_users_who_share_rooms: true}}\nredis: {{enabled: true, port: 7000}}\n"
        ))
        .unwrap();
        assert_eq!(c.worker_replication_secret.as_deref(), Some("s3"));
        assert_eq!(c.federation.ip_range_blocklist, Some(vec!["10.0.0.0/8".to_string()]));
        assert_eq!(c.macaroon_secret, None, "no secret and no signing key");
        assert!(!c.federation.verify_certificates);
        assert!(c.msc4263_limit_key_queries_to_users_who_share_rooms);
        assert!(c.redis.enabled);
        assert_eq!(c.redis.port, Some(7000));
    }

    #[test]
    fn redis_secrets_are_read_and_checked_as_synapse_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("redis.secret");
        std::fs::write(&file, "  s3cret\n").unwrap();
        let redis = |section: &str| parse(&format!("{DB}server_name: hs\nredis: {{enabled: true, {section}}}\n")).map(|c| c.redis);
        let r = redis(&format!("username: u, password_path: {}", file.display())).unwrap();
        assert_eq!((r.username.as_deref(), r.password.as_deref()), (Some("u"), Some("s3cret")));
        let both = redis(&format!("password: p, password_path: {}", file.display())).unwrap_err().to_string();
        assert!(both.contains("mutually incompatible"), "{both}");
        let lonely = redis("username: u").unwrap_err().to_string();
        assert!(lonely.contains("requires a password"), "{lonely}");
        let missing = redis("password_path: /nonexistent/redis.secret").unwrap_err().to_string();
        assert!(missing.contains("cannot read redis.password_path"), "{missing}");
        // Only an enabled section is read, as in Synapse.
        let off = parse(&format!("{DB}server_name: hs\nredis: {{enabled: false, username: u}}\n")).unwrap();
        assert!(!off.redis.enabled);
    }

    #[test]
    fn macaroon_secret_found_as_synapse_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let reg = file("reg", "from-file\n");
        let key = file("signing.key", "ed25519 a_bcde AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8\n");
        let secret = |extra: &str| parse(&format!("{DB}server_name: hs\n{extra}")).map(|c| c.macaroon_secret);
        assert_eq!(secret("macaroon_secret_key: mk\nregistration_shared_secret: rs").unwrap(), Some(b"mk".to_vec()));
        assert_eq!(secret(&format!("registration_shared_secret_path: {reg}")).unwrap(), Some(b"from-file".to_vec()));
        assert_eq!(
            secret(&format!("macaroon_secret_key: ''\nregistration_shared_secret_path: {reg}")).unwrap(),
            Some(b"from-file".to_vec())
        );
        let conflict = secret(&format!("registration_shared_secret: x\nregistration_shared_secret_path: {reg}")).unwrap_err();
        assert!(conflict.to_string().contains("Conflicting options"), "{conflict}");
        // Neither: SHA-256 of the signing key's seed (bytes 0..32 here).
        let derived = secret(&format!("signing_key_path: {key}")).unwrap().unwrap();
        use sha2::Digest;
        assert_eq!(derived, sha2::Sha256::digest((0u8..32).collect::<Vec<u8>>()).to_vec());
    }
}
