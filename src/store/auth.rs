//! Access-token lookup, as Synapse's `RegistrationWorkerStore._query_for_auth`
//! plus what `get_user_by_req` checks right after: the `users.locked` flag
//! and the legacy account validity's expiry (`get_expiration_ts_for_user`).

use super::Store;
use super::sql::{Arg, Sql};

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
    /// `account_validity.expiration_ts_ms` of `user_id`, if any.
    pub expiration_ts: Option<i64>,
}

const TOKEN: Sql = Sql {
    pg: "
    SELECT users.name AS user_id, users.is_guest <> 0 AS is_guest,
           access_tokens.device_id, access_tokens.valid_until_ms,
           access_tokens.user_id AS token_owner,
           COALESCE(users.locked, FALSE) AS locked, account_validity.expiration_ts_ms AS expiration_ts
    FROM users
    INNER JOIN access_tokens ON users.name = COALESCE(access_tokens.puppets_user_id, access_tokens.user_id)
    LEFT JOIN account_validity ON account_validity.user_id = users.name
    WHERE access_tokens.token = $1",
    sqlite: "
    SELECT users.name AS user_id, users.is_guest <> 0 AS is_guest,
           access_tokens.device_id, access_tokens.valid_until_ms,
           access_tokens.user_id AS token_owner,
           COALESCE(users.locked, 0) <> 0 AS locked, account_validity.expiration_ts_ms AS expiration_ts
    FROM users
    INNER JOIN access_tokens ON users.name = COALESCE(access_tokens.puppets_user_id, access_tokens.user_id)
    LEFT JOIN account_validity ON account_validity.user_id = users.name
    WHERE access_tokens.token = ?1",
};

impl Store {
    pub async fn token_lookup(&self, token: &str) -> Result<Option<TokenRow>, sqlx::Error> {
        self.fetch_optional(&TOKEN, &[Arg::Text(token)]).await
    }
}

const USER: Sql = Sql { pg: "SELECT name FROM users WHERE name = $1", sqlite: "SELECT name FROM users WHERE name = ?1" };
const DEVICE: Sql = Sql {
    pg: "SELECT device_id FROM devices WHERE user_id = $1 AND device_id = $2 AND NOT hidden",
    sqlite: "SELECT device_id FROM devices WHERE user_id = ?1 AND device_id = ?2 AND NOT hidden",
};

impl Store {
    /// Whether `user_id` is registered (Synapse's `get_user_by_id`).
    pub async fn user_exists(&self, user_id: &str) -> Result<bool, sqlx::Error> {
        let found: Option<(String,)> = self.fetch_optional(&USER, &[Arg::Text(user_id)]).await?;
        Ok(found.is_some())
    }

    /// Whether the user has this (non-hidden) device (Synapse's `get_device`).
    pub async fn device_exists(&self, user_id: &str, device_id: &str) -> Result<bool, sqlx::Error> {
        let found: Option<(String,)> = self.fetch_optional(&DEVICE, &[Arg::Text(user_id), Arg::Text(device_id)]).await?;
        Ok(found.is_some())
    }
}

const DEVICE_IDS: Sql = Sql {
    pg: "SELECT user_id, device_id FROM devices WHERE user_id = ANY($1) AND NOT hidden",
    sqlite: "SELECT user_id, device_id FROM devices WHERE user_id IN (SELECT value FROM json_each(?1)) AND NOT hidden",
};

/// One (non-hidden) device of a user.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeviceIdRow {
    pub user_id: String,
    pub device_id: String,
}

impl Store {
    /// Every (non-hidden) device of each of `users`, keys or not.
    pub async fn device_ids(&self, users: &[&str]) -> Result<Vec<DeviceIdRow>, sqlx::Error> {
        self.fetch_all(&DEVICE_IDS, &[Arg::any_of(users)]).await
    }
}

const GUEST: Sql = Sql {
    pg: "SELECT is_guest <> 0, COALESCE(locked, FALSE), expiration_ts_ms
    FROM users LEFT JOIN account_validity ON account_validity.user_id = users.name WHERE name = $1",
    sqlite: "SELECT is_guest <> 0, COALESCE(locked, 0) <> 0, expiration_ts_ms
    FROM users LEFT JOIN account_validity ON account_validity.user_id = users.name WHERE name = ?1",
};

impl Store {
    /// (is a guest, is locked, account expiry) for a registered user,
    /// `None` if unknown.
    pub async fn guest_status(&self, user_id: &str) -> Result<Option<(bool, bool, Option<i64>)>, sqlx::Error> {
        self.fetch_optional(&GUEST, &[Arg::Text(user_id)]).await
    }
}

const ADMIN: Sql = Sql { pg: "SELECT admin <> 0 FROM users WHERE name = $1", sqlite: "SELECT admin <> 0 FROM users WHERE name = ?1" };

impl Store {
    /// Whether `user_id` is a server admin (Synapse's `is_server_admin`:
    /// `users.admin`; an unknown user is not).
    pub async fn is_server_admin(&self, user_id: &str) -> Result<bool, sqlx::Error> {
        let found: Option<(bool,)> = self.fetch_optional(&ADMIN, &[Arg::Text(user_id)]).await?;
        Ok(found.is_some_and(|(admin,)| admin))
    }
}
