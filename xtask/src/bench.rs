//! `cargo xtask bench`: our socket and tc load balancers against the direct path and
//! kube-proxy's iptables and nftables layouts, on network namespaces, over a sweep of Service
//! counts.
//!
//! First the agent with no Service is measured (its memory is the baseline of the per-Service
//! figures). For each size (N Services × E endpoints) every variant programs the same Services
//! from nothing (timed, stopped at a cap; not the tc LB's agent, the socket LB's control plane
//! once more; a size the agent reports it cannot fit is "over map capacity" in its own words),
//! then the data-path workloads run round-robin over the variants for several rounds (so
//! drift hits every variant alike), then one Service's endpoint change is timed, and the
//! agent's memory is read. Last, `lb-watch-bench` measures the agent on a (fake) API server at
//! the largest size. The results go to `docs/benchmarks.md` with
//! SVG plots in `docs/bench/` (`--quick`: N ∈ {1, 100}, short runs, `target/bench-quick/`).
//! Then cluster DNS against dnsmasq ([`crate::dns_bench`], `dns.md` beside the report).
//! [`lab::Lab`] owns everything created (all named `lbbench…`) and removes it on success, error
//! and Ctrl-C.
mod agent;
mod empty_programs;
mod flood;
mod kubeproxy;
mod lab;
mod lifecycle;
mod nodeport;
mod plot;
mod report;
mod results;
mod scenario;
mod sections;
mod soak;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use self::agent::Agent;
use self::empty_programs::EmptyPrograms;
use self::kubeproxy::IptablesBackend;
use self::lab::{Lab, Paths};
use self::results::{ApiResult, ConfigResult, EmptyAgent, Run, Summary, Variant, Workload};
use self::scenario::{Proto, Scenario};
use crate::{cmd, host, install};

/// What the bench runs besides the build prerequisites.
const BENCH_APT_PACKAGES: &[&str] = &["iproute2", "bpftool", "iptables", "nftables", "procps"];
const FULL_SERVICES: &[usize] = &[1, 100, 1000, 5000, 10_000, 30_000, 100_000];
const QUICK_SERVICES: &[usize] = &[1, 100];
const ENDPOINTS: &[usize] = &[1, 10];
/// Real backend pods (the measured Service's endpoints): 10.244.1.1 …
const BACKENDS: u8 = 10;
/// Client pods: 10.244.0.2 … (one per variant).
const FIRST_CLIENT_HOST: u8 = 2;
/// Bound of one probe or teardown command.
const PLUMBING_LIMIT: Duration = Duration::from_secs(300);
/// The lab's name for the `lb-agent monitor` of the monitor-cost runs.
const MONITOR: &str = "monitor";

#[derive(clap::Args)]
pub struct Args {
    /// N ∈ {1, 100}, short runs, debug binaries, report in target/bench-quick/ (about a
    /// minute; what the test suite runs to keep the bench working).
    #[arg(long)]
    quick: bool,
    /// Directory for benchmarks.md and bench/*.svg [default: docs/, or target/bench-quick/
    /// with --quick].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Service counts to sweep [default: 1,100,1000,5000,10000,30000,100000; --quick: 1,100].
    #[arg(long, value_delimiter = ',', value_name = "N,…")]
    services: Vec<usize>,
    /// Endpoints per Service (at most 10, the real backends) [default: 1,10].
    #[arg(long, value_delimiter = ',', value_name = "E,…")]
    endpoints: Vec<usize>,
    /// A variant stops at the first size whose programming takes longer than this.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    cap: u64,
    /// Rounds over all variants [default: 5; --quick: 2].
    #[arg(long)]
    rounds: Option<usize>,
    /// Duration of one new-connection run; the other workloads run half as long [default:
    /// 800; --quick: 200].
    #[arg(long, value_name = "MS")]
    crr_ms: Option<u64>,
    /// Concurrent client workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Services of the run on the (fake) API server, with the most endpoints of --endpoints;
    /// 0 leaves it out [default: the most of --services].
    #[arg(long, value_name = "N")]
    api_services: Option<usize>,
    /// EndpointSlice changes timed on the API server [default: 200; --quick: 20].
    #[arg(long, value_name = "N")]
    api_events: Option<u32>,
    /// Endpoint changes of the socket LB timed at each size (manifests) [default: 100;
    /// --quick: 10]; kube-proxy's layouts take 3 (2 with --quick).
    #[arg(long, value_name = "N")]
    agent_changes: Option<u32>,
    /// iptables backends to compare (legacy, nft).
    #[arg(long, value_delimiter = ',', default_values = ["legacy"], value_parser = ["legacy", "nft"])]
    iptables: Vec<String>,
    /// Instead of the sweep: SIGKILL the agent and start it again under a steady connection
    /// load (`lb-lifecycle`), and report failed connections and the longest one.
    #[arg(long)]
    lifecycle: bool,
    /// Kill-and-start cycles of --lifecycle.
    #[arg(long, value_name = "N", default_value_t = 6, requires = "lifecycle")]
    lifecycle_cycles: u32,
    /// With --lifecycle: another build of lb-agent, started on every other cycle (an
    /// upgrade, then a downgrade).
    #[arg(long, value_name = "BIN", requires = "lifecycle")]
    upgrade_to: Option<PathBuf>,
    /// Instead of the sweep: a client outside the node against a NodePort, direct to the pod,
    /// through tc and through XDP (`--nodeport-acceleration native`) in the same run, with
    /// each program's ns per run; the table goes into benchmarks.md (--rounds, --crr-ms as
    /// the run length, --workers, --out apply).
    #[arg(long)]
    nodeport: bool,
    /// Instead of the sweep: the tc datapath's conntrack under a spoofed SYN flood of ten
    /// times the established table, at the agent's default table sizes (--quick: small
    /// ones): idle connections' survival, new connections meanwhile, the tables and
    /// counters after, how long the junk lasts; the table goes into benchmarks.md.
    #[arg(long)]
    flood: bool,
    /// Measure nothing: write the report again from the raw results of the last run
    /// (target/bench/results.json, or results-quick.json with --quick; with --out, the
    /// results.json there).
    #[arg(long)]
    report_only: bool,
    /// Instead of the sweep, the churn soak: 10,000 Services under 500 API writes/s for 10
    /// minutes while clients connect (release agent); fails on any failed connection or
    /// leaked map entry. With --quick: 1,000 Services, 100/s, 20 s, debug agent.
    #[arg(long)]
    soak: bool,
    /// Soak: Services [default: 10000; --quick: 1000].
    #[arg(long, value_name = "N", requires = "soak")]
    soak_services: Option<usize>,
    /// Soak: API writes per second [default: 500; --quick: 100].
    #[arg(long, value_name = "N", requires = "soak")]
    soak_rate: Option<u64>,
    /// Soak: seconds of changes [default: 600; --quick: 20].
    #[arg(long, value_name = "SECONDS", requires = "soak")]
    soak_duration: Option<u64>,
}

