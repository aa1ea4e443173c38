//! The device-list health API (`/_keys_worker/admin/v1/`): who may call
//! it (Synapse's admin rule, checked against Synapse's own admin API),
//! inspecting local and remote lists, the drift against the remote's
//! truth, repairs through Synapse's stale mark and its writer, and the
//! resync queue. Remote users are real: the world's two federating
//! Synapses ("synapse-fed", ours, and "synapse-remote").
//!
//! Drift needs a lost federation message, which no API makes: the drift
//! tests write "synapse-fed"'s database (the one that "lost" it) before
//! anything has read the user's list into that Synapse's memory, so
//! Synapse's own `/keys/query` shows the drift too.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use synapse_keys_worker::config::Config;
use synapse_keys_worker::config::worker::AuditConfig;

use crate::federation::{Pair, config as fed_config};
use crate::helpers::{Ask, Synapse, TestUser, TokenIn, env, eventually_some, http, spawn_worker, spawn_worker_with, var};
use crate::operations::captured_logs;
use crate::remote::{closed_port, with_writer};

const API: &str = "/_keys_worker/admin/v1";

fn enc(s: &str) -> String {
    synapse_keys_worker::federation::percent_encode(s)
}

/// One call: status and JSON body.
async fn call(base: &str, method: Method, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = http().request(method, format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}")))
}

/// Every call of the API (those naming a user, about `user`).
fn endpoints(user: &str) -> Vec<(Method, String)> {
    vec![
        (Method::GET, format!("{API}/users/{}/device_list", enc(user))),
        (Method::POST, format!("{API}/users/{}/device_list/resync", enc(user))),
        (Method::GET, format!("{API}/resync_queue")),
        (Method::POST, format!("{API}/keys/query/explain")),
        (Method::POST, format!("{API}/destinations/remote.invalid/device_list/resync")),
        (Method::GET, format!("{API}/tasks/sometask")),
    ]
}

/// Without a token, with a user's, with a guest's: our answers are what
/// Synapse's own admin API answers the same token; with an admin's, the
/// calls are served. Every call is logged with who made it, never with
/// the token.
#[tokio::test]
async fn only_server_admins_may_call_it_as_synapse_decides() {
    let (logs, _capture) = captured_logs();
    let hs = Synapse::new();
    let user = hs.register("notadmin").await;
    let admin = hs.register_admin("admin").await;
    let guest = http().post(format!("{}/_matrix/client/v3/register?kind=guest", hs.url)).json(&json!({})).send().await.unwrap();
    let guest: Value = guest.json().await.unwrap();
    let guest_token = guest["access_token"].as_str().unwrap().to_owned();
    let worker = spawn_worker().await;
    let synapse_admin_path = format!("/_synapse/admin/v2/users/{}", enc(&user.user_id));
    for token in [None, Some(user.session.token.as_str()), Some(guest_token.as_str()), Some("not-a-token")] {
        let theirs = call(&hs.url, Method::GET, &synapse_admin_path, token).await;
        assert!(theirs.0.is_client_error(), "{theirs:?}");
        for (method, path) in endpoints(&user.user_id) {
            let ours = call(&worker.url, method, &path, token).await;
            assert_eq!(ours, theirs, "{path} with {token:?} (left: ours, right: Synapse's admin API)");
        }
    }
    let (status, inspected) = call(&worker.url, Method::GET, &endpoints(&user.user_id)[0].1, Some(&admin.session.token)).await;
    assert_eq!(status, StatusCode::OK, "{inspected}");
    assert_eq!(inspected["user_id"], user.user_id.as_str());
    let (status, queue) = call(&worker.url, Method::GET, &format!("{API}/resync_queue"), Some(&admin.session.token)).await;
    assert_eq!(status, StatusCode::OK, "{queue}");
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged.lines().any(|l| l.contains("admin API call") && l.contains(&admin.user_id) && l.contains("resync_queue")),
        "no audit line naming the admin in\n{logged}"
    );
    assert!(
        logged.lines().any(|l| l.contains("admin API call refused") && l.contains(&user.user_id) && l.contains("M_FORBIDDEN")),
        "no audit line naming the refused user in\n{logged}"
    );
    for secret in [&user.session.token, &admin.session.token, &guest_token] {
        assert!(!logged.contains(secret.as_str()), "a token reached the logs");
    }
}

