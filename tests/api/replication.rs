//! Caches that are never stale: changes made through Synapse reach our
//! answers through the replication stream (on two replicas at once), tokens
//! are revoked, a Redis outage turns the caches off and the rows missed
//! meanwhile are caught up from the database. Redis outages are simulated
//! with a TCP proxy in front of the real Redis, so Synapse and the other
//! tests keep theirs.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use synapse_keys_worker::config::Config;

use crate::helpers::{
    Ask, Session, Synapse, TokenIn, Worker, env, eventually, eventually_some, hits, poll_until, ready_worker, spawn_worker_with,
};
use crate::tcp_proxy::TcpProxy;

fn config() -> Config {
    Config::load(&[env().homeserver_yaml.clone()], Vec::new()).unwrap()
}

/// Polls until `worker` answers `body` for `who` exactly as Synapse does;
/// returns how long that took.
async fn converges(worker: &Worker, who: &Session, body: &Value) -> Duration {
    let started = Instant::now();
    let ask = Ask::keys_query("v3", &who.token, TokenIn::Header, body);
    eventually(Duration::from_secs(15), || async {
        let theirs = ask.send(&env().synapse_url).await;
        let ours = ask.send(&worker.url).await;
        if ours != theirs {
            println!("not yet the same:\nours:    {}\nSynapse: {}", ours.1, theirs.1);
        }
        ours == theirs
    })
    .await;
    started.elapsed()
}

#[tokio::test]
async fn changes_made_through_synapse_reach_both_replicas() {
    let hs = Synapse::new();
    let alice = hs.register("alice").await;
    let bob = hs.register("bob").await;
    let (alice_keys, _) = hs.upload_device_keys(&alice.session).await;
    let (a, b) = (alice.user_id.clone(), bob.user_id.clone());
    let body = json!({"device_keys": {&a: [], &b: []}});
    let replicas = [ready_worker(config()).await, ready_worker(config()).await];
    let mut delays = Vec::new();
    for r in &replicas {
        converges(r, &bob.session, &body).await;
        let before = hits(r);
        converges(r, &bob.session, &body).await;
        assert!(hits(r) > before, "a repeated query is served from memory");
    }

    let mut step = async |what: &str| {
        for r in &replicas {
            for who in [&alice.session, &bob.session] {
                let d = converges(r, who, &body).await;
                println!("{what}: converged in {d:?}");
                delays.push(d);
            }
        }
    };
    let phone = hs.login(&alice, Some("phone")).await;
    let (phone_keys, _) = hs.upload_device_keys(&phone).await;
    step("new device").await;
    hs.delete_device(&alice, &phone.device_id).await;
    step("device deleted").await;
    let alice_cs = hs.setup_cross_signing(&alice.session).await;
    step("cross-signing keys").await;
    let laptop = hs.login(&alice, Some("laptop")).await;
    let (laptop_keys, _) = hs.upload_device_keys(&laptop).await;
    hs.sign_own_device(&alice.session, &alice_cs, &laptop_keys).await;
    step("device cross-signed").await;
    // A device both replicas hold rendered, changed by nothing but a new
    // signature of its owner's.
    hs.sign_own_device(&alice.session, &alice_cs, &alice_keys).await;
    step("cached device cross-signed").await;
    let bob_cs = hs.setup_cross_signing(&bob.session).await;
    hs.sign_other_master(&bob.session, &bob_cs, &a).await;
    step("bob signed alice's master key").await;
    let _ = phone_keys;

    delays.sort();
    println!(
        "change-to-answer delay over {} checks: median {:?}, max {:?}",
        delays.len(),
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    // The caches stayed on throughout (a stream loss would have bypassed them).
    for r in &replicas {
        assert!(r.app.caches.trusted());
    }
}

#[tokio::test]
async fn logout_revokes_a_cached_token() {
    a_logout_reaches_us(config()).await;
}

/// A token cached by `config`'s service is refused once Synapse logs it
/// out: the logout travels only on the replication stream.
pub async fn a_logout_reaches_us(config: Config) {
    let hs = Synapse::new();
    let user = hs.register("leaving").await;
    let worker = ready_worker(config).await;
    let ask = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &json!({"device_keys": {}}));
    until_the_token_is_cached(&worker, &ask).await;
    hs.post("/_matrix/client/v3/logout", &user.session.token, json!({})).await;
    let started = Instant::now();
    let answer = eventually_some(Duration::from_secs(10), || async {
        let (status, answer) = ask.send(&worker.url).await;
        (status == StatusCode::UNAUTHORIZED).then_some(answer)
    })
    .await;
    assert_eq!(answer["errcode"], "M_UNKNOWN_TOKEN");
    println!("logout reached us in {:?}", started.elapsed());
}

/// Cached once a load is not voided by another user's change landing
/// meanwhile (other tests register users all the time).
async fn until_the_token_is_cached(worker: &Worker, ask: &Ask) {
    eventually(Duration::from_secs(10), || async {
        assert_eq!(ask.send(&worker.url).await.0, StatusCode::OK);
        worker.app.caches.tokens.counters.hits.load(Ordering::Relaxed) > 0
    })
    .await;
}

