//! Prometheus metrics, per `App` (no global registry, so several instances
//! can live in one process). Request counts and latencies are recorded by
//! the HTTP middleware; everything else is read from the components' own
//! counters at scrape time. All names start with `synapse_keys_worker_`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cache::Caches;
use crate::federation::FederationClient;
use crate::replication;
use crate::resync::Coordinator;
use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template (`/_matrix/client/v3/keys/query`), or `unmatched`.
    pub route: String,
    pub method: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    /// Requests being answered now.
    pub in_flight: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The parts whose state is exported at scrape time.
#[derive(Debug, Clone)]
pub struct Sources {
    pub caches: Arc<Caches>,
    pub coordinator: Arc<Coordinator>,
    pub federation: Arc<FederationClient>,
    pub pass: Arc<crate::resync::pass::WriterPass>,
    pub replication: Arc<replication::Status>,
    pub barrier: Arc<replication::Barrier>,
    pub store: Store,
    pub mas: Option<Arc<crate::mas::MasClient>>,
    pub device_lists: Arc<crate::device_lists::stats::HealthStats>,
    pub audit_enabled: bool,
    pub schema: Arc<crate::schema_window::SchemaStatus>,
}

impl Metrics {
    pub fn new(sources: Sources) -> Self {
        let mut registry = Registry::with_prefix("synapse_keys_worker");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 17)));
        registry.register("http_requests", "HTTP requests served, by route, method and status", requests.clone());
        registry.register("http_request_duration_seconds", "Time to answer HTTP requests", duration.clone());
        let in_flight = Gauge::default();
        registry.register("http_requests_in_flight", "HTTP requests being answered now", in_flight.clone());
        if let Some(mas) = &sources.mas {
            registry.register("mas_introspections", "Token introspections asked of MAS, by outcome", mas.metrics.calls.clone());
            registry.register(
                "mas_introspection_duration_seconds",
                "Time MAS took to answer an introspection",
                mas.metrics.duration.clone(),
            );
        }
        registry.register(
            "replication_passthrough",
            "Workers' replication calls passed through to the device-lists writer, by endpoint and outcome",
            sources.pass.calls.clone(),
        );
        registry.register_collector(Box::new(sources));
        Self { registry, requests, duration, in_flight }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, rows: &[(&[(&str, &str)], u64)]) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(0u64);
    let mut m = e.encode_descriptor(name, help, None, c.metric_type())?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(&labels.to_vec())?)?;
    }
    Ok(())
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, rows: &[(&[(&str, &str)], i64)]) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(0i64);
    let mut m = e.encode_descriptor(name, help, None, g.metric_type())?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(&labels.to_vec())?)?;
    }
    Ok(())
}

impl Collector for Sources {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.caches;
        let caches = c.stats();
        type Pick = fn(&crate::cache::guarded::Stats) -> u64;
        let per_cache = |pick: Pick| -> Vec<([(&str, &str); 1], u64)> { caches.iter().map(|s| ([("cache", s.name)], pick(s))).collect() };
        let metrics: [(&str, &str, Pick); 4] = [
            ("cache_hits", "Cache lookups answered from memory", |s| s.hits),
            ("cache_misses", "Cache lookups that went to the database", |s| s.misses),
            ("cache_evictions", "Entries evicted for size or age", |s| s.evictions),
            ("cache_stale_loads_dropped", "Loads not cached because an invalidation landed meanwhile", |s| s.stale_loads_dropped),
        ];
        for (name, help, pick) in metrics {
            let rows = per_cache(pick);
            let refs: Vec<(&[(&str, &str)], u64)> = rows.iter().map(|(l, n)| (&l[..], *n)).collect();
            counter(&mut e, name, help, &refs)?;
        }
        let gauges: [(&str, &str, Pick); 2] = [
            ("cache_entries", "Entries held per cache", |s| s.entries),
            ("cache_weighted_bytes", "What each cache's weigher counts: bytes held, estimated (entries for tokens and users)", |s| {
                s.weight
            }),
        ];
        for (name, help, pick) in gauges {
            let rows = per_cache(pick);
            let refs: Vec<(&[(&str, &str)], i64)> = rows.iter().map(|(l, n)| (&l[..], i64::try_from(*n).unwrap_or(i64::MAX))).collect();
            gauge(&mut e, name, help, &refs)?;
        }
        gauge(&mut e, "caches_trusted", "1 while the caches are in use (replication stream followed)", &[(&[], i64::from(c.trusted()))])?;

