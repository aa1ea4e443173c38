//! Real federation: two Synapses of the test world ("synapse-fed", the
//! homeserver we serve here, and "synapse-remote") federating over TLS on
//! loopback. The remote users are real: they share rooms with ours through
//! real invites and joins, their device changes reach "synapse-fed" as
//! `m.device_list_update` EDUs, and when we talk to their server ourselves
//! it checks our X-Matrix signature. Every answer is compared with the one
//! "synapse-fed" gives to the same question.

use serde_json::{Value, json};
use synapse_keys_worker::config::Config;

use crate::helpers::{Ask, Synapse, TestUser, TokenIn, converges, eventually, eventually_some, ready_worker, spawn_worker_with, var};
use crate::remote::{closed_port, with_writer};
use crate::writer_proxy::CountingProxy;

/// What scripts/world.py exports about the two federating homeservers.
pub struct Fed {
    /// Ours: the homeserver our service serves.
    pub url: String,
    pub yaml: std::path::PathBuf,
    pub server_name: String,
    /// The remote homeserver.
    pub remote_url: String,
    pub remote_server_name: String,
    pub remote_log: std::path::PathBuf,
}

pub fn fed() -> Fed {
    Fed {
        url: var("SKW_TEST_FED_SYNAPSE_URL"),
        yaml: var("SKW_TEST_FED_HOMESERVER_YAML").into(),
        server_name: var("SKW_TEST_FED_SERVER_NAME"),
        remote_url: var("SKW_TEST_REMOTE_SYNAPSE_URL"),
        remote_server_name: var("SKW_TEST_REMOTE_SERVER_NAME"),
        remote_log: var("SKW_TEST_REMOTE_LOG").into(),
    }
}

pub fn config() -> Config {
    Config::load(&[fed().yaml], Vec::new()).unwrap()
}

/// A local user (on "synapse-fed") and a remote one (on "synapse-remote")
/// in a room the remote user made: invited over federation, joined over
/// federation.
pub struct Pair {
    pub env: Fed,
    pub ours: Synapse,
    pub remote: Synapse,
    pub local: TestUser,
    pub bob: TestUser,
}

impl Pair {
    pub async fn new() -> Self {
        let env = fed();
        let (ours, remote) = (Synapse::at(&env.url), Synapse::at(&env.remote_url));
        let local = ours.register("alice").await;
        let bob = remote.register("bob").await;
        assert!(local.user_id.ends_with(&format!(":{}", env.server_name)), "{}", local.user_id);
        assert!(bob.user_id.ends_with(&format!(":{}", env.remote_server_name)), "{}", bob.user_id);
        Self { env, ours, remote, local, bob }
    }

    /// The remote user makes a room and invites ours (the invite goes over
    /// federation before createRoom answers), and ours joins it: a join
    /// over federation (make_join and send_join to the remote; Synapse
    /// joins with partial state, then fetches the rest).
    pub async fn share_a_room(&self) {
        self.share_a_room_of(Side::Theirs).await;
    }

    /// A room made by one side, the other invited and joining it over
    /// federation.
    async fn share_a_room_of(&self, side: Side) {
        let ((owner_hs, owner), (member_hs, member)) = match side {
            Side::Theirs => ((&self.remote, &self.bob), (&self.ours, &self.local)),
            Side::Ours => ((&self.ours, &self.local), (&self.remote, &self.bob)),
        };
        let body = json!({"preset": "private_chat", "invite": [&member.user_id]});
        let room = owner_hs.post("/_matrix/client/v3/createRoom", &owner.session.token, body).await;
        let room_id = room["room_id"].as_str().unwrap().to_owned();
        member_hs.post(&format!("/_matrix/client/v3/rooms/{room_id}/join"), &member.session.token, json!({})).await;
    }

    /// Ours asking for bob's devices.
    pub fn ask(&self) -> Ask {
        Ask::keys_query("v3", &self.local.session.token, TokenIn::Header, &json!({"device_keys": {&self.bob.user_id: []}}))
    }
}

/// Whose homeserver makes the shared room.
#[derive(Clone, Copy, Debug)]
enum Side {
    Theirs,
    Ours,
}

/// The device IDs with keys a `/keys/query` answer gives for `user`.
fn devices(answer: &Value, user: &str) -> Vec<String> {
    let mut ids: Vec<String> = answer["device_keys"][user].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    ids.sort();
    ids
}

/// Access-log lines of the remote homeserver for requests we sent (our
/// user agent) whose request line contains `path`.
fn our_requests_at_remote(env: &Fed, path: &str) -> Vec<String> {
    let log = std::fs::read_to_string(&env.remote_log).unwrap();
    let ua = format!("\"{}\"", synapse_keys_worker::federation::USER_AGENT);
    log.lines().filter(|l| l.contains("Processed request") && l.contains(&ua) && l.contains(path)).map(str::to_owned).collect()
}

