//! Device-list health: what the admin API (`/_keys_worker/admin/v1/`)
//! shows and repairs. A remote user's list that Synapse holds wrong is the
//! server-side cause of undecryptable messages; Synapse has no way to show
//! one. Here an operator sees Synapse's view of a list (and, asked to, the
//! remote's and the drift between them), Synapse's resync queue, and
//! repairs a list the one way that makes Synapse itself refetch it: its
//! own stale mark, then its device-lists writer's resync.

mod audit;
mod explain;
mod inspect;
mod queue;
mod repair;
pub mod stats;
mod tasks;
pub mod view;

pub use audit::start;
pub use explain::{Explanation, explain};
pub use inspect::{Inspection, inspect};
pub use queue::{Queue, queue};
use repair::repair_allowed;
pub use repair::{Repair, repair, repair_readiness};
pub use tasks::{Task, TaskStatus, Tasks, repair_server};

/// Why a health call could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The caller's input (400).
    #[error("{0}")]
    BadRequest(String),
    /// Nothing to show or repair (404).
    #[error("{0}")]
    NotFound(String),
    /// Not allowed by the configuration (403).
    #[error("{0}")]
    Refused(String),
    /// Already under way (400, as Synapse's "already in progress").
    #[error("{0}")]
    Conflict(String),
    /// The device-lists writer could not be reached (503).
    #[error("{0}")]
    WriterUnavailable(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The query path's own error (a bad query body, the database).
    #[error(transparent)]
    Keys(#[from] crate::keys::KeysError),
}

/// A remote user's ID, checked: valid, and not ours.
fn remote_user<'a>(server_name: &str, user_id: &'a str) -> Result<&'a str, HealthError> {
    if !crate::ids::is_valid_user_id(user_id) {
        return Err(HealthError::BadRequest(format!("{user_id} is not a valid user ID")));
    }
    let server = crate::ids::domain_of(user_id);
    if server == server_name {
        return Err(HealthError::BadRequest(format!("{user_id} is a local user: its device list is Synapse's own, not a cached copy")));
    }
    Ok(server)
}
