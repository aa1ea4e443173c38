//! What the device-list health API reads: Synapse's state of one remote
//! user's list (the stream id it holds, its stale mark, the rooms we
//! share), a user's newest cross-signing keys, a local user's devices and
//! self-signatures, Synapse's retry state for a destination, and its
//! resync queue (the stale marks). Admin calls, rare: plain statements,
//! no caches.

use super::Store;
use super::sql::{Arg, Sql};

/// Synapse's state of one remote user's device list.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RemoteListState {
    /// `device_lists_remote_extremeties.stream_id`: the remote's stream id
    /// Synapse last stored; `None`: Synapse does not track the user.
    pub stream_id: Option<String>,
    /// `device_lists_remote_resync.added_ts`: Synapse marked the list
    /// stale then.
    pub stale_since_ts: Option<i64>,
    /// Rooms this server is in where the user is joined.
    pub shared_rooms: i64,
}

const REMOTE_STATE: Sql = Sql {
    pg: "
    SELECT (SELECT stream_id FROM device_lists_remote_extremeties WHERE user_id = $1) AS stream_id,
           (SELECT added_ts FROM device_lists_remote_resync WHERE user_id = $1) AS stale_since_ts,
           (SELECT COUNT(DISTINCT room_id) FROM current_state_events
            WHERE type = 'm.room.member' AND membership = 'join' AND state_key = $1) AS shared_rooms",
    sqlite: "
    SELECT (SELECT stream_id FROM device_lists_remote_extremeties WHERE user_id = ?1) AS stream_id,
           (SELECT added_ts FROM device_lists_remote_resync WHERE user_id = ?1) AS stale_since_ts,
           (SELECT COUNT(DISTINCT room_id) FROM current_state_events
            WHERE type = 'm.room.member' AND membership = 'join' AND state_key = ?1) AS shared_rooms",
};

// The newest key of each type (Synapse's `_get_bare_e2e_cross_signing_keys_bulk`).
const CROSS_SIGNING: Sql = Sql {
    pg: "
    SELECT keytype, keydata FROM e2e_cross_signing_keys k
    WHERE user_id = $1 AND stream_id = (
        SELECT MAX(stream_id) FROM e2e_cross_signing_keys WHERE user_id = k.user_id AND keytype = k.keytype)
    ORDER BY keytype",
    sqlite: "
    SELECT keytype, keydata FROM e2e_cross_signing_keys k
    WHERE user_id = ?1 AND stream_id = (
        SELECT MAX(stream_id) FROM e2e_cross_signing_keys WHERE user_id = k.user_id AND keytype = k.keytype)
    ORDER BY keytype",
};

/// One of a local user's (non-hidden) devices, keys or not.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LocalDeviceRow {
    pub device_id: String,
    pub display_name: Option<String>,
    pub key_json: Option<String>,
}

const LOCAL_DEVICES: Sql = Sql {
    pg: "
    SELECT d.device_id, d.display_name, k.key_json FROM devices d
    LEFT JOIN e2e_device_keys_json k ON k.user_id = d.user_id AND k.device_id = d.device_id
    WHERE d.user_id = $1 AND NOT d.hidden ORDER BY d.device_id",
    sqlite: "
    SELECT d.device_id, d.display_name, k.key_json FROM devices d
    LEFT JOIN e2e_device_keys_json k ON k.user_id = d.user_id AND k.device_id = d.device_id
    WHERE d.user_id = ?1 AND NOT d.hidden ORDER BY d.device_id",
};

/// A signature a user made on one of their own devices or keys.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SelfSignatureRow {
    pub key_id: String,
    pub target_device_id: String,
    pub signature: String,
}

const SELF_SIGNATURES: Sql = Sql {
    pg: "SELECT key_id, target_device_id, signature FROM e2e_cross_signing_signatures WHERE user_id = $1 AND target_user_id = $1",
    sqlite: "SELECT key_id, target_device_id, signature FROM e2e_cross_signing_signatures WHERE user_id = ?1 AND target_user_id = ?1",
};

/// Synapse's retry state for a destination (`destinations`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DestinationRow {
    pub failure_ts: Option<i64>,
    pub retry_last_ts: Option<i64>,
    pub retry_interval: Option<i64>,
}

const DESTINATION: Sql = Sql {
    pg: "SELECT failure_ts, retry_last_ts, retry_interval::BIGINT AS retry_interval FROM destinations WHERE destination = $1",
    sqlite: "SELECT failure_ts, retry_last_ts, retry_interval FROM destinations WHERE destination = ?1",
};

/// One of Synapse's stale marks.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StaleMark {
    pub user_id: String,
    pub added_ts: i64,
}

// Oldest first; the page after (added_ts, user_id).
const STALE_MARKS: Sql = Sql {
    pg: "
    SELECT user_id, added_ts FROM device_lists_remote_resync
    WHERE (added_ts, user_id) > ($1, $2) ORDER BY added_ts, user_id LIMIT $3",
    sqlite: "
    SELECT user_id, added_ts FROM device_lists_remote_resync
    WHERE (added_ts, user_id) > (?1, ?2) ORDER BY added_ts, user_id LIMIT ?3",
};