/// The settings of a run, as the report states them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub quick: bool,
    pub services: Vec<usize>,
    pub endpoints: Vec<usize>,
    pub cap_s: u64,
    pub rounds: usize,
    pub crr_ms: u64,
    pub other_ms: u64,
    pub workers: usize,
    pub changes: u32,
    /// Endpoint changes timed through the socket LB's manifests.
    #[serde(default)]
    pub agent_changes: u32,
    /// The run on the API server: Services (0: none), endpoints, changes.
    #[serde(default)]
    pub api_services: usize,
    #[serde(default)]
    pub api_endpoints: usize,
    #[serde(default)]
    pub api_events: u32,
    pub variants: Vec<Variant>,
    pub profile: String,
}

impl Settings {
    fn new(args: &Args) -> Result<Self> {
        let quick = args.quick;
        let pick = |given: &[usize], full: &[usize], quick_default: &[usize]| {
            if !given.is_empty() {
                given.to_vec()
            } else if quick {
                quick_default.to_vec()
            } else {
                full.to_vec()
            }
        };
        let services = pick(&args.services, FULL_SERVICES, QUICK_SERVICES);
        let endpoints = pick(&args.endpoints, ENDPOINTS, ENDPOINTS);
        ensure!(
            services.iter().all(|&n| n > 0),
            "Service counts must be at least 1"
        );
        ensure!(
            endpoints
                .iter()
                .all(|&e| (1..=usize::from(BACKENDS)).contains(&e)),
            "endpoints per Service must be 1 to {BACKENDS} (each measured endpoint is a real pod)"
        );
        let crr_ms = args.crr_ms.unwrap_or(if quick { 200 } else { 800 });
        let mut variants = vec![Variant::Direct, Variant::Socket, Variant::Tc];
        if args.iptables.iter().any(|b| b == "legacy") {
            variants.push(Variant::IptablesLegacy);
        }
        if args.iptables.iter().any(|b| b == "nft") {
            variants.push(Variant::IptablesNft);
        }
        variants.push(Variant::Nftables);
        let largest = |sizes: &[usize]| sizes.iter().copied().max().unwrap_or(0);
        Ok(Self {
            agent_changes: args
                .agent_changes
                .unwrap_or(if quick { 10 } else { 100 })
                .max(1),
            api_services: args.api_services.unwrap_or_else(|| largest(&services)),
            api_endpoints: largest(&endpoints),
            api_events: args.api_events.unwrap_or(if quick { 20 } else { 200 }),
            quick,
            services,
            endpoints,
            cap_s: args.cap,
            rounds: args.rounds.unwrap_or(if quick { 2 } else { 5 }).max(1),
            crr_ms,
            other_ms: (crr_ms / 2).max(50),
            workers: args.workers.max(1),
            changes: if quick { 2 } else { 3 },
            variants,
            profile: if quick { "dev" } else { "release" }.to_owned(),
        })
    }

    fn cap(&self) -> Duration {
        Duration::from_secs(self.cap_s)
    }

    fn duration_ms(&self, workload: Workload) -> u64 {
        if workload == Workload::TcpCrr {
            self.crr_ms
        } else {
            self.other_ms
        }
    }
}

/// Everything the report needs: settings, machine and results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub settings: Settings,
    pub machine: report::Machine,
    pub configs: Vec<ConfigResult>,
    /// The agent holding no Service (manifests source).
    #[serde(default)]
    pub empty_agent: Option<EmptyAgent>,
    /// What programs that do nothing cost at the datapath's hooks.
    #[serde(default)]
    pub empty_programs: Option<EmptyPrograms>,
    /// The agent on the (fake) API server.
    #[serde(default)]
    pub api: Option<ApiResult>,
    pub wall_s: f64,
}

