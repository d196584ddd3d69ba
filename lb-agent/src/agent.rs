//! `lb-agent run`: load and attach the datapath, then keep its maps equal to what the
//! manifests describe.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{debug, error, info, instrument, warn};

use crate::{
    api::{self, SharedStatus},
    loader,
    maps::{LbMaps, writer::MapWriter},
    source::manifests::{self, ManifestDir},
    translate,
};

/// How long the watcher waits for a burst of file changes to settle.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A full rescan this often, in case a watch event was lost (cheap: unchanged files are
/// not re-read).
const RESCAN: Duration = Duration::from_secs(10);

/// What `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub manifests: PathBuf,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// Where to serve the HTTP API, if anywhere.
    pub api_addr: Option<SocketAddr>,
}

/// Runs until SIGINT or SIGTERM. On exit the programs stay attached and the maps pinned:
/// Services keep working, and the next agent adopts them.
///
/// # Errors
/// When the datapath cannot be loaded or attached, or the manifests directory cannot be
/// watched.
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
    let loader::Loaded { mut ebpf, maps } = loader::load(&config.pin_dir).with_context(|| {
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
    let mut writer = MapWriter::adopt(maps).context("reading the pinned maps")?;
    // Watch before the first read, so a change made in between is not lost.
    let (_watcher, mut changes) = manifests::watch(&config.manifests, DEBOUNCE)
        .with_context(|| format!("watching {}", config.manifests.display()))?;
    let mut source = Source::new(config.manifests.clone(), status.clone());
    source.sync(&mut writer).context("initial sync")?;
    loader::attach_cgroup_programs(&mut ebpf, &config.cgroup, &config.pin_dir)?;
    if let Ok(mut status) = status.write() {
        status.ready = true;
    }
    info!(manifests = %config.manifests.display(), "ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut rescan = tokio::time::interval(RESCAN);
    loop {
        tokio::select! {
            Some(()) = changes.recv() => {}
            _ = rescan.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        if let Err(e) = source.sync(&mut writer) {
            error!(
                error = format!("{e:#}"),
                "sync failed; retrying on the next change"
            );
        }
    }
    if let Some(task) = logger {
        task.abort();
    }
    if let Some(task) = api {
        task.abort();
    }
    info!("exiting; programs stay attached and maps pinned (`lb-agent cleanup` removes them)");
    Ok(())
}

/// The manifests directory and what was last reported about it.
struct Source {
    dir: ManifestDir,
    reported: BTreeSet<String>,
    retry: bool,
    status: SharedStatus,
}

impl Source {
    fn new(dir: PathBuf, status: SharedStatus) -> Self {
        Self {
            dir: ManifestDir::new(dir),
            reported: BTreeSet::new(),
            retry: false,
            status,
        }
    }

    /// Re-reads what changed, translates, and writes the differences to the maps.
    #[instrument(skip_all)]
    fn sync(&mut self, writer: &mut MapWriter<impl LbMaps>) -> anyhow::Result<()> {
        let started = Instant::now();
        let changed = self
            .dir
            .refresh()
            .with_context(|| format!("reading {}", self.dir.dir().display()))?;
        if !changed && !self.retry {
            return Ok(());
        }
        let (objects, mut problems) = self.dir.objects();
        let translation = translate::translate(&objects);
        problems.extend(translation.problems);
        self.report(&problems, &translation.skipped);
        // Until an apply succeeds, every sync retries it even without a file change.
        self.retry = true;
        let stats = writer.apply(&translation.frontends)?;
        self.retry = false;
        if let Ok(mut status) = self.status.write() {
            status.frontends = api::views(&translation.frontends);
        }
        if !stats.is_noop() {
            info!(
                frontends = translation.frontends.len(),
                added = stats.frontends_added,
                updated = stats.frontends_updated,
                removed = stats.frontends_removed,
                map_writes = stats.map_writes,
                map_deletes = stats.map_deletes,
                elapsed_us = started.elapsed().as_micros(),
                "maps updated"
            );
        }
        Ok(())
    }

    /// Logs each problem once, when it appears, and says when it is gone.
    fn report(&mut self, problems: &[translate::Problem], skipped: &[translate::Skipped]) {
        let now: BTreeSet<String> = problems.iter().map(ToString::to_string).collect();
        for problem in now.difference(&self.reported) {
            error!("invalid object, not programmed: {problem}");
        }
        for problem in self.reported.difference(&now) {
            info!("resolved: {problem}");
        }
        for skip in skipped {
            debug!(object = %skip.object, reason = %skip.reason, "not programmed");
        }
        self.reported = now;
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
