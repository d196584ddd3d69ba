//! `lb-agent run`: load and attach the datapath, then keep its maps equal to what the
//! source (a manifests directory or the API server) describes. Both sources feed one
//! [`ClusterState`] and one [`MapWriter`] through the [`Reconciler`].
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{debug, error, info, warn};

use crate::{
    api::{self, SharedStatus},
    devices,
    health::HealthServers,
    loader,
    maps::{LbMaps, writer::MapWriter},
    node::ThisNode,
    ownership::{ExternalIpCidrs, NodePortAddresses},
    proxy_health::{self, Now, ProxyHealth},
    source::{
        kube as kube_source,
        manifests::{self, ManifestDir},
    },
    state::ClusterState,
};

/// A full rescan of the manifests this often, in case a watch event was lost (cheap:
/// unchanged files are not re-read).
const RESCAN: Duration = Duration::from_secs(10);

/// Where the Kubernetes objects come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of YAML, watched.
    Manifests(PathBuf),
    /// The API server, through this kubeconfig or else the inferred configuration.
    Kube { kubeconfig: Option<PathBuf> },
}

/// What `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// Where to serve the HTTP API, if anywhere.
    pub api_addr: Option<SocketAddr>,
    /// Where to serve kube-proxy's `/healthz` and `/livez`, if anywhere (an unspecified
    /// address: both families).
    pub healthz_addr: Option<SocketAddr>,
    /// This node's name (for the node-local traffic policies).
    pub node_name: Option<String>,
    /// External devices for the tc datapath (empty: detected, see [`devices::resolve`]).
    pub devices: Vec<String>,
    /// Where socket translation runs.
    pub socket_lb: loader::SocketLb,
    /// Pod-facing devices for the per-packet path (empty: detected, see
    /// [`devices::resolve`]); only with `socket_lb` other than `all`.
    pub pod_devices: Vec<String>,
    /// The node addresses NodePorts answer on.
    pub nodeport_addresses: NodePortAddresses,
    /// The external IPs honoured (none: all).
    pub external_ip_cidrs: ExternalIpCidrs,
    /// The capacities of the maps that grow with the cluster (`--max-*`).
    pub capacities: lb_common::MapCapacities,
}

/// Runs until SIGINT or SIGTERM. On exit the programs stay attached and the maps pinned:
/// Services keep working, and the next agent adopts them.
///
/// # Errors
/// When the datapath cannot be loaded or attached, or the source cannot be set up.
pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let status = SharedStatus::default();
    let api = match config.api_addr {
        Some(addr) => {
            // Bind before anything else, so a taken port fails the start-up loudly.
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the API address {addr}"))?;
            Some(tokio::spawn(api::serve(listener, status.clone())))
        }
        None => None,
    };
    let health = Arc::new(ProxyHealth::default());
    let healthz = match config.healthz_addr {
        Some(addr) => proxy_health::serve(addr, Arc::clone(&health))
            .with_context(|| format!("binding the healthz address {addr}"))?,
        None => Vec::new(),
    };
    let loader::Loaded { mut ebpf, maps } =
        loader::load(&config.pin_dir, config.socket_lb, &config.capacities).with_context(|| {
            format!(
                "loading the datapath (pins in {})",
                config.pin_dir.display()
            )
        })?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => Some(tokio::spawn(forward_ebpf_logs(logger))),
        Err(e) => {
            warn!(error = %e, "eBPF log records will not be shown");
            None
        }
    };
    let writer = MapWriter::adopt(maps).context("reading the pinned maps")?;
    let mut reconciler = Reconciler::new(
        writer,
        status.clone(),
        config.node_name.clone(),
        Arc::clone(&health),
    );
    reconciler.stale_cleanup = Some(config.pin_dir.clone());
    let pods = config
        .socket_lb
        .per_packet_for_pods()
        .then_some(config.pod_devices.as_slice());
    let node = devices::NodeDevices::start(
        &mut ebpf,
        &config.devices,
        pods,
        config.nodeport_addresses.clone(),
    )?;
    reconciler
        .state
        .set_external_ip_cidrs(config.external_ip_cidrs.clone());
    reconciler.state.set_node_addresses(node.node_addresses());
    info!(
        node = config.node_name.as_deref().unwrap_or("(unset)"),
        socket_lb = ?config.socket_lb,
        "starting"
    );
    let mut datapath = Datapath {
        ebpf,
        node,
        config: &config,
        status: status.clone(),
        attached: false,
        tc_links: std::collections::BTreeSet::new(),
    };
    let result = match &config.source {
        SourceConfig::Manifests(dir) => run_manifests(dir, &mut reconciler, &mut datapath).await,
        SourceConfig::Kube { kubeconfig } => {
            run_kube(kubeconfig.as_deref(), &mut reconciler, &mut datapath).await
        }
    };
    if let Some(task) = logger {
        task.abort();
    }
    if let Some(task) = api {
        task.abort();
    }
    healthz.iter().for_each(tokio::task::JoinHandle::abort);
    result?;
    info!("exiting; programs stay attached and maps pinned (`lb-agent cleanup` removes them)");
    Ok(())
}

