//! What the domain reads about remote users: Synapse's view of one, and a
//! resynced device list.

use std::sync::Arc;

use serde_json::Value;
use serde_json::value::RawValue;

use super::rendered::RenderedDevices;

/// What Synapse's tables say about one remote user.
#[derive(Debug, Clone, Default)]
pub struct RemoteUser {
    /// Synapse's own device-list cache holds their list and trusts it
    /// (not ours: whether we hold this entry is another matter).
    pub in_synapse_cache: bool,
    /// They are joined to a room this server is in.
    pub shares_a_room: bool,
    /// Synapse's cached devices of theirs, rendered as its answer shows
    /// them.
    pub devices: Arc<RenderedDevices>,
}

/// A resync's result for one user: the devices, or the failure Synapse
/// would report for the destination.
pub type Outcome = Result<Arc<UserDevices>, Value>;

#[derive(Debug)]
pub struct UserDevices {
    /// The user's result exactly as received, for the resync RPC.
    pub raw: Box<RawValue>,
    /// `device_id` → device keys, in the order received.
    pub devices: Vec<(String, Box<RawValue>)>,
    pub master_key: Option<Box<RawValue>>,
    pub self_signing_key: Option<Box<RawValue>>,
    /// The writer's `_INT_STREAM_POS`, when the writer produced this.
    pub stream_pos: Option<Arc<RawValue>>,
    /// The `{"devices": [...]}` shape of a real resync; false for the bare
    /// `{device_id: content}` map the writer answers for a user it already
    /// had cached, which Synapse's `/keys/query` does not take as a result.
    pub is_resync_result: bool,
}

impl UserDevices {
    /// Bytes held, as the caches weigh their entries: the text received
    /// and the parts kept of it.
    pub fn weight(&self) -> usize {
        let parts = self.devices.iter().map(|(id, keys)| id.len() + keys.get().len()).sum::<usize>();
        let keys = [&self.master_key, &self.self_signing_key].iter().filter_map(|k| k.as_ref()).map(|k| k.get().len()).sum::<usize>();
        self.raw.get().len() + parts + keys + self.stream_pos.as_ref().map_or(0, |p| p.get().len()) + 64
    }
}
