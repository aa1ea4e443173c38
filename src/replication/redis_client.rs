//! The Redis connection as Synapse's `redis` section describes it
//! (`synapse/replication/tcp/handler.py`, `context.py`): a UNIX socket
//! `path` wins, else TCP, with TLS when `use_tls`; `dbid`, `username` and
//! the password (its file already read by the config) on every connection.
//!
//! TLS: Synapse presents `certificate_file`/`private_key_file` when set, and
//! loads `ca_file` (else `ca_path`) but never verifies Redis's certificate
//! (Twisted's `ClientContextFactory` leaves verification off). We verify it
//! when a CA is configured, chain and host name, because an operator who
//! names a CA means it; without one we connect as Synapse does, unverified,
//! and say so once at start-up (docs/compatibility.md).

use std::path::Path;

use redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, TlsCertificates};

use crate::config::synapse::RedisConfig;

pub fn redis_client(c: &RedisConfig) -> anyhow::Result<redis::Client> {
    let mut settings = RedisConnectionInfo::default().set_db(c.dbid.unwrap_or(0));
    if let Some(username) = &c.username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &c.password {
        settings = settings.set_password(password);
    }
    let host = c.host.clone().unwrap_or_else(|| "localhost".to_owned());
    let port = c.port.unwrap_or(6379);
    let verify = c.ca_file.is_some() || c.ca_path.is_some();
    let addr = match &c.path {
        Some(path) => ConnectionAddr::Unix(path.into()),
        None if c.use_tls => ConnectionAddr::TcpTls { host, port, insecure: !verify, tls_params: None },
        None => ConnectionAddr::Tcp(host, port),
    };
    let info = addr.into_connection_info()?.set_redis_settings(settings);
    if c.path.is_some() || !c.use_tls {
        return Ok(redis::Client::open(info)?);
    }
    if !verify {
        tracing::warn!(
            "redis.use_tls without redis.ca_file or redis.ca_path: Redis's certificate is not verified (nor does Synapse verify it); \
             name the CA that signs it to have it verified"
        );
    }
    let client_tls = match (&c.certificate_file, &c.private_key_file) {
        (Some(cert), Some(key)) => {
            Some(ClientTlsConfig { client_cert: read(cert, "certificate_file")?, client_key: read(key, "private_key_file")? })
        }
        (None, None) => None,
        _ => anyhow::bail!("redis.certificate_file and redis.private_key_file go together: set both or neither"),
    };
    let root_cert = match (&c.ca_file, &c.ca_path) {
        (Some(file), _) => Some(read(file, "ca_file")?),
        (None, Some(dir)) => Some(ca_directory(dir)?),
        (None, None) => None,
    };
    Ok(redis::Client::build_with_tls(info, TlsCertificates { client_tls, root_cert })?)
}

fn read(path: &Path, setting: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read redis.{setting} {}: {e}", path.display()))
}

/// `ca_path` is OpenSSL's CA directory (`c_rehash`'s `<hash>.0` links, or
/// plain `.pem`/`.crt` files): every PEM certificate in its files, in name
/// order; files that hold none are skipped, as OpenSSL skips them.
fn ca_directory(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let entries = std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("cannot read redis.ca_path {}: {e}", dir.display()))?;
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    paths.sort();
    let mut bundle = Vec::new();
    for path in paths {
        let Ok(text) = std::fs::read(&path) else { continue };
        if text.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            bundle.extend_from_slice(&text);
            bundle.push(b'\n');
        }
    }
    anyhow::ensure!(!bundle.is_empty(), "redis.ca_path {} holds no PEM certificate", dir.display());
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> RedisConfig {
        RedisConfig { enabled: true, ..Default::default() }
    }

    #[test]
    fn the_address_follows_synapses_precedence() {
        let mut c = enabled();
        c.path = Some("/run/redis/redis.sock".into());
        c.use_tls = true;
        c.dbid = Some(3);
        c.username = Some("synapse".into());
        c.password = Some("p@ss".into());
        let info = redis_client(&c).unwrap().get_connection_info().clone();
        assert!(matches!(info.addr(), ConnectionAddr::Unix(p) if p.to_str() == Some("/run/redis/redis.sock")));
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().username(), Some("synapse"));
        assert_eq!(info.redis_settings().password(), Some("p@ss"));

        let info = redis_client(&enabled()).unwrap().get_connection_info().clone();
        assert!(matches!(info.addr(), ConnectionAddr::Tcp(h, 6379) if h == "localhost"));
        assert_eq!(info.redis_settings().password(), None);
    }

    #[test]
    fn tls_is_verified_only_against_a_configured_ca() {
        let mut c = enabled();
        c.use_tls = true;
        c.host = Some("127.0.0.1".into());
        let info = redis_client(&c).unwrap().get_connection_info().clone();
        assert!(matches!(info.addr(), ConnectionAddr::TcpTls { insecure: true, .. }));

        let dir = tempfile::tempdir().unwrap();
        c.ca_path = Some(dir.path().into());
        let err = redis_client(&c).unwrap_err().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        c.ca_file = Some(dir.path().join("missing.pem"));
        let err = redis_client(&c).unwrap_err().to_string();
        assert!(err.contains("cannot read redis.ca_file"), "{err}");

        c.ca_file = None;
        c.certificate_file = Some(dir.path().join("client.pem"));
        let err = redis_client(&c).unwrap_err().to_string();
        assert!(err.contains("set both or neither"), "{err}");
    }
}
