//! Per-destination exponential backoff with jitter, in memory, for our own
//! direct requests: while it holds, the failure that started it is given
//! again instead of retrying. Synapse's own view (its `destinations` table)
//! is read separately by the caller.
//!
//! Destinations come from queries, so the table is bounded: at most
//! [`MAX_DESTINATIONS`] entries (the least used go first), each forgotten
//! once it has not failed again for three times the longest backoff.

use std::time::{Duration, Instant};

use moka::sync::Cache;
use rand::Rng;

use super::FedError;

/// Most destinations whose failures are remembered.
pub const MAX_DESTINATIONS: u64 = 10_000;

pub struct Backoff {
    initial: Duration,
    max: Duration,
    state: Cache<String, Entry>,
}

impl std::fmt::Debug for Backoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff").field("initial", &self.initial).field("max", &self.max).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    until: Instant,
    last: FedError,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self::bounded(initial, max, MAX_DESTINATIONS)
    }

    fn bounded(initial: Duration, max: Duration, capacity: u64) -> Self {
        // Longer than any backoff (`max` with +20 % jitter): an entry only
        // expires once its backoff is long over, forgetting the count.
        let state = Cache::builder().max_capacity(capacity).time_to_live(max.saturating_mul(3).max(Duration::from_secs(1))).build();
        Self { initial, max, state }
    }

    /// The failure that started the backoff, while it holds.
    pub fn in_backoff(&self, destination: &str) -> Option<FedError> {
        self.state.get(destination).filter(|e| e.until > Instant::now()).map(|e| e.last)
    }

    /// Destinations currently backed off.
    pub fn count(&self) -> usize {
        self.state.run_pending_tasks();
        let now = Instant::now();
        self.state.iter().filter(|(_, e)| e.until > now).count()
    }

    /// Destinations remembered (backed off, or with a failure count kept).
    pub fn remembered(&self) -> u64 {
        self.state.run_pending_tasks();
        self.state.entry_count()
    }

    pub fn record_failure(&self, destination: &str, error: &FedError) {
        // Read and write under the entry's lock: concurrent failures of one
        // destination each count.
        self.state.entry_by_ref(destination).and_upsert_with(|previous| {
            let failures = previous.map_or(0, |e| e.into_value().failures) + 1;
            let delay = delay_for(self.initial, self.max, failures, rand::rng().random_range(0.8..1.2));
            Entry { failures, until: Instant::now() + delay, last: error.clone() }
        });
    }

    pub fn record_success(&self, destination: &str) {
        self.state.invalidate(destination);
    }
}

/// `initial · 2^(failures-1)`, capped at `max`, scaled by `jitter`.
pub fn delay_for(initial: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let exp = initial.saturating_mul(1u32 << failures.saturating_sub(1).min(30));
    exp.min(max).mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_and_caps() {
        let (i, m) = (Duration::from_secs(30), Duration::from_secs(3600));
        assert_eq!(delay_for(i, m, 1, 1.0), Duration::from_secs(30));
        assert_eq!(delay_for(i, m, 2, 1.0), Duration::from_secs(60));
        assert_eq!(delay_for(i, m, 4, 1.0), Duration::from_secs(240));
        assert_eq!(delay_for(i, m, 40, 1.0), m);
        assert_eq!(delay_for(i, m, 1, 1.2), Duration::from_secs(36));
    }

    #[test]
    fn failure_then_success() {
        let b = Backoff::new(Duration::from_secs(60), Duration::from_secs(600));
        assert!(b.in_backoff("a.org").is_none());
        b.record_failure("a.org", &FedError::Transport("ConnectError: refused".into()));
        assert_eq!(b.in_backoff("a.org").map(|e| e.to_string()).as_deref(), Some("Failed to send request: ConnectError: refused"));
        assert_eq!(b.count(), 1);
        b.record_success("a.org");
        assert!(b.in_backoff("a.org").is_none());
    }

    #[test]
    fn remembers_a_bounded_number_of_destinations() {
        let b = Backoff::bounded(Duration::from_secs(60), Duration::from_secs(600), 100);
        let error = FedError::Transport("DNSLookupError".into());
        for i in 0..1_000 {
            b.record_failure(&format!("s{i}.invalid"), &error);
        }
        assert!(b.remembered() <= 100, "{} destinations remembered", b.remembered());
        assert!(b.count() <= 100);
    }
}
