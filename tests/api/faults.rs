//! Faults under load. The real binary serves a steady query load (local
//! users, a cached remote user, stale remote users) from a second process
//! (this one) while one fault at a time is injected: the writer stopped and
//! hung, Redis stopped, PostgreSQL gone and back (its connections cut and
//! refused, as in a restart: a real restart would take the test Synapse
//! down too), and a remote that hangs, sends garbage, 100 MB, a redirect
//! loop or one byte per second. For each: no 5xx but the documented 503
//! while the database is away, no answer later than the request's
//! `timeout` + 100 ms, no stale answer while the stream is down, and once
//! the fault clears, answers equal to Synapse's without restarting us.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_remote::{FakeRemote, Mode, Route};
use crate::helpers::{Ask, ServiceProcess, Synapse, TestUser, TokenIn, env, eventually, unique};
use crate::remote::share_a_room;
use crate::tcp_proxy::TcpProxy;

/// The `timeout` every load request carries.
const TIMEOUT_MS: u64 = 2_000;
/// Concurrent request loops.
const LOOPS: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    WriterStopped,
    WriterHanging,
    RedisStopped,
    DatabaseGone,
    Remote(RemoteFault),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum RemoteFault {
    Hangs,
    Garbage,
    Huge,
    RedirectLoop,
    Trickle,
}

impl RemoteFault {
    fn mode(self) -> Mode {
        match self {
            RemoteFault::Hangs => Mode::Hang,
            RemoteFault::Garbage => Mode::Garbage,
            RemoteFault::Huge => Mode::Huge,
            RemoteFault::RedirectLoop => Mode::RedirectLoop,
            RemoteFault::Trickle => Mode::Trickle,
        }
    }
}

/// What the load saw during one fault.
#[derive(Default, Debug)]
struct Tally {
    requests: usize,
    by_status: BTreeMap<u16, usize>,
    /// As this process saw it (its own scheduling included).
    worst: Duration,
    /// As the service logged it: from the request's arrival to its answer.
    worst_served: Duration,
}

/// The longest `elapsed_ms` of the `/keys/query` requests logged after
/// byte `from` of the log; and where the log ends now.
fn worst_logged(log: &std::path::Path, from: usize) -> (Duration, usize) {
    let text = std::fs::read_to_string(log).unwrap();
    let worst = text[from..]
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request" && v["span"]["path"].as_str().is_some_and(|p| p.ends_with("/keys/query")))
        .filter_map(|v| v["fields"]["elapsed_ms"].as_f64())
        .fold(0.0, f64::max);
    (Duration::from_secs_f64(worst / 1000.0), text.len())
}

struct World {
    hs: Synapse,
    me: TestUser,
    carol: TestUser,
    /// The cached user's server, kept up (Synapse answers for him from its cache).
    _remote: FakeRemote,
    cached: String,
    service: ServiceProcess,
    pg: TcpProxy,
    redis: TcpProxy,
    writer: TcpProxy,
}

pub fn host_port(url: &str) -> (String, u16) {
    let u = url::Url::parse(url).unwrap();
    (u.host_str().unwrap().to_owned(), u.port().unwrap())
}

/// The test homeserver's config with the database, Redis and the writer
/// reached through proxies the test controls.
pub fn config_through(pg: u16, redis: u16, writer: u16) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&env().homeserver_yaml).unwrap();
    let mut config: yaml_serde::Value = yaml_serde::from_str(&text).unwrap();
    config["database"]["args"]["port"] = pg.into();
    config["database"]["args"]["host"] = "127.0.0.1".into();
    config["redis"]["port"] = redis.into();
    config["redis"]["host"] = "127.0.0.1".into();
    config["instance_map"]["main"]["port"] = writer.into();
    config["instance_map"]["main"]["host"] = "127.0.0.1".into();
    let path = std::env::temp_dir().join(format!("{}.yaml", unique("faults")));
    std::fs::write(&path, yaml_serde::to_string(&config).unwrap()).unwrap();
    path
}

