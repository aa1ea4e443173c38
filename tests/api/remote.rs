//! Remote users, with the real Synapse as the device-lists writer (and as
//! the oracle) and a fake remote homeserver that checks X-Matrix signatures.
//! "Writer stopped" and "writer hanging" point our service's `instance_map`
//! at a closed port and at a listener that never answers; the real Synapse
//! stays up for the other tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use synapse_keys_worker::config::Config;
use synapse_keys_worker::config::synapse::InstanceLocation;
use tokio::net::TcpListener;

use crate::fake_remote::{FakeRemote, Mode, Route};
use crate::helpers::{
    Ask, Synapse, TestUser, TokenIn, assert_same, env, poll_until, ready_worker, spawn_worker, spawn_worker_with, unique,
};

const OURS: &str = "synapse-keys-worker";

pub fn base_config() -> Config {
    Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap()
}

pub fn with_writer(mut config: Config, port: u16) -> Config {
    config.synapse.device_lists_writer = Some(InstanceLocation::Tcp { host: "127.0.0.1".into(), port, tls: false });
    config
}

/// A port nothing listens on: the writer is stopped.
pub async fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port()
}

/// A listener that accepts connections and never answers: the writer hangs.
pub async fn hanging_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    (port, accepted)
}

/// The remote user joins a room this server is in. A fixture write to
/// Synapse's database (one `current_state_events` row): the fake remote
/// (which the tests here need for its faults and call counts) cannot join
/// rooms, it serves no make_join/send_join. The same paths with real joins
/// against a real remote homeserver are in `federation.rs`.
pub async fn share_a_room(user_id: &str) {
    share_a_room_on(&env().pg_url, &env().server_name, user_id).await;
}

/// `share_a_room` on the homeserver `server_name` whose database is `pg_url`.
pub async fn share_a_room_on(pg_url: &str, server_name: &str, user_id: &str) {
    let pool = sqlx::PgPool::connect(pg_url).await.unwrap();
    let id = unique("room");
    sqlx::query(
        "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership) VALUES ($1, $2, 'm.room.member', $3, 'join')",
    )
    .bind(format!("$ev-{id}"))
    .bind(format!("!{id}:{server_name}"))
    .bind(user_id)
    .execute(&pool)
    .await
    .unwrap();
}

pub fn our_calls(remote: &FakeRemote, route: Route) -> usize {
    remote.calls(route).iter().filter(|c| c.user_agent.starts_with(OURS)).count()
}

pub fn synapse_calls(remote: &FakeRemote, route: Route) -> usize {
    remote.calls(route).iter().filter(|c| c.user_agent.starts_with("Synapse")).count()
}

pub async fn query(worker_url: &str, who: &TestUser, users: Value, timeout_ms: Option<u64>) -> (StatusCode, Value, Duration) {
    let mut ask = Ask::keys_query("v3", &who.session.token, TokenIn::Header, &json!({ "device_keys": users }));
    if let Some(t) = timeout_ms {
        ask.path.push_str(&format!("?timeout={t}"));
    }
    let started = Instant::now();
    let (status, body) = ask.send(worker_url).await;
    (status, body, started.elapsed())
}

pub struct Setup {
    pub hs: Synapse,
    pub me: TestUser,
    pub remote: FakeRemote,
}

pub async fn setup() -> Setup {
    let hs = Synapse::new();
    let me = hs.register("asker").await;
    let remote = FakeRemote::start_for_homeserver().await;
    Setup { hs, me, remote }
}

impl Setup {
    /// The fake's current self-signing key of `user` (its `keys`).
    pub fn remote_ssk(&self, user: &str) -> Value {
        self.remote.self_signing_key(user)["keys"].clone()
    }

    /// The fake's current keys of one device.
    pub fn remote_device(&self, user: &str, device: &str) -> Value {
        self.remote.device(user, device)
    }

    /// A remote user with two devices (one named) and cross-signing keys.
    pub fn remote_user(&self, name: &str) -> String {
        let user = self.remote.add_user(&unique(name)).user_id;
        self.remote.add_device(&user, "PHONE", Some("Phone"));
        self.remote.add_device(&user, "LAPTOP", None);
        user
    }
}

