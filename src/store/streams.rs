//! Synapse's stream tables, read to catch up on replication rows that were
//! not seen live (a Redis outage, a gap shown by `POSITION`) and to poll when
//! Redis is not used.

use super::Store;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StreamUser {
    pub stream_id: i64,
    pub user_id: String,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CacheInvalidation {
    pub stream_id: i64,
    pub cache_func: String,
    /// `None`: the whole cache.
    pub keys: Option<Vec<String>>,
}

// Device-list changes and signature uploads share the device_lists stream.
// `instance` NULL: every writer (polling).
const DEVICE_LISTS_PG: &str = "
    SELECT stream_id, user_id FROM device_lists_stream
    WHERE stream_id > $1 AND stream_id <= $2 AND ($3::text IS NULL OR COALESCE(instance_name, 'master') = $3)
    UNION ALL
    SELECT stream_id, from_user_id AS user_id FROM user_signature_stream
    WHERE stream_id > $1 AND stream_id <= $2 AND ($3::text IS NULL OR COALESCE(instance_name, 'master') = $3)";
const DEVICE_LISTS_SQLITE: &str = "
    SELECT stream_id, user_id FROM device_lists_stream
    WHERE stream_id > ?1 AND stream_id <= ?2 AND (?3 IS NULL OR COALESCE(instance_name, 'master') = ?3)
    UNION ALL
    SELECT stream_id, from_user_id AS user_id FROM user_signature_stream
    WHERE stream_id > ?1 AND stream_id <= ?2 AND (?3 IS NULL OR COALESCE(instance_name, 'master') = ?3)";

const CACHES_PG: &str = "
    SELECT stream_id, cache_func, keys FROM cache_invalidation_stream_by_instance
    WHERE stream_id > $1 AND stream_id <= $2 AND ($3::text IS NULL OR instance_name = $3)";

const MAX_DEVICE_LISTS: &str = "SELECT COALESCE(MAX(stream_id), 0) FROM device_lists_stream";
const MAX_CACHES: &str = "SELECT COALESCE(MAX(stream_id), 0) FROM cache_invalidation_stream_by_instance";

impl Store {
    /// Users with device-list or signature changes in `(after, upto]`
    /// written by `instance` (any instance when `None`).
    pub async fn device_list_changes(&self, after: i64, upto: i64, instance: Option<&str>) -> Result<Vec<StreamUser>, sqlx::Error> {
        match self {
            Store::Postgres(p) => sqlx::query_as(DEVICE_LISTS_PG).bind(after).bind(upto).bind(instance).fetch_all(p).await,
            Store::Sqlite(p) => sqlx::query_as(DEVICE_LISTS_SQLITE).bind(after).bind(upto).bind(instance).fetch_all(p).await,
        }
    }

    /// Synapse's cache invalidations in `(after, upto]` by `instance` (any
    /// when `None`). SQLite-backed Synapse writes none.
    pub async fn cache_invalidations(&self, after: i64, upto: i64, instance: Option<&str>) -> Result<Vec<CacheInvalidation>, sqlx::Error> {
        match self {
            Store::Postgres(p) => sqlx::query_as(CACHES_PG).bind(after).bind(upto).bind(instance).fetch_all(p).await,
            Store::Sqlite(_) => Ok(Vec::new()),
        }
    }

    /// The newest stream ids of the device-list and cache streams.
    pub async fn stream_heads(&self) -> Result<(i64, i64), sqlx::Error> {
        match self {
            Store::Postgres(p) => {
                let dl: i64 = sqlx::query_scalar(MAX_DEVICE_LISTS).fetch_one(p).await?;
                let caches: i64 = sqlx::query_scalar(MAX_CACHES).fetch_one(p).await?;
                Ok((dl, caches))
            }
            Store::Sqlite(p) => Ok((sqlx::query_scalar(MAX_DEVICE_LISTS).fetch_one(p).await?, 0)),
        }
    }
}
