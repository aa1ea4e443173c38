//! Opening pools from Synapse's `database` settings. Pools connect lazily,
//! so the service starts (and `/health` answers) while the database is
//! down; requests then fail fast with 503 instead of hanging.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

use super::{SCHEMA_SUBSET, Store};
use crate::config::database::PostgresArgs;
use crate::config::{DatabaseConfig, WorkerConfig};

impl Store {
    pub fn connect(db: &DatabaseConfig, worker: &WorkerConfig) -> anyhow::Result<Self> {
        let acquire = Duration::from_millis(worker.db_acquire_timeout_ms);
        match db {
            DatabaseConfig::Postgres(args) => {
                let max = worker.db_max_connections.or(args.cp_max).unwrap_or(10).max(1);
                Ok(Store::Postgres(super::PgConns::new(pg_options(args, worker.db_statement_timeout_ms)?, max, acquire)))
            }
            DatabaseConfig::Sqlite { path } => {
                let opts = SqliteConnectOptions::new().filename(path).read_only(true).busy_timeout(acquire);
                let pool = SqlitePoolOptions::new()
                    .max_connections(worker.db_max_connections.unwrap_or(4).max(1))
                    .acquire_timeout(acquire)
                    .connect_lazy_with(opts);
                Ok(Store::Sqlite(pool))
            }
        }
    }

    /// Creates a fresh SQLite file holding the schema subset, for the demo
    /// and tests; `seed` is run after the schema. Never used on a database
    /// that Synapse owns.
    pub async fn create_sqlite_fixture(path: &Path, seed: &str) -> anyhow::Result<Self> {
        Ok(Store::Sqlite(sqlite_fixture(path, seed).await?))
    }

    /// The demo's database: a fresh SQLite file with the schema subset,
    /// the demo users and keys, and `token` as an access token of
    /// `@alice` on `server_name` (the seed's).
    pub async fn create_demo(path: &Path, server_name: &str, token: &str) -> anyhow::Result<Self> {
        let pool = sqlite_fixture(path, DEMO_SEED).await?;
        sqlx::query("INSERT INTO access_tokens (id, user_id, device_id, token) VALUES (1, ?1, 'ALICEDEV1', ?2)")
            .bind(format!("@alice:{server_name}"))
            .bind(token)
            .execute(&pool)
            .await?;
        Ok(Store::Sqlite(pool))
    }
}

async fn sqlite_fixture(path: &Path, seed: &str) -> anyhow::Result<sqlx::SqlitePool> {
    let _ = std::fs::remove_file(path);
    let opts = SqliteConnectOptions::new().filename(path).create_if_missing(true);
    let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
    sqlx::raw_sql(SCHEMA_SUBSET).execute(&pool).await?;
    // Seeds are our own fixture text (demo data, test fixtures), not user input.
    sqlx::raw_sql(sqlx::AssertSqlSafe(seed.to_owned())).execute(&pool).await?;
    Ok(pool)
}

/// The demo's users, devices and cross-signing keys (real signatures).
const DEMO_SEED: &str = include_str!("demo_seed.sql");

fn pg_options(a: &PostgresArgs, statement_timeout_ms: u64) -> anyhow::Result<PgConnectOptions> {
    let mut o = PgConnectOptions::new_without_pgpass();
    match a.host.as_deref() {
        Some(h) if h.starts_with('/') => o = o.socket(h),
        Some(h) => o = o.host(h),
        // libpq's default: the local socket directory, when there is one.
        None if Path::new("/var/run/postgresql").exists() => o = o.socket("/var/run/postgresql"),
        None => o = o.host("localhost"),
    }
    if let Some(port) = a.port {
        o = o.port(port);
    }
    if let Some(user) = &a.user {
        o = o.username(user);
    }
    if let Some(pw) = &a.password {
        o = o.password(pw);
    }
    if let Some(db) = &a.dbname {
        o = o.database(db);
    }
    if let Some(mode) = &a.sslmode {
        o = o.ssl_mode(PgSslMode::from_str(mode).map_err(|e| anyhow::anyhow!("database.args.sslmode: {e}"))?);
    }
    if let Some(cert) = &a.sslrootcert {
        o = o.ssl_root_cert(cert.as_str());
    }
    o = o.application_name(a.application_name.as_deref().unwrap_or("synapse-keys-worker"));
    if statement_timeout_ms > 0 {
        o = o.options([("statement_timeout", statement_timeout_ms.to_string())]);
    }
    // Belt and braces: this service never writes to Synapse's database.
    o = o.options([("default_transaction_read_only", "on")]);
    Ok(o)
}
