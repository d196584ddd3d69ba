//! `/metrics` (`--metrics-bind-address`, default kube-proxy's `127.0.0.1:10249`): the
//! Prometheus metrics of the agent, in the OpenMetrics text format.
//!
//! Where a kube-proxy metric means the same thing it has kube-proxy's name, help and
//! (absent) labels, so dashboards and alerts built on kube-proxy keep working; lb's own
//! metrics are `lb_*`. Histograms start at 100 µs: a sync here takes a few hundred
//! microseconds, where kube-proxy's buckets start at 1 ms (syncs) and 250 ms (programming).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::summary::MapFill;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A map, by name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

/// An object kind and why it was not (wholly) programmed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct RejectedLabels {
    /// `Service`, `EndpointSlice`, `Pod`.
    pub kind: String,
    /// `invalid` (a field lb cannot program), `address_conflict` (an address another
    /// Service holds, or one refused), `map_full` (a map has no room).
    pub reason: String,
}

/// A watched resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    /// `Service`, `EndpointSlice`, `Node`.
    pub resource: String,
}

/// Reads each pinned map's entries and capacity (at scrape time).
pub type FillReader = Arc<dyn Fn() -> Vec<MapFill> + Send + Sync>;

/// Every metric the agent exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub sync_last_timestamp: Gauge<f64, AtomicU64>,
    pub network_programming: Histogram,
    pub endpoint_changes_total: Counter,
    pub endpoint_changes_pending: Gauge,
    pub service_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub map_write_failures: Counter,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub conntrack_entries: Gauge,
    pub rejected: Family<RejectedLabels, Gauge>,
    pub watch_restarts: Family<ResourceLabel, Counter>,
    pub relists: Family<ResourceLabel, Counter>,
    /// Where the map fills come from (none: not exported).
    fills: std::sync::RwLock<Option<FillReader>>,
    /// When the fills were last read, in seconds since the epoch, so back-to-back scrapes
    /// do not walk large maps twice.
    fills_read_at: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// How long map fills read at one scrape serve the next ones.
