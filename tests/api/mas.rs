//! Delegated auth against the real Synapse configured with
//! `matrix_authentication_service` (scripts/test.sh starts it on its own
//! database), both pointing at the MAS stand-in (`fake_mas.rs`). Users and
//! devices are made the way MAS makes them, through Synapse's `/_synapse/mas/`
//! API with the shared secret; Synapse and we are asked the same
//! `/keys/query` with the same tokens, and the stand-in counts the
//! introspections each of us makes.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use synapse_keys_worker::config::Config;
use tokio::sync::{RwLock, watch};

use crate::fake_mas::{FakeMas, Reply, fake_mas};
use crate::helpers::{Ask, Session, Synapse, TokenIn, Worker, eventually, http, spawn_worker_with, synapse_before, unique};

const STABLE_API: &str = "urn:matrix:client:api:*";
const STABLE_DEVICE: &str = "urn:matrix:client:device:";
const UNSTABLE_API: &str = "urn:matrix:org.matrix.msc2967.client:api:*";
const UNSTABLE_DEVICE: &str = "urn:matrix:org.matrix.msc2967.client:device:";
/// The scope names the world's Synapse knows: the stable ones from 1.138,
/// only the unstable ones before.
const API: Scope = Scope(|| if synapse_before("1.138") { UNSTABLE_API } else { STABLE_API });
const DEVICE: Scope = Scope(|| if synapse_before("1.138") { UNSTABLE_DEVICE } else { STABLE_DEVICE });

struct Scope(fn() -> &'static str);

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str((self.0)())
    }
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str((self.0)())
    }
}

/// MAS tests share the stand-in; the outage test stops it, so it runs alone.
static STAND_IN: RwLock<()> = RwLock::const_new(());

fn synapse_url() -> String {
    std::env::var("SKW_TEST_MAS_SYNAPSE_URL").expect("SKW_TEST_MAS_SYNAPSE_URL: run through scripts/test.sh")
}

fn config() -> Config {
    let yaml = std::env::var("SKW_TEST_MAS_HOMESERVER_YAML").expect("SKW_TEST_MAS_HOMESERVER_YAML");
    Config::load(&[yaml.into()], Vec::new()).unwrap()
}

fn server_name() -> String {
    config().synapse.server_name
}

async fn worker() -> Worker {
    spawn_worker_with(config()).await
}

/// Calls MAS makes to Synapse: `/_synapse/mas/<what>` with the secret.
async fn mas_api(mas: &FakeMas, what: &str, body: Value) {
    let resp = http().post(format!("{}/_synapse/mas/{what}", synapse_url())).bearer_auth(&mas.secret).json(&body).send().await.unwrap();
    let status = resp.status();
    assert!(status.is_success(), "/_synapse/mas/{what}: {status} {}", resp.text().await.unwrap_or_default());
}

/// A user provisioned by "MAS", with devices (the first has device keys,
/// uploaded through Synapse with a token of its own).
struct MasUser {
    localpart: String,
    user_id: String,
    devices: Vec<String>,
}

async fn provision(mas: &FakeMas, devices: &[&str]) -> MasUser {
    let localpart = unique("mas");
    mas_api(mas, "provision_user", json!({"localpart": localpart})).await;
    for d in devices {
        mas_api(mas, "upsert_device", json!({"localpart": localpart, "device_id": d, "display_name": format!("{d} phone")})).await;
    }
    let user_id = format!("@{localpart}:{}", server_name());
    let user = MasUser { localpart, user_id, devices: devices.iter().map(|d| (*d).to_owned()).collect() };
    if let Some(first) = devices.first() {
        let token = unique("upload");
        mas.script(&token, Reply::Json(active(&user.localpart, &format!("{API} {DEVICE}{first}"))));
        let session = Session { user_id: user.user_id.clone(), device_id: (*first).to_owned(), token };
        Synapse::at(&synapse_url()).upload_device_keys(&session).await;
    }
    user
}

/// An active answer for `username` with `scope`, as MAS words it.
fn active(username: &str, scope: &str) -> Value {
    json!({"active": true, "scope": scope, "username": username, "sub": "01J0000000000000000000000", "client_id": "01J0CLIENT", "token_type": "access_token", "expires_in": 300})
}

