//! The memory caches of the hot path and the cached reads that use them.
//! Entries are per user (or per token); the replication listener keeps them
//! correct by invalidating what changed (see `crate::replication`), and a
//! TTL bounds any entry's life as a safety net.

pub mod guarded;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

pub use guarded::{GuardedCache, Ticket, Trust};

use crate::config::WorkerConfig;
use crate::keys::rendered::{CrossSigningKey, RenderedDevices};
use crate::keys::{LocalReads, RemoteUser};
use crate::schema_window::SchemaStatus;
use crate::store::{DeviceIdRow, DeviceKeyRow, RemoteDeviceRow, SignatureRow, Store, TokenRow};

type PerUser<V> = GuardedCache<String, Arc<Vec<V>>>;

/// Values per user, keyed by the caller's user IDs.
pub type ByUser<'a, V> = HashMap<&'a str, V, foldhash::fast::RandomState>;

pub struct Caches {
    trust: Arc<Trust>,
    pub tokens: GuardedCache<String, Arc<TokenRow>>,
    /// Rendered from the user's device rows and own signatures: invalidated
    /// by either.
    pub devices: GuardedCache<String, Arc<RenderedDevices>>,
    pub cross_signing: PerUser<CrossSigningKey>,
    /// Keyed by the signing user.
    pub signatures: PerUser<SignatureRow>,
    pub remote: GuardedCache<String, Arc<RemoteUser>>,
    /// Every device of a user, keys or not (the MAS device check).
    pub device_ids: PerUser<DeviceIdRow>,
    /// Users known to exist (the MAS user check); users are never deleted.
    pub known_users: GuardedCache<String, ()>,
    /// The database's schema record: which release's rule renders a
    /// device's `signatures` (read again every minute and at every
    /// `/ready`; a cached rendering under the other rule is a miss).
    schema: Arc<SchemaStatus>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches").field("trusted", &self.trust.get()).finish_non_exhaustive()
    }
}

fn weight(strings: impl Iterator<Item = usize>) -> u32 {
    u32::try_from(strings.sum::<usize>() + 64).unwrap_or(u32::MAX)
}

impl Caches {
    pub fn new(w: &WorkerConfig, schema: Arc<SchemaStatus>) -> Self {
        let trust = Arc::new(Trust::default());
        let ttl = Duration::from_millis(w.cache_ttl_ms);
        let bytes = w.cache_max_bytes;
        Self {
            tokens: GuardedCache::new("tokens", w.token_cache_max_entries, ttl, |_: &String, _: &Arc<TokenRow>| 1, trust.clone()),
            devices: GuardedCache::new(
                "device_keys",
                bytes,
                ttl,
                |k: &String, v: &Arc<RenderedDevices>| weight([k.len(), v.weight()].into_iter()),
                trust.clone(),
            ),
            cross_signing: GuardedCache::new(
                "cross_signing_keys",
                bytes,
                ttl,
                |k: &String, v: &Arc<Vec<CrossSigningKey>>| weight(std::iter::once(k.len()).chain(v.iter().map(CrossSigningKey::weight))),
                trust.clone(),
            ),
            signatures: GuardedCache::new(
                "signatures",
                bytes,
                ttl,
                |k: &String, v: &Arc<Vec<SignatureRow>>| {
                    weight(
                        std::iter::once(k.len()).chain(
                            v.iter().map(|r| r.key_id.len() + r.target_user_id.len() + r.target_device_id.len() + r.signature.len()),
                        ),
                    )
                },
                trust.clone(),
            ),
            remote: GuardedCache::new(
                "remote_devices",
                bytes,
                Duration::from_millis(w.remote_status_ttl_ms.min(w.cache_ttl_ms)),
                |k: &String, v: &Arc<RemoteUser>| weight([k.len(), v.devices.weight()].into_iter()),
                trust.clone(),
            ),
            device_ids: GuardedCache::new(
                "device_ids",
                bytes,
                ttl,
                |k: &String, v: &Arc<Vec<DeviceIdRow>>| weight(std::iter::once(k.len()).chain(v.iter().map(|r| r.device_id.len()))),
                trust.clone(),
            ),
            known_users: GuardedCache::new("known_users", w.token_cache_max_entries, ttl, |_: &String, _: &()| 1, trust.clone()),
            trust,
            schema,
        }
    }

    /// Every cache, for metrics.
    pub fn stats(&self) -> [guarded::Stats; 7] {
        [
            self.tokens.stats(),
            self.devices.stats(),
            self.cross_signing.stats(),
            self.signatures.stats(),
            self.remote.stats(),
            self.device_ids.stats(),
            self.known_users.stats(),
        ]
    }

    /// Whether the caches answer (the replication stream is followed).
    pub fn trusted(&self) -> bool {
        self.trust.get()
    }

