//! The federation client, used only when the device-lists writer cannot be
//! reached (and for users Synapse itself would query directly): signed
//! requests to remote homeservers, with discovery, the IP filter, backoff,
//! response caps and timeouts.

pub mod backoff;
pub mod discovery;
pub mod dns;
mod failure;
pub mod ip_filter;
mod proxy;
pub mod signing;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, Method, header};
use futures::future::BoxFuture;
use serde_json::Value;

pub use failure::FedError;

use self::backoff::Backoff;
use self::discovery::{Discovery, WellKnown};
use self::dns::{Dns, FilteringResolver, split_host_port};
use self::ip_filter::IpFilter;
use self::proxy::FederationProxy;
use self::signing::RequestSigner;
use self::tls::TlsClients;
use crate::config::Config;

pub const USER_AGENT: &str = concat!("synapse-keys-worker/", env!("CARGO_PKG_VERSION"));

pub struct FederationClient {
    signer: Option<RequestSigner>,
    http: TlsClients,
    /// Outbound federation settings (the domain whitelist is checked here).
    settings: crate::config::federation::FederationSettings,
    /// `outbound_federation_restricted_to`: requests go through these.
    proxy: Option<FederationProxy>,
    resolver: FilteringResolver,
    discovery: Discovery,
    backoff: Backoff,
    max_response_bytes: usize,
}

impl std::fmt::Debug for FederationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationClient").field("signer", &self.signer).finish_non_exhaustive()
    }
}

