//! `lb-agent run`: load and attach the datapath, then keep its maps equal to what the
//! source (a manifests directory or the API server) describes. Both sources hand their
//! changes to one [`Reconciler`], which alone changes the model and writes the maps.
use std::{
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
    dns::{
        index::{DnsIndex, SharedDnsIndex},
        publish,
        server::{self, DnsConfig},
    },
    health::HealthServers,
    loader,
    maps::{LbMaps, writer::MapWriter},
    metrics::Metrics,
    ownership::{ExternalIpCidrs, NodePortAddresses},
    proxy_health::{self, ProxyHealth},
    readiness::Readiness,
    reconcile::{Reconciler, SyncKind},
    source::{
        change::Kind,
        kube as kube_source,
        manifests::{self, ManifestDir},
    },
};

/// A full rescan of the manifests this often, in case a watch event was lost (cheap:
/// unchanged files are not re-read).
const RESCAN: Duration = Duration::from_secs(10);

/// While the initial lists come in: how long events are left to pile up in the channel
/// after a batch of them was applied (at most 4,096 wait; the lists of 100,000 Services
/// come at about 40 a millisecond).
const LISTING_PAUSE: Duration = Duration::from_millis(2);

/// Where the Kubernetes objects come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of YAML, watched; files larger than `max_file_size` bytes are not read.
    Manifests { dir: PathBuf, max_file_size: u64 },
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
    /// How long the API watch may fail before `/readyz` says the datapath is stale.
    pub readyz_stale_after: Duration,
    /// Where to serve `/metrics`, if anywhere (an unspecified address: both families).
    pub metrics_addr: Option<SocketAddr>,
    /// This node's name (for the node-local traffic policies).
    pub node_name: Option<String>,
    /// External devices for the tc datapath (empty: detected, see [`devices::resolve`]).
    pub devices: Vec<String>,
    /// Where socket translation runs.
    pub socket_lb: loader::SocketLb,
    /// Whether the external devices translate at XDP too.
    pub nodeport_acceleration: loader::NodePortAcceleration,
    /// Whether packets translated at tc ingress skip the node's forward path.
    pub bpf_host_routing: bool,
    /// Pod-facing devices for the per-packet path (empty: detected, see
    /// [`devices::resolve`]); only with `socket_lb` other than `all`.
    pub pod_devices: Vec<String>,
    /// The node addresses NodePorts answer on.
    pub nodeport_addresses: NodePortAddresses,
    /// The external IPs honoured (none: all).
    pub external_ip_cidrs: ExternalIpCidrs,
    /// The capacities of the maps that grow with the cluster (`--max-*`).
    pub capacities: lb_common::MapCapacities,
    /// Cluster DNS, if served.
    pub dns: Option<DnsRun>,
}

/// Cluster DNS as `run` serves it.
#[derive(Clone, Debug)]
pub struct DnsRun {
    pub config: DnsConfig,
    /// Whether the address was asked for explicitly: if not (the manifests mode's
    /// default), a taken address is reported and the agent runs without DNS.
    pub explicit: bool,
    /// The ClusterIP of the `kube-system/kube-dns` Service to publish, if any.
    pub service_ip: Option<std::net::IpAddr>,
}

