//! The device-lists writer (main by default), asked over Synapse's replication
//! HTTP API to resync remote device lists; with a circuit breaker so that
//! while it hangs, requests stop waiting for it (one resync per
//! `writer_breaker_ms` still tries it). A writer that fails fast (refused,
//! reset, a proxy's 5xx) is tried again by the next resync: that costs
//! milliseconds. A writer that is late because the remote it is fetching
//! from is slow (its `/health` answers) is not skipped for other remotes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::header;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::value::RawValue;

use crate::breaker::Breaker;
use crate::config::Config;
use crate::config::synapse::InstanceLocation;

#[derive(Debug)]
pub struct Writer {
    http: reqwest::Client,
    /// `http(s)://host:port`; `None` when no TCP writer is configured.
    base: Option<String>,
    secret: Option<String>,
    pub timeout: Duration,
    breaker: Arc<Breaker>,
    /// Hedge points passed while the writer's `/health` answered: slow
    /// because of the remote it was fetching from, not skipped.
    late_but_alive: Arc<AtomicU64>,
    /// Calls that got an answer (or failed fast): a late call's `/health`
    /// verdict opens the breaker only if none came meanwhile.
    answers: Arc<AtomicU64>,
}

/// The writer's answer: per user, the result or `null`, plus its stream
/// positions (`_INT_STREAM_POS`).
pub struct WriterAnswer {
    pub users: HashMap<String, Option<Box<RawValue>>>,
    pub stream_pos: Option<Arc<RawValue>>,
}

impl WriterAnswer {
    /// The body of a successful answer: an object of user → result or
    /// `null`, with `_INT_STREAM_POS` taken out.
    pub fn parse(body: &[u8]) -> Result<Self, WriterError> {
        let mut map: HashMap<String, Option<Box<RawValue>>> =
            serde_json::from_slice(body).map_err(|e| WriterError::Failed(format!("invalid JSON: {e}")))?;
        let stream_pos = map.remove("_INT_STREAM_POS").flatten().map(Arc::from);
        Ok(WriterAnswer { users: map, stream_pos })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("no device-lists writer configured")]
    NotConfigured,
    #[error("writer skipped: it was unreachable recently")]
    BreakerOpen,
    /// Refused, reset, or a proxy's 502/503/504, at once: the next call
    /// tries again.
    #[error("writer unreachable: {0}")]
    Unreachable(String),
    /// No answer in time, and its health endpoint did not answer either:
    /// hung. Opens the breaker.
    #[error("writer not answering: {0}")]
    TimedOut(String),
    /// No answer in time, but its health endpoint answers: it is busy.
    #[error("writer busy: no answer within {0:?}")]
    Busy(Duration),
    /// It answered, but not with a result.
    #[error("writer answered {0}")]
    Failed(String),
}

/// `http(s)://host:port` of the device-lists writer our config names;
/// `None` without one over TCP (said at start-up, `App::limitations`).
pub fn base_url(config: &Config) -> Option<String> {
    match &config.synapse.device_lists_writer {
        Some(InstanceLocation::Tcp { host, port, tls }) => {
            let host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
            Some(format!("{}://{host}:{port}", if *tls { "https" } else { "http" }))
        }
        Some(InstanceLocation::Unix { .. }) | None => None,
    }
}

