//! Which Synapse databases we can read, by Synapse's own rule
//! (`synapse/storage/prepare_database.py`): code of schema version `V`
//! refuses a database whose `schema_compat_version` is above `V`, and a
//! worker refuses one whose `schema_version` is below `V`. We read the
//! tables of Synapse 1.136.0 (schema 92) to 1.163.x (schema 94), the window
//! our tests run against; a database outside it is refused or warned about
//! at start-up, and its version is in `/ready` and the metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::{SchemaState, Store};

/// The oldest schema we read: Synapse 1.136.0's `SCHEMA_VERSION`.
pub const OLDEST: i64 = 92;
/// The newest schema we know: Synapse 1.163.x's `SCHEMA_VERSION`.
pub const NEWEST: i64 = 94;
/// The releases the window covers, for messages.
pub const RELEASES: &str = "Synapse 1.136.0 to 1.163.x";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Inside the window we test.
    Inside,
    /// Newer than the window, but Synapse's compat rule says code of our
    /// newest schema can still read it: served, with a warning.
    Newer,
    /// Older than the window, newer than any code we know may read, or no
    /// Synapse schema at all.
    Refused,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Inside => "inside",
            Verdict::Newer => "newer",
            Verdict::Refused => "refused",
        }
    }
}

/// The verdict on `state` and the one line that explains it.
pub fn judge(state: Option<&SchemaState>) -> (Verdict, String) {
    let window = format!("{RELEASES} (schema {OLDEST} to {NEWEST})");
    let Some(s) = state else {
        return (
            Verdict::Refused,
            format!(
                "the database has no Synapse schema_version: not a Synapse database, or one Synapse has not finished creating; we read {window}"
            ),
        );
    };
    let compat = s.compat_version.map_or_else(|| "none".to_owned(), |c| c.to_string());
    let found = format!("schema {}, compat {compat}", s.version);
    if s.compat_version.is_some_and(|c| c > NEWEST) {
        return (
            Verdict::Refused,
            format!(
                "the database ({found}) is too new to read: its compat version is above {NEWEST}, the newest schema we know; we read {window}: upgrade synapse-keys-worker"
            ),
        );
    }
    if s.version < OLDEST {
        return (Verdict::Refused, format!("the database ({found}) is older than we read; we read {window}: upgrade Synapse first"));
    }
    if s.version > NEWEST {
        return (
            Verdict::Newer,
            format!(
                "the database ({found}) is newer than the {RELEASES} we test; Synapse's compat rule says it is still readable, so we serve it: upgrade synapse-keys-worker when you can"
            ),
        );
    }
    (Verdict::Inside, format!("the database ({found}) is inside the window we test, {window}"))
}

/// How often the record is read again while serving (besides every
/// `/ready`): Synapse may be upgraded under us.
pub const RECHECK: Duration = Duration::from_secs(60);

/// The last schema read, for `/ready`, the metrics and the one answer rule
/// that depends on the release (see [`SchemaStatus::owner_entry_always`]).
#[derive(Debug, Default)]
pub struct SchemaStatus {
    last: Mutex<Option<(SchemaState, Verdict)>>,
    /// The last read found no record (the demo's database), or our role
    /// may not read it (said at start-up): nothing says which release.
    no_record: AtomicBool,
}

impl SchemaStatus {
    /// Reads the database's schema record and judges it; what was read is
    /// kept. `Err` only when the database did not answer (or refused the
    /// read: remembered as no record, see [`Self::owner_entry_always`]).
    pub async fn check(&self, store: &Store) -> Result<(Verdict, String), sqlx::Error> {
        let state = match store.schema_state().await {
            Ok(state) => state,
            Err(e) => {
                if crate::store::is_permission_denied(&e) {
                    self.no_record.store(true, Ordering::Relaxed);
                }
                return Err(e);
            }
        };
        self.no_record.store(state.is_none(), Ordering::Relaxed);
        let (verdict, line) = judge(state.as_ref());
        if let Some(state) = state {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((state, verdict));
        }
        Ok((verdict, line))
    }

