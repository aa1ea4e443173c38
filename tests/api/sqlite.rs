//! The SQLite store, differentially: the rows real Synapse wrote to
//! PostgreSQL are copied into a database with Synapse's own SQLite schema;
//! our service, configured with `sqlite3`, must then answer exactly as
//! Synapse does.

use reqwest::StatusCode;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use synapse_keys_worker::config::Config;

use crate::differential::World;
use crate::helpers::{Ask, Synapse, TokenIn, assert_same, env, spawn_worker_with};

const TABLES: [&str; 6] =
    ["users", "access_tokens", "devices", "e2e_device_keys_json", "e2e_cross_signing_keys", "e2e_cross_signing_signatures"];

/// Copies `TABLES` from Synapse's PostgreSQL into a copy of the SQLite
/// schema Synapse made. Test fixture only: Synapse's own database is read.
async fn copy_to_sqlite(path: &std::path::Path) {
    std::fs::copy(&env().sqlite_schema_db, path).unwrap();
    let pg = sqlx::PgPool::connect(&env().pg_url).await.unwrap();
    let opts = SqliteConnectOptions::new().filename(path).foreign_keys(false);
    let lite = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.unwrap();
    for table in TABLES {
        let rows: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT row_to_json(t)::text FROM {table} t"))).fetch_all(&pg).await.unwrap();
        for row in rows {
            let Value::Object(obj) = serde_json::from_str(&row).unwrap() else { unreachable!() };
            let cols: Vec<&str> = obj.keys().map(String::as_str).collect();
            let marks = vec!["?"; cols.len()].join(", ");
            let sql = format!("INSERT INTO {table} ({}) VALUES ({marks})", cols.join(", "));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for v in obj.values() {
                q = match v {
                    Value::Null => q.bind(None::<String>),
                    Value::Bool(b) => q.bind(i64::from(*b)),
                    Value::Number(n) => q.bind(n.as_i64().expect("integer column")),
                    Value::String(s) => q.bind(s.clone()),
                    other => q.bind(other.to_string()),
                };
            }
            q.execute(&lite).await.unwrap();
        }
    }
    lite.close().await;
}

#[tokio::test]
async fn sqlite_store_answers_like_synapse() {
    let hs = Synapse::new();
    let world = World::build(&hs).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("synapse.db");
    copy_to_sqlite(&db).await;

    let mut config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    config.synapse.database = synapse_keys_worker::config::DatabaseConfig::Sqlite { path: db };
    let worker = spawn_worker_with(config).await;
    assert_eq!(worker.app.store.backend(), "sqlite");

    let mut nonempty = 0;
    for (who, session) in world.requesters() {
        for body in world.queries() {
            let (status, answer) = assert_same(&worker, &Ask::keys_query("v3", &session.token, TokenIn::Header, &body)).await;
            assert_eq!(status, StatusCode::OK, "{who}: {answer}");
            nonempty += usize::from(answer["master_keys"].as_object().is_some_and(|m| !m.is_empty()));
        }
    }
    assert!(nonempty > 0, "the comparison saw cross-signing keys at least once");
}