impl Writer {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let base = base_url(config);
        let http = reqwest::Client::builder()
            .user_agent(crate::federation::USER_AGENT)
            .connect_timeout(Duration::from_millis(config.worker.writer_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            base,
            secret: config.synapse.worker_replication_secret.clone(),
            timeout: Duration::from_millis(config.worker.writer_timeout_ms),
            breaker: Arc::new(Breaker::new(Duration::from_millis(config.worker.writer_breaker_ms))),
            late_but_alive: Arc::default(),
            answers: Arc::default(),
        })
    }

    /// Whether the breaker is open (the writer is being skipped).
    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// A call has not answered within its share of a request's deadline:
    /// the remote it is fetching from may be slow, or the writer may hang.
    /// Its `/health` tells: if that does not answer either, the writer is
    /// skipped until a probe shows it alive; if it does, nothing changes
    /// for other remotes. Decided in the background: the caller goes on
    /// with its direct resync meanwhile.
    pub fn late(&self) {
        let Some(base) = self.base.clone() else { return };
        let (http, breaker, alive, answers) =
            (self.http.clone(), Arc::clone(&self.breaker), Arc::clone(&self.late_but_alive), Arc::clone(&self.answers));
        let answered_before = answers.load(Ordering::SeqCst);
        tokio::spawn(async move {
            if healthy(&http, &base).await {
                alive.fetch_add(1, Ordering::Relaxed);
                tracing::info!("device-lists writer late but alive (a slow remote server?); still asked for other servers");
            } else if answers.load(Ordering::SeqCst) != answered_before {
                // It answered a call meanwhile: alive after all.
            } else if breaker.timed_out() {
                tracing::warn!(
                    "device-lists writer late and its /health silent; resyncing directly, trying it once per {:?} until it answers",
                    breaker.probe_every()
                );
            }
        });
    }

    /// Hedge points passed while the writer was alive.
    pub fn late_but_alive(&self) -> u64 {
        self.late_but_alive.load(Ordering::Relaxed)
    }

    /// `POST /_synapse/replication/multi_user_device_resync/{txn}` for users
    /// of one destination.
    pub async fn resync(&self, users: &[String]) -> Result<WriterAnswer, WriterError> {
        self.resync_within(users, self.timeout).await
    }

    /// [`Writer::resync`] given `timeout` (a repair waits for the remote
    /// as long as the writer does).
    pub async fn resync_within(&self, users: &[String], timeout: Duration) -> Result<WriterAnswer, WriterError> {
        let base = self.base.as_deref().ok_or(WriterError::NotConfigured)?;
        if !self.breaker.allow() {
            return Err(WriterError::BreakerOpen);
        }
        let txn: String = rand::rng().sample_iter(&Alphanumeric).take(16).map(char::from).collect();
        let mut req = self
            .http
            .post(format!("{base}/_synapse/replication/multi_user_device_resync/{txn}"))
            .json(&serde_json::json!({ "user_ids": users }));
        if let Some(secret) = &self.secret {
            req = req.header(header::AUTHORIZATION, format!("Bearer {secret}"));
        }
        let result = match tokio::time::timeout(timeout, self.exchange(req)).await {
            Ok(r) => r,
            Err(_) => Err(WriterError::TimedOut(format!("no answer within {timeout:?}"))),
        };
        let result = match result {
            // Slow, but is it hung? Its health endpoint tells.
            Err(WriterError::TimedOut(_)) if healthy(&self.http, base).await => Err(WriterError::Busy(timeout)),
            r => r,
        };
        if !matches!(result, Err(WriterError::TimedOut(_))) {
            self.answers.fetch_add(1, Ordering::SeqCst);
        }
        match &result {
            Ok(_) => self.breaker.answered(),
            Err(WriterError::TimedOut(why)) => {
                if self.breaker.timed_out() {
                    tracing::warn!(reason = %why, "device-lists writer hangs; trying it once per {:?} until it answers", self.breaker.probe_every());
                }
            }
            Err(e) => {
                // It answered, failed fast, or its health endpoint answered:
                // not hanging.
                self.breaker.answered();
                tracing::warn!(error = %e, "resync through the device-lists writer failed");
            }
        }
        result
    }

    async fn exchange(&self, req: reqwest::RequestBuilder) -> Result<WriterAnswer, WriterError> {
        let failed =
            |e: reqwest::Error| if e.is_timeout() { WriterError::TimedOut(e.to_string()) } else { WriterError::Unreachable(e.to_string()) };
        let resp = req.send().await.map_err(failed)?;
        let status = resp.status();
        if matches!(status.as_u16(), 502..=504) {
            return Err(WriterError::Unreachable(format!("HTTP {status}")));
        }
        let body = resp.bytes().await.map_err(failed)?;
        if !status.is_success() {
            let hint = if status.as_u16() == 500 { " (is worker_replication_secret right?)" } else { "" };
            return Err(WriterError::Failed(format!("HTTP {status}{hint}: {}", String::from_utf8_lossy(&body))));
        }
        WriterAnswer::parse(&body)
    }
}

/// Whether the writer's listener answers `/health` quickly.
async fn healthy(http: &reqwest::Client, base: &str) -> bool {
    let probe = http.get(format!("{base}/health")).timeout(Duration::from_millis(500)).send();
    matches!(probe.await, Ok(r) if r.status().is_success())
}
