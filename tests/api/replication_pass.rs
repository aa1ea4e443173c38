//! Client_reader workers pointed at us: the worker-mode homeserver of
//! scripts/world.py ("synapse-workers", device-list writers dl1 and dl2)
//! gets one more client_reader, started here, whose `instance_map.dl1` is
//! our service, while our own config keeps the real dl1. Its resyncs reach
//! our resync RPC; every other call it makes to dl1 passes through us to
//! the real dl1 and takes effect. The pass-through itself: the secret is
//! checked before anything is forwarded, an unreachable writer is a prompt
//! 502, and answers come back as the writer sent them.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use synapse_keys_worker::config::Config;
use synapse_keys_worker::config::synapse::InstanceLocation;
use synapse_keys_worker::resync::pass::PassOutcome;

use crate::fake_remote::{FakeRemote, Route, homeserver_verify_key};
use crate::helpers::{Session, Synapse, TestUser, Worker, eventually, eventually_some, http, ready_worker, spawn_worker_with, unique};
use crate::remote::{closed_port, hanging_listener, share_a_room_on, synapse_calls, with_writer};
use crate::workers::last_writer;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run through `bash scripts/test.sh`"))
}

/// The worker-mode homeserver's config, as our service reads it.
fn workers_config() -> Config {
    Config::load(&[PathBuf::from(var("SKW_TEST_WORKERS_HOMESERVER_YAML"))], Vec::new()).unwrap()
}