impl FederationClient {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let s = &config.synapse;
        let w = &config.worker;
        // Without a key, direct federation is off (said at start-up).
        let signer = match &s.signing_key_path {
            Some(path) => Some(RequestSigner::from_file(&s.server_name, path)?),
            None => None,
        };
        let f = &s.federation;
        let filter = Arc::new(IpFilter::new(f.ip_range_blocklist.as_deref(), &f.ip_range_whitelist)?);
        let dns = Dns::system();
        let resolver = FilteringResolver::new(filter, Duration::from_millis(w.discovery_cache_ttl_ms), dns.clone());
        let build = |redirects: &dyn Fn() -> reqwest::redirect::Policy| {
            TlsClients::build(f, || {
                reqwest::Client::builder()
                    .user_agent(USER_AGENT)
                    .dns_resolver(Arc::new(resolver.clone()))
                    .redirect(redirects())
                    .connect_timeout(Duration::from_millis(w.federation_connect_timeout_ms))
                    .pool_idle_timeout(Duration::from_secs(60))
            })
        };
        let http = build(&reqwest::redirect::Policy::none)?;
        let hops_filter = Arc::clone(resolver.filter());
        let well_known = HttpWellKnown { http: build(&|| checked_redirects(Arc::clone(&hops_filter), 5))?, filter: resolver.clone() };
        let discovery = Discovery::new(dns, Box::new(well_known), Duration::from_millis(w.discovery_cache_ttl_ms));
        Ok(Self {
            signer,
            http,
            settings: f.clone(),
            proxy: FederationProxy::new(&f.proxy_locations, s.worker_replication_secret.as_deref())?,
            resolver,
            discovery,
            backoff: Backoff::new(
                Duration::from_millis(w.federation_backoff_initial_ms),
                Duration::from_millis(w.federation_backoff_max_ms),
            ),
            max_response_bytes: w.federation_max_response_bytes,
        })
    }

    /// Destinations we are backing off from now.
    pub fn destinations_backing_off(&self) -> usize {
        self.backoff.count()
    }

    /// Destinations whose failures are remembered (at most 10,000).
    pub fn destinations_remembered(&self) -> u64 {
        self.backoff.remembered()
    }

    /// Forgets `destination`'s failures, as a success would.
    pub fn forget_failures(&self, destination: &str) {
        self.backoff.record_success(destination);
    }

    /// Whether `federation_domain_whitelist` lets us (and Synapse) talk to
    /// `destination`.
    pub fn is_domain_allowed(&self, destination: &str) -> bool {
        self.settings.is_domain_allowed(destination)
    }

    /// The failure that made us back off from `destination`, while we do.
    pub fn backing_off(&self, destination: &str) -> Option<FedError> {
        self.backoff.in_backoff(destination)
    }

    /// `GET /_matrix/federation/v1/user/devices/{userId}`.
    pub async fn user_devices(&self, destination: &str, user_id: &str, timeout: Duration) -> Result<Value, FedError> {
        let path = format!("/_matrix/federation/v1/user/devices/{}", percent_encode(user_id));
        self.request(Method::GET, destination, &path, None, timeout, None).await
    }

    /// `POST /_matrix/federation/v1/user/keys/query`, waiting `timeout` (as
    /// Synapse does) but never past `deadline`.
    pub async fn user_keys_query(
        &self,
        destination: &str,
        device_keys: &Value,
        timeout: Duration,
        deadline: std::time::Instant,
    ) -> Result<Value, FedError> {
        let body = serde_json::json!({ "device_keys": device_keys });
        self.request(Method::POST, destination, "/_matrix/federation/v1/user/keys/query", Some(&body), timeout, Some(deadline)).await
    }

    /// One request, waiting `timeout` but never past `deadline`. A timeout
    /// is worded with `timeout`, the figure Synapse names, also when the
    /// deadline cut the wait short, and also in the failure kept for the
    /// backoff.
    async fn request(
        &self,
        method: Method,
        destination: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        deadline: Option<std::time::Instant>,
    ) -> Result<Value, FedError> {
        // Checked before the backoff, as Synapse does: never counted as a
        // failure of the destination.
        if !self.settings.is_domain_allowed(destination) {
            return Err(FedError::Denied(destination.to_owned()));
        }
        if let Some(first) = self.backoff.in_backoff(destination) {
            return Err(FedError::BackingOff(Box::new(first)));
        }
        let bound = deadline.map_or(timeout, |d| timeout.min(d.saturating_duration_since(std::time::Instant::now())));
        let result = tokio::time::timeout(bound, self.send(method, destination, path, body)).await;
        // Ours or the HTTP client's (connecting): worded the same.
        let result = result.unwrap_or_else(|_| Err(FedError::timed_out(timeout)));
        let result = result.map_err(|e| if e.is_timeout() { FedError::timed_out(timeout) } else { e });
        match &result {
            Ok(_) => self.backoff.record_success(destination),
            Err(e) if e.backs_off() => self.backoff.record_failure(destination, e),
            Err(_) => {}
        }
        result
    }

    async fn send(&self, method: Method, destination: &str, path: &str, body: Option<&Value>) -> Result<Value, FedError> {
        let signer = self.signer.as_ref().ok_or(FedError::Disabled)?;
        let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON serialises"));
        let auth = signer.authorization(&method, path, destination, bytes.as_deref()).map_err(|e| FedError::Transport(e.to_string()))?;
        if let Some(proxy) = &self.proxy {
            // IP literals are refused before the proxy, as Synapse's
            // `BlocklistingAgentWrapper` around its `ProxyAgent` does.
            self.check_literal(split_host_port(destination).0)?;
            let resp = proxy.send(method, destination, path, auth, bytes, self.max_response_bytes).await?;
            return parse_answer(resp.status, &resp.body);
        }
        let target = self.discovery.resolve(destination).await;
        let (host, _) = split_host_port(&target.authority);
        self.check_literal(host)?;
        if let Some(via) = &target.connect_via {
            self.resolver.connect_via(host, via);
        }
        let host_header = HeaderValue::from_str(&target.host_header).map_err(|e| FedError::Transport(e.to_string()))?;
        let mut req = self
            .http
            .for_host(host)
            .request(method, format!("https://{}{path}", target.authority))
            .header(header::AUTHORIZATION, auth)
            .header(header::HOST, host_header);
        if let Some(b) = bytes {
            req = req.header(header::CONTENT_TYPE, "application/json").body(b);
        }
        let resp = req.send().await.map_err(FedError::from_reqwest)?;
        let status = resp.status();
        let body = read_capped(resp, self.max_response_bytes).await?;
        parse_answer(status, &body)
    }

    /// An IP-literal host must pass the blocklist (the whitelist does not
    /// count for literals), refused as Synapse's `BlocklistingAgentWrapper`
    /// refuses it: a `SynapseError` inside `RequestSendFailed`, which
    /// backs off.
    fn check_literal(&self, host: &str) -> Result<(), FedError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) if !self.resolver.filter().allows_literal(ip) => {
                Err(FedError::Transport("SynapseError: 403: IP address blocked".into()))
            }
            _ => Ok(()),
        }
    }
}

/// A remote's answer: its JSON, or the failure its status means.
pub(crate) fn parse_answer(status: reqwest::StatusCode, body: &[u8]) -> Result<Value, FedError> {
    if !status.is_success() {
        return Err(FedError::http(status, body));
    }
    serde_json::from_slice(body).map_err(|e| FedError::BadResponse(format!("invalid JSON: {e}")))
}