/// Runs until SIGINT or SIGTERM. On exit the programs stay attached and the maps pinned:
/// Services keep working, and the next agent adopts them.
///
/// # Errors
/// When the datapath cannot be loaded or attached, or the source cannot be set up.
pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let status = SharedStatus::default();
    let (explain_tx, queries) = tokio::sync::mpsc::channel(16);
    if let Ok(mut status) = status.write() {
        status.readiness = Arc::new(Readiness::new(config.readyz_stale_after));
        status.explain = Some(explain_tx);
    }
    // The reverse index only for a DNS server to read.
    let dns_index = if config.dns.is_some() {
        SharedDnsIndex::default()
    } else {
        Arc::new(std::sync::RwLock::new(DnsIndex::names_only()))
    };
    let api = match config.api_addr {
        Some(addr) => {
            // Bind before anything else, so a taken port fails the start-up loudly.
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the API address {addr}"))?;
            Some(tokio::spawn(api::serve(
                listener,
                status.clone(),
                dns_index.clone(),
            )))
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::with_program_stats(config.pin_dir.clone()));
    let metrics_servers = match config.metrics_addr {
        Some(addr) => crate::metrics::serve(addr, Arc::clone(&metrics))
            .with_context(|| format!("binding the metrics address {addr}"))?,
        None => Vec::new(),
    };
    let pin_dir = config.pin_dir.clone();
    metrics.set_fill_reader(Arc::new(move || crate::summary::readable_fills(&pin_dir)));
    let dns = match &config.dns {
        Some(dns) => match server::serve(dns.config.clone(), dns_index.clone()).await {
            Ok(task) => Some(task),
            Err(e) if !dns.explicit => {
                warn!(
                    error = %e,
                    addr = %dns.config.addr,
                    "cluster DNS not served: its default address is taken (set --dns-addr)"
                );
                None
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("binding the DNS address {}", dns.config.addr));
            }
        },
        None => None,
    };
    let health = Arc::new(ProxyHealth::default());
    let healthz = match config.healthz_addr {
        Some(addr) => proxy_health::serve(addr, Arc::clone(&health))
            .with_context(|| format!("binding the healthz address {addr}"))?,
        None => Vec::new(),
    };
    let loader::Loaded { mut ebpf, maps } = loader::load(
        &config.pin_dir,
        config.socket_lb,
        config.bpf_host_routing,
        config.nodeport_acceleration,
        &config.capacities,
    )
    .with_context(|| {
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
    // The kernel verifies the programs from here on, while the pinned maps are adopted and
    // the source is read.
    let object = EbpfObject::loading(ebpf, config.socket_lb, config.nodeport_acceleration)?;
    let sweeper = tokio::spawn(crate::conntrack::sweep_forever(config.pin_dir.clone()));
    let writer = MapWriter::adopt(maps).context("reading the pinned maps")?;
    let mut reconciler = Reconciler::new(
        writer,
        status.clone(),
        config.node_name.clone(),
        Arc::clone(&health),
    );
    reconciler.set_stale_cleanup(config.pin_dir.clone());
    reconciler.set_metrics(metrics);
    reconciler.set_dns_index(dns_index);
    if let Some(dns_run) = &config.dns
        && let Some(service_ip) = dns_run.service_ip
        && dns.is_some()
    {
        let objects =
            publish::kube_dns(service_ip, dns_run.config.addr).map_err(anyhow::Error::msg)?;
        for object in objects {
            reconciler.publish_own(publish::ORIGIN, object);
        }
        info!(%service_ip, listener = %dns_run.config.addr, "kube-system/kube-dns published");
    }
    reconciler.set_external_ip_cidrs(config.external_ip_cidrs.clone());
    reconciler.set_node_addresses(node.node_addresses());
    info!(
        node = config.node_name.as_deref().unwrap_or("(unset)"),
        socket_lb = ?config.socket_lb,
        bpf_host_routing = config.bpf_host_routing,
        "starting"
    );
    let mut datapath = Datapath {
        object,
        node,
        config: &config,
        status: status.clone(),
        attached: false,
        tc_links: std::collections::BTreeSet::new(),
        queries,
    };
    let result = match &config.source {
        SourceConfig::Manifests { dir, max_file_size } => {
            run_manifests(dir, *max_file_size, &mut reconciler, &mut datapath).await
        }
        SourceConfig::Kube { kubeconfig } => {
            run_kube(kubeconfig.as_deref(), &mut reconciler, &mut datapath).await
        }
    };
    sweeper.abort();
    if let Some(task) = logger {
        task.abort();
    }
    if let Some(task) = api {
        task.abort();
    }
    if let Some(task) = dns {
        task.abort();
    }
    healthz.iter().for_each(tokio::task::JoinHandle::abort);
    metrics_servers
        .iter()
        .for_each(tokio::task::JoinHandle::abort);
    result?;
    info!("exiting; programs stay attached and maps pinned (`lb-agent cleanup` removes them)");
    Ok(())
}

/// The manifests source: read the directory, program, attach, then follow its changes (and
/// the node's addresses).
async fn run_manifests<M: LbMaps>(
    dir: &std::path::Path,
    max_file_size: u64,
    reconciler: &mut Reconciler<M>,
    datapath: &mut Datapath<'_>,
) -> anyhow::Result<()> {
    // Watch before the first read, so a change made in between is not lost.
    let (_watcher, mut changes) =
        manifests::watch(dir).with_context(|| format!("watching {}", dir.display()))?;
    let mut manifests = ManifestDir::new(dir).with_max_file_size(max_file_size);
    // `only`: the files a watch event named (each is read whatever its stamp says: a file
    // written in place twice within the clock's granularity keeps its length and mtime);
    // none: every file whose stamp changed.
    let read = |manifests: &mut ManifestDir,
                reconciler: &mut Reconciler<M>,
                only: Option<&[PathBuf]>|
     -> anyhow::Result<()> {
        let queued = Instant::now();
        let changed = manifests
            .refresh_with(only, |change| reconciler.apply(change))
            .with_context(|| format!("reading {}", dir.display()))?;
        if !changed {
            return Ok(());
        }
        debug!(
            files = only.map_or(0, <[PathBuf]>::len),
            elapsed_us = queued.elapsed().as_micros(),
            "manifests read"
        );
        reconciler.queued(queued);
        let problems = manifests.problems();
        reconciler.set_source_problems(problems.iter().map(ToString::to_string).collect());
        Ok(())
    };
    read(&mut manifests, reconciler, None)?;
    // The parsed files are garbage now: purged before the translation's memory comes on
    // top of them (the agent's peak).
    crate::allocator::release_free_memory();
    reconciler
        .sync(SyncKind::Full, Instant::now())
        .context("initial sync")?;
    datapath.attach()?;
    // The files' objects, and the verifier's logs, passed through the heap once: hand the
    // pages back.
    crate::allocator::release_free_memory();
    let mut health = HealthServers::new(Arc::clone(reconciler.health()));
    reconciler.update_health(&mut health).await;
    let mut rescan = tokio::time::interval(RESCAN);
    let mut stop = Stop::new()?;
    loop {
        // No debounce: a change is handled as soon as it comes, and whatever comes while
        // it is handled is taken in one go next time round.
        let changed = tokio::select! {
            Some(changed) = changes.next() => changed,
            _ = rescan.tick() => manifests::Changed::Everything,
            Some(query) = datapath.queries.recv() => {
                query.answer(reconciler.state());
                continue;
            }
            () = datapath.node.changed() => {
                datapath.refresh();
                // An external IP on a node address may yield to a NodePort, or take it.
                reconciler.set_node_addresses(datapath.node.node_addresses());
                reconciler.sync_or_log(SyncKind::Changes, Instant::now());
                continue;
            }
            () = reconciler.retry_due() => {
                reconciler.sync_or_log(SyncKind::Changes, Instant::now());
                continue;
            }
            () = stop.wait() => return Ok(()),
        };
        let started = Instant::now();
        let only = match &changed {
            manifests::Changed::Files(files) => Some(files.as_slice()),
            _ => None,
        };
        match read(&mut manifests, reconciler, only) {
            Ok(()) => {
                reconciler.sync_or_log(SyncKind::Changes, started);
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
    let held = api::readiness(&datapath.status);
    let on_hold = move |kind: Kind, until| held.watch_held(kind.name(), until);
    let (client, guard_reports) = kube_source::client(kubeconfig, on_hold)
        .await
        .context("configuring the Kubernetes client")?;
    let node_name = datapath.config.node_name.clone();
    let mut updates = kube_source::watch(&client, node_name.as_deref(), guard_reports);
    let mut applier = kube_source::WatchApplier::new(node_name.is_some());
    let mut stop = Stop::new()?;
    let mut health = HealthServers::new(Arc::clone(reconciler.health()));
    loop {
        let first = tokio::select! {
            update = updates.recv() => update.context("the watches ended")?,
            Some(query) = datapath.queries.recv() => {
                query.answer(reconciler.state());
                continue;
            }
            () = datapath.node.changed() => {
                datapath.refresh();
                reconciler.set_node_addresses(datapath.node.node_addresses());
                if datapath.attached {
                    reconciler.sync_or_log(SyncKind::Changes, Instant::now());
                }
                continue;
            }
            () = reconciler.retry_due(), if datapath.attached => {
                reconciler.sync_or_log(SyncKind::Changes, Instant::now());
                continue;
            }
            () = stop.wait() => return Ok(()),
        };
        let started = Instant::now();
        reconciler.queued(started);
        let readiness = api::readiness(&datapath.status);
        observe(&first, reconciler.metrics(), &readiness);
        applier.convert(first, |change| reconciler.apply(change));
        // Take what else is already queued: one write pass for a burst of events.
        while let Ok(update) = updates.try_recv() {
            observe(&update, reconciler.metrics(), &readiness);
            applier.convert(update, |change| reconciler.apply(change));
        }
        if !applier.initial_lists_done() {
            // The lists arrive faster than one event at a time is worth a wake-up: waiting on
            // the channel would wake this thread (a cross-CPU wake, a VM exit on a VM) for
            // every object, a fifth of the listing thread's time at 100,000 Services. Let
            // them pile up for a moment instead; nothing is programmed before the lists end.
            tokio::time::sleep(LISTING_PAUSE).await;
            continue;
        }
        match datapath.attached {
            false => {
                let (services, slices, _) = reconciler.state().counts();
                info!(services, slices, "initial lists complete");
                // The decoded pages are garbage now: purged before the translation's
                // memory comes on top of them (the agent's peak).
                crate::allocator::release_free_memory();
                reconciler
                    .sync(SyncKind::Full, started)
                    .context("initial sync")?;
                datapath.attach()?;
                crate::allocator::release_free_memory();
            }
            true => reconciler.sync_or_log(SyncKind::Changes, started),
        }
        reconciler.update_health(&mut health).await;
    }
}

/// Notes whether the watches work: an error counts a restart (it retries with backoff)
/// and may make the datapath stale; any event says the watch works.
fn observe(update: &kube_source::Update, metrics: &Metrics, readiness: &Readiness) {
    let resource = match update {
        kube_source::Update::Error { resource, .. } => {
            metrics.watch_restarted(resource.name());
            readiness.watch_failed(resource.name(), Instant::now());
            return;
        }
        kube_source::Update::Service(_) => Kind::Service,
        kube_source::Update::Slice(_) => Kind::EndpointSlice,
        kube_source::Update::Node(_) => Kind::Node,
    };
    readiness.watch_succeeded(resource.name());
}

/// The loaded programs and the node's devices: what attaching the programs, and keeping
/// the tc ones on the right devices, needs.
struct Datapath<'a> {
    object: EbpfObject,
    node: devices::NodeDevices,
    config: &'a RunConfig,
    status: SharedStatus,
    /// Whether [`Datapath::attach`] ran (after the first sync: maps before programs).
    attached: bool,
    /// The tc and XDP links this agent attached (their pin names).
    tc_links: std::collections::BTreeSet<String>,
    /// `/v1/explain` questions, answered from the model between changes.
    queries: tokio::sync::mpsc::Receiver<crate::explain::Query>,
}

/// The eBPF object, whose programs are verified on a thread of their own while the source
/// is read and the maps written (see [`loader::load_programs`]).
struct EbpfObject {
    /// The object, once the loading thread handed it back.
    ebpf: Option<aya::Ebpf>,
    loading: Option<std::thread::JoinHandle<aya::Ebpf>>,
}

impl EbpfObject {
    /// Starts verifying the programs `run` will attach.
    fn loading(
        mut ebpf: aya::Ebpf,
        socket_lb: loader::SocketLb,
        acceleration: loader::NodePortAcceleration,
    ) -> std::io::Result<Self> {
        let loading = std::thread::Builder::new()
            .name("load-programs".into())
            .spawn(move || {
                let started = Instant::now();
                loader::load_programs(&mut ebpf, socket_lb, acceleration);
                debug!(
                    elapsed_us = started.elapsed().as_micros(),
                    "programs loaded ahead of attaching"
                );
                crate::clock::calibrate_in_background(&mut ebpf);
                ebpf
            })?;
        Ok(Self {
            ebpf: None,
            loading: Some(loading),
        })
    }

    /// The object, waiting for the loading thread if it has not finished.
    fn get(&mut self) -> &mut aya::Ebpf {
        if let Some(loading) = self.loading.take() {
            let ebpf = loading
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            self.ebpf = Some(ebpf);
        }
        self.ebpf
            .as_mut()
            .expect("the eBPF object is either here or on the loading thread")
    }
}

impl Datapath<'_> {
    /// Attaches the socket programs (or, with `--socket-lb off`, detaches a previous
    /// agent's) and the tc programs, then reports the agent ready.
    fn attach(&mut self) -> anyhow::Result<()> {
        let config = self.config;
        if config.socket_lb == loader::SocketLb::Off {
            loader::detach_cgroup_programs(&config.pin_dir)?;
        } else {
            loader::attach_cgroup_programs(self.object.get(), &config.cgroup, &config.pin_dir)?;
        }
        self.attach_tc()?;
        self.attached = true;
        api::readiness(&self.status).attached();
        info!("ready");
        Ok(())
    }

    /// Attaches the tc programs, then (or, with acceleration off, takes away) the XDP one
    /// of the external devices: tc is in place before XDP hands packets to it.
    fn attach_tc(&mut self) -> Result<(), loader::LoadError> {
        let external = self.node.external();
        loader::attach_tc_programs(
            self.object.get(),
            &external,
            self.node.pods(),
            &self.config.pin_dir,
            &mut self.tc_links,
        )?;
        loader::attach_xdp_programs(
            self.object.get(),
            &external,
            self.config.nodeport_acceleration,
            &self.config.pin_dir,
            &mut self.tc_links,
        )
        .map(drop)
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
