//! Worker-mode Synapse (scripts/world.py's "synapse-workers"): a main
//! process, two device-list writers (`stream_writers.device_lists: [dl1,
//! dl2]`) and a client reader. A writer that handles a request itself
//! writes the device-list stream row and its own cache invalidations (its
//! `caches` stream); a key upload writes no cache invalidation at all, so
//! only the writer's device-list row tells us. New devices are registered
//! by the main process, which invalidates its caches and hands the
//! device-list row to one of the writers at random. The changes below are
//! sent to each writer in turn, so our caches are right only if they follow
//! both writers.

use std::time::Duration;

use serde_json::json;
use synapse_keys_worker::config::Config;
use synapse_keys_worker::config::synapse::InstanceLocation;

use crate::fake_remote::{FakeRemote, Route, homeserver_verify_key};
use crate::helpers::{Ask, Synapse, TokenIn, Worker, converges, eventually, hits, poll_until, ready_worker, unique, var};
use crate::remote::{our_calls, share_a_room_on, synapse_calls};
use crate::tcp_proxy::TcpProxy;

/// What scripts/world.py exports about the worker-mode homeserver.
struct Workers {
    url: String,
    yaml: std::path::PathBuf,
    pg_url: String,
    dl1_url: String,
    dl2_url: String,
    dl1_replication_url: String,
    server_name: String,
}

fn workers() -> Workers {
    Workers {
        url: var("SKW_TEST_WORKERS_SYNAPSE_URL"),
        yaml: var("SKW_TEST_WORKERS_HOMESERVER_YAML").into(),
        pg_url: var("SKW_TEST_WORKERS_PG_URL"),
        dl1_url: var("SKW_TEST_WORKERS_DL1_CLIENT_URL"),
        dl2_url: var("SKW_TEST_WORKERS_DL2_CLIENT_URL"),
        dl1_replication_url: var("SKW_TEST_WORKERS_DL1_REPLICATION_URL"),
        server_name: var("SKW_TEST_WORKERS_SERVER_NAME"),
    }
}

/// Asks until alice's devices are in our cache (a load that raced an
/// invalidation is not kept).
async fn cached(worker: &Worker, ask: &Ask, user: &str) {
    let user = user.to_owned();
    eventually(Duration::from_secs(15), || async {
        ask.send(&worker.url).await;
        worker.app.caches.devices.get(&user).is_some()
    })
    .await;
}

/// The writer (`dl1` or `dl2`) of `user`'s newest device-list change.
/// Read only: the test writes nothing into Synapse's database.
pub async fn last_writer(db: &sqlx::PgPool, user: &str) -> String {
    sqlx::query_scalar("SELECT instance_name FROM device_lists_stream WHERE user_id = $1 ORDER BY stream_id DESC LIMIT 1")
        .bind(user)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn changes_written_by_either_device_list_writer_reach_our_caches() {
    let env = workers();
    let main = Synapse::at(&env.url);
    let db = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    let alice = main.register("alice").await;
    let bob = main.register("bob").await;
    main.upload_device_keys(&bob.session).await;

    let config = Config::load(std::slice::from_ref(&env.yaml), Vec::new()).unwrap();
    // Both writers are followed (the read barrier's floor covers both);
    // resyncs go to the first one's replication listener.
    assert_eq!(config.synapse.device_lists_writers, ["dl1", "dl2"]);
    let port: u16 = env.dl1_replication_url.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(config.synapse.device_lists_writer, Some(InstanceLocation::Tcp { host: "127.0.0.1".into(), port, tls: false }));
    let worker = ready_worker(config).await;
    let body = json!({"device_keys": {&alice.user_id: [], &bob.user_id: []}});
    let ask = Ask::keys_query("v3", &bob.session.token, TokenIn::Header, &body);
    converges(&worker, &env.url, &ask, "before any change", |_| true).await;
    // The answer now comes from our caches: a change we missed would stay.
    let before = hits(&worker);
    ask.send(&worker.url).await;
    assert!(hits(&worker) > before, "the second ask is not answered from the caches");

    // Alice's keys and devices change through each writer in turn (then
    // through the main process, which picks a writer at random). Before
    // each change her devices are in our cache; after it, the row in
    // device_lists_stream says who wrote it, the replication stream alone
    // (nothing asks us meanwhile, so the read barrier, which would also
    // find the change in the database, does not run) must evict her, and
    // then our answer must become Synapse's.
    let mut cross_signed = false;
    for (target, url) in [("dl1", &env.dl1_url), ("dl2", &env.dl2_url), ("dl1", &env.dl1_url), ("main", &env.url)] {
        let hs = Synapse::at(url);
        let mut session = None;
        let mut changes = vec!["a new device", "its device keys", "its deletion"];
        if !cross_signed {
            changes.insert(2, "cross-signing keys");
            cross_signed = true;
        }
        for what in changes {
            cached(&worker, &ask, &alice.user_id).await;
            match (what, &session) {
                ("a new device", _) => session = Some(hs.login(&alice, Some(&format!("via {target}"))).await),
                ("its device keys", Some(s)) => _ = hs.upload_device_keys(s).await,
                ("cross-signing keys", Some(s)) => _ = hs.setup_cross_signing(s).await,
                (_, Some(s)) => hs.delete_device(&alice, &s.device_id).await,
                (_, None) => unreachable!("the device comes first"),
            }
            let writer = last_writer(&db, &alice.user_id).await;
            // New devices are registered by the main process whichever
            // process took the login, so their writer is picked at random.
            if target == "main" || what == "a new device" {
                assert!(writer == "dl1" || writer == "dl2", "{what} was written by {writer}, not a device-list writer");
            } else {
                assert_eq!(writer, target, "{what} sent to {target} was written by {writer}");
            }
            let step = format!("{what} via {target}, written by {writer}");
            println!("{step}");
            let (devices, user) = (&worker.app.caches.devices, &alice.user_id);
            poll_until(Duration::from_secs(15), || devices.get(user).is_none()).await;
            converges(&worker, &env.url, &ask, &step, |_| true).await;
        }
    }
}

/// The worker-mode homeserver's config for our service, with Redis reached
/// through `redis` (a proxy a test can cut) when given.
fn config_via(env: &Workers, redis: Option<&TcpProxy>) -> Config {
    let mut config = Config::load(std::slice::from_ref(&env.yaml), Vec::new()).unwrap();
    if let Some(proxy) = redis {
        config.synapse.redis.host = Some("127.0.0.1".into());
        config.synapse.redis.port = Some(proxy.port);
    }
    config
}

fn proxy_to(url: &str) -> String {
    let url = url::Url::parse(url).unwrap();
    format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())
}

