//! `GET …/resync_queue`: Synapse's stale marks (the users its 30-second
//! loop will resync), oldest first, paginated, and counted per server so
//! a server whose lists never converge is one glance.

use serde::Serialize;

use super::HealthError;
use crate::App;

#[derive(Debug, Serialize)]
pub struct Queue {
    /// Stale marks in all.
    pub total: i64,
    /// This page of them, oldest first.
    pub users: Vec<QueuedUser>,
    /// Pass as `from` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// Per server, the one with the oldest mark first.
    pub servers: Vec<QueuedServer>,
}

#[derive(Debug, Serialize)]
pub struct QueuedUser {
    pub user_id: String,
    pub added_ts: i64,
    pub age_ms: i64,
}

#[derive(Debug, Serialize)]
pub struct QueuedServer {
    pub server_name: String,
    pub users: i64,
    pub oldest_ts: i64,
    pub oldest_age_ms: i64,
}

/// One page of `limit` marks after the `from` token.
pub async fn queue(app: &App, from: Option<&str>, limit: i64) -> Result<Queue, HealthError> {
    let after = match from {
        None => (i64::MIN, ""),
        Some(token) => parse_token(token).ok_or_else(|| HealthError::BadRequest(format!("Invalid `from` token: {token}")))?,
    };
    let now = crate::now_ms();
    let marks = app.store.stale_marks(after, limit + 1).await?;
    let next_token = (marks.len() > usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| marks.get(usize::try_from(limit - 1).ok()?).map(|m| format!("{}_{}", m.added_ts, m.user_id)))
        .flatten();
    let users = marks
        .into_iter()
        .take(usize::try_from(limit).unwrap_or(0))
        .map(|m| QueuedUser { age_ms: now - m.added_ts, user_id: m.user_id, added_ts: m.added_ts })
        .collect();
    let servers: Vec<QueuedServer> = app
        .store
        .stale_marks_by_server()
        .await?
        .into_iter()
        .map(|s| QueuedServer { server_name: s.server_name, users: s.count, oldest_ts: s.oldest_ts, oldest_age_ms: now - s.oldest_ts })
        .collect();
    Ok(Queue { total: servers.iter().map(|s| s.users).sum(), users, next_token, servers })
}

/// `<added_ts>_<user_id>`: the last mark of the previous page.
fn parse_token(token: &str) -> Option<(i64, &str)> {
    let (ts, user) = token.split_once('_')?;
    Some((ts.parse().ok()?, user))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_split_at_the_first_underscore() {
        assert_eq!(super::parse_token("1700_@a_b:hs"), Some((1700, "@a_b:hs")));
        assert_eq!(super::parse_token("-5_@a:hs"), Some((-5, "@a:hs")));
        assert_eq!(super::parse_token("x_@a:hs"), None);
        assert_eq!(super::parse_token("17"), None);
    }
}