/// The manifests source: read the directory, program, attach, then follow its changes (and
/// the node's addresses).
async fn run_manifests<M: LbMaps>(
    dir: &std::path::Path,
    reconciler: &mut Reconciler<M>,
    datapath: &mut Datapath<'_>,
) -> anyhow::Result<()> {
    // Watch before the first read, so a change made in between is not lost.
    let (_watcher, mut changes) =
        manifests::watch(dir).with_context(|| format!("watching {}", dir.display()))?;
    let mut manifests = ManifestDir::new(dir);
    let mut node = ThisNode::new(datapath.config.node_name.clone());
    // `only`: the files a watch event named (each is read whatever its stamp says: a file
    // written in place twice within the clock's granularity keeps its length and mtime);
    // none: every file whose stamp changed.
    let read = |manifests: &mut ManifestDir,
                node: &mut ThisNode,
                reconciler: &mut Reconciler<M>,
                only: Option<&[PathBuf]>|
     -> anyhow::Result<()> {
        let queued = Instant::now();
        let changed = manifests
            .refresh_with(only, |update| update.apply_to(&mut reconciler.state, node))
            .with_context(|| format!("reading {}", dir.display()))?;
        if !changed {
            return Ok(());
        }
        debug!(
            files = only.map_or(0, <[PathBuf]>::len),
            elapsed_us = queued.elapsed().as_micros(),
            "manifests read"
        );
        reconciler.health.queued(queued);
        reconciler.health.set_node_eligible(node.eligible());
        let problems = manifests.problems();
        reconciler.source_problems = problems.iter().map(ToString::to_string).collect();
        Ok(())
    };
    read(&mut manifests, &mut node, reconciler, None)?;
    reconciler
        .sync(Sync::Full, Instant::now())
        .context("initial sync")?;
    // The files' objects passed through the heap once: hand the pages back.
    release_free_memory();
    datapath.attach()?;
    let mut health = HealthServers::new(Arc::clone(&reconciler.health));
    reconciler.update_health(&mut health).await;
    let mut rescan = tokio::time::interval(RESCAN);
    let mut stop = Stop::new()?;
    loop {
        // No debounce: a change is handled as soon as it comes, and whatever comes while
        // it is handled is taken in one go next time round.
        let changed = tokio::select! {
            Some(changed) = changes.next() => changed,
            _ = rescan.tick() => manifests::Changed::Everything,
            () = datapath.node.changed() => {
                datapath.refresh();
                // An external IP on a node address may yield to a NodePort, or take it.
                reconciler.state.set_node_addresses(datapath.node.node_addresses());
                reconciler.sync_or_log(Sync::Changes, Instant::now());
                continue;
            }
            () = stop.wait() => return Ok(()),
        };
        let started = Instant::now();
        let only = match &changed {
            manifests::Changed::Files(files) => Some(files.as_slice()),
            _ => None,
        };
        match read(&mut manifests, &mut node, reconciler, only) {
            Ok(()) => {
                reconciler.sync_or_log(Sync::Changes, started);
                reconciler.update_health(&mut health).await;
            }
            Err(e) => error!(
                error = format!("{e:#}"),
                "reading the manifests failed; retrying on the next change"
            ),
        }
    }
}

