//! The resyncs in flight, one per user: the first caller for a user leads
//! (its batch of users is fetched by one task), later callers follow and
//! wait for the leader's result. A batch also carries its hedge point, the
//! instant the writer's share of the deadline runs out, which a follower
//! with an earlier deadline brings forward.
//!
//! A batch removes its users' entries when it ends, however it ends: a
//! panicking fetch closes its followers' channels (they are answered
//! "abandoned") and the next caller leads anew, never waiting on a result
//! that cannot come.
//!
//! An invalidation of a user detaches their resync: callers that looked at
//! the user after it start anew. But a caller that looked before it (its
//! view of the user predates the invalidation) may still take that
//! resync's result, as it could have joined it when it looked: most such
//! invalidations are the writer storing the very result being fetched
//! (Synapse streams them before it answers), and without this every query
//! that had already looked would ask the writer again. These latest
//! resyncs are kept at most two minutes and within a byte budget (their
//! results weighed as the caches weigh theirs), oldest first out, without
//! scanning them: they are kept in the order they started.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

/// What a follower waits on: `None` until the result is in.
pub type Waiter<V> = watch::Receiver<Option<V>>;

/// Each user's waiter, and the batch this caller leads, if any.
pub type Joined<V> = (Vec<(String, Waiter<V>)>, Option<Batch<V>>);

struct Entry<V> {
    result: Waiter<V>,
    hedge: Arc<watch::Sender<Instant>>,
}

type Map<V> = Arc<Mutex<HashMap<String, Entry<V>>>>;

/// Each user's latest resync, kept for callers that looked at the user
/// before an invalidation overtook it.
struct Latest<V> {
    result: Waiter<V>,
    started: Instant,
    /// The first invalidation of the user after the resync started.
    overtaken: Option<Instant>,
    /// Its result's weight once delivered (0 before).
    weight: usize,
}

/// Latest resyncs older than this are forgotten: no caller waits longer
/// than its `timeout` (at most a minute by default).
const KEEP_LATEST: std::time::Duration = std::time::Duration::from_secs(120);

/// The latest resyncs, in the order they started.
struct Recent<V> {
    by_user: HashMap<String, Latest<V>>,
    /// (start, user): an entry is the user's current one while its start is
    /// the user's `Latest::started`; older ones are skipped when popped.
    order: VecDeque<(Instant, String)>,
    /// Weight of the delivered results kept.
    bytes: usize,
    budget: usize,
    weigh: fn(&V) -> usize,
}

impl<V> Recent<V> {
    /// Forgets from the oldest while one is older than [`KEEP_LATEST`] or
    /// the results weigh more than the budget: O(1) per entry forgotten.
    fn prune(&mut self, now: Instant) {
        while let Some((started, _)) = self.order.front() {
            if now.duration_since(*started) < KEEP_LATEST && self.bytes <= self.budget {
                return;
            }
            let (started, user) = self.order.pop_front().expect("front exists");
            if self.by_user.get(&user).is_some_and(|l| l.started == started) {
                let l = self.by_user.remove(&user).expect("present");
                self.bytes -= l.weight;
            }
        }
    }
}

pub struct Inflight<V> {
    map: Map<V>,
    latest: Arc<Mutex<Recent<V>>>,
}

impl<V> Inflight<V> {
    /// Latest resyncs' results are kept within `budget` bytes, each
    /// weighed by `weigh`.
    pub fn new(budget: usize, weigh: fn(&V) -> usize) -> Self {
        let recent = Recent { by_user: HashMap::new(), order: VecDeque::new(), bytes: 0, budget, weigh };
        Self { map: Arc::default(), latest: Arc::new(Mutex::new(recent)) }
    }
}

/// The users one caller leads, with the senders of their results.
pub struct Batch<V> {
    map: Map<V>,
    latest: Arc<Mutex<Recent<V>>>,
    users: Vec<(String, watch::Sender<Option<V>>)>,
    hedge: Arc<watch::Sender<Instant>>,
}

