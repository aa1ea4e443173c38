//! Shared test plumbing: the environment the test harness (scripts/test.sh)
//! sets up, our service spawned in-process, and a client for the real
//! Synapse that creates users, devices and keys through its client API.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use reqwest::{Client, Method, StatusCode};
use ruma::CanonicalJsonValue;
use ruma::serde::Base64;
use ruma::signatures::{Ed25519KeyPair, sign_json};
use serde_json::{Value, json};
use synapse_keys_worker::config::Config;
use synapse_keys_worker::{App, Server};

/// What scripts/test.sh exported. Integration tests need all of it: run
/// them through that script, not bare `cargo test`.
pub struct TestEnv {
    pub synapse_url: String,
    pub homeserver_yaml: PathBuf,
    pub pg_url: String,
    pub sqlite_schema_db: PathBuf,
    pub server_name: String,
}

/// A variable the harness (scripts/world.py) exports.
pub fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the integration tests through `bash scripts/test.sh`"))
}

pub fn env() -> &'static TestEnv {
    static ENV: std::sync::OnceLock<TestEnv> = std::sync::OnceLock::new();
    ENV.get_or_init(|| TestEnv {
        synapse_url: var("SKW_TEST_SYNAPSE_URL"),
        homeserver_yaml: var("SKW_TEST_HOMESERVER_YAML").into(),
        pg_url: var("SKW_TEST_PG_URL"),
        sqlite_schema_db: var("SKW_TEST_SQLITE_SCHEMA_DB").into(),
        server_name: var("SKW_TEST_SERVER_NAME"),
    })
}

/// Whether the world's Synapse is older than `version` ("1.138").
pub fn synapse_before(version: &str) -> bool {
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    parse(&var("SKW_TEST_SYNAPSE_VERSION")) < parse(version)
}

/// Our service, running in this test's runtime on a free loopback port.
pub struct Worker {
    pub url: String,
    pub app: Arc<App>,
}

/// The service configured from Synapse's own homeserver.yaml.
pub async fn spawn_worker() -> Worker {
    let config = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).expect("homeserver.yaml loads");
    spawn_worker_with(config).await
}

pub async fn spawn_worker_with(config: Config) -> Worker {
    let app = App::from_config(config).expect("app builds");
    spawn_app(app).await
}

pub async fn spawn_app(app: Arc<App>) -> Worker {
    let server = Server::bind(app.clone(), "127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", server.local_addr());
    tokio::spawn(server.run_until(std::future::pending()));
    Worker { url, app }
}

/// The real binary, serving the test homeserver's config on a free port;
/// killed when dropped.
pub struct ServiceProcess {
    pub child: std::process::Child,
    pub url: String,
    /// Its standard output: the log.
    pub log: PathBuf,
}

impl ServiceProcess {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// With `SYNAPSE_KEYS_WORKER_*` settings in its environment.
    pub async fn start_with(settings: &[(&str, &str)]) -> Self {
        Self::start_from(&env().homeserver_yaml, settings).await
    }

    /// Serving the config file `config`.
    pub async fn start_from(config: &std::path::Path, settings: &[(&str, &str)]) -> Self {
        Self::start_with_args(&["-c".as_ref(), config.as_os_str()], settings).await
    }

    /// Given `args` (its config paths) and `--listen` on a free port.
    pub async fn start_with_args(args: &[&std::ffi::OsStr], settings: &[(&str, &str)]) -> Self {
        let port = crate::remote::closed_port().await;
        let log = std::env::temp_dir().join(format!("{}.log", unique("service")));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_synapse-keys-worker"))
            .envs(settings.iter().copied())
            .args(args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        eventually(std::time::Duration::from_secs(20), || async { http().get(format!("{url}/health")).send().await.is_ok() }).await;
        Self { child, url, log }
    }

    /// Resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        http().get(format!("{}/metrics", self.url)).send().await.unwrap().text().await.unwrap()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The value of an unlabelled metric in a `/metrics` text.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

pub fn http() -> Client {
    Client::builder().timeout(std::time::Duration::from_secs(60)).build().unwrap()
}

/// A unique, Synapse-valid localpart.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}-{}-{}-{nanos:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// An ed25519 key with its unpadded base64 public part.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pub public: String,
}

impl SigningKey {
    /// `version` names the key (`ed25519:<version>`); `None` names it after
    /// its public part, as cross-signing keys are.
    pub fn generate(version: Option<&str>) -> Self {
        let doc = Ed25519KeyPair::generate();
        let probe = Ed25519KeyPair::from_der(&doc, "probe".into()).unwrap();
        let b64: Base64 = Base64::new(probe.public_key().to_vec());
        let public = b64.encode();
        let pair = Ed25519KeyPair::from_der(&doc, version.unwrap_or(&public).to_owned()).unwrap();
        Self { pair, public }
    }

