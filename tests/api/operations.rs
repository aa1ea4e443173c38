//! What operators rely on: metrics, request IDs, logs without secrets,
//! graceful shutdown, and Synapse's per-device request limit.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;
use synapse_keys_worker::config::Config;

use crate::fake_remote::{FakeRemote, Mode, Route};
use crate::helpers::{Ask, ServiceProcess, Synapse, TokenIn, env, eventually, http, poll_until, spawn_worker, spawn_worker_with};

fn get(path: &str) -> Ask {
    Ask { method: Method::GET, path: path.into(), headers: vec![], body: None }
}

#[tokio::test]
async fn metrics_cover_requests_caches_resyncs_and_the_stream() {
    let hs = Synapse::new();
    let user = hs.register("metered").await;
    let worker = spawn_worker().await;
    let body = json!({"device_keys": {&user.user_id: []}});
    let ask = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &body);
    assert_eq!(ask.send(&worker.url).await.0, StatusCode::OK);
    let resp = http().get(format!("{}/metrics", worker.url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(r#"synapse_keys_worker_http_requests_total{route="/_matrix/client/v3/keys/query",method="POST",status="200"} 1"#),
        "{text}"
    );
    for name in [
        "synapse_keys_worker_http_request_duration_seconds_bucket",
        r#"synapse_keys_worker_cache_hits_total{cache="device_keys"}"#,
        r#"synapse_keys_worker_cache_misses_total{cache="tokens"}"#,
        r#"synapse_keys_worker_cache_entries{cache="signatures"}"#,
        r#"synapse_keys_worker_cache_evictions_total{cache="remote_devices"}"#,
        r#"synapse_keys_worker_resyncs_total{outcome="fallback_failed"}"#,
        "synapse_keys_worker_writer_breaker_open 0",
        "synapse_keys_worker_federation_destinations_backing_off 0",
        "synapse_keys_worker_replication_connected",
        "synapse_keys_worker_replication_reconnects_total",
        "synapse_keys_worker_replication_last_message_age_milliseconds",
        r#"synapse_keys_worker_db_pool_connections{state="in_use"}"#,
        "synapse_keys_worker_db_pool_max_connections",
        "# EOF",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // Every family served is in docs/metrics.md's table, under its name
    // without the prefix (counters with `_total`). The device-list signals
    // come once read (at start-up, then every minute).
    let text = crate::helpers::eventually_some(std::time::Duration::from_secs(20), || async {
        let text = http().get(format!("{}/metrics", worker.url)).send().await.unwrap().text().await.unwrap();
        text.contains("synapse_keys_worker_device_list_stale_marks ").then_some(text)
    })
    .await;
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE synapse_keys_worker_")) {
        let (name, kind) = line.split_once(' ').unwrap();
        let documented = if kind == "counter" { format!("| `{name}_total` |") } else { format!("| `{name}` |") };
        assert!(docs.contains(&documented), "docs/metrics.md has no row {documented}");
    }
}

#[tokio::test]
async fn request_ids_are_honoured_or_made() {
    // With the subscriber installed, the access-log line's callsite is
    // first met on a thread that does not capture: capturing must still
    // see it later.
    drop(captured_logs());
    std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
            let other = spawn_worker().await;
            http().get(format!("{}/health", other.url)).send().await.unwrap();
        })
    })
    .join()
    .unwrap();
    let (logs, _capture) = captured_logs();
    // Only this test's thread is captured.
    std::thread::spawn(|| tracing::info!("another-thread-marker")).join().unwrap();
    let worker = spawn_worker().await;
    let resp = http().get(format!("{}/health", worker.url)).header("X-Request-Id", "proxy-id-42").send().await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "proxy-id-42");
    // The access-log line is in the request's span, which carries the ID.
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged.lines().any(|l| l.contains("request_id=proxy-id-42") && l.contains("status=200") && l.contains("path=/health")),
        "no access-log line with the request's ID in\n{logged}"
    );
    assert!(!logged.contains("another-thread-marker"), "another thread's line was captured");
    let resp = http().get(format!("{}/health", worker.url)).send().await.unwrap();
    let made = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made.len(), 16);
    let again = http().get(format!("{}/health", worker.url)).send().await.unwrap();
    assert_ne!(again.headers()["x-request-id"].to_str().unwrap(), made);
    // An ID we would not log (spaces, or too long) is replaced.
    for odd in ["has spaces".to_owned(), "x".repeat(129)] {
        let resp = http().get(format!("{}/health", worker.url)).header("X-Request-Id", &odd).send().await.unwrap();
        let given = resp.headers()["x-request-id"].to_str().unwrap();
        assert!(given != odd && given.len() == 16, "{given}");
    }
}