/// A local user's list is Synapse's own: the devices Synapse's admin API
/// lists (with their names), the cross-signing keys, and the one device
/// not signed by the user's self-signing key.
#[tokio::test]
async fn a_local_users_list_shows_devices_keys_and_the_unsigned_ones() {
    let hs = Synapse::new();
    let admin = hs.register_admin("admin").await;
    let user = hs.register("local").await;
    let second = hs.login(&user, Some("laptop")).await;
    let (first_keys, _) = hs.upload_device_keys(&user.session).await;
    hs.upload_device_keys(&second).await;
    let cs = hs.setup_cross_signing(&user.session).await;
    hs.sign_own_device(&user.session, &cs, &first_keys).await;
    let worker = spawn_worker().await;
    let (status, got) = call(&worker.url, Method::GET, &endpoints(&user.user_id)[0].1, Some(&admin.session.token)).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["local"], true);
    let devices =
        hs.admin(Method::GET, &format!("/_synapse/admin/v2/users/{}/devices", enc(&user.user_id)), &admin.session, json!({})).await;
    let mut theirs: Vec<(String, Value)> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["device_id"].as_str().unwrap().to_owned(), d["display_name"].clone()))
        .collect();
    theirs.sort_by(|a, b| a.0.cmp(&b.0));
    let ours: Vec<(String, Value)> = got["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["device_id"].as_str().unwrap().to_owned(), d["display_name"].clone()))
        .collect();
    assert_eq!(ours, theirs, "devices and names (left: ours, right: Synapse's admin API)");
    assert_eq!(got["unsigned_devices"], json!([second.device_id]));
    assert_eq!(got["master_key"]["public_key"], cs.master.public.as_str());
    assert_eq!(got["self_signing_key"]["public_key"], cs.self_signing.public.as_str());
    let signed = got["devices"].as_array().unwrap().iter().find(|d| d["device_id"] == user.session.device_id.as_str()).unwrap();
    assert_eq!(signed["cross_signed"], true);
}

