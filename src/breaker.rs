//! A circuit breaker for something behind us that can hang or vanish (the
//! device-lists writer, MAS): once a call finds it unreachable, calls are
//! refused at once for a while; then one call at a time probes it, and a
//! probe that reaches it closes the breaker again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Breaker {
    open_for: Duration,
    /// Open until then; `None` when closed.
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    pub fn new(open_for: Duration) -> Self {
        Self { open_for, open_until: Mutex::new(None) }
    }

    /// Whether a call may go ahead: the breaker is closed, or it has been
    /// open long enough and this caller becomes the probe (the others are
    /// refused until the probe reports or another period has passed).
    pub fn allow(&self) -> bool {
        let now = Instant::now();
        let mut open_until = self.open_until.lock().expect("breaker");
        match *open_until {
            None => true,
            Some(t) if t > now => false,
            Some(_) => {
                *open_until = Some(now + self.open_for);
                true
            }
        }
    }

    /// Whether calls are being refused.
    pub fn is_open(&self) -> bool {
        self.open_until.lock().expect("breaker").is_some_and(|t| t > Instant::now())
    }

    /// How long calls are refused after a failure.
    pub fn open_for(&self) -> Duration {
        self.open_for
    }

    /// The call could not reach it: refuse calls for a while.
    pub fn trip(&self) {
        *self.open_until.lock().expect("breaker") = Some(Instant::now() + self.open_for);
    }

    /// The call reached it (whatever it answered).
    pub fn close(&self) {
        *self.open_until.lock().expect("breaker") = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_probe_after_the_open_period() {
        let b = Breaker::new(Duration::from_millis(0));
        assert!(b.allow() && !b.is_open());
        let b = Breaker::new(Duration::from_secs(60));
        b.trip();
        assert!(b.is_open() && !b.allow());
        // Pretend the period has passed.
        *b.open_until.lock().unwrap() = Some(Instant::now() - Duration::from_millis(1));
        assert!(b.allow(), "the first caller probes");
        assert!(!b.allow(), "the others wait for the probe");
        b.close();
        assert!(b.allow() && !b.is_open());
    }
}
