//! The `/keys/query` domain logic: request parsing, answer assembly and the
//! key-JSON helpers they share. No HTTP, no SQL, no `App`: what it reads
//! and asks comes through [`Context`], and it fails with [`KeysError`].

mod body;
pub mod context;
pub mod error;
pub mod json;
pub mod model;
pub mod query;
pub mod remote;
pub mod rendered;
pub mod request;

pub use context::{Context, LocalReads};
pub use error::KeysError;
pub use model::{Outcome, RemoteUser, UserDevices};
pub use query::{KeysQueryResponse, Provenance, Source, query_keys};

/// One queried user and the devices asked for (empty: all).
pub type UserQuery<'a> = (&'a str, &'a [String]);
pub use request::KeysQuery;