/// Bad input is a Matrix error, never a 500.
#[tokio::test]
async fn bad_input_gets_matrix_errors() {
    let hs = Synapse::new();
    let admin = hs.register_admin("admin").await;
    let mut config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    config.worker.device_list_repair = true;
    let worker = spawn_worker_with(config).await;
    let token = Some(admin.session.token.as_str());
    let unknown_local = format!("@nobody-{}:{}", std::process::id(), env().server_name);
    for (method, path, status, errcode) in [
        (Method::GET, format!("{API}/users/not-a-user-id/device_list"), 400, "M_INVALID_PARAM"),
        (Method::GET, format!("{API}/users/{}/device_list", enc(&unknown_local)), 404, "M_NOT_FOUND"),
        (Method::GET, format!("{API}/users/{}/device_list?check=maybe", enc(&admin.user_id)), 400, "M_INVALID_PARAM"),
        (Method::GET, format!("{API}/users/{}/device_list?check=true&timeout_ms=-1", enc("@u:remote.invalid")), 400, "M_INVALID_PARAM"),
        (Method::POST, format!("{API}/users/{}/device_list/resync", enc(&admin.user_id)), 400, "M_INVALID_PARAM"),
        (Method::POST, format!("{API}/users/{}/device_list/resync", enc("@never-seen:remote.invalid")), 404, "M_NOT_FOUND"),
        (Method::GET, format!("{API}/resync_queue?limit=0"), 400, "M_INVALID_PARAM"),
        (Method::GET, format!("{API}/resync_queue?from=garbage"), 400, "M_INVALID_PARAM"),
        (Method::DELETE, format!("{API}/resync_queue"), 405, "M_UNRECOGNIZED"),
        (Method::POST, format!("{API}/keys/query/explain"), 400, "M_NOT_JSON"),
    ] {
        let (got, body) = call(&worker.url, method, &path, token).await;
        assert_eq!((got.as_u16(), body["errcode"].as_str()), (status, Some(errcode)), "{path}: {body}");
    }
    let unknown_requester = format!("@nobody-{}:{}", std::process::id(), env().server_name);
    for (body, status, errcode) in [
        (json!({"query": {"device_keys": {}}}), 400, "M_BAD_JSON"),
        (json!({"requester": admin.user_id, "query": {"device_keys": 5}}), 400, "M_BAD_JSON"),
        (json!({"requester": admin.user_id, "query": {"device_keys": {"@a:b": "x"}}}), 400, "M_BAD_JSON"),
        (json!({"requester": "@someone:elsewhere.invalid", "query": {"device_keys": {}}}), 400, "M_INVALID_PARAM"),
        (json!({"requester": unknown_requester, "query": {"device_keys": {}}}), 404, "M_NOT_FOUND"),
    ] {
        let resp = http()
            .post(format!("{}{API}/keys/query/explain", worker.url))
            .bearer_auth(&admin.session.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let got = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap();
        assert_eq!((got, answer["errcode"].as_str()), (status, Some(errcode)), "{body}: {answer}");
    }
    // An unreachable remote is an answer about the remote, not an error.
    let (status, body) =
        call(&worker.url, Method::GET, &format!("{API}/users/{}/device_list?check=true", enc("@u:remote.invalid")), token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["remote"]["error"].is_string() && body.get("drift").is_none(), "{body}");
    assert_eq!(body["synapse"]["tracked"], false);
}

/// With repair off (the default) the repair call names the setting, and
/// nothing is written.
#[tokio::test]
async fn repair_off_names_the_setting() {
    let hs = Synapse::new();
    let admin = hs.register_admin("admin").await;
    let worker = spawn_worker().await;
    let (status, body) = call(
        &worker.url,
        Method::POST,
        &format!("{API}/users/{}/device_list/resync", enc("@u:remote.invalid")),
        Some(&admin.session.token),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().unwrap().contains("keys_worker.device_list_repair"), "{body}");
}

/// What the federation tests' pair needs for the health API: an admin of
/// "synapse-fed", and a connection to its database.
struct FedWorld {
    pair: Pair,
    admin: TestUser,
    db: sqlx::PgConnection,
}

impl FedWorld {
    async fn new() -> Self {
        use sqlx::Connection;
        let pair = Pair::new().await;
        let admin = pair.ours.register_admin_on("admin", &pair.env.yaml, &pair.env.server_name).await;
        let db = sqlx::PgConnection::connect(&var("SKW_TEST_FED_PG_URL")).await.unwrap();
        Self { pair, admin, db }
    }

    fn token(&self) -> Option<&str> {
        Some(&self.admin.session.token)
    }

    async fn inspect(&self, base: &str, query: &str) -> Value {
        let path = format!("{API}/users/{}/device_list{query}", enc(&self.pair.bob.user_id));
        let (status, body) = call(base, Method::GET, &path, self.token()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Explain of alice's query for bob.
    async fn explain(&self, base: &str) -> Value {
        let body = json!({"requester": self.pair.local.user_id, "query": {"device_keys": {&self.pair.bob.user_id: []}}});
        let resp =
            http().post(format!("{base}{API}/keys/query/explain")).bearer_auth(&self.admin.session.token).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    /// Synapse's own `/keys/query` answer about bob, asked by alice.
    async fn synapse_answer(&self) -> Value {
        let body = json!({"device_keys": {&self.pair.bob.user_id: []}});
        self.pair.ours.post("/_matrix/client/v3/keys/query", &self.pair.local.session.token, body).await
    }

    /// The remote's truth: bob's own homeserver's answer to bob.
    async fn truth(&self) -> Value {
        let body = json!({"device_keys": {&self.pair.bob.user_id: []}});
        self.pair.remote.post("/_matrix/client/v3/keys/query", &self.pair.bob.session.token, body).await
    }
}

/// Bob's device IDs in a `/keys/query` answer.
fn device_ids(answer: &Value, user: &str) -> Vec<String> {
    let mut ids: Vec<String> = answer["device_keys"][user].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    ids.sort();
    ids
}

/// Bob's devices' keys without `unsigned` (Synapse adds its own there).
fn device_keys(answer: &Value, user: &str) -> Value {
    let mut devices = answer["device_keys"][user].clone();
    for d in devices.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
        d.as_object_mut().unwrap().remove("unsigned");
    }
    devices
}

/// Every kind of drift, made on "synapse-fed" as lost updates would leave
/// it: a device it does not list, a deleted one it still lists, a device
/// whose signature it lost, and an old self-signing key. Inspect shows
/// them, the check against the remote names each, the repair fixes all of
/// them through Synapse itself: afterwards Synapse's own `/keys/query`
/// gives the remote's truth and its stale mark is gone.
#[tokio::test]
async fn drift_is_found_and_repaired_through_synapse() {
    let mut w = FedWorld::new().await;
    let (p, bob) = (&w.pair, &w.pair.bob.user_id);
    let second = p.remote.login(&p.bob, Some("laptop")).await;
    let third = p.remote.login(&p.bob, Some("tablet")).await;
    let cs = p.remote.setup_cross_signing(&p.bob.session).await;
    for s in [&p.bob.session, &second, &third] {
        let (keys, _) = p.remote.upload_device_keys(s).await;
        p.remote.sign_own_device(s, &cs, &keys).await;
    }
    p.share_a_room().await;
    let mut config = with_writer(fed_config(), fed_writer_port(&fed_config()));
    config.worker.device_list_repair = true;
    let worker = spawn_worker_with(config).await;
    // Our query makes "synapse-fed" fetch bob's list (the writer's resync):
    // it now tracks him, and has read nothing of his into its memory.
    let (status, first) = p.ask().send(&worker.url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(device_ids(&first, bob).len(), 3, "{first}");
    let tracked = w.inspect(&worker.url, "").await;
    assert_eq!(tracked["synapse"]["tracked"], true, "{tracked}");
    assert_eq!(tracked["synapse"]["devices"].as_array().unwrap().len(), 3, "{tracked}");
    assert!(tracked["synapse"]["unsigned_devices"].as_array().unwrap().is_empty(), "{tracked}");
    assert_eq!(tracked["last_resync"]["via"], "writer", "{tracked}");

    // The lost updates (see the module's comment).
    let (lost, resigned) = (second.device_id.clone(), third.device_id.clone());
    lose_updates(&mut w.db, bob, &lost, &resigned).await;
    let (p, bob) = (&w.pair, &w.pair.bob.user_id);
    let drifted = w.synapse_answer().await;
    let mut expected = vec![p.bob.session.device_id.clone(), resigned.clone(), "GHOST".to_owned()];
    expected.sort();
    assert_eq!(device_ids(&drifted, bob), expected, "Synapse itself answers the drifted list: {drifted}");

    // Explain, by a service started after the loss (ours caches Synapse's
    // view of bob for up to remote_status_ttl_ms, and a test's write is on
    // no stream): the answer is Synapse's own, and it came from its cache.
    let fresh = spawn_worker_with(worker.app.config.clone()).await;
    let explained = w.explain(&fresh.url).await;
    assert_eq!(explained["answer"], drifted, "explain's answer is what Synapse answers");
    assert_eq!(explained["answer"], p.ask().send(&fresh.url).await.1, "and what our /keys/query answers");
    let why = &explained["provenance"][bob];
    assert_eq!(why["source"], "synapse_cache", "{explained}");
    assert_eq!((why["stale_mark_seen"].as_bool(), why["in_synapse_cache"].as_bool()), (Some(false), Some(true)), "{why}");
    assert!(why["synapse_stream_id"].is_i64(), "{why}");
    assert_eq!(explained["provenance"][&p.local.user_id], Value::Null, "only queried users are explained");

    let checked = w.inspect(&worker.url, "?check=true").await;
    let drift = &checked["drift"];
    assert_eq!(drift["missing_devices"], json!([lost]), "{checked}");
    assert_eq!(drift["extra_devices"], json!(["GHOST"]), "{checked}");
    assert_eq!(drift["changed_devices"], json!([resigned]), "{checked}");
    assert_eq!(drift["cross_signing_changed"], json!(["self_signing"]), "{checked}");
    assert_eq!(checked["remote"]["devices"].as_array().unwrap().len(), 3, "{checked}");

    let (status, repair) = call(&worker.url, Method::POST, &format!("{API}/users/{}/device_list/resync", enc(bob)), w.token()).await;
    assert_eq!(status, StatusCode::OK, "{repair}");
    assert_eq!(repair["repaired"], true, "{repair}");
    assert_eq!(repair["marked"], true, "{repair}");
    assert_eq!(repair["diff"]["missing_devices"], json!([lost]), "added by the repair: {repair}");
    assert_eq!(repair["diff"]["extra_devices"], json!(["GHOST"]), "removed by the repair: {repair}");
    assert_eq!(repair["diff"]["changed_devices"], json!([resigned]), "{repair}");
    assert_eq!(repair["diff"]["cross_signing_changed"], json!(["self_signing"]), "{repair}");

    // Synapse is the oracle: its own answer is now the remote's truth.
    let (after, truth) = (w.synapse_answer().await, w.truth().await);
    assert_eq!(device_keys(&after, bob), device_keys(&truth, bob), "Synapse's answer after the repair vs the remote's own");
    assert_eq!(after["self_signing_keys"][bob]["keys"], truth["self_signing_keys"][bob]["keys"]);
    let clean = w.inspect(&worker.url, "?check=true").await;
    assert_eq!(
        clean["drift"],
        json!({"missing_devices": [], "extra_devices": [], "changed_devices": [], "cross_signing_changed": [], "stream_behind": false}),
        "{clean}"
    );
    assert_eq!(clean["synapse"]["stale_since_ts"], Value::Null, "Synapse cleared its mark: {clean}");
    assert_eq!(clean["synapse"]["answers_from_cache"], true);
}

/// "synapse-fed"'s database as lost federation updates leave it (a test
/// write, see the module's comment): `lost`'s row gone, a deleted device
/// "GHOST" still there, `resigned` without its self-signing signature, and
/// the self-signing key an older one.
async fn lose_updates(db: &mut sqlx::PgConnection, bob: &str, lost: &str, resigned: &str) {
    let run = |sql: &'static str| sqlx::query(sql);
    run("DELETE FROM device_lists_remote_cache WHERE user_id = $1 AND device_id = $2")
        .bind(bob)
        .bind(lost)
        .execute(&mut *db)
        .await
        .unwrap();
    let ghost = json!({"device_id": "GHOST", "keys": {"user_id": bob, "device_id": "GHOST", "algorithms": ["m.megolm.v1.aes-sha2"],
        "keys": {"ed25519:GHOST": "ghostkey"}, "signatures": {bob: {"ed25519:GHOST": "sig"}}}});
    run("INSERT INTO device_lists_remote_cache (user_id, device_id, content) VALUES ($1, 'GHOST', $2)")
        .bind(bob)
        .bind(ghost.to_string())
        .execute(&mut *db)
        .await
        .unwrap();
    let (content,): (String,) = sqlx::query_as("SELECT content FROM device_lists_remote_cache WHERE user_id = $1 AND device_id = $2")
        .bind(bob)
        .bind(resigned)
        .fetch_one(&mut *db)
        .await
        .unwrap();
    let mut content: Value = serde_json::from_str(&content).unwrap();
    content["keys"]["signatures"][bob].as_object_mut().unwrap().retain(|id, _| id == &format!("ed25519:{resigned}"));
    run("UPDATE device_lists_remote_cache SET content = $3 WHERE user_id = $1 AND device_id = $2")
        .bind(bob)
        .bind(resigned)
        .bind(content.to_string())
        .execute(&mut *db)
        .await
        .unwrap();
    let old_ssk = json!({"user_id": bob, "usage": ["self_signing"], "keys": {"ed25519:oldssk": "oldssk"}});
    run("UPDATE e2e_cross_signing_keys SET keydata = $2 WHERE user_id = $1 AND keytype = 'self_signing'")
        .bind(bob)
        .bind(old_ssk.to_string())
        .execute(&mut *db)
        .await
        .unwrap();
}

/// The port of "synapse-fed"'s replication listener (its main process is
/// its device-lists writer).
fn fed_writer_port(config: &Config) -> u16 {
    match &config.synapse.device_lists_writer {
        Some(synapse_keys_worker::config::synapse::InstanceLocation::Tcp { port, .. }) => *port,
        other => panic!("synapse-fed's writer: {other:?}"),
    }
}

/// The writer is down: the repair says so (503), the stale mark it wrote
/// stays and shows in the queue, and Synapse's own retry loop picks it up.
#[tokio::test]
async fn a_repair_without_the_writer_leaves_the_mark_for_synapse() {
    let w = FedWorld::new().await;
    let (p, bob) = (&w.pair, &w.pair.bob.user_id);
    p.remote.upload_device_keys(&p.bob.session).await;
    p.share_a_room().await;
    let live = spawn_worker_with(with_writer(fed_config(), fed_writer_port(&fed_config()))).await;
    assert_eq!(p.ask().send(&live.url).await.0, StatusCode::OK);
    let mut config = with_writer(fed_config(), closed_port().await);
    config.worker.device_list_repair = true;
    let worker = spawn_worker_with(config).await;
    let (status, body) = call(&worker.url, Method::POST, &format!("{API}/users/{}/device_list/resync", enc(bob)), w.token()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].as_str().unwrap().contains("stale mark"), "{body}");
    let (status, queue) = call(&worker.url, Method::GET, &format!("{API}/resync_queue?limit=1000"), w.token()).await;
    assert_eq!(status, StatusCode::OK);
    let listed = queue["users"].as_array().unwrap().iter().any(|u| u["user_id"] == bob.as_str());
    let server = queue["servers"].as_array().unwrap().iter().find(|s| s["server_name"] == p.env.remote_server_name.as_str());
    assert!(listed && server.is_some_and(|s| s["users"].as_i64() >= Some(1)), "{queue}");
    // While the mark stands Synapse's cache is not used: the writer being
    // unreachable, we resynced bob ourselves. (Synapse's loop may have
    // cleared the mark meanwhile: then its cache answers.)
    let explained = w.explain(&worker.url).await;
    let why = &explained["provenance"][bob];
    let expected = if why["stale_mark_seen"] == true { "resync_direct" } else { "synapse_cache" };
    assert_eq!(why["source"], expected, "{explained}");
    assert_eq!(device_ids(&explained["answer"], bob).len(), 1, "{explained}");
    // Synapse retries marked users every 30 s, and clears the mark.
    eventually_some(std::time::Duration::from_secs(90), || async {
        let inspected = w.inspect(&worker.url, "").await;
        inspected["synapse"]["stale_since_ts"].is_null().then_some(())
    })
    .await;
}

/// A whole server's repair, in the background: every user of the remote
/// server "synapse-fed" tracks is repaired, one at a time at the
/// configured rate, the drifted one comes back right, and a second repair
/// of the server is refused while the first runs. (Run apart from the
/// main suite: it marks every tracked user of that server stale, other
/// tests' too.)
#[tokio::test]
async fn fleet_a_whole_server_is_repaired_at_the_configured_rate() {
    let mut w = FedWorld::new().await;
    let (p, bob) = (&w.pair, w.pair.bob.user_id.clone());
    let carol = p.remote.register("carol").await;
    for s in [&p.bob.session, &carol.session] {
        p.remote.upload_device_keys(s).await;
    }
    p.share_a_room().await;
    let room = p.remote.post("/_matrix/client/v3/createRoom", &carol.session.token, json!({"invite": [&p.local.user_id]})).await;
    let room_id = room["room_id"].as_str().unwrap();
    p.ours.post(&format!("/_matrix/client/v3/rooms/{room_id}/join"), &p.local.session.token, json!({})).await;
    let mut config = with_writer(fed_config(), fed_writer_port(&fed_config()));
    config.worker.device_list_repair = true;
    config.worker.device_list_repair_per_second = 4;
    let worker = spawn_worker_with(config).await;
    let both = Ask::keys_query("v3", &p.local.session.token, TokenIn::Header, &json!({"device_keys": {&bob: [], &carol.user_id: []}}));
    let (status, first) = both.send(&worker.url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((device_ids(&first, &bob).len(), device_ids(&first, &carol.user_id).len()), (1, 1), "{first}");
    // Carol's one device lost, as in `lose_updates` (a test write).
    sqlx::query("DELETE FROM device_lists_remote_cache WHERE user_id = $1").bind(&carol.user_id).execute(&mut w.db).await.unwrap();
    let p = &w.pair;

    let server = enc(&p.env.remote_server_name);
    let path = format!("{API}/destinations/{server}/device_list/resync");
    let (status, started) = call(&worker.url, Method::POST, &path, w.token()).await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert!(started["total"].as_i64().unwrap() >= 2, "{started}");
    let (status, again) = call(&worker.url, Method::POST, &path, w.token()).await;
    assert_eq!((status, again["errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_UNKNOWN")), "one task per server: {again}");
    let task = format!("{API}/tasks/{}", started["task_id"].as_str().unwrap());
    let done = eventually_some(std::time::Duration::from_secs(180), || async {
        let (status, t) = call(&worker.url, Method::GET, &task, w.token()).await;
        assert_eq!(status, StatusCode::OK, "{t}");
        (t["status"] != "running").then_some(t)
    })
    .await;
    assert_eq!(done["status"], "finished", "{done}");
    let handled = done["repaired"].as_u64().unwrap() + done["unchanged"].as_u64().unwrap() + done["failed"].as_u64().unwrap();
    assert_eq!(Some(handled), done["done"].as_u64(), "{done}");
    assert!(done["repaired"].as_u64() >= Some(1), "carol's list changed: {done}");
    let took_ms = done["finished_ts"].as_i64().unwrap() - done["started_ts"].as_i64().unwrap();
    let paced_ms = (i64::try_from(handled).unwrap() - 1) * 250;
    assert!(took_ms >= paced_ms, "{handled} users in {took_ms} ms: faster than 4 a second");
    let answer = p.ours.post("/_matrix/client/v3/keys/query", &p.local.session.token, json!({"device_keys": {&carol.user_id: []}})).await;
    assert_eq!(device_ids(&answer, &carol.user_id), vec![carol.session.device_id.clone()], "Synapse has carol's device again");
    let (status, _) = call(&worker.url, Method::GET, &format!("{API}/tasks/nosuchtask"), w.token()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The auditor, unattended, against real lost updates: fake remote
/// servers whose users' lists change without a word to Synapse (no EDU is
/// ever sent), so Synapse's copies drift as after a lost update: a device
/// added, one removed, one's keys replaced, a self-signing key rotated.
/// The auditor finds each, and repairs it through Synapse (Synapse's own
/// answers become the remote's truth); it asks the server at most
/// `per_destination_per_interval` times a round; and a server that hangs
/// costs it one timeout, once, while the other is checked on. (Run apart
/// from the main suite, see the fleet test above. Like the remote tests,
/// it writes room memberships into Synapse's database: the fake servers
/// cannot join rooms.)
#[tokio::test]
async fn fleet_the_auditor_finds_and_repairs_drift_unattended() {
    use crate::fake_remote::{FakeRemote, Mode, Route};
    use crate::remote::{our_calls, setup, share_a_room};
    let s = setup().await;
    let hang = FakeRemote::start_for_homeserver().await;
    let users: Vec<String> = (0..5).map(|i| s.remote_user(&format!("audited{i}"))).collect();
    let stuck = hang.add_user(&crate::helpers::unique("stuck")).user_id;
    hang.add_device(&stuck, "PHONE", None);
    let ask_all = |list: &[&String]| {
        let body = json!({"device_keys": list.iter().map(|u| ((*u).clone(), json!([]))).collect::<serde_json::Map<_, _>>()});
        Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &body)
    };
    for u in users.iter().chain([&stuck]) {
        share_a_room(u).await;
    }
    // Synapse fetches and tracks them all.
    let (status, before) = ask_all(&users.iter().chain([&stuck]).collect::<Vec<_>>()).send(&s.hs.url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(device_ids(&before, &users[0]).len(), 2, "{before}");
    // The lost updates; users[4] stays as Synapse holds it.
    s.remote.add_device(&users[0], "NEW", None);
    s.remote.remove_device(&users[1], "LAPTOP");
    s.remote.add_device(&users[2], "PHONE", Some("Phone"));
    s.remote.rotate_self_signing_key(&users[3]);
    hang.set_mode(Route::UserDevices, Mode::Hang);

    let mut config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    config.worker.device_list_repair = true;
    config.worker.default_timeout_ms = 2000;
    config.worker.device_list_audit =
        AuditConfig { enabled: true, interval_ms: 1000, users_per_interval: 200, per_destination_per_interval: 3, repair: true };
    let worker = spawn_worker_with(config).await;
    let stats = &worker.app.device_list_stats;
    let truth = |u: &String| {
        let mut ids: Vec<String> = ["PHONE", "LAPTOP", "NEW"].iter().map(|d| (*d).to_owned()).collect();
        ids.retain(|d| !(u == &users[1] && d == "LAPTOP") && (u == &users[0] || d != "NEW"));
        ids.sort();
        ids
    };
    let rounds = eventually_some(std::time::Duration::from_secs(120), || async {
        let answer = ask_all(&users.iter().collect::<Vec<_>>()).send(&s.hs.url).await.1;
        let lists_right = users.iter().all(|u| device_ids(&answer, u) == truth(u));
        let ssk = |a: &Value| a["self_signing_keys"][&users[3]]["keys"].clone();
        let remote_ssk = s.remote_ssk(&users[3]);
        let keys_right = ssk(&answer) == remote_ssk;
        let all_repaired = stats.repairs()[2][0] >= 4;
        let unchanged_checked = stats.checks(synapse_keys_worker::device_lists::stats::CheckOutcome::InSync) >= 1;
        (lists_right && keys_right && all_repaired && unchanged_checked).then(|| stats.rounds.load(std::sync::atomic::Ordering::Relaxed))
    })
    .await;
    use synapse_keys_worker::device_lists::stats::CheckOutcome;
    let drift = stats.drift();
    assert!(stats.checks(CheckOutcome::Drifted) >= 4 && drift[0] >= 1 && drift[1] >= 1 && drift[2] >= 1 && drift[3] >= 1, "{drift:?}");
    let outcomes: Vec<u64> =
        [CheckOutcome::InSync, CheckOutcome::Drifted, CheckOutcome::AlreadyStale, CheckOutcome::Failed].map(|o| stats.checks(o)).to_vec();
    assert!(stats.checks(CheckOutcome::InSync) >= 1, "the unchanged user was checked too: {outcomes:?}");
    // Synapse's answer is the fake's: the changed device's new keys too.
    let answer = ask_all(&[&users[2]]).send(&s.hs.url).await.1;
    assert_eq!(answer["device_keys"][&users[2]]["PHONE"]["keys"], s.remote_device(&users[2], "PHONE")["keys"]);
    // Bounded: at most per_destination_per_interval of our requests a round.
    let rounds_now = stats.rounds.load(std::sync::atomic::Ordering::Relaxed).max(rounds);
    let asked = our_calls(&s.remote, Route::UserDevices);
    assert!(asked >= 5 && asked as u64 <= 3 * (rounds_now + 1), "{asked} requests in {rounds_now} rounds");
    // The hanging server was asked once (then backed off from), not three
    // times a round, and did not hold the other server's checks back.
    assert_eq!(our_calls(&hang, Route::UserDevices), 1, "one timeout for the hanging server");
    eprintln!(
        "auditor: {} drifted found, {} repaired, {rounds} rounds completed when all were; {asked} requests to the remote, 1 to the hanging one",
        stats.checks(CheckOutcome::Drifted),
        stats.repairs()[2][0]
    );
}

/// The auditor between the two real homeservers: a device "synapse-fed"
/// lost (a test write, as in the drift test) is found by the auditor and
/// put back through Synapse, unattended; the remote homeserver's access log
/// shows at most `per_destination_per_interval` of the auditor's requests
/// a round. (Run apart from the main suite: the auditor checks every
/// tracked user of the remote, other tests' too.)
#[tokio::test]
async fn fleet_the_auditor_repairs_a_lost_update_between_real_homeservers() {
    let mut w = FedWorld::new().await;
    let (p, bob) = (&w.pair, w.pair.bob.user_id.clone());
    let laptop = p.remote.login(&p.bob, Some("laptop")).await;
    for s in [&p.bob.session, &laptop] {
        p.remote.upload_device_keys(s).await;
    }
    p.share_a_room().await;
    let live = spawn_worker_with(with_writer(fed_config(), fed_writer_port(&fed_config()))).await;
    assert_eq!(device_ids(&p.ask().send(&live.url).await.1, &bob).len(), 2);
    sqlx::query("DELETE FROM device_lists_remote_cache WHERE user_id = $1 AND device_id = $2")
        .bind(&bob)
        .bind(&laptop.device_id)
        .execute(&mut w.db)
        .await
        .unwrap();
    let p = &w.pair;
    assert_eq!(device_ids(&w.synapse_answer().await, &bob).len(), 1, "Synapse lost the laptop");

    let log_start = std::fs::metadata(&p.env.remote_log).unwrap().len();
    let mut config = with_writer(fed_config(), fed_writer_port(&fed_config()));
    config.worker.device_list_repair = true;
    config.worker.device_list_audit =
        AuditConfig { enabled: true, interval_ms: 1000, users_per_interval: 200, per_destination_per_interval: 5, repair: true };
    let worker = spawn_worker_with(config).await;
    let stats = &worker.app.device_list_stats;
    eventually_some(std::time::Duration::from_secs(180), || async {
        (device_ids(&w.synapse_answer().await, &bob).len() == 2).then_some(())
    })
    .await;
    assert!(stats.repairs()[2][0] >= 1, "the auditor repaired it: {:?}", stats.repairs());
    let rounds = stats.rounds.load(std::sync::atomic::Ordering::Relaxed);
    let log = std::fs::read(&p.env.remote_log).unwrap();
    let ua = format!("\"{}\"", synapse_keys_worker::federation::USER_AGENT);
    let asked = String::from_utf8_lossy(&log[usize::try_from(log_start).unwrap()..])
        .lines()
        .filter(|l| l.contains("Processed request") && l.contains(&ua) && l.contains("/user/devices/"))
        .count();
    assert!(asked >= 1 && asked as u64 <= 5 * (rounds + 1), "{asked} requests at the remote in {rounds} rounds");
    eprintln!("auditor between real homeservers: repaired with {rounds} rounds completed; {asked} of its requests at the remote");
}

/// Repairs refuse a server outside `federation_domain_whitelist` (Synapse
/// would never resync it, and its stale mark would stay for good); a
/// writer that is alive but still fetching from the remote fails that
/// user's repair (200, `repaired: false`), not the writer (503); and the
/// start-up check of the grant never hangs on a database that does not
/// answer.
#[tokio::test]
async fn repairs_fail_the_right_way() {
    use crate::remote::{setup, share_a_room};
    let s = setup().await;
    let admin = s.hs.register_admin("admin").await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    let (status, _) =
        Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &json!({"device_keys": {&bob: []}})).send(&s.hs.url).await;
    assert_eq!(status, StatusCode::OK, "Synapse tracks bob");
    let path = format!("{API}/users/{}/device_list/resync?timeout_ms=1000", enc(&bob));

    let mut listed = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    listed.worker.device_list_repair = true;
    listed.synapse.federation.domain_whitelist = Some(["elsewhere.invalid".to_owned()].into());
    let worker = spawn_worker_with(listed).await;
    let (status, body) = call(&worker.url, Method::POST, &path, Some(&admin.session.token)).await;
    assert_eq!((status, body["errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_INVALID_PARAM")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("federation_domain_whitelist"), "{body}");
    let (status, queue) = call(&worker.url, Method::GET, &format!("{API}/resync_queue?limit=1000"), Some(&admin.session.token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!queue["users"].as_array().unwrap().iter().any(|u| u["user_id"] == bob.as_str()), "no mark written: {queue}");

    // A writer that answers /health but holds the resync.
    let writer = crate::fake_writer::FakeWriter::start(vec![json!({})]).await;
    writer.hold(0);
    let mut config = with_writer(Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap(), writer.port);
    config.worker.device_list_repair = true;
    let worker = spawn_worker_with(config).await;
    let (status, body) = call(&worker.url, Method::POST, &path, Some(&admin.session.token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["repaired"], false, "{body}");
    assert!(body["error"].as_str().unwrap().contains("still fetching"), "{body}");
    writer.unhold();
    // The test leaves Synapse's mark for bob: Synapse resyncs him from the
    // fake remote and clears it.

    // A database that accepts connections and never answers.
    let (port, _) = crate::remote::hanging_listener().await;
    let mut stalled = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    stalled.worker.device_list_repair = true;
    stalled.worker.db_acquire_timeout_ms = 300;
    let synapse_keys_worker::config::DatabaseConfig::Postgres(args) = &mut stalled.synapse.database else { panic!("PostgreSQL") };
    (args.host, args.port) = (Some("127.0.0.1".into()), Some(port));
    let app = synapse_keys_worker::App::from_config(stalled).unwrap();
    let said = tokio::time::timeout(std::time::Duration::from_secs(30), synapse_keys_worker::device_lists::repair_readiness(&app))
        .await
        .expect("the check gives up");
    assert!(said.is_some_and(|l| l.contains("could not be checked")));
}