/// A fresh token with `reply`.
fn token(mas: &FakeMas, reply: Reply) -> String {
    let t = unique("mat");
    mas.script(&t, reply);
    t
}

/// Asks Synapse, then us, the same `/keys/query`; asserts identical status
/// and JSON, error text included. Returns the status.
async fn same(ours: &Worker, token: &str, body: &Value) -> StatusCode {
    let ask = Ask::keys_query("v3", token, TokenIn::Header, body);
    let theirs = ask.send(&synapse_url()).await;
    let mine = ask.send(&ours.url).await;
    assert_eq!(mine, theirs, "token answers differ (left: ours, right: Synapse's)");
    theirs.0
}

#[tokio::test]
async fn token_cases_match_synapse() {
    let _shared = STAND_IN.read().await;
    let mas = fake_mas();
    // Without the breaker, which would spare MAS the second call after a
    // closed connection (`hanging_mas_costs_one_timeout_then_nothing`).
    let ours = worker_with(&mas.url(), 3000, 0).await;
    let alice = provision(mas, &["ALICE1", "ALICE2"]).await;
    let lp = alice.localpart.as_str();
    let body = json!({"device_keys": {alice.user_id.clone(): []}});
    let d1 = &alice.devices[0];
    let unknown_user = unique("nobody");

    // (case, answer, expected status): each token asked twice by each of us.
    let valid: Vec<(&str, Value, StatusCode)> = vec![
        ("device in the scope", active(lp, &format!("{API} {DEVICE}{d1}")), StatusCode::OK),
        ("unstable names", active(lp, &format!("{UNSTABLE_API} {UNSTABLE_DEVICE}ALICE2")), StatusCode::OK),
        ("device_id field", json!({"active": true, "scope": API, "username": lp, "device_id": d1}), StatusCode::OK),
        ("no device", active(lp, &API.to_string()), StatusCode::OK),
        ("admin scope", active(lp, &format!("{API} urn:synapse:admin:* {DEVICE}{d1}")), StatusCode::OK),
        ("inactive", json!({"active": false}), StatusCode::UNAUTHORIZED),
        ("expired", json!({"active": true, "scope": API, "username": lp, "expires_in": 0}), StatusCode::UNAUTHORIZED),
        ("wrong scope", active(lp, &format!("openid {DEVICE}{d1}")), StatusCode::UNAUTHORIZED),
        ("unknown device", active(lp, &format!("{API} {DEVICE}NOSUCHDEV")), StatusCode::UNAUTHORIZED),
        ("two device scopes", active(lp, &format!("{API} {DEVICE}{d1} {DEVICE}ALICE2")), StatusCode::INTERNAL_SERVER_ERROR),
        ("unknown user", active(&unknown_user, &format!("{API} {DEVICE}{d1}")), StatusCode::INTERNAL_SERVER_ERROR),
        ("no username", json!({"active": true, "scope": format!("{API} {DEVICE}{d1}")}), StatusCode::INTERNAL_SERVER_ERROR),
        ("empty device_id", json!({"active": true, "scope": API, "username": lp, "device_id": ""}), StatusCode::INTERNAL_SERVER_ERROR),
    ];
    for (case, answer, want) in valid {
        let t = token(mas, Reply::Json(answer));
        for _ in 0..2 {
            assert_eq!(same(&ours, &t, &body).await, want, "{case}");
        }
        // A valid answer is kept: one call each, whatever it said, except
        // that a missing device drops it (the next request asks again).
        let calls = if case == "unknown device" { 4 } else { 2 };
        assert_eq!(mas.calls(&t), calls, "{case}: introspections");
    }
    // Before 1.138 Synapse knows only the unstable names and refuses a
    // token with the stable ones; we accept it, as later releases do
    // (docs/compatibility.md).
    if synapse_before("1.138") {
        let t = token(mas, Reply::Json(active(lp, &format!("{STABLE_API} {STABLE_DEVICE}{d1}"))));
        let ask = Ask::keys_query("v3", &t, TokenIn::Header, &body);
        assert_eq!(ask.send(&synapse_url()).await.0, StatusCode::UNAUTHORIZED, "Synapse before 1.138");
        assert_eq!(ask.send(&ours.url).await.0, StatusCode::OK, "ours");
    }

    let failures: Vec<(&str, Reply)> = vec![
        ("HTTP 500", Reply::Status(500)),
        ("not JSON", Reply::Body("<html>oops</html>")),
        ("active as a string", Reply::Json(json!({"active": "true", "scope": API, "username": lp}))),
        ("expires_in not an integer", Reply::Json(json!({"active": true, "scope": API, "username": lp, "expires_in": 1.5}))),
        ("sub not a string", Reply::Json(json!({"active": true, "scope": API, "username": lp, "sub": 5}))),
        ("retrieved_at_ms sent", Reply::Json(json!({"active": true, "scope": API, "username": lp, "retrieved_at_ms": 1}))),
        ("a JSON list", Reply::Body("[]")),
        ("connection closed", Reply::Close),
    ];
    for (case, reply) in failures {
        let t = token(mas, reply);
        for _ in 0..2 {
            assert_eq!(same(&ours, &t, &body).await, StatusCode::SERVICE_UNAVAILABLE, "{case}");
        }
        assert_eq!(mas.calls(&t), 4, "{case}: failures are never kept");
    }

    // Not known to MAS at all, and no token.
    assert_eq!(same(&ours, &unique("unscripted"), &body).await, StatusCode::UNAUTHORIZED);
    let no_token = Ask { headers: vec![], ..Ask::keys_query("v3", "", TokenIn::Header, &body) };
    assert_eq!(no_token.send(&ours.url).await, no_token.send(&synapse_url()).await);
    assert!(mas.violations().is_empty(), "requests MAS would refuse: {:?}", mas.violations());
}