#[tokio::test]
async fn cached_remote_user_is_served_from_synapse_cache() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    // Synapse resyncs bob on first sight and caches him.
    let body = json!({"device_keys": {&bob: []}});
    let (status, first) = Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &body).send(&s.hs.url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{first}");
    let worker = spawn_worker().await;
    for ask in [
        Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &body),
        Ask::keys_query("r0", &s.me.session.token, TokenIn::Query, &json!({"device_keys": {&bob: ["PHONE"]}})),
    ] {
        let (_, answer) = assert_same(&worker, &ask).await;
        assert!(answer["master_keys"][&bob].is_object(), "{answer}");
    }
    assert_eq!(our_calls(&s.remote, Route::UserDevices) + our_calls(&s.remote, Route::UserKeysQuery), 0);
    // An unknown device of a cached user is simply absent (Synapse: 404).
    let (status, answer, _) = query(&worker.url, &s.me, json!({&bob: ["NOPE"]}), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["device_keys"][&bob], json!({}), "{answer}");
}

#[tokio::test]
async fn stale_user_is_resynced_through_the_writer() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    let worker = spawn_worker().await;
    let (status, answer, _) = query(&worker.url, &s.me, json!({&bob: []}), None).await;
    assert_eq!(status, StatusCode::OK);
    let devices = answer["device_keys"][&bob].as_object().unwrap();
    assert_eq!(devices.len(), 2, "{answer}");
    assert!(answer["master_keys"][&bob].is_object() && answer["self_signing_keys"][&bob].is_object());
    assert_eq!(answer["failures"], json!({}));
    // The remote was asked by Synapse (the writer), never by us.
    assert_eq!(synapse_calls(&s.remote, Route::UserDevices), 1);
    assert_eq!(our_calls(&s.remote, Route::UserDevices) + our_calls(&s.remote, Route::UserKeysQuery), 0);
    // Now cached in Synapse's tables: the next answers agree with Synapse's.
    assert_same(&worker, &Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &json!({"device_keys": {&bob: []}}))).await;
}

#[tokio::test]
async fn writer_stopped_falls_back_to_the_remote_within_timeout() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    let worker = spawn_worker_with(with_writer(base_config(), closed_port().await)).await;
    let (status, answer, took) = query(&worker.url, &s.me, json!({&bob: []}), Some(5_000)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{answer}");
    assert_eq!(answer["failures"], json!({}));
    let ours: Vec<_> = s.remote.calls(Route::UserDevices).into_iter().filter(|c| c.user_agent.starts_with(OURS)).collect();
    assert_eq!(ours.len(), 1);
    assert!(ours[0].verified, "our X-Matrix signature verifies");
    assert!(took < Duration::from_millis(5_500), "answered in {took:?}");
    // Refused at once: the next resync tries it again (milliseconds), as
    // a closed breaker does.
    assert!(!worker.app.remote.coordinator.writer_breaker_open());
    println!("fallback latency with the writer stopped: {took:?}");
    // The result is kept in memory: asking again does not call the remote.
    query(&worker.url, &s.me, json!({&bob: []}), Some(5_000)).await;
    assert_eq!(our_calls(&s.remote, Route::UserDevices), 1);
}

