//! Read-only access to Synapse's database. All SQL lives under this module.
//!
//! One [`Store`] wraps a PostgreSQL pool (production) or an SQLite pool
//! (demo, SQLite-based Synapse setups). Each query is written once per
//! dialect and run through the one generic fetch of `sql.rs`.

mod auth;
mod connect;
mod device_health;
mod pg_conns;
mod query_reads;
mod remote;
mod schema_version;
mod sql;
mod stale_mark;
mod streams;

pub use auth::{DeviceIdRow, TokenRow};
pub use device_health::{DestinationRow, HealthSignals, LocalDeviceRow, RemoteListState, SelfSignatureRow, ServerMarks, StaleMark};
pub use pg_conns::PgConns;
pub use query_reads::{CrossSigningKeyRow, DeviceKeyRow, QueryReads, SignatureRow};
pub use remote::RemoteDeviceRow;
pub use schema_version::SchemaState;
pub use stale_mark::StaleMarker;
pub use streams::{CacheInvalidation, ProbeConnection, ProbeKind, ProbeRow, StreamUser};

use sqlx::SqlitePool;

/// The SQLite DDL of the Synapse tables we read (demo and tests only).
pub const SCHEMA_SUBSET: &str = include_str!("schema_subset.sql");

#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgConns),
    Sqlite(SqlitePool),
}

impl Store {
    /// A short name of the backend, for logs and `/ready`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgresql",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// (connections open, of which idle, most allowed), for metrics.
    pub fn pool_state(&self) -> (u32, u32, u32) {
        let idle = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        match self {
            Store::Postgres(p) => (p.open(), p.idle(), p.max()),
            Store::Sqlite(p) => (p.size(), idle(p.num_idle()), p.options().get_max_connections()),
        }
    }

    /// Cheapest possible round trip, for readiness checks.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        match self {
            Store::Postgres(p) => p.run(async |c| sqlx::query("SELECT 1").execute(c).await.map(drop)).await,
            Store::Sqlite(p) => sqlx::query("SELECT 1").execute(p).await.map(drop),
        }
    }
}

/// A few words on why the database failed, for callers we do not know
/// (`/ready`): never the driver's text, which can name hosts and roles.
pub fn short_reason(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => "unreachable",
        sqlx::Error::PoolTimedOut => "no connection available in time",
        sqlx::Error::Configuration(_) => "misconfigured",
        sqlx::Error::Database(db) => match db.code().as_deref().map(|c| c.get(..2).unwrap_or(c)) {
            Some("28") => "authentication refused",
            Some("08") => "unreachable",
            Some("53") => "out of resources",
            Some("57") => "shutting down or timed out",
            Some("3D") => "no such database",
            Some("42") => "permission denied or schema mismatch",
            _ => "database error",
        },
        _ => "database error",
    }
}

/// Whether `e` means the database is away (connection lost or refused,
/// pool exhausted, statement cancelled or timed out, server shutting down),
/// which is worth a retry, rather than a bug of ours.
/// PostgreSQL's `insufficient_privilege`: this role may not read it.
pub fn is_permission_denied(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42501")
}

pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| ["08", "53", "57"].iter().any(|class| c.starts_with(class))),
        sqlx::Error::Decode(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::RowNotFound => false,
        _ => true,
    }
}
