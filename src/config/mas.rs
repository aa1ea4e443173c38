//! `matrix_authentication_service`: delegated auth through Matrix
//! Authentication Service, read and validated as Synapse's
//! `synapse/config/mas.py` does (a strict model that ignores unknown keys).

use yaml_serde::{Mapping, Value};

use super::ConfigError;
use super::synapse::{bool_key, str_key};

/// Where to introspect tokens and the secret shared with MAS.
#[derive(Clone, PartialEq)]
pub struct MasConfig {
    /// The endpoint as Synapse prints it (`http://mas:8080/`).
    pub endpoint: String,
    /// MAS only speaks HTTP/2 (`force_http2`).
    pub force_http2: bool,
    pub secret: String,
}

impl std::fmt::Debug for MasConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasConfig").field("endpoint", &self.endpoint).field("force_http2", &self.force_http2).finish_non_exhaustive()
    }
}

const INVALID: &str = "Could not validate Matrix Authentication Service configuration";

impl MasConfig {
    /// The section, or `None` when it is missing or not enabled.
    pub fn from_mapping(m: &Mapping) -> Result<Option<Self>, ConfigError> {
        // The experimental form it replaced: Synapse 1.157 and later refuse
        // any of it; 1.136 to 1.156 read it, so a disabled one is ignored as
        // they ignore it, and an enabled one (OAuth 2.0 introspection of
        // its own, not served here) is refused with the way out.
        if let Some(Value::Mapping(x)) = m.get("experimental_features")
            && let Some(Value::Mapping(msc3861)) = x.get("msc3861")
            && msc3861.get("enabled").is_some_and(|v| v.as_bool() != Some(false))
        {
            return Err(ConfigError::new(
                "experimental_features.msc3861 (delegated auth before Synapse 1.157) is not supported: \
                 use the matrix_authentication_service section instead (Synapse 1.136 and later read it)",
            ));
        }
        let section = match m.get("matrix_authentication_service") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Mapping(s)) => s,
            Some(_) => return Err(invalid("the section must be a mapping")),
        };
        // Synapse's wording for a wrong type, under its heading.
        let typed = |e: ConfigError| invalid(&e.0);
        let enabled = bool_key(section, "enabled", false).map_err(typed)?;
        let force_http2 = bool_key(section, "force_http2", false).map_err(typed)?;
        let endpoint = match str_key(section, "endpoint").map_err(typed)? {
            None => url::Url::parse("http://localhost:8080").expect("a valid URL"),
            Some(s) => http_url(&s)?,
        };
        let secret = str_key(section, "secret").map_err(typed)?;
        let secret_path = str_key(section, "secret_path").map_err(typed)?;
        if let Some(path) = &secret_path
            && !std::path::Path::new(path).is_file()
        {
            return Err(invalid(&format!("`secret_path` {path}: Path does not point to a file")));
        }
        if !enabled {
            return Ok(None);
        }
        let secret = match (secret.filter(|s| !s.is_empty()), secret_path.filter(|p| !p.is_empty())) {
            (None, None) => {
                return Err(invalid(
                    "You must set a `secret` or `secret_path` when enabling the Matrix Authentication Service integration.",
                ));
            }
            (Some(_), Some(_)) => return Err(invalid("`secret` and `secret_path` cannot be set at the same time.")),
            (Some(_), None) if m.get("allow_secrets_in_config") == Some(&Value::Bool(false)) => {
                return Err(ConfigError::new(
                    "Config options that expect an in-line secret as value are disabled: matrix_authentication_service.secret",
                ));
            }
            (Some(s), None) => s,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::new(format!("cannot read matrix_authentication_service.secret_path {path}: {e}")))?
                .trim()
                .to_owned(),
        };
        Ok(Some(Self { endpoint: endpoint.to_string(), force_http2, secret }))
    }

    /// `POST` here to introspect a token (Synapse strips the endpoint's
    /// trailing slashes and appends the path).
    pub fn introspection_url(&self) -> String {
        format!("{}/oauth2/introspect", self.endpoint.trim_end_matches('/'))
    }
}

