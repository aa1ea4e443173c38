//! The Grafana dashboard against a real Prometheus. contrib/grafana/render.py
//! runs Prometheus, scraping the real binary every second, while this test
//! gives every panel something to show: local users' keys asked for on every
//! path, with bad tokens and bad bodies too; remote users resynced through
//! the device-lists writer, then directly while the writer hangs (its
//! breaker opens); servers that do not exist, backed off from; keys changing
//! under the caches and entries expiring; the Redis link cut and restored
//! (reconnects, catch-up). render.py then evaluates every query of the
//! dashboard through Prometheus' HTTP API and draws them: a query that does
//! not parse or returns nothing fails it, and so this test. A copy of the
//! dashboard with one query broken and one naming no metric must fail it.
//!
//! Needs `SKW_TEST_PROMETHEUS` (the prometheus binary) and matplotlib in the
//! test venv (`SKW_TEST_VENV_BIN`). With `SKW_DASHBOARD_PNG` set, the
//! picture is written there (that is how docs/dashboard.png is made).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::fake_remote::FakeRemote;
use crate::faults::{config_through, host_port};
use crate::helpers::{Ask, ServiceProcess, Synapse, TestUser, TokenIn, env, eventually, http, metric_value, unique};
use crate::remote::share_a_room;
use crate::tcp_proxy::TcpProxy;

/// How long the traffic runs while Prometheus records.
const RECORD: Duration = Duration::from_secs(40);
/// Concurrent query loops, each sending one request every `PACE`.
const LOOPS: usize = 3;
const PACE: Duration = Duration::from_millis(60);

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through `bash scripts/test.sh`"))
}

/// contrib/grafana/render.py, run by the test venv's python; killed (and
/// its Prometheus with it) when dropped.
struct Render {
    child: Child,
    dir: tempfile::TempDir,
}

impl Render {
    fn start(dashboard: &Path, target: &str, png: &Path, how_long: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(Path::new(&var("SKW_TEST_VENV_BIN")).join("python"))
            .arg(repo_root().join("contrib/grafana/render.py"))
            .args(["--prometheus", &var("SKW_TEST_PROMETHEUS"), "--target", target, "--dashboard"])
            .arg(dashboard)
            .arg("--out")
            .arg(png)
            .args(how_long)
            // Its Prometheus' storage goes in here too: removed with it.
            .env("TMPDIR", dir.path())
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(dir.path().join("out")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("err")).unwrap())
            .spawn()
            .unwrap();
        Self { child, dir }
    }

    fn output(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("stdout:\n{}\nstderr:\n{}", read("out"), read("err"))
    }

    /// Once Prometheus has scraped the service (or render.py gave up).
    async fn recording(&mut self) {
        let out = self.dir.path().join("out");
        let child = &mut self.child;
        eventually(Duration::from_secs(90), || {
            let done = std::fs::read_to_string(&out).unwrap_or_default().contains("recording") || child.try_wait().unwrap().is_some();
            async move { done }
        })
        .await;
        assert!(self.child.try_wait().unwrap().is_none(), "render.py stopped before recording:\n{}", self.output());
    }

    /// Ends the recording (`--until-eof`) and waits for render.py to finish.
    async fn finish(&mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        let child = &mut self.child;
        eventually(Duration::from_secs(180), || {
            let done = child.try_wait().unwrap().is_some();
            async move { done }
        })
        .await;
        self.child.wait().unwrap()
    }
}