const FILLS_FRESH: Duration = Duration::from_secs(5);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered, at zero.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let kube = registry.sub_registry_with_prefix("kubeproxy");
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        kube.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration.clone(),
        );
        let sync_last_timestamp = Gauge::<f64, AtomicU64>::default();
        kube.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            sync_last_timestamp.clone(),
        );
        let network_programming = Histogram::new(exponential_buckets(0.0001, 2.0, 22));
        kube.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming.clone(),
        );
        let endpoint_changes_pending = Gauge::default();
        kube.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            endpoint_changes_pending.clone(),
        );
        let endpoint_changes_total = Counter::default();
        kube.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            endpoint_changes_total.clone(),
        );
        let service_changes_pending = Gauge::default();
        kube.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            service_changes_pending.clone(),
        );
        let service_changes_total = Counter::default();
        kube.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            service_changes_total.clone(),
        );
        let lb = registry.sub_registry_with_prefix("lb");
        let map_write_failures = Counter::default();
        lb.register(
            "map_write_failures",
            "Syncs whose BPF map writes failed (the next sync rewrites from what the maps hold)",
            map_write_failures.clone(),
        );
        let map_entries = Family::<MapLabel, Gauge>::default();
        lb.register(
            "map_entries",
            "Entries in each pinned BPF map",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabel, Gauge>::default();
        lb.register(
            "map_capacity",
            "Entries each pinned BPF map can hold (max_entries)",
            map_capacity.clone(),
        );
        let conntrack_entries = Gauge::default();
        lb.register(
            "conntrack_entries",
            "Entries in the tc datapath's three conntrack tables (two per flow)",
            conntrack_entries.clone(),
        );
        let rejected = Family::<RejectedLabels, Gauge>::default();
        lb.register(
            "rejected_objects",
            "Objects not (wholly) programmed, by kind and reason",
            rejected.clone(),
        );
        let watch_restarts = Family::<ResourceLabel, Counter>::default();
        lb.register(
            "watch_restarts",
            "API watches that failed and were restarted, by resource",
            watch_restarts.clone(),
        );
        let relists = Family::<ResourceLabel, Counter>::default();
        lb.register(
            "relists",
            "Complete lists of a resource (the first, and each after a watch expired)",
            relists.clone(),
        );
        Self {
            registry,
            sync_duration,
            sync_last_timestamp,
            network_programming,
            endpoint_changes_total,
            endpoint_changes_pending,
            service_changes_total,
            service_changes_pending,
            map_write_failures,
            map_entries,
            map_capacity,
            conntrack_entries,
            rejected,
            watch_restarts,
            relists,
            fills: std::sync::RwLock::new(None),
            fills_read_at: AtomicU64::new(0),
        }
    }

    /// Every metric, and the run count and time of the programs linked under `pin_dir`
    /// (read at scrape time).
    #[must_use]
    pub fn with_program_stats(pin_dir: std::path::PathBuf) -> Self {
        let mut metrics = Self::new();
        metrics
            .registry
            .register_collector(Box::new(crate::prog_stats::ProgramStatsCollector {
                pin_dir: pin_dir.clone(),
            }));
        metrics.registry.register_collector(Box::new(
            crate::datapath_counters::DatapathCountersCollector { pin_dir },
        ));
        metrics
    }

    /// Exports the map fills `read` gives, read at scrape time.
    pub fn set_fill_reader(&self, read: FillReader) {
        if let Ok(mut fills) = self.fills.write() {
            *fills = Some(read);
        }
    }

    /// A successful sync at `at` that took `took`.
    pub fn synced(&self, took: Duration, at: SystemTime) {
        self.sync_duration.observe(took.as_secs_f64());
        let since_epoch = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.sync_last_timestamp.set(since_epoch.as_secs_f64());
    }

    /// The objects now rejected, replacing the previous counts.
    pub fn set_rejected(&self, counts: &std::collections::BTreeMap<RejectedLabels, i64>) {
        self.rejected.clear();
        for (labels, count) in counts {
            self.rejected.get_or_create(labels).set(*count);
        }
    }

    /// A watch of `resource` failed (it restarts with backoff).
    pub fn watch_restarted(&self, resource: &str) {
        self.watch_restarts
            .get_or_create(&ResourceLabel {
                resource: resource.to_owned(),
            })
            .inc();
    }

    /// A list of `resource` began.
    pub fn relisted(&self, resource: &str) {
        self.relists
            .get_or_create(&ResourceLabel {
                resource: resource.to_owned(),
            })
            .inc();
    }

    /// Reads the map fills when the last read is older than [`FILLS_FRESH`].
    fn refresh_fills(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let last = self.fills_read_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) < FILLS_FRESH.as_secs() {
            return;
        }
        let Some(read) = self.fills.read().ok().and_then(|r| r.clone()) else {
            return;
        };
        self.fills_read_at.store(now, Ordering::Relaxed);
        let fills = read();
        for fill in &fills {
            let label = MapLabel {
                map: fill.name.to_owned(),
            };
            let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.map_entries
                .get_or_create(&label)
                .set(as_i64(fill.entries));
            self.map_capacity
                .get_or_create(&label)
                .set(as_i64(fill.capacity));
        }
        let conntrack: u64 = fills
            .iter()
            .filter(|f| {
                [
                    lb_common::CT_TCP_MAP,
                    lb_common::CT_HALF_OPEN_MAP,
                    lb_common::CT_OTHER_MAP,
                ]
                .contains(&f.name)
            })
            .map(|f| f.entries)
            .sum();
        self.conntrack_entries
            .set(i64::try_from(conntrack).unwrap_or(i64::MAX));
    }

    /// The text exposition of every metric (reading the map fills first if stale).
    #[must_use]
    pub fn encode(&self) -> String {
        self.refresh_fills();
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        out
    }
}

/// Serves `/metrics` on `addr` (an unspecified IP: both families) until the tasks are
/// dropped.
///
/// # Errors
/// When `addr` cannot be bound.
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
    let app = router(metrics);
    let listeners = crate::listen::bind_all(addr)?;
    Ok(listeners
        .into_iter()
        .map(|listener| {
            let app = app.clone();
            tokio::spawn(async move {
                if let Ok(addr) = listener.local_addr() {
                    tracing::info!(%addr, "metrics listening");
                }
                if let Err(e) = crate::listen::serve_http(listener, app).await {
                    tracing::warn!(error = %e, "metrics server failed");
                }
            })
        })
        .collect())
}

/// `/metrics`, answered from `metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    // Reading the fills walks the maps: off the async workers.
    let body = tokio::task::spawn_blocking(move || metrics.encode())
        .await
        .unwrap_or_default();
    let mut response = (StatusCode::OK, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}