    /// Adds `signatures[signer][ed25519:version]` over the canonical JSON.
    pub fn sign(&self, signer: &str, value: &Value) -> Value {
        let CanonicalJsonValue::Object(mut obj) = CanonicalJsonValue::try_from(value.clone()).unwrap() else {
            panic!("can only sign objects")
        };
        sign_json(signer, &self.pair, &mut obj).unwrap();
        serde_json::to_value(obj).unwrap()
    }
}

/// A logged-in device.
#[derive(Clone, Debug)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

/// A user created through Synapse's registration API.
#[derive(Clone)]
pub struct TestUser {
    pub user_id: String,
    pub password: String,
    pub session: Session,
}

pub struct CrossSigning {
    pub master: SigningKey,
    pub self_signing: SigningKey,
    pub user_signing: SigningKey,
}

/// A client for the real Synapse.
pub struct Synapse {
    pub url: String,
    client: Client,
}

impl Synapse {
    pub fn new() -> Self {
        Self::at(&env().synapse_url)
    }

    /// A client for another of the test Synapses.
    pub fn at(url: &str) -> Self {
        Self { url: url.to_owned(), client: http() }
    }

    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Value) -> Value {
        let mut req = self.client.request(method.clone(), format!("{}{path}", self.url)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "Synapse {method} {path} -> {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Value {
        self.call(Method::POST, path, Some(token), body).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Value {
        let resp = self.client.get(format!("{}{path}", self.url)).bearer_auth(token).send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "Synapse GET {path} -> {status}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// A room `owner` creates and `member` joins (so each sees the other's
    /// device-list changes in `/sync`); returns its ID.
    pub async fn share_a_room(&self, owner: &Session, member: &Session) -> String {
        let room =
            self.post("/_matrix/client/v3/createRoom", &owner.token, json!({"preset": "private_chat", "invite": [member.user_id]})).await;
        let room_id = str_of(&room, "room_id");
        self.post(&format!("/_matrix/client/v3/rooms/{room_id}/join"), &member.token, json!({})).await;
        room_id
    }

    pub async fn register(&self, prefix: &str) -> TestUser {
        self.register_with_device_name(prefix, Some("first device")).await
    }

    pub async fn register_with_device_name(&self, prefix: &str, device_name: Option<&str>) -> TestUser {
        let username = unique(prefix);
        let password = format!("pw-{username}");
        let mut body = json!({"username": username, "password": password, "auth": {"type": "m.login.dummy"}});
        if let Some(name) = device_name {
            body["initial_device_display_name"] = name.into();
        }
        let r = self.call(Method::POST, "/_matrix/client/v3/register", None, body).await;
        TestUser { user_id: str_of(&r, "user_id"), password, session: session_of(&r) }
    }

    /// A new device for `user` (a fresh login).
    pub async fn login(&self, user: &TestUser, device_name: Option<&str>) -> Session {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user.user_id},
            "password": user.password,
        });
        if let Some(name) = device_name {
            body["initial_device_display_name"] = name.into();
        }
        session_of(&self.call(Method::POST, "/_matrix/client/v3/login", None, body).await)
    }

