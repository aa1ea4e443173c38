//! Differential tests: the same `/keys/query` asked of Synapse and of us,
//! with the same tokens, must give the same status and the same JSON.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Ask, CrossSigning, Session, Synapse, TestUser, TokenIn, Worker, assert_same, env, spawn_worker};

/// Users, devices and keys made through Synapse's client API.
pub struct World {
    pub alice: TestUser,
    pub alice_cs: CrossSigning,
    /// Alice's second device (no display name) and a third without keys.
    pub alice2: Session,
    pub alice3: Session,
    pub bob: TestUser,
    pub carol: TestUser,
    pub dave: TestUser,
    /// A device of Dave's that was deleted after uploading keys.
    pub dave_deleted: String,
}

impl World {
    pub async fn build(hs: &Synapse) -> Self {
        // Alice: three devices (two with keys), cross-signing, both keyed
        // devices signed by her self-signing key, master key signed by a device.
        let alice = hs.register("alice").await;
        let (a1_keys, a1_key) = hs.upload_device_keys(&alice.session).await;
        let alice2 = hs.login(&alice, None).await;
        let (a2_keys, _) = hs.upload_device_keys(&alice2).await;
        let alice3 = hs.login(&alice, Some("no keys here")).await;
        let alice_cs = hs.setup_cross_signing(&alice.session).await;
        hs.sign_own_device(&alice.session, &alice_cs, &a1_keys).await;
        hs.sign_own_device(&alice.session, &alice_cs, &a2_keys).await;
        hs.sign_own_master_with_device(&alice.session, &a1_key, &alice_cs).await;

        // Bob: one device, cross-signing; Alice and Bob sign each other.
        let bob = hs.register("bob").await;
        let (b1_keys, _) = hs.upload_device_keys(&bob.session).await;
        let bob_cs = hs.setup_cross_signing(&bob.session).await;
        hs.sign_own_device(&bob.session, &bob_cs, &b1_keys).await;
        hs.sign_other_master(&alice.session, &alice_cs, &bob.user_id).await;
        hs.sign_other_master(&bob.session, &bob_cs, &alice.user_id).await;

        // Carol: no keys at all, no display name.
        let carol = hs.register_with_device_name("carol", None).await;

        // Dave: keys, no cross-signing, and a device deleted after upload.
        let dave = hs.register("dave").await;
        hs.upload_device_keys(&dave.session).await;
        let dave2 = hs.login(&dave, Some("soon gone")).await;
        hs.upload_device_keys(&dave2).await;
        let dave_deleted = dave2.device_id.clone();
        hs.delete_device(&dave, &dave2.device_id).await;

        Self { alice, alice_cs, alice2, alice3, bob, carol, dave, dave_deleted }
    }

    fn local(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", env().server_name)
    }

    /// The query bodies the tests ask with.
    pub fn queries(&self) -> Vec<Value> {
        let (a, b, c, d) = (&self.alice.user_id, &self.bob.user_id, &self.carol.user_id, &self.dave.user_id);
        let a1 = &self.alice.session.device_id;
        let master_pub = &self.alice_cs.master.public;
        vec![
            // Everyone, plus an unknown local user and invalid IDs (dropped).
            json!({"device_keys": {a: [], b: [], c: [], d: [], self.local("nobody-here"): [], "not-an-id": [], "@x:bad_domain!": []}}),
            // Specific devices: known, unknown, a hidden cross-signing
            // "device", duplicates, a deleted device, a keyless device.
            json!({"device_keys": {
                a: [a1, "NOPE", master_pub, &self.alice3.device_id],
                b: [&self.bob.session.device_id, &self.bob.session.device_id],
                d: [&self.dave_deleted],
            }}),
            // Mixed: all devices, specific, and unknown device of a keyless user.
            json!({"device_keys": {a: [], b: [&self.bob.session.device_id], c: ["X"]}}),
            json!({"device_keys": {}}),
            // Extra fields are ignored (timeout in the body, the old token).
            json!({"device_keys": {a: [&self.alice2.device_id]}, "timeout": 1000, "token": "s1"}),
        ]
    }

    pub fn requesters(&self) -> Vec<(&str, &Session)> {
        vec![
            ("alice", &self.alice.session),
            ("alice's keyless device", &self.alice3),
            ("bob", &self.bob.session),
            ("carol", &self.carol.session),
            ("dave", &self.dave.session),
        ]
    }
}

async fn setup() -> (Synapse, World, Worker) {
    let hs = Synapse::new();
    let world = World::build(&hs).await;
    (hs, world, spawn_worker().await)
}

#[tokio::test]
async fn every_requester_every_query_matches_synapse() {
    let (_hs, world, worker) = setup().await;
    for (who, session) in world.requesters() {
        for body in world.queries() {
            let (status, answer) = assert_same(&worker, &Ask::keys_query("v3", &session.token, TokenIn::Header, &body)).await;
            assert_eq!(status, StatusCode::OK, "{who}: {answer}");
        }
    }
}

#[tokio::test]
async fn all_prefixes_and_token_placements_match_synapse() {
    let (_hs, world, worker) = setup().await;
    let body = &world.queries()[0];
    for prefix in ["r0", "v3", "unstable"] {
        for how in [TokenIn::Header, TokenIn::Query] {
            let (status, _) = assert_same(&worker, &Ask::keys_query(prefix, &world.alice.session.token, how, body)).await;
            assert_eq!(status, StatusCode::OK);
        }
    }
}

