//! A user's device as a real client runs it: matrix-rust-sdk logged in
//! with a password, syncing in the background (which uploads its keys and
//! queries others' as the SDK decides), keeping the plaintext of every
//! message it decrypts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use matrix_sdk::config::SyncSettings;
use matrix_sdk::encryption::EncryptionSettings;
use matrix_sdk::ruma::api::client::uiaa::{AuthData, MatrixUserIdentifier, Password, UserIdentifier};
use matrix_sdk::ruma::events::room::message::{MessageType, OriginalSyncRoomMessageEvent};
use matrix_sdk::ruma::{OwnedDeviceId, OwnedUserId};
use matrix_sdk::{Client, LoopCtrl, Room};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// An account: what registration gave and logging in needs.
#[derive(Clone, Debug)]
pub struct Account {
    pub user_id: OwnedUserId,
    pub password: String,
}

/// Registers a new user on the homeserver at `hs` (open registration, the
/// dummy stage), through its client API.
pub async fn register(hs: &str, prefix: &str) -> Account {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").subsec_nanos();
    let username = format!("{prefix}-{}-{nanos}-{n}", std::process::id());
    let password = format!("pw-{username}");
    let body = json!({"username": username, "password": password, "auth": {"type": "m.login.dummy"}, "inhibit_login": true});
    let resp = reqwest::Client::new().post(format!("{hs}/_matrix/client/v3/register")).json(&body).send().await.expect("POST /register");
    let status = resp.status();
    let answer: Value = resp.json().await.expect("register answer");
    assert_eq!(status, 200, "register {username}: {answer}");
    let user_id = answer["user_id"].as_str().expect("user_id").try_into().expect("a valid user ID");
    Account { user_id, password }
}

/// One logged-in device.
pub struct Party {
    pub client: Client,
    pub account: Account,
    /// Bodies of the messages it decrypted, in order.
    pub decrypted: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    sync: JoinHandle<()>,
}

impl Party {
    /// Logs `account` in on the homeserver at `hs` as a new device and
    /// starts syncing.
    pub async fn login(hs: &str, account: &Account, device_name: &str) -> Self {
        // Cross-signing is bootstrapped explicitly (`bootstrap_cross_signing`),
        // so a failure there fails the test where it happens.
        let settings = EncryptionSettings { auto_enable_cross_signing: false, ..Default::default() };
        let client = Client::builder().homeserver_url(hs).with_encryption_settings(settings).build().await.expect("SDK client builds");
        client
            .matrix_auth()
            .login_username(account.user_id.as_str(), &account.password)
            .initial_device_display_name(device_name)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} logs in: {e}", account.user_id));
        client.encryption().wait_for_e2ee_initialization_tasks().await;
        let decrypted = Arc::new(Mutex::new(Vec::new()));
        let seen = decrypted.clone();
        client.add_event_handler(move |event: OriginalSyncRoomMessageEvent| {
            if let MessageType::Text(text) = event.content.msgtype {
                seen.lock().expect("lock").push(text.body);
            }
            std::future::ready(())
        });
        let syncing = client.clone();
        let who = format!("{} {:?}", account.user_id, client.device_id());
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let sync = tokio::spawn(async move {
            let settings = SyncSettings::default().timeout(Duration::from_secs(2));
            let result = syncing
                .sync_with_callback(settings, |_| {
                    let stop = stopping.load(Ordering::Relaxed);
                    async move { if stop { LoopCtrl::Break } else { LoopCtrl::Continue } }
                })
                .await;
            if let Err(e) = result {
                panic!("sync loop of {who}: {e}");
            }
        });
        Party { client, account: account.clone(), decrypted, stop, sync }
    }

    pub fn device_id(&self) -> OwnedDeviceId {
        self.client.device_id().expect("logged in").to_owned()
    }

    /// Creates and uploads the cross-signing keys (with the password if
    /// the homeserver asks for user-interactive auth).
    pub async fn bootstrap_cross_signing(&self) {
        let encryption = self.client.encryption();
        if let Err(e) = encryption.bootstrap_cross_signing(None).await {
            let uiaa = e.as_uiaa_response().unwrap_or_else(|| panic!("bootstrap cross-signing: {e}"));
            let mut password = Password::new(
                UserIdentifier::Matrix(MatrixUserIdentifier::new(self.account.user_id.to_string())),
                self.account.password.clone(),
            );
            password.session = uiaa.session.clone();
            encryption
                .bootstrap_cross_signing(Some(AuthData::Password(password)))
                .await
                .expect("bootstrap cross-signing with the password");
        }
        let status = encryption.cross_signing_status().await.expect("an olm machine");
        assert!(status.is_complete(), "all three private cross-signing keys here: {status:?}");
    }

    /// The room `room_id` once this device's sync has it.
    pub async fn room(&self, room_id: &matrix_sdk::ruma::RoomId) -> Room {
        let client = self.client.clone();
        crate::eventually_some(&format!("{} has room {room_id}", self.account.user_id), Duration::from_secs(30), || {
            std::future::ready(client.get_room(room_id))
        })
        .await
    }

    /// Waits until this device has decrypted a message with `body`.
    pub async fn decrypts(&self, body: &str) {
        let what = format!("{} {} decrypts {body:?}", self.account.user_id, self.device_id());
        crate::eventually_some(&what, Duration::from_secs(30), || {
            std::future::ready(self.decrypted.lock().expect("lock").iter().any(|b| b == body).then_some(()))
        })
        .await
    }
}

impl Party {
    /// Ends the sync loop between two syncs, so that no request of this
    /// device is left half done (nginx would log it 499).
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let sync = &mut self.sync;
        tokio::time::timeout(Duration::from_secs(30), sync)
            .await
            .expect("the sync loop ends within 30 s")
            .expect("the sync loop ends cleanly");
    }
}

impl Drop for Party {
    fn drop(&mut self) {
        self.sync.abort();
    }
}