pub fn run(args: &Args) -> Result<()> {
    if args.soak {
        return soak::run(&soak::Settings {
            quick: args.quick,
            services: args
                .soak_services
                .unwrap_or(if args.quick { 1_000 } else { 10_000 }),
            rate: args.soak_rate.unwrap_or(if args.quick { 100 } else { 500 }),
            duration_s: args
                .soak_duration
                .unwrap_or(if args.quick { 20 } else { 600 }),
        });
    }
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None if args.quick => crate::target_dir().join("bench-quick"),
        None => crate::repo_root().join("docs"),
    };
    if args.nodeport {
        return nodeport::run(&nodeport::Settings {
            quick: args.quick,
            rounds: args.rounds.unwrap_or(if args.quick { 2 } else { 5 }),
            duration_ms: args.crr_ms.unwrap_or(if args.quick { 300 } else { 2000 }),
            workers: args.workers,
            out: out.clone(),
        });
    }
    if args.flood {
        return flood::run(&flood::Settings {
            quick: args.quick,
            out: out.clone(),
        });
    }
    if args.lifecycle {
        return lifecycle::run(&lifecycle::Settings {
            quick: args.quick,
            cycles: args.lifecycle_cycles,
            upgrade_to: args.upgrade_to.clone(),
        });
    }
    if args.report_only {
        let file = raw_file(args.out.as_deref(), args.quick);
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {} (run the bench first)", file.display()))?;
        let outcome: Outcome = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench result", file.display()))?;
        report::write(&out, &outcome)?;
        println!("report: {}", out.join("benchmarks.md").display());
        return Ok(());
    }
    host::require_root("`cargo xtask bench` (network namespaces, cgroups, eBPF, netfilter)")?;
    let settings = Settings::new(args)?;
    install::ensure_build_prereqs()?;
    install::ensure_apt(BENCH_APT_PACKAGES)?;
    let bin_dir = build_binaries(&settings)?;
    let paths = Paths {
        agent_cgroup: host::cgroup2_root()?.join(lab::PREFIX),
        plain_cgroup: host::cgroup2_root()?.join(format!("{}-plain", lab::PREFIX)),
        agent_bin: bin_dir.join("lb-agent"),
        loadgen_bin: bin_dir.join("lb-loadgen"),
    };
    let machine = report::Machine::describe(&settings);
    let started = Instant::now();
    let lab = lab::start(paths)?;
    let mut bench = Bench::new(&lab, settings.clone());
    let result = bench.set_up().and_then(|()| bench.sweep());
    if result.is_err() {
        lab.defer_to_signal_handler();
        eprintln!("logs stay in {}", Paths::logs().display());
    }
    let configs = std::mem::take(&mut bench.results);
    let empty_agent = bench.empty_agent.take();
    let empty_programs = bench.empty_programs.take();
    drop(bench);
    drop(lab);
    if result.is_ok() {
        // The logs are kept only when something went wrong.
        lab::remove_run_dir();
    }
    // On its own namespaces, after the lab is gone: one agent on the machine at a time.
    let mut api = None;
    let result = result.and_then(|()| {
        api = run_api_bench(&settings, &bin_dir)?;
        Ok(())
    });
    let outcome = Outcome {
        settings,
        machine,
        configs,
        empty_agent,
        empty_programs,
        api,
        wall_s: started.elapsed().as_secs_f64(),
    };
    save_raw(&outcome, args.out.as_deref())?;
    result?;
    report::write(&out, &outcome)?;
    // Cluster DNS against dnsmasq, in a lab of its own (one agent at a time).
    let dns_sizes: &[usize] = if args.quick {
        &[1000]
    } else {
        &[1000, 100_000]
    };
    crate::dns_bench::measure(&bin_dir, dns_sizes, args.quick, &out)?;
    println!(
        "\nbench finished in {:.0} s; report: {}",
        outcome.wall_s,
        out.join("benchmarks.md").display()
    );
    Ok(())
}

/// `lb-agent`, `lb-loadgen` and `lb-watch-bench`, release for the full run (debug for --quick,
/// which only keeps the bench working); returns their directory.
fn build_binaries(settings: &Settings) -> Result<PathBuf> {
    let mut builds: Vec<&[&str]> = vec![&["-p", "lb-agent", "-p", "loadgen", "--bins"]];
    if settings.api_services > 0 {
        // Its own build: together, cargo would unify features and rebuild the agent.
        builds.push(&["-p", "lb-tests", "--bin", "lb-watch-bench"]);
    }
    for packages in builds {
        let mut build = cmd::cargo();
        build.arg("build").args(packages);
        if settings.profile == "release" {
            build.arg("--release");
        }
        println!("==> {}", cmd::describe(&build));
        cmd::run(&mut build)?;
    }
    let profile = if settings.profile == "release" {
        "release"
    } else {
        "debug"
    };
    Ok(crate::target_dir().join(profile))
}

/// `lb-agent` and `lb-loadgen`, release unless `quick` (which only keeps a bench working);
/// returns their directory. For the benches beside the sweep (lifecycle, NodePort).
fn build_agent_and_loadgen(quick: bool) -> Result<PathBuf> {
    let mut build = cmd::cargo();
    build.args(["build", "-p", "lb-agent", "-p", "loadgen"]);
    if !quick {
        build.arg("--release");
    }
    println!("==> {}", cmd::describe(&build));
    cmd::run(&mut build)?;
    Ok(crate::target_dir().join(if quick { "debug" } else { "release" }))
}

/// The agent on the (fake) API server at `settings.api_services` × `api_endpoints`:
/// `lb-watch-bench --json` (tests crate) in namespaces of its own, bounded in time.
fn run_api_bench(settings: &Settings, bin_dir: &Path) -> Result<Option<ApiResult>> {
    if settings.api_services == 0 {
        return Ok(None);
    }
    let (services, endpoints) = (settings.api_services, settings.api_endpoints);
    println!("==> the agent on the API server: {services} Services × {endpoints} endpoints");
    let mut command = Command::new(bin_dir.join("lb-watch-bench"));
    command
        .args(["--json", "--services", &services.to_string()])
        .args(["--endpoints", &endpoints.to_string()])
        .args(["--events", &settings.api_events.to_string()])
        .args(["--sync-timeout", &settings.cap_s.to_string()])
        .env("LB_AGENT_BIN", bin_dir.join("lb-agent"))
        .env("NO_COLOR", "1");
    // Listing the objects into the fake API server, the empty agent, the sync under the cap,
    // then each event within 10 s.
    let limit = Duration::from_secs(180 + 2 * settings.cap_s + 10 * u64::from(settings.api_events));
    let line = cmd::describe(&command);
    let Bounded::Finished { stdout, took } = bounded(command, None, limit)? else {
        bail!("`{line}` did not finish within {limit:?}");
    };
    let result: ApiResult = serde_json::from_str(stdout.trim())
        .with_context(|| format!("`{line}` printed {stdout:?}"))?;
    let p99 = |values: &[u64]| {
        let values: Vec<f64> = values.iter().map(|&us| us as f64).collect();
        results::percentile(&values, 99).unwrap_or(0.0) / 1e3
    };
    println!(
        "   in {:.0} s: synced in {:.2} s, event → map p99 {:.2} ms, {:.0} B of RSS per Service",
        took.as_secs_f64(),
        result.sync_s,
        p99(&result.event_us),
        results::per_service(
            result.rss_after_kib * 1024,
            result.rss_empty_kib * 1024,
            services
        )
    );
    Ok(Some(result))
}

