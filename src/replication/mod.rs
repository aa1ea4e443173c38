//! Keeping the caches correct: Synapse's replication stream on Redis (or,
//! with Redis disabled, polling its stream tables) tells us whose devices,
//! keys, signatures, tokens and room memberships changed.
//!
//! The caches are *trusted* only while the stream is followed: from a
//! Redis subscription that has caught up (after `REPLICATE`, each writer's
//! `POSITION` shows whether rows were missed; missed rows are read from the
//! database), or from a poller that is polling. Otherwise every read goes to
//! the database.

mod barrier;
mod invalidate;
mod listener;
mod poller;
pub mod protocol;
mod redis_client;
mod reported;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

pub use barrier::{Barrier, StaleMarks};
pub use invalidate::Invalidator;
pub use reported::Reported;

use crate::cache::Caches;
use crate::config::Config;
use crate::store::Store;

/// What following the stream needs: the settings, the stream tables, the
/// caches it turns on and off, the invalidations it applies, and the
/// status it reports.
#[derive(Clone)]
pub struct Follower {
    pub config: Config,
    pub store: Store,
    pub caches: Arc<Caches>,
    pub invalidator: Arc<Invalidator>,
    pub status: Arc<Status>,
    /// The read barrier, which polling drives for device lists.
    pub barrier: Arc<Barrier>,
}

/// What `/ready` and the metrics report about the stream.
#[derive(Debug, Default)]
pub struct Status {
    /// `redis`, `poll`, or `off`.
    mode: std::sync::OnceLock<&'static str>,
    connected: AtomicBool,
    caught_up: AtomicBool,
    reconnects: AtomicU64,
    /// Times everything cached was dropped because what was missed could
    /// not be read back (a writer silent after a reconnect, one we did not
    /// follow, a failed catch-up read).
    dropped_all: AtomicU64,
    /// Rows invalidated through catch-up reads of the stream tables, by
    /// stream and writer.
    caught_up_rows_by: std::sync::Mutex<HashMap<(String, String), u64>>,
    /// Unix ms of the last message, keepalive answer or poll.
    last_seen_ms: AtomicI64,
    /// The device-list writers' positions delivered by the stream (for the
    /// read barrier's floor).
    pub reported: Arc<Reported>,
}

impl Status {
    pub fn mode(&self) -> &'static str {
        self.mode.get().copied().unwrap_or("off")
    }

    /// Connected to the stream (Redis, or the tables when polling).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Everything missed while away has been read back.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Times everything cached was dropped instead of caught up.
    pub fn dropped_all(&self) -> u64 {
        self.dropped_all.load(Ordering::Relaxed)
    }

    pub(super) fn count_dropped_all(&self) {
        self.dropped_all.fetch_add(1, Ordering::Relaxed);
    }

    /// Rows invalidated through catch-up reads of the stream tables.
    pub fn caught_up_rows(&self) -> u64 {
        self.caught_up_rows_by.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
    }

    /// Rows of `stream` written by `writer` read back through catch-up.
    pub fn caught_up_rows_of(&self, stream: &str, writer: &str) -> u64 {
        let by = self.caught_up_rows_by.lock().unwrap_or_else(|e| e.into_inner());
        by.get(&(stream.to_owned(), writer.to_owned())).copied().unwrap_or(0)
    }

    /// Unix ms of the last message, keepalive answer or poll (0: none yet).
    pub fn last_seen_ms(&self) -> i64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    fn set_mode(&self, mode: &'static str) {
        let _ = self.mode.set(mode);
    }

    fn touch(&self) {
        self.last_seen_ms.store(crate::now_ms(), Ordering::Relaxed);
    }

    fn set_connected(&self) {
        self.connected.store(true, Ordering::SeqCst);
        self.touch();
    }

    /// The stream was lost: not connected, not caught up.
    fn set_lost(&self) {
        self.connected.store(false, Ordering::SeqCst);
        self.caught_up.store(false, Ordering::SeqCst);
    }

    fn set_caught_up(&self) {
        self.caught_up.store(true, Ordering::SeqCst);
    }

    fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    fn count_caught_up_rows(&self, stream: &str, writer: &str, n: usize) {
        let mut by = self.caught_up_rows_by.lock().unwrap_or_else(|e| e.into_inner());
        *by.entry((stream.to_owned(), writer.to_owned())).or_default() += n as u64;
    }
}

/// Starts following the stream, per the config: Redis when enabled, else
/// polling (PostgreSQL only: SQLite-backed Synapse writes no cache stream,
/// so the caches stay off there).
pub fn start(app: Follower) {
    let app = Arc::new(app);
    let config: &Config = &app.config;
    let status = &app.status;
    if !config.worker.caches_enabled {
        status.set_mode("off");
        return;
    }
    let invalidator = Arc::clone(&app.invalidator);
    if config.synapse.redis.enabled {
        match redis_client::redis_client(&config.synapse.redis) {
            Ok(client) => {
                status.set_mode("redis");
                tokio::spawn(listener::run(Arc::clone(&app), invalidator, client));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot use the redis settings; caches stay off");
                status.set_mode("off");
            }
        }
    } else if matches!(app.store, crate::store::Store::Postgres(_)) {
        status.set_mode("poll");
        tokio::spawn(poller::run(Arc::clone(&app), invalidator));
    } else {
        status.set_mode("off");
    }
}
