//! Synapse's stream tables, read to catch up on replication rows that were
//! not seen live (a Redis outage, a gap shown by `POSITION`) and to poll when
//! Redis is not used.

use std::time::Duration;

use super::sql::{Arg, Sql};
use super::{PgConns, Store};

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
// `instance` NULL: every writer.
const DEVICE_LISTS: Sql = Sql {
    pg: "
    SELECT stream_id, user_id FROM device_lists_stream
    WHERE stream_id > $1 AND stream_id <= $2 AND ($3::text IS NULL OR COALESCE(instance_name, 'master') = $3)
    UNION ALL
    SELECT stream_id, from_user_id AS user_id FROM user_signature_stream
    WHERE stream_id > $1 AND stream_id <= $2 AND ($3::text IS NULL OR COALESCE(instance_name, 'master') = $3)",
    sqlite: "
    SELECT stream_id, user_id FROM device_lists_stream
    WHERE stream_id > ?1 AND stream_id <= ?2 AND (?3 IS NULL OR COALESCE(instance_name, 'master') = ?3)
    UNION ALL
    SELECT stream_id, from_user_id AS user_id FROM user_signature_stream
    WHERE stream_id > ?1 AND stream_id <= ?2 AND (?3 IS NULL OR COALESCE(instance_name, 'master') = ?3)",
};

/// One row of the read barrier's probe (see [`ProbeConnection::probe`]).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ProbeRow {
    pub kind: ProbeKind,
    /// A stream id, a writer's position, a mark's `added_ts`, or the top
    /// of the gapless run of ids.
    pub pos: i64,
    /// A user ID, or a writer's instance name.
    pub name: String,
    /// The writer of a change (`master` when Synapse wrote none).
    pub writer: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[repr(i32)]
pub enum ProbeKind {
    /// A device-list or signature change at `pos` for user `name`.
    Change = 0,
    /// Writer `name` has persisted everything of its own up to `pos`.
    WriterPosition = 1,
    /// Synapse marked remote user `name`'s device list stale.
    StaleMark = 2,
    /// The last id handed out by the device-list id sequence.
    SequenceHead = 3,
    /// Every id of the device-list sequence from the probe's floor up to
    /// `pos` is used by a committed row (see `PROBE`).
    GaplessUpTo = 4,
}

// In one statement, so one snapshot: the changes after `$1`, the writers'
// persisted positions (Synapse's stream_positions, which a writer updates
// only after its rows committed), the resync marks of the remote users in
// `$2` (none when it is empty), and how far above `$1` every id of the
// device-list sequence is used by a visible row. That last is Synapse's own
// rule when it loads a multi-writer stream (`_load_current_ids`): every
// table the sequence feeds is read, and an id seen means its transaction
// committed (each id serves one transaction), so an unbroken run of them
// above a safe floor is safe too, however long a writer has been idle or
// stopped. A gap (an id still in flight, rolled back, or whose row was
// deleted) ends the run.
macro_rules! probe_base {
    (pg) => {
        "
    SELECT 0 AS kind, stream_id AS pos, user_id AS name, COALESCE(instance_name, 'master') AS writer
    FROM device_lists_stream WHERE stream_id > $1
    UNION ALL SELECT 0, stream_id, from_user_id, COALESCE(instance_name, 'master') FROM user_signature_stream WHERE stream_id > $1
    UNION ALL SELECT 1, stream_id, instance_name, '' FROM stream_positions WHERE stream_name = 'device_lists_stream'
    UNION ALL SELECT 2, added_ts, user_id, '' FROM device_lists_remote_resync WHERE user_id = ANY($2)"
    };
    (sqlite) => {
        "
    SELECT 0 AS kind, stream_id AS pos, user_id AS name, COALESCE(instance_name, 'master') AS writer
    FROM device_lists_stream WHERE stream_id > ?1
    UNION ALL SELECT 0, stream_id, from_user_id, COALESCE(instance_name, 'master') FROM user_signature_stream WHERE stream_id > ?1
    UNION ALL SELECT 1, stream_id, instance_name, '' FROM stream_positions WHERE stream_name = 'device_lists_stream'
    UNION ALL SELECT 2, added_ts, user_id, '' FROM device_lists_remote_resync WHERE user_id IN (SELECT value FROM json_each(?2))"
    };
}

