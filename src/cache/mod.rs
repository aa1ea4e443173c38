//! The memory caches of the hot path and the cached reads that use them.
//! Entries are per user (or per token); the replication listener keeps them
//! correct by invalidating what changed (see `crate::replication`), and a
//! TTL bounds any entry's life as a safety net.

pub mod guarded;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

pub use guarded::{GuardedCache, Trust};

use crate::config::WorkerConfig;
use crate::keys::RemoteUser;
use crate::store::{CrossSigningKeyRow, DeviceIdRow, DeviceKeyRow, SignatureRow, Store, TokenRow};

type PerUser<V> = GuardedCache<String, Arc<Vec<V>>>;

pub struct Caches {
    trust: Arc<Trust>,
    pub tokens: GuardedCache<String, Arc<TokenRow>>,
    pub devices: PerUser<DeviceKeyRow>,
    pub cross_signing: PerUser<CrossSigningKeyRow>,
    /// Keyed by the signing user.
    pub signatures: PerUser<SignatureRow>,
    pub remote: GuardedCache<String, Arc<RemoteUser>>,
    /// Every device of a user, keys or not (the MAS device check).
    pub device_ids: PerUser<DeviceIdRow>,
    /// Users known to exist (the MAS user check); users are never deleted.
    pub known_users: GuardedCache<String, ()>,
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
    pub fn new(w: &WorkerConfig) -> Self {
        let trust = Arc::new(Trust::default());
        let ttl = Duration::from_millis(w.cache_ttl_ms);
        let bytes = w.cache_max_bytes;
        Self {
            tokens: GuardedCache::new("tokens", w.token_cache_max_entries, ttl, |_: &String, _: &Arc<TokenRow>| 1, trust.clone()),
            devices: GuardedCache::new(
                "device_keys",
                bytes,
                ttl,
                |k: &String, v: &Arc<Vec<DeviceKeyRow>>| {
                    weight(std::iter::once(k.len()).chain(v.iter().map(|r| {
                        r.device_id.len() + r.display_name.as_ref().map_or(0, String::len) + r.key_json.as_ref().map_or(0, String::len)
                    })))
                },
                trust.clone(),
            ),
            cross_signing: GuardedCache::new(
                "cross_signing_keys",
                bytes,
                ttl,
                |k: &String, v: &Arc<Vec<CrossSigningKeyRow>>| {
                    weight(std::iter::once(k.len()).chain(v.iter().map(|r| r.keytype.len() + r.keydata.len())))
                },
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
                |k: &String, v: &Arc<RemoteUser>| {
                    weight(std::iter::once(k.len()).chain(v.devices.iter().map(|d| d.device_id.len() + d.content.len())))
                },
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

    /// Turns the caches on (caught up with the stream) or off (lost it).
    pub fn set_trusted(&self, trusted: bool) {
        self.trust.set(trusted);
    }

    /// Everything held about `user` (their devices, keys, signatures).
    pub fn invalidate_user(&self, user: &str) {
        let key = user.to_owned();
        self.devices.invalidate(&key);
        self.device_ids.invalidate(&key);
        self.cross_signing.invalidate(&key);
        self.signatures.invalidate(&key);
        self.remote.invalidate(&key);
    }

    pub fn invalidate_token(&self, token: &str) {
        self.tokens.invalidate(&token.to_owned());
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
            Some(u) => self.cross_signing.invalidate(&u.to_owned()),
            None => self.cross_signing.invalidate_all(),
        }
    }

    /// The signatures `signer` made.
    pub fn invalidate_signatures_by(&self, signer: &str) {
        self.signatures.invalidate(&signer.to_owned());
    }

    /// `user`'s devices (with and without keys).
    pub fn invalidate_devices(&self, user: &str) {
        let key = user.to_owned();
        self.devices.invalidate(&key);
        self.device_ids.invalidate(&key);
    }

    /// What Synapse's tables say about remote `user`; about everyone when
    /// `None`.
    pub fn invalidate_remote(&self, user: Option<&str>) {
        match user {
            Some(u) => self.remote.invalidate(&u.to_owned()),
            None => self.remote.invalidate_all(),
        }
    }

    pub fn invalidate_all(&self) {
        self.tokens.invalidate_all();
        self.devices.invalidate_all();
        self.cross_signing.invalidate_all();
        self.signatures.invalidate_all();
        self.remote.invalidate_all();
        self.device_ids.invalidate_all();
        self.known_users.invalidate_all();
    }

    /// The access token's row, from memory or the database.
    pub async fn token(&self, store: &Store, token: &str) -> Result<Option<Arc<TokenRow>>, sqlx::Error> {
        let key = token.to_owned();
        if let Some(hit) = self.tokens.get(&key) {
            return Ok(Some(hit));
        }
        let ticket = self.tokens.ticket(&key);
        let Some(row) = store.token_lookup(token).await? else { return Ok(None) };
        let row = Arc::new(row);
        self.tokens.insert(key, row.clone(), ticket);
        Ok(Some(row))
    }

    /// Whether `user_id` is registered (Synapse's `get_user_by_id`); only
    /// a yes is kept.
    pub async fn user_exists(&self, store: &Store, user_id: &str) -> Result<bool, sqlx::Error> {
        let key = user_id.to_owned();
        if self.known_users.get(&key).is_some() {
            return Ok(true);
        }
        let ticket = self.known_users.ticket(&key);
        let exists = store.user_exists(user_id).await?;
        if exists {
            self.known_users.insert(key, (), ticket);
        }
        Ok(exists)
    }

    /// Whether the user has this (non-hidden) device (Synapse's
    /// `get_device`): from the user's cached device list, and from the
    /// database when the list lacks it (a device may be created without a
    /// device-list change, so a no is never trusted from memory).
    pub async fn device_exists(&self, store: &Store, user_id: &str, device_id: &str) -> Result<bool, sqlx::Error> {
        let lists = per_user(&self.device_ids, &[user_id], |m| async move { store.device_ids(&m).await }).await?;
        if lists.get(user_id).is_some_and(|l| l.iter().any(|r| r.device_id == device_id)) {
            return Ok(true);
        }
        store.device_exists(user_id, device_id).await
    }

    pub async fn device_keys(&self, store: &Store, users: &[&str]) -> Result<HashMap<String, Arc<Vec<DeviceKeyRow>>>, sqlx::Error> {
        per_user(&self.devices, users, |m| async move { store.device_keys(&m).await }).await
    }

    pub async fn cross_signing_keys(
        &self,
        store: &Store,
        users: &[&str],
    ) -> Result<HashMap<String, Arc<Vec<CrossSigningKeyRow>>>, sqlx::Error> {
        per_user(&self.cross_signing, users, |m| async move { store.cross_signing_keys(&m).await }).await
    }

    pub async fn signatures_by(&self, store: &Store, signers: &[&str]) -> Result<HashMap<String, Arc<Vec<SignatureRow>>>, sqlx::Error> {
        per_user(&self.signatures, signers, |m| async move { store.signatures_by(&m).await }).await
    }

    /// What Synapse's tables say about each of the remote `users`.
    pub async fn remote_users(&self, store: &Store, users: &[&str]) -> Result<HashMap<String, Arc<RemoteUser>>, sqlx::Error> {
        let mut out = HashMap::new();
        let mut misses = Vec::new();
        for u in users {
            match self.remote.get(&(*u).to_owned()) {
                Some(hit) => {
                    out.insert((*u).to_owned(), hit);
                }
                None => misses.push(*u),
            }
        }
        if misses.is_empty() {
            return Ok(out);
        }
        let tickets: Vec<_> = misses.iter().map(|u| self.remote.ticket(&(*u).to_owned())).collect();
        let (cached, sharing, rows) = tokio::try_join!(
            store.remote_cached_users(&misses),
            store.users_in_a_room_with_us(&misses),
            store.remote_cached_devices(&misses),
        )?;
        let cached: HashSet<String> = cached.into_iter().collect();
        let sharing: HashSet<String> = sharing.into_iter().collect();
        let mut loaded: HashMap<String, RemoteUser> = misses
            .iter()
            .map(|u| {
                let u = (*u).to_owned();
                let entry = RemoteUser { in_synapse_cache: cached.contains(&u), shares_a_room: sharing.contains(&u), devices: Vec::new() };
                (u, entry)
            })
            .collect();
        for row in rows {
            if let Some(entry) = loaded.get_mut(&row.user_id) {
                entry.devices.push(row);
            }
        }
        for (u, ticket) in misses.iter().zip(tickets) {
            let entry = Arc::new(loaded.remove(*u).unwrap_or_default());
            self.remote.insert((*u).to_owned(), entry.clone(), ticket);
            out.insert((*u).to_owned(), entry);
        }
        Ok(out)
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

impl OwnedBy for DeviceIdRow {
    fn owner(&self) -> &str {
        &self.user_id
    }
}

impl OwnedBy for CrossSigningKeyRow {
    fn owner(&self) -> &str {
        &self.user_id
    }
}

impl OwnedBy for SignatureRow {
    fn owner(&self) -> &str {
        &self.user_id
    }
}

/// A per-user read: hits from the cache, then one `load` of all misses,
/// grouped by owner and cached (an empty list too) unless invalidated
/// while loading.
async fn per_user<'a, V, F, Fut>(cache: &PerUser<V>, users: &[&'a str], load: F) -> Result<HashMap<String, Arc<Vec<V>>>, sqlx::Error>
where
    V: OwnedBy + Clone + Send + Sync + 'static,
    F: FnOnce(Vec<&'a str>) -> Fut,
    Fut: Future<Output = Result<Vec<V>, sqlx::Error>>,
{
    let mut found = HashMap::with_capacity(users.len());
    let mut misses = Vec::new();
    let mut seen = HashSet::with_capacity(users.len());
    for u in users.iter().copied().filter(|u| seen.insert(*u)) {
        match cache.get(&u.to_owned()) {
            Some(hit) => {
                found.insert(u.to_owned(), hit);
            }
            None => misses.push(u),
        }
    }
    if misses.is_empty() {
        return Ok(found);
    }
    let tickets: Vec<_> = misses.iter().map(|u| cache.ticket(&(*u).to_owned())).collect();
    let rows = load(misses.clone()).await?;
    let mut grouped: HashMap<String, Vec<V>> = HashMap::new();
    for row in rows {
        grouped.entry(row.owner().to_owned()).or_default().push(row);
    }
    for (u, ticket) in misses.iter().zip(tickets) {
        let entry = Arc::new(grouped.remove(*u).unwrap_or_default());
        cache.insert((*u).to_owned(), entry.clone(), ticket);
        found.insert((*u).to_owned(), entry);
    }
    Ok(found)
}
