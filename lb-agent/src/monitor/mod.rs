//! `lb-agent monitor`: a live stream of the datapath's translation decisions — when, which
//! client, which frontend, which backend and why — read from the pinned ring buffer while
//! the monitor holds the datapath's switch on (see `lb_common::monitor`). Filters by Service
//! (named through the agent's `--api-addr`) and by client address.
pub mod clients;
pub mod event;
pub mod switch;

use std::{
    collections::{BTreeSet, HashMap},
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{Map, MapData, RingBuf};
use lb_common::{MONITOR_EVENTS_MAP, MonitorEvent};

use crate::{api, inspect::OutputFormat, maps, summary::open_pin};

/// How often the ring buffer is drained: its 256 KiB (about 2,000 decisions) then last at
/// 40,000 decisions per second.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// What to show.
#[derive(Clone, Debug)]
pub struct Options {
    pub pin_dir: PathBuf,
    /// The agent's API, for Service names.
    pub api: Option<SocketAddr>,
    /// Only decisions for frontends of these Services (`namespace/name`).
    pub services: BTreeSet<String>,
    /// Only decisions for clients in these ranges.
    pub clients: Vec<ipnet::IpNet>,
    pub output: OutputFormat,
    /// Stop after this many decisions shown.
    pub count: Option<u64>,
}

/// Streams decisions to `out` until interrupted (SIGINT, SIGTERM) or `count` are shown.
///
/// # Errors
/// When the maps are not pinned, another monitor runs, or the switch cannot be written.
pub async fn run(options: Options, out: &mut impl Write) -> anyhow::Result<()> {
    anyhow::ensure!(
        options.services.is_empty() || options.api.is_some(),
        "--service needs the agent's --api-addr (or LB_API_ADDR): the maps hold no Service names"
    );
    let mut switch = switch::Switch::acquire(&options.pin_dir)?;
    let mut ring: RingBuf<MapData> = RingBuf::try_from(Map::RingBuf(open_pin(
        &options.pin_dir,
        MONITOR_EVENTS_MAP,
    )?))?;
    // Decisions left from an earlier monitor are not this one's.
    while ring.next().is_some() {}
    switch.renew()?;
    tracing::info!(pin_dir = %options.pin_dir.display(), "monitor on: streaming decisions until interrupted");
    let mut names = Names::new(&options);
    for service in &options.services {
        if !names.has_service(service) {
            tracing::warn!(
                service,
                "no frontend of this Service is known yet: waiting for one"
            );
        }
    }
    let mut netnses = clients::Netnses::new();
    let mut renew = tokio::time::interval(Duration::from_secs(1));
    // The datapath does not wake the reader (it would cost it more than the decision):
    // the ring is drained on this timer.
    let mut drain_tick = tokio::time::interval(DRAIN_EVERY);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut shown = 0u64;
    loop {
        let events = tokio::select! {
            _ = drain_tick.tick() => drain(&mut ring),
            _ = renew.tick() => {
                switch.renew()?;
                continue;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        };
        let (monotonic_now, wall_now) = (switch::monotonic_now(), SystemTime::now());
        for event in events {
            let wall = event::wall_time(event.time_ns, monotonic_now, wall_now);
            let mut decision = event::decode(&event, wall);
            decision.service = names.service(event.rev_nat_id);
            if let Some(cookie) = decision.client.netns_cookie {
                decision.client.node = netnses.is_node(cookie);
                if !decision.client.node {
                    decision.client.netns_addresses = netnses.addresses(cookie).to_vec();
                }
            }
            if !options.wanted(&decision) {
                continue;
            }
            match options.output {
                OutputFormat::Table => writeln!(out, "{}", event::line(&decision))?,
                OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(&decision)?)?,
            }
            out.flush()?;
            shown += 1;
            if options.count.is_some_and(|n| shown >= n) {
                return Ok(());
            }
        }
    }
    Ok(())
}

impl Options {
    fn wanted(&self, d: &event::Decision) -> bool {
        let service_ok = self.services.is_empty()
            || d.service
                .as_ref()
                .is_some_and(|s| self.services.contains(s));
        let client_ok = self.clients.is_empty()
            || d.client
                .ips()
                .iter()
                .any(|ip| self.clients.iter().any(|net| net.contains(ip)));
        service_ok && client_ok
    }
}

/// Copies the ring buffer's pending events out.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<MonitorEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<MonitorEvent>() {
            // SAFETY: the datapath writes whole `MonitorEvent`s (a Pod type); read unaligned.
            events.push(unsafe { item.as_ptr().cast::<MonitorEvent>().read_unaligned() });
        }
    }
    events
}

/// Frontend ids to their Services: frontend ids and addresses from the pinned maps, the
/// Services of those addresses from the agent. Read again when an unknown id shows up (at
/// most once a second).
struct Names {
    pin_dir: PathBuf,
    api: Option<SocketAddr>,
    services: HashMap<u32, String>,
    read: Option<Instant>,
}

impl Names {
    fn new(options: &Options) -> Self {
        let mut names = Self {
            pin_dir: options.pin_dir.clone(),
            api: options.api,
            services: HashMap::new(),
            read: None,
        };
        names.refresh();
        names
    }

    fn has_service(&self, service: &str) -> bool {
        self.services.values().any(|s| s == service)
    }

    fn service(&mut self, id: u32) -> Option<String> {
        if self.api.is_some()
            && !self.services.contains_key(&id)
            && self
                .read
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.refresh();
        }
        self.services.get(&id).cloned()
    }

    fn refresh(&mut self) {
        self.read = Some(Instant::now());
        let Some(addr) = self.api else {
            return;
        };
        let views = match api::fetch_frontends(addr) {
            Ok(views) => views,
            Err(e) => {
                tracing::warn!(error = %e, %addr, "cannot ask the agent for Service names");
                return;
            }
        };
        let contents = match maps::bpf::BpfMaps::open_pinned(&self.pin_dir)
            .map_err(anyhow::Error::from)
            .and_then(|m| Ok(maps::dump::read(&m)?))
        {
            Ok(contents) => contents,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pinned maps for frontend ids");
                return;
            }
        };
        let by_frontend: HashMap<String, String> =
            views.into_iter().map(|v| (v.frontend, v.service)).collect();
        self.services = contents
            .frontends
            .iter()
            .filter_map(|f| {
                by_frontend
                    .get(&f.address.to_string())
                    .map(|s| (f.rev_nat_id, s.clone()))
            })
            .collect();
    }
}