macro_rules! gapless_run {
    (pg) => {
        "
    UNION ALL SELECT 4, $1 + COALESCE(MAX(n) FILTER (WHERE id = $1 + n), 0), '', '' FROM (
        SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n FROM (
            SELECT stream_id AS id FROM device_lists_stream WHERE stream_id > $1
            UNION SELECT stream_id FROM user_signature_stream WHERE stream_id > $1
            UNION SELECT stream_id FROM device_lists_outbound_pokes WHERE stream_id > $1
            UNION SELECT stream_id FROM device_lists_changes_in_room WHERE stream_id > $1
            UNION SELECT stream_id FROM device_lists_remote_pending WHERE stream_id > $1
        ) AS ids
    ) AS run"
    };
    (sqlite) => {
        "
    UNION ALL SELECT 4, ?1 + COALESCE(MAX(n) FILTER (WHERE id = ?1 + n), 0), '', '' FROM (
        SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n FROM (
            SELECT stream_id AS id FROM device_lists_stream WHERE stream_id > ?1
            UNION SELECT stream_id FROM user_signature_stream WHERE stream_id > ?1
            UNION SELECT stream_id FROM device_lists_outbound_pokes WHERE stream_id > ?1
            UNION SELECT stream_id FROM device_lists_changes_in_room WHERE stream_id > ?1
            UNION SELECT stream_id FROM device_lists_remote_pending WHERE stream_id > ?1
        ) AS ids
    ) AS run"
    };
}

const PROBE: Sql = Sql { pg: concat!(probe_base!(pg), gapless_run!(pg)), sqlite: concat!(probe_base!(sqlite), gapless_run!(sqlite)) };

// The probe without the unbroken run, for a role that may not read the
// three tables only the run needs.
const PROBE_WITHOUT_RUN: Sql = Sql { pg: probe_base!(pg), sqlite: probe_base!(sqlite) };

// Which of the users in `$1` Synapse has marked stale.
const STALE_MARKS: Sql = Sql {
    pg: "SELECT user_id FROM device_lists_remote_resync WHERE user_id = ANY($1)",
    sqlite: "SELECT user_id FROM device_lists_remote_resync WHERE user_id IN (SELECT value FROM json_each(?1))",
};

// The device-list writers' persisted positions, for the barrier's first
// floor.
const WRITER_POSITIONS: Sql = Sql::same(
    "SELECT 1 AS kind, stream_id AS pos, instance_name AS name, '' AS writer FROM stream_positions WHERE stream_name = 'device_lists_stream'",
);

// The quick probe (PostgreSQL only): the last id Synapse's device-list id
// generator handed out (a sequence moves outside transactions, so every
// change committed before this statement ran has an id at or below it;
// device-list changes and signature uploads share it) and, as in PROBE,
// the resync marks of the remote users in `$1`.
// (PostgreSQL only: the SQLite text is never run.)
const QUICK_PROBE: Sql = Sql {
    pg: "
    SELECT 3 AS kind, last_value AS pos, '' AS name, '' AS writer FROM device_lists_sequence
    UNION ALL SELECT 2, added_ts, user_id, '' FROM device_lists_remote_resync WHERE user_id = ANY($1)",
    sqlite: "",
};

// The quick probe of a round without remote users: the sequence alone (the
// stale-mark lookup, even of no users, made the round trip ~15% longer).
const QUICK_PROBE_LOCAL: Sql =
    Sql { pg: "SELECT 3 AS kind, last_value AS pos, '' AS name, '' AS writer FROM device_lists_sequence", sqlite: "" };

const CACHES_PG: &str = "
    SELECT stream_id, cache_func, keys FROM cache_invalidation_stream_by_instance
    WHERE stream_id > $1 AND stream_id <= $2 AND ($3::text IS NULL OR instance_name = $3)";

// Device-list changes and signature uploads share one id sequence.
const MAX_DEVICE_LISTS: Sql = Sql::same(
    "
    SELECT MAX(head) FROM (
        SELECT COALESCE(MAX(stream_id), 0) AS head FROM device_lists_stream
        UNION ALL SELECT COALESCE(MAX(stream_id), 0) FROM user_signature_stream
    ) AS heads",
);

// Where polling the caches stream starts: the newest row written more than
// `$1` ms ago by the database's clock, else just below the oldest row kept,
// else 0.
const CACHES_START_PG: &str = "
    SELECT COALESCE(
        MAX(stream_id) FILTER (WHERE invalidation_ts < (EXTRACT(EPOCH FROM now()) * 1000)::bigint - $1),
        MIN(stream_id) - 1, 0)
    FROM cache_invalidation_stream_by_instance";