/// The API server source: watch, wait for both initial lists, program, attach, then apply
/// every event as it comes (in batches when they come faster than they are written); the
/// node's addresses are followed throughout.
async fn run_kube<M: LbMaps>(
    kubeconfig: Option<&std::path::Path>,
    reconciler: &mut Reconciler<M>,
    datapath: &mut Datapath<'_>,
) -> anyhow::Result<()> {
    let client = kube_source::client(kubeconfig)
        .await
        .context("configuring the Kubernetes client")?;
    let node_name = datapath.config.node_name.clone();
    let mut updates = kube_source::watch(&client, node_name.as_deref());
    let mut applier = kube_source::WatchApplier::new(node_name);
    let mut stop = Stop::new()?;
    let mut health = HealthServers::new(Arc::clone(&reconciler.health));
    loop {
        let first = tokio::select! {
            update = updates.recv() => update.context("the watches ended")?,
            () = datapath.node.changed() => {
                datapath.refresh();
                reconciler.state.set_node_addresses(datapath.node.node_addresses());
                if datapath.attached {
                    reconciler.sync_or_log(Sync::Changes, Instant::now());
                }
                continue;
            }
            () = stop.wait() => return Ok(()),
        };
        let started = Instant::now();
        reconciler.health.queued(started);
        applier.apply(&mut reconciler.state, first);
        // Take what else is already queued: one write pass for a burst of events.
        while let Ok(update) = updates.try_recv() {
            applier.apply(&mut reconciler.state, update);
        }
        reconciler
            .health
            .set_node_eligible(applier.node().eligible());
        if !applier.initial_lists_done() {
            continue;
        }
        match datapath.attached {
            false => {
                let (services, slices, _) = reconciler.state.counts();
                info!(services, slices, "initial lists complete");
                reconciler
                    .sync(Sync::Full, started)
                    .context("initial sync")?;
                datapath.attach()?;
                release_free_memory();
            }
            true => reconciler.sync_or_log(Sync::Changes, started),
        }
        reconciler.update_health(&mut health).await;
    }
}

/// The loaded programs and the node's devices: what attaching the programs, and keeping
/// the tc ones on the right devices, needs.
struct Datapath<'a> {
    ebpf: aya::Ebpf,
    node: devices::NodeDevices,
    config: &'a RunConfig,
    status: SharedStatus,
    /// Whether [`Datapath::attach`] ran (after the first sync: maps before programs).
    attached: bool,
    /// The tc links this agent attached (their pin names).
    tc_links: std::collections::BTreeSet<String>,
}

impl Datapath<'_> {
    /// Attaches the socket programs (or, with `--socket-lb off`, detaches a previous
    /// agent's) and the tc programs, then reports the agent ready.
    fn attach(&mut self) -> anyhow::Result<()> {
        let config = self.config;
        if config.socket_lb == loader::SocketLb::Off {
            loader::detach_cgroup_programs(&config.pin_dir)?;
        } else {
            loader::attach_cgroup_programs(&mut self.ebpf, &config.cgroup, &config.pin_dir)?;
        }
        self.attach_tc()?;
        self.attached = true;
        if let Ok(mut status) = self.status.write() {
            status.ready = true;
        }
        info!("ready");
        Ok(())
    }

    fn attach_tc(&mut self) -> Result<(), loader::LoadError> {
        loader::attach_tc_programs(
            &mut self.ebpf,
            &self.node.external(),
            self.node.pods(),
            &self.config.pin_dir,
            &mut self.tc_links,
        )
    }

    /// After links or addresses changed: the addresses follow, and so do the tc programs
    /// when a device came or went (once attached at all).
    fn refresh(&mut self) {
        if self.node.refresh()
            && self.attached
            && let Err(e) = self.attach_tc()
        {
            error!(
                error = %e,
                "attaching the tc programs to changed devices failed; retrying on the next change"
            );
        }
    }
}

/// SIGINT or SIGTERM.
struct Stop {
    sigterm: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            sigterm: signal(SignalKind::terminate())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.sigterm.recv() => {}
        }
    }
}

/// How much a sync writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    /// Everything that differs from the maps (first sync, after adopting).
    Full,
    /// The frontends the model reports changed (and any whose write failed before).
    Changes,
}

/// The model, the writer, and what was last reported.
struct Reconciler<M> {
    state: ClusterState,
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
    pending: BTreeSet<crate::model::L4Addr>,
    full_pending: bool,
    /// The health checks last handed to the servers.
    health_checks: Option<std::collections::BTreeMap<u16, crate::model::HealthCheck>>,
    /// The pin directory, when UDP sockets and flows pinned to removed backends are to be
    /// ended after each write ([`crate::stale`]).
    stale_cleanup: Option<std::path::PathBuf>,
    /// The agent's health: changes queued and synced, this node's eligibility.
    health: Arc<ProxyHealth>,
}

impl<M: LbMaps> Reconciler<M> {
    fn new(
        writer: MapWriter<M>,
        status: SharedStatus,
        node_name: Option<String>,
        health: Arc<ProxyHealth>,
    ) -> Self {
        Self {
            state: ClusterState::new(node_name),
            writer,
            status,
            source_problems: Vec::new(),
            map_problems: Vec::new(),
            reported: BTreeSet::new(),
            reported_version: None,
            pending: BTreeSet::new(),
            full_pending: false,
            health_checks: None,
            stale_cleanup: None,
            health,
        }
    }

