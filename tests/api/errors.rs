//! Every error case, asked of Synapse and of us: same status, same body.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use synapse_keys_worker::config::Config;

use crate::helpers::{Ask, Synapse, TestUser, TokenIn, assert_same, env, spawn_worker, spawn_worker_with};

fn raw(method: Method, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Ask {
    Ask {
        method,
        path: path.to_owned(),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        body: body.map(|b| b.as_bytes().to_vec()),
    }
}

const PATH: &str = "/_matrix/client/v3/keys/query";

async fn expect(worker: &crate::helpers::Worker, ask: Ask, status: u16, errcode: &str) -> Value {
    let (s, body) = assert_same(worker, &ask).await;
    assert_eq!((s.as_u16(), body["errcode"].as_str().unwrap_or("")), (status, errcode), "{ask:?}: {body}");
    body
}

#[tokio::test]
async fn token_errors_match_synapse() {
    let hs = Synapse::new();
    let user = hs.register("tok").await;
    let worker = spawn_worker().await;
    let t = user.session.token.as_str();
    let bearer = format!("Bearer {t}");
    let body = Some(r#"{"device_keys": {}}"#);
    let with_query = format!("{PATH}?access_token={t}");

    expect(&worker, raw(Method::POST, PATH, &[], body), 401, "M_MISSING_TOKEN").await;
    expect(&worker, raw(Method::POST, &with_query, &[("Authorization", &bearer)], body), 401, "M_MISSING_TOKEN").await;
    for header in ["Basic abc", "Bearer", "bearer abc", &format!("Bearer  {t}"), &format!("Bearer {t} x")] {
        expect(&worker, raw(Method::POST, PATH, &[("Authorization", header)], body), 401, "M_MISSING_TOKEN").await;
    }
    let two = raw(Method::POST, PATH, &[("Authorization", &bearer), ("Authorization", &bearer)], body);
    expect(&worker, two, 401, "M_MISSING_TOKEN").await;
    let unknown = expect(&worker, raw(Method::POST, PATH, &[("Authorization", "Bearer syt_nope")], body), 401, "M_UNKNOWN_TOKEN").await;
    assert_eq!(unknown["soft_logout"], false);
    expect(&worker, raw(Method::POST, &format!("{PATH}?access_token="), &[], body), 401, "M_UNKNOWN_TOKEN").await;
    // The token is checked before anything else about the request.
    expect(&worker, raw(Method::POST, &format!("{PATH}?timeout=x"), &[], Some("nope")), 401, "M_MISSING_TOKEN").await;
}

#[tokio::test]
async fn expired_locked_and_deactivated_match_synapse() {
    let hs = Synapse::new();
    let admin = hs.register_admin("admin").await;
    let worker = spawn_worker().await;
    let body = json!({"device_keys": {}});

    // Expired: a token Synapse has never seen (so never cached) is given a
    // past expiry, as a refresh-token login's would have.
    let user = hs.register("expiring").await;
    let fresh = hs.login(&user, None).await;
    // Fixture write to Synapse's database: the expiry itself (Synapse's
    // shortest refresh-token lifetime is minutes, its API sets none).
    let pool = sqlx::PgPool::connect(&env().pg_url).await.unwrap();
    sqlx::query("UPDATE access_tokens SET valid_until_ms = 1000 WHERE token = $1").bind(&fresh.token).execute(&pool).await.unwrap();
    let expired = expect(&worker, Ask::keys_query("v3", &fresh.token, TokenIn::Header, &body), 401, "M_UNKNOWN_TOKEN").await;
    assert_eq!(expired["soft_logout"], true);
    // A token with a future expiry still works.
    let later = hs.login(&user, None).await;
    sqlx::query("UPDATE access_tokens SET valid_until_ms = 99999999999999 WHERE token = $1")
        .bind(&later.token)
        .execute(&pool)
        .await
        .unwrap();
    let (status, _) = assert_same(&worker, &Ask::keys_query("v3", &later.token, TokenIn::Header, &body)).await;
    assert_eq!(status, StatusCode::OK);

    // Locked through the admin API.
    let locked = hs.register("locked").await;
    hs.admin(Method::PUT, &format!("/_synapse/admin/v2/users/{}", locked.user_id), &admin.session, json!({"locked": true})).await;
    let l = expect(&worker, Ask::keys_query("v3", &locked.session.token, TokenIn::Header, &body), 401, "M_USER_LOCKED").await;
    assert_eq!(l["soft_logout"], true);

    // Deactivated through the admin API: the user's own tokens are gone...
    let gone = hs.register("gone").await;
    // An admin's token acting as `user` (the admin API's "login as user").
    let puppet_token = async |admin: &TestUser, user: &TestUser| {
        let login = format!("/_synapse/admin/v1/users/{}/login", user.user_id);
        hs.admin(Method::POST, &login, &admin.session, json!({})).await["access_token"].as_str().unwrap().to_owned()
    };
    let puppet = puppet_token(&admin, &gone).await;
    // (asked once before, so a cached answer would have to be dropped)
    let (status, _) = assert_same(&worker, &Ask::keys_query("v3", &puppet, TokenIn::Header, &body)).await;
    assert_eq!(status, StatusCode::OK);
    hs.admin(Method::POST, &format!("/_synapse/admin/v1/deactivate/{}", gone.user_id), &admin.session, json!({})).await;
    expect(&worker, Ask::keys_query("v3", &gone.session.token, TokenIn::Query, &body), 401, "M_UNKNOWN_TOKEN").await;
    // ...but an admin's puppet token for them is the admin's, and Synapse
    // keeps answering it.
    let (status, _) = assert_same(&worker, &Ask::keys_query("v3", &puppet, TokenIn::Header, &body)).await;
    assert_eq!(status, StatusCode::OK, "Synapse answers a deactivated user's puppet token");

    // A deactivated admin's puppet tokens go with the admin's own.
    let admin2 = hs.register_admin("admin2").await;
    let target = hs.register("puppeted").await;
    let puppet2 = puppet_token(&admin2, &target).await;
    let (status, _) = assert_same(&worker, &Ask::keys_query("v3", &puppet2, TokenIn::Header, &body)).await;
    assert_eq!(status, StatusCode::OK);
    hs.admin(Method::POST, &format!("/_synapse/admin/v1/deactivate/{}", admin2.user_id), &admin.session, json!({})).await;
    let (status, _) = assert_same(&worker, &Ask::keys_query("v3", &puppet2, TokenIn::Header, &body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn body_and_timeout_errors_match_synapse() {
    let hs = Synapse::new();
    let user = hs.register("body").await;
    let worker = spawn_worker().await;
    let bearer = format!("Bearer {}", user.session.token);
    let auth = [("Authorization", bearer.as_str())];
    let ok_body = Some(r#"{"device_keys": {}}"#);

    for (body, errcode) in [
        ("", "M_NOT_JSON"),
        ("not json", "M_NOT_JSON"),
        ("{\"device_keys\": ", "M_NOT_JSON"),
        ("{\"device_keys\": {\"@a:hs\": [NaN]}}", "M_NOT_JSON"),
        ("[]", "M_BAD_JSON"),
        ("\"text\"", "M_BAD_JSON"),
        ("{}", "M_BAD_JSON"),
        ("{\"device_keys\": null}", "M_BAD_JSON"),
        ("{\"device_keys\": [\"@a:hs\"]}", "M_BAD_JSON"),
        ("{\"device_keys\": {\"@a:hs\": {\"DEV\": true}}}", "M_BAD_JSON"),
        ("{\"device_keys\": {\"@a:hs\": \"DEV\"}}", "M_BAD_JSON"),
        ("{\"device_keys\": {\"@a:hs\": [1, 2]}}", "M_BAD_JSON"),
        ("{\"device_keys\": {\"invalid\": [null]}}", "M_BAD_JSON"),
    ] {
        expect(&worker, raw(Method::POST, PATH, &auth, Some(body)), 400, errcode).await;
    }
    // Not UTF-8.
    let mut bad = raw(Method::POST, PATH, &auth, None);
    bad.body = Some(vec![0xff, 0xfe, b'{', b'}']);
    expect(&worker, bad, 400, "M_NOT_JSON").await;

    for q in ["timeout=abc", "timeout=-1", "timeout=1.5"] {
        expect(&worker, raw(Method::POST, &format!("{PATH}?{q}"), &auth, ok_body), 400, "M_INVALID_PARAM").await;
    }
    // `timeout` is checked before the body.
    expect(&worker, raw(Method::POST, &format!("{PATH}?timeout=x"), &auth, Some("[]")), 400, "M_INVALID_PARAM").await;
    for q in ["timeout=0", "timeout=5000", "timeout=%2B7"] {
        let (s, _) = assert_same(&worker, &raw(Method::POST, &format!("{PATH}?{q}"), &auth, ok_body)).await;
        assert_eq!(s, StatusCode::OK, "{q}");
    }
    // No Content-Type at all is fine (Matrix does not require one).
    let (s, _) = assert_same(&worker, &raw(Method::POST, PATH, &auth, ok_body)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = assert_same(&worker, &raw(Method::POST, PATH, &[auth[0], ("Content-Type", "text/plain")], ok_body)).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn routing_errors_match_synapse() {
    let worker = spawn_worker().await;
    expect(&worker, raw(Method::GET, PATH, &[], None), 405, "M_UNRECOGNIZED").await;
    expect(&worker, raw(Method::PUT, "/_matrix/client/r0/keys/query", &[], Some("{}")), 405, "M_UNRECOGNIZED").await;
    expect(&worker, raw(Method::POST, "/_matrix/client/v3/keys/nonsense", &[], Some("{}")), 404, "M_UNRECOGNIZED").await;
    expect(&worker, raw(Method::POST, "/_matrix/client/v4/keys/query", &[], Some("{}")), 404, "M_UNRECOGNIZED").await;
    let (s, _) = assert_same(&worker, &raw(Method::OPTIONS, PATH, &[], None)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, body) = assert_same(&worker, &raw(Method::GET, "/health", &[], None)).await;
    assert_eq!((s, body), (StatusCode::OK, Value::String("OK".into())));
}

/// Synapse's own limit is far above any sane `/keys/query`, so this one is
/// checked on our side only: a body over `max_body_bytes` is 413 M_TOO_LARGE.
#[tokio::test]
async fn oversized_body_is_413() {
    let hs = Synapse::new();
    let user = hs.register("big").await;
    let mut config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    config.worker.max_body_bytes = 1024;
    let worker = spawn_worker_with(config).await;
    let users: serde_json::Map<String, Value> = (0..200).map(|i| (format!("@user{i}:{}", env().server_name), json!([]))).collect();
    let body = json!({"device_keys": users});
    let (status, answer) = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &body).send(&worker.url).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["errcode"], "M_TOO_LARGE");
    // Under the limit it is answered.
    let small = json!({"device_keys": {}});
    let (status, _) = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &small).send(&worker.url).await;
    assert_eq!(status, StatusCode::OK);
}

/// Guests hold macaroons Synapse never stores; they may query keys.
#[tokio::test]
async fn guest_tokens_match_synapse() {
    let resp = crate::helpers::http()
        .post(format!("{}/_matrix/client/v3/register?kind=guest", env().synapse_url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let guest: Value = resp.json().await.unwrap();
    let token = guest["access_token"].as_str().unwrap().to_owned();
    let worker = spawn_worker().await;
    let hs = Synapse::new();
    let user = hs.register("seen-by-guest").await;
    hs.upload_device_keys(&user.session).await;
    let body = json!({"device_keys": {&user.user_id: [], guest["user_id"].as_str().unwrap(): []}});
    for how in [TokenIn::Header, TokenIn::Query] {
        let (status, answer) = assert_same(&worker, &Ask::keys_query("v3", &token, how, &body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    // Tampered: one character of the signature changed.
    let mut bad: Vec<char> = token.chars().collect();
    let i = bad.len() - 12;
    bad[i] = if bad[i] == 'A' { 'B' } else { 'A' };
    let bad: String = bad.into_iter().collect();
    expect(&worker, Ask::keys_query("v3", &bad, TokenIn::Header, &body), 401, "M_UNKNOWN_TOKEN").await;
}

/// A NUL byte cannot be in anything Synapse stored (PostgreSQL text cannot
/// hold one), and Synapse answers 500 when one reaches its database. We
/// never send one: a token with one is unknown, a user or device ID with
/// one is one that does not exist (docs/compatibility.md).
#[tokio::test]
async fn nul_bytes_are_answered_like_what_does_not_exist() {
    let hs = Synapse::new();
    let user = hs.register("nul").await;
    let worker = spawn_worker().await;
    let body = Some(r#"{"device_keys": {}}"#);
    let nul_token = raw(Method::POST, &format!("{PATH}?access_token=syt_a%00b"), &[], body);
    assert_eq!(nul_token.send(&env().synapse_url).await.0, StatusCode::INTERNAL_SERVER_ERROR, "Synapse's own answer");
    let unknown = raw(Method::POST, &format!("{PATH}?access_token=syt_ab"), &[], body).send(&env().synapse_url).await;
    assert_eq!(nul_token.send(&worker.url).await, unknown);

    let server = &env().server_name;
    let with_nul = json!({"device_keys": {format!("@no\u{0}body:{server}"): [], &user.user_id: ["DEV\u{0}ICE"]}});
    let ask = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &with_nul);
    assert_eq!(ask.send(&env().synapse_url).await.0, StatusCode::INTERNAL_SERVER_ERROR, "Synapse's own answer");
    let (status, mut ours) = ask.send(&worker.url).await;
    assert_eq!(status, StatusCode::OK, "{ours}");
    // The same as Synapse's answer for a user and a device that do not exist.
    let without = json!({"device_keys": {format!("@nobody:{server}"): [], &user.user_id: ["NODEVICE"]}});
    let (_, theirs) = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &without).send(&env().synapse_url).await;
    let nobody = ours["device_keys"].as_object_mut().unwrap().remove(&format!("@no\u{0}body:{server}"));
    assert_eq!(nobody.as_ref(), theirs["device_keys"].get(format!("@nobody:{server}")), "{theirs}");
    assert_eq!(ours["device_keys"][&user.user_id], theirs["device_keys"][&user.user_id]);
}
