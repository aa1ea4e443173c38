//! Guest access tokens. Synapse does not store them: a guest's token is a
//! macaroon (pymacaroons' binary v1 format, base64url) signed with the
//! homeserver's macaroon secret, with the caveats `gen = 1`,
//! `type = access`, `user_id = …`, `guest = true` (and optionally
//! `nonce = …`, `time < …`). This checks one the way Synapse's
//! `MacaroonGenerator.verify_guest_token` does and returns the user ID.

use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

#[derive(Debug, PartialEq)]
struct Macaroon {
    identifier: Vec<u8>,
    caveats: Vec<String>,
    signature: Vec<u8>,
}

/// The user ID of a valid, unexpired guest macaroon, else `None`.
pub fn verify_guest_token(token: &str, secret: &[u8], now_ms: i64) -> Option<String> {
    let m = parse(token)?;
    let user_id = m.caveats.iter().find_map(|c| c.strip_prefix("user_id = "))?.to_owned();
    if !m.caveats.iter().any(|c| c == "guest = true") {
        return None;
    }
    let satisfied = |c: &String| match c.as_str() {
        "gen = 1" | "type = access" | "guest = true" => true,
        c if c.starts_with("user_id = ") || c.starts_with("nonce = ") => true,
        c => c.strip_prefix("time < ").and_then(|t| t.trim().parse::<i64>().ok()).is_some_and(|expiry| now_ms < expiry),
    };
    if !m.caveats.iter().all(satisfied) {
        return None;
    }
    // Compared in constant time: how much of a forged signature matches
    // must not show in how long the check takes.
    last_mac(secret, &m.identifier, &m.caveats).verify_slice(&m.signature).is_ok().then_some(user_id)
}

fn hmac(key: &[u8], data: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac
}

/// pymacaroons' chain: HMAC(HMAC("macaroons-key-generator", secret), id),
/// then HMAC(previous, caveat) for each first-party caveat; the last HMAC,
/// not yet finalised, so its output can be checked in constant time.
fn last_mac(secret: &[u8], identifier: &[u8], caveats: &[String]) -> HmacSha256 {
    let derived = hmac(b"macaroons-key-generator", secret).finalize().into_bytes();
    caveats.iter().fold(hmac(&derived, identifier), |mac, c| hmac(&mac.finalize().into_bytes(), c.as_bytes()))
}

/// Python's lenient base64url: padding optional, stray trailing bits ignored.
const LENIENT_URL_SAFE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Binary v1: packets of a 4-hex-digit length, `key value` and a
/// terminator byte (pymacaroons drops it without looking at it).
fn parse(token: &str) -> Option<Macaroon> {
    let data = LENIENT_URL_SAFE.decode(token).ok()?;
    let (mut identifier, mut caveats, mut signature) = (None, Vec::new(), None);
    let mut rest = data.as_slice();
    while !rest.is_empty() {
        let size = usize::from_str_radix(std::str::from_utf8(rest.get(..4)?).ok()?, 16).ok()?;
        let packet = rest.get(4..size)?;
        rest = &rest[size..];
        let body = packet.get(..packet.len().checked_sub(1)?)?;
        let split = body.iter().position(|b| *b == b' ')?;
        let (key, value) = (&body[..split], &body[split + 1..]);
        match key {
            b"location" => {}
            b"identifier" => identifier = Some(value.to_vec()),
            b"cid" => caveats.push(String::from_utf8(value.to_vec()).ok()?),
            b"signature" => signature = Some(value.to_vec()),
            // Third-party caveats are never in a guest token.
            _ => return None,
        }
    }
    Some(Macaroon { identifier: identifier?, caveats, signature: signature? })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a token as pymacaroons serialises it.
    pub fn mint(secret: &[u8], caveats: &[&str]) -> String {
        let caveats: Vec<String> = caveats.iter().map(|c| c.to_string()).collect();
        let mut out = Vec::new();
        let mut packet = |key: &[u8], value: &[u8]| {
            let size = 4 + key.len() + 1 + value.len() + 1;
            out.extend_from_slice(format!("{size:04x}").as_bytes());
            out.extend_from_slice(key);
            out.push(b' ');
            out.extend_from_slice(value);
            out.push(b'\n');
        };
        packet(b"location", b"hs");
        packet(b"identifier", b"key");
        for c in &caveats {
            packet(b"cid", c.as_bytes());
        }
        packet(b"signature", &last_mac(secret, b"key", &caveats).finalize().into_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
    }

    const GUEST: [&str; 4] = ["gen = 1", "type = access", "user_id = @1:hs", "guest = true"];

    #[test]
    fn accepts_a_guest_token_and_nothing_else() {
        let s = b"secret";
        assert_eq!(verify_guest_token(&mint(s, &GUEST), s, 0), Some("@1:hs".into()));
        assert_eq!(verify_guest_token(&mint(s, &GUEST), b"other", 0), None, "wrong key");
        assert_eq!(verify_guest_token(&mint(s, &GUEST[..3]), s, 0), None, "not a guest token");
        let mut extra = GUEST.to_vec();
        extra.push("admin = true");
        assert_eq!(verify_guest_token(&mint(s, &extra), s, 0), None, "unknown caveat");
        let mut timed = GUEST.to_vec();
        timed.push("time < 1000");
        assert!(verify_guest_token(&mint(s, &timed), s, 999).is_some());
        assert_eq!(verify_guest_token(&mint(s, &timed), s, 1000), None, "expired");
        for junk in ["", "syt_abc", "!!!!", "MDAxZ"] {
            assert_eq!(verify_guest_token(junk, s, 0), None);
        }
    }
}
