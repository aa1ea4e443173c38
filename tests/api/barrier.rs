//! The read barrier against the real PostgreSQL: what one request can do
//! to it, and how its floor moves.

use serde_json::json;

use crate::helpers::{Ask, Synapse, TokenIn, spawn_worker};

/// A remote user ID with a NUL (valid JSON, never storable in PostgreSQL)
/// is dropped from the quick probe like from every other statement: the
/// probe answers, and the quick probe stays in use for everyone after.
#[tokio::test]
async fn a_nul_in_a_remote_user_id_leaves_the_quick_probe_on() {
    let worker = spawn_worker().await;
    let conn = synapse_keys_worker::store::ProbeConnection::new(worker.app.store.clone(), std::time::Duration::from_secs(5));
    let rows = conn.quick_probe(&["@a\0b:remote.invalid", "@c:remote.invalid"]).await;
    assert!(matches!(rows, Ok(Some(_))), "the quick probe refused the IDs: {rows:?}");

    let hs = Synapse::new();
    let alice = hs.register("alice").await;
    let body = json!({"device_keys": {"@a\u{0}b:remote.invalid": [], &alice.user_id: []}});
    let (status, answer) = Ask::keys_query("v3", &alice.session.token, TokenIn::Header, &body).send(&worker.url).await;
    assert_eq!(status, 200, "{answer}");
    assert!(worker.app.barrier.quick_probe_usable(), "one request switched the quick probe off");
}
