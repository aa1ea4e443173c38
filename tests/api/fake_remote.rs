//! A fake remote Matrix homeserver for federation tests, running in the
//! test's tokio runtime on `https://127.0.0.1:<free port>` with a fresh
//! self-signed certificate. Its server name is `127.0.0.1:<port>` (an IP
//! literal with a port: federation clients connect straight there).
//!
//! Every federation request must carry a valid `X-Matrix` signature from the
//! one trusted origin given at start (destination = this server's name);
//! otherwise it is answered 401 `M_UNAUTHORIZED` and counted as rejected.
//!
//! ```text
//! FakeRemote::start(origin: &str, key_id: &str, public_key: [u8; 32]) -> FakeRemote   (async)
//! FakeRemote::start_for_homeserver() -> FakeRemote   (async; trusts the test Synapse's key)
//! fn homeserver_verify_key() -> (String /* "ed25519:<version>" */, [u8; 32] /* public key */)
//! fn homeserver_signing_seed() -> (String /* version */, [u8; 32] /* seed */)
//!
//! remote.server_name() -> String            "127.0.0.1:PORT"
//! remote.url() -> String                    "https://127.0.0.1:PORT"
//! remote.add_user(localpart) -> RemoteUser  @localpart:127.0.0.1:PORT with master and
//!                                           self-signing keys (ssk signed by master)
//! remote.add_device(user_id, device_id, display_name: Option<&str>) -> Value
//!                                           signed device keys (by the device key and the ssk)
//! remote.remove_device(user_id, device_id) -> bool
//!                                           (each change bumps that user's stream_id)
//! remote.drop_self_signing_key(user_id)     answer with the master key only
//! remote.rotate_self_signing_key(user_id)   a new self-signing key (devices keep the old signatures)
//! remote.self_signing_key(user_id), remote.device(user_id, device_id) -> Value   what it answers now
//! remote.set_mode(Route, Mode)              Mode::Normal | Status(u16) | Hang | Garbage | Huge | RedirectLoop | Trickle
//! remote.calls(Route) -> Vec<Call>          every request, rejected ones included
//! remote.rejected() -> usize
//! ```
//!
//! Routes: `GET /_matrix/federation/v1/user/devices/{userId}` (unknown user:
//! 200 with no devices, as Synapse), `POST /_matrix/federation/v1/user/keys/query`;
//! everything else is 404 `M_UNRECOGNIZED`. Dropping the `FakeRemote` stops it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
use ruma::serde::Base64;
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::helpers::{SigningKey, Synapse, env};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    UserDevices,
    UserKeysQuery,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Answer this status with a Matrix error body.
    Status(u16),
    /// Never answer, until the route's mode changes.
    Hang,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with a 100 MB body, streamed without a length.
    Huge,
    /// 302 to the same path, forever.
    RedirectLoop,
    /// 200, JSON-looking, one byte per second.
    Trickle,
}

/// One request as received (before any mode applies).
#[derive(Clone, Debug)]
pub struct Call {
    pub user_agent: String,
    /// From the `X-Matrix` header; empty if it did not parse.
    pub origin: String,
    /// Path and query as received.
    pub path: String,
    pub verified: bool,
}

/// What `add_user` generated.
#[derive(Clone, Debug)]
pub struct RemoteUser {
    pub user_id: String,
    pub master_key: Value,
    pub self_signing_key: Value,
}

struct User {
    stream_id: u64,
    master_key: Value,
    /// `None`: the user has only a master key.
    self_signing_key: Option<Value>,
    ssk: SigningKey,
    master: SigningKey,
    devices: BTreeMap<String, (Value, Option<String>)>,
}

#[derive(Default)]
struct Data {
    users: BTreeMap<String, User>,
    calls: Vec<(Route, Call)>,
    rejected: usize,
}

struct Shared {
    server_name: String,
    keys: PublicKeyMap,
    data: Mutex<Data>,
    modes: watch::Sender<HashMap<Route, Mode>>,
}

