//! A moka cache that never keeps a value read before an invalidation.
//!
//! moka does not cancel a load when its key is invalidated, so a database
//! read that started before a change could otherwise be cached after the
//! change's invalidation. Every key hashes to one of a fixed set of
//! generation counters (plus a global epoch for "drop everything"): a
//! loader takes a [`Ticket`] before reading, and its value is cached only if
//! no invalidation touched that key's counter in between. Check-and-insert
//! and bump-and-invalidate happen under one lock, so there is no gap.
//!
//! While the cache is not *trusted* (the replication stream is down or not
//! caught up), reads miss and nothing is inserted.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use foldhash::fast::RandomState;
use moka::sync::Cache;

const STRIPES: usize = 4096;

/// Hit, miss and insert counts, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub inserts: AtomicU64,
    pub stale_loads_dropped: AtomicU64,
    /// Entries removed for size or age (not invalidations).
    pub evictions: Arc<AtomicU64>,
}

/// A snapshot of one cache's counters.
#[derive(Debug, Clone)]
pub struct Stats {
    pub name: &'static str,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub stale_loads_dropped: u64,
    pub entries: u64,
    /// The weigher's sum over the entries (bytes for the per-user caches).
    pub weight: u64,
}

/// Shared by all caches: whether their contents may be used, and how many
/// invalidations they have seen.
#[derive(Debug, Default)]
pub struct Trust {
    trusted: AtomicBool,
    changes: AtomicU64,
}

impl Trust {
    /// A cache whose contents are always usable (its invalidations do not
    /// depend on the replication stream).
    pub fn trusted() -> Self {
        Self { trusted: AtomicBool::new(true), changes: AtomicU64::new(0) }
    }

    /// A change of trust counts as an invalidation (the poller confirms
    /// trust after every poll: that alone changes nothing).
    pub fn set(&self, trusted: bool) {
        if self.trusted.swap(trusted, Ordering::SeqCst) != trusted {
            self.changed();
        }
    }

    pub fn get(&self) -> bool {
        self.trusted.load(Ordering::SeqCst)
    }

    /// Counts invalidations, each once it is done: a reader that saw the
    /// same count before and after its reads read nothing an invalidation
    /// finished between them replaced.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct GuardedCache<K, V> {
    pub name: &'static str,
    // foldhash, seeded per cache: every lookup hashes a user ID or token,
    // and SipHash was a visible share of a warm query's time.
    cache: Cache<K, V, RandomState>,
    state: Mutex<Generations>,
    hasher: RandomState,
    trust: Arc<Trust>,
    pub counters: Counters,
}

struct Generations {
    epoch: u64,
    stripes: Vec<u64>,
}

/// Taken before a read: the generation the value will be checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    epoch: u64,
    stripe: usize,
    generation: u64,
}

