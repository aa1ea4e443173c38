//! What device-list health exports as metrics: the auditor's checks and
//! the drift it found, repairs by what started them, and the signals that
//! need no federation request (read every minute). No user or server IDs
//! in any label.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::view::Drift;
use crate::store::HealthSignals;

/// What started a repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger<'a> {
    /// An admin's call, naming who.
    Admin(&'a str),
    /// A whole server's repair task.
    Server,
    /// The auditor, on drift it found.
    Auditor,
}

impl Trigger<'_> {
    pub fn label(&self) -> &'static str {
        match self {
            Trigger::Admin(_) => "admin",
            Trigger::Server => "server",
            Trigger::Auditor => "auditor",
        }
    }
}

/// How a check of one user against their server ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    InSync,
    Drifted,
    /// Synapse had marked the list stale already: it knows.
    AlreadyStale,
    /// The server did not answer usably.
    Failed,
}

pub const CHECK_OUTCOMES: [(CheckOutcome, &str); 4] = [
    (CheckOutcome::InSync, "in_sync"),
    (CheckOutcome::Drifted, "drifted"),
    (CheckOutcome::AlreadyStale, "already_stale"),
    (CheckOutcome::Failed, "failed"),
];

pub const DRIFT_KINDS: [&str; 5] = ["missing_devices", "extra_devices", "changed_devices", "cross_signing", "stream_behind"];
pub const REPAIR_TRIGGERS: [&str; 3] = ["admin", "server", "auditor"];
pub const REPAIR_OUTCOMES: [&str; 4] = ["repaired", "unchanged", "failed", "writer_unavailable"];

#[derive(Debug, Default)]
pub struct HealthStats {
    checks: [AtomicU64; 4],
    drift: [AtomicU64; 5],
    repairs: [[AtomicU64; 4]; 3],
    pub rounds: AtomicU64,
    pub skipped_backoff: AtomicU64,
    signals: Mutex<Option<(HealthSignals, Instant)>>,
}

/// Signals older than this are not exported (their reads failed since):
/// an age computed from an old read would grow without bound.
const SIGNALS_KEPT: Duration = Duration::from_secs(180);

impl HealthStats {
    pub fn checked(&self, outcome: CheckOutcome) {
        let i = CHECK_OUTCOMES.iter().position(|(o, _)| *o == outcome).expect("every outcome is listed");
        self.checks[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn drift_found(&self, drift: &Drift) {
        let kinds = [
            !drift.missing_devices.is_empty(),
            !drift.extra_devices.is_empty(),
            !drift.changed_devices.is_empty(),
            !drift.cross_signing_changed.is_empty(),
            drift.stream_behind,
        ];
        for (i, _) in kinds.iter().enumerate().filter(|(_, k)| **k) {
            self.drift[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `outcome` is one of [`REPAIR_OUTCOMES`].
    pub fn repaired(&self, trigger: Trigger<'_>, outcome: &str) {
        let t = REPAIR_TRIGGERS.iter().position(|l| *l == trigger.label()).expect("every trigger is listed");
        let o = REPAIR_OUTCOMES.iter().position(|l| *l == outcome).expect("every outcome is listed");
        self.repairs[t][o].fetch_add(1, Ordering::Relaxed);
    }

    pub fn checks(&self, outcome: CheckOutcome) -> u64 {
        let i = CHECK_OUTCOMES.iter().position(|(o, _)| *o == outcome).expect("every outcome is listed");
        self.checks[i].load(Ordering::Relaxed)
    }

    /// Per drift kind of [`DRIFT_KINDS`], users found with it.
    pub fn drift(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.drift[i].load(Ordering::Relaxed))
    }

    /// Repairs by trigger and outcome, as [`REPAIR_TRIGGERS`] × [`REPAIR_OUTCOMES`].
    pub fn repairs(&self) -> [[u64; 4]; 3] {
        std::array::from_fn(|t| std::array::from_fn(|o| self.repairs[t][o].load(Ordering::Relaxed)))
    }

    pub fn set_signals(&self, signals: HealthSignals) {
        *self.signals.lock().expect("signals") = Some((signals, Instant::now()));
    }

    /// The latest signals, if read in the last three minutes.
    pub fn signals(&self) -> Option<HealthSignals> {
        self.signals.lock().expect("signals").as_ref().filter(|(_, at)| at.elapsed() < SIGNALS_KEPT).map(|(s, _)| s.clone())
    }
}
