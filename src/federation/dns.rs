//! Name resolution for federation, all through hickory with the system's
//! resolver configuration and hosts file (no blocking `getaddrinfo`
//! threads): SRV lookups, and the address resolver reqwest uses, which
//! applies the IP filter to every address and follows SRV targets. Names under
//! `.invalid` never resolve and cause no DNS traffic (RFC 6761).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::ip_filter::IpFilter;

/// `host[:port]` → (host without IPv6 brackets, port).
pub fn split_host_port(server_name: &str) -> (&str, Option<u16>) {
    if let Some(rest) = server_name.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (server_name, None),
        };
    }
    match server_name.rsplit_once(':') {
        Some((host, port)) => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (server_name, None),
        },
        None => (server_name, None),
    }
}

fn is_invalid_tld(name: &str) -> bool {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    n == "invalid" || n.ends_with(".invalid")
}

/// SRV and address lookups.
#[derive(Clone)]
pub enum Dns {
    System(Option<Arc<TokioResolver>>),
    /// For tests: name → (target, port).
    Fixed(Arc<HashMap<String, (String, u16)>>),
    /// For tests: name → addresses.
    #[cfg(test)]
    Addresses(Arc<HashMap<String, Vec<IpAddr>>>),
}

impl Dns {
    /// The system's resolver configuration; without one, SRV lookups are
    /// skipped (never a public resolver as a fallback).
    pub fn system() -> Self {
        match TokioResolver::builder_tokio() {
            Ok(b) => Dns::System(b.build().ok().map(Arc::new)),
            Err(e) => {
                tracing::warn!(error = %e, "no system DNS configuration; SRV discovery disabled");
                Dns::System(None)
            }
        }
    }

    pub fn fixed(map: HashMap<String, (String, u16)>) -> Self {
        Dns::Fixed(Arc::new(map))
    }

    /// The best SRV record of `name` (lowest priority, then highest weight).
    pub async fn srv(&self, name: &str) -> Option<(String, u16)> {
        if is_invalid_tld(name) {
            return None;
        }
        match self {
            Dns::Fixed(map) => map.get(name).cloned(),
            #[cfg(test)]
            Dns::Addresses(_) => None,
            Dns::System(None) => None,
            Dns::System(Some(r)) => {
                let lookup = r.srv_lookup(name).await.ok()?;
                lookup
                    .answers()
                    .iter()
                    .filter_map(|rec| match &rec.data {
                        RData::SRV(srv) => Some(srv.clone()),
                        _ => None,
                    })
                    .min_by_key(|s| (s.priority, std::cmp::Reverse(s.weight)))
                    .map(|s| (s.target.to_utf8().trim_end_matches('.').to_owned(), s.port))
            }
        }
    }
}

impl Dns {
    /// The addresses of `name` (an IP literal is its own address).
    pub async fn addresses(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        match self {
            Dns::System(Some(r)) => r.lookup_ip(name).await.map(|found| found.iter().collect()).map_err(|e| e.to_string()),
            Dns::System(None) => Err("no system DNS configuration".into()),
            Dns::Fixed(_) => Err(format!("no address for {name} in a fixed table")),
            #[cfg(test)]
            Dns::Addresses(map) => Ok(map.get(name).cloned().unwrap_or_default()),
        }
    }
}

/// Most SRV substitutions remembered at once.
const MAX_SUBSTITUTIONS: u64 = 10_000;

/// reqwest's resolver: follows SRV substitutions, refuses `.invalid`, and
/// drops every address the IP filter does not allow.
#[derive(Clone)]
pub struct FilteringResolver {
    filter: Arc<IpFilter>,
    dns: Dns,
    /// SRV substitutions (host → target), set just before each request, so
    /// bounded in number (least recently set go first) and age.
    via: moka::sync::Cache<String, String>,
}

impl FilteringResolver {
    /// `ttl`: how long a substitution is kept (the discovery cache's TTL).
    pub fn new(filter: Arc<IpFilter>, ttl: Duration, dns: Dns) -> Self {
        let via = moka::sync::Cache::builder()
            .max_capacity(MAX_SUBSTITUTIONS)
            .time_to_live(ttl.max(Duration::from_secs(1)))
            // A substitution just set must be there when the connection
            // resolves: admit every new one.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        Self { filter, dns, via }
    }

    /// From now on, connections to `host` go to the addresses of `target`.
    pub fn connect_via(&self, host: &str, target: &str) {
        self.via.insert(host.to_owned(), target.to_owned());
    }

    /// Substitutions remembered.
    pub fn substitutions(&self) -> u64 {
        self.via.run_pending_tasks();
        self.via.entry_count()
    }

    pub fn filter(&self) -> &Arc<IpFilter> {
        &self.filter
    }
}

/// A name that gave no address we may connect to, worded as Twisted's
/// `DNSLookupError` of a `HostnameEndpoint` whose resolver found nothing:
/// Synapse's words for every failed lookup (its resolver drops errors)
/// and for a name its IP filter refused.
#[derive(Debug, thiserror::Error)]
#[error("DNS lookup failed: no results for hostname lookup: {name}.")]
pub struct ResolveError {
    pub name: String,
}

