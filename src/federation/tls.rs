//! Certificate checks on outbound federation, as Synapse's
//! `FederationPolicyForHTTPS`: verified against the platform's roots, or
//! only `federation_custom_ca_list` when set; not verified at all when
//! `federation_verify_certificates` is off, or for TLS host names matching a
//! `federation_certificate_verification_whitelist` glob.

use regex::Regex;

use crate::config::federation::FederationSettings;

/// Two HTTP clients, one that checks certificates and one that does not,
/// and the rule choosing between them per TLS host name.
pub struct TlsClients {
    verified: reqwest::Client,
    unverified: reqwest::Client,
    verify: bool,
    not_verified: Vec<Regex>,
}

impl TlsClients {
    /// `base` gives a builder with everything but the TLS settings.
    pub fn build(settings: &FederationSettings, base: impl Fn() -> reqwest::ClientBuilder) -> anyhow::Result<Self> {
        // rustls speaks TLS 1.2 and 1.3 only, so "1", "1.1" and "1.2" all
        // mean its default.
        let with_min = |b: reqwest::ClientBuilder| match settings.min_tls_version.as_str() {
            "1.3" => b.tls_version_min(reqwest::tls::Version::TLS_1_3),
            _ => b,
        };
        let mut verified = with_min(base());
        if let Some(pems) = &settings.custom_ca_pem {
            let certs = pems.iter().map(|p| reqwest::Certificate::from_pem(p)).collect::<Result<Vec<_>, _>>()?;
            verified = verified.tls_certs_only(certs);
        }
        Ok(Self {
            verified: verified.build()?,
            unverified: with_min(base()).tls_danger_accept_invalid_certs(true).build()?,
            verify: settings.verify_certificates,
            not_verified: settings.verification_whitelist.iter().map(|g| glob_to_regex(g)).collect(),
        })
    }

    /// The client for a connection whose TLS server name is `host`.
    pub fn for_host(&self, host: &str) -> &reqwest::Client {
        if self.should_verify(host) { &self.verified } else { &self.unverified }
    }

    fn should_verify(&self, host: &str) -> bool {
        self.verify && !self.not_verified.iter().any(|r| r.is_match(host))
    }
}

/// `matrix_common.regex.glob_to_regex` as Synapse calls it: `*` any run,
/// `?` one character, anchored, case-insensitive.
fn glob_to_regex(glob: &str) -> Regex {
    let mut pattern = String::from(r"(?is)\A(");
    let mut rest = glob;
    while !rest.is_empty() {
        let wild = rest.find(['*', '?']).unwrap_or(rest.len());
        pattern.push_str(&regex::escape(&rest[..wild]));
        rest = &rest[wild..];
        let run = rest.find(|c| c != '*' && c != '?').unwrap_or(rest.len());
        let (stars, marks) = rest[..run].chars().fold((0, 0), |(s, q), c| if c == '*' { (s + 1, q) } else { (s, q + 1) });
        if run > 0 {
            pattern.push_str(&if stars > 0 { format!(".{{{marks},}}") } else { format!(".{{{marks}}}") });
        }
        rest = &rest[run..];
    }
    pattern.push_str(r")\z");
    Regex::new(&pattern).expect("escaped glob is a valid regex")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_as_synapse() {
        let r = glob_to_regex("*.example.com");
        assert!(r.is_match("a.example.com") && r.is_match("A.B.Example.COM"));
        assert!(!r.is_match("example.com") && !r.is_match("a.example.com.evil"));
        let r = glob_to_regex("host?.org");
        assert!(r.is_match("host1.org") && !r.is_match("host12.org") && !r.is_match("hostxorg"));
        assert!(glob_to_regex("a??*b").is_match("axyb") && !glob_to_regex("a??*b").is_match("axb"));
        assert!(glob_to_regex("127.0.0.1").is_match("127.0.0.1") && !glob_to_regex("127.0.0.1").is_match("127a0.0.1"));
    }

    #[test]
    fn verification_chosen_per_host() {
        let settings = FederationSettings::from_mapping(
            &yaml_serde::from_str("federation_certificate_verification_whitelist: ['*.internal.test', 'lab.test']").unwrap(),
            None,
        )
        .unwrap();
        let clients = TlsClients::build(&settings, reqwest::Client::builder).unwrap();
        assert!(clients.should_verify("matrix.org"));
        assert!(!clients.should_verify("hs.internal.test") && !clients.should_verify("lab.test"));
        let off = FederationSettings { verify_certificates: false, ..settings };
        assert!(!TlsClients::build(&off, reqwest::Client::builder).unwrap().should_verify("matrix.org"));
    }
}
