//! Cross-signing keys (newest row per user and key type) and the
//! cross-signing signatures that `/keys/query` merges into answers.

use super::Store;
use super::sql::{Arg, Sql};

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

// SQLite takes the bare columns from the row holding MAX(stream_id).
const KEYS: Sql = Sql {
    pg: "
    SELECT DISTINCT ON (user_id, keytype) user_id, keytype, keydata
    FROM e2e_cross_signing_keys
    WHERE user_id = ANY($1)
    ORDER BY user_id, keytype, stream_id DESC",
    sqlite: "
    SELECT user_id, keytype, keydata, MAX(stream_id) AS stream_id
    FROM e2e_cross_signing_keys
    WHERE user_id IN (SELECT value FROM json_each(?1))
    GROUP BY user_id, keytype
    ORDER BY user_id, keytype",
};

const SIGNATURES: Sql = Sql {
    pg: "
    SELECT user_id, key_id, target_user_id, target_device_id, signature
    FROM e2e_cross_signing_signatures WHERE user_id = ANY($1)",
    sqlite: "
    SELECT user_id, key_id, target_user_id, target_device_id, signature
    FROM e2e_cross_signing_signatures WHERE user_id IN (SELECT value FROM json_each(?1))",
};

impl Store {
    /// The newest key of each type for each of `users`, ordered by user
    /// then key type.
    pub async fn cross_signing_keys(&self, users: &[&str]) -> Result<Vec<CrossSigningKeyRow>, sqlx::Error> {
        self.fetch_all(&KEYS, &[Arg::any_of(users)]).await
    }

    /// Every cross-signing signature made by each of `signers` (on their
    /// own devices and keys, and on other users' keys). The caller keeps
    /// the rows whose target it is answering with.
    pub async fn signatures_by(&self, signers: &[&str]) -> Result<Vec<SignatureRow>, sqlx::Error> {
        self.fetch_all(&SIGNATURES, &[Arg::any_of(signers)]).await
    }
}