impl ResolveError {
    fn new(name: String, why: &str) -> Box<Self> {
        tracing::debug!(%name, why, "no address to connect to");
        Box::new(Self { name })
    }
}

impl Resolve for FilteringResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let lookup = this.via.get(&host).unwrap_or_else(|| host.clone());
            if is_invalid_tld(&lookup) {
                return Err(ResolveError::new(lookup, ".invalid") as _);
            }
            let found = match this.dns.addresses(&lookup).await {
                Ok(found) if !found.is_empty() => found,
                Ok(_) => return Err(ResolveError::new(lookup, "no address") as _),
                Err(e) => return Err(ResolveError::new(lookup, &e) as _),
            };
            // One blocked address refuses the name, as Synapse's
            // `_IPBlockingResolver` does (it cannot fail the request from
            // there, so it reports no results at all).
            if found.iter().any(|ip| !this.filter.allows(*ip)) {
                return Err(ResolveError::new(lookup, "an address is blocked by ip_range_blacklist") as _);
            }
            Ok(Box::new(found.into_iter().map(|ip| SocketAddr::new(ip, 0))) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("a.org"), ("a.org", None));
        assert_eq!(split_host_port("a.org:8448"), ("a.org", Some(8448)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_host_port("1.2.3.4:5"), ("1.2.3.4", Some(5)));
        assert_eq!(split_host_port("a.org:x"), ("a.org:x", None));
    }

    #[tokio::test]
    async fn invalid_names_and_blocked_addresses_do_not_resolve() {
        let r = FilteringResolver::new(Arc::new(IpFilter::new(None, &[]).unwrap()), Duration::from_secs(60), Dns::system());
        let err = r.resolve("remote.invalid".parse().unwrap()).await.err().unwrap();
        assert_eq!(err.to_string(), "DNS lookup failed: no results for hostname lookup: remote.invalid.");
        // localhost resolves to loopback, which the default list blocks.
        let err = r.resolve("localhost".parse().unwrap()).await.err().unwrap();
        assert_eq!(err.to_string(), "DNS lookup failed: no results for hostname lookup: localhost.");
        let open = FilteringResolver::new(
            Arc::new(IpFilter::new(None, &["127.0.0.0/8".into(), "::1".into()]).unwrap()),
            Duration::from_secs(60),
            Dns::system(),
        );
        let addrs: Vec<_> = open.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
        assert_eq!(Dns::system().srv("_matrix-fed._tcp.x.invalid").await, None);
        // An SRV target, named or an IP literal, is filtered like any host.
        for target in ["localhost", "127.0.0.1", "::1"] {
            r.connect_via("srv.invalid", target);
            let err = r.resolve("srv.invalid".parse().unwrap()).await.err().unwrap();
            assert_eq!(err.to_string(), format!("DNS lookup failed: no results for hostname lookup: {target}."));
        }
    }

    /// `localhost` is 127.0.0.1 and ::1 to our resolver (RFC 6761), whatever
    /// the hosts file says; Synapse's resolver reads the hosts file
    /// (docs/compatibility.md).
    #[tokio::test]
    async fn localhost_is_both_loopbacks() {
        let mut found = Dns::system().addresses("localhost").await.unwrap();
        found.sort();
        found.dedup();
        assert_eq!(found, ["127.0.0.1".parse::<IpAddr>().unwrap(), "::1".parse().unwrap()]);
    }

    /// A name with an allowed and a blocked address is refused whole, as
    /// Synapse refuses it; with allowed addresses only, all are used.
    #[tokio::test]
    async fn one_blocked_address_refuses_the_name() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let table = [("both.test", vec![ip("127.0.0.1"), ip("::1")]), ("v4.test", vec![ip("127.0.0.1"), ip("127.0.0.1")])];
        let dns = Dns::Addresses(Arc::new(table.into_iter().map(|(n, a)| (n.to_owned(), a)).collect()));
        let r = FilteringResolver::new(Arc::new(IpFilter::new(None, &["127.0.0.1".into()]).unwrap()), Duration::from_secs(60), dns);
        let err = r.resolve("both.test".parse().unwrap()).await.err().unwrap();
        assert_eq!(err.to_string(), "DNS lookup failed: no results for hostname lookup: both.test.");
        assert_eq!(r.resolve("v4.test".parse().unwrap()).await.unwrap().count(), 2);
        let err = r.resolve("none.test".parse().unwrap()).await.err().unwrap();
        assert_eq!(err.to_string(), "DNS lookup failed: no results for hostname lookup: none.test.");
    }

    #[test]
    fn substitutions_are_bounded() {
        let r = FilteringResolver::new(Arc::new(IpFilter::new(None, &[]).unwrap()), Duration::from_secs(60), Dns::system());
        for i in 0..(MAX_SUBSTITUTIONS + 500) {
            r.connect_via(&format!("h{i}.invalid"), "t.invalid");
        }
        assert!(r.substitutions() <= MAX_SUBSTITUTIONS);
        assert_eq!(r.via.get("h0.invalid"), None, "the oldest went first");
        let last = format!("h{}.invalid", MAX_SUBSTITUTIONS + 499);
        assert_eq!(r.via.get(&last).as_deref(), Some("t.invalid"), "the newest is kept");
    }
}
