//! Settings the main test Synapse leaves at their defaults, compared with a
//! second real Synapse that has them on (scripts/test.sh starts it on its own
//! database): MSC4263 (`experimental_features.msc4263_limit_key_queries_to_users_who_share_rooms`:
//! only users sharing a joined or invited room with the requester are
//! answered), `federation_domain_whitelist: [allowed.test.invalid]` and
//! `account_validity`.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use synapse_keys_worker::config::Config;

use std::time::Duration;

use crate::helpers::{Ask, TokenIn, eventually, http, spawn_worker_with, unique, var};

struct Variant {
    url: String,
    yaml: std::path::PathBuf,
}

fn variant() -> Variant {
    Variant { url: var("SKW_TEST_VARIANT_SYNAPSE_URL"), yaml: var("SKW_TEST_VARIANT_HOMESERVER_YAML").into() }
}

impl Variant {
    fn config(&self) -> Config {
        Config::load(std::slice::from_ref(&self.yaml), Vec::new()).unwrap()
    }

    /// A new user made a server admin, and its token. The admin flag is a
    /// fixture write to the variant's database: the API that makes admins
    /// (shared-secret registration) needs the registration secret this
    /// Synapse deliberately lacks (its macaroons use the derived key).
    async fn admin(&self) -> String {
        let (admin, token) = user(&self.url, "admin").await;
        sqlx::query("UPDATE users SET admin = 1 WHERE name = $1").bind(&admin).execute(&variant_db().await).await.unwrap();
        token
    }
}

async fn call(url: &str, method: Method, path: &str, token: Option<&str>, body: Value) -> Value {
    let mut req = http().request(method, format!("{url}{path}")).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: {status} {v}");
    v
}

/// (user_id, token) of a new user with device keys.
async fn user(url: &str, name: &str) -> (String, String) {
    let username = unique(name);
    let r = call(
        url,
        Method::POST,
        "/_matrix/client/v3/register",
        None,
        json!({"username": username, "password": format!("pw-{username}"), "auth": {"type": "m.login.dummy"}}),
    )
    .await;
    let (uid, tok, dev) = (
        r["user_id"].as_str().unwrap().to_owned(),
        r["access_token"].as_str().unwrap().to_owned(),
        r["device_id"].as_str().unwrap().to_owned(),
    );
    let keys = json!({"device_keys": {"user_id": uid, "device_id": dev, "algorithms": ["m.olm.v1.curve25519-aes-sha2"], "keys": {format!("ed25519:{dev}"): "AAAA", format!("curve25519:{dev}"): "BBBB"}, "signatures": {}}});
    call(url, Method::POST, "/_matrix/client/v3/keys/upload", Some(&tok), keys).await;
    (uid, tok)
}

/// A private room made by `owner_token`'s user, with `invitees` invited
/// (an invite is enough to share a room for MSC4263); its ID.
async fn room_inviting(url: &str, owner_token: &str, invitees: &[&str]) -> String {
    let room = call(url, Method::POST, "/_matrix/client/v3/createRoom", Some(owner_token), json!({"preset": "private_chat"})).await;
    let room_id = room["room_id"].as_str().unwrap().to_owned();
    for user in invitees {
        call(url, Method::POST, &format!("/_matrix/client/v3/rooms/{room_id}/invite"), Some(owner_token), json!({"user_id": user})).await;
    }
    room_id
}