/// Redis goes away while both writers write. When it is back, each writer
/// reports its position and the rows it wrote meanwhile are read back from
/// the database for that writer: both users' entries leave our caches
/// before anyone asks us (so the read barrier, which would find the rows
/// too, plays no part), and our answer becomes Synapse's.
#[tokio::test]
async fn a_redis_outage_while_both_writers_write_is_caught_up_per_writer() {
    let env = workers();
    let main = Synapse::at(&env.url);
    let db = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    let (alice, carol, bob) = (main.register("alice").await, main.register("carol").await, main.register("bob").await);
    let (dl1, dl2) = (Synapse::at(&env.dl1_url), Synapse::at(&env.dl2_url));
    let alice_phone = dl1.login(&alice, Some("phone")).await;
    let carol_phone = dl2.login(&carol, Some("phone")).await;

    let redis = TcpProxy::start(&proxy_to(&var("SKW_TEST_REDIS_URL"))).await;
    let worker = ready_worker(config_via(&env, Some(&redis))).await;
    let body = json!({"device_keys": {&alice.user_id: [], &carol.user_id: []}});
    let ask = Ask::keys_query("v3", &bob.session.token, TokenIn::Header, &body);
    converges(&worker, &env.url, &ask, "before the outage", |_| true).await;
    cached(&worker, &ask, &alice.user_id).await;
    cached(&worker, &ask, &carol.user_id).await;

    let app = worker.app.clone();
    redis.set_open(false);
    poll_until(Duration::from_secs(15), || !app.replication.connected()).await;
    let (dl1_before, dl2_before) =
        (app.replication.caught_up_rows_of("device_lists", "dl1"), app.replication.caught_up_rows_of("device_lists", "dl2"));
    // Keys uploaded to a writer are written by that writer.
    dl1.upload_device_keys(&alice_phone).await;
    dl2.upload_device_keys(&carol_phone).await;
    assert_eq!(last_writer(&db, &alice.user_id).await, "dl1");
    assert_eq!(last_writer(&db, &carol.user_id).await, "dl2");

    // The caches are trusted again only once every writer we followed has
    // reported its position, and each one's missed rows were applied.
    redis.set_open(true);
    poll_until(Duration::from_secs(30), || app.caches.trusted()).await;
    assert!(app.replication.caught_up_rows_of("device_lists", "dl1") > dl1_before, "dl1's rows were not read back");
    assert!(app.replication.caught_up_rows_of("device_lists", "dl2") > dl2_before, "dl2's rows were not read back");
    for user in [&alice.user_id, &carol.user_id] {
        assert!(app.caches.devices.get(user).is_none(), "{user} is still cached after the catch-up");
    }
    converges(&worker, &env.url, &ask, "after the outage", |_| true).await;
}

