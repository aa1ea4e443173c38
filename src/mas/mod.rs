//! Delegated auth: tokens introspected by Matrix Authentication Service, as
//! Synapse's `MasDelegatedAuth` does it. Concurrent requests with one token
//! share one introspection, and valid answers (active or not) are kept for
//! two minutes, as in Synapse; failures are never kept. Unlike Synapse, a
//! call is bounded by a timeout, and while MAS hangs a circuit breaker
//! refuses further calls at once but for one probe per `mas_breaker_ms`
//! (answers already kept still serve). A failure that comes back fast
//! (refused, reset, an error status) is answered per request, as Synapse
//! answers it, and never opens the breaker: the next token is asked anew.

pub mod introspection;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

pub use introspection::{ADMIN_SCOPE, Introspection, Rejection};

use crate::breaker::Breaker;
use crate::config::Config;

/// How long a valid answer is kept (Synapse's `_introspection_cache`).
pub const INTROSPECTION_CACHE_TTL: Duration = Duration::from_secs(120);

/// Largest answer read from MAS (Synapse's `response_limit`).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum MasError {
    #[error("MAS skipped: it could not be reached recently")]
    BreakerOpen,
    #[error("no answer from MAS within {0:?}")]
    Timeout(Duration),
    #[error("MAS unreachable: {0}")]
    Unreachable(String),
    #[error("MAS answered HTTP {0}")]
    Status(u16),
    #[error("MAS answered an invalid introspection response: {0}")]
    Invalid(String),
}

impl MasError {
    /// The `outcome` label of the call.
    fn outcome(&self) -> &'static str {
        match self {
            MasError::BreakerOpen => "breaker_open",
            MasError::Timeout(_) => "timeout",
            MasError::Unreachable(_) => "unreachable",
            MasError::Status(_) => "http_error",
            MasError::Invalid(_) => "invalid_response",
        }
    }

    /// MAS did not answer in time: the one failure that opens the breaker.
    fn is_slow(&self) -> bool {
        matches!(self, MasError::Timeout(_))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Introspection calls by outcome, and their latency.
#[derive(Debug, Clone)]
pub struct MasMetrics {
    pub calls: Family<OutcomeLabels, Counter>,
    pub duration: Histogram,
}

pub struct MasClient {
    http: reqwest::Client,
    url: String,
    bearer: HeaderValue,
    timeout: Duration,
    cache: moka::future::Cache<String, Arc<Introspection>>,
    breaker: Breaker,
    pub metrics: MasMetrics,
}

impl std::fmt::Debug for MasClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasClient").field("url", &self.url).finish_non_exhaustive()
    }
}

impl MasClient {
    /// The client when `matrix_authentication_service` is enabled. Nothing
    /// is sent at start-up: the service starts while MAS is down.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Self>> {
        let Some(mas) = &config.synapse.mas else { return Ok(None) };
        let w = &config.worker;
        let timeout = Duration::from_millis(w.mas_timeout_ms);
        let mut http = reqwest::Client::builder()
            .user_agent(crate::federation::USER_AGENT)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none());
        if mas.force_http2 {
            http = http.http2_prior_knowledge();
        }
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", mas.secret))
            .map_err(|_| anyhow::anyhow!("matrix_authentication_service.secret cannot be sent in an HTTP header"))?;
        bearer.set_sensitive(true);
        Ok(Some(Self {
            http: http.build()?,
            url: mas.introspection_url(),
            bearer,
            timeout,
            cache: moka::future::Cache::builder()
                .name("mas_introspection")
                .max_capacity(w.token_cache_max_entries)
                .time_to_live(INTROSPECTION_CACHE_TTL)
                .build(),
            breaker: Breaker::new(Duration::from_millis(w.mas_breaker_ms)),
            metrics: MasMetrics { calls: Family::default(), duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)) },
        }))
    }

    /// MAS's answer for `token`: kept, shared with a call in flight for
    /// the same token, or asked for now.
    pub async fn introspect(&self, token: &str) -> Result<Arc<Introspection>, Arc<MasError>> {
        self.cache.try_get_with_by_ref(token, self.call(token)).await
    }

    /// Drops the kept answer (its device is gone: the next request asks).
    pub async fn forget(&self, token: &str) {
        self.cache.invalidate(token).await;
    }

    /// Whether calls are being refused because MAS could not be reached.
    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Answers kept.
    pub fn cached_answers(&self) -> u64 {
        self.cache.entry_count()
    }

    async fn call(&self, token: &str) -> Result<Arc<Introspection>, MasError> {
        if !self.breaker.allow() {
            self.count(MasError::BreakerOpen.outcome());
            return Err(MasError::BreakerOpen);
        }
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.exchange(token)).await {
            Ok(r) => r,
            Err(_) => Err(MasError::Timeout(self.timeout)),
        };
        self.metrics.duration.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => {
                self.breaker.answered();
                self.count("valid");
            }
            Err(e) => {
                self.count(e.outcome());
                if !e.is_slow() {
                    self.breaker.answered();
                    tracing::warn!(error = %e, "token introspection failed");
                } else if self.breaker.timed_out() {
                    tracing::warn!(error = %e, "token introspection timed out; until MAS answers, one call per {:?} tries it and the others are refused", self.breaker.probe_every());
                }
            }
        }
        result.map(Arc::new)
    }

    /// Synapse's request: a form with the token and its type hint, the
    /// shared secret as bearer token, and `X-MAS-Supports-Device-Id`.
    async fn exchange(&self, token: &str) -> Result<Introspection, MasError> {
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("token_type_hint", "access_token")
            .finish();
        let mut resp = self
            .http
            .post(&self.url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, self.bearer.clone())
            .header("X-MAS-Supports-Device-Id", "1")
            .body(form)
            .send()
            .await
            .map_err(|e| self.send_failed(e))?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.send_failed(e))? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(MasError::Invalid(format!("answer larger than {MAX_RESPONSE_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(MasError::Status(status.as_u16()));
        }
        Introspection::parse(&body, crate::now_ms()).map_err(MasError::Invalid)
    }

    /// A failed exchange: slow when it ran out of time (connecting
    /// included), else fast.
    fn send_failed(&self, e: reqwest::Error) -> MasError {
        if e.is_timeout() { MasError::Timeout(self.timeout) } else { MasError::Unreachable(without_url(e)) }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics.calls.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// reqwest's error text without the URL (ours only, but kept short).
fn without_url(e: reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    std::iter::once(e.without_url().to_string()).chain(causes).collect::<Vec<_>>().join(": ")
}