thread_local! {
    /// Where this thread's log lines go while a test captures them.
    static CAPTURE: std::cell::RefCell<Option<Arc<Mutex<Vec<u8>>>>> = const { std::cell::RefCell::new(None) };
}

/// Captures what this test's thread logs, at debug level, into a buffer of
/// its own until the guard drops. `#[tokio::test]` runs the test and the
/// service it spawns in-process on one thread. One subscriber is installed
/// for the binary (tracing's callsite interest is process-wide, so a
/// thread-scoped subscriber can miss events another thread registered),
/// but it formats only on a thread that captures: other tests' events are
/// filtered out before formatting, and nothing is kept after the test.
pub fn captured_logs() -> (Arc<Mutex<Vec<u8>>>, CaptureGuard) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Dynamic, so asked at every event: a callsite first met on a
        // thread that does not capture is not disabled for good (a plain
        // `filter_fn` caches its first answer per callsite).
        let capturing = tracing_subscriber::filter::dynamic_filter_fn(|m, _| {
            *m.level() <= tracing::Level::DEBUG && CAPTURE.with(|c| c.borrow().is_some())
        });
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(|| Sink(CAPTURE.with(|c| c.borrow().clone())))
            .with_ansi(false)
            .with_filter(capturing);
        tracing_subscriber::registry().with(layer).try_init().expect("no other subscriber in the test binary");
    });
    let buf = Arc::new(Mutex::new(Vec::new()));
    CAPTURE.with(|c| *c.borrow_mut() = Some(buf.clone()));
    (buf, CaptureGuard)
}

/// Ends this thread's capture.
pub struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|c| *c.borrow_mut() = None);
    }
}

