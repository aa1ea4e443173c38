//! MSC4263 (`experimental_features.msc4263_limit_key_queries_to_users_who_share_rooms`):
//! only users sharing a joined or invited room with the requester are
//! answered. Compared with a second real Synapse that has the flag on
//! (scripts/test.sh starts it on its own database).

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use synapse_keys_worker::config::Config;

use crate::helpers::{Ask, TokenIn, http, spawn_worker_with, unique};

struct Flagged {
    url: String,
    yaml: std::path::PathBuf,
}

fn flagged() -> Flagged {
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set: run through `bash scripts/test.sh`"));
    Flagged { url: var("SKW_TEST_MSC4263_SYNAPSE_URL"), yaml: var("SKW_TEST_MSC4263_HOMESERVER_YAML").into() }
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

#[tokio::test]
async fn only_users_sharing_a_room_are_answered_like_synapse() {
    let f = flagged();
    let config = Config::load(std::slice::from_ref(&f.yaml), Vec::new()).unwrap();
    assert!(config.synapse.msc4263_limit_key_queries_to_users_who_share_rooms);
    let worker = spawn_worker_with(config).await;
    let (alice, alice_tok) = user(&f.url, "alice").await;
    let (bob, bob_tok) = user(&f.url, "bob").await;
    let (carol, carol_tok) = user(&f.url, "carol").await;
    let (dave, _) = user(&f.url, "dave").await;
    // Alice's room: Bob is invited (not joined), Dave joins; Carol is nowhere.
    let room = call(&f.url, Method::POST, "/_matrix/client/v3/createRoom", Some(&alice_tok), json!({"preset": "private_chat"})).await;
    let room_id = room["room_id"].as_str().unwrap().to_owned();
    call(&f.url, Method::POST, &format!("/_matrix/client/v3/rooms/{room_id}/invite"), Some(&alice_tok), json!({"user_id": bob})).await;
    call(&f.url, Method::POST, &format!("/_matrix/client/v3/rooms/{room_id}/invite"), Some(&alice_tok), json!({"user_id": dave})).await;
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