#[tokio::test]
async fn only_users_sharing_a_room_are_answered_like_synapse() {
    let f = variant();
    let config = f.config();
    assert!(config.synapse.msc4263_limit_key_queries_to_users_who_share_rooms);
    let worker = spawn_worker_with(config).await;
    let (alice, alice_tok) = user(&f.url, "alice").await;
    let (bob, bob_tok) = user(&f.url, "bob").await;
    let (carol, carol_tok) = user(&f.url, "carol").await;
    let (dave, _) = user(&f.url, "dave").await;
    // Alice's room: Bob is invited (not joined), Dave joins; Carol is nowhere.
    room_inviting(&f.url, &alice_tok, &[&bob, &dave]).await;
    let body = json!({"device_keys": {&alice: [], &bob: [], &carol: [], &dave: []}});
    for (who, token) in [("alice", &alice_tok), ("bob", &bob_tok), ("carol", &carol_tok)] {
        let ask = Ask::keys_query("v3", token, TokenIn::Header, &body);
        let theirs = ask.send(&f.url).await;
        let ours = ask.send(&worker.url).await;
        assert_eq!(ours, theirs, "{who}: ours vs Synapse's");
        assert_eq!(theirs.0, StatusCode::OK);
        let answered: Vec<&String> = theirs.1["device_keys"].as_object().unwrap().keys().collect();
        match who {
            "alice" => assert_eq!(answered.len(), 3, "alice sees herself, invited bob and invited dave: {answered:?}"),
            "carol" => assert!(answered.is_empty(), "carol shares no room, not even with herself: {answered:?}"),
            _ => {}
        }
    }
}

/// A destination outside `federation_domain_whitelist` is never contacted;
/// its users get Synapse's `FederationDeniedError` failure, through the
/// writer (which answers `null`) and without it.
#[tokio::test]
async fn federation_domain_whitelist_denies_like_synapse() {
    let f = variant();
    let (alice, alice_tok) = user(&f.url, "alice").await;
    let room_id = room_inviting(&f.url, &alice_tok, &[]).await;
    // A remote member from a denied domain: a fixture row in the variant's
    // database (federation with that domain is refused, so no real join
    // can make one). Needed so MSC4263 lets the user through and Synapse
    // resyncs rather than asking `/user/keys/query` alone.
    let denied = format!("@{}:denied.test.invalid", unique("bob"));
    join_remote_member(&room_id, &denied).await;
    let body = json!({"device_keys": {&alice: [], &denied: []}});
    let ask = Ask::keys_query("v3", &alice_tok, TokenIn::Header, &body);
    let theirs = ask.send(&f.url).await;
    assert_eq!(
        theirs.1["failures"]["denied.test.invalid"],
        json!({"status": 403, "errcode": "M_FORBIDDEN", "message": "403: Federation denied with denied.test.invalid."}),
        "{}",
        theirs.1
    );
    let config = f.config();
    assert!(!config.synapse.federation.is_domain_allowed("denied.test.invalid"));
    let with_writer = spawn_worker_with(config.clone()).await;
    assert_eq!(ask.send(&with_writer.url).await, theirs, "through the writer");
    // The writer unreachable: our own resync is denied the same way.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let alone = spawn_worker_with(crate::remote::with_writer(config, dead)).await;
    assert_eq!(ask.send(&alone.url).await, theirs, "without the writer");
}

/// With `account_validity` on, an expired account gets 403
/// `ORG_MATRIX_EXPIRED_ACCOUNT` (Synapse's code; the issue said `M_EXPIRED_ACCOUNT`); renewed, it is answered again.
#[tokio::test]
async fn expired_accounts_refused_like_synapse() {
    let f = variant();
    let config = f.config();
    assert!(config.synapse.account_validity_enabled);
    let worker = spawn_worker_with(config).await;
    let admin = f.admin().await;
    let (alice, alice_tok) = user(&f.url, "alice").await;
    let body = json!({"device_keys": {&alice: []}});
    let ask = Ask::keys_query("v3", &alice_tok, TokenIn::Header, &body);
    let fresh = ask.send(&f.url).await;
    assert_eq!(fresh.0, StatusCode::OK);
    assert_eq!(ask.send(&worker.url).await, fresh, "asked once, so the token is cached");

    let validity = "/_synapse/admin/v1/account_validity/validity";
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    call(&f.url, Method::POST, validity, Some(&admin), json!({"user_id": alice, "expiration_ts": now - 60_000})).await;
    let expired = ask.send(&f.url).await;
    assert_eq!(expired.0, StatusCode::FORBIDDEN, "{}", expired.1);
    assert_eq!(expired.1, json!({"errcode": "ORG_MATRIX_EXPIRED_ACCOUNT", "error": "User account has expired"}));
    // Synapse's cache invalidation reaches ours over the replication stream.
    eventually(Duration::from_secs(10), || async { ask.send(&worker.url).await == expired }).await;

    call(&f.url, Method::POST, validity, Some(&admin), json!({"user_id": alice, "expiration_ts": now + 3_600_000})).await;
    assert_eq!(ask.send(&f.url).await, fresh);
    eventually(Duration::from_secs(10), || async { ask.send(&worker.url).await == fresh }).await;
}