/// This thread's capture buffer, if any.
struct Sink(Option<Arc<Mutex<Vec<u8>>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(buf) = &self.0 {
            buf.lock().unwrap().extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_and_secrets_never_reach_the_logs() {
    let (logs, _capture) = captured_logs();
    let hs = Synapse::new();
    let user = hs.register("quiet").await;
    let worker = spawn_worker().await;
    let secret = worker.app.config.synapse.worker_replication_secret.clone().unwrap();
    let body = json!({"device_keys": {&user.user_id: []}});
    for how in [TokenIn::Header, TokenIn::Query] {
        let mut ask = Ask::keys_query("v3", &user.session.token, how, &body);
        ask.headers.push(("X-Request-Id".into(), format!("logcheck-{how:?}")));
        assert_eq!(ask.send(&worker.url).await.0, StatusCode::OK);
    }
    // A wrong token in the query string, a malformed body, and the RPC.
    let bad = Ask::keys_query("v3", "syt_not_a_real_token_zz", TokenIn::Query, &body);
    assert_eq!(bad.send(&worker.url).await.0, StatusCode::UNAUTHORIZED);
    let rpc = http()
        .post(format!("{}/_synapse/replication/multi_user_device_resync/t", worker.url))
        .bearer_auth(&secret)
        .json(&json!({"user_ids": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(rpc.status(), StatusCode::OK);
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("logcheck-Query"), "our requests were logged (the capture works)");
    for secret_value in [user.session.token.as_str(), "syt_not_a_real_token_zz", secret.as_str()] {
        assert!(!text.contains(secret_value), "a secret reached the logs");
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_cleanly() {
    let hs = Synapse::new();
    let me = hs.register("draining").await;
    let remote = FakeRemote::start_for_homeserver().await;
    let bob = remote.add_user("bob").user_id;
    remote.add_device(&bob, "D", None);
    remote.set_mode(Route::UserKeysQuery, Mode::Hang);
    let mut service = ServiceProcess::start().await;
    let url = service.url.clone();
    let child = &mut service.child;
    // A request that takes ~2 s (the remote hangs; timeout=2000).
    let mut slow = Ask::keys_query("v3", &me.session.token, TokenIn::Header, &json!({"device_keys": {&bob: ["D"]}}));
    slow.path.push_str("?timeout=2000");
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { slow.send(&url).await }
    });
    poll_until(Duration::from_secs(10), || !remote.calls(Route::UserKeysQuery).is_empty()).await;
    let killed = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(killed.success());
    // New connections are refused soon...
    eventually(Duration::from_secs(5), || async { http().get(format!("{url}/health")).send().await.is_err() }).await;
    // ...while the request in flight is answered...
    let (status, answer) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["failures"].get(remote.server_name()).is_some(), "{answer}");
    // ...and the process exits 0.
    let mut exit = None;
    poll_until(Duration::from_secs(10), || {
        exit = child.try_wait().unwrap();
        exit.is_some()
    })
    .await;
    assert!(exit.unwrap().success(), "exit status {exit:?}");
}

#[tokio::test]
async fn per_device_limit_queues_then_refuses_with_429() {
    let hs = Synapse::new();
    let me = hs.register("eager").await;
    let remote = FakeRemote::start_for_homeserver().await;
    let bob = remote.add_user("bob").user_id;
    remote.set_mode(Route::UserKeysQuery, Mode::Hang);
    let mut config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    config.worker.max_concurrent_queries_per_device = 2;
    config.worker.queue_wait_ms = 300;
    let worker = spawn_worker_with(config).await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let mut ask = Ask::keys_query("v3", &me.session.token, TokenIn::Header, &json!({"device_keys": {&bob: ["D"]}}));
        ask.path.push_str("?timeout=1500");
        let url = worker.url.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http()
                .request(ask.method.clone(), format!("{url}{}", ask.path))
                .header("Authorization", &ask.headers[0].1)
                .body(ask.body.clone().unwrap())
                .send()
                .await
                .unwrap();
            let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            (resp.status(), retry_after, resp.json::<serde_json::Value>().await.unwrap())
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        let (status, retry_after, body) = t.await.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED");
                assert!(body["retry_after_ms"].as_u64().is_some(), "{body}");
                assert!(retry_after.is_some(), "Retry-After header");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((ok, limited), (2, 3));
    // Another device of the same user is not held back.
    let other = hs.login(&me, None).await;
    let (status, _) = Ask::keys_query("v3", &other.token, TokenIn::Header, &json!({"device_keys": {}})).send(&worker.url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(get("/health").send(&worker.url).await.0, StatusCode::OK);
}

/// The client's `timeout` counts from when the request arrived: time spent
/// queued for the device's slot is not given again to the remote part.
#[tokio::test]
async fn the_timeout_counts_from_arrival_not_from_the_slot() {
    let hs = Synapse::new();
    let me = hs.register("queued").await;
    // Two servers that never answer (two, so that the second request is
    // not answered from the first one's backoff).
    let (a, b) = (FakeRemote::start_for_homeserver().await, FakeRemote::start_for_homeserver().await);
    let (bob, carol) = (a.add_user("bob").user_id, b.add_user("carol").user_id);
    a.set_mode(Route::UserKeysQuery, Mode::Hang);
    b.set_mode(Route::UserKeysQuery, Mode::Hang);
    let mut config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    config.worker.max_concurrent_queries_per_device = 1;
    let worker = spawn_worker_with(config).await;
    let ask = |user: &str, timeout: u64| {
        let mut ask = Ask::keys_query("v3", &me.session.token, TokenIn::Header, &json!({"device_keys": {user: []}}));
        ask.path.push_str(&format!("?timeout={timeout}"));
        ask
    };
    let started = Instant::now();
    let first = tokio::spawn({
        let (ask, url) = (ask(&bob, 2_000), worker.url.clone());
        async move { ask.send(&url).await }
    });
    poll_until(Duration::from_secs(10), || !a.calls(Route::UserKeysQuery).is_empty()).await;
    // Queued behind the first for ~2 s, with 1 s allowed: due as soon as
    // it gets the slot, not 1 s after.
    let (status, answer) = ask(&carol, 1_000).send(&worker.url).await;
    let second = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["failures"][&b.server_name()].is_object(), "{answer}");
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    assert!(second < Duration::from_millis(2_700), "answered {second:?} after the first request started");
}

/// Start-up problems stop the binary with one line naming the problem.
#[test]
fn bad_config_stops_startup_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let db = "database: {name: sqlite3, args: {database: x.db}}\n";
    let cases = [
        (dir.path().join("missing.yaml"), "cannot read config file"),
        (write("no-name.yaml", db), "`server_name` is missing"),
        (write("typo.yaml", &format!("server_name: hs\n{db}keys_worker: {{lisen: 1}}\n")), "unknown field `lisen`"),
        (write("bad.yaml", "server_name: [\n"), "not valid YAML"),
    ];
    for (path, expected) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_synapse-keys-worker")).arg("-c").arg(&path).output().unwrap();
        assert!(!out.status.success(), "{path:?} should not start");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(expected), "{expected} in {stderr}");
    }
}

