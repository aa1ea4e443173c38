//! Remote users: which device lists Synapse has cached and still trusts,
//! the cached devices themselves, who still shares a room with this
//! server, and which destinations Synapse is backing off from.

use super::Store;
use super::sql::{Arg, Sql};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RemoteDeviceRow {
    pub user_id: String,
    pub device_id: String,
    pub content: String,
}

// Cached: a non-empty stream_id in the extremities and no resync marker
// (Synapse's get_users_whose_devices_are_cached).
const CACHED: Sql = Sql {
    pg: "
    SELECT e.user_id FROM device_lists_remote_extremeties e
    WHERE e.user_id = ANY($1) AND e.stream_id <> ''
      AND NOT EXISTS (SELECT 1 FROM device_lists_remote_resync r WHERE r.user_id = e.user_id)",
    sqlite: "
    SELECT e.user_id FROM device_lists_remote_extremeties e
    WHERE e.user_id IN (SELECT value FROM json_each(?1)) AND e.stream_id <> ''
      AND NOT EXISTS (SELECT 1 FROM device_lists_remote_resync r WHERE r.user_id = e.user_id)",
};

const JOINED: Sql = Sql {
    pg: "
    SELECT DISTINCT state_key FROM current_state_events
    WHERE type = 'm.room.member' AND membership = 'join' AND state_key = ANY($1)",
    sqlite: "
    SELECT DISTINCT state_key FROM current_state_events
    WHERE type = 'm.room.member' AND membership = 'join' AND state_key IN (SELECT value FROM json_each(?1))",
};

const DEVICES: Sql = Sql {
    pg: "
    SELECT user_id, device_id, content FROM device_lists_remote_cache
    WHERE user_id = ANY($1)",
    sqlite: "
    SELECT user_id, device_id, content FROM device_lists_remote_cache
    WHERE user_id IN (SELECT value FROM json_each(?1))",
};

// MSC4263: users sharing a joined or invited room with the requester
// (Synapse's do_users_share_a_room_joined_or_invited).
const CO_MEMBERS: Sql = Sql {
    pg: "
    SELECT DISTINCT b.state_key FROM (
        SELECT room_id FROM current_state_events
        WHERE type = 'm.room.member' AND membership IN ('join', 'invite') AND state_key = $1
    ) AS a INNER JOIN (
        SELECT room_id, state_key FROM current_state_events
        WHERE type = 'm.room.member' AND membership IN ('join', 'invite') AND state_key = ANY($2)
    ) AS b USING (room_id)",
    sqlite: "
    SELECT DISTINCT b.state_key FROM (
        SELECT room_id FROM current_state_events
        WHERE type = 'm.room.member' AND membership IN ('join', 'invite') AND state_key = ?1
    ) AS a INNER JOIN (
        SELECT room_id, state_key FROM current_state_events
        WHERE type = 'm.room.member' AND membership IN ('join', 'invite') AND state_key IN (SELECT value FROM json_each(?2))
    ) AS b USING (room_id)",
};

// Synapse's filter_destinations_by_retry_limiter: a row with all three
// timings set whose retry is not due within the grace period.
const BACKOFF: Sql = Sql {
    pg: "
    SELECT destination FROM destinations
    WHERE destination = ANY($1) AND retry_last_ts > 0 AND failure_ts > 0 AND retry_interval > 0
      AND retry_last_ts + retry_interval > $2",
    sqlite: "
    SELECT destination FROM destinations
    WHERE destination IN (SELECT value FROM json_each(?1)) AND retry_last_ts > 0 AND failure_ts > 0
      AND retry_interval > 0 AND retry_last_ts + retry_interval > ?2",
};

impl Store {
    /// Those of `users` whose device lists Synapse holds and trusts.
    pub async fn remote_cached_users(&self, users: &[&str]) -> Result<Vec<String>, sqlx::Error> {
        self.fetch_column(&CACHED, &[Arg::any_of(users)]).await
    }

    /// Those of `users` joined to a room this server is in.
    pub async fn users_in_a_room_with_us(&self, users: &[&str]) -> Result<Vec<String>, sqlx::Error> {
        self.fetch_column(&JOINED, &[Arg::any_of(users)]).await
    }

    /// Every cached device of each of `users`.
    pub async fn remote_cached_devices(&self, users: &[&str]) -> Result<Vec<RemoteDeviceRow>, sqlx::Error> {
        self.fetch_all(&DEVICES, &[Arg::any_of(users)]).await
    }

    /// Those of `users` who share a joined or invited room with `requester`.
    pub async fn users_sharing_a_room_with(&self, requester: &str, users: &[&str]) -> Result<Vec<String>, sqlx::Error> {
        self.fetch_column(&CO_MEMBERS, &[Arg::Text(requester), Arg::any_of(users)]).await
    }

    /// Those of `destinations` Synapse will not retry before `not_before_ms`.
    pub async fn destinations_in_backoff(&self, destinations: &[&str], not_before_ms: i64) -> Result<Vec<String>, sqlx::Error> {
        self.fetch_column(&BACKOFF, &[Arg::any_of(destinations), Arg::Int(not_before_ms)]).await
    }
}