    /// Uploads signed device keys for the session's device; returns them
    /// and the device's signing key.
    pub async fn upload_device_keys(&self, s: &Session) -> (Value, SigningKey) {
        let ed = SigningKey::generate(Some(&s.device_id));
        let curve = SigningKey::generate(None).public;
        let keys = json!({
            "user_id": s.user_id,
            "device_id": s.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{}", s.device_id): curve,
                format!("ed25519:{}", s.device_id): ed.public,
            },
        });
        let signed = ed.sign(&s.user_id, &keys);
        self.post("/_matrix/client/v3/keys/upload", &s.token, json!({"device_keys": signed})).await;
        (signed, ed)
    }

    /// Uploads master, self-signing and user-signing keys (the first upload
    /// needs no interactive auth).
    pub async fn setup_cross_signing(&self, s: &Session) -> CrossSigning {
        let cs = CrossSigning {
            master: SigningKey::generate(None),
            self_signing: SigningKey::generate(None),
            user_signing: SigningKey::generate(None),
        };
        let key = |usage: &str, k: &SigningKey| json!({"user_id": s.user_id, "usage": [usage], "keys": {format!("ed25519:{}", k.public): k.public}});
        let master = key("master", &cs.master);
        let ssk = cs.master.sign(&s.user_id, &key("self_signing", &cs.self_signing));
        let usk = cs.master.sign(&s.user_id, &key("user_signing", &cs.user_signing));
        self.post(
            "/_matrix/client/v3/keys/device_signing/upload",
            &s.token,
            json!({"master_key": master, "self_signing_key": ssk, "user_signing_key": usk}),
        )
        .await;
        cs
    }

    /// Signs one of `s`'s own devices with the self-signing key.
    pub async fn sign_own_device(&self, s: &Session, cs: &CrossSigning, device_keys: &Value) {
        let device_id = str_of(device_keys, "device_id");
        let signed = cs.self_signing.sign(&s.user_id, &strip(device_keys));
        self.post("/_matrix/client/v3/keys/signatures/upload", &s.token, json!({ (s.user_id.clone()): { device_id: signed } })).await;
    }

    /// Signs `s`'s own master key with the session's device key.
    pub async fn sign_own_master_with_device(&self, s: &Session, device_key: &SigningKey, cs: &CrossSigning) {
        let master =
            json!({"user_id": s.user_id, "usage": ["master"], "keys": {format!("ed25519:{}", cs.master.public): cs.master.public}});
        let signed = device_key.sign(&s.user_id, &master);
        self.post(
            "/_matrix/client/v3/keys/signatures/upload",
            &s.token,
            json!({ (s.user_id.clone()): { (cs.master.public.clone()): signed } }),
        )
        .await;
    }

    /// Signs `target`'s master key with `signer`'s user-signing key.
    pub async fn sign_other_master(&self, signer: &Session, cs: &CrossSigning, target: &str) {
        let q = self.post("/_matrix/client/v3/keys/query", &signer.token, json!({"device_keys": {target: []}})).await;
        let master = q["master_keys"][target].clone();
        assert!(master.is_object(), "{target} has no master key: {q}");
        let pubkey = master["keys"].as_object().unwrap().values().next().unwrap().as_str().unwrap().to_owned();
        let signed = cs.user_signing.sign(&signer.user_id, &strip(&master));
        self.post("/_matrix/client/v3/keys/signatures/upload", &signer.token, json!({ target: { pubkey: signed } })).await;
    }

    /// Deletes a device (interactive auth with the user's password).
    pub async fn delete_device(&self, user: &TestUser, device_id: &str) {
        let body = json!({"auth": {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user.user_id},
            "password": user.password,
        }});
        self.call(Method::DELETE, &format!("/_matrix/client/v3/devices/{device_id}"), Some(&user.session.token), body).await;
    }

    /// A new server admin, registered with Synapse's own
    /// `register_new_matrix_user` (shared-secret registration), then logged in.
    pub async fn register_admin(&self, prefix: &str) -> TestUser {
        self.register_admin_on(prefix, &env().homeserver_yaml, &env().server_name).await
    }

    /// [`Synapse::register_admin`] on this homeserver, whose config is
    /// `yaml` and server name `server_name`.
    pub async fn register_admin_on(&self, prefix: &str, yaml: &std::path::Path, server_name: &str) -> TestUser {
        let username = unique(prefix);
        let password = format!("pw-{username}");
        let tool = std::path::Path::new(&std::env::var("SKW_TEST_VENV_BIN").expect("SKW_TEST_VENV_BIN")).join("register_new_matrix_user");
        let mut command = std::process::Command::new(tool);
        command.args(["-c", yaml.to_str().unwrap(), "-u", &username, "-p", &password, "--admin"]).arg(&self.url);
        let out = tokio::task::spawn_blocking(move || command.output()).await.unwrap().unwrap();
        assert!(out.status.success(), "register_new_matrix_user: {}", String::from_utf8_lossy(&out.stderr));
        let user_id = format!("@{username}:{server_name}");
        let session = session_of(
            &self
                .call(
                    Method::POST,
                    "/_matrix/client/v3/login",
                    None,
                    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user_id}, "password": password}),
                )
                .await,
        );
        TestUser { user_id, password, session }
    }

    pub async fn admin(&self, method: Method, path: &str, admin: &Session, body: Value) -> Value {
        self.call(method, path, Some(&admin.token), body).await
    }
}

fn str_of(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}")).to_owned()
}

fn session_of(r: &Value) -> Session {
    Session { user_id: str_of(r, "user_id"), device_id: str_of(r, "device_id"), token: str_of(r, "access_token") }
}

/// The object without `signatures` and `unsigned`.
fn strip(v: &Value) -> Value {
    let mut v = v.clone();
    let o = v.as_object_mut().unwrap();
    o.remove("signatures");
    o.remove("unsigned");
    v
}

