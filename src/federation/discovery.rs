//! Server discovery, as the server-server spec orders it: an IP literal or
//! an explicit port is used as is; otherwise `/.well-known/matrix/server`,
//! then SRV `_matrix-fed._tcp` (and the older `_matrix._tcp`), then port
//! 8448. Results are cached.
//!
//! A [`Target`] says where to send requests: the URL authority (whose host
//! is also the TLS name), the `Host` header, and, after an SRV lookup, the
//! name whose addresses stand in for the URL host (see [`super::dns`]).

use std::time::Duration;

use moka::future::Cache;

use super::dns::{Dns, split_host_port};

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// `host:port` for the request URL; `host` is also the TLS server name.
    pub authority: String,
    /// The `Host` header to send.
    pub host_header: String,
    /// After an SRV lookup: connect to this host's addresses instead of
    /// resolving the URL host.
    pub connect_via: Option<String>,
}

impl Target {
    fn direct(host: &str, port: u16, host_header: String) -> Self {
        Self { authority: format!("{}:{port}", bracket(host)), host_header, connect_via: None }
    }
}

/// IPv6 literals go in brackets in a URL authority.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() }
}

/// Fetches `https://<host>/.well-known/matrix/server` and returns its
/// `m.server`, if any. Injected so discovery can be tested without network.
pub trait WellKnown: Send + Sync {
    fn fetch(&self, host: &str) -> futures::future::BoxFuture<'_, Option<String>>;
}

pub struct Discovery {
    dns: Dns,
    well_known: Box<dyn WellKnown>,
    cache: Cache<String, Target>,
}

impl Discovery {
    pub fn new(dns: Dns, well_known: Box<dyn WellKnown>, ttl: Duration) -> Self {
        Self { dns, well_known, cache: Cache::builder().max_capacity(10_000).time_to_live(ttl).build() }
    }

    pub async fn resolve(&self, server_name: &str) -> Target {
        self.cache.get_with_by_ref(server_name, self.discover(server_name)).await
    }

    async fn discover(&self, server_name: &str) -> Target {
        let (host, port) = split_host_port(server_name);
        if let Some(port) = port {
            return Target::direct(host, port, server_name.to_owned());
        }
        if is_ip_literal(host) {
            return Target::direct(host, 8448, server_name.to_owned());
        }
        if let Some(delegated) = self.well_known.fetch(host).await {
            let (dhost, dport) = split_host_port(&delegated);
            if let Some(dport) = dport {
                return Target::direct(dhost, dport, delegated.clone());
            }
            if is_ip_literal(dhost) {
                return Target::direct(dhost, 8448, delegated.clone());
            }
            return self.srv_or_default(dhost, delegated.clone()).await;
        }
        self.srv_or_default(host, server_name.to_owned()).await
    }

    async fn srv_or_default(&self, host: &str, host_header: String) -> Target {
        for prefix in ["_matrix-fed._tcp", "_matrix._tcp"] {
            if let Some((target, port)) = self.dns.srv(&format!("{prefix}.{host}")).await {
                return Target { authority: format!("{host}:{port}"), host_header, connect_via: Some(target) };
            }
        }
        Target::direct(host, 8448, host_header)
    }
}

fn is_ip_literal(host: &str) -> bool {
    host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FixedWellKnown(HashMap<&'static str, &'static str>);
    impl WellKnown for FixedWellKnown {
        fn fetch(&self, host: &str) -> futures::future::BoxFuture<'_, Option<String>> {
            let answer = self.0.get(host).map(|s| s.to_string());
            Box::pin(async move { answer })
        }
    }

    fn discovery(well_known: &[(&'static str, &'static str)], srv: &[(&str, &str, u16)]) -> Discovery {
        let dns = Dns::fixed(srv.iter().map(|(n, t, p)| (n.to_string(), (t.to_string(), *p))).collect());
        Discovery::new(dns, Box::new(FixedWellKnown(well_known.iter().copied().collect())), Duration::from_secs(60))
    }

    fn t(authority: &str, host: &str, via: Option<&str>) -> Target {
        Target { authority: authority.into(), host_header: host.into(), connect_via: via.map(String::from) }
    }

    #[tokio::test]
    async fn literal_and_explicit_port() {
        let d = discovery(&[("example.org", "elsewhere.org")], &[]);
        assert_eq!(d.resolve("1.2.3.4").await, t("1.2.3.4:8448", "1.2.3.4", None));
        assert_eq!(d.resolve("[::1]:99").await, t("[::1]:99", "[::1]:99", None));
        assert_eq!(d.resolve("[2001:db8::1]").await, t("[2001:db8::1]:8448", "[2001:db8::1]", None));
        assert_eq!(d.resolve("example.org:1234").await, t("example.org:1234", "example.org:1234", None));
    }

    #[tokio::test]
    async fn well_known_then_srv_then_8448() {
        let d = discovery(
            &[("a.org", "deleg.org:443"), ("b.org", "deleg.net"), ("c.org", "9.9.9.9")],
            &[("_matrix-fed._tcp.deleg.net", "srv.deleg.net", 8449), ("_matrix._tcp.d.org", "old.d.org", 8450)],
        );
        assert_eq!(d.resolve("a.org").await, t("deleg.org:443", "deleg.org:443", None));
        assert_eq!(d.resolve("b.org").await, t("deleg.net:8449", "deleg.net", Some("srv.deleg.net")));
        assert_eq!(d.resolve("c.org").await, t("9.9.9.9:8448", "9.9.9.9", None));
        assert_eq!(d.resolve("d.org").await, t("d.org:8450", "d.org", Some("old.d.org")));
        assert_eq!(d.resolve("e.org").await, t("e.org:8448", "e.org", None));
    }
}
