//! The read barrier: no answer reflects a device list older than what
//! Synapse has already told any client.
//!
//! Synapse commits a device-list change, wakes `/sync`, and only then
//! publishes the row on Redis; a client told by `/sync` that a user's
//! devices changed may ask us before the invalidation arrives. So before a
//! request reads the caches it waits for a *probe* of the database that
//! started after the request arrived (etcd's ReadIndex): one statement reads
//! the device-list and signature changes after our floor, and any change
//! not applied yet is applied first. A probe serves every request that
//! joined its round before it started; rounds start as probes finish, on
//! one connection, each after the requests already running on the runtime
//! have had their turn to join it (a yield, no timer: under load a probe
//! then serves twice as many requests), so each request waits about one
//! database round trip.
//!
//! The floor is an id at or below which every change is committed: it is
//! in the snapshot of an earlier probe, or was applied when that probe ran.
//! Changes above it are re-read until the floor passes them, and applied
//! once. It moves to the lowest of the configured writers' positions, each
//! the higher of its persisted row in Synapse's `stream_positions` (written
//! only after its rows committed, and only when it writes) and what it last
//! reported on the replication stream (an idle writer reports too; see
//! [`super::Reported`]); past any unbroken run of used ids above it (a
//! stopped writer reports nothing: Synapse's own rule when it loads a
//! stream, see `store::streams::PROBE`); and past a missing id once a
//! change above it was first read [`PATIENCE`] ago (taken for rolled
//! back). The first floor is the writers' positions, never the newest id: a
//! lower id still in flight then would be missed for good.
//!
//! A probe carries the remote users of the requests it serves, for their
//! stale marks, up to [`MAX_ROUND_USERS`]: a request that does not fit
//! (one large body) reads its own marks after the probe, on the store's
//! connections, so it never makes the shared statement large.
//!
//! The same probe returns which of the requests' remote users Synapse has
//! marked stale (`device_lists_remote_resync`, written without any stream
//! row), so a remote user marked after we cached them is never answered
//! from that entry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::watch;

use super::{Invalidator, Reported};
use crate::store::{ProbeConnection, ProbeKind, ProbeRow};

/// Probes in flight at once: one, on a connection of its own. Back to back
/// they batch best; each costs one round trip. (Two, on two connections,
/// measured slower at every concurrency: BENCHMARKS.md.)
const MAX_IN_FLIGHT: usize = 1;

/// Above this many unconfirmed changes (a writer's position stuck), stop
/// tracking them one by one: drop every cached entry and restart from the
/// head.
const MAX_PENDING: usize = 10_000;

/// A change first read this long ago had every lower id handed out before
/// it: a transaction still holding one of those is taken for rolled back,
/// and the floor passes it (a stopped writer's missing ids, which no
/// position or unbroken run passes).
const PATIENCE: Duration = Duration::from_secs(60);

/// Most remote users one probe asks about; a request with more reads its
/// stale marks on its own.
pub const MAX_ROUND_USERS: usize = 1_000;

/// Which of the asked-for remote users Synapse has marked stale.
pub type StaleMarks = Arc<HashSet<String>>;

type Outcome = Result<StaleMarks, Arc<str>>;

pub struct Barrier {
    db: ProbeConnection,
    invalidator: Arc<Invalidator>,
    writers: Vec<String>,
    /// Positions the writers reported on the replication stream.
    reported: Arc<Reported>,
    rounds: Mutex<Rounds>,
    progress: tokio::sync::Mutex<Progress>,
    /// Whether the next probe tries the quick probe first: cleared while
    /// changes keep coming (each probe would then cost two round trips).
    quick: AtomicBool,
    /// The quick probe, refused the sequence by the database for a while.
    quick_refused: Refused,
    /// The unbroken run of ids, refused one of its tables for a while.
    run_refused: Refused,
    counters: Counters,
}

/// Probes run and changes the stream had not delivered when we looked.
#[derive(Debug, Default)]
pub struct Counters {
    pub probes: AtomicU64,
    /// Probes answered by the quick probe alone (nothing new committed).
    pub quick: AtomicU64,
    /// Changes the barrier applied that the replication stream had not
    /// delivered yet (above their writer's reported position).
    pub changes_applied: AtomicU64,
    pub resets: AtomicU64,
    /// The most remote users one probe carried.
    pub largest_round: AtomicU64,
}