/// Bob uploads keys after ours started tracking his device list: the
/// EDU brings them to "synapse-fed"'s device-list cache, and we answer from
/// that cache exactly as Synapse. (Synapse resyncs by itself when an EDU's
/// `prev_id` is not the last it stored, and we may then ask the writer
/// too while its stale mark is there; either way the answer ends up read
/// from its cache, which is the only source adding an empty `unsigned`.)
#[tokio::test]
async fn remote_keys_arrive_as_edus_and_are_served_from_synapses_cache() {
    edus_reach_synapses_cache_and_us(Side::Theirs).await;
}

/// The same with the room on our side: bob joins it over federation
/// (full state on our homeserver from the start).
#[tokio::test]
async fn remote_keys_arrive_as_edus_in_a_room_of_ours() {
    edus_reach_synapses_cache_and_us(Side::Ours).await;
}

async fn edus_reach_synapses_cache_and_us(side: Side) {
    let p = Pair::new().await;
    p.share_a_room_of(side).await;
    // Synapse starts tracking bob's list on the first query for him.
    p.ours.post("/_matrix/client/v3/keys/query", &p.local.session.token, json!({"device_keys": {&p.bob.user_id: []}})).await;
    let worker = ready_worker(config()).await;
    let ask = p.ask();
    converges(&worker, &p.env.url, &ask, "tracked, no keys yet", |_| true).await;

    let (keys, _) = p.remote.upload_device_keys(&p.bob.session).await;
    let dev = p.bob.session.device_id.clone();
    let answer = converges(&worker, &p.env.url, &ask, "device keys by EDU", |a| devices(a, &p.bob.user_id) == [dev.clone()]).await;
    assert_eq!(answer["device_keys"][&p.bob.user_id][&dev]["keys"], keys["keys"], "{answer}");
    assert_eq!(answer["device_keys"][&p.bob.user_id][&dev]["unsigned"], json!({}), "read from the cache: {answer}");

    let cs = p.remote.setup_cross_signing(&p.bob.session).await;
    let answer = converges(&worker, &p.env.url, &ask, "cross-signing keys by EDU", |a| {
        a["master_keys"][&p.bob.user_id].is_object() && a["self_signing_keys"][&p.bob.user_id].is_object()
    })
    .await;
    let master = answer["master_keys"][&p.bob.user_id]["keys"].to_string();
    assert!(master.contains(&cs.master.public), "{answer}");
    assert_eq!(our_requests_at_remote(&p.env, &percent(&p.bob.user_id)), Vec::<String>::new(), "we never asked the remote");
}

/// Bob adds a device and deletes one: each change reaches "synapse-fed" as
/// an EDU, the replication stream (or the read barrier) drops what we
/// held, and our answer follows Synapse's.
#[tokio::test]
async fn remote_device_added_and_deleted_follow_the_edus() {
    let p = Pair::new().await;
    p.remote.upload_device_keys(&p.bob.session).await;
    p.share_a_room().await;
    p.ours.post("/_matrix/client/v3/keys/query", &p.local.session.token, json!({"device_keys": {&p.bob.user_id: []}})).await;
    let worker = ready_worker(config()).await;
    let ask = p.ask();
    let first = p.bob.session.device_id.clone();
    converges(&worker, &p.env.url, &ask, "one device", |a| devices(a, &p.bob.user_id) == [first.clone()]).await;

    let second = p.remote.login(&p.bob, Some("second device")).await;
    p.remote.upload_device_keys(&second).await;
    let mut both = vec![first.clone(), second.device_id.clone()];
    both.sort();
    let answer = converges(&worker, &p.env.url, &ask, "a device added", |a| devices(a, &p.bob.user_id) == both).await;
    // Device names stay home (allow_device_name_lookup_over_federation
    // is off by default).
    assert_eq!(answer["device_keys"][&p.bob.user_id][&second.device_id]["unsigned"], json!({}), "{answer}");

    p.remote.delete_device(&p.bob, &first).await;
    converges(&worker, &p.env.url, &ask, "a device deleted", |a| devices(a, &p.bob.user_id) == [second.device_id.clone()]).await;
    assert_eq!(our_requests_at_remote(&p.env, &percent(&p.bob.user_id)), Vec::<String>::new(), "we never asked the remote");
}