impl<K, V> GuardedCache<K, V>
where
    K: Hash + Eq + Send + Sync + Clone + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `weigher` gives each entry's weight (e.g. bytes); `capacity` bounds
    /// their sum.
    pub fn new(
        name: &'static str,
        capacity: u64,
        ttl: Duration,
        weigher: impl Fn(&K, &V) -> u32 + Send + Sync + 'static,
        trust: Arc<Trust>,
    ) -> Self {
        let counters = Counters::default();
        let evictions = Arc::clone(&counters.evictions);
        let cache = Cache::builder()
            .max_capacity(capacity)
            .weigher(weigher)
            .time_to_live(ttl)
            .support_invalidation_closures()
            .eviction_listener(move |_, _, cause| {
                if cause.was_evicted() {
                    evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build_with_hasher(RandomState::default());
        Self {
            name,
            cache,
            state: Mutex::new(Generations { epoch: 0, stripes: vec![0; STRIPES] }),
            hasher: RandomState::default(),
            trust,
            counters,
        }
    }

    // A key and its borrowed form hash alike (`Borrow`'s contract), so a
    // `String` key and its `&str` share a stripe.
    fn stripe<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hit = self.get_uncounted(key);
        self.count(u64::from(hit.is_some()), u64::from(hit.is_none()));
        hit
    }

    /// [`Self::get`] without counting it: a caller reading many keys counts
    /// them once with [`Self::count`] (the counters are shared by every
    /// thread, and a cache line bounced per key read).
    pub fn get_uncounted<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.trust.get() { self.cache.get(key) } else { None }
    }

    pub fn count(&self, hits: u64, misses: u64) {
        if hits > 0 {
            self.counters.hits.fetch_add(hits, Ordering::Relaxed);
        }
        if misses > 0 {
            self.counters.misses.fetch_add(misses, Ordering::Relaxed);
        }
    }

    /// Take before reading the value from its source.
    pub fn ticket<Q>(&self, key: &Q) -> Ticket
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let stripe = self.stripe(key);
        let g = self.state.lock().expect("generations");
        Ticket { epoch: g.epoch, stripe, generation: g.stripes[stripe] }
    }

    /// Caches `value` unless `key` was invalidated since `ticket` was taken.
    pub fn insert(&self, key: K, value: V, ticket: Ticket) {
        if !self.trust.get() {
            return;
        }
        let g = self.state.lock().expect("generations");
        if g.epoch == ticket.epoch && g.stripes[ticket.stripe] == ticket.generation {
            self.cache.insert(key, value);
            self.counters.inserts.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.stale_loads_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn invalidate<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let stripe = self.stripe(key);
        let mut g = self.state.lock().expect("generations");
        g.stripes[stripe] += 1;
        self.cache.invalidate(key);
        self.trust.changed();
    }

    /// Drops the entries matching `predicate` (and voids every load in
    /// flight, to be safe).
    pub fn invalidate_if(&self, predicate: impl Fn(&K, &V) -> bool + Send + Sync + 'static) {
        let mut g = self.state.lock().expect("generations");
        g.epoch += 1;
        let _ = self.cache.invalidate_entries_if(predicate);
        self.trust.changed();
    }

    pub fn invalidate_all(&self) {
        let mut g = self.state.lock().expect("generations");
        g.epoch += 1;
        self.cache.invalidate_all();
        self.trust.changed();
    }

    /// Applies pending evictions now (tests; moka does it as it goes).
    #[cfg(test)]
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            name: self.name,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            stale_loads_dropped: c.stale_loads_dropped.load(Ordering::Relaxed),
            entries: self.cache.entry_count(),
            weight: self.cache.weighted_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> GuardedCache<String, u32> {
        let trust = Arc::new(Trust::default());
        trust.set(true);
        GuardedCache::new("test", 1000, Duration::from_secs(60), |_, _| 1, trust)
    }

    #[test]
    fn caches_and_invalidates() {
        let c = cache();
        let t = c.ticket("a");
        c.insert("a".into(), 1, t);
        assert_eq!(c.get("a"), Some(1));
        c.invalidate("a");
        assert_eq!(c.get("a"), None);
    }

    /// The race: an invalidation lands while a load is in flight; the
    /// loaded (stale) value must not be cached afterwards.
    #[tokio::test]
    async fn invalidation_during_a_load_wins() {
        let c = Arc::new(cache());
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let loader = {
            let c = c.clone();
            tokio::spawn(async move {
                let ticket = c.ticket("user");
                let _ = started_tx.send(());
                // The "database read" returns the old value after the change.
                release_rx.await.unwrap();
                c.insert("user".into(), 1, ticket);
            })
        };
        started_rx.await.unwrap();
        c.invalidate("user");
        release_tx.send(()).unwrap();
        loader.await.unwrap();
        assert_eq!(c.get("user"), None, "the stale value was not cached");
        assert_eq!(c.counters.stale_loads_dropped.load(Ordering::Relaxed), 1);
        // A load that starts after the invalidation is cached.
        let t = c.ticket("user");
        c.insert("user".into(), 2, t);
        assert_eq!(c.get("user"), Some(2));
    }

    #[test]
    fn drop_everything_voids_loads_and_untrusted_bypasses() {
        let c = cache();
        let t = c.ticket("a");
        c.invalidate_all();
        c.insert("a".into(), 1, t);
        assert_eq!(c.get("a"), None);
        let t = c.ticket("a");
        c.insert("a".into(), 1, t);
        c.trust.set(false);
        assert_eq!(c.get("a"), None, "untrusted: reads miss");
        c.trust.set(true);
        assert_eq!(c.get("a"), Some(1));
        c.invalidate_if(|k, _| k == "a");
        assert_eq!(c.get("a"), None);
    }
}
