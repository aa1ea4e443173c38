//! The `/keys/query` domain logic: request parsing, answer assembly and the
//! key-JSON helpers they share. No HTTP and no SQL here.

pub mod json;
pub mod query;
pub mod remote;
pub mod request;

pub use query::{KeysQueryResponse, query_keys};

/// One queried user and the devices asked for (empty: all).
pub type UserQuery<'a> = (&'a str, &'a [String]);
pub use request::KeysQuery;