fn invalid(why: &str) -> ConfigError {
    ConfigError::new(format!("{INVALID}: {why}"))
}

/// pydantic's `AnyHttpUrl`: `http` or `https` with a host.
fn http_url(s: &str) -> Result<url::Url, ConfigError> {
    let url = url::Url::parse(s).map_err(|e| invalid(&format!("`endpoint` {s}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(&format!("`endpoint` {s}: URL scheme should be 'http' or 'https'")));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(&format!("`endpoint` {s}: the URL has no host")));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Option<MasConfig>, String> {
        MasConfig::from_mapping(&yaml_serde::from_str(yaml).unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn read_as_synapse_reads_it() {
        assert_eq!(parse("{}").unwrap(), None);
        assert_eq!(parse("matrix_authentication_service: {secret: x}").unwrap(), None, "not enabled");
        let c = parse("matrix_authentication_service: {enabled: true, secret: s3, endpoint: 'http://MAS:8080'}").unwrap().unwrap();
        assert_eq!(c.endpoint, "http://mas:8080/");
        assert_eq!(c.introspection_url(), "http://mas:8080/oauth2/introspect");
        assert_eq!(c.secret, "s3");
        let c = parse("matrix_authentication_service: {enabled: true, secret: s}").unwrap().unwrap();
        assert_eq!(c.introspection_url(), "http://localhost:8080/oauth2/introspect");
        let c =
            parse("matrix_authentication_service: {enabled: true, secret: s, endpoint: 'https://auth.example.com/mas/'}").unwrap().unwrap();
        assert_eq!(c.introspection_url(), "https://auth.example.com/mas/oauth2/introspect");
        assert!(!format!("{c:?}").contains("secret: \"s\""), "the secret is not printed");
    }

    #[test]
    fn secret_from_a_file_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mas.secret");
        std::fs::write(&path, "  from-file\n").unwrap();
        let c = parse(&format!("matrix_authentication_service: {{enabled: true, secret_path: '{}'}}", path.display())).unwrap().unwrap();
        assert_eq!(c.secret, "from-file");
    }

    #[test]
    fn invalid_sections_name_the_problem() {
        let cases = [
            ("{enabled: true}", "You must set a `secret` or `secret_path`"),
            ("{enabled: true, secret: ''}", "You must set a `secret` or `secret_path`"),
            ("{enabled: true, secret: a, secret_path: Cargo.toml}", "cannot be set at the same time"),
            ("{enabled: true, secret_path: /nonexistent/mas.secret}", "Path does not point to a file"),
            ("{enabled: 'true', secret: a}", "`enabled` must be true or false"),
            ("{enabled: true, secret: 5}", "`secret` must be a string"),
            ("{enabled: true, secret: a, endpoint: 'mas:8080'}", "should be 'http' or 'https'"),
            ("{enabled: true, secret: a, endpoint: 'ftp://mas'}", "should be 'http' or 'https'"),
            ("[1]", "must be a mapping"),
        ];
        let old = parse("experimental_features: {msc3861: {enabled: true, issuer: 'https://mas.invalid/'}}").unwrap_err();
        assert!(old.contains("use the matrix_authentication_service section"), "{old}");
        assert_eq!(parse("experimental_features: {msc3861: {}}").unwrap(), None);
        // As Synapse 1.136 to 1.156 read it: disabled, so nothing to do.
        assert_eq!(parse("experimental_features: {msc3861: {enabled: false, issuer: 'https://mas.invalid/'}}").unwrap(), None);
        let inline = parse("allow_secrets_in_config: false\nmatrix_authentication_service: {enabled: true, secret: a}").unwrap_err();
        assert!(inline.contains("in-line secret"), "{inline}");
        for (section, want) in cases {
            let err = parse(&format!("matrix_authentication_service: {section}")).unwrap_err();
            assert!(err.starts_with(INVALID) && err.contains(want), "{section}: {err}");
        }
    }
}