#[tokio::test]
async fn revoked_token_works_until_the_kept_answer_expires() {
    let _shared = STAND_IN.read().await;
    let mas = fake_mas();
    let ours = worker().await;
    let bob = provision(mas, &["BOB1"]).await;
    let body = json!({"device_keys": {bob.user_id.clone(): []}});
    let mut answer = active(&bob.localpart, &format!("{API} {DEVICE}BOB1"));
    answer["expires_in"] = 5.into();
    let t = token(mas, Reply::Json(answer));
    assert_eq!(same(&ours, &t, &body).await, StatusCode::OK);
    // Revoked at MAS: both of us keep the answer for two minutes...
    mas.script(&t, Reply::Json(json!({"active": false})));
    assert_eq!(same(&ours, &t, &body).await, StatusCode::OK);
    // ...but still check its expiry, without asking MAS again. (Each of
    // us counts from its own answer's arrival: poll each alone.)
    let ask = Ask::keys_query("v3", &t, TokenIn::Header, &body);
    for base in [synapse_url(), ours.url.clone()] {
        eventually(Duration::from_secs(20), || async { ask.send(&base).await.0 == StatusCode::UNAUTHORIZED }).await;
    }
    assert_eq!(same(&ours, &t, &body).await, StatusCode::UNAUTHORIZED);
    assert_eq!(mas.calls(&t), 2, "one introspection each");
}

