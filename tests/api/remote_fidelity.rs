//! Remote users answered exactly as Synapse's `_query_devices_for_destination`
//! answers them: what the writer's resync gives back (a result, `null`, the
//! bare map of a user it had cached, no devices), the failure entries of a
//! remote that errs or hangs, and Synapse's stale marks. Each case asks
//! Synapse and us the same question through the fake remote.
//!
//! Test fixture writes (there is no second real homeserver yet): a remote
//! user's room membership (`remote::share_a_room`), and in one test the
//! stale mark Synapse writes when an incoming device-list update cannot be
//! applied.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_remote::{Mode, Route};
use crate::fake_writer::FakeWriter;
use crate::helpers::{Ask, TokenIn, assert_same, assert_same_ours_first, env, poll_until, spawn_worker, spawn_worker_with};
use crate::remote::{base_config, our_calls, query, setup, share_a_room, synapse_calls, with_writer};

fn ask(token: &str, users: Value) -> Ask {
    Ask::keys_query("v3", token, TokenIn::Header, &json!({ "device_keys": users }))
}

/// The writer's resync fails (`null`): the failure is recorded and the user
/// is still asked for over `/user/keys/query`, which answers.
#[tokio::test]
async fn writer_null_still_asks_user_keys_query() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    // A 4xx on /user/devices: the writer's resync gives null (and marks
    // bob stale) without backing off from the remote.
    s.remote.set_mode(Route::UserDevices, Mode::Status(403));
    let worker = spawn_worker().await;
    let (_, answer) = assert_same(&worker, &ask(&s.me.session.token, json!({&bob: []}))).await;
    assert_eq!(answer["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{answer}");
    let failure = json!({"status": 503, "message": format!("Device resync failed for '{bob}'")});
    assert_eq!(answer["failures"][s.remote.server_name()], failure, "{answer}");
    assert_eq!(our_calls(&s.remote, Route::UserKeysQuery), 1, "we asked /user/keys/query after the null");
}

/// A remote user with a master key and no self-signing key: Synapse caches
/// the half, refetches such a user every time, and its writer then answers
/// the bare `{device_id: content}` map (the user is cached). Synapse takes
/// that as no result (a `KeyError`) and asks `/user/keys/query`: so do we,
/// without the spurious `'devices'` failure (docs/compatibility.md).
#[tokio::test]
async fn writer_bare_map_is_not_a_resync_result() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    s.remote.drop_self_signing_key(&bob);
    share_a_room(&bob).await;
    let body = json!({&bob: []});
    // Synapse resyncs bob once and caches him with only a master key.
    let (_, first) = ask(&s.me.session.token, body.clone()).send(&s.hs.url).await;
    assert!(first["master_keys"][&bob].is_object() && first["self_signing_keys"].get(&bob).is_none(), "{first}");
    let worker = spawn_worker().await;
    let (_, ours) = ask(&s.me.session.token, body.clone()).send(&worker.url).await;
    let (_, theirs) = ask(&s.me.session.token, body).send(&s.hs.url).await;
    let dest = s.remote.server_name();
    assert_eq!(theirs["failures"][&dest], json!({"status": 503, "message": "'devices'"}), "Synapse's own answer: {theirs}");
    assert_eq!(ours["failures"], json!({}), "{ours}");
    let without_failures = |v: &Value| {
        let mut v = v.clone();
        v["failures"] = json!({});
        v
    };
    assert_eq!(ours, without_failures(&theirs), "\nours:    {ours}\nSynapse: {theirs}");
    assert_eq!(ours["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{ours}");
    assert_eq!(our_calls(&s.remote, Route::UserKeysQuery), 1, "the bare map sent us on to /user/keys/query");
}

/// A resync that finds no devices: the user is answered with `{}`.
#[tokio::test]
async fn resync_without_devices_gives_an_empty_entry() {
    let s = setup().await;
    let bob = s.remote.add_user(&crate::helpers::unique("nodevices")).user_id;
    share_a_room(&bob).await;
    let worker = spawn_worker().await;
    // Ours first: we resync through the writer; Synapse then has bob cached.
    let (_, answer) = assert_same_ours_first(&worker, &ask(&s.me.session.token, json!({&bob: []}))).await;
    assert_eq!(answer["device_keys"][&bob], json!({}), "{answer}");
    assert!(answer["master_keys"][&bob].is_object(), "{answer}");
    assert_eq!(synapse_calls(&s.remote, Route::UserDevices), 1, "the writer resynced bob for us");
}