/// Where the raw results of a run go: next to the build output, not in docs/; a run with
/// its own `--out` (not docs/) keeps them beside its report, so a trial run leaves the last
/// sweep's results (what `--report-only` rebuilds docs/benchmarks.md from) as they were.
fn raw_file(out: Option<&Path>, quick: bool) -> PathBuf {
    if let Some(dir) = out.filter(|dir| *dir != crate::repo_root().join("docs")) {
        return dir.join("results.json");
    }
    let name = if quick {
        "results-quick.json"
    } else {
        "results.json"
    };
    crate::target_dir().join("bench").join(name)
}

fn save_raw(outcome: &Outcome, out: Option<&Path>) -> Result<()> {
    let file = raw_file(out, outcome.settings.quick);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&file, serde_json::to_string_pretty(outcome)?)
        .with_context(|| format!("cannot write {}", file.display()))?;
    println!("raw results: {}", file.display());
    Ok(())
}

struct Bench<'a> {
    lab: &'a Lab,
    settings: Settings,
    backends: Vec<Ipv4Addr>,
    results: Vec<ConfigResult>,
    /// The tc client pod's veth (node end), where the tc LB's agent attaches.
    tc_device: Option<String>,
    /// Variants stopped at (services, endpoints), and why: they are skipped at every size at
    /// least as large.
    stopped: Vec<(Variant, usize, usize, String)>,
    /// The direct client pod's veth (node end), where the empty tc program is measured.
    direct_device: Option<String>,
    /// The agent with no Service, measured by `set_up`.
    empty_agent: Option<EmptyAgent>,
    /// What empty programs cost at the datapath's hooks, measured by `set_up`.
    empty_programs: Option<EmptyPrograms>,
    started: Instant,
}

impl<'a> Bench<'a> {
    fn new(lab: &'a Lab, settings: Settings) -> Self {
        Self {
            lab,
            settings,
            backends: (1..=BACKENDS)
                .map(|h| Ipv4Addr::new(10, 244, 1, h))
                .collect(),
            results: Vec::new(),
            tc_device: None,
            direct_device: None,
            stopped: Vec::new(),
            empty_agent: None,
            empty_programs: None,
            started: Instant::now(),
        }
    }

    fn paths(&self) -> &Paths {
        self.lab.paths()
    }