/// Adds `user_id` as a joined member of `room_id` in the variant's
/// database: a fixture write (one `current_state_events` row). Its one use
/// is a member from a domain `federation_domain_whitelist` denies, whom no
/// real join can bring in (federation with them is refused).
async fn join_remote_member(room_id: &str, user_id: &str) {
    sqlx::query(
        "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership) VALUES ($1, $2, 'm.room.member', $3, 'join')",
    )
    .bind(format!("$ev-{}", unique("member")))
    .bind(room_id)
    .bind(user_id)
    .execute(&variant_db().await)
    .await
    .unwrap();
}

async fn variant_db() -> sqlx::PgPool {
    let url = crate::helpers::env().pg_url.rsplit_once('/').map(|(base, _)| format!("{base}/synapse_variant")).unwrap();
    sqlx::PgPool::connect(&url).await.unwrap()
}

/// With no `macaroon_secret_key` and no registration secret, Synapse keys
/// guest macaroons with the SHA-256 of the signing key's seed; so do we.
#[tokio::test]
async fn guest_macaroons_with_the_derived_key() {
    let f = variant();
    let config = f.config();
    let yaml = std::fs::read_to_string(&f.yaml).unwrap();
    assert!(!yaml.contains("macaroon_secret_key") && !yaml.contains("registration_shared_secret"), "the variant derives its key");
    assert!(config.synapse.macaroon_secret.is_some());
    let worker = spawn_worker_with(config).await;
    let guest = call(&f.url, Method::POST, "/_matrix/client/v3/register?kind=guest", None, json!({})).await;
    let (guest_id, token) = (guest["user_id"].as_str().unwrap(), guest["access_token"].as_str().unwrap());
    let (alice, alice_tok) = user(&f.url, "alice").await;
    // MSC4263: the guest must share a room with alice to see her.
    room_inviting(&f.url, &alice_tok, &[guest_id]).await;
    let body = json!({"device_keys": {&alice: [], guest_id: []}});
    let ask = Ask::keys_query("v3", token, TokenIn::Header, &body);
    let theirs = ask.send(&f.url).await;
    assert_eq!(theirs.0, StatusCode::OK, "{}", theirs.1);
    assert!(theirs.1["device_keys"][&alice].as_object().is_some_and(|d| !d.is_empty()), "{}", theirs.1);
    assert_eq!(ask.send(&worker.url).await, theirs);
}

/// The variant's bridge (its registration's `url`): records the MSC3984 key
/// queries it gets and answers them as told; accepts event transactions.
struct FakeBridge {
    state: std::sync::Arc<std::sync::Mutex<BridgeState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct BridgeState {
    answer: Option<Value>,
    asks: Vec<(String, Value)>,
}

impl Drop for FakeBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeBridge {
    async fn start(port: u16) -> Self {
        use axum::routing::{post, put};
        type Shared = std::sync::Arc<std::sync::Mutex<BridgeState>>;
        let state = Shared::default();
        let json_reply = |status: u16, v: Value| {
            let status = axum::http::StatusCode::from_u16(status).unwrap();
            (status, [(axum::http::header::CONTENT_TYPE, "application/json")], v.to_string())
        };
        let keys = move |axum::extract::State(s): axum::extract::State<Shared>, headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let mut s = s.lock().unwrap();
            s.asks.push((auth, serde_json::from_slice(&body).unwrap_or(Value::Null)));
            match s.answer.clone() {
                Some(v) => json_reply(200, v),
                None => json_reply(500, json!({"errcode": "M_UNKNOWN"})),
            }
        };
        let app = axum::Router::new()
            .route("/_matrix/app/unstable/org.matrix.msc3984/keys/query", post(keys))
            .route("/_matrix/app/v1/transactions/{txn}", put(move || async move { json_reply(200, json!({})) }))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("the bridge's port (one test only)");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { state, task }
    }

