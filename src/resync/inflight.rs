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

use std::collections::HashMap;
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

pub struct Inflight<V> {
    map: Map<V>,
}

impl<V> Default for Inflight<V> {
    fn default() -> Self {
        Self { map: Arc::default() }
    }
}

/// The users one caller leads, with the senders of their results.
pub struct Batch<V> {
    map: Map<V>,
    users: Vec<(String, watch::Sender<Option<V>>)>,
    hedge: Arc<watch::Sender<Instant>>,
}

impl<V: Clone> Inflight<V> {
    /// Registers interest in `users`: a waiter for each, and the batch of
    /// those nobody was fetching (`None` if there are none). Followers
    /// bring their leaders' hedge points forward to `hedge_at`.
    pub fn join(&self, users: &[String], hedge_at: Instant) -> Joined<V> {
        let hedge = Arc::new(watch::Sender::new(hedge_at));
        let mut led = Vec::new();
        let mut waits = Vec::with_capacity(users.len());
        let mut map = self.map.lock().expect("in-flight map");
        for user in users {
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
        drop(map);
        let batch = (!led.is_empty()).then(|| Batch { map: Arc::clone(&self.map), users: led, hedge });
        (waits, batch)
    }

    /// Detaches `user`'s in-flight fetch: later callers start anew.
    pub fn forget(&self, user: &str) {
        self.map.lock().expect("in-flight map").remove(user);
    }

    pub fn forget_all(&self) {
        self.map.lock().expect("in-flight map").clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().expect("in-flight map").len()
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
            tx.send_replace(Some(result));
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
        let inflight = Inflight::<u32>::default();
        let now = Instant::now();
        let (waits, batch) = inflight.join(&users(&["@a:x", "@b:x"]), now);
        let mut batch = batch.expect("nobody was fetching");
        let (follow, none) = inflight.join(&users(&["@b:x"]), now);
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
        let inflight = Arc::new(Inflight::<u32>::default());
        let (waits, batch) = inflight.join(&users(&["@a:x"]), Instant::now());
        let batch = batch.unwrap();
        let task = tokio::spawn(async move {
            let _batch = batch;
            panic!("fetch failed badly");
        });
        assert!(task.await.unwrap_err().is_panic());
        let mut rx = waits[0].1.clone();
        assert!(rx.wait_for(Option::is_some).await.is_err(), "the follower hears the leader is gone");
        // The next caller leads a new fetch and gets its answer.
        let (waits, batch) = inflight.join(&users(&["@a:x"]), Instant::now());
        batch.expect("a new leader").deliver("@a:x", 1);
        assert_eq!(*waits[0].1.borrow(), Some(1));
        assert_eq!(inflight.len(), 0);
    }

    #[tokio::test]
    async fn an_earlier_follower_brings_the_hedge_forward() {
        let inflight = Inflight::<u32>::default();
        let now = Instant::now();
        let (_, batch) = inflight.join(&users(&["@a:x"]), now + Duration::from_secs(3));
        let batch = batch.unwrap();
        let hedge = batch.hedge();
        inflight.join(&users(&["@a:x"]), now + Duration::from_secs(5));
        assert_eq!(*hedge.borrow(), now + Duration::from_secs(3), "a later hedge point changes nothing");
        inflight.join(&users(&["@a:x"]), now + Duration::from_millis(500));
        assert_eq!(*hedge.borrow(), now + Duration::from_millis(500));
    }

    #[tokio::test]
    async fn forgetting_detaches_the_fetch() {
        let inflight = Inflight::<u32>::default();
        let (_, first) = inflight.join(&users(&["@a:x"]), Instant::now());
        let mut first = first.unwrap();
        inflight.forget("@a:x");
        let (waits, second) = inflight.join(&users(&["@a:x"]), Instant::now());
        assert!(second.is_some(), "a new fetch after the invalidation");
        // The old fetch's result reaches only its own followers, and does
        // not remove the new entry.
        first.deliver("@a:x", 1);
        assert_eq!(*waits[0].1.borrow(), None);
        assert_eq!(inflight.len(), 1);
    }
}
