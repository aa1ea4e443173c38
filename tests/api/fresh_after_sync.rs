//! The promise a client relies on: once Synapse's `/sync` has told it that
//! a user's devices changed, our `/keys/query` never answers with the list
//! from before the change. Synapse wakes `/sync` before it publishes the
//! change on Redis, so invalidating on Redis alone leaves a window; the
//! read barrier (`replication::barrier`) closes it. This reproduces what a
//! client does: long-poll `/sync`, see `device_lists.changed`, and ask
//! `/keys/query` at once, many rounds in a row.

use std::time::Duration;

use serde_json::{Value, json};
use synapse_keys_worker::config::Config;

use crate::helpers::{Ask, Session, Synapse, TokenIn, env, eventually_some, poll_until, spawn_worker_with};
use crate::tcp_proxy::TcpProxy;

const ROUNDS: usize = 25;

/// Long-polls `/sync` from `since` until `device_lists.changed` names
/// `user`; returns the new `since`.
async fn sync_until_changed(hs: &Synapse, who: &Session, since: String, user: &str) -> String {
    let since = std::sync::Mutex::new(since);
    eventually_some(Duration::from_secs(30), || async {
        let r = hs.get(&format!("/_matrix/client/v3/sync?timeout=10000&since={}", since.lock().unwrap()), &who.token).await;
        let next = r["next_batch"].as_str().unwrap().to_owned();
        let changed = r["device_lists"]["changed"].as_array().cloned().unwrap_or_default();
        *since.lock().unwrap() = next.clone();
        changed.iter().any(|u| u == user).then_some(next)
    })
    .await
}

fn device_ids(answer: &Value, user: &str) -> Vec<String> {
    answer["device_keys"][user].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

/// Runs the rounds; returns the worker's count of changes the barrier
/// applied before the stream delivered them.
async fn rounds(config: Config) -> u64 {
    let hs = Synapse::new();
    let alice = hs.register("alice").await;
    let carol = hs.register("carol").await;
    hs.upload_device_keys(&alice.session).await;
    hs.share_a_room(&alice.session, &carol.session).await;
    let worker = spawn_worker_with(config).await;
    let app = worker.app.clone();
    poll_until(Duration::from_secs(10), || app.caches.trusted()).await;
    let body = json!({"device_keys": {&alice.user_id: []}});
    let ask = Ask::keys_query("v3", &carol.session.token, TokenIn::Header, &body);
    let mut since = hs.get("/_matrix/client/v3/sync?timeout=0", &carol.session.token).await["next_batch"].as_str().unwrap().to_owned();

    let mut stale = Vec::new();
    for round in 0..ROUNDS {
        // A new device (no keys yet): wait until carol's /sync has seen it,
        // then let our cache hold the list as it is now.
        let phone = hs.login(&alice, None).await;
        since = sync_until_changed(&hs, &carol.session, since, &alice.user_id).await;
        let (_, before) = ask.send(&worker.url).await;
        assert!(!device_ids(&before, &alice.user_id).contains(&phone.device_id), "a device without keys is not listed");
        // The device uploads its keys while carol long-polls; the moment
        // /sync reports the change, carol asks us.
        let poll = {
            let (hs, who, since, user) = (Synapse::new(), carol.session.clone(), since.clone(), alice.user_id.clone());
            tokio::spawn(async move { sync_until_changed(&hs, &who, since, &user).await })
        };
        hs.upload_device_keys(&phone).await;
        since = poll.await.unwrap();
        let (status, after) = ask.send(&worker.url).await;
        assert_eq!(status, 200);
        if !device_ids(&after, &alice.user_id).contains(&phone.device_id) {
            stale.push(round);
        }
    }
    println!("stale answers right after /sync: {} of {ROUNDS} rounds ({stale:?})", stale.len());
    assert!(stale.is_empty(), "answered from before a change /sync had announced in rounds {stale:?}");
    worker.app.barrier.counters().changes_applied.load(std::sync::atomic::Ordering::Relaxed)
}

fn config() -> Config {
    Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap()
}

/// Redis a little slow (a busy server, another host): Synapse's RDATA
/// reaches us well after `/sync` has answered. Without the barrier nearly
/// every round is stale; on loopback with no delay the window is a few
/// milliseconds and is hit only now and then.
#[tokio::test]
async fn no_stale_answer_after_sync_with_slow_redis() {
    let redis_url = url::Url::parse(&std::env::var("SKW_TEST_REDIS_URL").expect("harness sets SKW_TEST_REDIS_URL")).unwrap();
    let proxy = TcpProxy::start(&format!("{}:{}", redis_url.host_str().unwrap(), redis_url.port().unwrap())).await;
    proxy.set_delay(Duration::from_millis(150));
    let mut c = config();
    c.synapse.redis.host = Some("127.0.0.1".into());
    c.synapse.redis.port = Some(proxy.port);
    let applied = rounds(c).await;
    assert!(applied >= ROUNDS as u64, "the barrier, not the stream, brought the changes in ({applied})");
}

#[tokio::test]
async fn no_stale_answer_after_sync_when_polling() {
    let mut c = config();
    c.synapse.redis.enabled = false;
    assert!(rounds(c).await >= 1);
}