impl<V: Clone> Inflight<V> {
    /// Registers interest in `users`: a waiter for each, and the batch of
    /// those nobody was fetching (`None` if there are none). Followers
    /// bring their leaders' hedge points forward to `hedge_at`.
    pub fn join(&self, users: &[String], hedge_at: Instant, looked_at: Instant) -> Joined<V> {
        let hedge = Arc::new(watch::Sender::new(hedge_at));
        let mut led = Vec::new();
        let mut waits = Vec::with_capacity(users.len());
        let mut map = self.map.lock().expect("in-flight map");
        let mut latest = self.latest.lock().expect("latest resyncs");
        for user in users {
            if !map.contains_key(user)
                && let Some(l) = latest.by_user.get(user)
                && l.overtaken.is_some_and(|at| at > looked_at)
                && l.started.elapsed() < KEEP_LATEST
            {
                waits.push((user.clone(), l.result.clone()));
                continue;
            }
            let entry = map.entry(user.clone()).or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                led.push((user.clone(), tx));
                Entry { result: rx, hedge: Arc::clone(&hedge) }
            });
            entry.hedge.send_if_modified(|at| {
                let earlier = hedge_at < *at;
                if earlier {
                    *at = hedge_at;
                }
                earlier
            });
            waits.push((user.clone(), entry.result.clone()));
        }
        let now = Instant::now();
        for (user, tx) in &led {
            let replaced = latest.by_user.insert(user.clone(), Latest { result: tx.subscribe(), started: now, overtaken: None, weight: 0 });
            latest.bytes -= replaced.map_or(0, |l| l.weight);
            latest.order.push_back((now, user.clone()));
        }
        latest.prune(now);
        drop(latest);
        drop(map);
        let batch = (!led.is_empty()).then(|| Batch { map: Arc::clone(&self.map), latest: Arc::clone(&self.latest), users: led, hedge });
        (waits, batch)
    }

    /// Detaches `user`'s in-flight fetch: later callers start anew.
    pub fn forget(&self, user: &str) {
        self.map.lock().expect("in-flight map").remove(user);
        if let Some(l) = self.latest.lock().expect("latest resyncs").by_user.get_mut(user) {
            l.overtaken.get_or_insert_with(Instant::now);
        }
    }

    pub fn forget_all(&self) {
        self.map.lock().expect("in-flight map").clear();
        let now = Instant::now();
        for l in self.latest.lock().expect("latest resyncs").by_user.values_mut() {
            l.overtaken.get_or_insert(now);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().expect("in-flight map").len()
    }

    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let l = self.latest.lock().expect("latest resyncs");
        (l.by_user.len(), l.bytes)
    }
}

impl<V> Batch<V> {
    pub fn users(&self) -> Vec<String> {
        self.users.iter().map(|(u, _)| u.clone()).collect()
    }

    /// The instant the writer's share runs out (followers may bring it
    /// forward while the batch runs).
    pub fn hedge(&self) -> watch::Receiver<Instant> {
        self.hedge.subscribe()
    }

    /// Hands `user`'s result to everyone waiting and ends their entry.
    pub fn deliver(&mut self, user: &str, result: V) {
        if let Some(i) = self.users.iter().position(|(u, _)| u == user) {
            let (user, tx) = self.users.swap_remove(i);
            let mut latest = self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let weight = (latest.weigh)(&result);
            tx.send_replace(Some(result));
            if let Some(l) = latest.by_user.get_mut(&user)
                && l.result.same_channel(&tx.subscribe())
            {
                l.weight = weight;
                latest.bytes += weight;
                latest.prune(Instant::now());
            }
            drop(latest);
            remove_own(&self.map, &user, &tx);
        }
    }
}

impl<V> Drop for Batch<V> {
    fn drop(&mut self) {
        // Users not delivered (the fetch panicked or was cancelled): their
        // followers see the channel close; nobody else joins it.
        for (user, tx) in std::mem::take(&mut self.users) {
            remove_own(&self.map, &user, &tx);
        }
    }
}

