//! The resync coordinator, one per process: brings stale remote device
//! lists up to date, asking the device-lists writer first and the remote
//! server directly only when the writer cannot be reached.
//!
//! - Concurrent requests for the same user share one in-flight resync: the
//!   first caller starts it (as a task of its own, so it finishes even if
//!   that caller goes away) and everyone waits on its result.
//! - The writer gets a share of the callers' time: if it has not answered
//!   by the hedge point (its timeout, or half the time the most hurried
//!   caller has left), the remote is asked directly alongside and the first
//!   answer wins; the writer's breaker opens only if its `/health` does not
//!   answer either (a writer slow because that remote is slow is still
//!   asked for the others).
//! - Results are kept in a bounded, TTL'd memory cache that refuses a
//!   result fetched before an invalidation of its user; an invalidation
//!   also detaches the user's in-flight resync, so later callers start anew.
//! - `null` from the writer means the remote failed: that is the answer
//!   (the writer already tried and backs off); no direct resync follows
//!   (the `/keys/query` path then asks `/user/keys/query`, as Synapse does).
//! - Results of direct resyncs live only in this memory cache.

pub mod devices;
mod inflight;
pub mod pass;
pub mod writer;

use std::collections::HashMap;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::watch;

pub use devices::UserDevices;
use inflight::{Batch, Inflight};
use writer::{Writer, WriterAnswer, WriterError};

use crate::cache::guarded::{GuardedCache, Ticket, Trust};
use crate::config::Config;
use crate::federation::FederationClient;

/// A user's resync result, or the `failures` entry for their server.
pub use crate::keys::Outcome;

pub struct Coordinator {
    writer: Writer,
    federation: Arc<FederationClient>,
    cache: GuardedCache<String, Arc<UserDevices>>,
    inflight: Inflight<Outcome>,
    /// Callers currently waiting for a resync result.
    waiting: AtomicUsize,
    outcomes: OutcomeCounters,
    /// Budget of one direct `GET /user/devices`.
    direct_timeout: Duration,
    concurrency: usize,
    /// Each user's newest resync, for the device-list health API.
    history: moka::sync::Cache<String, LastResync>,
}

/// How a user's newest resync went.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LastResync {
    /// When it ended, in ms since the epoch.
    pub at_ts: i64,
    /// `writer` (the device-lists writer resynced, Synapse's cache holds
    /// the result) or `direct` (we asked the remote; only our memory holds it).
    pub via: &'static str,
    /// `ok`, or why it failed.
    pub outcome: String,
}

/// Users whose newest resync is remembered, and for how long.
const HISTORY_USERS: u64 = 10_000;
const HISTORY_TTL: Duration = Duration::from_secs(24 * 3600);

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").field("writer", &self.writer).finish_non_exhaustive()
    }
}

impl Coordinator {
    pub fn new(config: &Config, federation: Arc<FederationClient>) -> anyhow::Result<Self> {
        let w = &config.worker;
        Ok(Self {
            writer: Writer::from_config(config)?,
            federation,
            cache: GuardedCache::new(
                "resync_results",
                w.cache_max_bytes,
                Duration::from_millis(w.resync_cache_ttl_ms),
                |user: &String, devices: &Arc<UserDevices>| u32::try_from(user.len() + devices.weight()).unwrap_or(u32::MAX),
                // Invalidated by the stream and the read barrier alike,
                // which the data caches' trust does not cover.
                Arc::new(Trust::trusted()),
            ),
            inflight: Inflight::new(usize::try_from(w.cache_max_bytes).unwrap_or(usize::MAX), outcome_weight),
            waiting: AtomicUsize::new(0),
            outcomes: OutcomeCounters::default(),
            direct_timeout: Duration::from_millis(w.default_timeout_ms),
            concurrency: w.federation_concurrency.max(1),
            history: moka::sync::Cache::builder().max_capacity(HISTORY_USERS).time_to_live(HISTORY_TTL).build(),
        })
    }

    /// Resyncs `users` (all on `destination`), waiting until `deadline` at
    /// most. Every user gets an outcome. `looked_at`: when the caller last
    /// read what Synapse holds about them (see [`Inflight::join`]).
    pub async fn resync(
        self: &Arc<Self>,
        destination: &str,
        users: &[String],
        deadline: Instant,
        looked_at: Instant,
    ) -> HashMap<String, Outcome> {
        let mut out = HashMap::new();
        for user in users {
            if let Some(hit) = self.cache.get(user) {
                out.insert(user.clone(), Ok(hit));
            }
        }
        let missing: Vec<String> = users.iter().filter(|u| !out.contains_key(*u)).cloned().collect();
        let (waits, batch) = self.inflight.join(&missing, self.hedge_point(deadline), looked_at);
        if let Some(batch) = batch {
            let this = Arc::clone(self);
            let destination = destination.to_owned();
            tokio::spawn(async move { this.run(&destination, batch).await });
        }
        let _waiting = WaitGuard::new(&self.waiting, waits.len());
        for (user, mut rx) in waits {
            let waited = tokio::time::timeout_at(deadline.into(), rx.wait_for(Option::is_some)).await;
            let outcome = match waited {
                Ok(Ok(v)) => v.clone().expect("waited for Some"),
                Ok(Err(_)) => Err(json!({"status": 503, "message": "Device list resync was abandoned"})),
                Err(_) => Err(json!({"status": 504, "message": "Timed out waiting for the device list resync"})),
            };
            out.insert(user, outcome);
        }
        out
    }

