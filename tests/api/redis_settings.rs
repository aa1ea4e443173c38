//! Redis as Synapse's `redis` section configures it: TLS with a client
//! certificate and the CA as a file or a directory, a UNIX socket. The
//! world's Redis listens on all three (its TLS port requires a client
//! certificate); Synapse publishes on the plain port, so a logout reaching
//! us shows that we follow the very stream Synapse writes.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use synapse_keys_worker::config::Config;

use crate::helpers::{Ask, Synapse, TokenIn, env, eventually_some, spawn_worker_with};
use crate::operations::captured_logs;
use crate::replication::a_logout_reaches_us;

fn tls_dir() -> PathBuf {
    PathBuf::from(std::env::var("SKW_TEST_REDIS_TLS_DIR").expect("harness sets SKW_TEST_REDIS_TLS_DIR"))
}

/// The world's config, its Redis reached over TLS with the client
/// certificate, and no CA.
fn over_tls() -> Config {
    let mut c = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    let r = &mut c.synapse.redis;
    r.host = Some("localhost".into());
    r.port = Some(std::env::var("SKW_TEST_REDIS_TLS_PORT").unwrap().parse().unwrap());
    r.use_tls = true;
    r.certificate_file = Some(tls_dir().join("client.crt"));
    r.private_key_file = Some(tls_dir().join("client.key"));
    c
}

#[tokio::test]
async fn tls_with_a_client_certificate_and_the_ca_as_a_file() {
    let mut c = over_tls();
    c.synapse.redis.ca_file = Some(tls_dir().join("ca/ca.crt"));
    a_logout_reaches_us(c).await;
}

#[tokio::test]
async fn tls_with_the_ca_as_a_directory() {
    let mut c = over_tls();
    c.synapse.redis.ca_path = Some(tls_dir().join("ca"));
    a_logout_reaches_us(c).await;
}

/// Synapse connects without verifying Redis's certificate when no CA is
/// named; so do we, and say so.
#[tokio::test]
async fn tls_without_a_ca_connects_as_synapse_does_and_warns() {
    let (logs, _guard) = captured_logs();
    a_logout_reaches_us(over_tls()).await;
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(text.contains("Redis's certificate is not verified"), "{text}");
}

/// A CA that did not sign Redis's certificate: no stream (the caches stay
/// off and answers come from the database), and the log says why.
#[tokio::test]
async fn a_ca_that_did_not_sign_redis_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(other.der());
    std::fs::write(dir.path().join("other.pem"), format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")).unwrap();
    let mut c = over_tls();
    c.synapse.redis.ca_file = Some(dir.path().join("other.pem"));
    let (logs, _guard) = captured_logs();
    let worker = spawn_worker_with(c).await;
    let line = eventually_some(Duration::from_secs(15), || {
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        std::future::ready(text.lines().find(|l| l.contains("replication stream lost")).map(str::to_owned))
    })
    .await;
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    assert!(!worker.app.replication.connected());
    assert!(!worker.app.caches.trusted());
    let hs = Synapse::new();
    let user = hs.register("uncached").await;
    let ask = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &json!({"device_keys": {&user.user_id: []}}));
    assert_eq!(ask.send(&worker.url).await, ask.send(&env().synapse_url).await);
}

#[tokio::test]
async fn a_unix_socket() {
    let mut c = Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap();
    c.synapse.redis.path = Some(std::env::var("SKW_TEST_REDIS_SOCKET").unwrap());
    c.synapse.redis.port = Some(1); // ignored: the socket wins, as in Synapse
    a_logout_reaches_us(c).await;
}
