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

const USER_PG: &str = "SELECT name FROM users WHERE name = $1";
const USER_SQLITE: &str = "SELECT name FROM users WHERE name = ?1";
const DEVICE_PG: &str = "SELECT device_id FROM devices WHERE user_id = $1 AND device_id = $2 AND NOT hidden";
const DEVICE_SQLITE: &str = "SELECT device_id FROM devices WHERE user_id = ?1 AND device_id = ?2 AND NOT hidden";

impl Store {
    /// Whether `user_id` is registered (Synapse's `get_user_by_id`).
    pub async fn user_exists(&self, user_id: &str) -> Result<bool, sqlx::Error> {
        let found: Option<String> = match self {
            Store::Postgres(p) => sqlx::query_scalar(USER_PG).bind(user_id).fetch_optional(p).await?,
            Store::Sqlite(p) => sqlx::query_scalar(USER_SQLITE).bind(user_id).fetch_optional(p).await?,
        };
        Ok(found.is_some())
    }

    /// Whether the user has this (non-hidden) device (Synapse's `get_device`).
    pub async fn device_exists(&self, user_id: &str, device_id: &str) -> Result<bool, sqlx::Error> {
        let found: Option<String> = match self {
            Store::Postgres(p) => sqlx::query_scalar(DEVICE_PG).bind(user_id).bind(device_id).fetch_optional(p).await?,
            Store::Sqlite(p) => sqlx::query_scalar(DEVICE_SQLITE).bind(user_id).bind(device_id).fetch_optional(p).await?,
        };
        Ok(found.is_some())
    }
}

const GUEST_PG: &str = "SELECT is_guest <> 0, COALESCE(locked, FALSE) FROM users WHERE name = $1";
const GUEST_SQLITE: &str = "SELECT is_guest <> 0, COALESCE(locked, 0) <> 0 FROM users WHERE name = ?1";

impl Store {
    /// (is a guest, is locked) for a registered user, `None` if unknown.
    pub async fn guest_status(&self, user_id: &str) -> Result<Option<(bool, bool)>, sqlx::Error> {
        match self {
            Store::Postgres(p) => sqlx::query_as(GUEST_PG).bind(user_id).fetch_optional(p).await,
            Store::Sqlite(p) => sqlx::query_as(GUEST_SQLITE).bind(user_id).fetch_optional(p).await,
        }
    }
}
