//! The homeserver's signing key (Synapse's `signing_key_path`) and X-Matrix
//! request signing, through ruma.

use std::path::Path;

use axum::http::{HeaderValue, Method};
use ruma::OwnedServerName;
use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
use ruma::signatures::Ed25519KeyPair;

use crate::config::signing_key::first_key;

/// PKCS#8 v1 prefix of an ed25519 private key; the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

pub struct RequestSigner {
    origin: OwnedServerName,
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for RequestSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSigner").field("origin", &self.origin).field("key", &self.key.version()).finish()
    }
}

impl RequestSigner {
    /// Reads the first key of a Synapse signing-key file: lines of
    /// `ed25519 <version> <unpadded base64 seed>`.
    pub fn from_file(origin: &str, path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read signing key {}: {e}", path.display()))?;
        Self::from_key_text(origin, &text).map_err(|e| anyhow::anyhow!("signing key {}: {e}", path.display()))
    }

    pub fn from_key_text(origin: &str, text: &str) -> anyhow::Result<Self> {
        let (version, seed) = first_key(text)?;
        let mut der = PKCS8_ED25519_PREFIX.to_vec();
        der.extend_from_slice(&seed);
        let key = Ed25519KeyPair::from_der(&der, version).map_err(|e| anyhow::anyhow!("{e}"))?;
        let origin = OwnedServerName::try_from(origin).map_err(|e| anyhow::anyhow!("server_name {origin}: {e}"))?;
        Ok(Self { origin, key })
    }

    /// The `Authorization` header for a request to `destination`.
    /// `path_and_query` is exactly what goes on the request line.
    pub fn authorization(
        &self,
        method: &Method,
        path_and_query: &str,
        destination: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<HeaderValue> {
        let destination = OwnedServerName::try_from(destination).map_err(|e| anyhow::anyhow!("destination {destination}: {e}"))?;
        let request = axum::http::Request::builder().method(method.clone()).uri(path_and_query).body(body.unwrap_or_default().to_vec())?;
        let input = XMatrixSigningInput::new(self.origin.clone(), destination, &self.key);
        let scheme = XMatrix::sign_http_request(&request, input).map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(HeaderValue::from(&scheme))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::signatures::{PublicKeyMap, PublicKeySet};

    // A key in Synapse's file format (seed of 32 zero bytes... plus one).
    const KEY: &str = "ed25519 a_test AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA\n";

    #[test]
    fn signs_requests_that_verify() {
        let signer = RequestSigner::from_key_text("origin.example", KEY).unwrap();
        let header = signer
            .authorization(&Method::POST, "/_matrix/federation/v1/user/keys/query", "dest.example", Some(br#"{"device_keys":{}}"#))
            .unwrap();
        let xm = XMatrix::try_from(&header).unwrap();
        assert_eq!(xm.origin.as_str(), "origin.example");
        assert_eq!(xm.key.as_str(), "ed25519:a_test");

        let public = ruma::serde::Base64::<ruma::serde::base64::Standard, _>::new(signer.key.public_key().to_vec());
        let mut set = PublicKeySet::new();
        set.insert("ed25519:a_test".into(), public);
        let mut map = PublicKeyMap::new();
        map.insert("origin.example".into(), set);
        let request = axum::http::Request::builder()
            .method(Method::POST)
            .uri("/_matrix/federation/v1/user/keys/query")
            .body(br#"{"device_keys":{}}"#.to_vec())
            .unwrap();
        let dest = ruma::ServerName::parse("dest.example").unwrap();
        xm.verify_http_request(&request, &dest, &map).unwrap();
        // Another destination or body does not verify.
        let other = axum::http::Request::builder().method(Method::POST).uri("/x").body(b"{}".to_vec()).unwrap();
        assert!(xm.verify_http_request(&other, &dest, &map).is_err());
    }

    #[test]
    fn bad_key_files() {
        for bad in ["", "ed25519 v", "rsa v AAAA", "ed25519 v !!!", "ed25519 v AAAA"] {
            assert!(RequestSigner::from_key_text("o.example", bad).is_err(), "{bad:?}");
        }
    }
}
