//! Access-token lookup, as Synapse's `RegistrationWorkerStore._query_for_auth`
//! plus the `users.locked` flag it checks right after.

use super::Store;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TokenRow {
    /// The user the request acts as (`puppets_user_id` when set).
    pub user_id: String,
    pub is_guest: bool,
    pub device_id: Option<String>,
    pub valid_until_ms: Option<i64>,
    /// Whose token it is (differs from `user_id` for puppeted tokens).
    pub token_owner: String,
    pub locked: bool,
    pub deactivated: bool,
}

const SQL_PG: &str = "
    SELECT users.name AS user_id, users.is_guest <> 0 AS is_guest,
           access_tokens.device_id, access_tokens.valid_until_ms,
           access_tokens.user_id AS token_owner,
           COALESCE(users.locked, FALSE) AS locked, users.deactivated <> 0 AS deactivated
    FROM users
    INNER JOIN access_tokens ON users.name = COALESCE(access_tokens.puppets_user_id, access_tokens.user_id)
    WHERE access_tokens.token = $1";

const SQL_SQLITE: &str = "
    SELECT users.name AS user_id, users.is_guest <> 0 AS is_guest,
           access_tokens.device_id, access_tokens.valid_until_ms,
           access_tokens.user_id AS token_owner,
           COALESCE(users.locked, 0) <> 0 AS locked, users.deactivated <> 0 AS deactivated
    FROM users
    INNER JOIN access_tokens ON users.name = COALESCE(access_tokens.puppets_user_id, access_tokens.user_id)
    WHERE access_tokens.token = ?1";

impl Store {
    pub async fn token_lookup(&self, token: &str) -> Result<Option<TokenRow>, sqlx::Error> {
        match self {
            Store::Postgres(p) => sqlx::query_as(SQL_PG).bind(token).fetch_optional(p).await,
            Store::Sqlite(p) => sqlx::query_as(SQL_SQLITE).bind(token).fetch_optional(p).await,
        }
    }
}
