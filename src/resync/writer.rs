//! The device-lists writer (main by default), asked over Synapse's replication
//! HTTP API to resync remote device lists; with a circuit breaker so that
//! once it is unreachable, requests stop waiting for it for a while.

use std::collections::HashMap;
use std::sync::Arc;
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
    breaker: Breaker,
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
    /// Refused, reset, no answer, or a proxy's 502/503/504: trips the breaker.
    #[error("writer unreachable: {0}")]
    Unreachable(String),
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
            breaker: Breaker::new(Duration::from_millis(config.worker.writer_breaker_ms)),
        })
    }

    /// Whether the breaker is open (the writer is being skipped).
    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// A call has not answered within its share of a request's deadline:
    /// presume the writer hung and refuse calls until one shows it alive
    /// (a late answer, or a busy verdict from its `/health`, closes the
    /// breaker again).
    pub fn late(&self) {
        if !self.breaker.is_open() {
            tracing::warn!("device-lists writer late; resyncing directly meanwhile, and skipping it until it answers");
        }
        self.breaker.trip();
    }

    /// `POST /_synapse/replication/multi_user_device_resync/{txn}` for users
    /// of one destination.
    pub async fn resync(&self, users: &[String]) -> Result<WriterAnswer, WriterError> {
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
        let result = match tokio::time::timeout(self.timeout, self.exchange(req)).await {
            Ok(r) => r,
            Err(_) if self.healthy(base).await => Err(WriterError::Busy(self.timeout)),
            Err(_) => Err(WriterError::Unreachable(format!("no answer within {:?}", self.timeout))),
        };
        match &result {
            Ok(_) => self.breaker.close(),
            Err(WriterError::Unreachable(why)) => {
                tracing::warn!(reason = %why, "device-lists writer unreachable; skipping it for {:?}", self.breaker.open_for());
                self.breaker.trip();
            }
            Err(e) => {
                // It answered, or its health endpoint did: reachable.
                self.breaker.close();
                tracing::warn!(error = %e, "resync through the device-lists writer failed");
            }
        }
        result
    }

    async fn exchange(&self, req: reqwest::RequestBuilder) -> Result<WriterAnswer, WriterError> {
        let resp = req.send().await.map_err(|e| WriterError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if matches!(status.as_u16(), 502..=504) {
            return Err(WriterError::Unreachable(format!("HTTP {status}")));
        }
        let body = resp.bytes().await.map_err(|e| WriterError::Unreachable(e.to_string()))?;
        if !status.is_success() {
            let hint = if status.as_u16() == 500 { " (is worker_replication_secret right?)" } else { "" };
            return Err(WriterError::Failed(format!("HTTP {status}{hint}: {}", String::from_utf8_lossy(&body))));
        }
        WriterAnswer::parse(&body)
    }

    /// Whether the writer's listener answers `/health` quickly.
    async fn healthy(&self, base: &str) -> bool {
        let probe = self.http.get(format!("{base}/health")).timeout(Duration::from_millis(500)).send();
        matches!(probe.await, Ok(r) if r.status().is_success())
    }
}
