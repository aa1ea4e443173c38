//! Configuration from Synapse's own YAML files.
//!
//! `-c homeserver.yaml -c worker.yaml`: files are read in order and, as in
//! Synapse, a later file's top-level keys replace an earlier file's. Synapse's
//! keys are read by [`synapse`]; our own settings live in the `keys_worker`
//! section ([`worker`]), where every key can also come from the environment.

pub mod appservice;
pub mod database;
pub mod federation;
pub mod mas;
pub mod signing_key;
pub mod synapse;
pub mod worker;

use std::path::{Path, PathBuf};

use yaml_serde::{Mapping, Value};

pub use database::DatabaseConfig;
pub use synapse::SynapseConfig;
pub use worker::{ENV_PREFIX, SECTION, WorkerConfig};

/// Everything the service needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub synapse: SynapseConfig,
    pub worker: WorkerConfig,
}

/// A configuration problem, reported as one line at start-up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// The message, with control characters (a line break in a key name
    /// quoted from the file, say) escaped: one line, whatever the file holds.
    pub fn new(msg: impl Into<String>) -> Self {
        let msg: String = msg.into();
        if !msg.contains(char::is_control) {
            return Self(msg);
        }
        Self(msg.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect())
    }
}

impl Config {
    /// Reads and merges the files, then applies `SYNAPSE_KEYS_WORKER_*`
    /// variables from `env` to our section.
    pub fn load(paths: &[PathBuf], env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut merged = Mapping::new();
        for path in paths {
            for (k, v) in read_yaml_file(path)? {
                merged.insert(k, v);
            }
        }
        Self::from_mapping(merged, env)
    }

    pub fn from_mapping(mut merged: Mapping, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let section = merged.remove(SECTION).unwrap_or(Value::Null);
        let worker = WorkerConfig::from_section(section, env)?;
        let synapse = SynapseConfig::from_mapping(&merged)?;
        Ok(Self { synapse, worker })
    }
}

fn read_yaml_file(path: &Path) -> Result<Mapping, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(format!("cannot read config file {}: {e}", path.display())))?;
    match yaml_serde::from_str::<Value>(&text) {
        Ok(Value::Mapping(m)) => Ok(m),
        Ok(Value::Null) => Ok(Mapping::new()),
        Ok(_) => Err(ConfigError::new(format!("config file {} must contain a YAML mapping at the top level", path.display()))),
        Err(e) => Err(ConfigError::new(format!("config file {} is not valid YAML: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: a key with line breaks in it was quoted verbatim.
    #[test]
    fn errors_are_one_line_whatever_the_file_holds() {
        let yaml = "server_name: hs\nkeys_worker: {\"bad\\n\\nkey\": 1}\n";
        let mapping: Mapping = yaml_serde::from_str(yaml).unwrap();
        let err = Config::from_mapping(mapping, Vec::new()).unwrap_err().to_string();
        assert!(!err.contains('\n') && err.contains("bad\\n\\nkey"), "{err}");
    }
}