pub struct FakeRemote {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    ca_pem: String,
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

impl Drop for FakeRemote {
    fn drop(&mut self) {
        self.task.abort(); // drops the JoinSet, so open connections go too
    }
}

/// The test Synapse's signing key file: `(version, seed)`.
pub fn homeserver_signing_seed() -> (String, [u8; 32]) {
    let yaml: yaml_serde::Value = yaml_serde::from_str(&std::fs::read_to_string(&env().homeserver_yaml).unwrap()).unwrap();
    let path = yaml["signing_key_path"].as_str().expect("signing_key_path in homeserver.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let parts: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
    let [alg, version, seed] = parts[..] else { panic!("bad signing key file {path}") };
    assert_eq!(alg, "ed25519", "signing key algorithm");
    let seed = Base64::<ruma::serde::base64::Standard>::parse(seed).unwrap();
    (version.to_owned(), seed.as_bytes().try_into().expect("32-byte seed"))
}

/// The test Synapse's verify key: `("ed25519:<version>", public key)`.
pub fn homeserver_verify_key() -> (String, [u8; 32]) {
    let (version, seed) = homeserver_signing_seed();
    (format!("ed25519:{version}"), ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes())
}

impl FakeRemote {
    /// A fake trusting the test Synapse (and so our service, which signs as it).
    pub async fn start_for_homeserver() -> Self {
        let (key_id, public) = homeserver_verify_key();
        Self::start(&env().server_name, &key_id, public).await
    }

    /// A fake accepting requests signed by `origin` with `key_id`/`public_key`.
    pub async fn start(origin: &str, key_id: &str, public_key: [u8; 32]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_name = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        let keys = PublicKeyMap::from([(origin.to_owned(), [(key_id.to_owned(), Base64::new(public_key.to_vec()))].into())]);
        let shared = Arc::new(Shared { server_name, keys, data: Mutex::new(Data::default()), modes: watch::Sender::new(HashMap::new()) });
        let app = Router::new()
            .route("/_matrix/federation/v1/user/devices/{user_id}", get(user_devices))
            .route("/_matrix/federation/v1/user/keys/query", post(user_keys_query))
            .fallback(|| async { error(404, "M_UNRECOGNIZED", "Unrecognized request") })
            .with_state(shared.clone());

        // A certificate for 127.0.0.1 issued by a CA of its own, which
        // tests may give us as `federation_custom_ca_list`.
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let ca_pem = pem("CERTIFICATE", ca.der());
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&leaf_key, &ca).unwrap();
        let cert = rcgen::CertifiedKey { cert: leaf, signing_key: leaf_key };
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key.into())
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                while conns.try_join_next().is_some() {}
                let (acceptor, app) = (acceptor.clone(), app.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let io = hyper_util::rt::TokioIo::new(tls);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Self { shared, task, ca_pem }
    }

    /// The PEM of the CA that issued this server's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn server_name(&self) -> String {
        self.shared.server_name.clone()
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.shared.server_name)
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.shared.data.lock().unwrap()
    }

    /// Creates (or replaces) `@localpart:<server name>` with fresh
    /// cross-signing keys and no devices.
    pub fn add_user(&self, localpart: &str) -> RemoteUser {
        let user_id = format!("@{localpart}:{}", self.shared.server_name);
        let (master, ssk) = (SigningKey::generate(None), SigningKey::generate(None));
        let key = |usage: &str, k: &SigningKey| json!({"user_id": user_id, "usage": [usage], "keys": {format!("ed25519:{}", k.public): k.public}});
        let master_key = key("master", &master);
        let self_signing_key = master.sign(&user_id, &key("self_signing", &ssk));
        let user = User {
            stream_id: 1,
            master_key: master_key.clone(),
            self_signing_key: Some(self_signing_key.clone()),
            ssk,
            master,
            devices: BTreeMap::new(),
        };
        self.data().users.insert(user_id.clone(), user);
        RemoteUser { user_id, master_key, self_signing_key }
    }

    /// Adds (or replaces) a device with device keys signed by its own
    /// ed25519 key and by the user's self-signing key; returns them.
    pub fn add_device(&self, user_id: &str, device_id: &str, display_name: Option<&str>) -> Value {
        let ed = SigningKey::generate(Some(device_id));
        let keys = json!({
            "user_id": user_id,
            "device_id": device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{device_id}"): SigningKey::generate(None).public,
                format!("ed25519:{device_id}"): ed.public,
            },
        });
        let mut data = self.data();
        let user = data.users.get_mut(user_id).unwrap_or_else(|| panic!("no fake user {user_id}"));
        let signed = user.ssk.sign(user_id, &ed.sign(user_id, &keys));
        user.devices.insert(device_id.to_owned(), (signed.clone(), display_name.map(str::to_owned)));
        user.stream_id += 1;
        signed
    }

    /// Removes a device; false if there was none.
    pub fn remove_device(&self, user_id: &str, device_id: &str) -> bool {
        let mut data = self.data();
        let Some(user) = data.users.get_mut(user_id) else { return false };
        let removed = user.devices.remove(device_id).is_some();
        user.stream_id += u64::from(removed);
        removed
    }

    /// The user's current self-signing key (`null` without one).
    pub fn self_signing_key(&self, user_id: &str) -> Value {
        self.data().users.get(user_id).and_then(|u| u.self_signing_key.clone()).unwrap_or(Value::Null)
    }

    /// One device's current keys (`null` without it).
    pub fn device(&self, user_id: &str, device_id: &str) -> Value {
        self.data().users.get(user_id).and_then(|u| u.devices.get(device_id)).map_or(Value::Null, |(k, _)| k.clone())
    }

    /// A new self-signing key, signed by the master key (the devices keep
    /// the old one's signatures until signed again).
    pub fn rotate_self_signing_key(&self, user_id: &str) {
        let mut data = self.data();
        let user = data.users.get_mut(user_id).unwrap_or_else(|| panic!("no fake user {user_id}"));
        let ssk = SigningKey::generate(None);
        let key = json!({"user_id": user_id, "usage": ["self_signing"], "keys": {format!("ed25519:{}", ssk.public): ssk.public}});
        user.self_signing_key = Some(user.master.sign(user_id, &key));
        user.ssk = ssk;
        user.stream_id += 1;
    }

    /// From now on the user has a master key and no self-signing key.
    pub fn drop_self_signing_key(&self, user_id: &str) {
        let mut data = self.data();
        let user = data.users.get_mut(user_id).unwrap_or_else(|| panic!("no fake user {user_id}"));
        user.self_signing_key = None;
        user.stream_id += 1;
    }

    pub fn set_mode(&self, route: Route, mode: Mode) {
        self.shared.modes.send_modify(|m| {
            m.insert(route, mode);
        });
    }

    pub fn calls(&self, route: Route) -> Vec<Call> {
        self.data().calls.iter().filter(|(r, _)| *r == route).map(|(_, c)| c.clone()).collect()
    }

    pub fn rejected(&self) -> usize {
        self.data().rejected
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn ok(body: &Value) -> Response {
    json_response(StatusCode::OK, body)
}

fn error(status: u16, errcode: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &json!({"errcode": errcode, "error": message}))
}