#[tokio::test]
async fn deleted_device_is_refused_at_once() {
    let _shared = STAND_IN.read().await;
    let mas = fake_mas();
    let ours = worker().await;
    // A second worker that polls the stream tables once an hour: only the
    // read barrier can tell it about the deletion in time.
    let mut slow = config();
    slow.synapse.redis.enabled = false;
    slow.worker.poll_interval_ms = 3_600_000;
    let slow = spawn_worker_with(slow).await;
    let carol = provision(mas, &["CAROL1"]).await;
    let body = json!({"device_keys": {carol.user_id.clone(): []}});
    let t = token(mas, Reply::Json(active(&carol.localpart, &format!("{API} {DEVICE}CAROL1"))));
    assert_eq!(same(&ours, &t, &body).await, StatusCode::OK);
    let ask = Ask::keys_query("v3", &t, TokenIn::Header, &body);
    eventually(Duration::from_secs(10), || async { slow.app.caches.trusted() }).await;
    assert_eq!(ask.send(&slow.url).await.0, StatusCode::OK);
    // The warm path checks the device in memory.
    for w in [&ours, &slow] {
        let hits = w.app.caches.device_ids.stats().hits;
        assert_eq!(ask.send(&w.url).await.0, StatusCode::OK);
        assert!(w.app.caches.device_ids.stats().hits > hits, "the device check used the cache");
    }

    // MAS ends the session: the device goes; the very next request fails.
    mas_api(mas, "delete_device", json!({"localpart": carol.localpart, "device_id": "CAROL1"})).await;
    let slow_answer = ask.send(&slow.url).await;
    let mine = ask.send(&ours.url).await;
    let theirs = ask.send(&synapse_url()).await;
    assert_eq!(mine, theirs);
    assert_eq!(slow_answer, theirs, "the polling worker");
    assert_eq!(mine.0, StatusCode::UNAUTHORIZED, "{mine:?}");
    assert_eq!(mine.1["error"], "Token is not active");
    // The kept answer was dropped: the device back, each of us asks again.
    mas_api(mas, "upsert_device", json!({"localpart": carol.localpart, "device_id": "CAROL1"})).await;
    assert_eq!(same(&ours, &t, &body).await, StatusCode::OK);
    assert_eq!(ask.send(&slow.url).await.0, StatusCode::OK);
    assert_eq!(mas.calls(&t), 6, "ours, the polling worker's and Synapse's, twice");
}

/// A request with a device waits for the read barrier once: the probe
/// authentication waits for (to check the device) also serves the query.
#[tokio::test]
async fn a_device_request_waits_for_one_barrier_probe() {
    let _shared = STAND_IN.read().await;
    let mas = fake_mas();
    let ours = worker().await;
    let dora = provision(mas, &["DORA1"]).await;
    let body = json!({"device_keys": {dora.user_id.clone(): []}});
    let t = token(mas, Reply::Json(active(&dora.localpart, &format!("{API} {DEVICE}DORA1"))));
    assert_eq!(same(&ours, &t, &body).await, StatusCode::OK);
    let probes = || ours.app.barrier.counters().probes.load(std::sync::atomic::Ordering::Relaxed);
    let before = probes();
    let ask = Ask::keys_query("v3", &t, TokenIn::Header, &body);
    for _ in 0..5 {
        let (status, answer) = ask.send(&ours.url).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(answer["device_keys"][&dora.user_id]["DORA1"].is_object(), "{answer}");
    }
    assert_eq!(probes() - before, 5, "read-barrier probes for 5 requests one after another");
}

