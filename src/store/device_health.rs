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

const STREAM_IDS: Sql = Sql {
    pg: "SELECT user_id, stream_id FROM device_lists_remote_extremeties WHERE user_id = ANY($1)",
    sqlite: "SELECT user_id, stream_id FROM device_lists_remote_extremeties WHERE user_id IN (SELECT value FROM json_each(?1))",
};

const MARKS_OF: Sql = Sql {
    pg: "SELECT user_id, added_ts FROM device_lists_remote_resync WHERE user_id = ANY($1)",
    sqlite: "SELECT user_id, added_ts FROM device_lists_remote_resync WHERE user_id IN (SELECT value FROM json_each(?1))",
};

impl Store {
    /// For each of `users` Synapse tracks, the stream id it holds; and for
    /// each it marked stale, since when. Two statements, however many users.
    pub async fn remote_list_positions(&self, users: &[&str]) -> Result<(Vec<(String, String)>, Vec<StaleMark>), sqlx::Error> {
        let stream_ids = self.fetch_all(&STREAM_IDS, &[Arg::any_of(users)]).await?;
        let marks = self.fetch_all(&MARKS_OF, &[Arg::any_of(users)]).await?;
        Ok((stream_ids, marks))
    }

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

// Servers of tracked users who share a room with us, in name order after one.
const AUDITED_SERVERS: Sql = Sql {
    pg: "
    SELECT DISTINCT substr(e.user_id, strpos(e.user_id, ':') + 1) AS server FROM device_lists_remote_extremeties e
    WHERE substr(e.user_id, strpos(e.user_id, ':') + 1) > $1
      AND EXISTS (SELECT 1 FROM current_state_events c WHERE c.type = 'm.room.member' AND c.membership = 'join' AND c.state_key = e.user_id)
    ORDER BY server LIMIT $2",
    sqlite: "
    SELECT DISTINCT substr(e.user_id, instr(e.user_id, ':') + 1) AS server FROM device_lists_remote_extremeties e
    WHERE substr(e.user_id, instr(e.user_id, ':') + 1) > ?1
      AND EXISTS (SELECT 1 FROM current_state_events c WHERE c.type = 'm.room.member' AND c.membership = 'join' AND c.state_key = e.user_id)
    ORDER BY server LIMIT ?2",
};

// Tracked users of one server who share a room with us, in ID order after one.
const AUDITED_USERS: Sql = Sql {
    pg: "
    SELECT e.user_id FROM device_lists_remote_extremeties e
    WHERE substr(e.user_id, strpos(e.user_id, ':') + 1) = $1 AND e.user_id > $2
      AND EXISTS (SELECT 1 FROM current_state_events c WHERE c.type = 'm.room.member' AND c.membership = 'join' AND c.state_key = e.user_id)
    ORDER BY e.user_id LIMIT $3",
    sqlite: "
    SELECT e.user_id FROM device_lists_remote_extremeties e
    WHERE substr(e.user_id, instr(e.user_id, ':') + 1) = ?1 AND e.user_id > ?2
      AND EXISTS (SELECT 1 FROM current_state_events c WHERE c.type = 'm.room.member' AND c.membership = 'join' AND c.state_key = e.user_id)
    ORDER BY e.user_id LIMIT ?3",
};

/// The signals that need no federation request.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct HealthSignals {
    /// Synapse's stale marks.
    pub stale_marks: i64,
    /// When the oldest was made (ms since the epoch).
    pub oldest_mark_ts: Option<i64>,
    /// Remote users Synapse tracks who share no room with us any more.
    pub tracked_without_room: i64,
    /// Local users' devices with keys that lack their owner's current
    /// self-signing signature (owners with a self-signing key only).
    pub local_unsigned_devices: i64,
}

/// The signals' statement; only how each dialect walks a JSON object
/// differs (`json`, not `jsonb`, on PostgreSQL: it takes any text Synapse
/// stored). Only local users' keys are read.
macro_rules! signals_sql {
    ($keys_of_ssk:literal) => {
        concat!(
            "
    WITH ssk AS (
        SELECT k.user_id, k.keydata FROM e2e_cross_signing_keys k
        WHERE k.keytype = 'self_signing' AND EXISTS (SELECT 1 FROM users u WHERE u.name = k.user_id) AND k.stream_id = (
            SELECT MAX(stream_id) FROM e2e_cross_signing_keys WHERE user_id = k.user_id AND keytype = 'self_signing')
    ), ssk_ids AS (
        SELECT ssk.user_id, j.key AS key_id FROM ssk, ",
            $keys_of_ssk,
            " j
    )
    SELECT (SELECT COUNT(*) FROM device_lists_remote_resync) AS stale_marks,
           (SELECT MIN(added_ts) FROM device_lists_remote_resync) AS oldest_mark_ts,
           (SELECT COUNT(*) FROM device_lists_remote_extremeties e WHERE NOT EXISTS (
               SELECT 1 FROM current_state_events c WHERE c.type = 'm.room.member' AND c.membership = 'join' AND c.state_key = e.user_id
           )) AS tracked_without_room,
           (SELECT COUNT(*) FROM e2e_device_keys_json d
            JOIN devices v ON v.user_id = d.user_id AND v.device_id = d.device_id AND NOT v.hidden
            JOIN ssk_ids s ON s.user_id = d.user_id
            WHERE d.key_json <> '' AND NOT EXISTS (
                SELECT 1 FROM e2e_cross_signing_signatures g
                WHERE g.user_id = d.user_id AND g.target_user_id = d.user_id AND g.target_device_id = d.device_id AND g.key_id = s.key_id
           )) AS local_unsigned_devices"
        )
    };
}