/// A database that hangs (connections open, no answer) costs a request its
/// budget, not forever: 503, and the service recovers when it answers again.
#[tokio::test]
async fn hung_database_gives_503_within_budget() {
    let (proxy, worker, ask) = behind_a_database_proxy("patient", |w| w.db_statement_timeout_ms = 1000).await;
    proxy.set_frozen(true);
    let started = Instant::now();
    let (status, body) = ask.send(&worker.url).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(took < Duration::from_secs(4), "answered in {took:?}");
    assert_eq!(get("/health").send(&worker.url).await.0, StatusCode::OK);
    proxy.set_frozen(false);
    eventually(Duration::from_secs(20), || async { ask.send(&worker.url).await.0 == StatusCode::OK }).await;
}

/// The database restarts (connections dropped, then refused, then back):
/// requests fail fast with 503 meanwhile and succeed again afterwards.
#[tokio::test]
async fn database_restart_is_survived() {
    let (proxy, worker, ask) = behind_a_database_proxy("restart", |w| w.db_acquire_timeout_ms = 1000).await;
    proxy.set_open(false);
    let started = Instant::now();
    let (status, body) = ask.send(&worker.url).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5), "failed fast: {:?}", started.elapsed());
    let (status, ready) = get("/ready").send(&worker.url).await;
    assert_eq!((status, ready["database"]["ok"].clone()), (StatusCode::SERVICE_UNAVAILABLE, json!(false)));
    proxy.set_open(true);
    eventually(Duration::from_secs(20), || async { ask.send(&worker.url).await.0 == StatusCode::OK }).await;
    assert_eq!(get("/ready").send(&worker.url).await.0, StatusCode::OK);
}

/// Every idle database connection of ours dies at once (a database
/// restart seen between two requests, an idle timeout): the next request
/// is answered at once, on new connections, not failed. No statement pays
/// a liveness ping for this; a statement that finds its connection dead is
/// run once more on a new one.
#[tokio::test]
async fn idle_connections_lost_between_requests_cost_no_error() {
    let (proxy, worker, ask) = behind_a_database_proxy("idle-lost", |_| {}).await;
    for round in 0..3 {
        proxy.set_open(false);
        proxy.set_open(true);
        let (status, body) = ask.send(&worker.url).await;
        assert_eq!(status, StatusCode::OK, "round {round}: {body}");
    }
}

