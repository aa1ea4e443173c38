//! Which addresses we may connect to: Synapse's `ip_range_blocklist`
//! (default: private, loopback, link-local and other special ranges) minus
//! `ip_range_whitelist`. Destinations come from user input, so this is what
//! stops a query from reaching into the operator's network.

use std::net::IpAddr;

use ipnet::IpNet;

/// Synapse's `DEFAULT_IP_RANGE_BLOCKLIST`.
pub const DEFAULT_BLOCKLIST: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
];

#[derive(Debug, Clone)]
pub struct IpFilter {
    blocked: Vec<IpNet>,
    allowed: Vec<IpNet>,
}

impl IpFilter {
    /// `blocklist: None` means Synapse's default list. Entries may be
    /// networks or single addresses.
    pub fn new(blocklist: Option<&[String]>, whitelist: &[String]) -> anyhow::Result<Self> {
        let blocked = match blocklist {
            Some(list) => parse_all(list.iter().map(String::as_str))?,
            None => parse_all(DEFAULT_BLOCKLIST.iter().copied())?,
        };
        Ok(Self { blocked, allowed: parse_all(whitelist.iter().map(String::as_str))? })
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4 address in IPv6 clothing is judged as IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        // Unspecified addresses (0.0.0.0, ::) reach the local host.
        if ip.is_unspecified() {
            return self.allowed.iter().any(|n| n.contains(&ip));
        }
        !self.blocked.iter().any(|n| n.contains(&ip)) || self.allowed.iter().any(|n| n.contains(&ip))
    }
}

impl IpFilter {
    /// For a host given as an IP literal (a server name, a well-known
    /// answer, a redirect): Synapse's `BlocklistingAgentWrapper` checks
    /// those against the blocklist alone, so the whitelist does not open
    /// them (and 0.0.0.0 and :: are always blocked).
    pub fn allows_literal(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        !ip.is_unspecified() && !self.blocked.iter().any(|n| n.contains(&ip))
    }
}

fn parse_all<'a>(items: impl Iterator<Item = &'a str>) -> anyhow::Result<Vec<IpNet>> {
    items
        .map(|s| {
            s.parse::<IpNet>().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)).map_err(|_| anyhow::anyhow!("`{s}` is not an IP range"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_blocks_loopback_and_private() {
        let f = IpFilter::new(None, &[]).unwrap();
        for blocked in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::", "fe80::1"] {
            assert!(!f.allows(ip(blocked)), "{blocked}");
        }
        assert!(f.allows(ip("2606:4700::1111")));
    }

    #[test]
    fn whitelist_wins_and_custom_lists() {
        let f = IpFilter::new(None, &["127.0.0.2".into()]).unwrap();
        assert!(f.allows(ip("127.0.0.2")));
        assert!(!f.allows(ip("127.0.0.1")));
        let f = IpFilter::new(Some(&["10.0.0.0/8".to_string()]), &[]).unwrap();
        assert!(f.allows(ip("127.0.0.1")));
        assert!(IpFilter::new(Some(&["nonsense".to_string()]), &[]).is_err());
    }

    #[test]
    fn literals_ignore_the_whitelist() {
        let f = IpFilter::new(None, &["127.0.0.1".into(), "0.0.0.0".into()]).unwrap();
        assert!(f.allows(ip("127.0.0.1")) && !f.allows_literal(ip("127.0.0.1")));
        assert!(!f.allows_literal(ip("::ffff:127.0.0.1")) && !f.allows_literal(ip("0.0.0.0")));
        assert!(f.allows_literal(ip("2606:4700::1111")));
        let f = IpFilter::new(Some(&["10.0.0.0/8".to_string()]), &[]).unwrap();
        assert!(f.allows_literal(ip("127.0.0.1")) && !f.allows_literal(ip("10.1.2.3")) && !f.allows_literal(ip("::")));
    }
}
