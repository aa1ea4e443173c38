//! Repairing a whole server: `POST …/destinations/{serverName}/device_list/resync`
//! starts a background task that repairs every user of that server
//! Synapse tracks, one at a time, at most `device_list_repair_per_second`
//! users a second; `GET …/tasks/{taskId}` shows its progress. One task per
//! server at a time. Tasks live in the memory of the replica that runs
//! them, for a day.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::Serialize;

use super::stats::Trigger;
use super::{HealthError, repair};
use crate::App;

/// Users read from Synapse per page.
const PAGE: i64 = 500;

/// The tasks of one process: those running, one per server, and the
/// ended ones, kept a day.
#[derive(Debug)]
pub struct Tasks {
    running: Mutex<HashMap<String, Arc<Task>>>,
    ended: moka::sync::Cache<String, Arc<Task>>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self {
            running: Mutex::default(),
            ended: moka::sync::Cache::builder().max_capacity(1000).time_to_live(Duration::from_secs(24 * 3600)).build(),
        }
    }
}

/// One server's repair.
#[derive(Debug)]
pub struct Task {
    pub task_id: String,
    pub server_name: String,
    pub started_ts: i64,
    total: AtomicI64,
    done: AtomicU64,
    repaired: AtomicU64,
    unchanged: AtomicU64,
    failed: AtomicU64,
    finished_ts: AtomicI64,
    error: Mutex<Option<String>>,
}

/// What `GET …/tasks/{taskId}` answers.
#[derive(Debug, Serialize)]
pub struct TaskStatus {
    pub task_id: String,
    pub server_name: String,
    /// `running`, `finished` or `failed` (stopped early: `error` says why).
    pub status: &'static str,
    pub started_ts: i64,
    pub finished_ts: Option<i64>,
    /// Users of the server Synapse tracked when the task started.
    pub total: i64,
    /// Users handled so far.
    pub done: u64,
    /// Resynced, and Synapse's list changed.
    pub repaired: u64,
    /// Resynced, and Synapse's list was right.
    pub unchanged: u64,
    /// The remote failed for them (Synapse keeps its mark and retries).
    pub failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Task {
    pub fn status(&self) -> TaskStatus {
        let finished = self.finished_ts.load(Ordering::SeqCst);
        let error = self.error.lock().expect("task error").clone();
        TaskStatus {
            task_id: self.task_id.clone(),
            server_name: self.server_name.clone(),
            status: match (finished, &error) {
                (0, _) => "running",
                (_, None) => "finished",
                (_, Some(_)) => "failed",
            },
            started_ts: self.started_ts,
            finished_ts: (finished != 0).then_some(finished),
            total: self.total.load(Ordering::SeqCst),
            done: self.done.load(Ordering::SeqCst),
            repaired: self.repaired.load(Ordering::SeqCst),
            unchanged: self.unchanged.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            error,
        }
    }
}

impl Tasks {
    pub fn get(&self, task_id: &str) -> Option<Arc<Task>> {
        let running = self.running.lock().expect("running tasks").values().find(|t| t.task_id == task_id).cloned();
        running.or_else(|| self.ended.get(task_id))
    }

    /// Registers `task` as its server's running one, unless one runs.
    fn start(&self, task: &Arc<Task>) -> Result<(), HealthError> {
        let mut running = self.running.lock().expect("running tasks");
        if let Some(other) = running.get(&task.server_name) {
            return Err(HealthError::Conflict(format!("A repair of {} is running: task {}", task.server_name, other.task_id)));
        }
        running.insert(task.server_name.clone(), Arc::clone(task));
        Ok(())
    }

    fn end(&self, task: &Arc<Task>) {
        self.running.lock().expect("running tasks").remove(&task.server_name);
        self.ended.insert(task.task_id.clone(), Arc::clone(task));
    }
}

/// Starts repairing every user of `server_name` Synapse tracks; `by`: who
/// asked (logged). Refused while a task for the server runs.
pub async fn repair_server(app: &Arc<App>, server_name: &str, timeout: Duration, by: &str) -> Result<TaskStatus, HealthError> {
    super::repair_allowed(app)?;
    if !crate::ids::is_valid_server_name(server_name) {
        return Err(HealthError::BadRequest(format!("{server_name} is not a valid server name")));
    }
    if server_name == app.config.synapse.server_name {
        return Err(HealthError::BadRequest("This server's own users' lists are Synapse's own, not cached copies".into()));
    }
    let task = Arc::new(Task {
        task_id: rand::rng().sample_iter(&Alphanumeric).take(16).map(char::from).collect(),
        server_name: server_name.to_owned(),
        started_ts: crate::now_ms(),
        total: AtomicI64::new(0),
        done: AtomicU64::new(0),
        repaired: AtomicU64::new(0),
        unchanged: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        finished_ts: AtomicI64::new(0),
        error: Mutex::new(None),
    });
    let tasks = &app.device_list_tasks;
    tasks.start(&task)?;
    let total = match app.store.tracked_count_of(server_name).await {
        Ok(total) => total,
        Err(e) => {
            tasks.running.lock().expect("running tasks").remove(server_name);
            return Err(e.into());
        }
    };
    task.total.store(total, Ordering::SeqCst);
    tracing::info!(task_id = task.task_id, server_name, users = total, by, "device-list repair of a server started");
    let (app, run) = (Arc::clone(app), Arc::clone(&task));
    tokio::spawn(async move {
        let error = run_task(&app, &run, timeout).await.err().map(|e| e.to_string());
        tracing::info!(task_id = run.task_id, server_name = run.server_name, error, "device-list repair of a server ended");
        *run.error.lock().expect("task error") = error;
        run.finished_ts.store(crate::now_ms(), Ordering::SeqCst);
        app.device_list_tasks.end(&run);
    });
    Ok(task.status())
}

async fn run_task(app: &App, task: &Task, timeout: Duration) -> Result<(), HealthError> {
    let per_second = app.config.worker.device_list_repair_per_second.max(1);
    let mut pace = tokio::time::interval(Duration::from_secs(1) / per_second);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut after = String::new();
    loop {
        let users = app.store.tracked_users_of(&task.server_name, &after, PAGE).await?;
        let Some(last) = users.last() else { return Ok(()) };
        after = last.clone();
        for user in &users {
            pace.tick().await;
            match repair(app, user, timeout, Trigger::Server).await {
                Ok(r) if !r.repaired => task.failed.fetch_add(1, Ordering::SeqCst),
                Ok(r) if r.diff.any() => task.repaired.fetch_add(1, Ordering::SeqCst),
                Ok(_) => task.unchanged.fetch_add(1, Ordering::SeqCst),
                // No longer tracked (Synapse stopped sharing a room with them).
                Err(HealthError::NotFound(_)) => 0,
                Err(e) => return Err(e),
            };
            task.done.fetch_add(1, Ordering::SeqCst);
        }
    }
}