/// Stale marks of one server.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ServerMarks {
    pub server_name: String,
    pub count: i64,
    pub oldest_ts: i64,
}

// A user ID's server name is everything after its first colon.
const MARKS_BY_SERVER: Sql = Sql {
    pg: "
    SELECT substr(user_id, strpos(user_id, ':') + 1) AS server_name, COUNT(*) AS count, MIN(added_ts) AS oldest_ts
    FROM device_lists_remote_resync GROUP BY 1 ORDER BY oldest_ts, server_name",
    sqlite: "
    SELECT substr(user_id, instr(user_id, ':') + 1) AS server_name, COUNT(*) AS count, MIN(added_ts) AS oldest_ts
    FROM device_lists_remote_resync GROUP BY 1 ORDER BY oldest_ts, server_name",
};

// Users of one server whose lists Synapse tracks, in ID order, after a given one.
const TRACKED_OF_SERVER: Sql = Sql {
    pg: "
    SELECT user_id FROM device_lists_remote_extremeties
    WHERE substr(user_id, strpos(user_id, ':') + 1) = $1 AND user_id > $2 ORDER BY user_id LIMIT $3",
    sqlite: "
    SELECT user_id FROM device_lists_remote_extremeties
    WHERE substr(user_id, instr(user_id, ':') + 1) = ?1 AND user_id > ?2 ORDER BY user_id LIMIT ?3",
};

const TRACKED_COUNT_OF_SERVER: Sql = Sql {
    pg: "SELECT COUNT(*) FROM device_lists_remote_extremeties WHERE substr(user_id, strpos(user_id, ':') + 1) = $1",
    sqlite: "SELECT COUNT(*) FROM device_lists_remote_extremeties WHERE substr(user_id, instr(user_id, ':') + 1) = ?1",
};

impl Store {
    /// Synapse's state of `user_id`'s list (a remote user).
    pub async fn remote_list_state(&self, user_id: &str) -> Result<RemoteListState, sqlx::Error> {
        let state = self.fetch_optional(&REMOTE_STATE, &[Arg::Text(user_id)]).await?;
        Ok(state.unwrap_or(RemoteListState { stream_id: None, stale_since_ts: None, shared_rooms: 0 }))
    }

    /// The newest cross-signing key of each type `user_id` has: (type, JSON).
    pub async fn cross_signing_keys_of(&self, user_id: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
        self.fetch_all(&CROSS_SIGNING, &[Arg::Text(user_id)]).await
    }

    /// Every (non-hidden) device of a local user, with its keys if any.
    pub async fn local_devices(&self, user_id: &str) -> Result<Vec<LocalDeviceRow>, sqlx::Error> {
        self.fetch_all(&LOCAL_DEVICES, &[Arg::Text(user_id)]).await
    }

    /// The signatures `user_id` made on their own devices and keys.
    pub async fn self_signatures(&self, user_id: &str) -> Result<Vec<SelfSignatureRow>, sqlx::Error> {
        self.fetch_all(&SELF_SIGNATURES, &[Arg::Text(user_id)]).await
    }

    /// Synapse's retry state for `destination`, if it has failed before.
    pub async fn destination_retry(&self, destination: &str) -> Result<Option<DestinationRow>, sqlx::Error> {
        self.fetch_optional(&DESTINATION, &[Arg::Text(destination)]).await
    }

    /// Up to `limit` stale marks after `(added_ts, user_id)`, oldest first.
    pub async fn stale_marks(&self, after: (i64, &str), limit: i64) -> Result<Vec<StaleMark>, sqlx::Error> {
        self.fetch_all(&STALE_MARKS, &[Arg::Int(after.0), Arg::Text(after.1), Arg::Int(limit)]).await
    }

    /// Stale marks per server, the server with the oldest first.
    pub async fn stale_marks_by_server(&self) -> Result<Vec<ServerMarks>, sqlx::Error> {
        self.fetch_all(&MARKS_BY_SERVER, &[]).await
    }

    /// Up to `limit` users of `server_name` whose lists Synapse tracks,
    /// after `after` in ID order.
    pub async fn tracked_users_of(&self, server_name: &str, after: &str, limit: i64) -> Result<Vec<String>, sqlx::Error> {
        self.fetch_column(&TRACKED_OF_SERVER, &[Arg::Text(server_name), Arg::Text(after), Arg::Int(limit)]).await
    }

    /// How many users of `server_name` Synapse tracks.
    pub async fn tracked_count_of(&self, server_name: &str) -> Result<i64, sqlx::Error> {
        let count: Option<(i64,)> = self.fetch_optional(&TRACKED_COUNT_OF_SERVER, &[Arg::Text(server_name)]).await?;
        Ok(count.map_or(0, |(n,)| n))
    }
}