impl Drop for Render {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Local users with keys on two devices, every other one cross-signing.
async fn local_users(hs: &Synapse, n: usize) -> Vec<TestUser> {
    futures::future::join_all((0..n).map(|i| async move {
        let user = hs.register("dash").await;
        hs.upload_device_keys(&user.session).await;
        let second = hs.login(&user, Some("laptop")).await;
        hs.upload_device_keys(&second).await;
        if i % 2 == 0 {
            hs.setup_cross_signing(&user.session).await;
        }
        user
    }))
    .await
}

/// What the query loops send, in turn: mostly valid queries for a few local
/// users, the older paths, bad tokens, a missing token, a bad body, and
/// remote users of the fake server.
fn asks(users: &[TestUser], remote_users: &[String]) -> Vec<Ask> {
    let token = |i: usize| users[i % users.len()].session.token.clone();
    let some_users = |i: usize| -> Value {
        let picked: serde_json::Map<String, Value> =
            (0..1 + i % 4).map(|k| (users[(i + k) % users.len()].user_id.clone(), json!([]))).collect();
        json!({ "device_keys": picked })
    };
    let mut asks: Vec<Ask> = (0..12).map(|i| Ask::keys_query("v3", &token(i), TokenIn::Header, &some_users(i))).collect();
    asks.push(Ask::keys_query("r0", &token(1), TokenIn::Header, &some_users(2)));
    asks.push(Ask::keys_query("unstable", &token(2), TokenIn::Query, &some_users(3)));
    asks.push(Ask::keys_query("v3", "syt_not_a_token_at_all", TokenIn::Header, &some_users(0)));
    let mut missing = Ask::keys_query("v3", "", TokenIn::Header, &some_users(1));
    missing.headers.clear();
    asks.push(missing);
    let mut bad_body = Ask::keys_query("v3", &token(3), TokenIn::Header, &json!({}));
    bad_body.body = Some(br#"{"device_keys": ["not", "an", "object"]}"#.to_vec());
    asks.push(bad_body);
    for (i, user) in remote_users.iter().enumerate() {
        asks.push(Ask::keys_query("v3", &token(i), TokenIn::Header, &json!({"device_keys": {user: [], &users[i].user_id: []}})));
    }
    asks
}

struct Scene {
    hs: Synapse,
    users: Vec<TestUser>,
    remote_users: Vec<String>,
    _remote: FakeRemote,
    service: ServiceProcess,
    redis: TcpProxy,
    writer: TcpProxy,
    /// HTTP status (or "rpc <status>") -> answers seen.
    statuses: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Scene {
    async fn new() -> Self {
        let hs = Synapse::new();
        let users = local_users(&hs, 6).await;
        let remote = FakeRemote::start_for_homeserver().await;
        let mut remote_users = Vec::new();
        for name in ["rita", "remy", "rosa"] {
            let user = remote.add_user(&unique(name)).user_id;
            remote.add_device(&user, "PHONE", Some("Phone"));
            remote.add_device(&user, "LAPTOP", None);
            share_a_room(&user).await;
            remote_users.push(user);
        }
        let (_, redis_port) = host_port(&var("SKW_TEST_REDIS_URL"));
        let (_, writer_port) = host_port(&var("SKW_TEST_REPLICATION_URL"));
        let redis = TcpProxy::start(&format!("127.0.0.1:{redis_port}")).await;
        let writer = TcpProxy::start(&format!("127.0.0.1:{writer_port}")).await;
        let config = config_through(host_port(&env().pg_url).1, redis.port, writer.port);
        // Short lifetimes, so that within the run entries expire, resyncs
        // are asked again, and backoffs end.
        let settings = [
            ("SYNAPSE_KEYS_WORKER_CACHE_TTL_MS", "4000"),
            ("SYNAPSE_KEYS_WORKER_RESYNC_CACHE_TTL_MS", "500"),
            ("SYNAPSE_KEYS_WORKER_REMOTE_STATUS_TTL_MS", "2000"),
            ("SYNAPSE_KEYS_WORKER_WRITER_BREAKER_MS", "2000"),
            ("SYNAPSE_KEYS_WORKER_FEDERATION_BACKOFF_INITIAL_MS", "3000"),
            ("SYNAPSE_KEYS_WORKER_FEDERATION_BACKOFF_MAX_MS", "6000"),
        ];
        let service = ServiceProcess::start_from(&config, &settings).await;
        Self { hs, users, remote_users, _remote: remote, service, redis, writer, statuses: Arc::default() }
    }

    fn count(&self, what: String) {
        *self.statuses.lock().unwrap().entry(what).or_default() += 1;
    }

    async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.service.metrics().await, &format!("synapse_keys_worker_{name}"))
    }

    /// `LOOPS` loops asking the service until `until`; each now and then
    /// names users of a server that does not exist (a new one every few
    /// times, so that backoffs start and end through the run).
    async fn queries(&self, until: Instant) {
        let asks = asks(&self.users, &self.remote_users);
        futures::future::join_all((0..LOOPS).map(|l| {
            let asks = &asks;
            async move {
                let client = http();
                let mut tick = tokio::time::interval(PACE);
                for n in (l..).step_by(LOOPS) {
                    tick.tick().await;
                    if Instant::now() >= until {
                        return;
                    }
                    let ask = if n % 25 == 0 {
                        let body = json!({"device_keys": {format!("@u:s{}.invalid", n / 100): [], &self.users[0].user_id: []}});
                        let mut ask = Ask::keys_query("v3", &self.users[0].session.token, TokenIn::Header, &body);
                        ask.path.push_str("?timeout=3000");
                        ask
                    } else {
                        asks[n % asks.len()].clone()
                    };
                    let (status, _) = ask.send_with(&client, &self.service.url).await;
                    self.count(status.as_u16().to_string());
                }
            }
        }))
        .await;
    }

    /// Once a second, the resync RPCs a client_reader worker sends (one
    /// server each): for the fake server's users, and for a user of a
    /// server that does not exist.
    async fn resync_rpcs(&self, until: Instant) {
        let secret = var("SKW_TEST_REPLICATION_SECRET");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for n in 0.. {
            tick.tick().await;
            if Instant::now() >= until {
                return;
            }
            for user_ids in [json!(self.remote_users), json!([format!("@u:gone{}.invalid", n % 4)])] {
                let url = format!("{}/_synapse/replication/multi_user_device_resync/{}", self.service.url, unique("txn"));
                let status = http().post(url).bearer_auth(&secret).json(&json!({ "user_ids": user_ids })).send().await.unwrap().status();
                self.count(format!("rpc {status}"));
            }
        }
    }

    /// Every two seconds a user adds a device with keys or renames one:
    /// replication invalidations while the caches are in use.
    async fn churn(&self, until: Instant) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        for n in 0.. {
            tick.tick().await;
            if Instant::now() >= until {
                return;
            }
            let user = &self.users[n % self.users.len()];
            if n % 2 == 0 {
                let device = self.hs.login(user, Some("new phone")).await;
                self.hs.upload_device_keys(&device).await;
            } else {
                let path = format!("/_matrix/client/v3/devices/{}", user.session.device_id);
                let client = http();
                let rename = client.request(Method::PUT, format!("{}{path}", self.hs.url)).bearer_auth(&user.session.token);
                assert!(rename.json(&json!({"display_name": format!("phone {n}")})).send().await.unwrap().status().is_success());
            }
        }
    }