    /// Invalidations so far (see [`Trust::changes`]).
    pub fn changes(&self) -> u64 {
        self.trust.changes()
    }

    /// Turns the caches on (caught up with the stream) or off (lost it).
    pub fn set_trusted(&self, trusted: bool) {
        self.trust.set(trusted);
    }

    /// Everything held about `user` (their devices, keys, signatures).
    pub fn invalidate_user(&self, user: &str) {
        // The rendered devices last: they are built from the signatures.
        self.signatures.invalidate(user);
        self.devices.invalidate(user);
        self.device_ids.invalidate(user);
        self.cross_signing.invalidate(user);
        self.remote.invalidate(user);
    }

    pub fn invalidate_token(&self, token: &str) {
        self.tokens.invalidate(token);
    }

    /// Every cached token acting as or owned by `user`.
    pub fn invalidate_tokens_of(&self, user: &str) {
        let user = user.to_owned();
        self.tokens.invalidate_if(move |_, row| row.user_id == user || row.token_owner == user);
    }

    pub fn invalidate_all_tokens(&self) {
        self.tokens.invalidate_all();
    }

    /// `user`'s cross-signing keys; everyone's when `None`.
    pub fn invalidate_cross_signing_keys(&self, user: Option<&str>) {
        match user {
            Some(u) => self.cross_signing.invalidate(u),
            None => self.cross_signing.invalidate_all(),
        }
    }

    /// The signatures `signer` made, and so `signer`'s rendered devices
    /// (after the signatures: a rendering started before this call is
    /// refused, one started after it reads the new signatures).
    pub fn invalidate_signatures_by(&self, signer: &str) {
        self.signatures.invalidate(signer);
        self.devices.invalidate(signer);
    }

    /// `user`'s devices (with and without keys).
    pub fn invalidate_devices(&self, user: &str) {
        self.devices.invalidate(user);
        self.device_ids.invalidate(user);
    }

    /// What Synapse's tables say about remote `user`; about everyone when
    /// `None`.
    pub fn invalidate_remote(&self, user: Option<&str>) {
        match user {
            Some(u) => self.remote.invalidate(u),
            None => self.remote.invalidate_all(),
        }
    }

    pub fn invalidate_all(&self) {
        self.tokens.invalidate_all();
        self.signatures.invalidate_all();
        self.devices.invalidate_all();
        self.cross_signing.invalidate_all();
        self.remote.invalidate_all();
        self.device_ids.invalidate_all();
        self.known_users.invalidate_all();
    }

    /// The access token's row, from memory or the database.
    pub async fn token(&self, store: &Store, token: &str) -> Result<Option<Arc<TokenRow>>, sqlx::Error> {
        if let Some(hit) = self.tokens.get(token) {
            return Ok(Some(hit));
        }
        let ticket = self.tokens.ticket(token);
        let Some(row) = store.token_lookup(token).await? else { return Ok(None) };
        let row = Arc::new(row);
        self.tokens.insert(token.to_owned(), row.clone(), ticket);
        Ok(Some(row))
    }

    /// Whether `user_id` is registered (Synapse's `get_user_by_id`); only
    /// a yes is kept.
    pub async fn user_exists(&self, store: &Store, user_id: &str) -> Result<bool, sqlx::Error> {
        if self.known_users.get(user_id).is_some() {
            return Ok(true);
        }
        let ticket = self.known_users.ticket(user_id);
        let exists = store.user_exists(user_id).await?;
        if exists {
            self.known_users.insert(user_id.to_owned(), (), ticket);
        }
        Ok(exists)
    }

    /// Whether the user has this (non-hidden) device (Synapse's
    /// `get_device`): from the user's cached device list, and from the
    /// database when the list lacks it (a device may be created without a
    /// device-list change, so a no is never trusted from memory).
    pub async fn device_exists(&self, store: &Store, user_id: &str, device_id: &str) -> Result<bool, sqlx::Error> {
        let lists = per_user(&self.device_ids, &[user_id], |m| async move { Ok(grouped(store.device_ids(&m).await?)) }).await?;
        if lists.get(user_id).is_some_and(|l| l.iter().any(|r| r.device_id == device_id)) {
            return Ok(true);
        }
        store.device_exists(user_id, device_id).await
    }