/// A remote that answers 502, 429 or not at all: Synapse's wording.
#[tokio::test]
async fn remote_failures_are_worded_as_synapse_words_them() {
    for mode in [Mode::Status(502), Mode::Status(429)] {
        let s = setup().await;
        let bob = s.remote_user("bob");
        s.remote.set_mode(Route::UserKeysQuery, mode);
        let worker = spawn_worker().await;
        // Ours first: Synapse backs off from the remote once it has failed.
        let (_, answer) = assert_same_ours_first(&worker, &ask(&s.me.session.token, json!({&bob: []}))).await;
        let message = answer["failures"][s.remote.server_name()]["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.starts_with("Failed to send request: HttpResponseException: "), "{answer}");
    }
    let s = setup().await;
    let bob = s.remote_user("bob");
    s.remote.set_mode(Route::UserKeysQuery, Mode::Hang);
    let worker = spawn_worker().await;
    let mut hung = ask(&s.me.session.token, json!({&bob: []}));
    hung.path.push_str("?timeout=1500");
    // A remote that takes the request and never answers: Synapse's message
    // names Twisted's internals for the phase that hung ("ResponseNeverReceived:
    // [<...CancelledError: >]" here); we word every timeout as its
    // connect-phase one (docs/compatibility.md). Everything else is the same.
    let (_, ours) = hung.send(&worker.url).await;
    let (_, theirs) = hung.send(&s.hs.url).await;
    let dest = s.remote.server_name();
    let want = json!({"status": 503, "message": "Failed to send request: TimeoutError: Timed out after 1.5s"});
    assert_eq!(ours["failures"][&dest], want, "{ours}");
    assert_eq!(theirs["failures"][&dest]["status"], 503, "{theirs}");
    assert!(theirs["failures"][&dest]["message"].as_str().unwrap_or_default().starts_with("Failed to send request: "), "{theirs}");
    let mut theirs = theirs;
    theirs["failures"][&dest] = want;
    assert_eq!(ours, theirs);
}

/// Synapse marks a cached remote user stale (no stream row says so): we
/// must not answer them from what we cached before the mark.
#[tokio::test]
async fn a_stale_mark_is_seen_at_once() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    // Synapse resyncs and caches bob; we answer him from its cache.
    let body = json!({&bob: []});
    let (_, first) = ask(&s.me.session.token, body.clone()).send(&s.hs.url).await;
    assert_eq!(first["device_keys"][&bob].as_object().map(|m| m.len()), Some(2), "{first}");
    let worker = spawn_worker().await;
    let app = worker.app.clone();
    poll_until(Duration::from_secs(10), || app.caches.trusted()).await;
    let (_, _, _) = query(&worker.url, &s.me, body.clone(), None).await;
    let hits = worker.app.caches.remote.counters.hits.load(std::sync::atomic::Ordering::Relaxed);
    query(&worker.url, &s.me, body.clone(), None).await;
    assert!(worker.app.caches.remote.counters.hits.load(std::sync::atomic::Ordering::Relaxed) > hits, "bob's status is cached");
    // Test fixture write: the mark Synapse leaves when an incoming device
    // list update cannot be applied (it comes over federation).
    let pool = sqlx::PgPool::connect(&env().pg_url).await.unwrap();
    sqlx::query("INSERT INTO device_lists_remote_resync (user_id, added_ts) VALUES ($1, $2)")
        .bind(&bob)
        .bind(synapse_keys_worker::now_ms())
        .execute(&pool)
        .await
        .unwrap();
    s.remote.add_device(&bob, "TABLET", Some("Tablet"));
    let resyncs = synapse_calls(&s.remote, Route::UserDevices);
    let (_, answer, _) = query(&worker.url, &s.me, body, None).await;
    assert_eq!(synapse_calls(&s.remote, Route::UserDevices), resyncs + 1, "bob was resynced, not answered from before the mark");
    assert_eq!(answer["device_keys"][&bob].as_object().map(|m| m.len()), Some(3), "{answer}");
}

/// A resync result fetched before an invalidation of its user is not kept,
/// and a caller arriving after the invalidation does not join the old
/// resync.
#[tokio::test]
async fn resync_results_fetched_before_an_invalidation_are_not_kept() {
    let s = setup().await;
    let bob = s.remote_user("bob");
    share_a_room(&bob).await;
    let result = |devices: Value| json!({&bob: {"user_id": &bob, "stream_id": 1, "devices": devices}});
    let old = result(json!([]));
    let new = result(json!([{"device_id": "NEW", "keys": {"device_id": "NEW", "user_id": &bob}}]));
    let writer = FakeWriter::start(vec![old, new]).await;
    writer.release(0);
    let worker = spawn_worker_with(with_writer(base_config(), writer.port)).await;
    let send = || {
        let (url, token, bob) = (worker.url.clone(), s.me.session.token.clone(), bob.clone());
        tokio::spawn(async move { ask(&token, json!({&bob: []})).send(&url).await.1 })
    };
    let first = send();
    poll_until(Duration::from_secs(10), || writer.calls() == 1).await;
    // Bob's devices change while the writer works on the old list.
    worker.app.invalidator.user_changed(&bob);
    let second = send();
    poll_until(Duration::from_secs(10), || writer.calls() == 2).await;
    // The old result arrives: its caller gets it, nobody after the change.
    writer.release(1);
    assert_eq!(first.await.unwrap()["device_keys"][&bob], json!({}));
    // A caller after the change: it must not get the old result.
    let third = send();
    let coordinator = worker.app.remote.coordinator.clone();
    poll_until(Duration::from_secs(10), || third.is_finished() || coordinator.waiting() == 2).await;
    writer.release(2);
    for later in [second, third] {
        let answer = later.await.unwrap();
        assert!(answer["device_keys"][&bob]["NEW"].is_object(), "{answer}");
    }
    assert_eq!(writer.calls(), 2, "the new result is kept and served");
}