    /// Waits until the unlabelled gauge `name` reads `value`.
    async fn gauge_reaches(&self, name: &str, value: f64) {
        eventually(Duration::from_secs(30), || async move { self.metric(name).await == value }).await;
    }

    /// The writer hanging for a while (the breaker opens, resyncs go to the
    /// remote directly), then the Redis link (the caches are bypassed, then
    /// it reconnects and catches up with what changed meanwhile).
    async fn outages(&self, started: Instant) {
        tokio::time::sleep_until((started + RECORD * 3 / 10).into()).await;
        self.writer.set_frozen(true);
        self.gauge_reaches("writer_breaker_open", 1.0).await;
        tokio::time::sleep_until((started + RECORD * 9 / 20).into()).await;
        self.writer.set_frozen(false);
        self.gauge_reaches("writer_breaker_open", 0.0).await;

        tokio::time::sleep_until((started + RECORD * 13 / 20).into()).await;
        self.redis.set_open(false);
        self.gauge_reaches("replication_connected", 0.0).await;
        let device = self.hs.login(&self.users[1], Some("during the outage")).await;
        self.hs.upload_device_keys(&device).await;
        tokio::time::sleep_until((started + RECORD * 15 / 20).into()).await;
        self.redis.set_open(true);
        self.gauge_reaches("caches_trusted", 1.0).await;
    }
}

/// Width and height of a PNG, from its header; panics if it is not one.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR", "{} is not a PNG", path.display());
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

#[tokio::test]
async fn every_dashboard_query_has_data_in_a_real_prometheus() {
    let scene = Scene::new().await;
    let target = scene.service.url.trim_start_matches("http://").to_owned();
    let dashboard = repo_root().join("contrib/grafana/synapse-keys-worker.json");
    let out = tempfile::tempdir().unwrap();
    let png: PathBuf = std::env::var_os("SKW_DASHBOARD_PNG").map_or_else(|| out.path().join("dashboard.png"), PathBuf::from);

    // The check has teeth: a copy of the dashboard with one query that does
    // not parse and one that names no metric, recorded for a few seconds of
    // the same traffic, fails, naming both.
    let mut broken: Value = serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
    let mut queries = 0;
    for panel in broken["panels"].as_array_mut().unwrap() {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel.get_mut("targets").and_then(Value::as_array_mut).into_iter().flatten() {
            queries += 1;
            let expr = target["expr"].as_str().unwrap().to_owned();
            match title.as_str() {
                "Cache entries" => target["expr"] = format!("{expr})").into(),
                "Resync waiters" => target["expr"] = expr.replace("resync_waiters", "no_such_metric").into(),
                _ => {}
            }
        }
    }
    let broken_path = out.path().join("broken.json");
    std::fs::write(&broken_path, broken.to_string()).unwrap();

    let mut render = Render::start(&dashboard, &target, &png, &["--until-eof"]);
    render.recording().await;
    let mut render_broken = Render::start(&broken_path, &target, &out.path().join("broken.png"), &["--seconds", "5"]);
    let started = Instant::now();
    let until = started + RECORD;
    tokio::join!(scene.queries(until), scene.resync_rpcs(until), scene.churn(until), scene.outages(started));
    let status = render.finish().await;
    let statuses = scene.statuses.lock().unwrap().clone();
    println!("answers over {RECORD:?}: {statuses:?}\n{}", render.output());
    assert!(status.success(), "render.py failed ({status}); its output is above");
    let (width, height) = png_size(&png);
    assert!(width >= 1000 && height >= 1000, "a {width}x{height} picture");
    for seen in ["200", "400", "401", "rpc 200 OK"] {
        assert!(statuses.contains_key(seen), "no {seen} answer in the traffic: {statuses:?}");
    }
    assert!(scene.metric("replication_reconnects_total").await >= 1.0, "the Redis link was cut");

    let status = render_broken.finish().await;
    let said = render_broken.output();
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("2 of {queries} queries failed")), "{said}");
    assert!(said.contains("panel \"Cache entries\"") && said.contains("parse error"), "{said}");
    assert!(said.contains("panel \"Resync waiters\"") && said.contains("no series"), "{said}");
    assert!(!out.path().join("broken.png").exists(), "no picture from a failed check");
}
