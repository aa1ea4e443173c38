//! Cross-signing keys (newest row per user and key type) and the
//! cross-signing signatures that `/keys/query` merges into answers.

use super::{Store, json_list};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CrossSigningKeyRow {
    pub user_id: String,
    pub keytype: String,
    pub keydata: String,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SignatureRow {
    /// The signing user.
    pub user_id: String,
    pub key_id: String,
    pub target_user_id: String,
    /// A device ID, or the public part of a cross-signing key.
    pub target_device_id: String,
    pub signature: String,
}

const KEYS_PG: &str = "
    SELECT DISTINCT ON (user_id, keytype) user_id, keytype, keydata
    FROM e2e_cross_signing_keys
    WHERE user_id = ANY($1)
    ORDER BY user_id, keytype, stream_id DESC";

// SQLite takes the bare columns from the row holding MAX(stream_id).
const KEYS_SQLITE: &str = "
    SELECT user_id, keytype, keydata, MAX(stream_id) AS stream_id
    FROM e2e_cross_signing_keys
    WHERE user_id IN (SELECT value FROM json_each(?1))
    GROUP BY user_id, keytype
    ORDER BY user_id, keytype";

const SIGS_PG: &str = "
    SELECT user_id, key_id, target_user_id, target_device_id, signature
    FROM e2e_cross_signing_signatures WHERE user_id = ANY($1)";

const SIGS_SQLITE: &str = "
    SELECT user_id, key_id, target_user_id, target_device_id, signature
    FROM e2e_cross_signing_signatures WHERE user_id IN (SELECT value FROM json_each(?1))";

impl Store {
    /// The newest key of each type for each of `users`, ordered by user
    /// then key type.
    pub async fn cross_signing_keys(&self, users: &[&str]) -> Result<Vec<CrossSigningKeyRow>, sqlx::Error> {
        let users = &*super::only_storable(users);
        if users.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Postgres(p) => sqlx::query_as(KEYS_PG).bind(users).fetch_all(p).await,
            Store::Sqlite(p) => sqlx::query_as(KEYS_SQLITE).bind(json_list(users)).fetch_all(p).await,
        }
    }

    /// Every cross-signing signature made by each of `signers` (on their
    /// own devices and keys, and on other users' keys). The caller keeps
    /// the rows whose target it is answering with.
    pub async fn signatures_by(&self, signers: &[&str]) -> Result<Vec<SignatureRow>, sqlx::Error> {
        let signers = &*super::only_storable(signers);
        if signers.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Postgres(p) => sqlx::query_as(SIGS_PG).bind(signers).fetch_all(p).await,
            Store::Sqlite(p) => sqlx::query_as(SIGS_SQLITE).bind(json_list(signers)).fetch_all(p).await,
        }
    }
}
