//! What a `/keys/query` reads of local users, in one statement: device
//! keys, `e2e_device_keys_json` joined to `devices` skipping hidden rows
//! (Synapse's `_get_e2e_device_keys`), for whole users (requests for named
//! devices are answered from the user's full list, which is what the cache
//! holds); the cross-signing signatures by signer that answers merge; and
//! the newest cross-signing key of each type. The three parts go under
//! `UNION ALL`, their rows told apart by `kind`; a part whose list is empty
//! selects nothing.

use super::Store;
use super::sql::{Arg, Sql};

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceKeyRow {
    pub user_id: String,
    pub device_id: String,
    pub display_name: Option<String>,
    pub key_json: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CrossSigningKeyRow {
    pub user_id: String,
    pub keytype: String,
    pub keydata: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SignatureRow {
    /// The signing user.
    pub user_id: String,
    pub key_id: String,
    pub target_user_id: String,
    /// A device ID, or the public part of a cross-signing key.
    pub target_device_id: String,
    pub signature: String,
}

/// The rows of one [`Store::query_reads`].
#[derive(Debug, Default)]
pub struct QueryReads {
    pub device_keys: Vec<DeviceKeyRow>,
    pub signatures: Vec<SignatureRow>,
    /// Ordered by user, then key type.
    pub cross_signing_keys: Vec<CrossSigningKeyRow>,
}

#[derive(sqlx::FromRow)]
struct Row {
    kind: i32,
    user_id: String,
    a: Option<String>,
    b: Option<String>,
    c: Option<String>,
    d: Option<String>,
}

const DEVICE: i32 = 0;
const SIGNATURE: i32 = 1;
const KEY: i32 = 2;

// SQLite takes the bare columns of a key from the row holding MAX(stream_id).
const READS: Sql = Sql {
    pg: "
    SELECT 0 AS kind, user_id, device_id AS a, d.display_name AS b, k.key_json AS c, NULL::text AS d
    FROM e2e_device_keys_json k
    INNER JOIN devices d USING (user_id, device_id)
    WHERE user_id = ANY($1) AND NOT d.hidden
    UNION ALL
    SELECT 1, user_id, key_id, target_user_id, target_device_id, signature
    FROM e2e_cross_signing_signatures WHERE user_id = ANY($2)
    UNION ALL
    (SELECT DISTINCT ON (user_id, keytype) 2, user_id, keytype, keydata, NULL, NULL
    FROM e2e_cross_signing_keys
    WHERE user_id = ANY($3)
    ORDER BY user_id, keytype, stream_id DESC)",
    sqlite: "
    SELECT 0 AS kind, user_id, device_id AS a, d.display_name AS b, k.key_json AS c, NULL AS d
    FROM e2e_device_keys_json k
    INNER JOIN devices d USING (user_id, device_id)
    WHERE user_id IN (SELECT value FROM json_each(?1)) AND NOT d.hidden
    UNION ALL
    SELECT 1, user_id, key_id, target_user_id, target_device_id, signature
    FROM e2e_cross_signing_signatures WHERE user_id IN (SELECT value FROM json_each(?2))
    UNION ALL
    SELECT 2, user_id, keytype, keydata, NULL, CAST(MAX(stream_id) AS TEXT)
    FROM e2e_cross_signing_keys
    WHERE user_id IN (SELECT value FROM json_each(?3))
    GROUP BY user_id, keytype",
};

impl Store {
    /// In one round trip: the devices with keys of `device_owners`, the
    /// signatures made by `signers`, and the newest cross-signing key of
    /// each type of `key_owners`.
    pub async fn query_reads(&self, device_owners: &[&str], signers: &[&str], key_owners: &[&str]) -> Result<QueryReads, sqlx::Error> {
        let mut out = QueryReads::default();
        if device_owners.is_empty() && signers.is_empty() && key_owners.is_empty() {
            return Ok(out);
        }
        let args = [Arg::list(device_owners), Arg::list(signers), Arg::list(key_owners)];
        for r in self.fetch_all::<Row>(&READS, &args).await? {
            match r.kind {
                DEVICE => out.device_keys.push(DeviceKeyRow {
                    user_id: r.user_id,
                    device_id: r.a.unwrap_or_default(),
                    display_name: r.b,
                    key_json: r.c,
                }),
                SIGNATURE => out.signatures.push(SignatureRow {
                    user_id: r.user_id,
                    key_id: r.a.unwrap_or_default(),
                    target_user_id: r.b.unwrap_or_default(),
                    target_device_id: r.c.unwrap_or_default(),
                    signature: r.d.unwrap_or_default(),
                }),
                KEY => out.cross_signing_keys.push(CrossSigningKeyRow {
                    user_id: r.user_id,
                    keytype: r.a.unwrap_or_default(),
                    keydata: r.b.unwrap_or_default(),
                }),
                _ => {}
            }
        }
        out.cross_signing_keys.sort_by(|x, y| (&x.user_id, &x.keytype).cmp(&(&y.user_id, &y.keytype)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "
        INSERT INTO devices (user_id, device_id, display_name, hidden) VALUES
            ('@a:hs', 'A1', 'phone', 0), ('@a:hs', 'A2', NULL, 0), ('@a:hs', 'HIDDEN', NULL, 1), ('@b:hs', 'B1', NULL, 0);
        INSERT INTO e2e_device_keys_json VALUES
            ('@a:hs', 'A1', 1, '{\"a1\":1}'), ('@a:hs', 'A2', 1, '{\"a2\":1}'), ('@a:hs', 'HIDDEN', 1, '{}'), ('@b:hs', 'B1', 1, '{\"b1\":1}');
        INSERT INTO e2e_cross_signing_keys (user_id, keytype, keydata, stream_id) VALUES
            ('@a:hs', 'self_signing', '{\"old\":1}', 1), ('@a:hs', 'master', '{\"m\":1}', 2), ('@a:hs', 'self_signing', '{\"new\":1}', 3),
            ('@b:hs', 'master', '{\"bm\":1}', 4);
        INSERT INTO e2e_cross_signing_signatures VALUES ('@a:hs', 'ed25519:K', '@b:hs', 'B1', 'sig'), ('@b:hs', 'ed25519:L', '@a:hs', 'A1', 'sig2');";

    /// Each part answers for its own list only, hidden devices are left
    /// out, the newest key of each type wins, and empty lists select
    /// nothing.
    #[tokio::test]
    async fn each_part_reads_for_its_own_users() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create_sqlite_fixture(&dir.path().join("db.sqlite"), SEED).await.unwrap();
        let r = store.query_reads(&["@a:hs"], &["@b:hs"], &["@a:hs", "@b:hs"]).await.unwrap();
        let mut devices: Vec<_> = r.device_keys.iter().map(|d| (d.device_id.as_str(), d.display_name.as_deref())).collect();
        devices.sort();
        assert_eq!(devices, [("A1", Some("phone")), ("A2", None)]);
        assert_eq!(r.signatures.len(), 1);
        assert_eq!(
            (r.signatures[0].user_id.as_str(), r.signatures[0].target_device_id.as_str(), r.signatures[0].signature.as_str()),
            ("@b:hs", "A1", "sig2")
        );
        let keys: Vec<_> = r.cross_signing_keys.iter().map(|k| (k.user_id.as_str(), k.keytype.as_str(), k.keydata.as_str())).collect();
        assert_eq!(keys, [("@a:hs", "master", "{\"m\":1}"), ("@a:hs", "self_signing", "{\"new\":1}"), ("@b:hs", "master", "{\"bm\":1}")]);

        let r = store.query_reads(&[], &["@a:hs"], &[]).await.unwrap();
        assert!(r.device_keys.is_empty() && r.cross_signing_keys.is_empty());
        assert_eq!(r.signatures.len(), 1);
        let r = store.query_reads(&[], &[], &[]).await.unwrap();
        assert!(r.device_keys.is_empty() && r.signatures.is_empty() && r.cross_signing_keys.is_empty());
    }
}