/// How the token travels.
#[derive(Clone, Copy, Debug)]
pub enum TokenIn {
    Header,
    Query,
}

/// One raw HTTP exchange, for asking Synapse and us the same thing.
#[derive(Clone, Debug)]
pub struct Ask {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Ask {
    pub fn keys_query(prefix: &str, token: &str, how: TokenIn, body: &Value) -> Self {
        let (path, headers) = match how {
            TokenIn::Header => {
                (format!("/_matrix/client/{prefix}/keys/query"), vec![("Authorization".to_owned(), format!("Bearer {token}"))])
            }
            TokenIn::Query => (format!("/_matrix/client/{prefix}/keys/query?access_token={token}"), vec![]),
        };
        Self { method: Method::POST, path, headers, body: Some(body.to_string().into_bytes()) }
    }

    pub async fn send(&self, base: &str) -> (StatusCode, Value) {
        self.send_with(&http(), base).await
    }

    /// [`Ask::send`] through `client` (its connections reused).
    pub async fn send_with(&self, client: &Client, base: &str) -> (StatusCode, Value) {
        let mut req = client.request(self.method.clone(), format!("{base}{}", self.path));
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if let Some(b) = &self.body {
            req = req.body(b.clone());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, body)
    }
}

/// Asks Synapse and the worker the same question; asserts the same status
/// and the same JSON. Returns Synapse's answer.
pub async fn assert_same(worker: &Worker, ask: &Ask) -> (StatusCode, Value) {
    let theirs = ask.send(&env().synapse_url).await;
    let ours = ask.send(&worker.url).await;
    compare(ask, ours, theirs)
}

/// [`assert_same`], asking the worker first: for questions whose asking
/// changes Synapse's state (its backoff after a failed remote, its device
/// list cache after a resync).
pub async fn assert_same_ours_first(worker: &Worker, ask: &Ask) -> (StatusCode, Value) {
    let ours = ask.send(&worker.url).await;
    let theirs = ask.send(&env().synapse_url).await;
    compare(ask, ours, theirs)
}

fn compare(ask: &Ask, ours: (StatusCode, Value), theirs: (StatusCode, Value)) -> (StatusCode, Value) {
    assert_eq!(
        ours,
        theirs,
        "answers differ for {} {} (left: ours, right: Synapse's)\nours:   {}\nSynapse: {}",
        ask.method,
        ask.path,
        serde_json::to_string_pretty(&ours.1).unwrap(),
        serde_json::to_string_pretty(&theirs.1).unwrap(),
    );
    theirs
}

/// Polls until we answer `ask` exactly as the Synapse at `hs` does, with
/// an answer `done` accepts (an answer both give before a change arrives
/// is not the one the test waits for).
pub async fn converges(worker: &Worker, hs: &str, ask: &Ask, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    eventually_some(std::time::Duration::from_secs(15), || async {
        let theirs = ask.send(hs).await;
        let ours = ask.send(&worker.url).await;
        if ours != theirs || !done(&theirs.1) {
            println!("{what}: not yet:\nours:    {}\nSynapse: {}", ours.1, theirs.1);
            return None;
        }
        Some(theirs.1)
    })
    .await
}

/// Polls `done` every few milliseconds until it holds; panics after `limit`.
pub async fn poll_until(limit: std::time::Duration, mut done: impl FnMut() -> bool) {
    eventually(limit, || std::future::ready(done())).await
}

/// The service in-process, once its caches are trusted (the replication
/// stream followed and caught up).
pub async fn ready_worker(config: Config) -> Worker {
    let w = spawn_worker_with(config).await;
    let app = w.app.clone();
    poll_until(std::time::Duration::from_secs(10), || app.caches.trusted()).await;
    w
}

/// Cache hits on device keys, cross-signing keys and signatures so far.
pub fn hits(w: &Worker) -> u64 {
    let c = &w.app.caches;
    [&c.devices.counters, &c.cross_signing.counters, &c.signatures.counters]
        .iter()
        .map(|k| k.hits.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

/// Polls `check` every 10 ms until it is true; fails the test after `limit`.
pub async fn eventually<F: std::future::Future<Output = bool>>(limit: std::time::Duration, mut check: impl FnMut() -> F) {
    eventually_some(limit, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await
}

/// The one polling loop of the tests: polls `check` every 10 ms until it
/// gives a value; fails the test after `limit`.
pub async fn eventually_some<T, F: std::future::Future<Output = Option<T>>>(limit: std::time::Duration, mut check: impl FnMut() -> F) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "condition not met within {limit:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