async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, FedError> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(FedError::BadResponse(format!("response larger than {cap} bytes")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(FedError::from_reqwest)? {
        if body.len() + chunk.len() > cap {
            return Err(FedError::BadResponse(format!("response larger than {cap} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What Python's `urllib.parse.quote(s, safe="")` leaves as it is.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'_').remove(b'.').remove(b'-').remove(b'~');

/// Python's `urllib.parse.quote(s, safe="")`, as Synapse encodes path args.
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Redirects followed at most `max` times, each hop checked: a host name is
/// resolved through the filtering resolver (which drops blocked addresses),
/// but an IP literal is connected to without resolving, so it is checked
/// here, against the blocklist alone as Synapse checks literals.
fn checked_redirects(filter: Arc<IpFilter>, max: usize) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > max {
            return attempt.error(format!("more than {max} redirects"));
        }
        match blocked_literal(&filter, attempt.url()) {
            Some(ip) => attempt.error(format!("redirect to {ip}, blocked by ip_range_blocklist")),
            None => attempt.follow(),
        }
    })
}

/// The URL's host, if it is an IP literal the filter refuses.
fn blocked_literal(filter: &IpFilter, url: &url::Url) -> Option<std::net::IpAddr> {
    let ip = match url.host()? {
        url::Host::Ipv4(v4) => std::net::IpAddr::V4(v4),
        url::Host::Ipv6(v6) => std::net::IpAddr::V6(v6),
        url::Host::Domain(_) => return None,
    };
    (!filter.allows_literal(ip)).then_some(ip)
}

/// `/.well-known/matrix/server` over HTTPS, size-capped, through the same
/// filtering resolver, redirects checked hop by hop.
struct HttpWellKnown {
    http: TlsClients,
    filter: FilteringResolver,
}

impl WellKnown for HttpWellKnown {
    fn fetch(&self, host: &str) -> BoxFuture<'_, Option<String>> {
        let host = host.to_owned();
        Box::pin(async move {
            if host.parse::<std::net::IpAddr>().is_ok_and(|ip| !self.filter.filter().allows_literal(ip)) {
                return None;
            }
            let fut = self.http.for_host(&host).get(format!("https://{host}/.well-known/matrix/server")).send();
            let resp = tokio::time::timeout(Duration::from_secs(10), fut).await.ok()?.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = read_capped(resp, 50 * 1024).await.ok()?;
            let v: Value = serde_json::from_slice(&body).ok()?;
            let server = v.get("m.server")?.as_str()?.to_owned();
            crate::ids::is_valid_server_name(&server).then_some(server)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on 127.0.0.1 (allowed for this test) redirecting to
    /// 127.0.0.2 (blocked): the hop is refused before any connection to
    /// 127.0.0.2; an allowed hop is followed. Hops are IP literals, so
    /// only the blocklist counts.
    #[tokio::test]
    async fn every_redirect_hop_is_checked() {
        let target = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let target_port = target.local_addr().unwrap().port();
        let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&reached);
        tokio::spawn(async move {
            let app = axum::Router::new().fallback(move || {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { "{}" }
            });
            axum::serve(target, app).await
        });
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_port = origin.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route(
                "/blocked",
                axum::routing::get(
                    move || async move { axum::response::Redirect::temporary(&format!("http://127.0.0.2:{target_port}/x")) },
                ),
            )
            .route("/loop", axum::routing::get(|| async { axum::response::Redirect::temporary("/loop") }))
            .route("/ok", axum::routing::get(|| async { axum::response::Redirect::temporary("/done") }))
            .route("/done", axum::routing::get(|| async { "done" }));
        tokio::spawn(async move { axum::serve(origin, app).await });

        let filter = Arc::new(IpFilter::new(Some(&["127.0.0.2".into()]), &[]).unwrap());
        let client = reqwest::Client::builder().redirect(checked_redirects(filter, 5)).build().unwrap();
        let get = |path: &str| client.get(format!("http://127.0.0.1:{origin_port}{path}")).send();
        let err = get("/blocked").await.unwrap_err();
        assert!(format!("{err:?}").contains("blocked by ip_range_blocklist"), "{err:?}");
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0, "the blocked address was never contacted");
        let err = get("/loop").await.unwrap_err();
        assert!(format!("{err:?}").contains("more than 5 redirects"), "{err:?}");
        assert_eq!(get("/ok").await.unwrap().text().await.unwrap(), "done");
    }

    #[test]
    fn percent_encoding_like_python_quote() {
        assert_eq!(percent_encode("@alice:remote.org"), "%40alice%3Aremote.org");
        assert_eq!(percent_encode("@a_b.c-d~:h/x"), "%40a_b.c-d~%3Ah%2Fx");
    }
}