/// The writer accepts connections and never answers, and its timeout
/// (3 s by default) is longer than the client allows: the writer gets half
/// the client's time, then the remote is asked directly; its `/health`
/// does not answer either, so the breaker opens and the next stale user
/// does not wait for the writer at all.
#[tokio::test]
async fn writer_hanging_costs_half_the_timeout_then_nothing() {
    let s = setup().await;
    let (port, accepted) = hanging_listener().await;
    let worker = spawn_worker_with(with_writer(base_config(), port)).await;
    assert_eq!(worker.app.config.worker.writer_timeout_ms, 3_000);
    let bob = s.remote_user("bob");
    let carol = s.remote_user("carol");
    share_a_room(&bob).await;
    share_a_room(&carol).await;

    let (status, answer, first) = query(&worker.url, &s.me, json!({&bob: []}), Some(1_000)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{answer}");
    assert_eq!(answer["failures"], json!({}), "{answer}");
    assert_eq!(worker.app.remote.coordinator.outcomes().writer_late, 1);
    // Its /health gets half a second to answer.
    let coordinator = worker.app.remote.coordinator.clone();
    poll_until(Duration::from_secs(5), || coordinator.writer_breaker_open()).await;
    assert_eq!(coordinator.outcomes().writer_late_but_alive, 0);
    let calls_to_writer = accepted.load(Ordering::SeqCst);
    assert!(calls_to_writer >= 1);

    // The breaker is open: the next stale user does not wait for the writer.
    let (_, answer, second) = query(&worker.url, &s.me, json!({&carol: []}), Some(1_000)).await;
    assert_eq!(answer["device_keys"][&carol].as_object().map(|m| m.len()), Some(2), "{answer}");
    assert_eq!(accepted.load(Ordering::SeqCst), calls_to_writer, "no new connection to the hung writer");
    assert_eq!(worker.app.remote.coordinator.outcomes().writer_late, 1, "carol's resync did not wait for the writer");
    println!("stale user with the writer hanging, timeout=1000: first {first:?}, with the breaker open {second:?}");
}

/// A writer slow because the remote it fetches from is slow (its
/// `/health` answers): after the hedge point that user is resynced
/// directly, but the writer is not skipped: the next stale user, of
/// another remote, goes through it and is answered by it.
#[tokio::test]
async fn a_writer_slow_for_one_remote_is_still_asked_for_the_others() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    let carol = s.remote_user("carol");
    share_a_room(&bob).await;
    share_a_room(&carol).await;
    let carols = json!({&carol: {"user_id": &carol, "stream_id": 7, "devices": [{"device_id": "CAROLW", "keys": {"device_id": "CAROLW", "user_id": &carol}}]}});
    let writer = crate::fake_writer::FakeWriter::start(vec![json!({}), carols]).await;
    writer.hold(0);
    let mut config = with_writer(base_config(), writer.port);
    config.worker.writer_timeout_ms = 1_500;
    let worker = ready_worker(config).await;
    let (_, answer, _) = query(&worker.url, &s.me, json!({&bob: []}), Some(1_000)).await;
    assert_eq!(answer["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{answer}");
    assert_eq!(writer.calls(), 1);
    assert_eq!(our_calls(&s.remote, Route::UserDevices), 1, "bob resynced directly");
    let coordinator = worker.app.remote.coordinator.clone();
    poll_until(Duration::from_secs(5), || coordinator.outcomes().writer_late_but_alive == 1).await;
    assert!(!coordinator.writer_breaker_open(), "alive: not skipped");

    let (_, answer, _) = query(&worker.url, &s.me, json!({&carol: []}), Some(1_000)).await;
    assert_eq!(writer.calls(), 2, "carol's resync went to the writer");
    assert!(answer["device_keys"][&carol]["CAROLW"].is_object(), "the writer's answer: {answer}");
    assert_eq!(our_calls(&s.remote, Route::UserDevices), 1, "carol was not resynced around the writer");
    assert_eq!(coordinator.outcomes().writer_late, 1);
    writer.unhold();
}

/// A caller in a hurry joins a resync started for a patient one: it brings
/// the hedge point forward, so it too gets the devices within its timeout.
#[tokio::test]
async fn a_hurried_caller_brings_the_hedge_forward() {
    let s = setup().await;
    let (port, _) = hanging_listener().await;
    let worker = ready_worker(with_writer(base_config(), port)).await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    let patient = {
        let (url, me, bob) = (worker.url.clone(), s.me.clone(), bob.clone());
        tokio::spawn(async move { query(&url, &me, json!({&bob: []}), Some(20_000)).await })
    };
    let coordinator = worker.app.remote.coordinator.clone();
    poll_until(Duration::from_secs(10), || coordinator.waiting() == 1).await;
    let (_, answer, _) = query(&worker.url, &s.me, json!({&bob: []}), Some(1_000)).await;
    assert_eq!(answer["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{answer}");
    assert_eq!(answer["failures"], json!({}), "{answer}");
    let (_, answer, _) = patient.await.unwrap();
    assert_eq!(answer["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{answer}");
    assert_eq!(our_calls(&s.remote, Route::UserDevices), 1, "one direct resync served both");
}

#[tokio::test]
async fn concurrent_queries_for_one_stale_user_make_one_writer_call() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    // Slow the remote down so the queries overlap the resync.
    s.remote.set_mode(Route::UserDevices, Mode::Hang);
    let proxy = crate::writer_proxy::CountingProxy::start().await;
    let mut config = with_writer(base_config(), proxy.port);
    config.worker.writer_timeout_ms = 20_000;
    // All 200 come from one device: lift Synapse's per-device limit of 10.
    config.worker.max_concurrent_queries_per_device = 200;
    // Once the stream is followed: its first position drops every cached
    // entry and in-flight resync (what came before it is not known), and
    // a query after that would start a second one.
    let worker = ready_worker(config).await;
    let url = worker.url.clone();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (url, token, bob) = (url.clone(), s.me.session.token.clone(), bob.clone());
        tasks.push(tokio::spawn(async move {
            let ask = Ask::keys_query("v3", &token, TokenIn::Header, &json!({"device_keys": {&bob: []}}));
            ask.send(&url).await
        }));
    }
    // Let the remote answer once every query is waiting on the resync.
    let coordinator = worker.app.remote.coordinator.clone();
    poll_until(Duration::from_secs(20), || coordinator.waiting() == 200).await;
    assert_eq!(proxy.calls(), 1);
    s.remote.set_mode(Route::UserDevices, Mode::Normal);
    for t in tasks {
        let (status, answer) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{answer}");
    }
    println!("writer calls for 200 concurrent queries: {}", proxy.calls());
    assert_eq!(proxy.calls(), 1);
    assert_eq!(synapse_calls(&s.remote, Route::UserDevices), 1);
}

#[tokio::test]
async fn remote_down_keeps_serving_cached_devices() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    let body = json!({"device_keys": {&bob: []}});
    let (_, first) = Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &body).send(&s.hs.url).await;
    assert_eq!(first["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{first}");
    s.remote.set_mode(Route::UserDevices, Mode::Status(400));
    s.remote.set_mode(Route::UserKeysQuery, Mode::Status(400));
    let worker = spawn_worker().await;
    let (_, answer) = assert_same(&worker, &Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &body)).await;
    // The same keys as first fetched (the cached rendering adds `unsigned`).
    let without_unsigned = |v: &Value| -> Value {
        let mut v = v.clone();
        v.as_object_mut().unwrap().values_mut().for_each(|d| {
            d.as_object_mut().unwrap().remove("unsigned");
        });
        v
    };
    assert_eq!(without_unsigned(&answer["device_keys"][&bob]), without_unsigned(&first["device_keys"][&bob]));
    assert_eq!(answer["failures"], json!({}));
}

