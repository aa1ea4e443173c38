//! Read-only access to Synapse's database. All SQL lives under this module.
//!
//! One [`Store`] wraps a PostgreSQL pool (production) or an SQLite pool
//! (demo, SQLite-based Synapse setups). Each query exists once per dialect,
//! with a fixed text so the driver's prepared-statement cache applies; list
//! parameters go in as one array (PostgreSQL) or one JSON array (SQLite), so
//! a query costs one round trip however many users it names.

mod auth;
mod connect;
mod cross_signing;
mod device_keys;
mod remote;
mod streams;

pub use auth::{DeviceIdRow, TokenRow};
pub use cross_signing::{CrossSigningKeyRow, SignatureRow};
pub use device_keys::DeviceKeyRow;
pub use remote::RemoteDeviceRow;
pub use streams::{CacheInvalidation, ProbeConnection, ProbeKind, ProbeRow, StreamUser};

use sqlx::{PgPool, SqlitePool};

/// The SQLite DDL of the Synapse tables we read (demo and tests only).
pub const SCHEMA_SUBSET: &str = include_str!("schema_subset.sql");

#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgPool),
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
            Store::Postgres(p) => (p.size(), idle(p.num_idle()), p.options().get_max_connections()),
            Store::Sqlite(p) => (p.size(), idle(p.num_idle()), p.options().get_max_connections()),
        }
    }

    /// Cheapest possible round trip, for readiness checks.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        match self {
            Store::Postgres(p) => sqlx::query("SELECT 1").execute(p).await.map(drop),
            Store::Sqlite(p) => sqlx::query("SELECT 1").execute(p).await.map(drop),
        }
    }
}

/// Whether a string can be stored in (so found in) Synapse's database:
/// PostgreSQL text cannot hold NUL. A string with one matches nothing, and
/// sending it would fail the whole query, so it is never sent.
fn storable(s: &str) -> bool {
    !s.contains('\0')
}

/// `items` without the strings that cannot be stored (borrowed when all can).
fn only_storable<'a, 'b>(items: &'b [&'a str]) -> std::borrow::Cow<'b, [&'a str]> {
    if items.iter().all(|s| storable(s)) { items.into() } else { items.iter().copied().filter(|s| storable(s)).collect::<Vec<_>>().into() }
}

/// A list of strings as one SQLite parameter (read with `json_each`).
fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).expect("strings serialise")
}
