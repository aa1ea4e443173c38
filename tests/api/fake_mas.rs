//! A Matrix Authentication Service stand-in: the introspection endpoint
//! (and the metadata document) with tokens the tests script. MAS itself
//! cannot be installed here. The MAS-delegating test Synapse points at it
//! (scripts/test.sh gives its port), so one instance serves the whole test
//! binary, on a runtime of its own; tests keep apart by using tokens of
//! their own. It checks every request the way MAS does (method, path, the
//! shared secret as bearer token, the form, Synapse's headers) and counts
//! calls per token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::{Body, Bytes};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// What the stand-in does when asked about a token.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this JSON.
    Json(Value),
    /// This status with a JSON error body.
    Status(u16),
    /// 200 with this body as `application/json` (garbage).
    Body(&'static str),
    /// Close the connection without answering.
    Close,
    /// Never answer.
    Hang,
    /// Answer `1` once the gate opens.
    Gated(watch::Receiver<bool>, Box<Reply>),
}

pub struct FakeMas {
    pub port: u16,
    pub secret: String,
    state: Arc<Mutex<State>>,
    runtime: tokio::runtime::Handle,
    /// The accept loop and its connections, while serving.
    tasks: Mutex<Vec<AbortHandle>>,
}

#[derive(Default)]
struct State {
    replies: HashMap<String, Reply>,
    calls: HashMap<String, usize>,
    /// Requests MAS would have refused, with why.
    violations: Vec<String>,
}

/// The one stand-in, listening on `SKW_TEST_MAS_PORT`.
pub fn fake_mas() -> &'static FakeMas {
    static MAS: OnceLock<FakeMas> = OnceLock::new();
    MAS.get_or_init(|| {
        let port: u16 = std::env::var("SKW_TEST_MAS_PORT").expect("SKW_TEST_MAS_PORT: run through scripts/test.sh").parse().unwrap();
        let yaml = std::env::var("SKW_TEST_MAS_HOMESERVER_YAML").expect("SKW_TEST_MAS_HOMESERVER_YAML");
        let config = synapse_keys_worker::config::Config::load(&[yaml.into()], Vec::new()).unwrap();
        let secret = config.synapse.mas.expect("the MAS Synapse delegates auth").secret;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(std::future::pending::<()>());
        });
        let mas = FakeMas { port, secret, state: Arc::default(), runtime: rx.recv().unwrap(), tasks: Mutex::default() };
        mas.start();
        mas
    })
}

impl FakeMas {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// From now on, `token` gets `reply`.
    pub fn script(&self, token: &str, reply: Reply) {
        self.state.lock().unwrap().replies.insert(token.to_owned(), reply);
    }

    /// Introspections of `token` so far.
    pub fn calls(&self, token: &str) -> usize {
        self.state.lock().unwrap().calls.get(token).copied().unwrap_or(0)
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    /// Listens again (after [`stop`](Self::stop)).
    pub fn start(&self) {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).expect("the MAS port is free");
        std_listener.set_nonblocking(true).unwrap();
        let state = self.state.clone();
        let secret = self.secret.clone();
        let handle = self.runtime.clone();
        let tasks = self.runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (state, secret) = (state.clone(), secret.clone());
                connections.spawn_on(
                    async move {
                        let service = hyper::service::service_fn(move |req| handle_request(state.clone(), secret.clone(), req));
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                    },
                    &handle,
                );
                while connections.try_join_next().is_some() {}
            }
        });
        self.tasks.lock().unwrap().push(tasks.abort_handle());
    }

    /// Stops listening and drops every open connection: MAS is down.
    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

type Answer = Result<Response<Body>, std::io::Error>;

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    Ok(Response::builder().status(status).header("content-type", "application/json").body(Body::from(body.into())).unwrap())
}

async fn handle_request(state: Arc<Mutex<State>>, secret: String, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_owned();
    if path == "/.well-known/openid-configuration" {
        let port = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1").to_owned();
        let doc = json!({"issuer": format!("http://{port}/"), "account_management_uri": format!("http://{port}/account/")});
        return respond(StatusCode::OK, doc.to_string());
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut problems = Vec::new();
    if req.method() != hyper::Method::POST || path != "/oauth2/introspect" {
        problems.push(format!("{} {path}", req.method()));
    }
    if header("authorization") != Some(format!("Bearer {secret}")) {
        problems.push("not the shared secret".to_owned());
    }
    if header("content-type").as_deref() != Some("application/x-www-form-urlencoded") {
        problems.push(format!("content-type {:?}", header("content-type")));
    }
    if header("x-mas-supports-device-id").as_deref() != Some("1") {
        problems.push("no X-MAS-Supports-Device-Id: 1".to_owned());
    }
    if header("accept").as_deref() != Some("application/json") {
        problems.push(format!("accept {:?}", header("accept")));
    }
    let body = axum::body::to_bytes(Body::new(req.into_body()), 1 << 20).await.unwrap_or_default();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("token_type_hint").map(String::as_str) != Some("access_token") || form.len() != 2 {
        problems.push(format!("form fields {:?}", form.keys().collect::<Vec<_>>()));
    }
    let Some(token) = form.get("token").cloned() else {
        problems.push("no token".to_owned());
        state.lock().unwrap().violations.extend(problems);
        return respond(StatusCode::BAD_REQUEST, r#"{"error": "invalid_request"}"#);
    };
    let reply = {
        let mut s = state.lock().unwrap();
        if !problems.is_empty() {
            s.violations.extend(problems);
            return respond(StatusCode::UNAUTHORIZED, r#"{"error": "invalid_client"}"#);
        }
        *s.calls.entry(token.clone()).or_default() += 1;
        s.replies.get(&token).cloned().unwrap_or(Reply::Json(json!({"active": false})))
    };
    answer(reply).await
}

async fn answer(reply: Reply) -> Answer {
    let mut reply = reply;
    loop {
        return match reply {
            Reply::Json(v) => respond(StatusCode::OK, v.to_string()),
            Reply::Status(code) => respond(StatusCode::from_u16(code).unwrap(), r#"{"error": "server_error"}"#),
            Reply::Body(b) => respond(StatusCode::OK, b),
            // An error from the service makes hyper drop the connection.
            Reply::Close => Err(std::io::Error::other("closing without an answer")),
            Reply::Hang => std::future::pending().await,
            Reply::Gated(mut gate, then) => {
                let _ = gate.wait_for(|open| *open).await;
                reply = *then;
                continue;
            }
        };
    }
}