/// "synapse-fed" has never fetched bob's device list (nobody asked since
/// they came to share a room): we ask the writer (its main process) to
/// resync him, and the writer fetches it from the remote and stores it.
/// Our first answer is the resync's result, as Synapse's is when its own
/// query triggers the resync (device keys as the remote sent them, no
/// `unsigned`); from then on both answer from what the writer stored.
#[tokio::test]
async fn unknown_remote_list_is_resynced_by_the_writer() {
    let p = Pair::new().await;
    let (keys, _) = p.remote.upload_device_keys(&p.bob.session).await;
    let cs = p.remote.setup_cross_signing(&p.bob.session).await;
    p.share_a_room().await;
    let proxy = CountingProxy::start_for(&config()).await;
    let worker = ready_worker(with_writer(config(), proxy.port)).await;
    let ask = p.ask();

    let (status, ours) = ask.send(&worker.url).await;
    assert_eq!(status, 200);
    let dev = &p.bob.session.device_id;
    assert_eq!(ours["device_keys"][&p.bob.user_id][dev]["keys"], keys["keys"], "{ours}");
    assert!(ours["master_keys"][&p.bob.user_id]["keys"].to_string().contains(&cs.master.public), "{ours}");
    assert_eq!(proxy.calls(), 1, "one resync asked of the writer");
    assert_eq!(worker.app.remote.coordinator.outcomes().writer_ok, 1);
    assert_eq!(our_requests_at_remote(&p.env, &percent(&p.bob.user_id)), Vec::<String>::new(), "the writer, not us, asked the remote");
    let cached = converges(&worker, &p.env.url, &ask, "from what the writer stored", |_| true).await;
    assert_eq!(proxy.calls(), 1, "no second resync");
    // Synapse's answers from its cache add an empty `unsigned` (its
    // resync answers do not, see `E2eKeysHandler._query_devices_for_destination`).
    let mut resynced = cached.clone();
    resynced["device_keys"][&p.bob.user_id][dev].as_object_mut().unwrap().remove("unsigned");
    assert_eq!(ours, resynced, "our first answer is Synapse's without what its cache adds");
}

/// The writer is down: we resync bob ourselves, over TLS to the real
/// remote (its certificate self-signed, `federation_verify_certificates:
/// false`), with our X-Matrix signature, which the remote accepts (its
/// access log names our server as the authenticated origin of a 200).
#[tokio::test]
async fn writer_down_we_ask_the_real_remote_and_it_accepts_our_signature() {
    let p = Pair::new().await;
    let (keys, _) = p.remote.upload_device_keys(&p.bob.session).await;
    let second = p.remote.login(&p.bob, Some("laptop")).await;
    p.remote.upload_device_keys(&second).await;
    p.remote.setup_cross_signing(&p.bob.session).await;
    p.share_a_room().await;
    let worker = spawn_worker_with(with_writer(config(), closed_port().await)).await;
    let ask = p.ask();

    let (status, ours) = ask.send(&worker.url).await;
    assert_eq!(status, 200);
    let mut want = vec![p.bob.session.device_id.clone(), second.device_id.clone()];
    want.sort();
    assert_eq!(devices(&ours, &p.bob.user_id), want, "{ours}");
    assert_eq!(ours["device_keys"][&p.bob.user_id][&p.bob.session.device_id]["keys"], keys["keys"]);
    assert_eq!(ours["failures"], json!({}));
    assert_eq!(worker.app.remote.coordinator.outcomes().fallback_ok, 1);
    let path = format!("GET /_matrix/federation/v1/user/devices/{}", percent(&p.bob.user_id));
    // Synapse writes the access-log line once the response is sent.
    let accepted = eventually_some(LOG_WAIT, || async { Some(our_requests_at_remote(&p.env, &path)).filter(|l| !l.is_empty()) }).await;
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert!(accepted[0].contains(&format!("{{{}}}", p.env.server_name)), "authenticated as us: {}", accepted[0]);
    assert!(accepted[0].contains(&format!(" 200 \"{path}")), "{}", accepted[0]);
    // Synapse, asked next, resyncs him through its own main process.
    let theirs = ask.send(&p.env.url).await;
    assert_eq!((status, ours), theirs, "left: ours, right: Synapse's");
}