    /// When a resync for a caller with `deadline` stops waiting for the
    /// writer alone: after the writer's timeout, or half of what the
    /// caller has left if that is sooner, so the direct resync started
    /// then still has the other half.
    fn hedge_point(&self, deadline: Instant) -> Instant {
        let now = Instant::now();
        now + self.writer.timeout.min(deadline.saturating_duration_since(now) / 2)
    }

    /// How resyncs ended so far, per user.
    pub fn outcomes(&self) -> Outcomes {
        let o = &self.outcomes;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Outcomes {
            writer_ok: get(&o.writer_ok),
            writer_null: get(&o.writer_null),
            fallback_ok: get(&o.fallback_ok),
            fallback_failed: get(&o.fallback_failed),
            writer_late: get(&o.writer_late),
            writer_late_but_alive: self.writer.late_but_alive(),
        }
    }

    /// How many (caller, user) pairs are waiting for a resync right now.
    /// Whether the device-lists writer is being skipped.
    pub fn writer_breaker_open(&self) -> bool {
        self.writer.breaker_open()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Forgets what is held about `user` (their devices changed): the
    /// cached result, and the in-flight resync for callers still to come.
    pub fn invalidate(&self, user: &str) {
        self.cache.invalidate(&user.to_owned());
        self.inflight.forget(user);
    }

    /// `user`'s newest resync, if one ended in the last day (and was not
    /// pushed out by 10,000 newer ones).
    pub fn last_resync(&self, user: &str) -> Option<LastResync> {
        self.history.get(user)
    }

    fn remember(&self, user: &str, via: &'static str, outcome: &Outcome) {
        let outcome = match outcome {
            Ok(_) => "ok".to_owned(),
            Err(failure) => failure.get("message").and_then(Value::as_str).unwrap_or("failed").to_owned(),
        };
        self.history.insert(user.to_owned(), LastResync { at_ts: crate::now_ms(), via, outcome });
    }

    /// A repair's resync: the device-lists writer alone, given `timeout`,
    /// past our cache of results and the coalescing of queries (the caller
    /// has just marked the users stale in Synapse, which a resync already
    /// under way may have missed). What it answers replaces what we held.
    pub async fn resync_through_writer(&self, users: &[String], timeout: Duration) -> Result<HashMap<String, Outcome>, WriterError> {
        let answer = self.writer.resync_within(users, timeout).await?;
        for user in users {
            self.invalidate(user);
        }
        Ok(self.writer_outcomes(users, answer))
    }

    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
        self.inflight.forget_all();
    }

    /// One batch: the writer first; if it has not answered by the hedge
    /// point, the remote server directly as well, and the first answer
    /// wins (the writer's if it answers while the direct resync runs).
    async fn run(&self, destination: &str, mut batch: Batch<Outcome>) {
        let users = batch.users();
        let tickets: Vec<Ticket> = users.iter().map(|u| self.cache.ticket(u)).collect();
        let mut writer = pin!(self.writer.resync(&users));
        let (mut outcomes, writer_pending) = tokio::select! {
            answer = &mut writer => (self.after_writer(destination, &users, answer).await, false),
            () = hedge_reached(batch.hedge()) => {
                self.outcomes.writer_late.fetch_add(1, Ordering::Relaxed);
                self.writer.late();
                let mut direct = pin!(self.direct_all(destination, &users));
                tokio::select! {
                    answer = &mut writer => match answer {
                        Ok(answer) => (self.writer_outcomes(&users, answer), false),
                        Err(_) => ((&mut direct).await, false),
                    },
                    outcomes = &mut direct => (outcomes, true),
                }
            }
        };
        for (user, ticket) in users.iter().zip(tickets) {
            let outcome = outcomes.remove(user).unwrap_or_else(|| Err(resync_failed(user)));
            if let Ok(devices) = &outcome {
                self.cache.insert(user.clone(), Arc::clone(devices), ticket);
            }
            batch.deliver(user, outcome);
        }
        drop(batch);
        if writer_pending {
            // Its answer is not needed, but whether it comes decides the
            // breaker (it closes again if the writer was only slow).
            let _ = writer.await;
        }
    }

    /// The writer answered before the hedge point: its result, or the
    /// direct resync when it could not give one.
    async fn after_writer(
        &self,
        destination: &str,
        users: &[String],
        answer: Result<WriterAnswer, WriterError>,
    ) -> HashMap<String, Outcome> {
        match answer {
            Ok(answer) => return self.writer_outcomes(users, answer),
            Err(WriterError::NotConfigured | WriterError::BreakerOpen) => {}
            Err(e) => tracing::info!(error = %e, destination, "resyncing directly with the remote server"),
        }
        self.direct_all(destination, users).await
    }

