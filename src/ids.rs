//! Matrix user IDs, validated the way Synapse's `UserID.is_valid` does.
//!
//! Synapse is deliberately lax here (an empty localpart is accepted), and
//! `/keys/query` silently drops what it rejects, so the exact rule matters:
//! a stricter parser (ruma's) would drop IDs Synapse answers for.

use std::net::Ipv6Addr;

/// `@localpart:domain` where the domain passes Synapse's
/// `parse_and_validate_server_name`.
pub fn is_valid_user_id(s: &str) -> bool {
    match s.strip_prefix('@').and_then(|rest| rest.split_once(':')) {
        Some((_localpart, domain)) => is_valid_server_name(domain),
        None => false,
    }
}

/// The domain part of a user ID (everything after the first `:`).
pub fn domain_of(user_id: &str) -> &str {
    user_id.split_once(':').map_or("", |(_, d)| d)
}

/// Synapse's `parse_and_validate_server_name`: `host[:port]`, the host being
/// a bracketed IPv6 literal or dot-separated `[0-9a-zA-Z-]+` labels.
pub fn is_valid_server_name(server_name: &str) -> bool {
    let host = if server_name.ends_with(']') {
        server_name
    } else {
        match server_name.rsplit_once(':') {
            Some((host, port)) => {
                if parse_python_int(port).is_none() {
                    return false;
                }
                host
            }
            None => server_name,
        }
    };
    if let Some(inner) = host.strip_prefix('[') {
        return match inner.strip_suffix(']') {
            Some(addr) => !addr.is_empty() && addr.parse::<Ipv6Addr>().is_ok(),
            None => false,
        };
    }
    !host.is_empty() && host.split('.').all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Python's `int(str)` for the inputs that matter here: surrounding
/// whitespace, an optional sign, ASCII digits with single underscores
/// between them. Non-ASCII digits, which Python also accepts, are refused.
pub fn parse_python_int(s: &str) -> Option<i128> {
    let t = s.trim();
    let (negative, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return None;
    }
    let mut value: i128 = 0;
    for b in digits.bytes() {
        match b {
            b'0'..=b'9' => value = value.saturating_mul(10).saturating_add(i128::from(b - b'0')),
            b'_' => {}
            _ => return None,
        }
    }
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_as_synapse_judges_them() {
        for ok in ["@a:hs", "@:hs", "@a:hs.example.org:8448", "@a:[::1]", "@a:[::1]:80", "@A b:hs", "@a:1.2.3.4", "@a:hs: 80"] {
            assert!(is_valid_user_id(ok), "{ok} should be valid");
        }
        for bad in [
            "",
            "a:hs",
            "@a",
            "@a:",
            "@a:hs.",
            "@a:.hs",
            "@a:h_s",
            "@a:hs:x",
            "@a:b:c.d:8448",
            "@a:[::1",
            "@a:[]",
            "@a:[nope]",
            "#a:hs",
            "@a:hs:",
        ] {
            assert!(!is_valid_user_id(bad), "{bad} should be invalid");
        }
    }

    #[test]
    fn python_int() {
        assert_eq!(parse_python_int(" 42 "), Some(42));
        assert_eq!(parse_python_int("+1_000"), Some(1000));
        assert_eq!(parse_python_int("-5"), Some(-5));
        for bad in ["", "-", "1__0", "_1", "1_", "0x10", "1.5", "1e3"] {
            assert_eq!(parse_python_int(bad), None, "{bad}");
        }
    }

    #[test]
    fn domain() {
        assert_eq!(domain_of("@a:b:c"), "b:c");
        assert_eq!(domain_of("@a"), "");
    }
}