#[tokio::test]
async fn concurrent_requests_share_one_introspection() {
    let _shared = STAND_IN.read().await;
    let mas = fake_mas();
    let ours = worker().await;
    let dave = provision(mas, &["DAVE1"]).await;
    let body = json!({"device_keys": {dave.user_id.clone(): []}});

    // 50 at once with one fresh token, MAS held until all are waiting.
    let fire = |t: &str, base: &str| {
        let ask = Ask::keys_query("v3", t, TokenIn::Header, &body);
        let base = base.to_owned();
        (0..50).map(move |_| {
            let (ask, base) = (ask.clone(), base.clone());
            tokio::spawn(async move { ask.send(&base).await })
        })
    };
    for (reply, want) in
        [(active(&dave.localpart, &format!("{API} {DEVICE}DAVE1")), StatusCode::OK), (Value::Null, StatusCode::SERVICE_UNAVAILABLE)]
    {
        let (open, gate) = watch::channel(false);
        let inner = if reply.is_null() { Reply::Status(500) } else { Reply::Json(reply) };
        let t = token(mas, Reply::Gated(gate, Box::new(inner)));
        let requests: Vec<_> = fire(&t, &ours.url).collect();
        let metrics = format!("{}/metrics", ours.url);
        eventually(Duration::from_secs(20), || async {
            let text = http().get(&metrics).send().await.unwrap().text().await.unwrap();
            // The 50, and this scrape.
            text.contains("synapse_keys_worker_http_requests_in_flight 51")
        })
        .await;
        open.send_replace(true);
        for r in requests {
            assert_eq!(r.await.unwrap().0, want);
        }
        assert_eq!(mas.calls(&t), 1, "50 concurrent requests, one introspection ({want})");
        // A kept answer serves the next one; a failure is asked again.
        assert_eq!(Ask::keys_query("v3", &t, TokenIn::Header, &body).send(&ours.url).await.0, want);
        assert_eq!(mas.calls(&t), if want == StatusCode::OK { 1 } else { 2 });
    }

    // Synapse shares one too (observed: 50 → 1).
    let (open, gate) = watch::channel(false);
    let t = token(mas, Reply::Gated(gate, Box::new(Reply::Json(active(&dave.localpart, &format!("{API} {DEVICE}DAVE1"))))));
    let requests: Vec<_> = fire(&t, &synapse_url()).collect();
    eventually(Duration::from_secs(20), || async { mas.calls(&t) == 1 }).await;
    open.send_replace(true);
    for r in requests {
        assert_eq!(r.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(mas.calls(&t), 1);
}

#[tokio::test]
async fn appservice_tokens_are_not_introspected() {
    let _shared = STAND_IN.read().await;
    let mas = fake_mas();
    let ours = worker().await;
    let erin = provision(mas, &["ERIN1"]).await;
    let as_token = config().synapse.app_services[0].as_token.clone();
    let body = json!({"device_keys": {erin.user_id.clone(): []}});
    assert_eq!(same(&ours, &as_token, &body).await, StatusCode::OK);
    assert_eq!(mas.calls(&as_token), 0);
}

/// A worker asking MAS at `mas_url` with these timeout and breaker periods.
async fn worker_with(mas_url: &str, timeout_ms: u64, breaker_ms: u64) -> Worker {
    let mut config = config();
    // The shortest database budget (1 s): waiting for MAS must not count
    // against it.
    config.worker.db_statement_timeout_ms = 1_000;
    config.worker.mas_timeout_ms = timeout_ms;
    config.worker.mas_breaker_ms = breaker_ms;
    if let Some(m) = config.synapse.mas.as_mut() {
        m.endpoint = mas_url.to_owned();
    }
    spawn_worker_with(config).await
}

#[tokio::test]
async fn hanging_mas_costs_one_timeout_then_nothing() {
    let _shared = STAND_IN.read().await;
    let mas = fake_mas();
    let ours = worker_with(&mas.url(), 1500, 60_000).await;
    let frank = provision(mas, &["FRANK1"]).await;
    let body = json!({"device_keys": {frank.user_id.clone(): []}});
    let good = token(mas, Reply::Json(active(&frank.localpart, &format!("{API} {DEVICE}FRANK1"))));
    let ask = |t: &str| Ask::keys_query("v3", t, TokenIn::Header, &body);
    assert_eq!(ask(&good).send(&ours.url).await.0, StatusCode::OK, "kept before MAS hangs");

    // Synapse waits for a hanging MAS without end; we answer as Synapse
    // answers any other MAS failure.
    let hanging = token(mas, Reply::Hang);
    let theirs = tokio::spawn({
        let ask = ask(&hanging);
        async move { ask.send(&synapse_url()).await }
    });
    let (status, answer) = ask(&hanging).send(&ours.url).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer, json!({"errcode": "M_UNKNOWN", "error": "Unable to introspect the access token"}));
    assert!(!theirs.is_finished(), "Synapse still waiting when we have answered");
    theirs.abort();

    // The breaker is open: a fresh token is refused without calling MAS,
    // and answers kept before still serve.
    let fresh = token(mas, Reply::Json(active(&frank.localpart, &format!("{API} {DEVICE}FRANK1"))));
    assert_eq!(ask(&fresh).send(&ours.url).await, (status, answer));
    assert_eq!(mas.calls(&fresh), 0, "not sent while the breaker is open");
    assert_eq!(ask(&good).send(&ours.url).await.0, StatusCode::OK);
    let metrics = http().get(format!("{}/metrics", ours.url)).send().await.unwrap().text().await.unwrap();
    for line in [
        "synapse_keys_worker_mas_breaker_open 1",
        "synapse_keys_worker_mas_introspections_total{outcome=\"timeout\"} 1",
        "synapse_keys_worker_mas_introspections_total{outcome=\"breaker_open\"} 1",
        "synapse_keys_worker_mas_introspections_total{outcome=\"valid\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    assert!(!metrics.contains(&good) && !metrics.contains(&fresh), "no token in the metrics");
}

/// MAS closes a connection, answers 502, or is not listening: each
/// request is answered as Synapse answers it, and the next fresh token is
/// asked anew at once, as Synapse asks it: a failure that came back fast
/// never refuses the next (with the default settings).
#[tokio::test]
async fn fast_mas_failures_never_refuse_the_next_token() {
    let _shared = STAND_IN.read().await;
    let mas = fake_mas();
    let ours = worker().await;
    let hana = provision(mas, &["HANA1"]).await;
    let body = json!({"device_keys": {hana.user_id.clone(): []}});
    for failure in [Reply::Close, Reply::Status(502), Reply::Status(500)] {
        let what = format!("{failure:?}");
        assert_eq!(same(&ours, &token(mas, failure), &body).await, StatusCode::SERVICE_UNAVAILABLE, "{what}");
        let fresh = token(mas, Reply::Json(active(&hana.localpart, &format!("{API} {DEVICE}HANA1"))));
        assert_eq!(same(&ours, &fresh, &body).await, StatusCode::OK, "a fresh token right after {what}");
        assert_eq!(mas.calls(&fresh), 2, "asked by Synapse and by us");
        assert!(!ours.app.mas.as_ref().unwrap().breaker_open(), "after {what}");
    }
}

#[tokio::test]
async fn mas_down_answers_like_synapse_and_recovers() {
    let _alone = STAND_IN.write().await;
    let mas = fake_mas();
    let gina = provision(mas, &["GINA1"]).await;
    let body = json!({"device_keys": {gina.user_id.clone(): []}});
    let t = token(mas, Reply::Json(active(&gina.localpart, &format!("{API} {DEVICE}GINA1"))));
    mas.stop();
    // Starts while MAS is down, and answers as Synapse does.
    let ours = worker_with(&mas.url(), 1000, 100).await;
    let health = http().get(format!("{}/health", ours.url)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let status = same(&ours, &t, &body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    mas.start();
    // Refused connections came back at once: nothing was held against
    // MAS, so both of us answer as soon as it is back.
    assert_eq!(same(&ours, &t, &body).await, StatusCode::OK);
}

/// Under MAS a server admin is a token with `urn:synapse:admin:*` in its
/// scope, whatever `users.admin` says: the device-list health API answers
/// each token as Synapse's own admin API does (403 without the scope,
/// 200 with it).
#[tokio::test]
async fn the_admin_api_takes_the_admin_scope_as_synapse_does() {
    let _shared = STAND_IN.read().await;
    let mas = fake_mas();
    let ours = worker().await;
    let alice = provision(mas, &["ALICE1"]).await;
    let lp = alice.localpart.as_str();
    let synapse_admin =
        format!("{}/_synapse/admin/v2/users/{}", synapse_url(), synapse_keys_worker::federation::percent_encode(&alice.user_id));
    let ours_admin = format!("{}/_keys_worker/admin/v1/resync_queue", ours.url);
    for (case, scope, want) in [
        ("no admin scope", format!("{API} {DEVICE}ALICE1"), StatusCode::FORBIDDEN),
        ("admin scope", format!("{API} urn:synapse:admin:* {DEVICE}ALICE1"), StatusCode::OK),
    ] {
        let t = token(mas, Reply::Json(active(lp, &scope)));
        let theirs = http().get(&synapse_admin).bearer_auth(&t).send().await.unwrap();
        assert_eq!(theirs.status(), want, "{case}: Synapse's admin API");
        let theirs: Value = theirs.json().await.unwrap();
        let mine = http().get(&ours_admin).bearer_auth(&t).send().await.unwrap();
        assert_eq!(mine.status(), want, "{case}: ours");
        let mine: Value = mine.json().await.unwrap();
        if want == StatusCode::FORBIDDEN {
            assert_eq!(mine, theirs, "{case} (left: ours, right: Synapse's)");
        } else {
            assert!(mine["servers"].is_array(), "{case}: {mine}");
        }
    }
}