impl Shared {
    /// Records the call, checks its signature, then applies the route's
    /// mode. `Ok` carries the parsed body (`Null` when empty) for `Normal`.
    async fn admit(&self, route: Route, req: Request) -> Result<Value, Response> {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
        let req = axum::http::Request::from_parts(parts, body);
        let header = XMatrix::extract_from_http_headers(req.headers());
        let verdict = match &header {
            Err(e) => Err(format!("bad or missing X-Matrix header: {e}")),
            Ok(x) if x.destination.as_ref().is_none_or(|d| d.as_str() != self.server_name) => {
                Err(format!("destination is not {}", self.server_name))
            }
            Ok(x) => x
                .verify_http_request(&req, self.server_name.as_str().try_into().unwrap(), &self.keys)
                .map_err(|e| format!("signature check failed: {e}")),
        };
        let call = Call {
            user_agent: req.headers().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned(),
            origin: header.as_ref().map(|x| x.origin.to_string()).unwrap_or_default(),
            path: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            verified: verdict.is_ok(),
        };
        {
            let mut data = self.data.lock().unwrap();
            data.calls.push((route, call));
            data.rejected += usize::from(verdict.is_err());
        }
        verdict.map_err(|e| error(401, "M_UNAUTHORIZED", &e))?;

        let mut modes = self.modes.subscribe();
        let mode = modes.wait_for(|m| m.get(&route) != Some(&Mode::Hang)).await.map(|m| m.get(&route).copied());
        match mode.ok().flatten().unwrap_or(Mode::Normal) {
            Mode::Status(code) => {
                let errcode = match code {
                    403 => "M_FORBIDDEN",
                    404 => "M_NOT_FOUND",
                    429 => "M_LIMIT_EXCEEDED",
                    _ => "M_UNKNOWN",
                };
                Err(error(code, errcode, "fake remote failure"))
            }
            Mode::Garbage => Err((StatusCode::OK, Body::from(Bytes::from_static(b"<html>not json"))).into_response()),
            Mode::Huge => {
                let chunk = Bytes::from(vec![b' '; 64 * 1024]);
                let chunks = futures::stream::iter((0..1600).map(move |_| Ok::<_, std::convert::Infallible>(chunk.clone())));
                Err((StatusCode::OK, Body::from_stream(chunks)).into_response())
            }
            Mode::RedirectLoop => {
                let here = req.uri().path().to_owned();
                Err((StatusCode::FOUND, [(axum::http::header::LOCATION, here)], Body::empty()).into_response())
            }
            Mode::Trickle => {
                let bytes = futures::stream::unfold(0u64, |i| async move {
                    // Emulates a slow server; not a synchronisation.
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    Some((Ok::<_, std::convert::Infallible>(Bytes::from_static(b" ")), i + 1))
                });
                Err((StatusCode::OK, Body::from_stream(bytes)).into_response())
            }
            Mode::Normal | Mode::Hang => Ok(serde_json::from_slice(req.body()).unwrap_or(Value::Null)),
        }
    }
}