/// Removes `user`'s entry if it is still this sender's (an invalidation
/// may have replaced it with a newer fetch).
fn remove_own<V>(map: &Map<V>, user: &str, tx: &watch::Sender<Option<V>>) {
    // Never panic in a drop during unwinding: a poisoned lock is still used.
    let mut map = map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if map.get(user).is_some_and(|e| e.result.same_channel(&tx.subscribe())) {
        map.remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn users(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn first_caller_leads_later_callers_follow() {
        let inflight = Inflight::<u32>::new(1 << 20, |_| 8);
        let now = Instant::now();
        let (waits, batch) = inflight.join(&users(&["@a:x", "@b:x"]), now, Instant::now());
        let mut batch = batch.expect("nobody was fetching");
        let (follow, none) = inflight.join(&users(&["@b:x"]), now, Instant::now());
        assert!(none.is_none(), "@b:x is being fetched");
        batch.deliver("@b:x", 7);
        let mut rx = follow[0].1.clone();
        assert_eq!(*rx.wait_for(Option::is_some).await.unwrap(), Some(7));
        assert_eq!(*waits[1].1.borrow(), Some(7));
        assert_eq!(inflight.len(), 1, "@b:x delivered and gone, @a:x in flight");
        drop(batch);
        assert_eq!(inflight.len(), 0);
    }

    #[tokio::test]
    async fn a_panicking_leader_leaves_nothing_behind() {
        let inflight = Arc::new(Inflight::<u32>::new(1 << 20, |_| 8));
        let (waits, batch) = inflight.join(&users(&["@a:x"]), Instant::now(), Instant::now());
        let batch = batch.unwrap();
        let task = tokio::spawn(async move {
            let _batch = batch;
            panic!("fetch failed badly");
        });
        assert!(task.await.unwrap_err().is_panic());
        let mut rx = waits[0].1.clone();
        assert!(rx.wait_for(Option::is_some).await.is_err(), "the follower hears the leader is gone");
        // The next caller leads a new fetch and gets its answer.
        let (waits, batch) = inflight.join(&users(&["@a:x"]), Instant::now(), Instant::now());
        batch.expect("a new leader").deliver("@a:x", 1);
        assert_eq!(*waits[0].1.borrow(), Some(1));
        assert_eq!(inflight.len(), 0);
    }

    #[tokio::test]
    async fn an_earlier_follower_brings_the_hedge_forward() {
        let inflight = Inflight::<u32>::new(1 << 20, |_| 8);
        let now = Instant::now();
        let (_, batch) = inflight.join(&users(&["@a:x"]), now + Duration::from_secs(3), Instant::now());
        let batch = batch.unwrap();
        let hedge = batch.hedge();
        inflight.join(&users(&["@a:x"]), now + Duration::from_secs(5), Instant::now());
        assert_eq!(*hedge.borrow(), now + Duration::from_secs(3), "a later hedge point changes nothing");
        inflight.join(&users(&["@a:x"]), now + Duration::from_millis(500), Instant::now());
        assert_eq!(*hedge.borrow(), now + Duration::from_millis(500));
    }

    #[tokio::test]
    async fn forgetting_detaches_the_fetch() {
        let inflight = Inflight::<u32>::new(1 << 20, |_| 8);
        let (_, first) = inflight.join(&users(&["@a:x"]), Instant::now(), Instant::now());
        let mut first = first.unwrap();
        inflight.forget("@a:x");
        let (waits, second) = inflight.join(&users(&["@a:x"]), Instant::now(), Instant::now());
        assert!(second.is_some(), "a new fetch after the invalidation");
        // The old fetch's result reaches only its own followers, and does
        // not remove the new entry.
        first.deliver("@a:x", 1);
        assert_eq!(*waits[0].1.borrow(), None);
        assert_eq!(inflight.len(), 1);
    }

    /// Kept results stay within the byte budget, oldest out first, and
    /// nothing is scanned: a result replaced by a newer resync of the same
    /// user no longer counts.
    #[tokio::test]
    async fn latest_resyncs_are_kept_within_the_byte_budget() {
        let inflight = Inflight::<u32>::new(100, |v| *v as usize);
        for (i, user) in ["@a:x", "@b:x", "@c:x"].iter().enumerate() {
            let (_, batch) = inflight.join(&users(&[user]), Instant::now(), Instant::now());
            batch.unwrap().deliver(user, 40 + i as u32);
        }
        // 40 + 41 + 42 > 100: @a:x, the oldest, is forgotten.
        assert_eq!(inflight.kept(), (2, 83));
        let (_, batch) = inflight.join(&users(&["@b:x"]), Instant::now(), Instant::now());
        batch.unwrap().deliver("@b:x", 10);
        assert_eq!(inflight.kept(), (2, 52), "@b:x's older result no longer counts");
        let (_, batch) = inflight.join(&users(&["@d:x"]), Instant::now(), Instant::now());
        batch.unwrap().deliver("@d:x", 90);
        assert_eq!(inflight.kept(), (2, 100), "the oldest go until it fits (@b:x's old start is skipped)");
    }

    /// The writer stores what it fetched (an invalidation of the user)
    /// before it answers: a caller that looked at the user before that
    /// takes the resync's result, delivered or not; one that looked after
    /// it starts a resync of its own.
    #[tokio::test]
    async fn a_caller_that_looked_before_an_invalidation_takes_the_overtaken_result() {
        let inflight = Inflight::<u32>::new(1 << 20, |_| 8);
        let looked = Instant::now();
        let (_, first) = inflight.join(&users(&["@a:x"]), Instant::now(), looked);
        let mut first = first.unwrap();
        inflight.forget("@a:x");
        let (waits, none) = inflight.join(&users(&["@a:x"]), Instant::now(), looked);
        assert!(none.is_none(), "it looked before the invalidation: no second resync");
        first.deliver("@a:x", 5);
        assert_eq!(*waits[0].1.borrow(), Some(5));
        let (late, none) = inflight.join(&users(&["@a:x"]), Instant::now(), looked);
        assert!(none.is_none(), "delivered: still the overtaken result for it");
        assert_eq!(*late[0].1.borrow(), Some(5));
        let (_, second) = inflight.join(&users(&["@a:x"]), Instant::now(), Instant::now());
        assert!(second.is_some(), "it looked after the invalidation: a resync of its own");
    }
}