    /// What a `/keys/query` reads of local users (see
    /// [`crate::keys::Context::local_reads`]): hits from memory, every miss
    /// in one statement. The devices' tickets are taken before their
    /// owners' signatures are looked up: a signature change invalidates the
    /// signatures, then the rendered devices, so a rendering from
    /// signatures read before it is refused.
    pub async fn local_reads<'a>(
        &self,
        store: &Store,
        local: &[&'a str],
        queried: &[&'a str],
        requester: &'a str,
    ) -> Result<LocalReads<'a>, sqlx::Error> {
        let (mut devices, mut misses) = lookup(&self.devices, local.iter().copied());
        // Rendered before Synapse was upgraded past 1.138: render again.
        if let Some(rule) = self.schema.owner_entry_always() {
            devices.retain(|u, d| {
                let keep = d.owner_entry_always.is_none_or(|r| r == rule);
                if !keep {
                    misses.push(*u);
                }
                keep
            });
        }
        let devices_due = Due::new(&self.devices, misses);
        let signers = devices_due.users.iter().copied().chain([requester]);
        let (mut signatures, misses) = lookup(&self.signatures, signers);
        let signatures_due = Due::new(&self.signatures, misses);
        let (mut keys, misses) = lookup(&self.cross_signing, queried.iter().copied());
        let keys_due = Due::new(&self.cross_signing, misses);
        if !(devices_due.users.is_empty() && signatures_due.users.is_empty() && keys_due.users.is_empty()) {
            let rows = store.query_reads(&devices_due.users, &signatures_due.users, &keys_due.users).await?;
            signatures_due.fill(&self.signatures, grouped(rows.signatures), &mut signatures);
            let device_rows = grouped(rows.device_keys);
            let owner_entry_always = match devices_due.users.is_empty() {
                true => true,
                false => self.schema.owner_entry_rule(store).await?,
            };
            let rendered = devices_due
                .users
                .iter()
                .map(|u| {
                    let own = signatures.get(u).map_or(&[][..], |s| s.as_slice());
                    let rows = device_rows.get(*u).map_or(&[][..], |r| r.as_slice());
                    ((*u).to_owned(), Arc::new(RenderedDevices::local(rows, own, owner_entry_always)))
                })
                .collect();
            devices_due.fill(&self.devices, rendered, &mut devices);
            let mut parsed: HashMap<String, Vec<CrossSigningKey>> = HashMap::new();
            for (row, key) in rows.cross_signing_keys.iter().filter_map(|r| Some((r, CrossSigningKey::parse(r)?))) {
                parsed.entry(row.user_id.clone()).or_default().push(key);
            }
            keys_due.fill(&self.cross_signing, parsed.into_iter().map(|(u, k)| (u, Arc::new(k))).collect(), &mut keys);
        }
        let requester_signatures = signatures.remove(requester).unwrap_or_default();
        Ok(LocalReads { devices, cross_signing_keys: keys, requester_signatures })
    }

    /// What Synapse's tables say about each of the remote `users`.
    pub async fn remote_users(&self, store: &Store, users: &[&str]) -> Result<HashMap<String, Arc<RemoteUser>>, sqlx::Error> {
        let found = per_user(&self.remote, users, |m| async move {
            let (cached, sharing, rows) =
                tokio::try_join!(store.remote_cached_users(&m), store.users_in_a_room_with_us(&m), store.remote_cached_devices(&m),)?;
            let cached: HashSet<String> = cached.into_iter().collect();
            let sharing: HashSet<String> = sharing.into_iter().collect();
            let rows = grouped(rows);
            let remote_user = |u: &str| RemoteUser {
                in_synapse_cache: cached.contains(u),
                shares_a_room: sharing.contains(u),
                devices: Arc::new(rows.get(u).map(|r| RenderedDevices::remote_cached(r)).unwrap_or_default()),
            };
            Ok(m.iter().map(|u| ((*u).to_owned(), Arc::new(remote_user(u)))).collect())
        })
        .await?;
        Ok(found.into_iter().map(|(u, v)| (u.to_owned(), v)).collect())
    }
}

/// Rows that belong to one user (the cache key).
trait OwnedBy {
    fn owner(&self) -> &str;
}

impl OwnedBy for DeviceKeyRow {
    fn owner(&self) -> &str {
        &self.user_id
    }
}

impl OwnedBy for RemoteDeviceRow {
    fn owner(&self) -> &str {
        &self.user_id
    }
}

impl OwnedBy for DeviceIdRow {
    fn owner(&self) -> &str {
        &self.user_id
    }
}

impl OwnedBy for SignatureRow {
    fn owner(&self) -> &str {
        &self.user_id
    }
}

/// Rows grouped by their owner.
fn grouped<V: OwnedBy>(rows: Vec<V>) -> HashMap<String, Arc<Vec<V>>> {
    let mut by_owner: HashMap<String, Vec<V>> = HashMap::new();
    for row in rows {
        match by_owner.get_mut(row.owner()) {
            Some(list) => list.push(row),
            None => {
                by_owner.insert(row.owner().to_owned(), vec![row]);
            }
        }
    }
    by_owner.into_iter().map(|(u, v)| (u, Arc::new(v))).collect()
}

