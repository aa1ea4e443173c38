//! The pass-through to the device-lists writer: every replication call a
//! worker sends us other than `multi_user_device_resync` goes on, unchanged,
//! to the writer our own config names (the address the resync client uses).
//! HTTP concerns (the secret, which headers pass) are the handler's
//! (`http/replication_pass.rs`); this is the client, its bounds and its
//! counters.
//!
//! It has one target, the first device-list writer. Synapse sends a worker's
//! resyncs (and `handle_new_device_update`) to that writer only, but other
//! device calls to any writer at random, and each writer's stream catch-up
//! to that writer. So only the first writer's `instance_map` entry may name
//! us: a call meant for another writer, passed to the first, would get the
//! wrong writer's rows (docs/deployment.md, way A).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::config::Config;

// How long a passed-through call may take, body included:
// `replication_pass_timeout_ms`, 90 s by default. Synapse's replication
// client gives each attempt 60 s to answer and then, for most endpoints,
// retries the same transaction ID (the writer answers a repeat from its
// response cache). Bounding at 60 s or less would turn that retry into our
// 504, which Synapse does not retry but hands to its client; above it,
// Synapse's own timeout fires first and its retry logic applies as if we
// were not there. We still end what it abandoned, 30 s later.

/// A writer that does not accept the connection within this is unreachable.
pub const PASS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The replication endpoints of the pinned Synapse (`NAME` of each
/// `ReplicationEndpoint` under `synapse/replication/http/`): the `endpoint`
/// label, so that label stays bounded whatever a caller sends.
const SYNAPSE_ENDPOINTS: [&str; 37] = [
    "add_room_account_data",
    "add_tag",
    "add_user_account_data",
    "added_delayed_event",
    "bump_presence_active_time",
    "cancel_delayed_events_for_user",
    "copy_push_rules",
    "delete_all_pushers_for_user",
    "device_check_registered",
    "device_handle_room_un_partial_stated",
    "fed_cleanup_room",
    "fed_query",
    "fed_send_edu",
    "fed_send_events",
    "get_repl_stream_updates",
    "handle_new_device_update",
    "membership_change",
    "multi_user_device_resync",
    "notify_account_deactivated",
    "notify_device_update",
    "notify_user_signature_update",
    "post_register",
    "presence_set_state",
    "profile_delete_field",
    "profile_set_field",
    "register_user",
    "remote_join",
    "remote_knock",
    "remote_reject_invite",
    "remote_rescind_knock",
    "remove_pusher",
    "remove_room_account_data",
    "remove_tag",
    "remove_user_account_data",
    "send_events",
    "store_room_on_outlier_membership",
    "update_current_state",
];

/// How a passed-through call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PassOutcome {
    /// The writer answered (any status; it is passed on as it is).
    Answered,
    /// Wrong or missing replication secret: not forwarded.
    Refused,
    /// No TCP writer in our config: nothing to forward to.
    NoWriter,
    /// Refused, reset or closed before it answered.
    Unreachable,
    /// No answer within `replication_pass_timeout_ms` (or no connection
    /// within [`PASS_CONNECT_TIMEOUT`]).
    Timeout,
}

impl PassOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Refused => "refused",
            Self::NoWriter => "no_writer",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabels {
    /// Synapse's endpoint name (the path segment after
    /// `/_synapse/replication/`), or `other`.
    pub endpoint: String,
    pub outcome: String,
}

#[derive(Debug)]
pub struct WriterPass {
    http: reqwest::Client,
    /// `http(s)://host:port` of the writer; `None` when none over TCP.
    base: Option<String>,
    /// Calls by endpoint and outcome (`replication_passthrough_total`).
    pub calls: Family<PassLabels, Counter>,
}

impl WriterPass {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(crate::federation::USER_AGENT)
            .connect_timeout(PASS_CONNECT_TIMEOUT)
            .timeout(Duration::from_millis(config.worker.replication_pass_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { http, base: super::writer::base_url(config), calls: Family::default() })
    }

    /// Counts one call to `path` (`/_synapse/replication/<endpoint>/...`).
    pub fn count(&self, path: &str, outcome: PassOutcome) {
        let name = path.strip_prefix("/_synapse/replication/").and_then(|rest| rest.split('/').next()).unwrap_or_default();
        let endpoint = SYNAPSE_ENDPOINTS.iter().find(|e| **e == name).copied().unwrap_or("other");
        self.calls.get_or_create(&PassLabels { endpoint: endpoint.to_owned(), outcome: outcome.label().to_owned() }).inc();
    }

    /// How many calls to `endpoint` ended with `outcome` so far.
    pub fn counted(&self, endpoint: &str, outcome: PassOutcome) -> u64 {
        let labels = PassLabels { endpoint: endpoint.to_owned(), outcome: outcome.label().to_owned() };
        self.calls.get(&labels).map_or(0, |c| c.get())
    }

    /// Sends `method path_and_query` with `headers` and `body` to the
    /// writer; the answer's body is read as the caller reads it, still
    /// within `replication_pass_timeout_ms`.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        headers: reqwest::header::HeaderMap,
        body: reqwest::Body,
    ) -> Result<reqwest::Response, PassOutcome> {
        let base = self.base.as_deref().ok_or(PassOutcome::NoWriter)?;
        let sent = self.http.request(method, format!("{base}{path_and_query}")).headers(headers).body(body).send().await;
        sent.map_err(|e| {
            tracing::warn!(error = %e, "replication pass-through: the device-lists writer did not answer");
            if e.is_timeout() { PassOutcome::Timeout } else { PassOutcome::Unreachable }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_label_is_bounded() {
        let pass = WriterPass { http: reqwest::Client::new(), base: None, calls: Family::default() };
        pass.count("/_synapse/replication/notify_device_update/%40a%3Ab", PassOutcome::Answered);
        pass.count("/_synapse/replication/get_repl_stream_updates/caches", PassOutcome::Answered);
        pass.count("/_synapse/replication/made_up_name/x", PassOutcome::Refused);
        pass.count("/_synapse/replication/", PassOutcome::Refused);
        assert_eq!(pass.counted("notify_device_update", PassOutcome::Answered), 1);
        assert_eq!(pass.counted("get_repl_stream_updates", PassOutcome::Answered), 1);
        assert_eq!(pass.counted("other", PassOutcome::Refused), 2);
        assert_eq!(pass.counted("made_up_name", PassOutcome::Refused), 0);
    }
}