        let r = self.coordinator.outcomes();
        counter(
            &mut e,
            "resyncs",
            "Remote device-list resyncs, by outcome",
            &[
                (&[("outcome", "writer_ok")], r.writer_ok),
                (&[("outcome", "writer_null")], r.writer_null),
                (&[("outcome", "fallback_ok")], r.fallback_ok),
                (&[("outcome", "fallback_failed")], r.fallback_failed),
            ],
        )?;
        counter(
            &mut e,
            "resync_writer_late",
            "Resync batches the writer had not answered by their hedge point (the remote was asked directly alongside)",
            &[(&[], r.writer_late)],
        )?;
        counter(
            &mut e,
            "resync_writer_late_but_alive",
            "Late writer calls whose writer's /health answered: a slow remote server, so the writer was not skipped for others",
            &[(&[], r.writer_late_but_alive)],
        )?;
        if let Some(mas) = &self.mas {
            gauge(&mut e, "mas_breaker_open", "1 while calls to MAS are refused", &[(&[], i64::from(mas.breaker_open()))])?;
            let kept = i64::try_from(mas.cached_answers()).unwrap_or(i64::MAX);
            gauge(&mut e, "mas_introspections_cached", "Introspection answers kept (two minutes each)", &[(&[], kept)])?;
        }
        gauge(
            &mut e,
            "writer_breaker_open",
            "1 while the device-lists writer is being skipped",
            &[(&[], i64::from(self.coordinator.writer_breaker_open()))],
        )?;
        gauge(&mut e, "resync_waiters", "Callers waiting for a resync", &[(&[], self.coordinator.waiting() as i64)])?;
        gauge(
            &mut e,
            "federation_destinations_backing_off",
            "Remote servers we are backing off from",
            &[(&[], self.federation.destinations_backing_off() as i64)],
        )?;
        gauge(
            &mut e,
            "federation_destinations_remembered",
            "Remote servers whose failures are remembered (at most 10,000)",
            &[(&[], i64::try_from(self.federation.destinations_remembered()).unwrap_or(i64::MAX))],
        )?;

        if let Some((state, verdict)) = self.schema.last() {
            gauge(
                &mut e,
                "database_schema_version",
                "The Synapse schema version of the database (schema_version)",
                &[(&[], state.version)],
            )?;
            gauge(
                &mut e,
                "database_schema_in_tested_window",
                "1 while the database's schema is inside the Synapse versions we test (schema_window::RELEASES)",
                &[(&[], i64::from(verdict == crate::schema_window::Verdict::Inside))],
            )?;
        }
        let s = &self.replication;
        gauge(&mut e, "replication_connected", "1 while the replication stream is followed", &[(&[], i64::from(s.connected()))])?;
        gauge(&mut e, "replication_caught_up", "1 once the stream has caught up after (re)connecting", &[(&[], i64::from(s.caught_up()))])?;
        counter(&mut e, "replication_reconnects", "Times the replication stream was lost", &[(&[], s.reconnects())])?;
        counter(
            &mut e,
            "replication_dropped_all",
            "Times every cached entry was dropped because what was missed could not be caught up",
            &[(&[], s.dropped_all())],
        )?;
        counter(&mut e, "replication_caught_up_rows", "Rows read from the stream tables to catch up", &[(&[], s.caught_up_rows())])?;
        let last = s.last_seen_ms();
        let lag_ms = if last > 0 { crate::now_ms() - last } else { -1 };
        gauge(
            &mut e,
            "replication_last_message_age_milliseconds",
            "Time since the last replication message or poll (-1: none yet)",
            &[(&[], lag_ms)],
        )?;

        let b = self.barrier.counters();
        counter(&mut e, "read_barrier_probes", "Database probes run by the read barrier", &[(&[], b.probes.load(Ordering::Relaxed))])?;
        counter(
            &mut e,
            "read_barrier_quick_probes",
            "Probes the device-list id sequence alone answered (nothing committed above the floor)",
            &[(&[], b.quick.load(Ordering::Relaxed))],
        )?;
        gauge(
            &mut e,
            "read_barrier_quick_probe_usable",
            "1 while probes try the device-list id sequence first; 0 for a while after the database refused this role the sequence",
            &[(&[], i64::from(self.barrier.quick_probe_usable()))],
        )?;
        counter(
            &mut e,
            "read_barrier_changes_applied",
            "Device-list changes the barrier applied before the replication stream delivered them",
            &[(&[], b.changes_applied.load(Ordering::Relaxed))],
        )?;
        counter(
            &mut e,
            "read_barrier_resets",
            "Times the barrier dropped every cached entry to catch up",
            &[(&[], b.resets.load(Ordering::Relaxed))],
        )?;

