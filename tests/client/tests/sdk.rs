//! A real client (matrix-rust-sdk, with its crypto) through a real reverse
//! proxy (nginx, routed by the README's rule): `/keys/query` reaches our
//! service, everything else Synapse. Run by scripts/test.sh after the main
//! suite, in the same test world.

use std::time::Duration;

use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoom;
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{DeviceId, UserId};
use skw_client_tests::nginx::Nginx;
use skw_client_tests::party::{Party, register};
use skw_client_tests::{Worker, env, eventually_some};

const LIMIT: Duration = Duration::from_secs(30);

fn init_logging() {
    // The SDK reports failed requests (a `/keys/query` answer it cannot
    // use, say) only in its log: show its warnings with a failing test's
    // output. RUST_LOG overrides.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,matrix_sdk_crypto::backups=error".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Two users of the test Synapse, both through nginx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_users_through_nginx_exchange_encrypted_messages_and_see_new_devices() {
    init_logging();
    let worker = Worker::start(&env("SKW_TEST_HOMESERVER_YAML")).await;
    let nginx = Nginx::start(&worker.addr, &env("SKW_TEST_SYNAPSE_URL")).await;
    conversation(&nginx.url, &nginx.url).await;
    assert_keys_queries_came_to_us(&nginx, &worker).await;
}

/// The same with the second user on another homeserver, across federation
/// (over TLS): the first user's client learns the remote user's devices
/// from us, which get them from Synapse's device-list cache or the remote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_and_a_remote_user_exchange_encrypted_messages_and_see_new_devices() {
    init_logging();
    let worker = Worker::start(&env("SKW_TEST_FED_HOMESERVER_YAML")).await;
    let nginx = Nginx::start(&worker.addr, &env("SKW_TEST_FED_SYNAPSE_URL")).await;
    conversation(&nginx.url, &env("SKW_TEST_REMOTE_SYNAPSE_URL")).await;
    assert_keys_queries_came_to_us(&nginx, &worker).await;
}

/// Alice on the homeserver at `alice_hs` (nginx), Bob at `bob_hs`: both
/// bootstrap cross-signing, share an encrypted room and decrypt each
/// other's messages; Bob logs in a second device, signs it from the first,
/// Alice's client sees it cross-signed, and it decrypts what both send next.
async fn conversation(alice_hs: &str, bob_hs: &str) {
    let alice = register(alice_hs, "alice").await;
    let bob = register(bob_hs, "bob").await;
    let a1 = Party::login(alice_hs, &alice, "alice's phone").await;
    let b1 = Party::login(bob_hs, &bob, "bob's phone").await;
    a1.bootstrap_cross_signing().await;
    b1.bootstrap_cross_signing().await;

    let mut create = CreateRoom::new();
    create.invite = vec![bob.user_id.clone()];
    create.initial_state =
        vec![InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any()];
    let a_room = a1.client.create_room(create).await.expect("Alice creates the room");
    let room_id = a_room.room_id().to_owned();
    b1.room(&room_id).await;
    b1.client.join_room_by_id(&room_id).await.expect("Bob joins");
    eventually_some("Alice sees Bob joined", LIMIT, || {
        let room = a_room.clone();
        let bob = bob.user_id.clone();
        async move { room.get_member_no_sync(&bob).await.ok().flatten().filter(|m| *m.membership() == MembershipState::Join) }
    })
    .await;
    assert!(a_room.latest_encryption_state().await.expect("encryption state").is_encrypted(), "the room is encrypted");

    a_room.send(RoomMessageEventContent::text_plain("hello from alice")).await.expect("Alice sends");
    b1.decrypts("hello from alice").await;
    let b_room = b1.room(&room_id).await;
    b_room.send(RoomMessageEventContent::text_plain("hello from bob")).await.expect("Bob sends");
    a1.decrypts("hello from bob").await;

    // Each sees the other's device signed by its owner's self-signing key:
    // the cross-signing keys and signatures came through /keys/query.
    cross_signed_device(&a1, &bob.user_id, &b1.device_id()).await;
    cross_signed_device(&b1, &alice.user_id, &a1.device_id()).await;

    // Bob's new device: his first one sees it and signs it (it holds the
    // private self-signing key), then Alice's client sees it cross-signed.
    let b2 = Party::login(bob_hs, &bob, "bob's laptop").await;
    let b2_id = b2.device_id();
    let new_device = eventually_some("Bob's first device sees his second", LIMIT, || {
        let encryption = b1.client.encryption();
        let (bob, b2_id) = (bob.user_id.clone(), b2_id.clone());
        async move { encryption.get_device(&bob, &b2_id).await.ok().flatten() }
    })
    .await;
    new_device.verify().await.expect("Bob's first device signs his second");
    cross_signed_device(&a1, &bob.user_id, &b2_id).await;

    // Bob's second device decrypts what Alice sends now, and what Bob's
    // first device sends.
    a_room.send(RoomMessageEventContent::text_plain("alice to both of bob's devices")).await.expect("Alice sends again");
    b2.decrypts("alice to both of bob's devices").await;
    b1.decrypts("alice to both of bob's devices").await;
    b_room.send(RoomMessageEventContent::text_plain("bob from his phone")).await.expect("Bob sends again");
    b2.decrypts("bob from his phone").await;
    a1.decrypts("bob from his phone").await;
    for party in [a1, b1, b2] {
        party.stop().await;
    }
}

/// Waits until `party`'s client knows `user`'s `device` as signed by the
/// user's own cross-signing keys.
async fn cross_signed_device(party: &Party, user: &UserId, device: &DeviceId) {
    let what = format!("{} sees {user} {device} cross-signed by its owner", party.account.user_id);
    eventually_some(&what, LIMIT, || {
        let encryption = party.client.encryption();
        let (user, device) = (user.to_owned(), device.to_owned());
        async move { encryption.get_device(&user, &device).await.ok().flatten().filter(|d| d.is_cross_signed_by_owner()).map(|_| ()) }
    })
    .await;
}

/// From nginx's access log: there were `/keys/query` calls, every one went
/// to our service and got 200, and our own counter agrees (a rule that
/// sent them elsewhere could not pass); the rest went to Synapse.
async fn assert_keys_queries_came_to_us(nginx: &Nginx, worker: &Worker) {
    // The clients have stopped; nginx logs each request just after it has
    // relayed the answer, so its log may lag our counter for a moment.
    let answered = worker.keys_queries_answered(200).await;
    let hits = eventually_some("nginx has logged every /keys/query we answered", LIMIT, || {
        let hits = nginx.hits();
        let logged = hits.iter().filter(|h| h.path.ends_with("/keys/query")).count() as u64;
        std::future::ready((logged >= answered).then_some(hits))
    })
    .await;
    let (keys, rest): (Vec<_>, Vec<_>) = hits.iter().partition(|h| h.path.ends_with("/keys/query"));
    assert!(!keys.is_empty(), "no /keys/query went through nginx");
    for hit in &keys {
        assert_eq!((hit.method.as_str(), hit.upstream.as_str(), hit.status), ("POST", worker.addr.as_str(), 200), "{hit:?}");
    }
    assert!(rest.iter().all(|h| h.upstream != worker.addr), "only /keys/query reaches us: {rest:?}");
    assert!(rest.iter().any(|h| h.path.ends_with("/sync")), "the clients synced through nginx");
    assert_eq!(answered, keys.len() as u64, "our count of /keys/query answered 200");
}
