//! What the device-list writers have told us on the replication stream
//! about their own progress, for the read barrier's floor.
//!
//! A writer's `POSITION` says it has nothing in flight at or below its new
//! token, and its `RDATA` rows come at or below its current token (Synapse's
//! `commands.py`, `MultiWriterIdGenerator`); every id it hands out later is
//! higher. So once a writer has reported `p`, every row it will ever commit
//! at or below `p` is already committed. A writer that writes nothing still
//! reports: when another writer's rows reach it, it advances and sends a
//! `POSITION` (Synapse's `ReplicationStreamer`). That is how Synapse itself
//! moves past an idle writer, whose `stream_positions` row is written only
//! when it writes.
//!
//! A position is recorded only once what came before it was delivered (a
//! writer's `POSITION` handled on this connection and its catch-up read
//! applied), so a change at or below a writer's recorded position has also
//! been applied from the stream.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Reported {
    by_writer: Mutex<HashMap<String, i64>>,
}

impl Reported {
    /// `writer` has delivered everything up to `pos`.
    pub fn report(&self, writer: &str, pos: i64) {
        let mut by = self.by_writer.lock().expect("reported positions");
        match by.get_mut(writer) {
            Some(p) => *p = (*p).max(pos),
            None => {
                by.insert(writer.to_owned(), pos);
            }
        }
    }

    pub fn snapshot(&self) -> HashMap<String, i64> {
        self.by_writer.lock().expect("reported positions").clone()
    }
}