    fn say(&self, what: &str) {
        println!("[{:>5.0} s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// Backend pods with their echo servers, one client pod per variant, the node routing (for
    /// the tc LB), BPF statistics on.
    fn set_up(&mut self) -> Result<()> {
        self.say("setting up the node, 10 backend pods and the client pods");
        for (i, &ip) in self.backends.iter().enumerate() {
            let netns = format!("{}-be{i}", lab::PREFIX);
            self.lab.add_pod_netns(&netns, ip)?;
            let mut server = Command::new(&self.paths().loadgen_bin);
            server.args(["--netns", &netns, "serve"]).args([
                "--tcp",
                &scenario::TCP_TARGET_PORT.to_string(),
                "--udp",
                &scenario::UDP_TARGET_PORT.to_string(),
            ]);
            let name = format!("server-be{i}");
            self.lab.spawn(&name, server)?;
            self.wait_listening(&name)?;
        }
        let variants = self.settings.variants.clone();
        for (host, variant) in (FIRST_CLIENT_HOST..).zip(variants) {
            let netns = variant.netns();
            let device = self
                .lab
                .add_pod_netns(netns, Ipv4Addr::new(10, 244, 0, host))?;
            match variant {
                Variant::Tc => self.tc_device = Some(device),
                Variant::Direct => self.direct_device = Some(device),
                _ => {}
            }
            // Many short connections from one address: reuse TIME_WAIT ports, use them all.
            lab::sysctl_in(netns, "net.ipv4.tcp_tw_reuse", "1")?;
            lab::sysctl_in(netns, "net.ipv4.ip_local_port_range", "1024 65535")?;
        }
        lab::enable_forwarding()?;
        lab::enable_bpf_stats()?;
        self.measure_empty_agent()?;
        self.measure_empty_programs()
    }

    /// Empty programs at the hooks of the datapath's, during a second of direct connections:
    /// what the kernel charges any program there (see `empty_programs`).
    fn measure_empty_programs(&mut self) -> Result<()> {
        let Some(device) = self.direct_device.clone() else {
            return Ok(());
        };
        let attached = empty_programs::Attached::attach(
            &Path::new(lab::PIN_DIR).join("empty-programs"),
            &self.paths().plain_cgroup,
            lab::NODE_NETNS,
            &device,
        )?;
        let scenario = Scenario::new(1, 1, &self.backends);
        let mut command = self.client(Variant::Direct, &scenario, Workload::TcpCrr);
        command.args(["--duration-ms", "1000"]);
        let before = attached.stats()?;
        let summary = self.load(command, Duration::from_secs(20))?;
        ensure!(
            summary.errors == 0,
            "direct connections with the empty programs failed: {}",
            summary.first_error.unwrap_or_default()
        );
        let cost = empty_programs::per_call(&attached.stats()?.since(&before))?;
        drop(attached);
        self.say(&format!(
            "   empty programs: connect4 {:.0} ns per call, tc {:.0} ns per packet",
            cost.connect4_ns, cost.tc_ns
        ));
        self.empty_programs = Some(cost);
        Ok(())
    }

    /// The socket LB's agent on an empty manifests directory: its RSS and map memory once
    /// ready (idle bucket arrays and preallocated maps included), the baseline the
    /// per-Service figures are taken from.
    fn measure_empty_agent(&mut self) -> Result<()> {
        let dir = Paths::run_dir().join("empty");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let agent = Agent::start_socket(self.lab, &dir)?;
        agent
            .wait_ready(self.lab, Duration::from_secs(60))?
            .context("the agent with no Service was not ready within 60 s")?;
        check_agent_log(&agent)?;
        // Let it settle (it hands its free heap back after attaching).
        std::thread::sleep(Duration::from_millis(500));
        let rss_kib = agent.rss_kib().context("no RSS for the empty agent")?;
        let maps = agent::pinned_maps(Path::new(lab::PIN_DIR))?;
        self.lab.stop(agent.name())?;
        lab::remove_all_pins(self.paths());
        let empty = EmptyAgent { rss_kib, maps };
        self.say(&format!(
            "   the agent with no Service: RSS {rss_kib} KiB, BPF maps {:.1} MiB",
            empty.map_bytes() as f64 / 1048576.0
        ));
        self.empty_agent = Some(empty);
        Ok(())
    }

    fn wait_listening(&self, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(Paths::log(name)).unwrap_or_default();
            if log.lines().any(|l| l.trim() == "listening") {
                return Ok(());
            }
            if let Some(status) = self.lab.exited(name) {
                bail!("{name} exited ({status}): {log}");
            }
            ensure!(
                Instant::now() < deadline,
                "{name} did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sweep(&mut self) -> Result<()> {
        let sizes: Vec<(usize, usize)> = self
            .settings
            .services
            .iter()
            .flat_map(|&n| self.settings.endpoints.iter().map(move |&e| (n, e)))
            .collect();
        for (at, &(services, endpoints)) in sizes.iter().enumerate() {
            self.say(&format!(
                "== {}/{}: {services} Services × {endpoints} endpoints",
                at + 1,
                sizes.len()
            ));
            let scenario = Scenario::new(services, endpoints, &self.backends);
            let mut config = ConfigResult::new(services, endpoints);
            let result = self.measure_config(&scenario, &mut config);
            let reset = self.reset();
            self.results.push(config);
            result?;
            reset?;
        }
        Ok(())
    }

    fn skip_reason(&self, variant: Variant, scenario: &Scenario) -> Option<String> {
        if let Some((_, n, e, why)) = self.stopped.iter().find(|(v, n, e, _)| {
            *v == variant && *n <= scenario.services && *e <= scenario.endpoints
        }) {
            return Some(if (*n, *e) == (scenario.services, scenario.endpoints) {
                why.clone()
            } else {
                format!("stopped at {n} × {e}: {why}")
            });
        }
        None
    }

    fn stop_variant(&mut self, variant: Variant, scenario: &Scenario, why: String) {
        self.say(&format!("   {} stops here: {why}", variant.label()));
        self.stopped
            .push((variant, scenario.services, scenario.endpoints, why));
    }

    fn measure_config(&mut self, scenario: &Scenario, config: &mut ConfigResult) -> Result<()> {
        let mut active = Vec::new();
        let mut agents = BTreeMap::new();
        for &variant in &self.settings.variants.clone() {
            if let Some(why) = self.skip_reason(variant, scenario) {
                config.variant(variant).skipped = Some(why);
                continue;
            }
            if !variant.programs() {
                active.push(variant);
                continue;
            }
            match self.program(variant, scenario, config)? {
                Programming::Done(started_agent) => {
                    if let Some(started) = started_agent {
                        agents.insert(variant, started);
                    }
                    active.push(variant);
                }
                Programming::OverCap(why) | Programming::DoesNotFit(why) => {
                    config.variant(variant).skipped = Some(why.clone());
                    self.stop_variant(variant, scenario, why);
                }
            }
        }
        let mut ids = BTreeMap::new();
        if agents.contains_key(&Variant::Socket) {
            let attached = agent::attached_programs(&self.paths().agent_cgroup)?;
            ids.insert(Variant::Socket, attached);
        }
        if agents.contains_key(&Variant::Tc) {
            let linked = agent::linked_programs(Path::new(lab::TC_PIN_DIR))?;
            ensure!(!linked.is_empty(), "the tc agent attached no program");
            ids.insert(Variant::Tc, linked);
        }
        for &variant in &active {
            self.probe(variant, scenario)
                .with_context(|| format!("{} does not work at this size", variant.label()))?;
        }
        let agent = agents.get(&Variant::Socket);
        let cpu_before = agent.and_then(Agent::cpu);
        let began = Instant::now();
        self.data_path(scenario, &active, &ids, config)?;
        config.data_path_s = began.elapsed().as_secs_f64();
        self.monitor_cost(scenario, &active, &ids, config)?;
        if let (Some(before), Some(after)) = (cpu_before, agent.and_then(Agent::cpu)) {
            config.agent_cpu_s = Some(after.saturating_sub(before).as_secs_f64());
        }
        // The tc agent's work is done (its programs stay attached): stopped now, it does not
        // re-read the changed manifests beside the socket agent while that one is timed.
        if let Some(tc_agent) = agents.get(&Variant::Tc) {
            check_agent_log(tc_agent)?;
            self.lab.stop(tc_agent.name())?;
        }
        for &variant in active.iter().filter(|v| v.control_plane_timed()) {
            self.changes(variant, scenario, agent, config)?;
        }
        if let Some(agent) = agent {
            config.agent_rss_kib = agent.rss_kib();
            config.agent_peak_kib = agent.peak_kib();
            if let Some(cpu) = config.agent_cpu_s {
                self.say(&format!(
                    "   lb-agent used {cpu:.2} s of CPU during {:.0} s of runs",
                    config.data_path_s
                ));
            }
            config.maps = agent::pinned_maps(Path::new(lab::PIN_DIR))?;
            check_agent_log(agent)?;
        }
        config.load_average = load_average();
        self.print_summary(config, &active);
        Ok(())
    }

    /// Programs every Service from nothing and times it.
    fn program(
        &self,
        variant: Variant,
        scenario: &Scenario,
        config: &mut ConfigResult,
    ) -> Result<Programming> {
        let over_cap = || self.over_cap(scenario);
        match variant {
            Variant::Socket | Variant::Tc => self.start_agent(variant, scenario, config),
            Variant::IptablesLegacy | Variant::IptablesNft => {
                let backend = iptables_backend(variant);
                let file = self.input_file(variant, "full", &kubeproxy::iptables_full(scenario))?;
                let mut restore = lab::in_netns(variant.netns(), backend.restore_bin());
                restore.arg("--noflush");
                self.timed_program(variant, restore, &file, config)
                    .map(|done| {
                        if done {
                            Programming::Done(None)
                        } else {
                            over_cap()
                        }
                    })
            }
            Variant::Nftables => {
                let file = self.input_file(variant, "full", &kubeproxy::nft_full(scenario))?;
                let mut nft = lab::in_netns(variant.netns(), "nft");
                nft.arg("-f").arg(&file);
                self.timed_program(variant, nft, &file, config).map(|done| {
                    if done {
                        Programming::Done(None)
                    } else {
                        over_cap()
                    }
                })
            }
            Variant::Direct => Ok(Programming::Done(None)),
        }
    }

    fn over_cap(&self, scenario: &Scenario) -> Programming {
        Programming::OverCap(format!(
            "programming {} × {} took longer than the {} s cap",
            scenario.services, scenario.endpoints, self.settings.cap_s
        ))
    }

    /// Starts the agent of the socket or the tc LB on the scenario's manifests (written by the
    /// first of them) and waits until it is ready; the socket LB's time is the programming
    /// time the report shows.
    fn start_agent(
        &self,
        variant: Variant,
        scenario: &Scenario,
        config: &mut ConfigResult,
    ) -> Result<Programming> {
        let dir = Paths::run_dir().join("manifests");
        if !dir.exists() {
            scenario.write_manifests(&dir)?;
        }
        let agent = if variant == Variant::Tc {
            let device = self.tc_device.as_deref().context("no tc client pod")?;
            Agent::start_tc(self.lab, &dir, device)?
        } else {
            Agent::start_socket(self.lab, &dir)?
        };
        let Some(ready) = agent.wait_ready(self.lab, self.settings.cap())? else {
            self.lab.stop_if_running(agent.name());
            return Ok(self.over_cap(scenario));
        };
        // What the agent says it could not fit: this size is over its capacity (its flags'
        // defaults), in its own words.
        if let Some(refusal) = agent.refusals().first() {
            self.lab.stop_if_running(agent.name());
            return Ok(Programming::DoesNotFit(format!(
                "does not fit: the agent reports {refusal}"
            )));
        }
        check_agent_log(&agent)?;
        let done = ready
            .first
            .context("the agent is ready but logged no `maps updated`")?;
        let expected = scenario.services + 1; // the measured Service's UDP port
        ensure!(
            done.frontends == expected,
            "lb-agent ({}) programmed {} frontends, expected {expected}",
            agent.name(),
            done.frontends
        );
        let write_s = Duration::from_micros(done.elapsed_us).as_secs_f64();
        self.say(&format!(
            "   {}: ready after {:.3} s (map writes {write_s:.3} s), RSS {} KiB",
            variant.label(),
            ready.ready_s,
            agent.rss_kib().unwrap_or(0)
        ));
        if variant.control_plane_timed() {
            let result = config.variant(variant);
            result.program_s = Some(ready.ready_s);
            result.program_write_s = Some(write_s);
        }
        Ok(Programming::Done(Some(agent)))
    }

    fn input_file(&self, variant: Variant, what: &str, text: &str) -> Result<PathBuf> {
        let dir = Paths::run_dir().join("rules");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let file = dir.join(format!("{}-{what}.txt", variant.netns()));
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
        Ok(file)
    }

    /// Runs a restore with `input` on stdin under the cap; false when over it.
    fn timed_program(
        &self,
        variant: Variant,
        command: Command,
        input: &Path,
        config: &mut ConfigResult,
    ) -> Result<bool> {
        let size = std::fs::metadata(input).map_or(0, |m| m.len());
        match bounded(command, Some(input), self.settings.cap())? {
            Bounded::Finished { took, .. } => {
                self.say(&format!(
                    "   {}: loaded {:.1} MB of rules in {:.3} s",
                    variant.label(),
                    mb(size),
                    took.as_secs_f64()
                ));
                config.variant(variant).program_s = Some(took.as_secs_f64());
                Ok(true)
            }
            Bounded::TimedOut => Ok(false),
        }
    }

    /// The loadgen command for `variant`: its client pod, in the agent's cgroup only for the
    /// socket LB.
    fn client(&self, variant: Variant, scenario: &Scenario, workload: Workload) -> Command {
        let paths = self.paths();
        let cgroup = if variant == Variant::Socket {
            &paths.agent_cgroup
        } else {
            &paths.plain_cgroup
        };
        let proto = if workload.is_udp() {
            Proto::Udp
        } else {
            Proto::Tcp
        };
        let targets: Vec<SocketAddr> = if variant == Variant::Direct {
            scenario.direct_targets(proto)
        } else {
            vec![scenario.measured_target(proto)]
        };
        let mut command = Command::new(&paths.loadgen_bin);
        command
            .arg("--cgroup")
            .arg(cgroup)
            .args([
                "--netns",
                variant.netns(),
                "run",
                "--workload",
                workload.arg(),
            ])
            .args(["--workers", &self.settings.workers.to_string()]);
        for target in targets {
            command.args(["--target", &target.to_string()]);
        }
        command
    }

    fn load(&self, command: Command, limit: Duration) -> Result<Summary> {
        let line = cmd::describe(&command);
        match bounded(command, None, limit)? {
            Bounded::Finished { stdout, .. } => serde_json::from_str(stdout.trim())
                .with_context(|| format!("`{line}` printed {stdout:?}")),
            Bounded::TimedOut => bail!("`{line}` did not finish within {limit:?}"),
        }
    }

    /// A few operations of each kind, all of which must succeed (and warm up ARP and caches).
    fn probe(&self, variant: Variant, scenario: &Scenario) -> Result<()> {
        for workload in [Workload::TcpCrr, Workload::UdpUnconnected] {
            let mut command = self.client(variant, scenario, workload);
            command.args(["--count", "50", "--duration-ms", "5000"]);
            let summary = self.load(command, PLUMBING_LIMIT)?;
            ensure!(
                summary.ops == 50 && summary.errors == 0 && summary.foreign_replies == 0,
                "{}: {} of 50 succeeded, {} failed ({}), {} replies from another address",
                workload.arg(),
                summary.ops,
                summary.errors,
                summary.first_error.unwrap_or_default(),
                summary.foreign_replies
            );
        }
        Ok(())
    }

    /// Rounds × workloads × variants, the variants in a rotated order each round.
    fn data_path(
        &self,
        scenario: &Scenario,
        active: &[Variant],
        ids: &BTreeMap<Variant, BTreeSet<u32>>,
        config: &mut ConfigResult,
    ) -> Result<()> {
        let rounds = self.settings.rounds;
        for round in 0..rounds {
            let mut order = active.to_vec();
            order.rotate_left(round % active.len().max(1));
            for workload in Workload::ALL {
                for &variant in &order {
                    let ms = self.settings.duration_ms(workload);
                    let mut command = self.client(variant, scenario, workload);
                    command.args(["--duration-ms", &ms.to_string()]);
                    // The programs of the variant's own agent, if it has one.
                    let programs = ids.get(&variant);
                    let before = programs.map(agent::prog_stats).transpose()?;
                    let summary =
                        self.load(command, Duration::from_millis(ms) + Duration::from_secs(15))?;
                    let bpf = match (programs, before) {
                        (Some(programs), Some(before)) => {
                            let during = agent::prog_stats(programs)?.since(&before);
                            config.bpf_mut(variant).add(&during);
                            Some(during)
                        }
                        _ => None,
                    };
                    config.variant(variant).runs.push(Run {
                        round,
                        workload,
                        summary,
                        bpf,
                    });
                }
            }
            self.say(&format!("   round {}/{rounds} done", round + 1));
        }
        Ok(())
    }

    /// The decision monitor's cost: for each agent variant, a TCP connect/request/close run
    /// with no monitor, then one with `lb-agent monitor` reading (its output to its log).
    fn monitor_cost(
        &self,
        scenario: &Scenario,
        active: &[Variant],
        ids: &BTreeMap<Variant, BTreeSet<u32>>,
        config: &mut ConfigResult,
    ) -> Result<()> {
        for (variant, pin_dir) in [
            (Variant::Socket, lab::PIN_DIR),
            (Variant::Tc, lab::TC_PIN_DIR),
        ] {
            let Some(programs) = ids.get(&variant).filter(|_| active.contains(&variant)) else {
                continue;
            };
            let mut cost = results::MonitorCost::default();
            for on in [false, true] {
                if on {
                    let mut monitor = Command::new(&self.paths().agent_bin);
                    monitor
                        .args(["monitor", "--output", "json", "--bpf-pin-path", pin_dir])
                        .env("RUST_LOG", "info");
                    self.lab.spawn(MONITOR, monitor)?;
                    self.wait_logged(MONITOR, "monitor on")?;
                }
                let ms = self.settings.duration_ms(Workload::TcpCrr);
                let mut command = self.client(variant, scenario, Workload::TcpCrr);
                command.args(["--duration-ms", &ms.to_string()]);
                let before = agent::prog_stats(programs)?;
                self.load(command, Duration::from_millis(ms) + Duration::from_secs(15))?;
                let during = agent::prog_stats(programs)?.since(&before);
                if on {
                    self.lab.stop(MONITOR)?;
                    let log = std::fs::read_to_string(Paths::log(MONITOR)).unwrap_or_default();
                    cost.decisions = log.lines().filter(|l| l.starts_with('{')).count() as u64;
                    cost.on = during;
                } else {
                    cost.off = during;
                }
            }
            self.say(&format!(
                "   {} with the monitor on: {} decisions shown",
                variant.label(),
                cost.decisions
            ));
            config.monitor.insert(variant, cost);
        }
        Ok(())
    }

    /// Waits until the log of `name` has a line containing `text`.
    fn wait_logged(&self, name: &str, text: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(Paths::log(name)).unwrap_or_default();
            if log.contains(text) {
                return Ok(());
            }
            if let Some(status) = self.lab.exited(name) {
                bail!("{name} exited ({status}): {log}");
            }
            ensure!(
                Instant::now() < deadline,
                "{name} did not log {text:?} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Times single-endpoint changes of Service 0: `settings.agent_changes` through the
    /// socket LB's manifests, `settings.changes` for kube-proxy's layouts (each a restore).
    fn changes(
        &self,
        variant: Variant,
        scenario: &Scenario,
        agent: Option<&Agent>,
        config: &mut ConfigResult,
    ) -> Result<()> {
        let tries = if variant == Variant::Socket {
            self.settings.agent_changes
        } else {
            self.settings.changes
        };
        for version in 1..=tries {
            match variant {
                Variant::Socket => {
                    let agent = agent.context("no agent")?;
                    let seen = agent.updates().len();
                    let sent = SystemTime::now();
                    let began = Instant::now();
                    scenario.write_change(&Paths::run_dir().join("manifests"), version)?;
                    let update = agent.wait_update(self.lab, seen, Duration::from_secs(120))?;
                    // The log line's own time: polling the log adds nothing to the figure.
                    let took = update
                        .at
                        .and_then(|at| at.duration_since(sent).ok())
                        .unwrap_or_else(|| began.elapsed());
                    let result = config.variant(variant);
                    result.change_s.push(took.as_secs_f64());
                    result
                        .change_write_s
                        .push(Duration::from_micros(update.elapsed_us).as_secs_f64());
                }
                Variant::IptablesLegacy | Variant::IptablesNft => {
                    let text = kubeproxy::iptables_change(scenario, version);
                    let file = self.input_file(variant, "change", &text)?;
                    let mut restore =
                        lab::in_netns(variant.netns(), iptables_backend(variant).restore_bin());
                    restore.arg("--noflush");
                    let took = self.timed(restore, Some(&file))?;
                    config.variant(variant).change_s.push(took);
                }
                Variant::Nftables => {
                    let text = kubeproxy::nft_change(scenario, version);
                    let file = self.input_file(variant, "change", &text)?;
                    let mut nft = lab::in_netns(variant.netns(), "nft");
                    nft.arg("-f").arg(&file);
                    let took = self.timed(nft, None)?;
                    config.variant(variant).change_s.push(took);
                }
                Variant::Direct | Variant::Tc => {}
            }
        }
        if let Some(times) = config.variants.get(&variant).map(|v| &v.change_s) {
            let p = |p| results::percentile(times, p).unwrap_or(0.0) * 1e3;
            self.say(&format!(
                "   {}: endpoint change p50 {:.2} ms, p99 {:.2} ms ({} tries)",
                variant.label(),
                p(50),
                p(99),
                times.len()
            ));
        }
        Ok(())
    }

    fn timed(&self, command: Command, stdin: Option<&Path>) -> Result<f64> {
        match bounded(command, stdin, PLUMBING_LIMIT)? {
            Bounded::Finished { took, .. } => Ok(took.as_secs_f64()),
            Bounded::TimedOut => bail!("did not finish within {PLUMBING_LIMIT:?}"),
        }
    }

    /// Back to nothing: the agents stopped and their programs and pins removed, every table
    /// of the client pods emptied, the generated inputs deleted.
    fn reset(&self) -> Result<()> {
        self.lab.stop_if_running(lab::AGENT);
        self.lab.stop_if_running(lab::TC_AGENT);
        lab::remove_all_pins(self.paths());
        for &variant in &self.settings.variants {
            match variant {
                Variant::IptablesLegacy => {
                    let empty = self.input_file(variant, "empty", EMPTY_IPTABLES)?;
                    let restore = lab::in_netns(variant.netns(), "iptables-legacy-restore");
                    self.timed(restore, Some(&empty))?;
                }
                Variant::IptablesNft | Variant::Nftables => {
                    let mut flush = lab::in_netns(variant.netns(), "nft");
                    flush.args(["flush", "ruleset"]);
                    self.timed(flush, None)?;
                }
                Variant::Direct | Variant::Socket | Variant::Tc => {}
            }
        }
        for dir in ["manifests", "rules"] {
            let path = Paths::run_dir().join(dir);
            if path.exists() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        Ok(())
    }

    fn print_summary(&self, config: &ConfigResult, active: &[Variant]) {
        for &variant in active {
            let rate = config.rate(variant, Workload::TcpCrr);
            let ratio = config.ratio(variant, Workload::TcpCrr);
            if let Some(rate) = rate {
                let ratio = ratio.map_or(String::new(), |r| format!(" = {:.2} × direct", r.median));
                self.say(&format!(
                    "   {:<22} {:>8.0} connections/s{ratio}",
                    variant.label(),
                    rate.median
                ));
            }
        }
    }
}

/// Fails on errors the agent logged, and on warnings about what it did not program (an
/// invalid manifest or a full map would make the comparison unfair).
fn check_agent_log(agent: &Agent) -> Result<()> {
    let errors = agent.errors();
    ensure!(
        errors.is_empty(),
        "lb-agent ({}) logged errors:\n{}",
        agent.name(),
        errors.join("\n")
    );
    Ok(())
}

enum Programming {
    /// Programmed (the agent, when it was an agent).
    Done(Option<Agent>),
    /// Longer than the cap (the variant stops here).
    OverCap(String),
    /// The agent reported Services it could not fit (the variant stops here).
    DoesNotFit(String),
}

/// Replaces both tables with empty ones (and deletes the KUBE-* chains).
const EMPTY_IPTABLES: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

fn iptables_backend(variant: Variant) -> IptablesBackend {
    if variant == Variant::IptablesNft {
        IptablesBackend::Nft
    } else {
        IptablesBackend::Legacy
    }
}

/// The 1-minute load average (`/proc/loadavg`).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

enum Bounded {
    Finished { took: Duration, stdout: String },
    TimedOut,
}

/// Runs `command` (stdin from `stdin`), killing it after `limit`; fails when it exits non-zero.
/// The time is taken by a thread blocked in `wait`, so it is exact to the scheduler.
fn bounded(mut command: Command, stdin: Option<&Path>, limit: Duration) -> Result<Bounded> {
    let line = cmd::describe(&command);
    let input = match stdin {
        Some(path) => Stdio::from(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ),
        None => Stdio::null(),
    };
    command
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    lab::die_with_parent(&mut command);
    let began = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<std::io::Result<Output>>();
    std::thread::spawn(move || {
        let output = child.wait_with_output();
        let _ = tx.send(output);
    });
    let output = match rx.recv_timeout(limit) {
        Ok(output) => output,
        Err(_) => {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
            let _ = rx.recv();
            return Ok(Bounded::TimedOut);
        }
    };
    let took = began.elapsed();
    let output = output.with_context(|| format!("waiting for `{line}`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr: String = stderr.chars().take(2000).collect();
        bail!("`{line}` failed ({}): {}", output.status, stderr.trim());
    }
    Ok(Bounded::Finished {
        took,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
    })
}