#[derive(Default)]
struct Rounds {
    in_flight: usize,
    /// The round the next probe will serve, gathering arrivals.
    waiting: Option<Round>,
}

struct Round {
    done: watch::Sender<Option<Outcome>>,
    users: HashSet<String>,
}

#[derive(Default)]
struct Progress {
    /// Every change at or below it has been applied; `None` before the
    /// first probe.
    floor: Option<i64>,
    /// Changes above the floor already applied: (stream id, user), and
    /// when a probe first read it.
    applied: BTreeMap<(i64, String), Instant>,
}

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Barrier").field("writers", &self.writers).finish_non_exhaustive()
    }
}

impl Barrier {
    pub fn new(db: ProbeConnection, invalidator: Arc<Invalidator>, writers: Vec<String>, reported: Arc<Reported>) -> Self {
        Self {
            db,
            invalidator,
            writers,
            reported,
            rounds: Mutex::default(),
            progress: tokio::sync::Mutex::default(),
            quick: AtomicBool::new(true),
            quick_refused: Refused::default(),
            run_refused: Refused::default(),
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether probes try the quick probe (false for a while after the
    /// database refused this role the device-list id sequence).
    pub fn quick_probe_usable(&self) -> bool {
        self.quick_refused.usable()
    }

    /// Whether probes read the unbroken run of ids (false for a while after
    /// the database refused this role one of its tables).
    pub fn unbroken_run_usable(&self) -> bool {
        self.run_refused.usable()
    }

    /// Waits until every device-list change committed before this call has
    /// been applied to the caches; returns which of `remote_users` Synapse
    /// has marked stale. Errors when the database could not be asked.
    pub async fn sync(self: &Arc<Self>, remote_users: &[&str]) -> Result<StaleMarks, Arc<str>> {
        let (mut done, start, carried) = {
            let mut rounds = self.rounds.lock().expect("barrier rounds");
            // A new round gets a driver of its own if there is room; else
            // the first driver to finish its probe takes it.
            let start = rounds.waiting.is_none() && rounds.in_flight < MAX_IN_FLIGHT;
            let round = rounds.waiting.get_or_insert_with(|| Round { done: watch::Sender::new(None), users: HashSet::new() });
            let carried = round.users.len() + remote_users.len() <= MAX_ROUND_USERS;
            if carried {
                round.users.extend(remote_users.iter().map(|u| (*u).to_owned()));
            }
            let done = round.done.subscribe();
            if start {
                rounds.in_flight += 1;
            }
            (done, start, carried)
        };
        if start {
            tokio::spawn(Arc::clone(self).drive());
        }
        let outcome = match done.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("waited for Some"),
            Err(_) => Err("the read barrier's probe was abandoned".into()),
        };
        if carried || outcome.is_err() {
            return outcome;
        }
        // Read after the probe, so no older than what it would have said.
        match self.db.stale_marks(remote_users).await {
            Ok(marks) => Ok(Arc::new(marks.into_iter().collect())),
            Err(e) => Err(format!("stale marks could not be read: {e}").into()),
        }
    }

    /// Runs the waiting round, and the next ones while requests keep
    /// arriving; one of up to [`MAX_IN_FLIGHT`] such drivers.
    async fn drive(self: Arc<Self>) {
        loop {
            // Let the requests already running reach the barrier first: they
            // join this round instead of waiting for the next probe.
            tokio::task::yield_now().await;
            let round = {
                let mut rounds = self.rounds.lock().expect("barrier rounds");
                match rounds.waiting.take() {
                    Some(r) => r,
                    None => {
                        rounds.in_flight -= 1;
                        return;
                    }
                }
            };
            let users: Vec<&str> = round.users.iter().map(String::as_str).collect();
            self.counters.largest_round.fetch_max(users.len() as u64, Ordering::Relaxed);
            let outcome = std::panic::AssertUnwindSafe(self.probe(&users))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err("the read barrier's probe panicked".into()));
            round.done.send_replace(Some(outcome));
        }
    }

    async fn probe(&self, remote_users: &[&str]) -> Outcome {
        self.counters.probes.fetch_add(1, Ordering::Relaxed);
        let failed = |e: sqlx::Error| {
            tracing::warn!(error = %e, "read barrier probe failed");
            Arc::<str>::from(format!("read barrier probe failed: {e}"))
        };
        let floor = self.progress.lock().await.floor;
        if let Some(floor) = floor
            && let Some(marks) = self.quick_probe(floor, remote_users).await
        {
            return Ok(marks);
        }
        let after = match floor {
            Some(f) => f,
            None => self.first_floor().await.map_err(failed)?,
        };
        let with_run = self.run_refused.usable();
        let rows = match self.db.probe(after, remote_users, with_run).await {
            Err(sqlx::Error::Database(e)) if with_run && is_refusal(e.code().as_deref()) => {
                tracing::warn!(error = %e, "read barrier: a table the unbroken run of ids needs cannot be read (see docs/deployment.md for the grants); probing without it for {QUICK_RETRY:?}");
                self.run_refused.refuse();
                self.db.probe(after, remote_users, false).await
            }
            rows => rows,
        }
        .map_err(failed)?;
        let reported = self.reported.snapshot();
        let mut positions: HashMap<&str, i64> = HashMap::new();
        let mut marks = HashSet::new();
        let mut changes = Vec::new();
        let mut gapless = after;
        for row in &rows {
            match row.kind {
                ProbeKind::Change => changes.push(row),
                ProbeKind::WriterPosition => {
                    positions.insert(row.name.as_str(), row.pos);
                }
                ProbeKind::StaleMark => {
                    marks.insert(row.name.clone());
                }
                ProbeKind::GaplessUpTo => gapless = gapless.max(row.pos),
                ProbeKind::SequenceHead => {}
            }
        }
        let mut progress = self.progress.lock().await;
        let below = progress.floor.unwrap_or(after);
        // Quiet (nothing above the floor): the next probe tries the quick one.
        self.quick.store(changes.iter().all(|c| c.pos <= below), Ordering::Relaxed);
        let now = Instant::now();
        for change in changes {
            if change.pos <= below {
                continue;
            }
            match progress.applied.entry((change.pos, change.name.clone())) {
                std::collections::btree_map::Entry::Occupied(_) => continue,
                std::collections::btree_map::Entry::Vacant(v) => v.insert(now),
            };
            // The stream delivered it already (its writer reported past
            // it, after applying it): nothing to do.
            if reported.get(change.writer.as_str()).is_some_and(|p| change.pos <= *p) {
                continue;
            }
            self.counters.changes_applied.fetch_add(1, Ordering::Relaxed);
            self.invalidator.user_changed(&change.name);
        }
        // Every writer's rows up to its position are in this snapshot and
        // applied now; so is every id of the unbroken run, and every id
        // below a change first read [`PATIENCE`] ago (oldest first, so
        // stopping at the first younger one). Without a position for each
        // writer, only the last two move the floor.
        let patient = now
            .checked_sub(PATIENCE)
            .and_then(|cutoff| progress.applied.iter().take_while(|(_, seen)| **seen <= cutoff).map(|((id, _), _)| *id).last());
        let floor = below.max(self.writers_floor(&positions, &reported).unwrap_or(below)).max(gapless).max(patient.unwrap_or(below));
        progress.floor = Some(floor);
        progress.applied = progress.applied.split_off(&(floor + 1, String::new()));
        if progress.applied.len() > MAX_PENDING {
            let head = changes_head(&progress.applied);
            tracing::warn!(floor, head, "read barrier: too many unconfirmed changes; dropping every cached entry");
            self.counters.resets.fetch_add(1, Ordering::Relaxed);
            self.invalidator.everything();
            progress.applied.clear();
            progress.floor = Some(head);
        }
        Ok(Arc::new(marks))
    }

    /// The lowest of the configured writers' positions: each the higher of
    /// its persisted row and what it reported on the stream. `None` while a
    /// writer has neither.
    fn writers_floor(&self, persisted: &HashMap<&str, i64>, reported: &HashMap<String, i64>) -> Option<i64> {
        self.writers
            .iter()
            .map(|w| match (persisted.get(w.as_str()), reported.get(w)) {
                (Some(a), Some(b)) => Some(*a.max(b)),
                (a, b) => a.or(b).copied(),
            })
            .collect::<Option<Vec<i64>>>()
            .and_then(|p| p.into_iter().min())
    }

    /// Where the first probe starts: the writers' positions (everything at
    /// or below them is committed); the newest id only when a writer has
    /// never written nor reported.
    async fn first_floor(&self) -> Result<i64, sqlx::Error> {
        let rows: Vec<ProbeRow> = self.db.writer_positions().await?;
        let persisted: HashMap<&str, i64> = rows.iter().map(|r| (r.name.as_str(), r.pos)).collect();
        match self.writers_floor(&persisted, &self.reported.snapshot()) {
            Some(floor) => Ok(floor),
            None => self.db.head().await,
        }
    }
}

impl Barrier {
    /// When nothing can have been committed above `floor` (the device-list
    /// id sequence has handed out no id above it), the stale marks, from
    /// one cheap statement; else `None`, and the full probe decides.
    async fn quick_probe(&self, floor: i64, remote_users: &[&str]) -> Option<StaleMarks> {
        if !self.quick.load(Ordering::Relaxed) || !self.quick_probe_usable() {
            return None;
        }
        let rows = match self.db.quick_probe(remote_users).await {
            Ok(rows) => rows?,
            Err(sqlx::Error::Database(e)) if is_refusal(e.code().as_deref()) => {
                // A role that may not read the sequence (or a database
                // without it): full probes for a while, then try again.
                tracing::warn!(error = %e, "read barrier: the device-list id sequence cannot be read; probes read the stream tables for the next {QUICK_RETRY:?}");
                self.quick_refused.refuse();
                return None;
            }
            // Anything else (a timeout, a lost connection, too many
            // connections) concerns this probe only: the full probe
            // reports it, or succeeds on a new connection.
            Err(_) => return None,
        };
        let head = rows.iter().find(|r| r.kind == ProbeKind::SequenceHead).map(|r| r.pos);
        if head.is_none_or(|h| h > floor) {
            self.quick.store(false, Ordering::Relaxed);
            return None;
        }
        self.counters.quick.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(rows.into_iter().filter(|r| r.kind == ProbeKind::StaleMark).map(|r| r.name).collect()))
    }
}