    fn answer(&self, answer: Option<Value>) {
        self.state.lock().unwrap().answer = answer;
    }

    fn asks(&self) -> Vec<(String, Value)> {
        std::mem::take(&mut self.state.lock().unwrap().asks)
    }
}

/// MSC3984: the bridge is asked for its exclusive users' keys, and the
/// devices it answers replace or join theirs, as in Synapse.
#[tokio::test]
async fn appservice_keys_merged_like_synapse() {
    let f = variant();
    let config = f.config();
    assert!(config.synapse.msc3984_appservice_key_query);
    let service = config.synapse.app_services[0].clone();
    let port = url::Url::parse(service.url.as_deref().unwrap()).unwrap().port().unwrap();
    let bridge = FakeBridge::start(port).await;
    let worker = spawn_worker_with(config).await;

    let reg = json!({"type": "m.login.application_service", "username": unique("kbridge_")});
    let r = call(&f.url, Method::POST, "/_matrix/client/v3/register", Some(&service.as_token), reg).await;
    let (bridged, bridged_tok, dev) = (
        r["user_id"].as_str().unwrap().to_owned(),
        r["access_token"].as_str().unwrap().to_owned(),
        r["device_id"].as_str().unwrap().to_owned(),
    );
    let device = |id: &str, key: &str| json!({"user_id": bridged, "device_id": id, "algorithms": ["m.olm.v1.curve25519-aes-sha2"], "keys": {format!("ed25519:{id}"): key}, "signatures": {}});
    call(&f.url, Method::POST, "/_matrix/client/v3/keys/upload", Some(&bridged_tok), json!({"device_keys": device(&dev, "FROM-SYNAPSE")}))
        .await;
    let (alice, alice_tok) = user(&f.url, "alice").await;
    // MSC4263: alice must share a room with the bridged user.
    room_inviting(&f.url, &alice_tok, &[&bridged]).await;

    let ask = Ask::keys_query("v3", &alice_tok, TokenIn::Header, &json!({"device_keys": {&alice: [], &bridged: []}}));
    bridge.answer(Some(json!({"device_keys": {&bridged: {&dev: device(&dev, "FROM-BRIDGE"), "PUPPET2": device("PUPPET2", "NEW")}}})));
    let theirs = ask.send(&f.url).await;
    assert_eq!(theirs.0, StatusCode::OK, "{}", theirs.1);
    let devices = &theirs.1["device_keys"][&bridged];
    assert_eq!(devices[&dev]["keys"][format!("ed25519:{dev}")], "FROM-BRIDGE", "{}", theirs.1);
    assert!(devices["PUPPET2"].is_object(), "{}", theirs.1);
    assert_eq!(ask.send(&worker.url).await, theirs);
    let expected = (format!("Bearer {}", service.hs_token), json!({&bridged: []}));
    assert_eq!(bridge.asks(), vec![expected.clone(), expected.clone()], "Synapse and we ask the same");

    // The bridge failing: both answer from the database alone.
    bridge.answer(None);
    let theirs = ask.send(&f.url).await;
    assert_eq!(theirs.1["device_keys"][&bridged][&dev]["keys"][format!("ed25519:{dev}")], "FROM-SYNAPSE", "{}", theirs.1);
    assert_eq!(ask.send(&worker.url).await, theirs);
    assert_eq!(bridge.asks().len(), 2);

    // A user nobody asked about: Synapse answers 500 (a KeyError); we leave
    // the user out (listed in docs/compatibility.md).
    bridge.answer(Some(json!({"device_keys": {"@kbridge_other:elsewhere": {"X": device("X", "Y")}, &bridged: {}}})));
    assert_eq!(ask.send(&f.url).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    let ours = ask.send(&worker.url).await;
    assert_eq!(ours.0, StatusCode::OK);
    assert!(ours.1["device_keys"].get("@kbridge_other:elsewhere").is_none(), "{}", ours.1);
}
