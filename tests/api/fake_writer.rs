//! A scripted device-lists writer: answers Synapse's
//! `multi_user_device_resync` replication call with whatever the test sets,
//! for the writer answers a real Synapse gives only in races (the bare
//! `{device_id: content}` map of a user it had cached meanwhile) or that
//! need a writer held mid-call. Counts calls; answers call `i` with the
//! `i`-th answer given (the last one repeats), once calls up to `i` are
//! released.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;
use tokio::sync::watch;

pub struct FakeWriter {
    pub port: u16,
    shared: Arc<Shared>,
}

struct Shared {
    answers: Vec<Value>,
    calls: AtomicUsize,
    /// How many calls may be answered.
    released: watch::Sender<usize>,
    /// One call held until this is cleared (a writer slow for one remote).
    held: watch::Sender<Option<usize>>,
}

impl FakeWriter {
    /// A writer answering call `i` with `answers[i]` (the last one for any
    /// later call), plus `_INT_STREAM_POS`; every call answers at once.
    pub async fn start(answers: Vec<Value>) -> Self {
        let shared = Arc::new(Shared {
            answers,
            calls: AtomicUsize::new(0),
            released: watch::Sender::new(usize::MAX),
            held: watch::Sender::new(None),
        });
        let app = Router::new()
            .route("/_synapse/replication/multi_user_device_resync/{txn}", post(resync))
            .route("/health", axum::routing::get(|| async { "OK" }))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { port, shared }
    }

    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// From now on only the first `n` calls are answered; later ones wait.
    pub fn release(&self, n: usize) {
        self.shared.released.send_replace(n);
    }

    /// Call `call` waits (as for a slow remote server) until
    /// [`FakeWriter::unhold`]; the others are answered at once.
    pub fn hold(&self, call: usize) {
        self.shared.held.send_replace(Some(call));
    }

    pub fn unhold(&self) {
        self.shared.held.send_replace(None);
    }
}

async fn resync(State(s): State<Arc<Shared>>) -> Response {
    let call = s.calls.fetch_add(1, Ordering::SeqCst);
    let _ = s.released.subscribe().wait_for(|n| *n > call).await;
    let _ = s.held.subscribe().wait_for(|h| *h != Some(call)).await;
    let mut answer = s.answers[call.min(s.answers.len() - 1)].clone();
    answer["_INT_STREAM_POS"] = serde_json::json!({"device_lists": 1});
    (StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "application/json")], answer.to_string()).into_response()
}
