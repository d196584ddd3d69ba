//! The reconcile core: the one place the cluster state changes. Both sources hand their
//! [`Change`]s to the [`Reconciler`], which applies them to the [`ClusterState`] (objects
//! are validated there and only their compact forms kept), and a [`Reconciler::sync`]
//! translates what they touched and writes it through the [`MapWriter`]. A sync costs what
//! changed, not the number of Services.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tracing::{debug, error, info, warn};

use crate::{
    api::SharedStatus,
    dns::index::{DnsIndex, SharedDnsIndex},
    health::HealthServers,
    maps::{LbMaps, writer::MapWriter},
    metrics::{Metrics, RejectedLabels},
    model::{HealthCheck, L4Addr, ObjectRef},
    node::ThisNode,
    ownership::ExternalIpCidrs,
    proxy_health::{Now, ProxyHealth},
    source::change::{Change, Kind, Object},
    state::ClusterState,
    translate::Sourced,
};

/// How much a sync writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// Everything that differs from the maps (first sync, after adopting).
    Full,
    /// The frontends the model reports changed (and any whose write failed before).
    Changes,
}

/// A map write failed; the next sync is a full one from what the maps really hold.
#[derive(Debug, thiserror::Error)]
#[error("writing the maps")]
pub struct SyncError(#[source] pub crate::maps::MapError);

/// The model, this node, the writer, and what was last reported.
pub struct Reconciler<M> {
    state: ClusterState,
    /// This node's Node object as last seen (its zone goes to the state).
    node: ThisNode,
    /// The kinds being relisted, with the objects applied since the relist began.
    relists: HashMap<Kind, HashSet<ObjectRef>>,
    writer: MapWriter<M>,
    status: SharedStatus,
    /// Problems found by the source itself (unparsable files), as text.
    source_problems: Vec<String>,
    /// Frontends the maps could not take (full, or no free id), as text.
    map_problems: Vec<String>,
    reported: BTreeSet<String>,
    /// (model problems version, source problems, map problems) when last reported.
    reported_version: Option<(u64, Vec<String>, Vec<String>)>,
    /// Frontends whose write failed, to retry on the next sync.
    pending: BTreeSet<L4Addr>,
    full_pending: bool,
    /// After a failed write: when to try again without waiting for a change, and the
    /// delay that led there (doubled on each failure in a row).
    retry: Option<(Instant, Duration)>,
    /// The health checks last handed to the servers.
    health_checks: Option<BTreeMap<u16, HealthCheck>>,
    /// The pin directory, when UDP sockets and flows pinned to removed backends are to be
    /// ended after each write ([`crate::stale`]).
    stale_cleanup: Option<PathBuf>,
    /// The agent's health: changes queued and synced, this node's eligibility.
    health: Arc<ProxyHealth>,
    /// Cluster DNS's view, changed in each sync right after the maps.
    dns: SharedDnsIndex,
    /// Objects the agent publishes itself (the `kube-dns` Service): a source's object of
    /// the same kind and name is ignored, and a relist keeps them.
    own: Vec<(Kind, ObjectRef)>,
    metrics: Arc<Metrics>,
    /// What changed since the last successful sync, for the metrics.
    unsynced: Unsynced,
    /// When the reconciler started: EndpointSlice changes triggered before are not counted
    /// in the network programming latency (they were programmed by whoever ran before).
    started: SystemTime,
}

/// The changes applied and not yet written. kube-proxy's trackers count distinct
/// Services; these count changes, which needs no set of names while 100,000 Services are
/// listed (the same number when each object changed once).
#[derive(Debug, Default)]
struct Unsynced {
    services: i64,
    /// EndpointSlices (and Pods, from manifests).
    endpoints: i64,
    /// The `last-change-trigger-time` of each EndpointSlice change.
    triggers: Vec<SystemTime>,
}

impl<M: LbMaps> Reconciler<M> {
    /// A reconciler of an empty model for the node `node_name`, writing through `writer`.
    pub fn new(
        writer: MapWriter<M>,
        status: SharedStatus,
        node_name: Option<String>,
        health: Arc<ProxyHealth>,
    ) -> Self {
        Self {
            state: ClusterState::new(node_name.clone()),
            node: ThisNode::new(node_name),
            relists: HashMap::new(),
            writer,
            status,
            source_problems: Vec::new(),
            map_problems: Vec::new(),
            reported: BTreeSet::new(),
            reported_version: None,
            pending: BTreeSet::new(),
            full_pending: false,
            retry: None,
            health_checks: None,
            stale_cleanup: None,
            health,
            metrics: Arc::default(),
            unsynced: Unsynced::default(),
            started: SystemTime::now(),
            dns: Arc::new(std::sync::RwLock::new(DnsIndex::names_only())),
            own: Vec::new(),
        }
    }

    /// Records into `metrics` (exported by the agent's `/metrics`).
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = metrics;
    }

    /// The metrics it records.
    pub const fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Publishes an object of the agent's own (written at the next sync), kept whatever
    /// the source says.
    pub fn publish_own(&mut self, origin: &str, object: Object) {
        self.own.push((object.kind(), object.id()));
        self.apply_object(Arc::from(origin), object);
    }

    fn is_own(&self, kind: Kind, id: &ObjectRef) -> bool {
        self.own.iter().any(|(k, o)| *k == kind && o == id)
    }

    /// Publishes DNS records to `index` (the DNS server and the API read it).
    pub fn set_dns_index(&mut self, index: SharedDnsIndex) {
        self.dns = index;
    }

    /// Cluster DNS's view of the state.
    pub const fn dns_index(&self) -> &SharedDnsIndex {
        &self.dns
    }

    /// Hands the records of the Services translated in this sync to DNS: after the maps,
    /// so a name never resolves to a ClusterIP that is not programmed yet.
    fn publish_dns(&mut self) {
        let changes = self.state.take_dns_changes();
        if changes.is_empty() {
            return;
        }
        self.dns
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .apply(changes);
    }

    /// Ends UDP traffic pinned to removed backends after each write (pins in `pin_dir`).
    pub fn set_stale_cleanup(&mut self, pin_dir: PathBuf) {
        self.stale_cleanup = Some(pin_dir);
    }

    /// The model, for reading.
    pub const fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The writer, for reading.
    pub const fn writer(&self) -> &MapWriter<M> {
        &self.writer
    }

    /// The writer, to change its limits or swap its maps (tests).
    pub const fn writer_mut(&mut self) -> &mut MapWriter<M> {
        &mut self.writer
    }

    /// This node as its Node object last showed it.
    pub const fn node(&self) -> &ThisNode {
        &self.node
    }

    /// The agent's health, as the `/healthz` servers read it.
    pub const fn health(&self) -> &Arc<ProxyHealth> {
        &self.health
    }

    /// The frontends the maps could not take, as problems (as of the last sync).
    pub fn map_problems(&self) -> &[String] {
        &self.map_problems
    }

    /// Notes that changes are waiting (for `/healthz`), as of `at`.
    pub fn queued(&self, at: Instant) {
        self.health.queued(at);
    }

    /// Applies one change of a source to the model (written at the next sync).
    pub fn apply(&mut self, change: Change) {
        self.count(&change);
        match change {
            Change::Apply { origin, object } => {
                if let Some(seen) = self.relists.get_mut(&object.kind()) {
                    seen.insert(object.id());
                }
                if self.is_own(object.kind(), &object.id()) {
                    warn!(
                        "{} {} from {origin} ignored: the agent publishes its own",
                        object.kind(),
                        object.id()
                    );
                    return;
                }
                self.apply_object(origin, object);
            }
            Change::Delete { kind, id } if self.is_own(kind, &id) => {}
            Change::Delete { kind, id } => self.delete(kind, &id),
            Change::Relisting(kind) => {
                self.relists.insert(kind, HashSet::new());
            }
            Change::Relisted(kind) => {
                let seen = self.relists.remove(&kind).unwrap_or_default();
                if kind == Kind::Node {
                    let name = self.node.name().unwrap_or_default();
                    if !seen.iter().any(|id| id.name() == name) {
                        // Not in the list: gone (its last state unknown).
                        let id = ObjectRef::new("", name);
                        self.delete(Kind::Node, &id);
                    }
                    return;
                }
                for id in self.state.ids(kind) {
                    if !seen.contains(&id) && !self.is_own(kind, &id) {
                        self.delete(kind, &id);
                    }
                }
            }
        }
    }

    /// Counts a change for the metrics: Service and endpoint changes (total and pending),
    /// relists, and the moment an EndpointSlice change was triggered.
    fn count(&mut self, change: &Change) {
        let kind = match change {
            Change::Apply { object, .. } => {
                if let Object::EndpointSlice(slice) = object
                    && let Some(at) = trigger_time(slice)
                    && at >= self.started
                {
                    self.unsynced.triggers.push(at);
                }
                object.kind()
            }
            Change::Delete { kind, .. } => *kind,
            Change::Relisting(kind) => {
                self.metrics.relisted(kind.name());
                return;
            }
            Change::Relisted(_) => return,
        };
        match kind {
            Kind::Service => {
                self.metrics.service_changes_total.inc();
                self.unsynced.services += 1;
                let pending = self.unsynced.services;
                self.metrics.service_changes_pending.set(pending);
            }
            Kind::EndpointSlice | Kind::Pod => {
                self.metrics.endpoint_changes_total.inc();
                self.unsynced.endpoints += 1;
                let pending = self.unsynced.endpoints;
                self.metrics.endpoint_changes_pending.set(pending);
            }
            Kind::Node => {}
        }
    }

    /// Everything applied is in the maps: the pending counts go to zero, and each
    /// EndpointSlice change's programming latency is observed.
    fn synced(&mut self, started: Instant) {
        let now = SystemTime::now();
        self.metrics.synced(started.elapsed(), now);
        for at in self.unsynced.triggers.drain(..) {
            let latency = now.duration_since(at).unwrap_or_default();
            self.metrics
                .network_programming
                .observe(latency.as_secs_f64());
        }
        self.unsynced.services = 0;
        self.unsynced.endpoints = 0;
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
    }

    fn apply_object(&mut self, origin: Arc<str>, object: Object) {
        match object {
            Object::Service(o) => self.state.apply_service(Sourced { origin, object: *o }),
            Object::EndpointSlice(o) => {
                self.state.apply_slice(Sourced { origin, object: *o });
            }
            Object::Pod(o) => self.state.apply_pod(Sourced { origin, object: *o }),
            Object::Node(o) => {
                self.node.apply(&o);
                self.node_changed();
            }
        }
    }

    fn delete(&mut self, kind: Kind, id: &ObjectRef) {
        match kind {
            Kind::Service => self.state.delete_service(id),
            Kind::EndpointSlice => self.state.delete_slice(id),
            Kind::Pod => self.state.delete_pod(id),
            Kind::Node => {
                self.node.delete(id.name(), None);
                self.node_changed();
            }
        }
    }

    fn node_changed(&mut self) {
        self.state.set_node_zone(self.node.zone());
        self.health.set_node_eligible(self.node.eligible());
    }

    /// Sets the problems the source itself found (unparsable files), as text.
    pub fn set_source_problems(&mut self, problems: Vec<String>) {
        self.source_problems = problems;
    }

    /// Sets `--external-ip-cidrs`.
    pub fn set_external_ip_cidrs(&mut self, cidrs: ExternalIpCidrs) {
        self.state.set_external_ip_cidrs(cidrs);
    }

    /// Sets this node's NodePort addresses (what the node-address maps hold).
    pub fn set_node_addresses(&mut self, addresses: BTreeSet<IpAddr>) {
        self.state.set_node_addresses(addresses);
    }

    /// Hands the Services' health checks to the servers when they changed.
    pub async fn update_health(&mut self, servers: &mut HealthServers) {
        let checks = self.state.health_checks();
        if self.health_checks.as_ref() != Some(&checks) {
            servers.update(&checks).await;
            self.health_checks = Some(checks);
        }
    }

    /// When a failed write is to be tried again even if nothing changes (`None`: nothing
    /// failed). The source loops wait for it beside their changes and call
    /// [`Self::sync_or_log`] then.
    #[must_use]
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry.map(|(at, _)| at)
    }

    /// Waits for [`Self::retry_at`], or for ever when nothing is to be retried.
    pub async fn retry_due(&self) {
        match self.retry_at() {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    }

    /// Sets the next retry after a failed write: 100 ms, doubled on each failure in a row,
    /// at most 10 s.
    fn schedule_retry(&mut self) {
        const FIRST: Duration = Duration::from_millis(100);
        const MOST: Duration = Duration::from_secs(10);
        let delay = self.retry.map_or(FIRST, |(_, last)| (last * 2).min(MOST));
        self.retry = Some((Instant::now() + delay, delay));
    }

    /// [`Self::sync`], logging a failure (retried at [`Self::retry_at`], or sooner by the
    /// next change).
    pub fn sync_or_log(&mut self, kind: SyncKind, started: Instant) {
        if let Err(e) = self.sync(kind, started) {
            error!(
                error = format!("{:#}", anyhow::Error::new(e)),
                "writing the maps failed; retrying after a backoff"
            );
        }
    }

    /// Translates what changed and writes it. Frontends the maps cannot take are reported
    /// on their Services, not as an error.
    ///
    /// # Errors
    /// When a map write fails otherwise; the next sync is then a full one.
    pub fn sync(&mut self, kind: SyncKind, started: Instant) -> Result<(), SyncError> {
        let sync_started = Instant::now();
        let changed = self.state.recompute();
        self.pending.extend(changed.iter().copied());
        self.publish(&changed);
        if kind == SyncKind::Full {
            self.full_pending = true;
        }
        self.report();
        // Frontends the maps could not take are tried again on every sync (a rescan, any
        // event): room may have appeared.
        if self.pending.is_empty() && !self.full_pending && self.writer.refused().is_empty() {
            self.publish_dns();
            self.health.updated(Now::current());
            self.synced(sync_started);
            return Ok(());
        }
        let translated = Instant::now();
        let desired = self.state.desired();
        let frontends = desired.len();
        let result = if self.full_pending {
            self.writer.apply(desired)
        } else {
            let pending: Vec<_> = self.pending.iter().copied().collect();
            self.writer.apply_changes(desired, &pending)
        };
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                // The record may now be ahead of the maps: read them back, and make the
                // next sync a full one from what is really there.
                self.full_pending = true;
                self.schedule_retry();
                self.metrics.map_write_failures.inc();
                crate::api::readiness(&self.status).write_failed(Instant::now());
                if let Err(read) = self.writer.readopt() {
                    error!(error = %read, "reading the maps back failed");
                }
                self.publish_dns();
                return Err(SyncError(e));
            }
        };
        let written: Vec<L4Addr> = self.pending.iter().copied().collect();
        self.mark_written(&written);
        self.pending.clear();
        self.full_pending = false;
        self.retry = None;
        self.publish_dns();
        self.health.updated(Now::current());
        self.synced(sync_started);
        crate::api::readiness(&self.status).write_succeeded();
        self.end_stale_udp();
        let elapsed_us = started.elapsed().as_micros();
        // Of which: translating what changed (and the reports), then the map writes.
        let translate_us = translated.duration_since(sync_started).as_micros();
        let write_us = translated.elapsed().as_micros();
        if stats.is_noop() {
            debug!(elapsed_us, "nothing to write");
        } else {
            info!(
                frontends,
                added = stats.frontends_added,
                updated = stats.frontends_updated,
                removed = stats.frontends_removed,
                map_writes = stats.map_writes,
                map_deletes = stats.map_deletes,
                elapsed_us,
                translate_us,
                write_us,
                "maps updated"
            );
        }
        self.map_problems = self.refused_problems();
        self.report();
        Ok(())
    }

    /// Stamps the Services whose frontends were just written (for `explain`).
    fn mark_written(&mut self, changed: &[L4Addr]) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        let services: BTreeSet<ObjectRef> = changed
            .iter()
            .filter_map(|a| self.state.desired().get(a))
            .map(|f| f.service.clone())
            .collect();
        for service in &services {
            self.state.mark_written(service, now);
        }
    }

    /// Ends the UDP traffic pinned to the backends the last write removed.
    fn end_stale_udp(&mut self) {
        let stale = self.writer.take_stale_udp();
        if let Some(pin_dir) = &self.stale_cleanup
            && !stale.is_empty()
        {
            match crate::stale::clean(pin_dir, &stale) {
                Ok(done) => info!(
                    backends = stale.len(),
                    sockets_destroyed = done.sockets_destroyed,
                    flows_deleted = done.flows_deleted,
                    "UDP traffic pinned to removed backends ended"
                ),
                Err(e) => warn!(error = %e, "ending UDP traffic to removed backends failed"),
            }
        }
    }

    /// Updates what the API shows, for the changed frontends only.
    fn publish(&self, changed: &[L4Addr]) {
        let Ok(mut status) = self.status.write() else {
            return;
        };
        for address in changed {
            match self.state.desired().get(address) {
                Some(frontend) => status.desired.insert(*address, Arc::clone(frontend)),
                None => status.desired.remove(address),
            };
        }
    }

    /// The frontends the writer could not program, as problems on their Services' ports
    /// (the writer tries them again with every apply).
    fn refused_problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .writer
            .refused()
            .values()
            .map(|refused| {
                let message = format!("not programmed: {}", refused.reason);
                self.state
                    .port_problem(&refused.service, &refused.port_name, message)
                    .to_string()
            })
            .collect();
        problems.sort();
        problems.dedup();
        problems
    }

    /// Sets the metric of rejected objects from the current problems.
    fn count_rejected(&self) {
        let mut objects: BTreeSet<(&'static str, &'static str, ObjectRef)> = self
            .state
            .rejected()
            .into_iter()
            .map(|(kind, reason, id)| (kind.name(), reason, id))
            .collect();
        objects.extend(
            self.writer
                .refused()
                .values()
                .map(|r| (Kind::Service.name(), "map_full", r.service.clone())),
        );
        let mut counts: BTreeMap<RejectedLabels, i64> = BTreeMap::new();
        for (kind, reason, _) in objects {
            let labels = RejectedLabels {
                kind: kind.to_owned(),
                reason: reason.to_owned(),
            };
            *counts.entry(labels).or_default() += 1;
        }
        self.metrics.set_rejected(&counts);
    }

    /// Logs each problem once, when it appears, and says when it is gone.
    fn report(&mut self) {
        let version = (
            self.state.problems_version(),
            self.source_problems.clone(),
            self.map_problems.clone(),
        );
        if self.reported_version.as_ref() == Some(&version) {
            return;
        }
        self.reported_version = Some(version);
        self.count_rejected();
        let mut now: BTreeSet<String> = self
            .state
            .problems()
            .iter()
            .map(ToString::to_string)
            .collect();
        now.extend(self.source_problems.iter().cloned());
        now.extend(self.map_problems.iter().cloned());
        for problem in now.difference(&self.reported) {
            if self.map_problems.contains(problem) {
                error!("{problem}");
            } else {
                error!("invalid object, not programmed: {problem}");
            }
        }
        for problem in self.reported.difference(&now) {
            info!("resolved: {problem}");
        }
        self.reported = now;
    }
}

