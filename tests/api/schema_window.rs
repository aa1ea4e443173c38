//! The Synapse versions whose databases we read: the real binary refuses a
//! database outside the window with one line, and serves a newer one that
//! Synapse's compat rule still lets old code read, with a warning, its
//! version in `/ready` and the metrics.
//!
//! This test writes a database: a scratch one of its own on the world's
//! PostgreSQL, holding only Synapse's three schema-record tables, because
//! no Synapse of another schema version can be made to write them.

use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use sqlx::Executor;

use crate::helpers::{Ask, ServiceProcess, env, eventually_some, metric_value, unique};

/// Synapse's DDL (`synapse/storage/schema/common/schema_version.sql`).
const SCHEMA_RECORD: &str = "
CREATE TABLE schema_version (Lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE, version INTEGER NOT NULL, upgraded BOOL NOT NULL, CHECK (Lock='X'));
CREATE TABLE schema_compat_version (Lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE, compat_version INTEGER NOT NULL, CHECK (Lock='X'));
CREATE TABLE applied_schema_deltas (version INTEGER NOT NULL, file TEXT NOT NULL, UNIQUE(version, file));
";

/// A scratch database with `record` (`None`: without Synapse's tables), and
/// a config file naming it; the world's config otherwise.
async fn database_at(dir: &std::path::Path, record: Option<(i64, i64)>) -> std::path::PathBuf {
    let name = unique("skw_schema").replace('-', "_");
    let admin = sqlx::PgPool::connect(&env().pg_url).await.unwrap();
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.unwrap();
    let mut url = url::Url::parse(&env().pg_url).unwrap();
    url.set_path(&name);
    let db = sqlx::PgPool::connect(url.as_str()).await.unwrap();
    if let Some((version, compat)) = record {
        db.execute(SCHEMA_RECORD).await.unwrap();
        sqlx::query("INSERT INTO schema_version (version, upgraded) VALUES ($1, true)").bind(version as i32).execute(&db).await.unwrap();
        sqlx::query("INSERT INTO schema_compat_version (compat_version) VALUES ($1)").bind(compat as i32).execute(&db).await.unwrap();
    }
    db.close().await;
    let mut config: yaml_serde::Mapping = yaml_serde::from_str(&std::fs::read_to_string(&env().homeserver_yaml).unwrap()).unwrap();
    config["database"]["args"]["database"] = name.into();
    let path = dir.join(format!("{}.yaml", unique("homeserver")));
    std::fs::write(&path, yaml_serde::to_string(&config).unwrap()).unwrap();
    path
}

/// Runs the binary on `config` until it exits; its exit code and stderr.
async fn refused(config: &std::path::Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_synapse-keys-worker"))
        .arg("-c")
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = eventually_some(Duration::from_secs(20), || std::future::ready(child.try_wait().unwrap())).await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

#[tokio::test]
async fn a_database_outside_the_window_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (record, says) in [
        (Some((91, 84)), "is older than we read; we read Synapse 1.136.0 to 1.163.x (schema 92 to 94): upgrade Synapse first"),
        (Some((97, 95)), "is too new to read: its compat version is above 94"),
        (None, "has no Synapse schema_version"),
    ] {
        let (code, stderr) = refused(&database_at(dir.path(), record).await).await;
        assert_eq!(code, Some(1), "{record:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(says), "{record:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_newer_database_synapse_still_reads_is_served_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let config = database_at(dir.path(), Some((97, 94))).await;
    let service = ServiceProcess::start_from(&config, &[]).await;
    let ready = Ask { method: Method::GET, path: "/ready".into(), headers: vec![], body: None };
    let (status, body) = ready.send(&service.url).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["database"]["schema"]["version"], 97);
    assert_eq!(body["database"]["schema"]["compat_version"], 94);
    assert_eq!(body["database"]["schema"]["window"], "newer");
    let metrics = service.metrics().await;
    assert_eq!(metric_value(&metrics, "synapse_keys_worker_database_schema_version"), 97.0);
    assert_eq!(metric_value(&metrics, "synapse_keys_worker_database_schema_in_tested_window"), 0.0);
    let log = std::fs::read_to_string(&service.log).unwrap();
    let warned: Vec<_> = log.lines().filter(|l| l.contains("newer than the Synapse 1.136.0 to 1.163.x we test")).collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("WARN"), "{}", warned[0]);
}
