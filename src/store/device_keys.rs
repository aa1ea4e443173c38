//! Local device keys: `e2e_device_keys_json` joined to `devices`, skipping
//! hidden rows (Synapse's `_get_e2e_device_keys`), for whole users in one
//! query. Requests for named devices are answered from the user's full list
//! (which is what the cache holds).

use super::Store;
use super::sql::{Arg, Sql};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeviceKeyRow {
    pub user_id: String,
    pub device_id: String,
    pub display_name: Option<String>,
    pub key_json: Option<String>,
}

const DEVICE_KEYS: Sql = Sql {
    pg: "
    SELECT user_id, device_id, d.display_name, k.key_json
    FROM e2e_device_keys_json k
    INNER JOIN devices d USING (user_id, device_id)
    WHERE user_id = ANY($1) AND NOT d.hidden",
    sqlite: "
    SELECT user_id, device_id, d.display_name, k.key_json
    FROM e2e_device_keys_json k
    INNER JOIN devices d USING (user_id, device_id)
    WHERE user_id IN (SELECT value FROM json_each(?1)) AND NOT d.hidden",
};

impl Store {
    /// Every device with keys of each of `users`.
    pub async fn device_keys(&self, users: &[&str]) -> Result<Vec<DeviceKeyRow>, sqlx::Error> {
        self.fetch_all(&DEVICE_KEYS, &[Arg::any_of(users)]).await
    }
}