const SIGNALS: Sql =
    Sql { pg: signals_sql!("json_each(ssk.keydata::json -> 'keys')"), sqlite: signals_sql!("json_each(ssk.keydata, '$.keys')") };

impl Store {
    /// Up to `limit` servers (after `after`, by name) with tracked users
    /// who share a room with us.
    pub async fn audited_servers(&self, after: &str, limit: i64) -> Result<Vec<String>, sqlx::Error> {
        self.fetch_column(&AUDITED_SERVERS, &[Arg::Text(after), Arg::Int(limit)]).await
    }

    /// Up to `limit` tracked users of `server_name` who share a room with
    /// us, after `after` by ID.
    pub async fn audited_users_of(&self, server_name: &str, after: &str, limit: i64) -> Result<Vec<String>, sqlx::Error> {
        self.fetch_column(&AUDITED_USERS, &[Arg::Text(server_name), Arg::Text(after), Arg::Int(limit)]).await
    }

    /// The cheap device-list signals, in one statement.
    pub async fn health_signals(&self) -> Result<HealthSignals, sqlx::Error> {
        self.fetch_one(&SIGNALS).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signals on an SQLite fixture (the PostgreSQL text differs only in
    /// how it walks the key's JSON; the metrics test reads it there).
    #[tokio::test]
    async fn the_signals_count_what_they_say() {
        let dir = tempfile::tempdir().unwrap();
        let seed = r#"
            INSERT INTO users (name) VALUES ('@a:hs'), ('@b:hs');
            INSERT INTO e2e_cross_signing_keys (user_id, keytype, keydata, stream_id) VALUES
                ('@remote:elsewhere', 'self_signing', '{"keys":{"ed25519:R":"R"}}', 3);
            INSERT INTO devices (user_id, device_id, hidden) VALUES ('@a:hs', 'SIGNED', 0), ('@a:hs', 'UNSIGNED', 0),
                ('@a:hs', 'NOKEYS', 0), ('@b:hs', 'NOSSK', 0);
            INSERT INTO e2e_device_keys_json (user_id, device_id, ts_added_ms, key_json) VALUES
                ('@a:hs', 'SIGNED', 1, '{"k":1}'), ('@a:hs', 'UNSIGNED', 1, '{"k":2}'), ('@b:hs', 'NOSSK', 1, '{"k":3}');
            INSERT INTO e2e_cross_signing_keys (user_id, keytype, keydata, stream_id) VALUES
                ('@a:hs', 'self_signing', '{"keys":{"ed25519:OLD":"OLD"}}', 1),
                ('@a:hs', 'self_signing', '{"keys":{"ed25519:NEW":"NEW"}}', 2);
            INSERT INTO e2e_cross_signing_signatures (user_id, key_id, target_user_id, target_device_id, signature) VALUES
                ('@a:hs', 'ed25519:NEW', '@a:hs', 'SIGNED', 's'), ('@a:hs', 'ed25519:OLD', '@a:hs', 'UNSIGNED', 's');
            INSERT INTO device_lists_remote_resync (user_id, added_ts) VALUES ('@r1:remote', 500), ('@r2:remote', 300);
            INSERT INTO device_lists_remote_extremeties (user_id, stream_id) VALUES ('@r1:remote', '1'), ('@r3:remote', '2');
            INSERT INTO current_state_events (event_id, room_id, type, state_key, membership) VALUES ('$e', '!r', 'm.room.member', '@r1:remote', 'join');
        "#;
        let store = Store::create_sqlite_fixture(&dir.path().join("db"), seed).await.unwrap();
        let signals = store.health_signals().await.unwrap();
        let expected = HealthSignals { stale_marks: 2, oldest_mark_ts: Some(300), tracked_without_room: 1, local_unsigned_devices: 1 };
        assert_eq!(signals, expected, "UNSIGNED has only the old key's signature; NOSSK's owner has no self-signing key");
    }
}