/// With the caches off, a query of local users reads the database after it
/// arrived and so waits for no read-barrier probe.
#[tokio::test]
async fn caches_off_local_queries_make_no_barrier_probe() {
    let hs = Synapse::new();
    let user = hs.register("nobarrier").await;
    hs.upload_device_keys(&user.session).await;
    let mut config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    config.worker.caches_enabled = false;
    let worker = spawn_worker_with(config).await;
    let ask = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &json!({"device_keys": {&user.user_id: []}}));
    for _ in 0..5 {
        let (status, body) = crate::helpers::assert_same(&worker, &ask).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["device_keys"][&user.user_id].as_object().is_some_and(|d| !d.is_empty()), "{body}");
    }
    let probes = worker.app.barrier.counters().probes.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(probes, 0, "{probes} read-barrier probes for local queries with the caches off");
}

/// A worker whose database link goes through a [`TcpProxy`] (caches off,
/// so every request reads the database), and a query that works now.
async fn behind_a_database_proxy(
    name: &str,
    tune: impl FnOnce(&mut synapse_keys_worker::config::WorkerConfig),
) -> (crate::tcp_proxy::TcpProxy, crate::helpers::Worker, Ask) {
    let user = Synapse::new().register(name).await;
    let pg = url::Url::parse(&env().pg_url).unwrap();
    let proxy = crate::tcp_proxy::TcpProxy::start(&format!("{}:{}", pg.host_str().unwrap(), pg.port().unwrap())).await;
    let mut config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    let synapse_keys_worker::config::DatabaseConfig::Postgres(args) = &mut config.synapse.database else { panic!("postgres") };
    args.port = Some(proxy.port);
    config.worker.caches_enabled = false;
    tune(&mut config.worker);
    let worker = spawn_worker_with(config).await;
    let ask = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &json!({"device_keys": {&user.user_id: []}}));
    assert_eq!(ask.send(&worker.url).await.0, StatusCode::OK);
    (proxy, worker, ask)
}

/// Debian's package runs Synapse with `--config-path=/etc/matrix-synapse/homeserver.yaml
/// --config-path=/etc/matrix-synapse/conf.d/`, `server_name` and often
/// `database` in files of that directory: the real binary starts from the
/// same layout (the test world's config split that way) and answers as
/// Synapse does.
#[tokio::test]
async fn the_debian_config_layout_starts_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let mut main: yaml_serde::Mapping = yaml_serde::from_str(&std::fs::read_to_string(&env().homeserver_yaml).unwrap()).unwrap();
    let conf_d = dir.path().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    for key in ["server_name", "database"] {
        let value = main.remove(key).unwrap_or_else(|| panic!("the world's config has {key}"));
        let mut part = yaml_serde::Mapping::new();
        part.insert(key.into(), value);
        std::fs::write(conf_d.join(format!("{key}.yaml")), yaml_serde::to_string(&part).unwrap()).unwrap();
    }
    std::fs::write(conf_d.join("README"), "not read: [\n").unwrap();
    let homeserver = dir.path().join("homeserver.yaml");
    std::fs::write(&homeserver, yaml_serde::to_string(&main).unwrap()).unwrap();
    let with_slash = format!("{}/", conf_d.display());
    let service = ServiceProcess::start_with_args(
        &["--config-path".as_ref(), homeserver.as_os_str(), "--config-path".as_ref(), with_slash.as_ref()],
        &[],
    )
    .await;
    let hs = Synapse::new();
    let user = hs.register("debian").await;
    hs.upload_device_keys(&user.session).await;
    let ask = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &json!({"device_keys": {&user.user_id: []}}));
    let theirs = ask.send(&env().synapse_url).await;
    let ours = ask.send(&service.url).await;
    assert_eq!(ours, theirs, "left: ours (Debian layout), right: Synapse");
    assert!(theirs.1["device_keys"][&user.user_id].as_object().is_some_and(|d| d.len() == 1), "{}", theirs.1);
}
