//! The one write this service can make to Synapse's database, and only
//! with `keys_worker.device_list_repair` on: Synapse's stale mark for a
//! remote user's device list, the row Synapse's own
//! `mark_remote_users_device_caches_as_stale` upserts (and its admin docs
//! tell operators to insert by hand). Synapse reads it, refetches the list,
//! rewrites its cache and deletes the row.
//!
//! Each mark is written on a PostgreSQL session of its own, opened for it
//! and closed after: the session stays `default_transaction_read_only`
//! like every other of ours, and the one statement runs in an explicit
//! `READ WRITE` transaction. SQLite is never written (another process
//! writing Synapse's SQLite file is not safe).

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use super::Store;

/// Writes stale marks; PostgreSQL only.
#[derive(Debug, Clone)]
pub struct StaleMarker {
    options: PgConnectOptions,
    /// Longest a connection may take to open, and then its work.
    patience: Duration,
}

/// `mark_remote_users_device_caches_as_stale`'s upsert: `added_ts` only on
/// insertion, an existing mark kept as it is.
const MARK: &str = "INSERT INTO device_lists_remote_resync (user_id, added_ts) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING";

const MAY_MARK: &str = "SELECT has_table_privilege('device_lists_remote_resync', 'INSERT')";

impl Store {
    /// The marker, on PostgreSQL; `None` on SQLite.
    pub fn stale_marker(&self) -> Option<StaleMarker> {
        match self {
            Store::Postgres(p) => Some(StaleMarker { options: p.options().clone(), patience: p.acquire_timeout() }),
            Store::Sqlite(_) => None,
        }
    }
}

impl StaleMarker {
    /// Whether our database role may insert into `device_lists_remote_resync`.
    pub async fn may_mark(&self) -> Result<bool, sqlx::Error> {
        self.on_a_session(async |conn| {
            let (may,): (bool,) = sqlx::query_as(MAY_MARK).fetch_one(&mut *conn).await?;
            Ok(may)
        })
        .await
    }

    /// Marks `user_id`'s list stale as of `now_ms`; false if it already was.
    pub async fn mark(&self, user_id: &str, now_ms: i64) -> Result<bool, sqlx::Error> {
        self.on_a_session(async |conn| {
            sqlx::raw_sql("START TRANSACTION READ WRITE").execute(&mut *conn).await?;
            let inserted = sqlx::query(MARK).bind(user_id).bind(now_ms).execute(&mut *conn).await?.rows_affected() == 1;
            sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
            Ok(inserted)
        })
        .await
    }

    /// `work` on a session opened for it and closed after; opening it, and
    /// then the work (whose statements also have the statement timeout),
    /// each within the acquire timeout: never a hang.
    async fn on_a_session<T>(&self, work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        let mut conn = tokio::time::timeout(self.patience, PgConnection::connect_with(&self.options))
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        let result = tokio::time::timeout(self.patience, work(&mut conn)).await.map_err(|_| sqlx::Error::PoolTimedOut)?;
        let _ = tokio::time::timeout(self.patience, conn.close()).await;
        result
    }
}