#[tokio::test]
async fn destination_in_backoff_is_answered_at_once() {
    let s = setup().await;
    let dest = format!("{}.invalid", unique("down"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // Fixture write to Synapse's database: the backoff row Synapse keeps
    // after failing to reach a destination (making Synapse fail for real
    // takes its own retry schedule, minutes).
    let pool = sqlx::PgPool::connect(&env().pg_url).await.unwrap();
    sqlx::query("INSERT INTO destinations (destination, retry_last_ts, retry_interval, failure_ts) VALUES ($1, $2, $3, $2)")
        .bind(&dest)
        .bind(now)
        .bind(86_400_000i64)
        .execute(&pool)
        .await
        .unwrap();
    let worker = spawn_worker().await;
    let body = json!({"device_keys": {format!("@someone:{dest}"): []}});
    let started = Instant::now();
    let (_, answer) = assert_same(&worker, &Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &body)).await;
    assert_eq!(answer["failures"][&dest], json!({"status": 503, "message": "Not ready for retry"}));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn untracked_user_is_queried_over_federation_like_synapse() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    let worker = spawn_worker().await;
    // No shared room: both Synapse and we ask the remote's /user/keys/query.
    let body = json!({"device_keys": {&bob: ["PHONE"]}});
    let (_, answer) = assert_same(&worker, &Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &body)).await;
    assert!(answer["device_keys"][&bob]["PHONE"].is_object(), "{answer}");
    assert_eq!(our_calls(&s.remote, Route::UserKeysQuery), 1);
    assert!(s.remote.calls(Route::UserKeysQuery).iter().all(|c| c.verified));
}