    /// Hands the Services' health checks to the servers when they changed.
    async fn update_health(&mut self, servers: &mut HealthServers) {
        let checks = self.state.health_checks();
        if self.health_checks.as_ref() != Some(&checks) {
            servers.update(&checks).await;
            self.health_checks = Some(checks);
        }
    }

    fn sync_or_log(&mut self, kind: Sync, started: Instant) {
        if let Err(e) = self.sync(kind, started) {
            error!(
                error = format!("{e:#}"),
                "writing the maps failed; retrying on the next sync"
            );
        }
    }

    /// Translates what changed and writes it.
    fn sync(&mut self, kind: Sync, started: Instant) -> anyhow::Result<()> {
        let changed = self.state.recompute();
        self.pending.extend(changed.iter().copied());
        self.publish(&changed);
        if kind == Sync::Full {
            self.full_pending = true;
        }
        self.report();
        // Frontends the maps could not take are tried again on every sync (a rescan, any
        // event): room may have appeared.
        if self.pending.is_empty() && !self.full_pending && self.writer.refused().is_empty() {
            self.health.updated(Now::current());
            return Ok(());
        }
        let desired = self.state.desired();
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
                if let Err(read) = self.writer.readopt() {
                    error!(error = %read, "reading the maps back failed");
                }
                return Err(anyhow::Error::new(e).context("writing the maps"));
            }
        };
        self.pending.clear();
        self.full_pending = false;
        self.health.updated(Now::current());
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
        let elapsed_us = started.elapsed().as_micros();
        if stats.is_noop() {
            debug!(elapsed_us, "nothing to write");
        } else {
            info!(
                frontends = desired.len(),
                added = stats.frontends_added,
                updated = stats.frontends_updated,
                removed = stats.frontends_removed,
                map_writes = stats.map_writes,
                map_deletes = stats.map_deletes,
                elapsed_us,
                "maps updated"
            );
        }
        self.map_problems = self.map_problems();
        self.report();
        Ok(())
    }

    /// Updates what the API shows, for the changed frontends only.
    fn publish(&self, changed: &[crate::model::L4Addr]) {
        let Ok(mut status) = self.status.write() else {
            return;
        };
        for address in changed {
            match self.state.desired().get(address) {
                Some(frontend) => status.desired.insert(*address, frontend.clone()),
                None => status.desired.remove(address),
            };
        }
    }

    /// The frontends the writer could not program, as problems on their Services' ports
    /// (the writer tries them again with every apply).
    fn map_problems(&self) -> Vec<String> {
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

/// Hands the heap's free pages back to the kernel. The initial list passes through the heap
/// once (kube-rs pages, our relist buffer): without this the agent's RSS would keep that
/// peak for the rest of its life.
fn release_free_memory() {
    // SAFETY: glibc's malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Forwards aya-log records from the eBPF programs to the log bridge as they arrive.
async fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same for as
    // long as the AsyncFd (which owns the logger) lives.
    let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{maps::fake::FakeMaps, translate::Sourced};

    fn service(i: usize) -> Sourced<k8s_openapi::api::core::v1::Service> {
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
        Sourced {
            origin: Arc::from("services.yaml"),
            object,
        }
    }

    /// The first sync with more Services than the services map holds programs those that
    /// fit, reports the others on their port, and does not fail.
    #[test]
    fn first_sync_programs_what_fits_and_reports_the_rest() {
        let mut maps = FakeMaps::default();
        // Each Service here (no endpoints) is one master entry.
        maps.set_capacity(lb_common::SERVICES4_MAP, 5);
        let writer = MapWriter::adopt(maps).unwrap();
        let mut reconciler = Reconciler::new(
            writer,
            SharedStatus::default(),
            None,
            Arc::new(ProxyHealth::default()),
        );
        for i in 0..8 {
            reconciler.state.apply_service(service(i));
        }
        reconciler.sync(Sync::Full, Instant::now()).unwrap();
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
        reconciler.state.delete_service(&crate::model::ObjectRef {
            namespace: "default".into(),
            name: "svc-0".into(),
        });
        reconciler.sync(Sync::Changes, Instant::now()).unwrap();
        assert_eq!(reconciler.writer.maps().services.len(), 5);
        assert_eq!(reconciler.writer.refused().len(), 2);
        assert_eq!(reconciler.map_problems.len(), 2);
    }
}