fn port_of(url: &str) -> u16 {
    url.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// A client_reader of the worker-mode homeserver whose `instance_map.dl1`
/// is `dl1_port`; stopped when dropped (and, should the test die, by the
/// world manager, which reaps what tests leave behind).
struct ClientReader {
    child: Child,
    url: String,
}

impl ClientReader {
    async fn start(dl1_port: u16) -> Self {
        let state = PathBuf::from(var("SKW_TEST_STATE_DIR"));
        let homeserver = PathBuf::from(var("SKW_TEST_WORKERS_HOMESERVER_YAML"));
        let main: Value = yaml_serde::from_str(&std::fs::read_to_string(&homeserver).unwrap()).unwrap();
        let mut instance_map = main["instance_map"].clone();
        assert!(instance_map["dl1"].is_object(), "the worker-mode homeserver has no instance_map.dl1: {instance_map}");
        instance_map["dl1"] = json!({"host": "127.0.0.1", "port": dl1_port});
        let name = unique("reader_via_us");
        let port = closed_port().await;
        // JSON is YAML: Synapse reads this file as it reads the others, a
        // later file's top-level keys replacing the homeserver's.
        let config = json!({
            "worker_app": "synapse.app.generic_worker",
            "worker_name": name,
            "worker_listeners": [{"type": "http", "port": port, "bind_addresses": ["127.0.0.1"], "resources": [{"names": ["client"]}]}],
            "instance_map": instance_map,
        });
        let file = state.join(format!("{name}.yaml"));
        std::fs::write(&file, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let log = std::fs::File::create(state.join(format!("{name}.log"))).unwrap();
        let child = Command::new(var("SKW_TEST_SYNAPSE_PYTHON"))
            .args(["-m", "synapse.app.generic_worker", "-c"])
            .arg(&homeserver)
            .arg("-c")
            .arg(&file)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let health = format!("{url}/health");
        eventually(Duration::from_secs(90), || async { matches!(http().get(&health).send().await, Ok(r) if r.status().is_success()) })
            .await;
        Self { child, url }
    }
}

impl Drop for ClientReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `since`'s next `/sync` batch, once `who` is in its `device_lists.changed`.
async fn sync_reports_change(hs: &Synapse, session: &Session, since: &str, who: &str) -> String {
    eventually_some(Duration::from_secs(20), || async {
        let body = hs.get(&format!("/_matrix/client/v3/sync?timeout=0&since={since}"), &session.token).await;
        let changed = body["device_lists"]["changed"].as_array().cloned().unwrap_or_default();
        changed.iter().any(|u| u == who).then(|| body["next_batch"].as_str().unwrap().to_owned())
    })
    .await
}

async fn next_batch(hs: &Synapse, session: &Session) -> String {
    hs.get("/_matrix/client/v3/sync?timeout=0", &session.token).await["next_batch"].as_str().unwrap().to_owned()
}

fn passed(worker: &Worker, endpoint: &str) -> u64 {
    worker.app.remote.pass.counted(endpoint, PassOutcome::Answered)
}

/// Synapse's client_reader picks a device-list writer at random for
/// `notify_device_update` and `notify_user_signature_update` (handlers/
/// device.py, `random.choice(self._device_list_writers)`), so only calls it
/// sends to dl1 come to us. Each change is made until one went through us
/// (at most 30 tries: one in two goes to dl1, so 30 misses is a 1 in 10^9
/// chance, not a timing); every change, whichever way it went, must take effect.
const TRIES: usize = 30;

#[tokio::test]
async fn client_reader_resyncs_reach_us_and_its_device_calls_reach_the_writer() {
    let config = workers_config();
    // Our config names the real dl1; the client_reader's names us.
    let dl1 = port_of(&var("SKW_TEST_WORKERS_DL1_REPLICATION_URL"));
    assert_eq!(config.synapse.device_lists_writer, Some(InstanceLocation::Tcp { host: "127.0.0.1".into(), port: dl1, tls: false }));
    let worker = ready_worker(config).await;
    let reader = ClientReader::start(port_of(&worker.url)).await;
    let main = Synapse::at(&var("SKW_TEST_WORKERS_SYNAPSE_URL"));
    let via_reader = Synapse::at(&reader.url);
    let db = sqlx::PgPool::connect(&var("SKW_TEST_WORKERS_PG_URL")).await.unwrap();
    let server_name = var("SKW_TEST_WORKERS_SERVER_NAME");

    // (a) A stale remote user asked of the client_reader: it asks dl1 for a
    // resync, which is us; we ask the real dl1, which asks the remote.
    let (key_id, public) = homeserver_verify_key();
    let remote = FakeRemote::start(&server_name, &key_id, public).await;
    let bob = remote.add_user(&unique("bob")).user_id;
    remote.add_device(&bob, "PHONE", Some("Phone"));
    remote.add_device(&bob, "LAPTOP", None);
    share_a_room_on(&var("SKW_TEST_WORKERS_PG_URL"), &server_name, &bob).await;
    let alice = main.register("alice").await;
    let answer = via_reader.post("/_matrix/client/v3/keys/query", &alice.session.token, json!({"device_keys": {&bob: []}})).await;
    assert_eq!(answer["device_keys"][&bob].as_object().map(|d| d.len()), Some(2), "{answer}");
    assert_eq!(answer["failures"], json!({}), "{answer}");
    let outcomes = worker.app.remote.coordinator.outcomes();
    assert_eq!((outcomes.writer_ok, outcomes.fallback_ok), (1, 0), "the resync did not come through us to the writer: {outcomes:?}");
    assert_eq!(synapse_calls(&remote, Route::UserDevices), 1, "dl1 asked the remote once");

    // (b) Device calls the client_reader sends to dl1 pass through us and
    // take effect: carol, who shares a room with alice, sees each change.
    let carol = main.register("carol").await;
    main.share_a_room(&carol.session, &alice.session).await;
    let mut since = next_batch(&main, &carol.session).await;
    let device = alice.session.device_id.clone();
    let mut through_us = 0;
    for i in 0..TRIES {
        let before = passed(&worker, "notify_device_update");
        let name = format!("renamed {i}");
        let resp = http()
            .put(format!("{}/_matrix/client/v3/devices/{device}", reader.url))
            .bearer_auth(&alice.session.token)
            .json(&json!({"display_name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().await.unwrap());
        since = sync_reports_change(&main, &carol.session, &since, &alice.user_id).await;
        let seen = main.get(&format!("/_matrix/client/v3/devices/{device}"), &alice.session.token).await;
        assert_eq!(seen["display_name"], json!(name));
        let went_through_us = passed(&worker, "notify_device_update") > before;
        let writer = last_writer(&db, &alice.user_id).await;
        assert_eq!(writer == "dl1", went_through_us, "change {i} written by {writer}; through us: {went_through_us}");
        if went_through_us {
            through_us += 1;
            break;
        }
    }
    assert_eq!(through_us, 1, "none of {TRIES} renames went to dl1");

    // Signatures: alice signs other users' master keys through the
    // client_reader; the writer records them in the signature stream,
    // which alice's own /sync reports.
    let alice_cs = via_reader.setup_cross_signing(&alice.session).await;
    let mut since = next_batch(&main, &alice.session).await;
    let mut signed_through_us = false;
    for _ in 0..TRIES {
        let target: TestUser = main.register("target").await;
        main.setup_cross_signing(&target.session).await;
        let before = passed(&worker, "notify_user_signature_update");
        via_reader.sign_other_master(&alice.session, &alice_cs, &target.user_id).await;
        since = sync_reports_change(&main, &alice.session, &since, &target.user_id).await;
        if passed(&worker, "notify_user_signature_update") > before {
            signed_through_us = true;
            break;
        }
    }
    assert!(signed_through_us, "none of {TRIES} signatures went to dl1");
    // Nothing the writer answered was refused or lost on the way.
    for outcome in [PassOutcome::Refused, PassOutcome::Unreachable, PassOutcome::Timeout, PassOutcome::NoWriter] {
        for endpoint in ["notify_device_update", "notify_user_signature_update", "other"] {
            assert_eq!(worker.app.remote.pass.counted(endpoint, outcome), 0, "{endpoint} {outcome:?}");
        }
    }
    drop(reader);
}

/// A replication call, as a worker sends it, to `base`.
fn notify(base: &str) -> reqwest::RequestBuilder {
    let body = json!({"user_id": "@nobody:example.invalid", "device_ids": [], "_INT_STREAM_POS": {"streams": {}, "instance_name": "x"}});
    http().post(format!("{base}/_synapse/replication/notify_device_update/%40nobody%3Aexample.invalid")).json(&body)
}

#[tokio::test]
async fn pass_through_refuses_a_wrong_or_missing_secret_without_forwarding() {
    let secret = var("SKW_TEST_REPLICATION_SECRET");
    let (port, accepted) = hanging_listener().await;
    let worker = spawn_worker_with(with_writer(workers_config(), port)).await;
    for auth in [None, Some("Bearer wrong".to_owned()), Some(secret.clone()), Some(format!("Bearer {secret}x"))] {
        let mut req = notify(&worker.url);
        if let Some(a) = &auth {
            req = req.header("Authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["errcode"], "M_UNAUTHORIZED", "{body}");
    }
    assert_eq!(worker.app.remote.pass.counted("notify_device_update", PassOutcome::Refused), 4);
    // Without a configured secret, nothing is forwarded at all.
    let mut config = with_writer(workers_config(), port);
    config.synapse.worker_replication_secret = None;
    let open = spawn_worker_with(config).await;
    let resp = notify(&open.url).header("Authorization", "Bearer ").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Requests to a listener that never answers would still be waiting;
    // none was even sent.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// A worker's call with the right secret: answered `status` with an
/// `M_UNKNOWN` Matrix error, after how long.
async fn failed_call(worker: &Worker, status: StatusCode) -> Duration {
    let started = Instant::now();
    let resp = notify(&worker.url).header("Authorization", format!("Bearer {}", var("SKW_TEST_REPLICATION_SECRET"))).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");
    took
}

#[tokio::test]
async fn pass_through_answers_a_prompt_502_when_the_writer_is_unreachable() {
    let stopped = spawn_worker_with(with_writer(workers_config(), closed_port().await)).await;
    let mut config = workers_config();
    config.synapse.device_lists_writer = None;
    let none = spawn_worker_with(config).await;
    for (worker, outcome) in [(&stopped, PassOutcome::Unreachable), (&none, PassOutcome::NoWriter)] {
        let took = failed_call(worker, StatusCode::BAD_GATEWAY).await;
        assert!(took < Duration::from_secs(5), "answered in {took:?}");
        assert_eq!(worker.app.remote.pass.counted("notify_device_update", outcome), 1);
    }
}

/// A writer that accepts the call and never answers costs a worker
/// `replication_pass_timeout_ms` (90 s by default, above Synapse's 60 s; 1 s
/// here), then a 504 Matrix error.
#[tokio::test]
async fn pass_through_gives_up_on_a_hanging_writer_with_a_504() {
    let (port, accepted) = hanging_listener().await;
    let mut config = with_writer(workers_config(), port);
    assert_eq!(config.worker.replication_pass_timeout_ms, 90_000);
    config.worker.replication_pass_timeout_ms = 1_000;
    let worker = spawn_worker_with(config).await;
    let took = failed_call(&worker, StatusCode::GATEWAY_TIMEOUT).await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "answered in {took:?}");
    assert_eq!(worker.app.remote.pass.counted("notify_device_update", PassOutcome::Timeout), 1);
}

/// Through us or straight to dl1, a worker gets the same answer: a GET
/// with a query string (the stream catch-up a worker makes), the writer's
/// own 400 for a bad query, and its 404 for a path it does not serve.
#[tokio::test]
async fn pass_through_answers_as_the_writer_does() {
    let secret = format!("Bearer {}", var("SKW_TEST_REPLICATION_SECRET"));
    let dl1 = var("SKW_TEST_WORKERS_DL1_REPLICATION_URL");
    let worker = spawn_worker_with(workers_config()).await;
    let ask = |base: &str, method: reqwest::Method, path: &str| {
        let req = http().request(method, format!("{base}{path}")).header("Authorization", &secret);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let content_type = resp.headers().get("content-type").cloned();
            (status, content_type, resp.bytes().await.unwrap())
        }
    };
    let txn = unique("txn");
    let cases = [
        (reqwest::Method::GET, format!("/_synapse/replication/get_repl_stream_updates/device_lists/{txn}a?from_token=0&upto_token=1")),
        (reqwest::Method::GET, format!("/_synapse/replication/get_repl_stream_updates/device_lists/{txn}b?from_token=0")),
        (reqwest::Method::POST, "/_synapse/replication/no_such_endpoint/x".to_owned()),
    ];
    let mut statuses = Vec::new();
    for (method, path) in cases {
        let ours = ask(&worker.url, method.clone(), &path).await;
        let theirs = ask(&dl1, method, &path).await;
        assert_eq!(ours, theirs, "{path}");
        statuses.push(ours.0);
    }
    assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND]);
    assert_eq!(worker.app.remote.pass.counted("get_repl_stream_updates", PassOutcome::Answered), 2);
    assert_eq!(worker.app.remote.pass.counted("other", PassOutcome::Answered), 1);
}

/// What the echo writer received: method, path and query, headers, body.
type Received = (String, String, Vec<(String, String)>, Vec<u8>);

/// A writer that records each request and answers 201 with a header of its
/// own and the request body back, in 64 KiB chunks.
async fn echo_writer() -> (u16, Arc<Mutex<Vec<Received>>>) {
    let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let headers = parts.headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned())).collect();
            log.lock().unwrap().push((parts.method.to_string(), parts.uri.to_string(), headers, bytes.to_vec()));
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(65_536).map(|c| Ok(c.to_vec())).collect();
            axum::http::Response::builder()
                .status(201)
                .header("x-writer", "echo")
                .body(axum::body::Body::from_stream(futures::stream::iter(chunks)))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, seen)
}

/// Method, path, query, end-to-end headers and a body larger than our
/// `max_body_bytes` (the pass-through streams, the writer sets the limit)
/// reach the writer as sent; its status, headers and body come back.
#[tokio::test]
async fn pass_through_forwards_the_request_and_the_answer_unchanged() {
    let secret = format!("Bearer {}", var("SKW_TEST_REPLICATION_SECRET"));
    let (port, seen) = echo_writer().await;
    let worker = spawn_worker_with(with_writer(workers_config(), port)).await;
    let body: Vec<u8> = (0..12 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    assert!(body.len() > worker.app.config.worker.max_body_bytes);
    let path = "/_synapse/replication/send_events/abc%2Fdef/txn1?x=1&y=%40a";
    let resp = http()
        .put(format!("{}{path}", worker.url))
        .header("Authorization", &secret)
        .header("Content-Type", "application/json")
        .header("X-Trace", "one")
        .header("Connection", "X-Private")
        .header("X-Private", "hop")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["x-writer"], "echo");
    assert_eq!(resp.bytes().await.unwrap(), body, "the answer's body");
    let (method, uri, headers, received) = seen.lock().unwrap().pop().expect("the writer got the call");
    assert_eq!((method.as_str(), uri.as_str()), ("PUT", path));
    assert_eq!(received, body, "the request's body");
    let header = |name: &str| headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    assert_eq!(header("authorization"), [secret.as_str()]);
    assert_eq!(header("x-trace"), ["one"]);
    assert_eq!(header("content-type"), ["application/json"]);
    assert_eq!(header("content-length"), [body.len().to_string().as_str()]);
    assert!(header("x-private").is_empty() && header("connection").iter().all(|v| !v.contains("X-Private")), "{headers:?}");
    assert_eq!(worker.app.remote.pass.counted("send_events", PassOutcome::Answered), 1);
}

/// Endpoint names are labels only when Synapse has them: 2,000 invented
/// ones add no series to `/metrics`.
#[tokio::test]
async fn invented_endpoints_do_not_grow_the_metrics() {
    use futures::StreamExt;
    let worker = spawn_worker_with(with_writer(workers_config(), closed_port().await)).await;
    let client = http();
    let send = |from: usize| {
        let (client, url) = (client.clone(), worker.url.clone());
        async move {
            let calls = (from..from + 1_000).map(|i| client.post(format!("{url}/_synapse/replication/invented_{i}/x")).send());
            let statuses: Vec<u16> =
                futures::stream::iter(calls).buffer_unordered(50).map(|r| r.unwrap().status().as_u16()).collect().await;
            assert!(statuses.iter().all(|s| *s == 401), "{:?}", &statuses[..5]);
        }
    };
    send(0).await;
    let before = worker.app.metrics.render().lines().count();
    send(1_000).await;
    assert_eq!(worker.app.metrics.render().lines().count(), before, "no series added");
    assert_eq!(worker.app.remote.pass.counted("other", PassOutcome::Refused), 2_000);
}