#[tokio::test]
async fn unreachable_remote_gives_a_failure_entry() {
    let s = setup().await;
    let worker = spawn_worker().await;
    let dest = format!("{}.invalid", unique("nowhere"));
    let (status, answer, took) = query(&worker.url, &s.me, json!({format!("@x:{dest}"): []}), Some(3_000)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["failures"][&dest]["status"], 503, "{answer}");
    assert!(answer["device_keys"].get(format!("@x:{dest}")).is_none());
    assert!(took < Duration::from_millis(3_500));
}

#[tokio::test]
async fn blocked_remote_is_never_contacted() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    // Synapse's default blocklist (loopback blocked), writer stopped: the
    // direct fallback must refuse 127.0.0.1.
    let mut config = with_writer(base_config(), closed_port().await);
    config.synapse.federation.ip_range_blocklist = None;
    config.synapse.federation.ip_range_whitelist = Vec::new();
    let worker = spawn_worker_with(config).await;
    let carol = s.remote_user("carol");
    let (status, answer, _) = query(&worker.url, &s.me, json!({&bob: [], &carol: ["PHONE"]}), Some(3_000)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["failures"][&s.remote.server_name()]["status"], 503, "{answer}");
    assert_eq!(our_calls(&s.remote, Route::UserDevices) + our_calls(&s.remote, Route::UserKeysQuery), 0);
}

#[tokio::test]
async fn resync_rpc_needs_the_secret() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    let worker = spawn_worker().await;
    let secret = worker.app.config.synapse.worker_replication_secret.clone().expect("harness sets a secret");
    let url = format!("{}/_synapse/replication/multi_user_device_resync/t1", worker.url);
    let body = json!({"user_ids": [&bob]});
    let client = crate::helpers::http();
    for auth in [None, Some("Bearer wrong".to_string())] {
        let mut req = client.post(&url).json(&body);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        assert_eq!(req.send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(synapse_calls(&s.remote, Route::UserDevices), 0, "refused calls did nothing");
    let resp = client.post(&url).bearer_auth(&secret).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer[&bob]["devices"].as_array().map(Vec::len), Some(2), "{answer}");
    assert!(answer["_INT_STREAM_POS"].is_object(), "the writer's stream positions are passed on: {answer}");
}

#[tokio::test]
async fn remote_errors_give_synapse_shaped_failures() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    let worker = spawn_worker().await;
    s.remote.set_mode(Route::UserKeysQuery, Mode::Status(403));
    let body = json!({"device_keys": {&bob: []}});
    let (_, answer) = assert_same(&worker, &Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &body)).await;
    assert_eq!(answer["failures"][&s.remote.server_name()]["status"], 403, "{answer}");
}

#[tokio::test]
async fn hanging_remote_cannot_hold_the_request_past_its_timeout() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    s.remote.set_mode(Route::UserKeysQuery, Mode::Hang);
    let worker = spawn_worker().await;
    let (status, answer, took) = query(&worker.url, &s.me, json!({&bob: []}), Some(1_500)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["failures"][&s.remote.server_name()]["status"], 503, "{answer}");
    assert!(took >= Duration::from_millis(1_400) && took < Duration::from_millis(3_000), "took {took:?}");
}

/// Remotes that try to hold or flood us: each is a failure entry for its
/// server within the client's timeout, and the rest of the answer stands.
#[tokio::test]
async fn hostile_remotes_give_failures_within_the_timeout() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    let worker = spawn_worker().await;
    for mode in [Mode::Huge, Mode::RedirectLoop, Mode::Trickle] {
        s.remote.set_mode(Route::UserKeysQuery, mode);
        let before = our_calls(&s.remote, Route::UserKeysQuery);
        let users = json!({&bob: [], &s.me.user_id: []});
        let (status, answer, took) = query(&worker.url, &s.me, users, Some(2_000)).await;
        assert_eq!(status, StatusCode::OK, "{mode:?}");
        let failure = &answer["failures"][&s.remote.server_name()];
        if mode == Mode::RedirectLoop {
            // Not followed; the status is the failure, as Synapse words it.
            let (_, theirs) =
                Ask::keys_query("v3", &s.me.session.token, TokenIn::Header, &json!({"device_keys": {&bob: []}})).send(&s.hs.url).await;
            assert_eq!(failure, &theirs["failures"][&s.remote.server_name()], "{theirs}");
            assert_eq!(failure["status"], 302);
        } else {
            assert_eq!(failure["status"], 503, "{mode:?}: {answer}");
        }
        assert!(answer["device_keys"][&s.me.user_id].is_object(), "{mode:?}: the local user is still answered");
        assert_eq!(our_calls(&s.remote, Route::UserKeysQuery), before + 1, "{mode:?}: one request of ours, no redirect followed");
        println!("{mode:?}: {failure} after {took:?}");
        assert!(took < Duration::from_millis(3_000), "{mode:?} held the request for {took:?}");
        // No backoff from one failure to the next mode's request.
        worker.app.remote.federation.forget_failures(&s.remote.server_name());
    }
}

