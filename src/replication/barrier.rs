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
//! The floor is the lowest persisted position of the configured writers in
//! Synapse's `stream_positions` (a writer updates it only after its rows
//! committed, and only past ids of its own that have all finished), so
//! every change at or below the floor is in the snapshot of an earlier
//! probe or was applied when that probe ran. Changes above it are re-read
//! until the floor passes them, and applied once.
//!
//! The same probe returns which of the requests' remote users Synapse has
//! marked stale (`device_lists_remote_resync`, written without any stream
//! row), so a remote user marked after we cached them is never answered
//! from that entry.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::sync::watch;

use super::Invalidator;
use crate::store::{ProbeConnection, ProbeKind};

/// Probes in flight at once: one, on a connection of its own. Back to back
/// they batch best; each costs one round trip.
const MAX_IN_FLIGHT: usize = 1;

/// Above this many unconfirmed changes (a writer's position stuck), stop
/// tracking them one by one: drop every cached entry and restart from the
/// head.
const MAX_PENDING: usize = 10_000;

/// Which of the asked-for remote users Synapse has marked stale.
pub type StaleMarks = Arc<HashSet<String>>;

type Outcome = Result<StaleMarks, Arc<str>>;

pub struct Barrier {
    db: ProbeConnection,
    invalidator: Arc<Invalidator>,
    writers: Vec<String>,
    rounds: Mutex<Rounds>,
    progress: tokio::sync::Mutex<Progress>,
    /// Whether the next probe tries the quick probe first: cleared while
    /// changes keep coming (each probe would then cost two round trips).
    quick: AtomicBool,
    /// Until when the quick probe is not tried because the database refused
    /// to let this role read the sequence (it is tried again then).
    quick_refused_until: Mutex<Option<std::time::Instant>>,
    counters: Counters,
}

/// Probes run and changes the stream had not delivered when we looked.
#[derive(Debug, Default)]
pub struct Counters {
    pub probes: AtomicU64,
    /// Probes answered by the quick probe alone (nothing new committed).
    pub quick: AtomicU64,
    pub changes_applied: AtomicU64,
    pub resets: AtomicU64,
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
    /// Changes above the floor already applied: (stream id, user).
    applied: BTreeSet<(i64, String)>,
}

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Barrier").field("writers", &self.writers).finish_non_exhaustive()
    }
}