/// A remote user sharing no room with ours: nobody tracks his list, so
/// Synapse and we both ask his server's `/user/keys/query` directly (the
/// writer is not involved); the remote accepts our signed request and
/// both answers are the same.
#[tokio::test]
async fn untracked_remote_user_is_asked_over_federation_like_synapse() {
    let p = Pair::new().await;
    let (keys, _) = p.remote.upload_device_keys(&p.bob.session).await;
    p.remote.setup_cross_signing(&p.bob.session).await;
    let proxy = CountingProxy::start_for(&config()).await;
    let worker = spawn_worker_with(with_writer(config(), proxy.port)).await;
    let ask = p.ask();
    let path = "POST /_matrix/federation/v1/user/keys/query";
    let accepted = || {
        let from_us = format!("{{{}}}", p.env.server_name);
        our_requests_at_remote(&p.env, path).into_iter().filter(|l| l.contains(&from_us) && l.contains(" 200 ")).count()
    };
    let before = accepted();
    let ours = ask.send(&worker.url).await;
    // Synapse writes the access-log line once the response is sent.
    eventually(LOG_WAIT, || async { accepted() == before + 1 }).await;
    let theirs = ask.send(&p.env.url).await;
    assert_eq!(ours, theirs, "left: ours, right: Synapse's");
    assert_eq!(theirs.1["device_keys"][&p.bob.user_id][&p.bob.session.device_id]["keys"], keys["keys"], "{}", theirs.1);
    assert!(theirs.1["master_keys"][&p.bob.user_id].is_object(), "{}", theirs.1);
    assert_eq!(proxy.calls(), 0, "no resync for a user sharing no room");
}

/// Loopback is reachable only because the test config's
/// `ip_range_whitelist` opens it (these homeservers keep Synapse's
/// default blocklist), and the self-signed certificate is accepted only
/// because `federation_verify_certificates` is false: without either, we
/// never reach the remote.
#[tokio::test]
async fn loopback_needs_the_whitelist_and_self_signed_needs_no_verification() {
    let p = Pair::new().await;
    p.remote.upload_device_keys(&p.bob.session).await;
    p.share_a_room().await;
    let mut no_whitelist = with_writer(config(), closed_port().await);
    assert_eq!(no_whitelist.synapse.federation.ip_range_blocklist, None, "Synapse's default blocklist");
    assert_eq!(no_whitelist.synapse.federation.ip_range_whitelist, ["127.0.0.1", "::1"]);
    assert!(!no_whitelist.synapse.federation.verify_certificates);
    no_whitelist.synapse.federation.ip_range_whitelist.clear();
    let mut verifying = with_writer(config(), closed_port().await);
    verifying.synapse.federation.verify_certificates = true;
    let path = percent(&p.bob.user_id);
    for (what, config) in [("no whitelist", no_whitelist), ("certificates verified", verifying)] {
        let worker = spawn_worker_with(config).await;
        let (status, ours) = p.ask().send(&worker.url).await;
        assert_eq!(status, 200);
        assert_eq!(devices(&ours, &p.bob.user_id), Vec::<String>::new(), "{what}: {ours}");
        assert_eq!(ours["failures"][&p.env.remote_server_name]["status"], 503, "{what}: {ours}");
        assert_eq!(our_requests_at_remote(&p.env, &path), Vec::<String>::new(), "{what}");
    }
}

/// Destinations we cannot reach, failed in Synapse's words: a server name
/// that is an IP literal (Synapse checks literals against its blocklist
/// alone, so 127.0.0.1 is refused although the whitelist names it), a name
/// that does not resolve, and a port nobody listens on.
#[tokio::test]
async fn unreachable_destinations_fail_in_synapses_words() {
    let env = fed();
    let alice: TestUser = Synapse::at(&env.url).register("alice").await;
    // Fresh destinations each run: Synapse backs off from a failed one,
    // which would change its answer.
    let literal = format!("127.0.0.1:{}", closed_port().await);
    let nowhere = format!("{}.invalid", crate::helpers::unique("nowhere"));
    let refused = format!("localhost:{}", closed_port().await);
    let worker = spawn_worker_with(config()).await;
    let users: serde_json::Map<String, Value> = [&literal, &nowhere, &refused].iter().map(|d| (format!("@x:{d}"), json!([]))).collect();
    let ask = Ask::keys_query("v3", &alice.session.token, TokenIn::Header, &json!({ "device_keys": users }));
    // Ours first: Synapse's failure puts the destination in backoff.
    let mine = ask.send(&worker.url).await;
    let theirs = ask.send(&env.url).await;
    assert_eq!(mine, theirs, "left: ours, right: Synapse's");
    let failures = &theirs.1["failures"];
    assert_eq!(failures[&literal]["message"], "Failed to send request: SynapseError: 403: IP address blocked");
    assert_eq!(
        failures[&nowhere]["message"],
        format!("Failed to send request: DNSLookupError: DNS lookup failed: no results for hostname lookup: {nowhere}.")
    );
    assert_eq!(
        failures[&refused]["message"],
        "Failed to send request: ConnectionRefusedError: Connection was refused by other side: 111: Connection refused."
    );
}

/// How long the remote may take to log a request it answered.
const LOG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn percent(user_id: &str) -> String {
    synapse_keys_worker::federation::percent_encode(user_id)
}
