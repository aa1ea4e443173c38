//! Without Redis: poll Synapse's stream tables on a short interval.
//!
//! - Device lists: each poll is a read-barrier probe (`Barrier::sync`),
//!   which applies every committed change above a floor that follows the
//!   writers' positions and unbroken runs of ids, so a row a writer commits
//!   late is found however far below the newest id it lies.
//! - The caches stream (tokens, users, memberships) has no writer
//!   positions (every Synapse process writes it). Its floor moves over
//!   unbroken runs of ids; a missing id is waited for [`PATIENCE_MS`] from
//!   when a poll first found it missing (a transaction that took it has
//!   by then committed or rolled back; measured on our clock only), then
//!   passed. Rows above the floor are read again each poll and applied
//!   once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::Follower;
use super::Invalidator;
use crate::store::CacheInvalidation;

/// How long after a later row was written a missing id of the caches
/// stream is given up on.
const PATIENCE_MS: i64 = 60_000;

pub async fn run(app: Arc<Follower>, inv: Arc<Invalidator>) {
    let every = Duration::from_millis(app.config.worker.poll_interval_ms.max(50));
    let mut caches = CachesCursor::default();
    loop {
        match poll(&app, &inv, &mut caches).await {
            Ok(()) => {
                app.status.set_connected();
                app.status.set_caught_up();
                app.caches.set_trusted(true);
            }
            Err(e) => {
                tracing::warn!(error = %e, "polling the stream tables failed; caches off");
                app.caches.set_trusted(false);
                app.invalidator.everything();
                app.status.set_lost();
                caches = CachesCursor::default();
            }
        }
        tokio::time::sleep(every).await;
    }
}

async fn poll(app: &Follower, inv: &Invalidator, caches: &mut CachesCursor) -> anyhow::Result<()> {
    app.barrier.sync(&[]).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if caches.floor.is_none() {
        caches.floor = Some(app.store.cache_invalidations_start(PATIENCE_MS).await?);
    }
    let rows = app.store.cache_invalidations(caches.floor.unwrap_or(0), i64::MAX, None).await?;
    for row in caches.advance(&rows, crate::now_ms()) {
        inv.synapse_cache(&row.cache_func, row.keys.as_deref());
    }
    Ok(())
}

/// Most missing ids timed at once (beyond them, later polls time them).
const MAX_HOLES: usize = 10_000;

/// Where polling the caches stream stands.
#[derive(Debug, Default)]
struct CachesCursor {
    /// Every row at or below it has been applied (or given up on).
    floor: Option<i64>,
    /// Rows above the floor already applied.
    seen: BTreeSet<i64>,
    /// Ids above the floor found missing, with when (our Unix ms).
    holes: BTreeMap<i64, i64>,
}

impl CachesCursor {
    /// Takes the rows read above the floor (in any order) at `now_ms`:
    /// returns those not applied yet, and moves the floor over the
    /// unbroken run of ids, passing an id missing for [`PATIENCE_MS`].
    fn advance<'r>(&mut self, rows: &'r [CacheInvalidation], now_ms: i64) -> Vec<&'r CacheInvalidation> {
        let fresh = rows.iter().filter(|r| self.seen.insert(r.stream_id)).collect();
        let mut floor = self.floor.unwrap_or(0);
        let newest = self.seen.last().copied().unwrap_or(floor);
        for id in floor + 1..newest {
            if self.holes.len() >= MAX_HOLES {
                break;
            }
            if !self.seen.contains(&id) {
                self.holes.entry(id).or_insert(now_ms);
            }
        }
        while floor < newest {
            let next = floor + 1;
            let given_up = self.holes.get(&next).is_some_and(|since| now_ms - since > PATIENCE_MS);
            if !self.seen.contains(&next) && !given_up {
                break;
            }
            floor = next;
        }
        self.floor = Some(floor);
        self.seen = self.seen.split_off(&(floor + 1));
        self.holes = self.holes.split_off(&(floor + 1));
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> CacheInvalidation {
        CacheInvalidation { stream_id: id, cache_func: "get_user_by_access_token".into(), keys: Some(vec![format!("t{id}")]) }
    }

    /// A row committed long after the rows above it (far more than any
    /// fixed window) is still applied, once; a missing id is waited for a
    /// minute from when it was first found missing, on our own clock.
    #[test]
    fn a_late_row_is_applied_however_far_below_the_newest_and_holes_are_passed_in_time() {
        let mut c = CachesCursor { floor: Some(10), ..Default::default() };
        let now = 1_000_000;
        // 11 is in flight; 12..=1011 committed.
        let rows: Vec<_> = (12..=1011).map(row).collect();
        assert_eq!(c.advance(&rows, now).len(), 1000);
        assert_eq!(c.floor, Some(10), "waits for 11");
        // 11 commits, 1,000 ids below the newest: applied, once.
        let mut rows: Vec<_> = std::iter::once(row(11)).chain(rows).collect();
        let fresh = c.advance(&rows, now + 500);
        assert_eq!(fresh.iter().map(|r| r.stream_id).collect::<Vec<_>>(), [11]);
        assert_eq!(c.floor, Some(1011));
        assert!(c.seen.is_empty() && c.holes.is_empty());
        // 1012 and 1013 never commit (rolled back); 1014 does: both are
        // passed together, a minute after they were first found missing.
        rows = vec![row(1014)];
        assert_eq!(c.advance(&rows, now + 2_000).len(), 1);
        assert_eq!(c.floor, Some(1011));
        assert!(c.advance(&rows, now + 2_000 + PATIENCE_MS).is_empty(), "not applied twice");
        assert_eq!(c.floor, Some(1011), "not yet a full minute");
        c.advance(&rows, now + 2_001 + PATIENCE_MS);
        assert_eq!(c.floor, Some(1014));
    }
}