impl Store {
    /// Users with device-list or signature changes in `(after, upto]`
    /// written by `instance` (any instance when `None`).
    pub async fn device_list_changes(&self, after: i64, upto: i64, instance: Option<&str>) -> Result<Vec<StreamUser>, sqlx::Error> {
        self.fetch_all(&DEVICE_LISTS, &[Arg::Int(after), Arg::Int(upto), Arg::OptText(instance)]).await
    }

    /// Synapse's cache invalidations in `(after, upto]` by `instance` (any
    /// when `None`). SQLite-backed Synapse writes none (and SQLite has no
    /// array column to read `keys` into: the one query of one dialect).
    pub async fn cache_invalidations(&self, after: i64, upto: i64, instance: Option<&str>) -> Result<Vec<CacheInvalidation>, sqlx::Error> {
        match self {
            Store::Postgres(p) => p.run(async |c| sqlx::query_as(CACHES_PG).bind(after).bind(upto).bind(instance).fetch_all(c).await).await,
            Store::Sqlite(_) => Ok(Vec::new()),
        }
    }

    /// Where following the caches stream by polling may start: every row at
    /// or below it was written at least `age_ms` ago.
    pub async fn cache_invalidations_start(&self, age_ms: i64) -> Result<i64, sqlx::Error> {
        match self {
            Store::Postgres(p) => p.run(async |c| sqlx::query_scalar(CACHES_START_PG).bind(age_ms).fetch_one(c).await).await,
            Store::Sqlite(_) => Ok(0),
        }
    }

    /// The newest id of the device-list stream (changes and signatures).
    pub async fn device_lists_head(&self) -> Result<i64, sqlx::Error> {
        Ok(self.fetch_one::<(i64,)>(&MAX_DEVICE_LISTS).await?.0)
    }
}

/// The read barrier's own PostgreSQL connection, so that a probe never
/// waits behind the requests' statements. SQLite uses the store.
pub struct ProbeConnection {
    store: Store,
    /// One connection, opened with the store's options.
    own: Option<PgConns>,
}

impl ProbeConnection {
    pub fn new(store: Store, connect_timeout: Duration) -> Self {
        let own = match &store {
            Store::Postgres(p) => Some(PgConns::new(p.options().clone(), 1, connect_timeout)),
            Store::Sqlite(_) => None,
        };
        Self { store, own }
    }

    /// The read barrier's probe, one round trip: device-list and signature
    /// changes after `after`, each writer's persisted position, which of
    /// `remote_users` Synapse has marked stale, and (`with_run`) the top of
    /// the unbroken run of ids above `after`.
    pub async fn probe(&self, after: i64, remote_users: &[&str], with_run: bool) -> Result<Vec<ProbeRow>, sqlx::Error> {
        let args = [Arg::Int(after), Arg::list(remote_users)];
        let sql = if with_run { &PROBE } else { &PROBE_WITHOUT_RUN };
        let Some(own) = &self.own else { return self.store.fetch_all(sql, &args).await };
        own.run(async |conn| super::sql::fetch_all_on(conn, sql, &args).await).await
    }

    /// The quick probe, one round trip and no table scanned: the device-list
    /// id sequence's last value, and which of `remote_users` Synapse has
    /// marked stale. `None` on SQLite (no sequence).
    pub async fn quick_probe(&self, remote_users: &[&str]) -> Result<Option<Vec<ProbeRow>>, sqlx::Error> {
        let Some(own) = &self.own else { return Ok(None) };
        if remote_users.is_empty() {
            return own.run(async |conn| super::sql::fetch_all_on(conn, &QUICK_PROBE_LOCAL, &[]).await).await.map(Some);
        }
        let args = [Arg::list(remote_users)];
        own.run(async |conn| super::sql::fetch_all_on(conn, &QUICK_PROBE, &args).await).await.map(Some)
    }

    /// The newest id of the device-list stream.
    pub async fn head(&self) -> Result<i64, sqlx::Error> {
        self.store.device_lists_head().await
    }

    /// Which of `users` Synapse has marked stale, read on the store's
    /// connections (for requests too large to share a probe).
    pub async fn stale_marks(&self, users: &[&str]) -> Result<Vec<String>, sqlx::Error> {
        self.store.fetch_column(&STALE_MARKS, &[Arg::any_of(users)]).await
    }

    /// Each device-list writer's persisted position (`WriterPosition` rows).
    pub async fn writer_positions(&self) -> Result<Vec<ProbeRow>, sqlx::Error> {
        let Some(own) = &self.own else { return self.store.fetch_all(&WRITER_POSITIONS, &[]).await };
        own.run(async |conn| super::sql::fetch_all_on(conn, &WRITER_POSITIONS, &[]).await).await
    }
}