/// The hits of `users` in `cache` (each user once), and the users missed.
fn lookup<'a, V: Clone + Send + Sync + 'static>(
    cache: &GuardedCache<String, V>,
    users: impl Iterator<Item = &'a str>,
) -> (ByUser<'a, V>, Vec<&'a str>) {
    // Sized once: growing the maps was a visible share of a warm query.
    let n = users.size_hint().0;
    let mut found = ByUser::with_capacity_and_hasher(n, Default::default());
    let mut misses = Vec::new();
    let mut seen = HashSet::<&str, foldhash::fast::RandomState>::with_capacity_and_hasher(n, Default::default());
    for u in users.filter(|u| seen.insert(*u)) {
        match cache.get_uncounted(u) {
            Some(hit) => {
                found.insert(u, hit);
            }
            None => misses.push(u),
        }
    }
    cache.count(found.len() as u64, misses.len() as u64);
    (found, misses)
}

/// Users a cache missed, with the tickets taken before their load.
struct Due<'a> {
    users: Vec<&'a str>,
    tickets: Vec<Ticket>,
}

impl<'a> Due<'a> {
    fn new<V: Clone + Send + Sync + 'static>(cache: &GuardedCache<String, V>, users: Vec<&'a str>) -> Self {
        let tickets = users.iter().map(|u| cache.ticket(*u)).collect();
        Self { users, tickets }
    }

    /// Each user's loaded value (the default, e.g. an empty list, when the
    /// load left them out) into `found`, and into the cache unless
    /// invalidated while loading.
    fn fill<V: Clone + Default + Send + Sync + 'static>(
        self,
        cache: &GuardedCache<String, V>,
        mut loaded: HashMap<String, V>,
        found: &mut ByUser<'a, V>,
    ) {
        for (u, ticket) in self.users.into_iter().zip(self.tickets) {
            let entry = loaded.remove(u).unwrap_or_default();
            cache.insert(u.to_owned(), entry.clone(), ticket);
            found.insert(u, entry);
        }
    }
}

/// A per-user read: hits from the cache, then one `load` of all misses
/// (values by user; a user it leaves out gets the default, e.g. an empty
/// list), cached unless invalidated while loading.
async fn per_user<'a, V, F, Fut>(cache: &GuardedCache<String, V>, users: &[&'a str], load: F) -> Result<ByUser<'a, V>, sqlx::Error>
where
    V: Clone + Default + Send + Sync + 'static,
    F: FnOnce(Vec<&'a str>) -> Fut,
    Fut: Future<Output = Result<HashMap<String, V>, sqlx::Error>>,
{
    let (mut found, misses) = lookup(cache, users.iter().copied());
    if misses.is_empty() {
        return Ok(found);
    }
    let due = Due::new(cache, misses);
    let loaded = load(due.users.clone()).await?;
    due.fill(cache, loaded, &mut found);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::store::SchemaState;

    /// A device whose keys carry no signature by its owner: Synapse 1.139
    /// and later answer an empty `signatures[owner]` entry, earlier releases
    /// none. A rendering cached under one rule is not served once the
    /// schema record says the other (Synapse upgraded under us).
    #[tokio::test]
    async fn a_rendering_under_the_other_release_rule_is_rendered_again() {
        let dir = tempfile::tempdir().unwrap();
        let seed = "INSERT INTO users (name, creation_ts, is_guest, deactivated, locked) VALUES ('@u:t', 1, 0, 0, 0);
            INSERT INTO devices (user_id, device_id, display_name, hidden) VALUES ('@u:t', 'D', NULL, 0);
            INSERT INTO e2e_device_keys_json (user_id, device_id, ts_added_ms, key_json)
              VALUES ('@u:t', 'D', 1, '{\"device_id\":\"D\",\"keys\":{\"ed25519:D\":\"k\"},\"user_id\":\"@u:t\"}');";
        let store = Store::create_sqlite_fixture(&dir.path().join("db"), seed).await.unwrap();
        let schema = Arc::new(SchemaStatus::default());
        let at = |before_1_139| SchemaState { version: 92, upgraded: true, compat_version: Some(84), deltas_at_version: 1, before_1_139 };
        let caches = Caches::new(&WorkerConfig::default(), Arc::clone(&schema));
        caches.set_trusted(true);
        let read = async || {
            let reads = caches.local_reads(&store, &["@u:t"], &["@u:t"], "@u:t").await.unwrap();
            let json: Value = serde_json::from_str(reads.devices["@u:t"].device_json("D").unwrap().get()).unwrap();
            json.get("signatures").cloned()
        };
        schema.record(at(true));
        assert_eq!(read().await, None);
        assert_eq!(read().await, None);
        assert_eq!(caches.devices.stats().hits, 1, "the rendering is cached");
        schema.record(at(false));
        assert_eq!(read().await, Some(serde_json::json!({"@u:t": {}})));
        schema.record(at(true));
        assert_eq!(read().await, None);
    }
}
