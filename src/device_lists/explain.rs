//! `POST …/keys/query/explain`: the answer `/keys/query` gives a requester
//! now, and for each user where it came from (our cache or the database
//! for local users; Synapse's cache, a resync through the writer or made
//! by us, the remote's `/user/keys/query`, or a failure for remote ones),
//! with the stream position of the list Synapse holds and whether its
//! stale mark was seen. What answers "the server or the client?" in an
//! undecryptable-message report.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::HealthError;
use crate::App;
use crate::keys::{KeysQuery, KeysQueryResponse, query_keys};

#[derive(Debug, Serialize)]
pub struct Explanation {
    /// Exactly what `/keys/query` answers the requester now.
    pub answer: KeysQueryResponse,
    /// Per queried user (after Synapse's filters), where their part came from.
    pub provenance: Map<String, Value>,
}

/// Answers `query` (a `/keys/query` body) as `requester`, a local user,
/// recording where each part came from.
pub async fn explain(app: &App, requester: &str, query: &[u8]) -> Result<Explanation, HealthError> {
    let server_name = &app.config.synapse.server_name;
    if !crate::ids::is_valid_user_id(requester) || crate::ids::domain_of(requester) != server_name {
        return Err(HealthError::BadRequest(format!("requester must be a user of this server ({server_name}), not {requester}")));
    }
    if !app.store.user_exists(requester).await? {
        return Err(HealthError::NotFound(format!("{requester} is not a user of this server")));
    }
    let mut query = KeysQuery::parse(query)?;
    query.timeout = app.config.worker.query_timeout(query.body_timeout_ms);
    query.explain = true;
    if app.config.synapse.msc4263_limit_key_queries_to_users_who_share_rooms {
        query.keep_users_sharing_a_room_with(app, requester).await?;
    }
    // Whether our cache held a local user's devices when the query began.
    let mut provenance = Map::new();
    for (user, _) in query.users.iter().filter(|(u, _)| crate::ids::domain_of(u) == server_name) {
        let cached = app.caches.trusted() && app.caches.devices.get_uncounted(user.as_str()).is_some();
        provenance.insert(user.clone(), json!({"source": if cached { "our_cache" } else { "local_database" }}));
    }
    let mut answer = query_keys(app, requester, &query, crate::now_ms()).await?;
    let remote = std::mem::take(&mut answer.provenance);
    let users: Vec<&str> = remote.keys().map(String::as_str).collect();
    let (stream_ids, marks) = app.store.remote_list_positions(&users).await?;
    let stream_ids: HashMap<String, String> = stream_ids.into_iter().collect();
    let marks: HashMap<String, i64> = marks.into_iter().map(|m| (m.user_id, m.added_ts)).collect();
    for (user, p) in remote {
        let mut p = serde_json::to_value(p).expect("provenance serialises");
        p["synapse_stream_id"] = stream_ids.get(&user).and_then(|s| s.parse::<i64>().ok()).into();
        p["stale_since_ts"] = marks.get(&user).copied().into();
        provenance.insert(user, p);
    }
    Ok(Explanation { answer, provenance })
}
