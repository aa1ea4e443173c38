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

use crate::helpers::{Ask, Synapse, TokenIn, Worker, converges, eventually, hits, poll_until, ready_worker};

/// What scripts/world.py exports about the worker-mode homeserver.
struct Workers {
    url: String,
    yaml: std::path::PathBuf,
    pg_url: String,
    dl1_url: String,
    dl2_url: String,
}

fn workers() -> Workers {
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set: run through `bash scripts/test.sh`"));
    Workers {
        url: var("SKW_TEST_WORKERS_SYNAPSE_URL"),
        yaml: var("SKW_TEST_WORKERS_HOMESERVER_YAML").into(),
        pg_url: var("SKW_TEST_WORKERS_PG_URL"),
        dl1_url: var("SKW_TEST_WORKERS_DL1_CLIENT_URL"),
        dl2_url: var("SKW_TEST_WORKERS_DL2_CLIENT_URL"),
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
async fn last_writer(db: &sqlx::PgPool, user: &str) -> String {
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
    let dl1 = std::env::var("SKW_TEST_WORKERS_DL1_REPLICATION_URL").unwrap();
    let port: u16 = dl1.rsplit_once(':').unwrap().1.parse().unwrap();
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
