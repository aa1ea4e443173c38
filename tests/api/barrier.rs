//! The read barrier against the real PostgreSQL: what one request can do
//! to it, and what the database role of docs/deployment.md lets it read.

use serde_json::json;
use synapse_keys_worker::config::{Config, DatabaseConfig};

use crate::helpers::{Ask, Synapse, TokenIn, assert_same_ours_first, env, spawn_worker, spawn_worker_with};

/// A remote user ID with a NUL (valid JSON, never storable in PostgreSQL)
/// is dropped from the quick probe like from every other statement: the
/// probe answers, and the quick probe stays in use for everyone after.
#[tokio::test]
async fn a_nul_in_a_remote_user_id_leaves_the_quick_probe_on() {
    let worker = spawn_worker().await;
    let conn = synapse_keys_worker::store::ProbeConnection::new(worker.app.store.clone(), std::time::Duration::from_secs(5));
    let rows = conn.quick_probe(&["@a\0b:remote.invalid", "@c:remote.invalid"]).await;
    assert!(matches!(rows, Ok(Some(_))), "the quick probe refused the IDs: {rows:?}");

    let hs = Synapse::new();
    let alice = hs.register("alice").await;
    let body = json!({"device_keys": {"@a\u{0}b:remote.invalid": [], &alice.user_id: []}});
    let (status, answer) = Ask::keys_query("v3", &alice.session.token, TokenIn::Header, &body).send(&worker.url).await;
    assert_eq!(status, 200, "{answer}");
    assert!(worker.app.barrier.quick_probe_usable(), "one request switched the quick probe off");
}

/// The read-only role docs/deployment.md tells operators to create may read
/// every table we read: a query of local and remote users answers as
/// Synapse does, and the barrier keeps its quick probe and its unbroken
/// run of ids (each falls back, with a warning, when refused).
///
/// This test writes PostgreSQL's catalog (it creates the role and grants
/// it `SELECT` on Synapse's tables, as the docs say), and one stale mark
/// of a made-up user, which it deletes.
#[tokio::test]
async fn the_documented_read_only_role_reads_everything_we_read() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deployment.md")).unwrap();
    let sql = docs.split("```sql\n").nth(1).and_then(|b| b.split("```").next()).expect("deployment.md has the role's SQL");
    assert!(sql.contains("CREATE ROLE synapse_keys_ro"), "{sql}");
    let dbname = url::Url::parse(&env().pg_url).unwrap().path().trim_start_matches('/').to_owned();
    let pool = sqlx::PgPool::connect(&env().pg_url).await.unwrap();
    // Made anew for each run of the test world (roles outlive databases).
    sqlx::raw_sql(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'synapse_keys_ro') THEN
            EXECUTE 'DROP OWNED BY synapse_keys_ro'; EXECUTE 'DROP ROLE synapse_keys_ro'; END IF; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    let sql = sql.replace("DATABASE synapse ", &format!("DATABASE \"{dbname}\" "));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();

    let mut config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    let DatabaseConfig::Postgres(args) = &mut config.synapse.database else { panic!("the test world runs PostgreSQL") };
    (args.user, args.password) = (Some("synapse_keys_ro".into()), Some("change-me".into()));
    let worker = spawn_worker_with(config).await;
    let hs = Synapse::new();
    let alice = hs.register("alice").await;
    hs.upload_device_keys(&alice.session).await;
    hs.setup_cross_signing(&alice.session).await;
    let body = json!({"device_keys": {&alice.user_id: [], "@nobody:remote.invalid": []}});
    // Ours first: asking a remote changes Synapse's backoff for it.
    let (status, _) = assert_same_ours_first(&worker, &Ask::keys_query("v3", &alice.session.token, TokenIn::Header, &body)).await;
    assert_eq!(status, 200);
    let barrier = &worker.app.barrier;
    assert!(barrier.quick_probe_usable() && barrier.unbroken_run_usable(), "the role was refused what the barrier reads");
    let schema = worker.app.store.schema_state().await.expect("the role reads Synapse's schema record");
    assert!(schema.is_some_and(|s| (92..=94).contains(&s.version)));

    // A role granted what an earlier version of the docs listed, without
    // the tables only the unbroken run reads: answers still come, the
    // barrier probes without the run.
    sqlx::raw_sql(
        "REVOKE SELECT ON device_lists_outbound_pokes, device_lists_changes_in_room, device_lists_remote_pending,
            schema_version, schema_compat_version, applied_schema_deltas FROM synapse_keys_ro",
    )
    .execute(&pool)
    .await
    .unwrap();
    let older = spawn_worker_with(worker.app.config.clone()).await;
    let ask = Ask::keys_query("v3", &alice.session.token, TokenIn::Header, &json!({"device_keys": {&alice.user_id: []}}));
    assert_eq!(ask.send(&older.url).await.0, 200);
    assert!(!older.app.barrier.unbroken_run_usable(), "the refusal was noticed");
    assert_eq!(ask.send(&older.url).await.0, 200, "and probes go on without the run");
    // Nor the schema record: the version goes unchecked, not refused.
    let unchecked = synapse_keys_worker::schema_window::check_at_start(
        std::sync::Arc::clone(&older.app.schema),
        older.app.store.clone(),
        std::time::Duration::from_secs(5),
    )
    .await;
    assert_eq!(unchecked, Ok(()));
    assert!(older.app.schema.last().is_none());

    // Repair needs one more grant, docs/device-lists.md's; without it the
    // start-up check says so in one line.
    let mut repairing = worker.app.config.clone();
    repairing.worker.device_list_repair = true;
    let repairer = spawn_worker_with(repairing).await;
    let said = synapse_keys_worker::device_lists::repair_readiness(&repairer.app).await.expect("the missing grant is said");
    assert!(said.contains("may not insert into device_lists_remote_resync"), "{said}");
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/device-lists.md")).unwrap();
    let grant = docs.split("```sql\n").nth(1).and_then(|b| b.split("```").next()).expect("device-lists.md has the grant");
    assert!(grant.trim().starts_with("GRANT INSERT ON device_lists_remote_resync TO synapse_keys_ro"), "{grant}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(grant.to_owned())).execute(&pool).await.unwrap();
    assert_eq!(synapse_keys_worker::device_lists::repair_readiness(&repairer.app).await, None);
    // The one write works with that grant alone, on a read-only session,
    // and keeps an existing mark as Synapse's upsert does. The test then
    // deletes the mark it made (a test write: Synapse would retry it).
    let marker = repairer.app.store.stale_marker().unwrap();
    let user = format!("@ro-check-{}:localhost:1", std::process::id());
    assert!(marker.mark(&user, 1).await.unwrap(), "marked");
    assert!(!marker.mark(&user, 2).await.unwrap(), "an existing mark is kept");
    let (added,): (i64,) =
        sqlx::query_as("SELECT added_ts FROM device_lists_remote_resync WHERE user_id = $1").bind(&user).fetch_one(&pool).await.unwrap();
    assert_eq!(added, 1);
    sqlx::query("DELETE FROM device_lists_remote_resync WHERE user_id = $1").bind(&user).execute(&pool).await.unwrap();
}