/// Guards against a comparison that passes because both sides are empty:
/// the answers really carry what the world put in.
#[tokio::test]
async fn answers_carry_keys_and_signatures() {
    let (_hs, world, worker) = setup().await;
    let (a, b) = (&world.alice.user_id, &world.bob.user_id);
    let body = json!({"device_keys": {a: [], b: []}});
    let (_, mine) = Ask::keys_query("v3", &world.alice.session.token, TokenIn::Header, &body).send(&worker.url).await;

    let alice_devices = mine["device_keys"][a].as_object().unwrap();
    assert_eq!(alice_devices.len(), 2, "two of Alice's three devices have keys: {mine}");
    let a1 = &alice_devices[&world.alice.session.device_id];
    assert_eq!(a1["unsigned"]["device_display_name"], "first device");
    let ssk_id = format!("ed25519:{}", world.alice_cs.self_signing.public);
    assert!(a1["signatures"][a][&ssk_id].is_string(), "self-signing signature merged: {a1}");
    assert_eq!(alice_devices[&world.alice2.device_id]["unsigned"], json!({}));

    // Alice sees her user-signing key, and her signature on Bob's master key.
    assert!(mine["user_signing_keys"][a].is_object());
    assert!(mine["user_signing_keys"].get(b).is_none());
    let usk_id = format!("ed25519:{}", world.alice_cs.user_signing.public);
    assert!(mine["master_keys"][b]["signatures"][a][&usk_id].is_string(), "{mine}");
    assert!(mine["self_signing_keys"][b].is_object());

    // Carol sees neither user-signing keys nor Alice's signature.
    let (_, carols) = Ask::keys_query("v3", &world.carol.session.token, TokenIn::Header, &body).send(&worker.url).await;
    assert_eq!(carols["user_signing_keys"], json!({}));
    assert!(carols["master_keys"][b]["signatures"].get(a).is_none(), "{carols}");
}

#[tokio::test]
async fn puppet_token_acts_as_the_puppeted_user() {
    let (hs, world, worker) = setup().await;
    let admin = hs.register_admin("admin").await;
    let r = hs.admin(Method::POST, &format!("/_synapse/admin/v1/users/{}/login", world.alice.user_id), &admin.session, json!({})).await;
    let puppet_token = r["access_token"].as_str().unwrap();
    let body = &world.queries()[0];
    let (status, answer) = assert_same(&worker, &Ask::keys_query("v3", puppet_token, TokenIn::Header, body)).await;
    assert_eq!(status, StatusCode::OK);
    // Acting as Alice, so Alice's user-signing key is shown.
    assert!(answer["user_signing_keys"][&world.alice.user_id].is_object(), "{answer}");
}

/// Databases of Synapse before 1.161 can hold several rows for one
/// signature (no unique index yet; 1.161's background update keeps the
/// greatest). That Synapse answers with the last row it reads; so must we.
/// From 1.161 the index refuses a second row, so the case cannot arise.
///
/// This test writes Synapse's database: no API makes a duplicate row (it
/// is what old releases' uploads left behind).
#[tokio::test]
async fn duplicate_signature_rows_are_answered_as_that_synapse_answers() {
    let hs = Synapse::new();
    let alice = hs.register("alice").await;
    let (device, _) = hs.upload_device_keys(&alice.session).await;
    let cs = hs.setup_cross_signing(&alice.session).await;
    hs.sign_own_device(&alice.session, &cs, &device).await;
    let pool = sqlx::PgPool::connect(&env().pg_url).await.unwrap();
    let (key_id, signature): (String, String) =
        sqlx::query_as("SELECT key_id, signature FROM e2e_cross_signing_signatures WHERE user_id = $1 AND target_device_id = $2")
            .bind(&alice.user_id)
            .bind(&alice.session.device_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    // Another signature text, sorting before the real one and after it.
    for other in ["A".repeat(signature.len()), "z".repeat(signature.len())] {
        let inserted = sqlx::query(
            "INSERT INTO e2e_cross_signing_signatures (user_id, key_id, target_user_id, target_device_id, signature) VALUES ($1, $2, $1, $3, $4)",
        )
        .bind(&alice.user_id)
        .bind(&key_id)
        .bind(&alice.session.device_id)
        .bind(&other)
        .execute(&pool)
        .await;
        if !crate::helpers::synapse_before("1.161") {
            let e = inserted.expect_err("Synapse 1.161 and later have a unique index");
            assert_eq!(e.as_database_error().and_then(|d| d.code()).as_deref(), Some("23505"), "{e}");
            return;
        }
        inserted.unwrap();
        // A service of its own each time: the row went in behind the
        // replication stream, so no cache of ours heard of it (Synapse
        // before 1.139 caches no signatures).
        let worker = spawn_worker().await;
        let ask = Ask::keys_query("v3", &alice.session.token, TokenIn::Header, &json!({"device_keys": {&alice.user_id: []}}));
        let (_, answer) = assert_same(&worker, &ask).await;
        let got = &answer["device_keys"][&alice.user_id][&alice.session.device_id]["signatures"][&alice.user_id][&key_id];
        assert_eq!(got, &json!(other), "the last row inserted is the one Synapse answers with");
    }
}
