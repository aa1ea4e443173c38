//! Synapse's `database` (or `databases`) section: `psycopg2` → PostgreSQL,
//! `sqlite3` → SQLite.

use std::path::PathBuf;

use yaml_serde::{Mapping, Value};

use super::ConfigError;

#[derive(Debug, Clone, PartialEq)]
pub enum DatabaseConfig {
    Postgres(PostgresArgs),
    Sqlite { path: PathBuf },
}

/// The libpq keywords psycopg2 passes on, as Synapse operators write them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostgresArgs {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub dbname: Option<String>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub application_name: Option<String>,
    /// Synapse's pool size (`cp_max`).
    pub cp_max: Option<u32>,
}

impl DatabaseConfig {
    pub fn from_mapping(m: &Mapping) -> Result<Self, ConfigError> {
        let section = match (m.get("database"), m.get("databases")) {
            (Some(db), _) => db.clone(),
            (None, Some(Value::Mapping(dbs))) => main_store(dbs)?,
            (None, _) => {
                return Err(ConfigError::new("`database` is missing from the config files"));
            }
        };
        let name = section.get("name").and_then(Value::as_str).unwrap_or("sqlite3");
        let args = section.get("args").cloned().unwrap_or(Value::Null);
        match name {
            "psycopg2" | "psycopg" => Ok(Self::Postgres(PostgresArgs::from_value(&args)?)),
            "sqlite3" => match args.get("database").and_then(Value::as_str) {
                Some(p) if p != ":memory:" => Ok(Self::Sqlite { path: PathBuf::from(p) }),
                _ => Err(ConfigError::new("`database.args.database` must name an SQLite file")),
            },
            other => Err(ConfigError::new(format!("unsupported database engine `{other}` (use psycopg2 or sqlite3)"))),
        }
    }
}

/// With the multi-database form, the entry whose `data_stores` has `main`.
fn main_store(dbs: &Mapping) -> Result<Value, ConfigError> {
    dbs.values()
        .find(|db| db.get("data_stores").and_then(Value::as_sequence).is_some_and(|s| s.iter().any(|x| x.as_str() == Some("main"))))
        .cloned()
        .ok_or_else(|| ConfigError::new("no entry of `databases` holds the `main` data store"))
}

impl PostgresArgs {
    fn from_value(args: &Value) -> Result<Self, ConfigError> {
        let text = |k: &str| -> Option<String> {
            match args.get(k)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let port = match text("port") {
            Some(p) => Some(p.parse().map_err(|_| ConfigError::new(format!("`database.args.port` is not a port: {p}")))?),
            None => None,
        };
        let cp_max = match text("cp_max") {
            Some(p) => Some(p.parse().map_err(|_| ConfigError::new(format!("`database.args.cp_max` is not a number: {p}")))?),
            None => None,
        };
        Ok(Self {
            host: text("host"),
            port,
            user: text("user"),
            password: text("password"),
            dbname: text("database").or_else(|| text("dbname")),
            sslmode: text("sslmode"),
            sslrootcert: text("sslrootcert"),
            application_name: text("application_name"),
            cp_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<DatabaseConfig, ConfigError> {
        DatabaseConfig::from_mapping(&yaml_serde::from_str(yaml).unwrap())
    }

    #[test]
    fn psycopg2_args() {
        let c =
            parse("database: {name: psycopg2, args: {user: u, password: p, dbname: d, host: /run/pg, port: '5433', cp_max: 7}}").unwrap();
        let DatabaseConfig::Postgres(a) = c else { panic!("not postgres") };
        assert_eq!(a.user.as_deref(), Some("u"));
        assert_eq!(a.dbname.as_deref(), Some("d"));
        assert_eq!(a.host.as_deref(), Some("/run/pg"));
        assert_eq!(a.port, Some(5433));
        assert_eq!(a.cp_max, Some(7));
    }

    #[test]
    fn sqlite_and_multi_db() {
        assert_eq!(
            parse("database: {name: sqlite3, args: {database: /x/h.db}}").unwrap(),
            DatabaseConfig::Sqlite { path: "/x/h.db".into() }
        );
        let c = parse("databases: {state: {name: sqlite3, args: {database: s.db}, data_stores: [state]}, main: {name: sqlite3, args: {database: m.db}, data_stores: [main]}}").unwrap();
        assert_eq!(c, DatabaseConfig::Sqlite { path: "m.db".into() });
    }

    #[test]
    fn errors_are_named() {
        assert!(parse("x: 1").unwrap_err().to_string().contains("database"));
        assert!(parse("database: {name: mysql}").unwrap_err().to_string().contains("mysql"));
    }
}
