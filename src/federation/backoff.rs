//! Per-destination exponential backoff with jitter, in memory, for our own
//! direct requests: while it holds, the failure that started it is given
//! again instead of retrying. Synapse's own view (its `destinations` table)
//! is read separately by the caller.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

use super::FedError;

#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    state: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    until: Instant,
    last: FedError,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, state: Mutex::default() }
    }

    /// The failure that started the backoff, while it holds.
    pub fn in_backoff(&self, destination: &str) -> Option<FedError> {
        let state = self.state.lock().expect("backoff state");
        state.get(destination).filter(|e| e.until > Instant::now()).map(|e| e.last.clone())
    }

    /// Destinations currently backed off.
    pub fn count(&self) -> usize {
        let now = Instant::now();
        self.state.lock().expect("backoff state").values().filter(|e| e.until > now).count()
    }

    pub fn record_failure(&self, destination: &str, error: &FedError) {
        let mut state = self.state.lock().expect("backoff state");
        let failures = state.get(destination).map_or(0, |e| e.failures) + 1;
        let delay = delay_for(self.initial, self.max, failures, rand::rng().random_range(0.8..1.2));
        state.insert(destination.to_owned(), Entry { failures, until: Instant::now() + delay, last: error.clone() });
    }

    pub fn record_success(&self, destination: &str) {
        self.state.lock().expect("backoff state").remove(destination);
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
}
