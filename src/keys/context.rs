//! What the query path needs from the rest of the service, and nothing
//! more: the cached reads of Synapse's tables, the read barrier, the ways
//! to remote servers and two settings. The service implements it on its
//! `App`; the domain logic never sees the HTTP layer, the store or the
//! configuration.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::rendered::{CrossSigningKey, RenderedDevices};
use super::{KeysError, Outcome, RemoteUser, UserQuery};
use crate::store::SignatureRow;

/// Values per user, keyed by the caller's user IDs, as the caches hold
/// them (hashed with foldhash, as the caches are: built per request).
pub type ByUser<'a, V> = HashMap<&'a str, Arc<V>, foldhash::fast::RandomState>;

/// See [`Context::local_reads`].
#[derive(Debug, Default)]
pub struct LocalReads<'a> {
    /// Each local user's devices with keys, rendered.
    pub devices: ByUser<'a, RenderedDevices>,
    /// Each queried user's cross-signing keys, parsed.
    pub cross_signing_keys: ByUser<'a, Vec<CrossSigningKey>>,
    /// Every signature the requester made.
    pub requester_signatures: Arc<Vec<SignatureRow>>,
}

pub trait Context: Sync {
    /// This homeserver's name: its users are local.
    fn server_name(&self) -> &str;

    /// How many remote destinations are asked at once.
    fn destination_concurrency(&self) -> usize;

    /// Waits until the caches hold every change Synapse committed before
    /// the call; returns those of `remote_users` Synapse has marked stale.
    fn catch_up(&self, remote_users: &[&str]) -> impl Future<Output = Result<Arc<HashSet<String>>, KeysError>> + Send;

    /// A count that moves whenever a cached read may have changed: reads
    /// made while it stood still are as fresh as reads made at its end.
    fn cache_changes(&self) -> u64;

    /// The devices of the `local` users, the cross-signing keys of the
    /// `queried` ones and the signatures `requester` made: from memory
    /// where it can, the rest in one database round trip.
    fn local_reads<'a>(
        &self,
        local: &[&'a str],
        queried: &[&'a str],
        requester: &'a str,
    ) -> impl Future<Output = Result<LocalReads<'a>, KeysError>> + Send;

    /// MSC3984: the devices application services give for their local
    /// users (an empty map when none are configured).
    fn appservice_devices(&self, local: &[UserQuery<'_>], deadline: Instant) -> impl Future<Output = Map<String, Value>> + Send;

    /// What Synapse's tables say about each remote user.
    fn remote_users(&self, users: &[&str]) -> impl Future<Output = Result<HashMap<String, Arc<RemoteUser>>, KeysError>> + Send;

    /// Those of `destinations` Synapse will not retry before `not_before_ms`.
    fn destinations_in_backoff(
        &self,
        destinations: &[&str],
        not_before_ms: i64,
    ) -> impl Future<Output = Result<Vec<String>, KeysError>> + Send;

    /// Those of `users` who share a joined or invited room with `requester`.
    fn users_sharing_a_room_with(&self, requester: &str, users: &[&str]) -> impl Future<Output = Result<Vec<String>, KeysError>> + Send;

    /// Resyncs `users` of `destination` (the device-lists writer, else the
    /// remote directly), answering by `deadline`. `looked_at`: when the
    /// caller last read what Synapse holds about them (a resync overtaken by
    /// an invalidation after that may still answer it).
    fn resync(
        &self,
        destination: &str,
        users: &[String],
        deadline: Instant,
        looked_at: Instant,
    ) -> impl Future<Output = HashMap<String, Outcome>> + Send;

    /// The destination's federation `/user/keys/query`: its answer, or the
    /// failure Synapse would report for it.
    fn user_keys_query(
        &self,
        destination: &str,
        query: &Value,
        timeout: Duration,
        deadline: Instant,
    ) -> impl Future<Output = Result<Value, Value>> + Send;

    /// The failure Synapse reports for a destination that took longer than
    /// `timeout`.
    fn timed_out(&self, timeout: Duration) -> Value;
}