impl Barrier {
    pub fn new(db: ProbeConnection, invalidator: Arc<Invalidator>, writers: Vec<String>) -> Self {
        Self {
            db,
            invalidator,
            writers,
            rounds: Mutex::default(),
            progress: tokio::sync::Mutex::default(),
            quick: AtomicBool::new(true),
            quick_refused_until: Mutex::new(None),
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether probes try the quick probe (false for a while after the
    /// database refused this role the device-list id sequence).
    pub fn quick_probe_usable(&self) -> bool {
        let mut until = self.quick_refused_until.lock().expect("barrier quick");
        match *until {
            Some(t) if t > std::time::Instant::now() => false,
            Some(_) => {
                *until = None;
                true
            }
            None => true,
        }
    }

    /// Waits until every device-list change committed before this call has
    /// been applied to the caches; returns which of `remote_users` Synapse
    /// has marked stale. Errors when the database could not be asked.
    pub async fn sync(self: &Arc<Self>, remote_users: &[&str]) -> Result<StaleMarks, Arc<str>> {
        let (mut done, start) = {
            let mut rounds = self.rounds.lock().expect("barrier rounds");
            // A new round gets a driver of its own if there is room; else
            // the first driver to finish its probe takes it.
            let start = rounds.waiting.is_none() && rounds.in_flight < MAX_IN_FLIGHT;
            let round = rounds.waiting.get_or_insert_with(|| Round { done: watch::Sender::new(None), users: HashSet::new() });
            round.users.extend(remote_users.iter().map(|u| (*u).to_owned()));
            let done = round.done.subscribe();
            if start {
                rounds.in_flight += 1;
            }
            (done, start)
        };
        if start {
            tokio::spawn(Arc::clone(self).drive());
        }
        match done.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("waited for Some"),
            Err(_) => Err("the read barrier's probe was abandoned".into()),
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
            // Nothing is cached before the first probe: start at the head.
            None => self.db.head().await.map_err(failed)?,
        };
        let rows = self.db.probe(after, remote_users).await.map_err(failed)?;
        let mut positions: HashMap<&str, i64> = HashMap::new();
        let mut marks = HashSet::new();
        let mut changes = Vec::new();
        for row in &rows {
            match row.kind {
                ProbeKind::Change => changes.push((row.pos, row.name.as_str())),
                ProbeKind::WriterPosition => {
                    positions.insert(row.name.as_str(), row.pos);
                }
                ProbeKind::StaleMark => {
                    marks.insert(row.name.clone());
                }
                ProbeKind::SequenceHead => {}
            }
        }
        let mut progress = self.progress.lock().await;
        // Quiet (nothing above the floor): the next probe tries the quick one.
        let quiet = changes.iter().all(|(id, _)| *id <= progress.floor.unwrap_or(after));
        self.quick.store(quiet, Ordering::Relaxed);
        for (id, user) in changes {
            if id > progress.floor.unwrap_or(after) && progress.applied.insert((id, user.to_owned())) {
                self.counters.changes_applied.fetch_add(1, Ordering::Relaxed);
                self.invalidator.user_changed(user);
            }
        }
        // Every writer's rows up to its position are in this snapshot and
        // applied now. Without a position for each writer the floor stays.
        let writer_floor = self.writers.iter().map(|w| positions.get(w.as_str()).copied()).collect::<Option<Vec<i64>>>();
        let writer_floor = writer_floor.and_then(|p| p.into_iter().min()).unwrap_or(after);
        let floor = progress.floor.unwrap_or(after).max(writer_floor);
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
                *self.quick_refused_until.lock().expect("barrier quick") = Some(std::time::Instant::now() + QUICK_RETRY);
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

/// How long the quick probe stays off after the database refused it.
const QUICK_RETRY: std::time::Duration = std::time::Duration::from_secs(300);

/// SQLSTATEs that say the sequence cannot be read by this role at all
/// (insufficient privilege, no such relation), not that this one statement
/// failed.
fn is_refusal(code: Option<&str>) -> bool {
    matches!(code, Some("42501" | "42P01"))
}

fn changes_head(applied: &BTreeSet<(i64, String)>) -> i64 {
    applied.last().map_or(0, |(id, _)| *id)
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
        let path = dir.path().join("db.sqlite");
        let store = Store::create_sqlite_fixture(&path, SEED).await.unwrap();
        let Store::Sqlite(pool) = store.clone() else { unreachable!() };
        let yaml = format!("server_name: hs\ndatabase: {{name: sqlite3, args: {{database: {}}}}}\n", path.display());
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

    /// Signature uploads share the device-list stream's ids; polling follows
    /// the head of both tables.
    #[tokio::test]
    async fn the_stream_head_counts_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let (app, pool) = app(&dir).await;
        exec(&pool, "INSERT INTO user_signature_stream VALUES (15, '@signer:hs', '[\"@a:hs\"]', 'master')").await;
        assert_eq!(app.store.device_lists_head().await.unwrap(), 15);
        assert_eq!(app.store.stream_heads().await.unwrap().0, 15);
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
        *app.barrier.quick_refused_until.lock().unwrap() = Some(std::time::Instant::now() + QUICK_RETRY);
        assert!(!app.barrier.quick_probe_usable());
        *app.barrier.quick_refused_until.lock().unwrap() = Some(std::time::Instant::now() - std::time::Duration::from_millis(1));
        assert!(app.barrier.quick_probe_usable(), "tried again once the retry time has passed");
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