/// The subscription's connection stops delivering while it stays open (a
/// NAT or load balancer dropping an idle connection), and only that one:
/// our other Redis connection still works. A logout, which travels only
/// on the stream, must still be honoured promptly: the dead subscription
/// is found (it answers no PING), the caches are bypassed, and the token
/// is refused. Once it delivers again the caches are trusted again.
#[tokio::test]
async fn a_subscription_that_stops_delivering_is_found_and_bypassed() {
    let hs = Synapse::new();
    let user = hs.register("leaving").await;
    let redis_url = url::Url::parse(&std::env::var("SKW_TEST_REDIS_URL").unwrap()).unwrap();
    let upstream = format!("{}:{}", redis_url.host_str().unwrap(), redis_url.port().unwrap());
    let proxy = TcpProxy::start_marking(&upstream, Some(b"SUBSCRIBE")).await;
    let mut c = config();
    c.synapse.redis.host = Some("127.0.0.1".into());
    c.synapse.redis.port = Some(proxy.port);
    let worker = ready_worker(c).await;
    let ask = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &json!({"device_keys": {}}));
    until_the_token_is_cached(&worker, &ask).await;

    proxy.set_frozen_marked(true);
    hs.post("/_matrix/client/v3/logout", &user.session.token, json!({})).await;
    let started = Instant::now();
    // About 10 s to find it (a PING every 5 s, 3 s to answer), then reads
    // go to the database.
    eventually(Duration::from_secs(20), || async { ask.send(&worker.url).await.0 == StatusCode::UNAUTHORIZED }).await;
    println!("logout honoured {:?} after the subscription went silent", started.elapsed());
    assert!(!worker.app.caches.trusted());

    proxy.set_frozen_marked(false);
    let app = worker.app.clone();
    poll_until(Duration::from_secs(30), || app.caches.trusted()).await;
    assert_eq!(ask.send(&worker.url).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn redis_outage_bypasses_caches_and_catches_up() {
    let hs = Synapse::new();
    let alice = hs.register("alice").await;
    let carol = hs.register("carol").await;
    hs.upload_device_keys(&alice.session).await;
    hs.upload_device_keys(&carol.session).await;
    let redis_url = url::Url::parse(&std::env::var("SKW_TEST_REDIS_URL").expect("harness sets SKW_TEST_REDIS_URL")).unwrap();
    let proxy = TcpProxy::start(&format!("{}:{}", redis_url.host_str().unwrap(), redis_url.port().unwrap())).await;
    let mut c = config();
    c.synapse.redis.host = Some("127.0.0.1".into());
    c.synapse.redis.port = Some(proxy.port);
    let worker = ready_worker(c).await;
    let (a, cu) = (alice.user_id.clone(), carol.user_id.clone());
    let both = json!({"device_keys": {&a: [], &cu: []}});
    let only_carol = json!({"device_keys": {&cu: []}});
    converges(&worker, &carol.session, &both).await;

    // Redis goes away: the service notices and stops trusting its caches.
    proxy.set_open(false);
    let app = worker.app.clone();
    poll_until(Duration::from_secs(15), || !app.replication.connected()).await;
    assert!(!app.caches.trusted());
    // A change made meanwhile is visible at once (no cache in the way).
    let phone = hs.login(&alice, Some("phone")).await;
    hs.upload_device_keys(&phone).await;
    let ask = Ask::keys_query("v3", &carol.session.token, TokenIn::Header, &both);
    let (theirs, ours) = (ask.send(&env().synapse_url).await, ask.send(&worker.url).await);
    assert_eq!(ours, theirs, "correct while Redis is down");
    assert_eq!(ours.1["device_keys"][&a].as_object().unwrap().len(), 2);

    // Redis is back: reconnect, catch up the rows missed, trust again.
    let (caught_before, dropped_before) = (app.replication.caught_up_rows(), app.replication.dropped_all());
    proxy.set_open(true);
    poll_until(Duration::from_secs(30), || app.caches.trusted()).await;
    assert!(app.replication.reconnects() >= 1);
    // The rows missed are read back from the database when the writer's
    // position comes; a Synapse too slow to report it within the settle
    // time (a loaded machine) gets everything dropped instead. Either way
    // the answer below must be Synapse's.
    poll_until(Duration::from_secs(30), || {
        app.replication.caught_up_rows() > caught_before || app.replication.dropped_all() > dropped_before
    })
    .await;
    println!(
        "after the reconnect: {} rows caught up, everything dropped {} times",
        app.replication.caught_up_rows() - caught_before,
        app.replication.dropped_all() - dropped_before
    );
    converges(&worker, &carol.session, &both).await;
    // Caching resumes: carol's entries (unchanged) are hits again.
    let before = hits(&worker);
    converges(&worker, &carol.session, &only_carol).await;
    assert!(hits(&worker) > before, "cache hits rise again after the reconnect");
}

#[tokio::test]
async fn without_redis_the_stream_tables_are_polled() {
    let hs = Synapse::new();
    let alice = hs.register("alice").await;
    hs.upload_device_keys(&alice.session).await;
    let mut c = config();
    c.synapse.redis.enabled = false;
    let worker = ready_worker(c).await;
    assert_eq!(worker.app.replication.mode(), "poll");
    let body = json!({"device_keys": {&alice.user_id: []}});
    converges(&worker, &alice.session, &body).await;
    let phone = hs.login(&alice, None).await;
    hs.upload_device_keys(&phone).await;
    let d = converges(&worker, &alice.session, &body).await;
    println!("polling: change reached us in {d:?}");
    // The caches stream is polled too: a cached token logged out is
    // refused.
    let ask = Ask::keys_query("v3", &phone.token, TokenIn::Header, &body);
    eventually(Duration::from_secs(10), || async {
        assert_eq!(ask.send(&worker.url).await.0, StatusCode::OK);
        worker.app.caches.tokens.get_uncounted(&phone.token).is_some()
    })
    .await;
    hs.post("/_matrix/client/v3/logout", &phone.token, json!({})).await;
    eventually(Duration::from_secs(10), || async { ask.send(&worker.url).await.0 == StatusCode::UNAUTHORIZED }).await;
}

#[tokio::test]
async fn ready_reports_database_stream_and_writer() {
    let worker = ready_worker(config()).await;
    let (status, body) = Ask { method: Method::GET, path: "/ready".into(), headers: vec![], body: None }.send(&worker.url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["database"]["ok"], true);
    // The world's Synapse is one of the versions we test.
    assert_eq!(body["database"]["schema"]["window"], "inside", "{body}");
    assert!((92..=94).contains(&body["database"]["schema"]["version"].as_i64().unwrap()), "{body}");
    assert_eq!(body["replication"]["mode"], "redis");
    assert_eq!(body["replication"]["caught_up"], true);
    assert_eq!(body["writer"]["breaker"], "closed");

    // A database that does not answer: 503, while /health stays 200.
    let mut c = config();
    c.synapse.database = synapse_keys_worker::config::DatabaseConfig::Postgres(synapse_keys_worker::config::database::PostgresArgs {
        host: Some("127.0.0.1".into()),
        port: Some(crate::remote::closed_port().await),
        ..Default::default()
    });
    c.worker.db_acquire_timeout_ms = 500;
    let broken = spawn_worker_with(c).await;
    let (status, body) = Ask { method: Method::GET, path: "/ready".into(), headers: vec![], body: None }.send(&broken.url).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["database"]["ok"], false);
    // A short reason for an unauthenticated caller, not the driver's text.
    assert_eq!(body["database"]["error"], "unreachable", "{body}");
    let (status, _) = Ask { method: Method::GET, path: "/health".into(), headers: vec![], body: None }.send(&broken.url).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn repeated_query_mix_is_served_from_memory() {
    let hs = Synapse::new();
    let mut users = Vec::new();
    for i in 0..6 {
        let u = hs.register(&format!("mix{i}")).await;
        hs.upload_device_keys(&u.session).await;
        if i % 2 == 0 {
            hs.setup_cross_signing(&u.session).await;
        }
        users.push(u);
    }
    let worker = ready_worker(config()).await;
    let ids: Vec<String> = users.iter().map(|u| u.user_id.clone()).collect();
    let mix: Vec<Value> = (0..ids.len())
        .map(|i| json!({"device_keys": {&ids[i]: [], &ids[(i + 1) % ids.len()]: [], &ids[(i + 3) % ids.len()]: []}}))
        .collect();
    let run = async || {
        for (i, body) in mix.iter().enumerate() {
            let (status, _) = Ask::keys_query("v3", &users[i].session.token, TokenIn::Header, body).send(&worker.url).await;
            assert_eq!(status, StatusCode::OK);
        }
    };
    run().await; // warm-up
    let c = &worker.app.caches;
    let all = [&c.tokens.counters, &c.devices.counters, &c.cross_signing.counters, &c.signatures.counters];
    let count = |f: fn(&synapse_keys_worker::cache::guarded::Counters) -> u64| all.iter().map(|k| f(k)).sum::<u64>();
    let (h0, m0) = (count(|k| k.hits.load(Ordering::Relaxed)), count(|k| k.misses.load(Ordering::Relaxed)));
    for _ in 0..5 {
        run().await;
    }
    let (hits, misses) = (count(|k| k.hits.load(Ordering::Relaxed)) - h0, count(|k| k.misses.load(Ordering::Relaxed)) - m0);
    let ratio = hits as f64 / (hits + misses) as f64;
    println!("cache hit ratio on the repeated query mix: {ratio:.3} ({hits} hits, {misses} misses)");
    assert_eq!(misses, 0, "a warm repeated mix touches no cached table");
    // With nothing committed meanwhile, the read barrier's probe is the
    // quick one (the id sequence, no table read). Other tests write to the
    // same homeserver, so it may take a quiet moment.
    let barrier = worker.app.barrier.counters();
    let quick = || barrier.quick.load(Ordering::Relaxed);
    let before = quick();
    eventually(Duration::from_secs(15), || async {
        run().await;
        quick() > before
    })
    .await;
}
