//! What a replication row means for our caches.

use std::sync::Arc;

use crate::cache::Caches;
use crate::resync::Coordinator;

/// Applies Synapse's invalidations to our caches.
#[derive(Debug)]
pub struct Invalidator {
    pub caches: Arc<Caches>,
    pub coordinator: Arc<Coordinator>,
}

impl Invalidator {
    /// A user's devices, keys or signatures changed (a `device_lists` row).
    pub fn user_changed(&self, user: &str) {
        self.caches.invalidate_user(user);
        self.coordinator.invalidate(user);
    }

    /// Everything held may be stale.
    pub fn everything(&self) {
        self.caches.invalidate_all();
        self.coordinator.invalidate_all();
    }

    /// One of Synapse's own cache invalidations (a `caches` row).
    pub fn synapse_cache(&self, func: &str, keys: Option<&[String]>) {
        let first = keys.and_then(|k| k.first()).map(String::as_str);
        match (func, first) {
            ("get_user_by_access_token", Some(token)) => self.caches.invalidate_token(token),
            ("get_user_by_access_token", None) => self.caches.invalidate_all_tokens(),
            // What the token cache holds about a user besides the token.
            ("get_user_locked_status" | "get_user_by_id" | "get_user_deactivated_status" | "get_expiration_ts_for_user", Some(user)) => {
                self.caches.invalidate_tokens_of(user)
            }
            ("get_user_locked_status" | "get_user_by_id" | "get_user_deactivated_status" | "get_expiration_ts_for_user", None) => {
                self.caches.invalidate_all_tokens()
            }
            ("_get_bare_e2e_cross_signing_keys", user) => self.caches.invalidate_cross_signing_keys(user),
            ("_get_e2e_cross_signing_signatures_for_device", Some(key)) => {
                self.caches.invalidate_signatures_by(&signature_cache_signer(key))
            }
            ("get_device" | "get_devices_by_user", Some(user)) => self.caches.invalidate_devices(user),
            // Room membership changed: [room_id, members...]; alone, the room.
            ("cs_cache_fake", _) => match keys {
                Some([_room, members @ ..]) if !members.is_empty() => {
                    for m in members {
                        self.caches.invalidate_remote(Some(m));
                    }
                }
                _ => self.caches.invalidate_remote(None),
            },
            ("dr_cache_fake", _) => self.caches.invalidate_remote(None),
            ("get_device_list_last_stream_id_for_remote" | "get_cached_devices_for_user" | "_get_cached_user_device", Some(user)) => {
                self.caches.invalidate_remote(Some(user));
                self.coordinator.invalidate(user);
            }
            _ => {}
        }
    }
}

/// The signer in a `_get_e2e_cross_signing_signatures_for_device` key.
/// Synapse sends the cache's one argument, `(user_id, device_id)`, as the
/// JSON text `["@u:hs","DEV"]`; a bare user ID is taken as is.
fn signature_cache_signer(key: &str) -> std::borrow::Cow<'_, str> {
    match serde_json::from_str::<(String, String)>(key) {
        Ok((user, _)) => user.into(),
        Err(_) => key.into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_keys_as_synapse_sends_them() {
        assert_eq!(super::signature_cache_signer(r#"["@u:hs", "DEV"]"#), "@u:hs");
        assert_eq!(super::signature_cache_signer(r#"["@u:hs","ed25519pubkey"]"#), "@u:hs");
        assert_eq!(super::signature_cache_signer("@u:hs"), "@u:hs");
    }
}