        self.encode_device_lists(&mut e)?;

        let (size, idle, max) = self.store.pool_state();
        gauge(
            &mut e,
            "db_pool_connections",
            "Database connections, by state",
            &[(&[("state", "in_use")], i64::from(size.saturating_sub(idle))), (&[("state", "idle")], i64::from(idle))],
        )?;
        gauge(&mut e, "db_pool_max_connections", "Largest database pool size", &[(&[], i64::from(max))])?;
        Ok(())
    }
}

impl Sources {
    /// Device-list health: the signals, the auditor, repairs.
    fn encode_device_lists(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use crate::device_lists::stats::{CHECK_OUTCOMES, DRIFT_KINDS, REPAIR_OUTCOMES, REPAIR_TRIGGERS};
        let h = &self.device_lists;
        if let Some(sig) = h.signals() {
            let age = sig.oldest_mark_ts.map_or(0, |ts| ((crate::now_ms() - ts) / 1000).max(0));
            gauge(
                e,
                "device_list_stale_marks",
                "Remote users whose device list Synapse has marked stale (its resync queue)",
                &[(&[], sig.stale_marks)],
            )?;
            gauge(e, "device_list_oldest_stale_mark_age_seconds", "Age of Synapse's oldest stale mark (0: none)", &[(&[], age)])?;
            gauge(
                e,
                "device_list_tracked_without_shared_room",
                "Remote users whose device list Synapse still tracks though no room is shared with them",
                &[(&[], sig.tracked_without_room)],
            )?;
            gauge(
                e,
                "device_list_local_unsigned_devices",
                "Local devices with keys but without their owner's current self-signing signature",
                &[(&[], sig.local_unsigned_devices)],
            )?;
        }
        gauge(e, "device_list_audit_enabled", "1 when the device-list auditor runs", &[(&[], i64::from(self.audit_enabled))])?;
        counter(e, "device_list_audit_rounds", "Rounds the device-list auditor ran", &[(&[], h.rounds.load(Ordering::Relaxed))])?;
        let checks: Vec<([(&str, &str); 1], u64)> = CHECK_OUTCOMES.iter().map(|(o, l)| ([("outcome", *l)], h.checks(*o))).collect();
        let refs: Vec<(&[(&str, &str)], u64)> = checks.iter().map(|(l, n)| (&l[..], *n)).collect();
        counter(e, "device_list_audit_checks", "Remote users the auditor checked against their server, by outcome", &refs)?;
        let drift = h.drift();
        let kinds: Vec<([(&str, &str); 1], u64)> = DRIFT_KINDS.iter().zip(drift).map(|(k, n)| ([("kind", *k)], n)).collect();
        let refs: Vec<(&[(&str, &str)], u64)> = kinds.iter().map(|(l, n)| (&l[..], *n)).collect();
        counter(e, "device_list_audit_drift", "Drifted users the auditor found, by kind of drift (a user can count under several)", &refs)?;
        counter(
            e,
            "device_list_audit_skipped_backoff",
            "Servers a round skipped because Synapse or we are backing off from them",
            &[(&[], h.skipped_backoff.load(Ordering::Relaxed))],
        )?;
        let repairs = h.repairs();
        let rows: Vec<([(&str, &str); 2], u64)> = REPAIR_TRIGGERS
            .iter()
            .enumerate()
            .flat_map(|(t, trigger)| REPAIR_OUTCOMES.iter().enumerate().map(move |(o, outcome)| (t, o, *trigger, *outcome)))
            .map(|(t, o, trigger, outcome)| ([("trigger", trigger), ("outcome", outcome)], repairs[t][o]))
            .collect();
        let refs: Vec<(&[(&str, &str)], u64)> = rows.iter().map(|(l, n)| (&l[..], *n)).collect();
        counter(
            e,
            "device_list_repairs",
            "Device-list repairs (stale mark, then the writer's resync), by what started them and outcome",
            &refs,
        )
    }
}
