//! A circuit breaker for something behind us that can hang (the
//! device-lists writer, MAS). It exists to spare requests a *wait*, never
//! to refuse what would work:
//!
//! - only a slow failure (no answer within the timeout) opens it; a call
//!   that fails fast (refused, reset, an error status) cost nothing, so the
//!   caller answers it as that call's own failure, and it shows the other
//!   side is not hanging: it closes the breaker;
//! - while it is open, calls are refused at once but for probes: one call
//!   goes through when the breaker opened or the last probe started at
//!   least `probe_every` ago, so however long a hang lasts, at most one call
//!   per `probe_every` waits on it, and once the other side is back a call
//!   reaches it within `probe_every`;
//! - the first call that gets any answer closes it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Breaker {
    probe_every: Duration,
    /// When the last probe went out; `None` while closed.
    open_since_probe: Mutex<Option<Instant>>,
}

impl Breaker {
    pub fn new(probe_every: Duration) -> Self {
        Self { probe_every, open_since_probe: Mutex::new(None) }
    }

    /// Whether a call may go ahead: the breaker is closed, or this call is
    /// the next probe.
    pub fn allow(&self) -> bool {
        let now = Instant::now();
        let mut last = self.open_since_probe.lock().expect("breaker");
        match *last {
            None => true,
            Some(t) if now.saturating_duration_since(t) < self.probe_every => false,
            Some(_) => {
                *last = Some(now);
                true
            }
        }
    }

    /// Whether calls are being refused.
    pub fn is_open(&self) -> bool {
        self.open_since_probe.lock().expect("breaker").is_some()
    }

    /// How often a probe goes out while it is open.
    pub fn probe_every(&self) -> Duration {
        self.probe_every
    }

    /// A call got no answer in time: refuse calls but for probes. Returns
    /// whether this opened it (it was closed); when it was open already,
    /// the next probe stays due as it was.
    pub fn timed_out(&self) -> bool {
        let mut last = self.open_since_probe.lock().expect("breaker");
        let opened = last.is_none();
        if opened {
            *last = Some(Instant::now());
        }
        opened
    }

    /// A call got an answer, whatever it said, or failed fast: close.
    pub fn answered(&self) {
        *self.open_since_probe.lock().expect("breaker") = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_timeout_opens_it_and_one_probe_per_period_goes_out() {
        let b = Breaker::new(Duration::from_secs(60));
        assert!(b.allow() && !b.is_open());
        b.answered();
        assert!(b.allow() && !b.is_open(), "an answer, or a fast failure, leaves it closed");
        assert!(b.timed_out(), "a timeout opens it");
        assert!(b.is_open() && !b.allow(), "refused until the probe period has passed");
        assert!(!b.timed_out(), "already open");
        // Pretend the period has passed.
        *b.open_since_probe.lock().unwrap() = Some(Instant::now() - Duration::from_secs(61));
        assert!(b.allow(), "the first caller probes");
        assert!(!b.allow(), "the others are refused until the next period");
        b.answered();
        assert!(b.allow() && !b.is_open(), "the first answer closes it at once");
    }
}
