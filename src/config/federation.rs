//! Synapse's outbound federation settings, read as `synapse/config/federation.py`,
//! `config/tls.py`, `config/server.py` and `config/workers.py` read them.

use std::collections::HashSet;

use yaml_serde::{Mapping, Value};

use super::ConfigError;
use super::synapse::{InstanceLocation, bool_key, instance_location, string_list};

#[derive(Debug, Clone)]
pub struct FederationSettings {
    /// `federation_domain_whitelist`: when set, only these destinations are
    /// ever contacted.
    pub domain_whitelist: Option<HashSet<String>>,
    pub verify_certificates: bool,
    /// `federation_certificate_verification_whitelist`: globs of TLS host
    /// names whose certificates are not verified.
    pub verification_whitelist: Vec<String>,
    /// `federation_custom_ca_list`: the PEM of each file's first
    /// certificate; when set, these are the only trusted roots.
    pub custom_ca_pem: Option<Vec<Vec<u8>>>,
    /// `federation_client_minimum_tls_version`: "1", "1.1", "1.2" or "1.3".
    pub min_tls_version: String,
    /// What federation may not reach, as `config/server.py` reads it:
    /// `federation_ip_range_blacklist` when set, else `ip_range_blacklist`
    /// (Synapse reads no `ip_range_blocklist` key); `None` means Synapse's
    /// default list.
    pub ip_range_blocklist: Option<Vec<String>>,
    /// `ip_range_whitelist`, unless `federation_ip_range_blacklist` is set
    /// (then Synapse's federation has no whitelist at all).
    pub ip_range_whitelist: Vec<String>,
    /// `outbound_federation_restricted_to`: the `instance_map` locations of
    /// the instances that proxy our federation requests (we are never one
    /// of them); empty when unrestricted.
    pub proxy_locations: Vec<InstanceLocation>,
}

impl FederationSettings {
    pub fn from_mapping(m: &Mapping, replication_secret: Option<&str>) -> Result<Self, ConfigError> {
        Ok(Self {
            domain_whitelist: string_list(m, "federation_domain_whitelist")?.map(|l| l.into_iter().collect()),
            verify_certificates: bool_key(m, "federation_verify_certificates", true)?,
            verification_whitelist: verification_whitelist(m)?,
            custom_ca_pem: custom_ca_list(m)?,
            min_tls_version: min_tls_version(m)?,
            ip_range_blocklist: match string_list(m, "federation_ip_range_blacklist")? {
                Some(list) => Some(list),
                None => string_list(m, "ip_range_blacklist")?,
            },
            ip_range_whitelist: match m.contains_key("federation_ip_range_blacklist") {
                true => Vec::new(),
                false => string_list(m, "ip_range_whitelist")?.unwrap_or_default(),
            },
            proxy_locations: proxy_locations(m, replication_secret)?,
        })
    }

    /// Synapse's `is_domain_allowed_according_to_federation_whitelist`.
    pub fn is_domain_allowed(&self, destination: &str) -> bool {
        self.domain_whitelist.as_ref().is_none_or(|w| w.contains(destination))
    }
}

fn verification_whitelist(m: &Mapping) -> Result<Vec<String>, ConfigError> {
    let entries = string_list(m, "federation_certificate_verification_whitelist")?.unwrap_or_default();
    for entry in &entries {
        if !entry.is_ascii() {
            return Err(ConfigError::new(format!(
                "IDNA domain names are not allowed in the federation_certificate_verification_whitelist: {entry}"
            )));
        }
    }
    Ok(entries)
}