    /// As if `state` had just been read (tests of what depends on it).
    #[cfg(test)]
    pub(crate) fn record(&self, state: SchemaState) {
        let verdict = judge(Some(&state)).0;
        self.no_record.store(false, Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((state, verdict));
    }

    pub fn last(&self) -> Option<(SchemaState, Verdict)> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the database's Synapse gives every local device a
    /// `signatures[owner]` entry, even an empty one (1.139 and later), as of
    /// the last read; `None` before any. A record we may not read, or none
    /// at all: as the newest releases (remembered, not read again per
    /// query).
    pub fn owner_entry_always(&self) -> Option<bool> {
        if self.no_record.load(Ordering::Relaxed) {
            return Some(true);
        }
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().map(|(s, _)| !s.before_1_139)
    }

    /// [`Self::owner_entry_always`], reading the record first when it was
    /// never read (the start-up read found no database).
    pub async fn owner_entry_rule(&self, store: &Store) -> Result<bool, sqlx::Error> {
        if let Some(rule) = self.owner_entry_always() {
            return Ok(rule);
        }
        match self.check(store).await {
            Ok(_) => Ok(self.owner_entry_always().unwrap_or(true)),
            Err(e) if crate::store::is_permission_denied(&e) => Ok(true),
            Err(e) => Err(e),
        }
    }
}

/// Reads the record again every [`RECHECK`] while the process runs, so an
/// upgrade of Synapse under us reaches the answers (and `/metrics`) without
/// waiting for a `/ready` probe. A refusal found here is logged, not fatal:
/// `/ready` turns 503 and says why.
pub fn recheck_periodically(status: Arc<SchemaStatus>, store: Store) {
    tokio::spawn(async move {
        let mut said = None;
        loop {
            tokio::time::sleep(RECHECK).await;
            if let Ok(Ok((verdict, line))) = tokio::time::timeout(RECHECK, status.check(&store)).await
                && said != Some(verdict)
                && said.replace(verdict).is_some()
            {
                match verdict {
                    Verdict::Inside => tracing::info!("{line}"),
                    Verdict::Newer | Verdict::Refused => tracing::warn!("{line}"),
                }
            }
        }
    });
}

/// At start-up: `Err(line)` when the database cannot be read (the caller
/// says it), a warning
/// when it is newer than we test, its version logged in any case. A
/// database that does not answer within `wait` is checked in the
/// background until it does; a refusal then ends the process, as it would
/// have at start-up.
pub async fn check_at_start(status: Arc<SchemaStatus>, store: Store, wait: Duration) -> Result<(), String> {
    match tokio::time::timeout(wait, status.check(&store)).await {
        Ok(Ok((verdict, line))) => return said(verdict, line),
        Ok(Err(e)) if crate::store::is_permission_denied(&e) => return not_granted(),
        _ => {}
    }
    tracing::warn!("could not read the database's Synapse schema version yet; it is checked once the database answers");
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            match tokio::time::timeout(wait, status.check(&store)).await {
                Ok(Ok((verdict, line))) => {
                    if said(verdict, line.clone()).is_err() {
                        tracing::error!("{line}");
                        std::process::exit(1);
                    }
                    return;
                }
                Ok(Err(e)) if crate::store::is_permission_denied(&e) => {
                    let _ = not_granted();
                    return;
                }
                _ => {}
            }
        }
    });
    Ok(())
}

fn not_granted() -> Result<(), String> {
    tracing::warn!(
        "cannot read Synapse's schema record: grant SELECT on schema_version, schema_compat_version and applied_schema_deltas \
         (docs/deployment.md); the database's Synapse version is not checked"
    );
    Ok(())
}

fn said(verdict: Verdict, line: String) -> Result<(), String> {
    match verdict {
        Verdict::Inside => tracing::info!("{line}"),
        Verdict::Newer => tracing::warn!("{line}"),
        Verdict::Refused => return Err(line),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(version: i64, compat: Option<i64>) -> SchemaState {
        SchemaState { version, upgraded: true, compat_version: compat, deltas_at_version: 3, before_1_139: false }
    }

    #[test]
    fn synapses_rule_decides_with_our_window() {
        for v in [92, 93, 94] {
            assert_eq!(judge(Some(&at(v, Some(84)))).0, Verdict::Inside, "{v}");
        }
        // An operator upgraded Synapse before us: readable by the compat rule.
        let (verdict, line) = judge(Some(&at(97, Some(94))));
        assert_eq!(verdict, Verdict::Newer);
        assert!(line.contains("schema 97, compat 94") && line.contains("upgrade synapse-keys-worker"), "{line}");
        // A compat version above the newest schema we know.
        let (verdict, line) = judge(Some(&at(97, Some(95))));
        assert_eq!(verdict, Verdict::Refused);
        assert!(line.contains("too new") && line.contains("Synapse 1.136.0 to 1.163.x (schema 92 to 94)"), "{line}");
        // Older than the window, with or without a compat row.
        for compat in [Some(84), None] {
            let (verdict, line) = judge(Some(&at(91, compat)));
            assert_eq!(verdict, Verdict::Refused);
            assert!(line.contains("older than we read") && line.contains("upgrade Synapse first"), "{line}");
        }
        assert_eq!(judge(None).0, Verdict::Refused);
    }

    /// A database without Synapse's record (the demo's) renders as the
    /// newest releases, known from the one read: no query reads it again.
    #[tokio::test]
    async fn no_record_is_remembered_as_the_newest_rule() {
        let store = Store::Sqlite(sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap());
        let status = SchemaStatus::default();
        assert_eq!(status.owner_entry_always(), None, "nothing read yet");
        assert!(status.owner_entry_rule(&store).await.unwrap());
        assert_eq!(status.owner_entry_always(), Some(true), "the read found no record");
        status.record(SchemaState { before_1_139: true, ..at(92, Some(84)) });
        assert_eq!(status.owner_entry_always(), Some(false));
    }
}
