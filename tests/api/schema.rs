//! Our schema subset (demo and fixtures) against the schemas real Synapse
//! made: every table we keep must have exactly Synapse's columns, with the
//! same declared types on SQLite.

use std::collections::BTreeMap;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};
use synapse_keys_worker::store::SCHEMA_SUBSET;

use crate::helpers::{env, synapse_before};

type Columns = BTreeMap<String, String>;

async fn sqlite_tables(pool: &SqlitePool) -> BTreeMap<String, Columns> {
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'").fetch_all(pool).await.unwrap();
    let mut out = BTreeMap::new();
    for name in names {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info(\"{name}\")"))).fetch_all(pool).await.unwrap();
        let cols = rows.iter().map(|r| (r.get::<String, _>("name"), r.get::<String, _>("type").to_ascii_uppercase())).collect();
        out.insert(name, cols);
    }
    out
}

/// Our subset, as the world's Synapse release has it: columns a later
/// release added, which we never read, are left out for an older one.
async fn subset() -> BTreeMap<String, Columns> {
    let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await.unwrap();
    sqlx::raw_sql(SCHEMA_SUBSET).execute(&pool).await.unwrap();
    let mut tables = sqlite_tables(&pool).await;
    if synapse_before("1.152") {
        tables.get_mut("device_lists_changes_in_room").unwrap().remove("inserted_ts");
    }
    tables
}

#[tokio::test]
async fn subset_matches_synapse_sqlite_schema() {
    let ours = subset().await;
    assert!(ours.len() >= 10, "subset has tables: {ours:?}");
    let opts = SqliteConnectOptions::new().filename(&env().sqlite_schema_db).read_only(true);
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.unwrap();
    let synapse = sqlite_tables(&pool).await;
    for (table, cols) in &ours {
        let theirs = synapse.get(table).unwrap_or_else(|| panic!("Synapse's SQLite schema has no table {table}"));
        assert_eq!(cols, theirs, "columns of {table} (left: our subset, right: Synapse's)");
    }
}

#[tokio::test]
async fn subset_matches_synapse_postgres_schema() {
    let ours = subset().await;
    let pool = sqlx::PgPool::connect(&env().pg_url).await.unwrap();
    for (table, cols) in &ours {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1",
        )
        .bind(table)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(!names.is_empty(), "Synapse's PostgreSQL schema has no table {table}");
        let mut theirs: Vec<&str> = names.iter().map(String::as_str).collect();
        theirs.sort_unstable();
        let mine: Vec<&str> = cols.keys().map(String::as_str).collect();
        assert_eq!(mine, theirs, "columns of {table} (left: our subset, right: Synapse's PostgreSQL)");
    }
}