/// Resyncs go to the first writer (dl1), which asks the remote itself;
/// with dl1 unreachable our service asks the remote directly, signed as
/// the homeserver, and answers within the client's timeout.
#[tokio::test]
async fn with_the_first_writer_down_stale_users_are_fetched_directly() {
    let env = workers();
    let main = Synapse::at(&env.url);
    let me = main.register("asker").await;
    let server_name = env.server_name.clone();
    let (key_id, public) = homeserver_verify_key();
    let remote = FakeRemote::start(&server_name, &key_id, public).await;
    let user = |name: &str| {
        let user = remote.add_user(&unique(name)).user_id;
        remote.add_device(&user, "PHONE", Some("Phone"));
        user
    };
    let (bob, dan) = (user("bob"), user("dan"));
    for u in [&bob, &dan] {
        share_a_room_on(&env.pg_url, &server_name, u).await;
    }

    let dl1 = TcpProxy::start(&proxy_to(&env.dl1_replication_url)).await;
    let mut config = config_via(&env, None);
    config.synapse.device_lists_writer = Some(InstanceLocation::Tcp { host: "127.0.0.1".into(), port: dl1.port, tls: false });
    let worker = ready_worker(config).await;
    let ask = |u: &str| {
        let mut ask = Ask::keys_query("v3", &me.session.token, TokenIn::Header, &json!({"device_keys": {u: []}}));
        ask.path.push_str("?timeout=5000");
        ask
    };

    // dl1 up: the resync goes to it, and it (not we) asks the remote.
    let (status, answer) = ask(&bob).send(&worker.url).await;
    assert_eq!(status, 200);
    assert_eq!(answer["device_keys"][&bob].as_object().map(|d| d.len()), Some(1), "{answer}");
    assert_eq!(synapse_calls(&remote, Route::UserDevices), 1, "dl1 resynced bob");
    assert_eq!(our_calls(&remote, Route::UserDevices), 0);
    converges(&worker, &env.url, &ask(&bob), "bob, resynced by dl1", |_| true).await;

    // dl1 down: dan is fetched by us, with a signature the remote accepts.
    dl1.set_open(false);
    let (status, answer) = ask(&dan).send(&worker.url).await;
    assert_eq!(status, 200);
    assert_eq!(answer["device_keys"][&dan].as_object().map(|d| d.len()), Some(1), "{answer}");
    assert_eq!(answer["failures"], json!({}));
    let ours: Vec<_> = remote.calls(Route::UserDevices).into_iter().filter(|c| c.user_agent.starts_with("synapse-keys-worker")).collect();
    assert_eq!(ours.len(), 1, "we asked the remote once");
    assert!(ours[0].verified && ours[0].origin == server_name, "signed as {server_name}: {:?}", ours[0].origin);
    // Refused at once: the next resync tries dl1 again (milliseconds).
    assert!(!worker.app.remote.coordinator.writer_breaker_open());
    assert_eq!(synapse_calls(&remote, Route::UserDevices), 1, "nobody else asked for dan");
}

/// Hundreds of changes through dl1 while dl2 writes nothing: dl2's row in
/// `stream_positions` stays where it was, but dl2 reports its position on
/// the stream as dl1's rows reach it, so the read barrier's floor follows
/// and probes go back to the quick one (the id sequence, no table read)
/// once the changes are applied; nothing is dropped on the way.
#[tokio::test]
async fn an_idle_writer_does_not_keep_probes_from_the_quick_one() {
    let env = workers();
    let main = Synapse::at(&env.url);
    let db = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    let dl1 = Synapse::at(&env.dl1_url);
    let alice = main.register("alice").await;
    let phone = dl1.login(&alice, Some("phone")).await;
    let worker = ready_worker(config_via(&env, None)).await;
    let app = worker.app.clone();
    let ask = Ask::keys_query("v3", &alice.session.token, TokenIn::Header, &json!({"device_keys": {&alice.user_id: []}}));
    let client = crate::helpers::http();
    for n in 0..200 {
        let rename = client.put(format!("{}/_matrix/client/v3/devices/{}", env.dl1_url, phone.device_id)).bearer_auth(&phone.token);
        let resp = rename.json(&json!({"display_name": format!("phone {n}")})).send().await.unwrap();
        assert!(resp.status().is_success(), "rename {n}: {}", resp.status());
        if n % 20 == 0 {
            assert_eq!(ask.send(&worker.url).await.0, 200);
        }
    }
    assert_eq!(last_writer(&db, &alice.user_id).await, "dl1", "the renames were written by dl1");
    // Once dl1's changes are applied and the writers' positions are past
    // them, a probe needs no table (other tests may write meanwhile: a
    // quiet moment comes within the deadline).
    let quick = || app.barrier.counters().quick.load(std::sync::atomic::Ordering::Relaxed);
    let before = quick();
    eventually(Duration::from_secs(60), || async {
        assert_eq!(ask.send(&worker.url).await.0, 200);
        quick() > before
    })
    .await;
    assert_eq!(app.barrier.counters().resets.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing dropped");
    assert_eq!(app.replication.dropped_all(), 0);
    converges(&worker, &env.url, &ask, "after the renames", |_| true).await;
}