    fn writer_outcomes(&self, users: &[String], answer: WriterAnswer) -> HashMap<String, Outcome> {
        let mut raw = answer.users;
        users
            .iter()
            .map(|u| {
                let outcome = match raw.remove(u).flatten().and_then(|r| UserDevices::parse(r, answer.stream_pos.clone())) {
                    Some(d) => Ok(Arc::new(d)),
                    None => Err(resync_failed(u)),
                };
                let counter = if outcome.is_ok() { &self.outcomes.writer_ok } else { &self.outcomes.writer_null };
                counter.fetch_add(1, Ordering::Relaxed);
                self.remember(u, "writer", &outcome);
                (u.clone(), outcome)
            })
            .collect()
    }

    async fn direct_all(&self, destination: &str, users: &[String]) -> HashMap<String, Outcome> {
        let attempts = users.iter().cloned().map(|u| async move {
            let outcome = self.direct(destination, &u).await;
            let counter = if outcome.is_ok() { &self.outcomes.fallback_ok } else { &self.outcomes.fallback_failed };
            counter.fetch_add(1, Ordering::Relaxed);
            self.remember(&u, "direct", &outcome);
            (u, outcome)
        });
        futures::stream::iter(attempts).buffer_unordered(self.concurrency).collect().await
    }

    async fn direct(&self, destination: &str, user: &str) -> Outcome {
        let answer = self.federation.user_devices(destination, user, self.direct_timeout).await.map_err(|e| e.to_failure())?;
        let raw = RawValue::from_string(answer.to_string()).expect("JSON value serialises");
        UserDevices::parse(raw, None)
            .map(Arc::new)
            .ok_or_else(|| json!({"status": 503, "message": "Invalid device list from remote server"}))
    }
}

/// What a resync's outcome holds, in bytes (a failure is small).
fn outcome_weight(outcome: &Outcome) -> usize {
    outcome.as_ref().map_or(64, |d| d.weight())
}

/// The failure of a user whose resync gave no device list.
fn resync_failed(user: &str) -> Value {
    json!({"status": 503, "message": format!("Device resync failed for '{user}'")})
}

/// Resolves at the batch's hedge point, following it when a follower
/// brings it forward.
async fn hedge_reached(mut at: watch::Receiver<Instant>) {
    loop {
        let when = *at.borrow_and_update();
        tokio::select! {
            () = tokio::time::sleep_until(when.into()) => return,
            changed = at.changed() => if changed.is_err() {
                tokio::time::sleep_until(when.into()).await;
                return;
            },
        }
    }
}

/// Counts waiters in and out, however the wait ends.
struct WaitGuard<'a>(&'a AtomicUsize, usize);

impl<'a> WaitGuard<'a> {
    fn new(counter: &'a AtomicUsize, n: usize) -> Self {
        counter.fetch_add(n, Ordering::SeqCst);
        Self(counter, n)
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct OutcomeCounters {
    writer_ok: AtomicU64,
    writer_null: AtomicU64,
    fallback_ok: AtomicU64,
    fallback_failed: AtomicU64,
    writer_late: AtomicU64,
}

/// Resync results by how they ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcomes {
    pub writer_ok: u64,
    pub writer_null: u64,
    pub fallback_ok: u64,
    pub fallback_failed: u64,
    /// Batches whose writer call passed its hedge point unanswered.
    pub writer_late: u64,
    /// Of those, the ones whose writer's `/health` answered (a slow remote,
    /// not a hung writer: it was not skipped for other remotes).
    pub writer_late_but_alive: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resync results are weighed in bytes: large ones (a remote decides
    /// their size) cannot hold more than `cache_max_bytes`, whatever their
    /// number.
    #[test]
    fn resync_results_are_bounded_by_bytes() {
        let yaml = "server_name: hs\ndatabase: {name: sqlite3, args: {database: unused.db}}\nkeys_worker: {cache_max_bytes: 20000}\n";
        let config = Config::from_mapping(yaml_serde::from_str(yaml).unwrap(), Vec::new()).unwrap();
        let federation = Arc::new(FederationClient::from_config(&config).unwrap());
        let coordinator = Coordinator::new(&config, federation).unwrap();
        let keys = format!("{{\"device_id\":\"D\",\"keys\":{{\"ed25519:D\":\"{}\"}}}}", "k".repeat(4_000));
        for i in 0..10 {
            let user = format!("@u{i}:remote");
            let raw = RawValue::from_string(format!("{{\"devices\":[{{\"device_id\":\"D\",\"keys\":{keys}}}]}}")).unwrap();
            let devices = Arc::new(UserDevices::parse(raw, None).unwrap());
            assert!(devices.weight() > 8_000, "the raw text and the parsed keys both count");
            let ticket = coordinator.cache.ticket(&user);
            coordinator.cache.insert(user, devices, ticket);
        }
        coordinator.cache.run_pending_tasks();
        let stats = coordinator.cache.stats();
        assert!(stats.weight <= 20_000 && stats.entries <= 2, "{} bytes in {} entries", stats.weight, stats.entries);
    }
}
