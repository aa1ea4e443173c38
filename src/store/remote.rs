//! Remote users: which device lists Synapse has cached and still trusts,
//! the cached devices themselves, who still shares a room with this
//! server, and which destinations Synapse is backing off from.

use super::{Store, json_list};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RemoteDeviceRow {
    pub user_id: String,
    pub device_id: String,
    pub content: String,
}

// Cached: a non-empty stream_id in the extremities and no resync marker
// (Synapse's get_users_whose_devices_are_cached).
const CACHED_PG: &str = "
    SELECT e.user_id FROM device_lists_remote_extremeties e
    WHERE e.user_id = ANY($1) AND e.stream_id <> ''
      AND NOT EXISTS (SELECT 1 FROM device_lists_remote_resync r WHERE r.user_id = e.user_id)";
const CACHED_SQLITE: &str = "
    SELECT e.user_id FROM device_lists_remote_extremeties e
    WHERE e.user_id IN (SELECT value FROM json_each(?1)) AND e.stream_id <> ''
      AND NOT EXISTS (SELECT 1 FROM device_lists_remote_resync r WHERE r.user_id = e.user_id)";

const JOINED_PG: &str = "
    SELECT DISTINCT state_key FROM current_state_events
    WHERE type = 'm.room.member' AND membership = 'join' AND state_key = ANY($1)";
const JOINED_SQLITE: &str = "
    SELECT DISTINCT state_key FROM current_state_events
    WHERE type = 'm.room.member' AND membership = 'join' AND state_key IN (SELECT value FROM json_each(?1))";

const DEVICES_PG: &str = "
    SELECT user_id, device_id, content FROM device_lists_remote_cache
    WHERE user_id = ANY($1)";
const DEVICES_SQLITE: &str = "
    SELECT user_id, device_id, content FROM device_lists_remote_cache
    WHERE user_id IN (SELECT value FROM json_each(?1))";

// MSC4263: users sharing a joined or invited room with the requester
// (Synapse's do_users_share_a_room_joined_or_invited).
const CO_MEMBERS_PG: &str = "
    SELECT DISTINCT b.state_key FROM (
        SELECT room_id FROM current_state_events
        WHERE type = 'm.room.member' AND membership IN ('join', 'invite') AND state_key = $1
    ) AS a INNER JOIN (
        SELECT room_id, state_key FROM current_state_events
        WHERE type = 'm.room.member' AND membership IN ('join', 'invite') AND state_key = ANY($2)
    ) AS b USING (room_id)";
const CO_MEMBERS_SQLITE: &str = "
    SELECT DISTINCT b.state_key FROM (
        SELECT room_id FROM current_state_events
        WHERE type = 'm.room.member' AND membership IN ('join', 'invite') AND state_key = ?1
    ) AS a INNER JOIN (
        SELECT room_id, state_key FROM current_state_events
        WHERE type = 'm.room.member' AND membership IN ('join', 'invite') AND state_key IN (SELECT value FROM json_each(?2))
    ) AS b USING (room_id)";

// Synapse's filter_destinations_by_retry_limiter: a row with all three
// timings set whose retry is not due within the grace period.
const BACKOFF_PG: &str = "
    SELECT destination FROM destinations
    WHERE destination = ANY($1) AND retry_last_ts > 0 AND failure_ts > 0 AND retry_interval > 0
      AND retry_last_ts + retry_interval > $2";
const BACKOFF_SQLITE: &str = "
    SELECT destination FROM destinations
    WHERE destination IN (SELECT value FROM json_each(?1)) AND retry_last_ts > 0 AND failure_ts > 0
      AND retry_interval > 0 AND retry_last_ts + retry_interval > ?2";

impl Store {
    /// Those of `users` whose device lists Synapse holds and trusts.
    pub async fn remote_cached_users(&self, users: &[&str]) -> Result<Vec<String>, sqlx::Error> {
        self.user_list_query(CACHED_PG, CACHED_SQLITE, users).await
    }

    /// Those of `users` joined to a room this server is in.
    pub async fn users_sharing_a_room(&self, users: &[&str]) -> Result<Vec<String>, sqlx::Error> {
        self.user_list_query(JOINED_PG, JOINED_SQLITE, users).await
    }

    async fn user_list_query(&self, pg: &'static str, lite: &'static str, users: &[&str]) -> Result<Vec<String>, sqlx::Error> {
        let users = &*super::only_storable(users);
        if users.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Postgres(p) => sqlx::query_scalar(pg).bind(users).fetch_all(p).await,
            Store::Sqlite(p) => sqlx::query_scalar(lite).bind(json_list(users)).fetch_all(p).await,
        }
    }

    /// Every cached device of each of `users`.
    pub async fn remote_cached_devices(&self, users: &[&str]) -> Result<Vec<RemoteDeviceRow>, sqlx::Error> {
        let users = &*super::only_storable(users);
        if users.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Postgres(p) => sqlx::query_as(DEVICES_PG).bind(users).fetch_all(p).await,
            Store::Sqlite(p) => sqlx::query_as(DEVICES_SQLITE).bind(json_list(users)).fetch_all(p).await,
        }
    }

    /// Those of `users` who share a joined or invited room with `requester`.
    pub async fn users_sharing_a_room_with(&self, requester: &str, users: &[&str]) -> Result<Vec<String>, sqlx::Error> {
        let users = &*super::only_storable(users);
        if users.is_empty() || !super::storable(requester) {
            return Ok(Vec::new());
        }
        match self {
            Store::Postgres(p) => sqlx::query_scalar(CO_MEMBERS_PG).bind(requester).bind(users).fetch_all(p).await,
            Store::Sqlite(p) => sqlx::query_scalar(CO_MEMBERS_SQLITE).bind(requester).bind(json_list(users)).fetch_all(p).await,
        }
    }

    /// Those of `destinations` Synapse will not retry before `not_before_ms`.
    pub async fn destinations_in_backoff(&self, destinations: &[&str], not_before_ms: i64) -> Result<Vec<String>, sqlx::Error> {
        let destinations = &*super::only_storable(destinations);
        if destinations.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Postgres(p) => sqlx::query_scalar(BACKOFF_PG).bind(destinations).bind(not_before_ms).fetch_all(p).await,
            Store::Sqlite(p) => sqlx::query_scalar(BACKOFF_SQLITE).bind(json_list(destinations)).bind(not_before_ms).fetch_all(p).await,
        }
    }
}