#[tokio::test]
async fn garbage_oversized_and_untrusted_answers_are_failures() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    // Not JSON.
    s.remote.set_mode(Route::UserKeysQuery, Mode::Garbage);
    let worker = spawn_worker().await;
    let (_, answer, _) = query(&worker.url, &s.me, json!({&bob: []}), None).await;
    let garbage = answer["failures"][&s.remote.server_name()].clone();
    assert_eq!(garbage["status"], 503, "{answer}");
    s.remote.set_mode(Route::UserKeysQuery, Mode::Normal);

    // Larger than the response cap.
    let mut config = base_config();
    config.worker.federation_max_response_bytes = 100;
    let capped = spawn_worker_with(config).await;
    let (_, answer, _) = query(&capped.url, &s.me, json!({&bob: []}), None).await;
    let failure = &answer["failures"][&s.remote.server_name()];
    assert!(failure["message"].as_str().unwrap_or("").contains("larger than"), "{answer}");

    // Certificates checked (the fake's is self-signed): refused.
    let mut config = base_config();
    config.synapse.federation.verify_certificates = true;
    let strict = spawn_worker_with(config).await;
    let before = our_calls(&s.remote, Route::UserKeysQuery);
    let (_, answer, _) = query(&strict.url, &s.me, json!({&bob: []}), None).await;
    assert_eq!(answer["failures"][&s.remote.server_name()]["status"], 503, "{answer}");
    assert_eq!(our_calls(&s.remote, Route::UserKeysQuery), before, "no request got through the TLS handshake");
    // ...unless its TLS name matches `federation_certificate_verification_whitelist`,
    // or the CA that issued it is in `federation_custom_ca_list`.
    let other_ca = FakeRemote::start_for_homeserver().await.ca_pem().as_bytes().to_vec();
    for (globs, cas, served) in [
        (vec!["127.0.0.*"], None, true),
        (vec!["127.0.0.2", "*.invalid"], None, false),
        (vec![], Some(vec![other_ca.clone(), s.remote.ca_pem().as_bytes().to_vec()]), true),
        (vec![], Some(vec![other_ca]), false),
    ] {
        let mut config = base_config();
        config.synapse.federation.verify_certificates = true;
        config.synapse.federation.verification_whitelist = globs.iter().map(|g| g.to_string()).collect();
        config.synapse.federation.custom_ca_pem = cas;
        let worker = spawn_worker_with(config).await;
        let (_, answer, _) = query(&worker.url, &s.me, json!({&bob: []}), None).await;
        assert_eq!(answer["device_keys"][&bob].is_object(), served, "globs {globs:?}: {answer}");
    }

    // `federation_domain_whitelist`: a destination not listed is never
    // contacted (Synapse's failure); a listed one is.
    for (listed, served) in [(vec![s.remote.server_name()], true), (vec!["other.test.invalid".to_owned()], false)] {
        let mut config = base_config();
        config.synapse.federation.domain_whitelist = Some(listed.into_iter().collect());
        let worker = spawn_worker_with(config).await;
        let before = our_calls(&s.remote, Route::UserKeysQuery);
        let (_, answer, _) = query(&worker.url, &s.me, json!({&bob: []}), None).await;
        assert_eq!(answer["device_keys"][&bob].is_object(), served, "{answer}");
        assert_eq!(our_calls(&s.remote, Route::UserKeysQuery), before + usize::from(served));
        if !served {
            let message = format!("403: Federation denied with {}.", s.remote.server_name());
            assert_eq!(answer["failures"][&s.remote.server_name()], json!({"status": 403, "errcode": "M_FORBIDDEN", "message": message}));
        }
    }

    // The worker that got garbage now backs off from that remote: it does
    // not ask again, and answers with the failure it saw (not "Not ready
    // for retry": Synapse's own table says nothing is wrong).
    let asked = our_calls(&s.remote, Route::UserKeysQuery);
    let (_, answer, _) = query(&worker.url, &s.me, json!({&bob: []}), None).await;
    assert_eq!(answer["failures"][&s.remote.server_name()], garbage);
    assert_eq!(our_calls(&s.remote, Route::UserKeysQuery), asked);
    // ...while one with the normal settings gets the keys.
    let fresh = spawn_worker().await;
    let (_, answer, _) = query(&fresh.url, &s.me, json!({&bob: []}), None).await;
    assert!(answer["device_keys"][&bob].is_object(), "{answer}");
}

