//! Synapse's per-device limit on `/keys/query`: at most N concurrent
//! requests per (user, device) (its linearizer allows 10). Excess requests
//! wait for a slot, but only for a bounded time; then 429 `M_LIMIT_EXCEEDED`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::MatrixError;

type Key = (String, Option<String>);

#[derive(Debug)]
pub struct DeviceLimiter {
    per_device: usize,
    wait: Duration,
    /// foldhash: every request hashes its (user, device) twice.
    slots: Mutex<HashMap<Key, Arc<Semaphore>, foldhash::fast::RandomState>>,
}

/// A held slot; released (and the device's entry dropped when idle) on drop.
pub struct Slot<'a> {
    limiter: &'a DeviceLimiter,
    key: Key,
    permit: Option<OwnedSemaphorePermit>,
}

impl DeviceLimiter {
    pub fn new(per_device: usize, wait: Duration) -> Self {
        Self { per_device: per_device.max(1), wait, slots: Mutex::default() }
    }

    pub async fn acquire(&self, user: &str, device: Option<&str>) -> Result<Slot<'_>, MatrixError> {
        let key = (user.to_owned(), device.map(str::to_owned));
        let sem = {
            let mut slots = self.slots.lock().expect("limiter map");
            Arc::clone(slots.entry(key.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.per_device))))
        };
        // A free slot is taken without arming a timer (the common case).
        if let Ok(permit) = Arc::clone(&sem).try_acquire_owned() {
            return Ok(Slot { limiter: self, key, permit: Some(permit) });
        }
        match tokio::time::timeout(self.wait, sem.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Slot { limiter: self, key, permit: Some(permit) }),
            _ => {
                self.forget_if_idle(&key);
                let ms = u64::try_from(self.wait.as_millis()).unwrap_or(u64::MAX).max(1000);
                Err(MatrixError::limit_exceeded(ms))
            }
        }
    }

    fn forget_if_idle(&self, key: &Key) {
        let mut slots = self.slots.lock().expect("limiter map");
        if let Some(sem) = slots.get(key)
            && Arc::strong_count(sem) == 1
            && sem.available_permits() == self.per_device
        {
            slots.remove(key);
        }
    }

    /// Devices with requests in flight or waiting.
    pub fn tracked(&self) -> usize {
        self.slots.lock().expect("limiter map").len()
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.limiter.forget_if_idle(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limits_per_device_and_forgets_idle_devices() {
        let l = DeviceLimiter::new(2, Duration::from_millis(50));
        let a = l.acquire("@u:hs", Some("D")).await.unwrap();
        let b = l.acquire("@u:hs", Some("D")).await.unwrap();
        let err = l.acquire("@u:hs", Some("D")).await.err().unwrap();
        assert_eq!((err.status.as_u16(), err.errcode), (429, "M_LIMIT_EXCEEDED"));
        assert!(err.extra.contains_key("retry_after_ms"));
        // Another device of the same user is not affected.
        let other = l.acquire("@u:hs", Some("E")).await.unwrap();
        drop(a);
        let c = l.acquire("@u:hs", Some("D")).await.unwrap();
        drop((b, c, other));
        assert_eq!(l.tracked(), 0);
    }
}
