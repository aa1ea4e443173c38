//! The domain's own error: what went wrong, not how HTTP says it (the
//! HTTP edge maps it to a Matrix error).

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeysError {
    /// The body is not JSON.
    #[error("content not JSON")]
    NotJson,
    /// The body is JSON of the wrong shape (Synapse's message).
    #[error("{0}")]
    BadJson(&'static str),
    /// Something we read from is away (the database, the read barrier):
    /// worth a retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Our bug.
    #[error("internal: {0}")]
    Internal(String),
}