/// When the EndpointSlice controller saw the change that produced this slice (its
/// `endpoints.kubernetes.io/last-change-trigger-time`), as kube-proxy reads it.
fn trigger_time(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Option<SystemTime> {
    let text = slice
        .metadata
        .annotations
        .as_ref()?
        .get(crate::translate::LAST_CHANGE_TRIGGER_TIME_ANNOTATION)?;
    let at: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(at))
}

impl Reconciler<crate::maps::fake::FakeMaps> {
    /// A reconciler writing to empty in-memory maps (tests).
    #[must_use]
    pub fn on_fake_maps(node_name: Option<String>) -> Self {
        let writer = MapWriter::adopt(crate::maps::fake::FakeMaps::default())
            .unwrap_or_else(|e| unreachable!("empty maps are read: {e}"));
        Self::new(writer, SharedStatus::default(), node_name, Arc::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::fake::FakeMaps;

    fn service(i: usize) -> Change {
        let object = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
            "spec": {
                "clusterIP": format!("10.96.0.{}", i + 1),
                "selector": {"app": "x"},
                "ports": [{"name": "http", "port": 80}],
            },
        }))
        .unwrap();
        Change::Apply {
            origin: Arc::from("services.yaml"),
            object: Object::Service(Box::new(object)),
        }
    }

    fn reconciler(maps: FakeMaps) -> Reconciler<FakeMaps> {
        Reconciler::new(
            MapWriter::adopt(maps).unwrap(),
            SharedStatus::default(),
            None,
            Arc::new(ProxyHealth::default()),
        )
    }

    /// The first sync with more Services than the services map holds programs those that
    /// fit, reports the others on their port, and does not fail.
    #[test]
    fn first_sync_programs_what_fits_and_reports_the_rest() {
        let mut maps = FakeMaps::default();
        // Each Service here (no endpoints) is one master entry.
        maps.set_capacity(lb_common::SERVICES4_MAP, 5);
        let mut reconciler = reconciler(maps);
        for i in 0..8 {
            reconciler.apply(service(i));
        }
        reconciler.sync(SyncKind::Full, Instant::now()).unwrap();
        let masters = reconciler.writer.maps().services.len();
        assert_eq!(masters, 5, "every Service that fits is programmed");
        assert_eq!(reconciler.writer.refused().len(), 3);
        assert_eq!(reconciler.map_problems.len(), 3);
        for problem in &reconciler.map_problems {
            assert!(
                problem.starts_with("services.yaml: Service default/svc-")
                    && problem.contains(
                        ": spec.ports[0]: not programmed: LB4_SERVICES is full (5 entries"
                    ),
                "{problem}"
            );
        }
        // Room appears: a deleted Service makes room for one refused Service at the next sync.
        reconciler.apply(Change::Delete {
            kind: Kind::Service,
            id: ObjectRef::new("default", "svc-0"),
        });
        reconciler.sync(SyncKind::Changes, Instant::now()).unwrap();
        assert_eq!(reconciler.writer.maps().services.len(), 5);
        assert_eq!(reconciler.writer.refused().len(), 2);
        assert_eq!(reconciler.map_problems.len(), 2);
    }

    /// The datapath claims a backend for the first frontend whose TCP sockets reach it
    /// (see `lb_common::PeerKey`): the claim goes when the backend leaves that frontend or
    /// the frontend goes, and a claim another frontend holds stays.
    #[test]
    fn a_backend_that_leaves_its_frontend_loses_the_frontends_claim() {
        let mut reconciler = reconciler(FakeMaps::default());
        reconciler.apply(service(0));
        reconciler.apply(slice_of(0, &["10.244.0.1", "10.244.0.2", "10.244.0.3"]));
        reconciler.sync(SyncKind::Full, Instant::now()).unwrap();
        let id = reconciler
            .writer
            .maps()
            .services
            .values()
            .map(|v| v.rev_nat_id)
            .max()
            .unwrap();
        let backend = |last: u8| L4Addr {
            address: std::net::Ipv4Addr::new(10, 244, 0, last).into(),
            port: 8080,
            protocol: crate::model::Protocol::Tcp,
            scope: crate::model::Scope::External,
        };
        let peers = &mut reconciler.writer.maps_mut().peers;
        peers.insert(backend(1), id);
        peers.insert(backend(2), id + 1);
        peers.insert(backend(3), id);
        reconciler.apply(slice_of(0, &["10.244.0.3"]));
        reconciler.sync(SyncKind::Changes, Instant::now()).unwrap();
        let claims = |r: &Reconciler<FakeMaps>| r.writer.maps().peers.clone();
        assert_eq!(
            claims(&reconciler),
            [(backend(2), id + 1), (backend(3), id)].into(),
            "the claim of the backend that left goes; another frontend's stays"
        );
        reconciler.apply(Change::Delete {
            kind: Kind::Service,
            id: ObjectRef::new("default", "svc-0"),
        });
        reconciler.sync(SyncKind::Changes, Instant::now()).unwrap();
        assert_eq!(claims(&reconciler), [(backend(2), id + 1)].into());
    }

    /// A relist replaces the objects of its kind: what it did not list is gone, what it
    /// listed unchanged causes no write.
    #[test]
    fn a_relist_removes_what_it_did_not_list() {
        let mut reconciler = reconciler(FakeMaps::default());
        for i in 0..3 {
            reconciler.apply(service(i));
        }
        reconciler.sync(SyncKind::Full, Instant::now()).unwrap();
        assert_eq!(reconciler.writer.maps().services.len(), 3);
        let operations = reconciler.writer.maps().operations;
        reconciler.apply(Change::Relisting(Kind::Service));
        reconciler.apply(service(0));
        reconciler.apply(service(2));
        reconciler.apply(Change::Relisted(Kind::Service));
        reconciler.sync(SyncKind::Changes, Instant::now()).unwrap();
        let programmed: Vec<String> = reconciler
            .state()
            .desired()
            .values()
            .map(|f| f.service.to_string())
            .collect();
        assert_eq!(programmed, ["default/svc-0", "default/svc-2"]);
        assert_eq!(reconciler.writer.maps().services.len(), 2);
        assert_eq!(
            reconciler.writer.maps().operations - operations,
            1,
            "one delete: the Services listed again are unchanged"
        );
    }

    /// This node's Node gives the zone; a relist without it takes the zone away.
    #[test]
    fn this_nodes_node_follows_relists() {
        let mut reconciler = Reconciler::new(
            MapWriter::adopt(FakeMaps::default()).unwrap(),
            SharedStatus::default(),
            Some("node-a".into()),
            Arc::new(ProxyHealth::default()),
        );
        let node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
        }))
        .unwrap();
        reconciler.apply(Change::Relisting(Kind::Node));
        reconciler.apply(Change::Apply {
            origin: Arc::from("api"),
            object: Object::Node(Box::new(node)),
        });
        reconciler.apply(Change::Relisted(Kind::Node));
        assert_eq!(reconciler.state().node_zone(), Some("z1"));
        reconciler.apply(Change::Relisting(Kind::Node));
        reconciler.apply(Change::Relisted(Kind::Node));
        assert_eq!(reconciler.state().node_zone(), None);
    }

    /// An EndpointSlice of `svc-{i}` with `n` ready endpoints.
    /// The EndpointSlice of `svc-i` with `n` ready endpoints (10.244.i.2, …) on port 8080.
    fn slice(i: usize, n: usize) -> Change {
        let addresses: Vec<String> = (0..n).map(|e| format!("10.244.{i}.{}", e + 2)).collect();
        slice_of(i, &addresses)
    }

    /// The EndpointSlice of `svc-i` with a ready endpoint at each of `addresses`, on port
    /// 8080.
    fn slice_of(i: usize, addresses: &[impl AsRef<str>]) -> Change {
        let endpoints: Vec<_> = addresses
            .iter()
            .map(|a| serde_json::json!({"addresses": [a.as_ref()], "conditions": {"ready": true}}))
            .collect();
        let object = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("svc-{i}-abc"),
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap();
        Change::Apply {
            origin: Arc::from("slices.yaml"),
            object: Object::EndpointSlice(Box::new(object)),
        }
    }

    /// What a fresh agent writes for what `reconciler` holds, as [`meaning`] shows it.
    fn from_scratch(reconciler: &Reconciler<FakeMaps>) -> Vec<String> {
        let mut fresh = MapWriter::adopt(FakeMaps::default()).unwrap();
        fresh.apply(reconciler.state.desired()).unwrap();
        meaning(fresh.maps())
    }

    fn lines(reconciler: &Reconciler<FakeMaps>) -> Vec<String> {
        meaning(reconciler.writer.maps())
    }

    /// The maps with ids left out: each frontend with its flags and backend addresses,
    /// then each backend entry's address (ids depend on the order of writes, the rest not).
    fn meaning(maps: &FakeMaps) -> Vec<String> {
        let contents = crate::maps::dump::read(maps).unwrap();
        let mut lines: Vec<String> = contents
            .frontends
            .iter()
            .map(|f| {
                let mut backends: Vec<String> =
                    f.slots.iter().map(|s| format!("{:?}", s.backend)).collect();
                backends.sort();
                format!(
                    "{} count={} flags={:#x} {backends:?}",
                    f.address, f.count, f.flags
                )
            })
            .collect();
        let mut backends: Vec<String> = contents
            .backends
            .values()
            .map(|b| format!("BE {b:?}"))
            .collect();
        backends.sort();
        lines.extend(backends);
        lines
    }

    /// A map write that fails part-way (the failpoint before each phase of an apply,
    /// failing the first, a middle and the last phase in turn) is reported, leaves the
    /// maps consistent (the fake checks every operation), and is retried on its own,
    /// after a backoff, until the maps equal what a fresh agent writes.
    #[test]
    fn a_failed_map_write_is_reported_and_retried_until_the_maps_are_right() {
        let scenario = fail::FailScenario::setup();
        for skip in 0..4 {
            let mut reconciler = reconciler(FakeMaps::default());
            for i in 0..3 {
                reconciler.apply(service(i));
                reconciler.apply(slice(i, 2));
            }
            reconciler.sync(SyncKind::Full, Instant::now()).unwrap();
            // Scale every Service 2 -> 3 and drop one: new backends, slots, masters,
            // deletes; the phase `skip` (counted from 0) fails.
            for i in 0..2 {
                reconciler.apply(slice(i, 3));
            }
            reconciler.apply(Change::Delete {
                kind: Kind::Service,
                id: ObjectRef::new("default", "svc-2"),
            });
            fail::cfg(
                crate::maps::writer::FAIL_PHASE,
                &format!("{skip}*off->1*return->off"),
            )
            .unwrap();
            let failed = reconciler.sync(SyncKind::Changes, Instant::now());
            assert!(failed.is_err(), "phase {skip} did not fail");
            assert_eq!(reconciler.metrics.map_write_failures.get(), 1);
            let retry = reconciler.retry_at().expect("a retry is scheduled");
            assert!(retry > Instant::now());
            // The retry, as the agent's loop makes it when `retry_at` comes: nothing else
            // changed.
            reconciler.sync(SyncKind::Changes, Instant::now()).unwrap();
            assert_eq!(reconciler.retry_at(), None);
            assert_eq!(
                lines(&reconciler),
                from_scratch(&reconciler),
                "phase {skip}"
            );
            // A restarted agent adopting these maps has nothing to write.
            let mut adopted = MapWriter::adopt(reconciler.writer.maps().clone()).unwrap();
            assert!(adopted.apply(reconciler.state.desired()).unwrap().is_noop());
        }
        scenario.teardown();
    }

    /// Failures in a row back off: 100 ms, 200 ms, 400 ms, ... at most 10 s.
    #[test]
    fn failed_writes_in_a_row_back_off() {
        let scenario = fail::FailScenario::setup();
        let mut reconciler = reconciler(FakeMaps::default());
        reconciler.apply(service(0));
        reconciler.apply(slice(0, 1));
        fail::cfg(crate::maps::writer::FAIL_PHASE, "return").unwrap();
        let mut delays = Vec::new();
        for _ in 0..10 {
            let before = Instant::now();
            assert!(reconciler.sync(SyncKind::Full, before).is_err());
            let after = reconciler.retry_at().unwrap();
            delays.push((after - before).as_millis() / 100 * 100);
        }
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]
        );
        fail::remove(crate::maps::writer::FAIL_PHASE);
        reconciler.sync(SyncKind::Changes, Instant::now()).unwrap();
        assert_eq!(lines(&reconciler), from_scratch(&reconciler));
        scenario.teardown();
    }
}