/// How long the quick probe (or the unbroken run) stays off after the
/// database refused this role what it reads.
const QUICK_RETRY: std::time::Duration = std::time::Duration::from_secs(300);

/// Until when something the database refused is not tried again.
#[derive(Debug, Default)]
struct Refused(Mutex<Option<std::time::Instant>>);

impl Refused {
    fn usable(&self) -> bool {
        let mut until = self.0.lock().expect("barrier refusal");
        match *until {
            Some(t) if t > std::time::Instant::now() => false,
            Some(_) => {
                *until = None;
                true
            }
            None => true,
        }
    }

    fn refuse(&self) {
        *self.0.lock().expect("barrier refusal") = Some(std::time::Instant::now() + QUICK_RETRY);
    }
}

/// SQLSTATEs that say the sequence cannot be read by this role at all
/// (insufficient privilege, no such relation), not that this one statement
/// failed.
fn is_refusal(code: Option<&str>) -> bool {
    matches!(code, Some("42501" | "42P01"))
}

fn changes_head(applied: &BTreeMap<(i64, String), Instant>) -> i64 {
    applied.last_key_value().map_or(0, |((id, _), _)| *id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::App;
    use crate::config::Config;
    use crate::store::Store;

    const SEED: &str = "
        INSERT INTO stream_positions VALUES ('device_lists_stream', 'master', 10), ('events', 'master', 99);
        INSERT INTO device_lists_stream VALUES (9, '@old:hs', 'D', 'master'), (10, '@old:hs', 'D', 'master');";

    async fn app(dir: &tempfile::TempDir) -> (Arc<App>, sqlx::SqlitePool) {
        app_with(dir, SEED, "").await
    }

    /// An app over a fixture seeded with `seed`, `extra` added to its
    /// homeserver.yaml.
    async fn app_with(dir: &tempfile::TempDir, seed: &str, extra: &str) -> (Arc<App>, sqlx::SqlitePool) {
        let path = dir.path().join("db.sqlite");
        let store = Store::create_sqlite_fixture(&path, seed).await.unwrap();
        let Store::Sqlite(pool) = store.clone() else { unreachable!() };
        let yaml = format!("server_name: hs\ndatabase: {{name: sqlite3, args: {{database: {}}}}}\n{extra}", path.display());
        let config = Config::from_mapping(yaml_serde::from_str(&yaml).unwrap(), Vec::new()).unwrap();
        (App::new(config, store).unwrap(), pool)
    }

    async fn exec(pool: &sqlx::SqlitePool, sql: &'static str) {
        sqlx::raw_sql(sql).execute(pool).await.unwrap();
    }

    fn applied(app: &App) -> u64 {
        app.barrier.counters().changes_applied.load(Ordering::Relaxed)
    }

    /// The floor follows the writer's persisted position; a change above
    /// it is applied once, one committed late below the head is still
    /// found, and signatures count as changes.
    #[tokio::test]
    async fn applies_each_change_above_the_floor_once() {
        let dir = tempfile::tempdir().unwrap();
        let (app, pool) = app(&dir).await;
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(applied(&app), 0, "the first probe only finds the floor");

        exec(&pool, "INSERT INTO device_lists_stream VALUES (12, '@a:hs', 'D', 'master')").await;
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(applied(&app), 1);
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(applied(&app), 1, "re-read above the floor, not re-applied");

        // Id 11 commits after 12: the writer's position had not passed it.
        exec(&pool, "INSERT INTO device_lists_stream VALUES (11, '@b:hs', 'D', 'master')").await;
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(applied(&app), 2);

        exec(&pool, "UPDATE stream_positions SET stream_id = 12 WHERE stream_name = 'device_lists_stream'").await;
        app.barrier.sync(&[]).await.unwrap();
        assert!(app.barrier.progress.lock().await.applied.is_empty(), "the floor passed both");
        assert_eq!(app.barrier.progress.lock().await.floor, Some(12));

        exec(&pool, "INSERT INTO user_signature_stream VALUES (13, '@signer:hs', '[\"@a:hs\"]', 'master')").await;
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(applied(&app), 3);
    }

    /// Signature uploads share the device-list stream's ids: the head is
    /// the newest of both tables.
    #[tokio::test]
    async fn the_stream_head_counts_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let (app, pool) = app(&dir).await;
        exec(&pool, "INSERT INTO user_signature_stream VALUES (15, '@signer:hs', '[\"@a:hs\"]', 'master')").await;
        assert_eq!(app.store.device_lists_head().await.unwrap(), 15);
    }

    /// Only changes the stream had not delivered count as applied by the
    /// barrier.
    #[tokio::test]
    async fn changes_the_stream_delivered_are_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (app, pool) = app(&dir).await;
        app.barrier.sync(&[]).await.unwrap();
        exec(&pool, "INSERT INTO device_lists_stream VALUES (11, '@a:hs', 'D', 'master'), (12, '@b:hs', 'D', 'master')").await;
        app.replication.reported.report("master", 11);
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(applied(&app), 1, "11 came with the stream; 12 had not");
    }

    #[tokio::test]
    async fn reports_stale_marks_of_the_users_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let (app, pool) = app(&dir).await;
        exec(&pool, "INSERT INTO device_lists_remote_resync VALUES ('@r:remote', 1), ('@other:remote', 1)").await;
        let marks = app.barrier.sync(&["@r:remote", "@s:remote"]).await.unwrap();
        assert_eq!(*marks, HashSet::from(["@r:remote".to_owned()]));
    }

    /// Only the database's refusal of the sequence to this role turns the
    /// quick probe off, and only for a while.
    #[tokio::test]
    async fn only_a_refusal_turns_the_quick_probe_off_and_not_for_good() {
        for (code, refusal) in [(Some("42501"), true), (Some("42P01"), true), (Some("57014"), false), (Some("53300"), false), (None, false)]
        {
            assert_eq!(is_refusal(code), refusal, "{code:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let (app, _pool) = app(&dir).await;
        assert!(app.barrier.quick_probe_usable());
        app.barrier.quick_refused.refuse();
        assert!(!app.barrier.quick_probe_usable());
        *app.barrier.quick_refused.0.lock().unwrap() = Some(std::time::Instant::now() - std::time::Duration::from_millis(1));
        assert!(app.barrier.quick_probe_usable(), "tried again once the retry time has passed");
    }

    async fn floor(app: &App) -> Option<i64> {
        app.barrier.progress.lock().await.floor
    }

    /// An id below the newest one still in flight when the first probe
    /// runs is found once it commits: the first floor is the writer's
    /// position, not the newest id.
    #[tokio::test]
    async fn the_first_floor_is_the_writers_position_not_the_newest_id() {
        let dir = tempfile::tempdir().unwrap();
        // 11 is handed out but not committed yet; 12 is.
        let seed = "INSERT INTO stream_positions VALUES ('device_lists_stream', 'master', 10);
            INSERT INTO device_lists_stream VALUES (10, '@old:hs', 'D', 'master'), (12, '@new:hs', 'D', 'master');";
        let (app, pool) = app_with(&dir, seed, "").await;
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(floor(&app).await, Some(10));
        exec(&pool, "INSERT INTO device_lists_stream VALUES (11, '@late:hs', 'D', 'master')").await;
        app.barrier.sync(&[]).await.unwrap();
        let progress = app.barrier.progress.lock().await;
        assert!(progress.floor == Some(12) && progress.applied.is_empty(), "11 committed: the run reaches 12");
        drop(progress);
        assert_eq!(applied(&app), 2, "12, then the late 11");
    }

    const TWO_WRITERS: &str = "stream_writers: {device_lists: [dl1, dl2]}\n";

    /// An idle writer reports on the stream what its row does not say: the
    /// floor follows the lowest position either way gives, and changes the
    /// stream delivered (at or below their writer's reported position) are
    /// neither applied again nor counted.
    #[tokio::test]
    async fn an_idle_writer_moves_the_floor_by_what_it_reported() {
        let dir = tempfile::tempdir().unwrap();
        // dl2 last wrote at 5; dl1 wrote 6..=20 but 8 (rolled back: a gap).
        let seed = "INSERT INTO stream_positions VALUES ('device_lists_stream', 'dl1', 20), ('device_lists_stream', 'dl2', 5);
            WITH RECURSIVE ids(i) AS (SELECT 6 UNION ALL SELECT i + 1 FROM ids WHERE i < 20)
            INSERT INTO device_lists_stream SELECT i, '@u' || i || ':hs', 'D', 'dl1' FROM ids WHERE i != 8;";
        let (app, _pool) = app_with(&dir, seed, TWO_WRITERS).await;
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(floor(&app).await, Some(7), "pinned by dl2's row; the run stops at the gap");
        app.replication.reported.report("dl2", 20);
        app.replication.reported.report("dl1", 20);
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(floor(&app).await, Some(20));
        assert!(app.barrier.progress.lock().await.applied.is_empty());
        assert_eq!(app.barrier.counters().resets.load(Ordering::Relaxed), 0);
    }

    /// A stopped writer reports nothing and its row stays: the floor
    /// follows the unbroken run of ids the other writer commits, so
    /// thousands of changes neither pile up nor drop the caches.
    #[tokio::test]
    async fn a_stopped_writer_does_not_pin_the_floor_while_ids_are_unbroken() {
        let dir = tempfile::tempdir().unwrap();
        let seed = "INSERT INTO stream_positions VALUES ('device_lists_stream', 'dl1', 10), ('device_lists_stream', 'dl2', 10);";
        let (app, pool) = app_with(&dir, seed, TWO_WRITERS).await;
        app.barrier.sync(&[]).await.unwrap();
        let mut from = 11;
        for batch in 0..3 {
            let to = from + 3_999;
            let sql = format!(
                "WITH RECURSIVE ids(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM ids WHERE i < {to})
                 INSERT INTO device_lists_stream SELECT i, '@u' || i || ':hs', 'D', 'dl1' FROM ids;
                 INSERT INTO device_lists_changes_in_room SELECT '@u:hs', 'D', '!r:hs', {to} + 1, 1, NULL, 'dl1', 0;
                 UPDATE stream_positions SET stream_id = {to} + 1 WHERE instance_name = 'dl1';"
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
            app.barrier.sync(&[]).await.unwrap();
            assert_eq!(floor(&app).await, Some(to + 1), "batch {batch}: the run, through a room poke's id");
            from = to + 2;
        }
        assert_eq!(app.barrier.counters().resets.load(Ordering::Relaxed), 0, "nothing dropped");
        assert_eq!(applied(&app), 12_000);
    }

    /// A stopped writer and an id that never commits (rolled back): the
    /// floor waits for it, then passes it once a later change was first
    /// read a minute ago.
    #[tokio::test]
    async fn a_missing_id_is_passed_a_minute_after_a_later_change_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let seed = "INSERT INTO stream_positions VALUES ('device_lists_stream', 'dl1', 10), ('device_lists_stream', 'dl2', 10);";
        let (app, pool) = app_with(&dir, seed, TWO_WRITERS).await;
        app.barrier.sync(&[]).await.unwrap();
        exec(&pool, "INSERT INTO device_lists_stream VALUES (12, '@a:hs', 'D', 'dl1'), (13, '@b:hs', 'D', 'dl1')").await;
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(floor(&app).await, Some(10), "11 may still commit");
        // Pretend 12 was first read a minute ago, 13 just now.
        let long_ago = Instant::now() - PATIENCE - Duration::from_millis(1);
        *app.barrier.progress.lock().await.applied.values_mut().next().unwrap() = long_ago;
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(floor(&app).await, Some(12), "past 11 (given up) and 12");
        app.barrier.sync(&[]).await.unwrap();
        assert_eq!(floor(&app).await, Some(13), "then the unbroken run to 13");
        assert_eq!(applied(&app), 2, "each change applied once");
    }

    /// One request naming many remote users does not make the shared
    /// probe large: it reads its own stale marks; everyone gets theirs.
    #[tokio::test]
    async fn a_large_request_reads_its_own_marks_and_the_probe_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (app, pool) = app(&dir).await;
        exec(&pool, "INSERT INTO device_lists_remote_resync VALUES ('@r4999:remote', 1), ('@small7:remote', 1)").await;
        let big: Vec<String> = (0..5_000).map(|i| format!("@r{i}:remote")).collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        let small: Vec<String> = (0..20).map(|i| format!("@small{i}:remote")).collect();
        let small_asks: Vec<[&str; 1]> = small.iter().map(|u| [u.as_str()]).collect();
        let mut waits = vec![app.barrier.sync(&big)];
        waits.extend(small_asks.iter().map(|u| app.barrier.sync(u)));
        let marks = futures::future::join_all(waits).await;
        assert_eq!(*marks[0].as_ref().unwrap().clone(), HashSet::from(["@r4999:remote".to_owned()]));
        for (user, marks) in small.iter().zip(&marks[1..]) {
            assert_eq!(marks.as_ref().unwrap().contains(user), user == "@small7:remote", "{user}");
        }
        let largest = app.barrier.counters().largest_round.load(Ordering::Relaxed);
        assert!(largest as usize <= MAX_ROUND_USERS, "one probe carried {largest} users");
    }

    /// Requests that arrive together share probes: never more probes than
    /// requests, and each request waits for one that started after it.
    #[tokio::test]
    async fn concurrent_requests_share_probes() {
        let dir = tempfile::tempdir().unwrap();
        let (app, _pool) = app(&dir).await;
        let waits: Vec<_> = (0..50).map(|_| app.barrier.sync(&[])).collect();
        for r in futures::future::join_all(waits).await {
            r.unwrap();
        }
        let probes = app.barrier.counters().probes.load(Ordering::Relaxed);
        assert_eq!(probes, 1, "{probes} probes for 50 requests arriving together");
    }
}