async fn user_devices(State(s): State<Arc<Shared>>, Path(user_id): Path<String>, req: Request) -> Response {
    if let Err(resp) = s.admit(Route::UserDevices, req).await {
        return resp;
    }
    let data = s.data.lock().unwrap();
    let Some(user) = data.users.get(&user_id) else {
        return ok(&json!({"user_id": user_id, "stream_id": 0, "devices": []}));
    };
    let devices: Vec<Value> = user
        .devices
        .iter()
        .map(|(id, (keys, name))| {
            let mut d = json!({"device_id": id, "keys": keys});
            if let Some(name) = name {
                d["device_display_name"] = name.as_str().into();
            }
            d
        })
        .collect();
    let mut answer = json!({"user_id": user_id, "stream_id": user.stream_id, "devices": devices, "master_key": user.master_key});
    if let Some(ssk) = &user.self_signing_key {
        answer["self_signing_key"] = ssk.clone();
    }
    ok(&answer)
}

async fn user_keys_query(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let body = match s.admit(Route::UserKeysQuery, req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let Some(query) = body["device_keys"].as_object() else {
        return error(400, "M_BAD_JSON", "device_keys must be an object");
    };
    let data = s.data.lock().unwrap();
    let (mut device_keys, mut master_keys, mut self_signing_keys) = (json!({}), json!({}), json!({}));
    for (user_id, wanted) in query {
        if !user_id.ends_with(&format!(":{}", s.server_name)) {
            continue;
        }
        device_keys[user_id] = json!({});
        let Some(user) = data.users.get(user_id) else { continue };
        let wanted: Vec<&str> = wanted.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        for (id, (keys, _)) in &user.devices {
            if wanted.is_empty() || wanted.contains(&id.as_str()) {
                device_keys[user_id][id] = keys.clone();
            }
        }
        master_keys[user_id] = user.master_key.clone();
        if let Some(ssk) = &user.self_signing_key {
            self_signing_keys[user_id] = ssk.clone();
        }
    }
    ok(&json!({"device_keys": device_keys, "master_keys": master_keys, "self_signing_keys": self_signing_keys}))
}

// ---------------------------------------------------------------- tests ---

/// An `Authorization` header for `method path` with `body`, signed as
/// the test Synapse for `destination` (or with a stranger's key of the
/// same id when `forge`).
fn x_matrix(method: &str, path: &str, body: &[u8], destination: &str, forge: bool) -> String {
    let (version, mut seed) = homeserver_signing_seed();
    if forge {
        seed[0] ^= 1;
    }
    let pair = Ed25519KeyPair::new(ed25519_dalek::pkcs8::ALGORITHM_OID, &seed, None, version).unwrap();
    let req = axum::http::Request::builder().method(method).uri(path).body(body.to_vec()).unwrap();
    let input = XMatrixSigningInput::new(env().server_name.as_str().try_into().unwrap(), destination.try_into().unwrap(), &pair);
    XMatrix::sign_http_request(&req, input).unwrap().to_string()
}

/// Sends a request; `auth` is `(destination, forge)` or no header.
async fn send(fake: &FakeRemote, method: &str, path: &str, body: &[u8], auth: Option<(&str, bool)>) -> (u16, String) {
    let client = reqwest::Client::builder().danger_accept_invalid_certs(true).timeout(Duration::from_secs(10)).build();
    let mut req = client.unwrap().request(method.parse().unwrap(), format!("{}{path}", fake.url())).body(body.to_vec());
    if let Some((destination, forge)) = auth {
        req = req.header("Authorization", x_matrix(method, path, body, destination, forge));
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn verifies_signatures_and_serves_devices() {
    let fake = FakeRemote::start_for_homeserver().await;
    let me = fake.server_name();
    let alice = fake.add_user("alice");
    let dev = fake.add_device(&alice.user_id, "DEV", Some("phone"));
    let path = format!("/_matrix/federation/v1/user/devices/%40alice%3A{}", me.replace(':', "%3A"));

    let (status, text) = send(&fake, "GET", &path, b"", Some((&me, false))).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["user_id"], alice.user_id.as_str());
    assert_eq!(v["stream_id"], 2);
    assert_eq!(v["devices"], json!([{"device_id": "DEV", "keys": dev, "device_display_name": "phone"}]));
    assert_eq!(v["master_key"], alice.master_key);

    let body = json!({"device_keys": {(alice.user_id.clone()): [], "@x:elsewhere": []}}).to_string();
    let q = "/_matrix/federation/v1/user/keys/query";
    let (status, text) = send(&fake, "POST", q, body.as_bytes(), Some((&me, false))).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["device_keys"], json!({(alice.user_id.clone()): {"DEV": dev}}));
    assert_eq!(v["self_signing_keys"][&alice.user_id], alice.self_signing_key);

    for auth in [Some((me.as_str(), true)), Some(("127.0.0.1:1", false)), None] {
        let (status, text) = send(&fake, "GET", &path, b"", auth).await;
        assert_eq!(status, 401, "{auth:?}: {text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["errcode"], "M_UNAUTHORIZED");
    }
    assert_eq!(fake.rejected(), 3);
    let verified: Vec<bool> = fake.calls(Route::UserDevices).iter().map(|c| c.verified).collect();
    assert_eq!(verified, [true, false, false, false]);
    assert_eq!(fake.calls(Route::UserKeysQuery)[0].origin, env().server_name);
    assert_eq!(fake.calls(Route::UserDevices)[0].path, path);
    assert_eq!(send(&fake, "GET", "/_matrix/key/v2/server", b"", None).await.0, 404);

    assert!(fake.remove_device(&alice.user_id, "DEV") && !fake.remove_device(&alice.user_id, "DEV"));
    let v: Value = serde_json::from_str(&send(&fake, "GET", &path, b"", Some((&me, false))).await.1).unwrap();
    assert_eq!((v["stream_id"].clone(), v["devices"].clone()), (json!(3), json!([])));
}

#[tokio::test]
async fn failure_modes() {
    let fake = FakeRemote::start_for_homeserver().await;
    let me = fake.server_name();
    let path = format!("/_matrix/federation/v1/user/devices/@nobody:{me}");
    fake.set_mode(Route::UserDevices, Mode::Status(503));
    let (status, text) = send(&fake, "GET", &path, b"", Some((&me, false))).await;
    assert_eq!((status, serde_json::from_str::<Value>(&text).unwrap()["errcode"].clone()), (503, json!("M_UNKNOWN")));
    fake.set_mode(Route::UserDevices, Mode::Garbage);
    let (status, text) = send(&fake, "GET", &path, b"", Some((&me, false))).await;
    assert!(status == 200 && serde_json::from_str::<Value>(&text).is_err(), "{status} {text}");
    fake.set_mode(Route::UserDevices, Mode::Hang);
    let hung = tokio::time::timeout(Duration::from_millis(500), send(&fake, "GET", &path, b"", Some((&me, false))));
    assert!(hung.await.is_err(), "a hanging route answered");
    fake.set_mode(Route::UserDevices, Mode::Normal);
    let (status, text) = send(&fake, "GET", &path, b"", Some((&me, false))).await;
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), json!({"user_id": format!("@nobody:{me}"), "stream_id": 0, "devices": []}));
    assert_eq!((status, fake.calls(Route::UserDevices).len()), (200, 4));
}

#[tokio::test]
async fn synapse_queries_the_fake() {
    let fake = FakeRemote::start_for_homeserver().await;
    let bob = fake.add_user("bob");
    let dev = fake.add_device(&bob.user_id, "BOBDEV", None);
    let synapse = Synapse::new();
    let me = synapse.register("x").await;
    let body = json!({"device_keys": {(bob.user_id.clone()): []}});
    let answer = synapse.post("/_matrix/client/v3/keys/query", &me.session.token, body).await;
    assert_eq!(answer["failures"], json!({}), "{answer}");
    let got = &answer["device_keys"][&bob.user_id]["BOBDEV"];
    assert_eq!(got["keys"], dev["keys"], "{answer}");
    assert_eq!(got["signatures"], dev["signatures"], "{answer}");
    assert_eq!(answer["master_keys"][&bob.user_id]["keys"], bob.master_key["keys"], "{answer}");
    let calls = fake.calls(Route::UserKeysQuery);
    assert!(calls.iter().any(|c| c.verified && c.user_agent.starts_with("Synapse")), "{calls:?}");
    assert_eq!(fake.rejected(), 0, "{calls:?}");
}