#[tokio::test]
async fn proxy_5xx_in_front_of_the_writer_is_tried_again_by_the_next_resync() {
    let s = setup().await;
    // A proxy in front of a dead writer answers 503.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { (StatusCode::SERVICE_UNAVAILABLE, "no upstream") }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let worker = spawn_worker_with(with_writer(base_config(), port)).await;
    let bob = s.remote_user("bob");
    let carol = s.remote_user("carol");
    share_a_room(&bob).await;
    share_a_room(&carol).await;
    let (_, answer, _) = query(&worker.url, &s.me, json!({&bob: []}), Some(5_000)).await;
    assert_eq!(answer["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{answer}");
    // A fast failure: nothing to skip, the writer may be back by the next.
    assert!(!worker.app.remote.coordinator.writer_breaker_open());
    let (_, answer, _) = query(&worker.url, &s.me, json!({&carol: []}), Some(5_000)).await;
    assert_eq!(answer["device_keys"][&carol].as_object().map(|m| m.len()), Some(2), "{answer}");
    assert_eq!(hits.load(Ordering::SeqCst), 2, "each resync asked the writer first");
}

/// `outbound_federation_restricted_to`: our federation requests go through
/// the listed instance (here the real main Synapse, whose listeners proxy
/// `matrix-federation://` requests), never straight to the remote.
#[tokio::test]
async fn federation_goes_through_the_restricted_to_instance() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    let Some(InstanceLocation::Tcp { host, port, .. }) = base_config().synapse.device_lists_writer else {
        panic!("the test homeserver.yaml maps main to TCP")
    };
    let tcp = crate::tcp_proxy::TcpProxy::start(&format!("{host}:{port}")).await;
    let through = |secret: &str| {
        let mut config = base_config();
        config.synapse.federation.proxy_locations = vec![InstanceLocation::Tcp { host: "127.0.0.1".into(), port: tcp.port, tls: false }];
        config.synapse.worker_replication_secret = Some(secret.to_owned());
        config
    };
    let secret = base_config().synapse.worker_replication_secret.unwrap();
    let dest = s.remote.server_name();

    // The proxy instance unreachable: no request reaches the remote.
    tcp.set_open(false);
    let cut_off = spawn_worker_with(through(&secret)).await;
    let (_, answer, _) = query(&cut_off.url, &s.me, json!({&bob: []}), None).await;
    assert_eq!(answer["failures"][&dest]["status"], 503, "{answer}");
    assert_eq!(our_calls(&s.remote, Route::UserKeysQuery), 0, "nothing went around the proxy");
    tcp.set_open(true);

    // Through it: the remote gets our request, signed by us.
    let worker = spawn_worker_with(through(&secret)).await;
    let (_, answer, _) = query(&worker.url, &s.me, json!({&bob: []}), None).await;
    assert_eq!(answer["device_keys"][&bob].as_object().map(|d| d.len()), Some(2), "{answer}");
    let calls = s.remote.calls(Route::UserKeysQuery);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].verified && calls[0].user_agent.starts_with(OURS), "{calls:?}");

    // A wrong secret: the instance refuses to proxy.
    let refused = spawn_worker_with(through("not-the-secret")).await;
    let (_, answer, _) = query(&refused.url, &s.me, json!({&bob: []}), None).await;
    assert_eq!(answer["failures"][&dest], json!({"status": 401, "message": "401: Unauthorized"}), "{answer}");
    assert_eq!(s.remote.calls(Route::UserKeysQuery).len(), 1);
}
