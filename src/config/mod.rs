//! Configuration from Synapse's own YAML files.
//!
//! `-c homeserver.yaml -c worker.yaml` (or `--config-path`, Synapse's long
//! name): files are read in order and, as in Synapse, a later file's
//! top-level keys replace an earlier file's; a directory gives its `.yaml`
//! files in sorted order, as Synapse's `find_config_files` does. Synapse's
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
        for path in find_config_files(paths)? {
            for (k, v) in read_yaml_file(&path)? {
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

/// Synapse's `find_config_files`: a file is read as it is; a directory
/// gives its entries whose names end in `.yaml` (hidden ones too), in
/// sorted order, skipping (with Synapse's words on stderr) subdirectories
/// and other files.
pub fn find_config_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ConfigError> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let entries =
            std::fs::read_dir(path).map_err(|e| ConfigError::new(format!("cannot read config directory {}: {e}", path.display())))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ConfigError::new(format!("cannot read config directory {}: {e}", path.display())))?;
            let entry_path = entry.path();
            if !entry_path.is_file() {
                eprintln!("Found subdirectory in config directory: {:?}. IGNORING.", entry_path.display().to_string());
            } else if !entry.file_name().to_string_lossy().ends_with(".yaml") {
                eprintln!("Found file in config directory that does not end in '.yaml': {:?}. IGNORING.", entry_path.display().to_string());
            } else {
                found.push(entry_path);
            }
        }
        found.sort_by(|a, b| a.as_os_str().as_encoded_bytes().cmp(b.as_os_str().as_encoded_bytes()));
        files.extend(found);
    }
    Ok(files)
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

    /// Debian's layout: `--config-path homeserver.yaml --config-path conf.d/`,
    /// the directory read as Synapse reads it (its `.yaml` files, hidden ones
    /// too, in sorted order; anything else skipped), later files winning.
    #[test]
    fn a_directory_gives_its_yaml_files_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        let conf_d = dir.path().join("conf.d");
        std::fs::create_dir_all(conf_d.join("sub.yaml")).unwrap();
        let write = |name: &str, text: &str| std::fs::write(conf_d.join(name), text).unwrap();
        write("server_name.yaml", "server_name: debian.example\n");
        write("database.yaml", "database: {name: sqlite3, args: {database: /var/lib/matrix-synapse/homeserver.db}}\n");
        write("zz.yaml", "keys_worker: {listen: '127.0.0.1:9'}\n");
        write(".hidden.yaml", "keys_worker: {listen: '127.0.0.1:1'}\n");
        write("notes.yml", "server_name: not.read\n");
        write("README", "not yaml: [\n");
        let main = dir.path().join("homeserver.yaml");
        std::fs::write(&main, "server_name: overridden\nkeys_worker: {listen: '127.0.0.1:2'}\n").unwrap();
        let files = find_config_files(&[main.clone(), conf_d.clone()]).unwrap();
        let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["homeserver.yaml", ".hidden.yaml", "database.yaml", "server_name.yaml", "zz.yaml"]);
        let config = Config::load(&[main, conf_d], Vec::new()).unwrap();
        assert_eq!(config.synapse.server_name, "debian.example");
        assert_eq!(config.worker.listen, "127.0.0.1:9", "the last file in sorted order wins");
        assert!(matches!(config.synapse.database, DatabaseConfig::Sqlite { .. }));
    }

    /// Found by fuzzing: a key with line breaks in it was quoted verbatim.
    #[test]
    fn errors_are_one_line_whatever_the_file_holds() {
        let yaml = "server_name: hs\nkeys_worker: {\"bad\\n\\nkey\": 1}\n";
        let mapping: Mapping = yaml_serde::from_str(yaml).unwrap();
        let err = Config::from_mapping(mapping, Vec::new()).unwrap_err().to_string();
        assert!(!err.contains('\n') && err.contains("bad\\n\\nkey"), "{err}");
    }
}
