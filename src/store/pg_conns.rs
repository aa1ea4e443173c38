//! PostgreSQL connections for the store: at most `max` open, opened when
//! needed, and a statement costs one round trip.
//!
//! sqlx's pool pings a connection when it is taken (`test_before_acquire`)
//! and again every time it is given back, so each statement cost three
//! round trips, three wake-ups of the database backend. Here nothing is
//! sent but the statement. What the pings were for is kept another way:
//! - a connection whose statement did not finish (the request's future was
//!   dropped mid-statement) or failed is closed, never reused in an
//!   unknown state;
//! - a statement that fails because an idle connection died meanwhile (the
//!   server restarted, an idle timeout) is run once more on a new
//!   connection: every statement of ours is a read, so running it twice is
//!   harmless.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::Semaphore;

#[derive(Clone)]
pub struct PgConns {
    inner: Arc<Inner>,
}

struct Inner {
    options: PgConnectOptions,
    max: u32,
    /// How long a statement may wait for a connection, and a new
    /// connection may take to open.
    acquire_timeout: Duration,
    permits: Semaphore,
    idle: Mutex<Vec<PgConnection>>,
    open: AtomicU32,
}

impl std::fmt::Debug for PgConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConns").field("max", &self.inner.max).field("open", &self.open()).finish_non_exhaustive()
    }
}

impl PgConns {
    pub fn new(options: PgConnectOptions, max: u32, acquire_timeout: Duration) -> Self {
        let max = max.max(1);
        let permits = Semaphore::new(usize::try_from(max).unwrap_or(usize::MAX));
        Self { inner: Arc::new(Inner { options, max, acquire_timeout, permits, idle: Mutex::default(), open: AtomicU32::new(0) }) }
    }

    /// The most connections open at once.
    pub fn max(&self) -> u32 {
        self.inner.max
    }

    pub fn open(&self) -> u32 {
        self.inner.open.load(Ordering::Relaxed)
    }

    pub fn idle(&self) -> u32 {
        u32::try_from(self.inner.idle.lock().expect("idle connections").len()).unwrap_or(u32::MAX)
    }

    /// How long a statement may wait for a connection, and a new one take
    /// to open.
    pub fn acquire_timeout(&self) -> Duration {
        self.inner.acquire_timeout
    }

    /// The options connections are opened with.
    pub fn options(&self) -> &PgConnectOptions {
        &self.inner.options
    }

    /// Runs `work` on a connection: an idle one, else a new one once fewer
    /// than `max` are in use (waiting up to the acquire timeout).
    pub async fn run<T>(&self, work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error> + Clone) -> Result<T, sqlx::Error> {
        let inner = &*self.inner;
        let _permit = tokio::time::timeout(inner.acquire_timeout, inner.permits.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .expect("the semaphore is never closed");
        let reused = inner.idle.lock().expect("idle connections").pop();
        if let Some(conn) = reused {
            let mut slot = Slot { inner, conn: Some(conn), keep: false };
            match work.clone()(slot.conn()).await {
                Ok(v) => {
                    slot.keep = true;
                    return Ok(v);
                }
                // Died while idle: once more on a new connection.
                Err(e) if connection_lost(&e) => tracing::debug!(error = %e, "an idle database connection was lost; retrying"),
                Err(e) => return Err(e),
            }
        }
        let conn = tokio::time::timeout(inner.acquire_timeout, PgConnection::connect_with(&inner.options))
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        inner.open.fetch_add(1, Ordering::Relaxed);
        let mut slot = Slot { inner, conn: Some(conn), keep: false };
        let v = work(slot.conn()).await?;
        slot.keep = true;
        Ok(v)
    }
}

/// A connection in use: back to the idle list if its work finished well,
/// else closed (dropped, also when the work's future is).
struct Slot<'a> {
    inner: &'a Inner,
    conn: Option<PgConnection>,
    keep: bool,
}

impl Slot<'_> {
    fn conn(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("a slot holds its connection until dropped")
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.keep {
            self.inner.idle.lock().expect("idle connections").push(conn);
        } else {
            self.inner.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The connection itself failed (reset, closed, the server terminated the
/// session), rather than the statement.
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "57P02"),
        _ => false,
    }
}