async fn world() -> World {
    let hs = Synapse::new();
    let me = hs.register("load").await;
    let carol = hs.register("carol").await;
    hs.upload_device_keys(&carol.session).await;
    let remote = FakeRemote::start_for_homeserver().await;
    let cached = remote.add_user(&unique("bob")).user_id;
    remote.add_device(&cached, "PHONE", Some("Phone"));
    share_a_room(&cached).await;
    // Synapse resyncs bob on first sight and keeps him cached.
    let (_, first) = Ask::keys_query("v3", &me.session.token, TokenIn::Header, &json!({"device_keys": {&cached: []}})).send(&hs.url).await;
    assert!(first["device_keys"][&cached]["PHONE"].is_object(), "{first}");

    let (pg_host, pg_port) = host_port(&env().pg_url);
    let (redis_host, redis_port) = host_port(&std::env::var("SKW_TEST_REDIS_URL").unwrap());
    let (writer_host, writer_port) = host_port(&std::env::var("SKW_TEST_REPLICATION_URL").unwrap());
    let pg = TcpProxy::start(&format!("{pg_host}:{pg_port}")).await;
    let redis = TcpProxy::start(&format!("{redis_host}:{redis_port}")).await;
    let writer = TcpProxy::start(&format!("{writer_host}:{writer_port}")).await;
    let config = config_through(pg.port, redis.port, writer.port);
    // JSON logs: each request's own time is read back from them. A short
    // breaker period, so that each writer fault meets a closed breaker.
    let settings = [("SYNAPSE_KEYS_WORKER_LOG_JSON", "true"), ("SYNAPSE_KEYS_WORKER_WRITER_BREAKER_MS", "1000")];
    let service = ServiceProcess::start_from(&config, &settings).await;
    World { hs, me, carol, _remote: remote, cached, service, pg, redis, writer }
}

impl World {
    /// A user of `remote` who shares a room with us and whom Synapse has
    /// never resynced: a query for them resyncs.
    async fn stale_user(remote: &FakeRemote) -> String {
        let user = remote.add_user(&unique("stale")).user_id;
        remote.add_device(&user, "DEV", None);
        share_a_room(&user).await;
        user
    }

    fn ask(&self, users: Value) -> Ask {
        let mut ask = Ask::keys_query("v3", &self.me.session.token, TokenIn::Header, &json!({ "device_keys": users }));
        ask.path.push_str(&format!("?timeout={TIMEOUT_MS}"));
        ask
    }

    /// Runs the load for `span`: every loop cycles through local users,
    /// the cached remote user and fresh stale users of `remote`.
    async fn load(&self, span: Duration, remote: &FakeRemote) -> Tally {
        let mut stale = Vec::new();
        for _ in 0..LOOPS * 2 {
            stale.push(Self::stale_user(remote).await);
        }
        let asks: Vec<Ask> = [
            self.ask(json!({&self.me.user_id: [], &self.carol.user_id: []})),
            self.ask(json!({&self.cached: []})),
            self.ask(json!({&self.carol.user_id: [], &self.cached: ["PHONE"]})),
        ]
        .into_iter()
        .chain(stale.iter().map(|u| self.ask(json!({ u: [] }))))
        .collect();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (_, log_from) = worst_logged(&self.service.log, 0);
        let until = Instant::now() + span;
        let loops = (0..LOOPS).map(|i| {
            let (asks, tally, url) = (asks.clone(), tally.clone(), self.service.url.clone());
            tokio::spawn(async move {
                let client = crate::helpers::http();
                let mut n = i;
                while Instant::now() < until {
                    let ask = &asks[n % asks.len()];
                    n += LOOPS;
                    let started = Instant::now();
                    let (status, body) = ask.send_with(&client, &url).await;
                    let took = started.elapsed();
                    let mut t = tally.lock().unwrap();
                    t.requests += 1;
                    *t.by_status.entry(status.as_u16()).or_default() += 1;
                    t.worst = t.worst.max(took);
                    if status.is_server_error() && status.as_u16() != 503 {
                        panic!("{status}: {body}");
                    }
                }
            })
        });
        for l in futures::future::join_all(loops).await {
            l.unwrap();
        }
        let mut tally = Arc::into_inner(tally).unwrap().into_inner().unwrap();
        tally.worst_served = worst_logged(&self.service.log, log_from).0;
        tally
    }

    /// Ours equals Synapse's for local users and the cached remote user.
    async fn agrees_with_synapse(&self) -> bool {
        let ask = self.ask(json!({&self.me.user_id: [], &self.carol.user_id: [], &self.cached: []}));
        let ours = ask.send(&self.service.url).await;
        let theirs = ask.send(&self.hs.url).await;
        ours == theirs
    }

