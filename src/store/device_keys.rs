//! Local device keys: `e2e_device_keys_json` joined to `devices`, skipping
//! hidden rows (Synapse's `_get_e2e_device_keys`), for whole users and for
//! named (user, device) pairs, in one query.

use super::{Store, json_list};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeviceKeyRow {
    pub user_id: String,
    pub device_id: String,
    pub display_name: Option<String>,
    pub key_json: Option<String>,
}

const SQL_PG: &str = "
    SELECT user_id, device_id, d.display_name, k.key_json
    FROM e2e_device_keys_json k
    INNER JOIN devices d USING (user_id, device_id)
    WHERE (user_id = ANY($1)
           OR (user_id, device_id) IN (SELECT * FROM UNNEST($2::text[], $3::text[])))
      AND NOT d.hidden";

const SQL_SQLITE: &str = "
    SELECT user_id, device_id, d.display_name, k.key_json
    FROM e2e_device_keys_json k
    INNER JOIN devices d USING (user_id, device_id)
    WHERE (user_id IN (SELECT value FROM json_each(?1))
           OR (user_id, device_id) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]')
                                       FROM json_each(?2)))
      AND NOT d.hidden";

impl Store {
    /// Devices with keys of `all_devices_of` (every device) and of the named
    /// `pairs` (user, device).
    pub async fn device_keys(
        &self,
        all_devices_of: &[&str],
        pairs: &[(&str, &str)],
    ) -> Result<Vec<DeviceKeyRow>, sqlx::Error> {
        if all_devices_of.is_empty() && pairs.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Postgres(p) => {
                let (users, devices): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
                sqlx::query_as(SQL_PG).bind(all_devices_of).bind(users).bind(devices).fetch_all(p).await
            }
            Store::Sqlite(p) => {
                sqlx::query_as(SQL_SQLITE).bind(json_list(all_devices_of)).bind(json_list(pairs)).fetch_all(p).await
            }
        }
    }
}
