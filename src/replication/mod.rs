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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

pub use barrier::{Barrier, StaleMarks};
pub use invalidate::Invalidator;

use crate::App;
use crate::config::Config;

/// What `/ready` and the metrics report about the stream.
#[derive(Debug, Default)]
pub struct Status {
    /// `redis`, `poll`, or `off`.
    pub mode: std::sync::OnceLock<&'static str>,
    pub connected: AtomicBool,
    pub caught_up: AtomicBool,
    pub reconnects: AtomicU64,
    /// Rows invalidated through catch-up reads of the stream tables.
    pub caught_up_rows: AtomicU64,
    /// Unix ms of the last message, keepalive answer or poll.
    pub last_seen_ms: AtomicI64,
}

impl Status {
    pub fn mode(&self) -> &'static str {
        self.mode.get().copied().unwrap_or("off")
    }

    fn touch(&self) {
        self.last_seen_ms.store(crate::now_ms(), Ordering::Relaxed);
    }
}

/// Starts following the stream, per the config: Redis when enabled, else
/// polling (PostgreSQL only: SQLite-backed Synapse writes no cache stream,
/// so the caches stay off there).
pub fn start(app: &Arc<App>) {
    let config: &Config = &app.config;
    let status = &app.replication;
    if !config.worker.caches_enabled {
        let _ = status.mode.set("off");
        return;
    }
    let invalidator = Arc::clone(&app.invalidator);
    if config.synapse.redis.enabled {
        match listener::redis_client(&config.synapse.redis) {
            Ok(client) => {
                let _ = status.mode.set("redis");
                tokio::spawn(listener::run(Arc::clone(app), invalidator, client));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot use the redis settings; caches stay off");
                let _ = status.mode.set("off");
            }
        }
    } else if matches!(app.store, crate::store::Store::Postgres(_)) {
        let _ = status.mode.set("poll");
        tokio::spawn(poller::run(Arc::clone(app), invalidator));
    } else {
        let _ = status.mode.set("off");
    }
}