    /// Sets or clears `fault`; a remote fault is `remote`'s.
    fn inject(&self, fault: Fault, on: bool, remote: &FakeRemote) {
        match fault {
            Fault::WriterStopped => self.writer.set_open(!on),
            Fault::WriterHanging => self.writer.set_frozen(on),
            Fault::RedisStopped => self.redis.set_open(!on),
            Fault::DatabaseGone => self.pg.set_open(!on),
            Fault::Remote(r) => {
                let mode = if on { r.mode() } else { Mode::Normal };
                remote.set_mode(Route::UserDevices, mode);
                remote.set_mode(Route::UserKeysQuery, mode);
            }
        }
    }
}

#[tokio::test]
async fn faults_under_load_give_no_5xx_no_late_answer_and_recover() {
    let w = world().await;
    eventually(Duration::from_secs(20), || w.agrees_with_synapse()).await;
    let faults = [
        Fault::WriterHanging,
        Fault::WriterStopped,
        Fault::RedisStopped,
        Fault::DatabaseGone,
        Fault::Remote(RemoteFault::Hangs),
        Fault::Remote(RemoteFault::Garbage),
        Fault::Remote(RemoteFault::Huge),
        Fault::Remote(RemoteFault::RedirectLoop),
        Fault::Remote(RemoteFault::Trickle),
    ];
    let mut table = Vec::new();
    for fault in faults {
        // The stale users' server is new each time: neither Synapse nor we
        // back off from it because of an earlier fault.
        let remote = FakeRemote::start_for_homeserver().await;
        w.inject(fault, true, &remote);
        if fault == Fault::RedisStopped {
            // No stale answer while the stream is down: a device carol
            // adds now is in our very next answer.
            let phone = w.hs.login(&w.carol, Some("new phone")).await;
            w.hs.upload_device_keys(&phone).await;
            let (_, answer) = w.ask(json!({&w.carol.user_id: []})).send(&w.service.url).await;
            assert!(answer["device_keys"][&w.carol.user_id][&phone.device_id].is_object(), "stale while Redis is down: {answer}");
        }
        let during = w.load(Duration::from_secs(3), &remote).await;
        w.inject(fault, false, &remote);
        // Recovered without a restart: the same answers as Synapse.
        eventually(Duration::from_secs(30), || w.agrees_with_synapse()).await;
        let after = w.load(Duration::from_secs(1), &remote).await;
        table.push((fault, during, after));
    }
    println!("| fault | requests | by status | worst served / seen | after: requests | by status | worst served / seen |");
    println!("|---|---|---|---|---|---|---|");
    let ms = |d: Duration| d.as_millis();
    for (fault, d, a) in &table {
        println!(
            "| {fault:?} | {} | {:?} | {} / {} ms | {} | {:?} | {} / {} ms |",
            d.requests,
            d.by_status,
            ms(d.worst_served),
            ms(d.worst),
            a.requests,
            a.by_status,
            ms(a.worst_served),
            ms(a.worst)
        );
    }
    // The service's own time, arrival to answer, is held to the timeout
    // plus 100 ms; what this busy process saw, more loosely.
    let bound = Duration::from_millis(TIMEOUT_MS + 100);
    for (fault, during, after) in &table {
        for (when, t) in [("during", during), ("after", after)] {
            assert!(t.requests > 0, "{fault:?} {when}: no request answered");
            assert!(t.worst_served <= bound, "{fault:?} {when}: an answer took {:?} (timeout {TIMEOUT_MS} ms)", t.worst_served);
            if when == "during" && matches!(fault, Fault::WriterHanging | Fault::Remote(RemoteFault::Hangs | RemoteFault::Trickle)) {
                // The hang was met: the writer got its half of the timeout.
                assert!(t.worst_served >= Duration::from_millis(TIMEOUT_MS / 2), "{fault:?}: no request met the hang");
            }
            assert!(t.worst <= bound + Duration::from_secs(1), "{fault:?} {when}: an answer came {:?} after it was asked", t.worst);
            let errors: usize = t.by_status.iter().filter(|(s, _)| **s >= 500).map(|(_, n)| n).sum();
            let allowed = if *fault == Fault::DatabaseGone && when == "during" { t.by_status.get(&503).copied().unwrap_or(0) } else { 0 };
            assert_eq!(errors, allowed, "{fault:?} {when}: {:?}", t.by_status);
        }
    }
}