fn custom_ca_list(m: &Mapping) -> Result<Option<Vec<Vec<u8>>>, ConfigError> {
    let Some(files) = string_list(m, "federation_custom_ca_list")? else {
        return Ok(None);
    };
    if files.is_empty() {
        return Err(ConfigError::new("federation_custom_ca_list specified without any certificate files"));
    }
    files
        .iter()
        .map(|file| {
            let content =
                std::fs::read(file).map_err(|e| ConfigError::new(format!("cannot read federation_custom_ca_list file {file}: {e}")))?;
            first_pem_certificate(&content)
                .ok_or_else(|| ConfigError::new(format!("Error parsing custom CA certificate file {file}: no PEM certificate")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The first `CERTIFICATE` block of a PEM file: Twisted's
/// `Certificate.loadPEM`, which Synapse uses, reads only that one.
fn first_pem_certificate(content: &[u8]) -> Option<Vec<u8>> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let start = find(content, BEGIN)?;
    let end = start + find(&content[start..], END)? + END.len();
    let mut pem = content[start..end].to_vec();
    pem.push(b'\n');
    Some(pem)
}

fn min_tls_version(m: &Mapping) -> Result<String, ConfigError> {
    let version = match m.get("federation_client_minimum_tls_version") {
        None | Some(Value::Null) => "1".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => String::new(),
    };
    if !["1", "1.1", "1.2", "1.3"].contains(&version.as_str()) {
        return Err(ConfigError::new("federation_client_minimum_tls_version must be one of: 1, 1.1, 1.2, 1.3"));
    }
    Ok(version)
}

fn proxy_locations(m: &Mapping, replication_secret: Option<&str>) -> Result<Vec<InstanceLocation>, ConfigError> {
    let instances = string_list(m, "outbound_federation_restricted_to")?.unwrap_or_default();
    if instances.is_empty() {
        return Ok(Vec::new());
    }
    if replication_secret.is_none() {
        return Err(ConfigError::new("`worker_replication_secret` must be configured when using `outbound_federation_restricted_to`."));
    }
    let map = match m.get("instance_map") {
        Some(Value::Mapping(map)) => Some(map),
        _ => None,
    };
    instances
        .iter()
        .map(|instance| {
            let entry = map.and_then(|map| map.get(instance.as_str()));
            match entry {
                Some(entry) => instance_location(instance, entry),
                None => Err(ConfigError::new(format!(
                    "Instance '{instance}' is configured in 'outbound_federation_restricted_to' but does not appear in `instance_map` config."
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<FederationSettings, ConfigError> {
        FederationSettings::from_mapping(&yaml_serde::from_str(yaml).unwrap(), Some("s"))
    }

    #[test]
    fn defaults() {
        let f = parse("{}").unwrap();
        assert!(f.domain_whitelist.is_none() && f.is_domain_allowed("anything.org"));
        assert!(f.verify_certificates && f.verification_whitelist.is_empty() && f.custom_ca_pem.is_none());
        assert_eq!(f.min_tls_version, "1");
        assert!(f.proxy_locations.is_empty());
    }

    #[test]
    fn domain_whitelist_as_synapse() {
        let f = parse("federation_domain_whitelist: [a.org, 'b.org:8448']").unwrap();
        assert!(f.is_domain_allowed("a.org") && f.is_domain_allowed("b.org:8448"));
        assert!(!f.is_domain_allowed("b.org") && !f.is_domain_allowed("A.org"));
        // An empty list allows nothing.
        assert!(!parse("federation_domain_whitelist: []").unwrap().is_domain_allowed("a.org"));
    }

    #[test]
    fn tls_settings_validated_as_synapse() {
        assert_eq!(parse("federation_client_minimum_tls_version: 1.2").unwrap().min_tls_version, "1.2");
        assert!(parse("federation_client_minimum_tls_version: '1.4'").is_err());
        let err = parse("federation_custom_ca_list: []").unwrap_err().to_string();
        assert_eq!(err, "federation_custom_ca_list specified without any certificate files");
        assert!(parse("federation_certificate_verification_whitelist: ['bücher.de']").unwrap_err().to_string().contains("IDNA"));
        let two = b"junk\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(first_pem_certificate(two).unwrap(), b"-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n");
    }

    #[test]
    fn ip_ranges_read_as_synapse_reads_them() {
        let f = parse("ip_range_blacklist: ['10.0.0.0/8']\nip_range_whitelist: ['127.0.0.1']").unwrap();
        assert_eq!((f.ip_range_blocklist, f.ip_range_whitelist), (Some(vec!["10.0.0.0/8".into()]), vec!["127.0.0.1".into()]));
        // Synapse has no `ip_range_blocklist` key: the default list applies.
        assert_eq!(parse("ip_range_blocklist: ['10.0.0.0/8']").unwrap().ip_range_blocklist, None);
        // The older federation-only list wins, and takes the whitelist away.
        let f =
            parse("federation_ip_range_blacklist: ['1.2.3.0/24']\nip_range_blacklist: ['10.0.0.0/8']\nip_range_whitelist: ['127.0.0.1']")
                .unwrap();
        assert_eq!((f.ip_range_blocklist, f.ip_range_whitelist), (Some(vec!["1.2.3.0/24".into()]), Vec::<String>::new()));
    }

    #[test]
    fn restricted_to_needs_instance_map_and_secret() {
        let yaml = "outbound_federation_restricted_to: [fed]\ninstance_map: {fed: {host: 127.0.0.1, port: 9000}}";
        let f = parse(yaml).unwrap();
        assert_eq!(f.proxy_locations, [InstanceLocation::Tcp { host: "127.0.0.1".into(), port: 9000, tls: false }]);
        let err = parse("outbound_federation_restricted_to: [fed]").unwrap_err().to_string();
        assert!(err.contains("does not appear in `instance_map`"), "{err}");
        let no_secret = FederationSettings::from_mapping(&yaml_serde::from_str(yaml).unwrap(), None);
        assert!(no_secret.unwrap_err().to_string().contains("worker_replication_secret"));
    }
}
