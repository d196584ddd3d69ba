//! `cargo xtask bench --nodeport`: a client outside the node against a NodePort, three
//! ways in the same run: straight to the pod (no agent attached: the kernel's routing
//! alone), through tc (`--nodeport-acceleration off`) and through XDP (`native`). Rounds
//! rotate the order so drift hits every path alike; the figures are medians of the rounds
//! and their ratios to the direct path. Then, with `kernel.bpf_stats_enabled` on for a
//! short pass of each (and put back after), each program's ns per run from the agent's own
//! `lb_bpf_program_*` metrics. The table goes to `docs/benchmarks.md`, between its
//! `nodeport-acceleration` markers (`--quick`: `target/bench-quick/`).
//!
//! Topology (all named `lbbnp…`, removed on success and error by [`Lab`]'s drop, and
//! whatever a killed run left at the next one's start):
//! client `192.168.150.2` ─veth─ `lbbnpext` `192.168.150.1` [node] `10.244.150.1`
//! `lbbnppod` ─veth─ pod `10.244.150.2` (the `lb-loadgen serve` backend).
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use nix::fcntl::Flock;

use super::results::Summary;
use super::sections::Marked;
use crate::lab::{in_netns, ip, ip_in, sysctl_in};
use crate::{cmd, host, install};

const NODE: &str = "lbbnp-node";
const CLIENT: &str = "lbbnp-client";
const POD: &str = "lbbnp-pod";
const EXT: &str = "lbbnpext";
const POD_DEV: &str = "lbbnppod";
const PIN_DIR: &str = "/sys/fs/bpf/lbbnp";
const NODE_IP: &str = "192.168.150.1";
const CLIENT_IP: &str = "192.168.150.2";
const POD_GW: &str = "10.244.150.1";
const POD_IP: &str = "10.244.150.2";
const NODE_PORT: u16 = 30080;
const METRICS: &str = "127.0.0.1:10249";
const WORKLOADS: [&str; 2] = ["tcp-crr", "tcp-rr"];

pub struct Settings {
    pub quick: bool,
    pub rounds: usize,
    pub duration_ms: u64,
    pub workers: usize,
    pub out: PathBuf,
}

/// The three paths.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path3 {
    Direct,
    Tc,
    Xdp,
}

impl Path3 {
    const ALL: [Self; 3] = [Self::Direct, Self::Tc, Self::Xdp];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct to the pod",
            Self::Tc => "NodePort, tc",
            Self::Xdp => "NodePort, XDP (native)",
        }
    }
}

pub fn run(settings: &Settings) -> Result<()> {
    host::require_root("`cargo xtask bench --nodeport` (network namespaces, eBPF)")?;
    let (_lock, mut lab) = Lab::open(settings.quick)?;
    let load_before = load_average();
    let mut results: Vec<(Path3, &str, Vec<Summary>)> = Vec::new();
    for round in 0..settings.rounds {
        for i in 0..Path3::ALL.len() {
            let path = Path3::ALL[(i + round) % Path3::ALL.len()];
            lab.switch_to(path)?;
            for workload in WORKLOADS {
                let summary = lab.load(path, workload, settings)?;
                println!(
                    "round {round} {:<24} {workload:<8} {:>9.0} ops/s p50 {} us",
                    path.name(),
                    summary.rate,
                    summary.p50_us
                );
                match results
                    .iter_mut()
                    .find(|(p, w, _)| *p == path && *w == workload)
                {
                    Some((_, _, runs)) => runs.push(summary),
                    None => results.push((path, workload, vec![summary])),
                }
            }
        }
    }
    let costs = [Path3::Tc, Path3::Xdp]
        .into_iter()
        .map(|path| lab.program_costs(path, settings).map(|c| (path, c)))
        .collect::<Result<Vec<_>>>()?;
    drop(lab);
    let mut table = report(settings, &results, &costs);
    let _ = writeln!(
        table,
        "\nLoad average (1 min) before and after the run: {load_before} and {} on {} CPUs: \
         on a busy machine the absolute rates move run to run; compare the ratios.",
        load_average(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    print!("\n{table}");
    SECTION.write(&settings.out.join("benchmarks.md"), &table)?;
    println!(
        "written to {}",
        settings.out.join("benchmarks.md").display()
    );
    Ok(())
}

/// The 1-minute load average (`/proc/loadavg`), as text.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// The median rate of `runs`.
fn median_rate(runs: &[Summary]) -> f64 {
    let mut rates: Vec<f64> = runs.iter().map(|s| s.rate).collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn report(
    settings: &Settings,
    results: &[(Path3, &str, Vec<Summary>)],
    costs: &[(Path3, Vec<(String, f64)>)],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## NodePort from outside the node: tc and XDP (`cargo xtask bench --nodeport`)\n\n\
         A client namespace joined to the node's external device by a veth dials \
         nodeIP:nodePort; the one backend pod sits behind a second veth. Direct: the same client \
         to the pod's address, no agent attached. tc: `--nodeport-acceleration off`; XDP: \
         `native` (veth's driver XDP). {} rounds in a rotated order, {} ms per run, {} workers; \
         medians of the rounds, and each as a ratio to the direct path of the same run. \
         `lb-loadgen` as in the sweep above ({} agent).\n",
        settings.rounds,
        settings.duration_ms,
        settings.workers,
        if settings.quick { "debug" } else { "release" }
    );
    let _ = writeln!(
        out,
        "| path | workload | ops/s (median) | × direct | p50 µs |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for workload in WORKLOADS {
        let direct = results
            .iter()
            .find(|(p, w, _)| *p == Path3::Direct && *w == workload)
            .map_or(f64::NAN, |(_, _, runs)| median_rate(runs));
        for path in Path3::ALL {
            if let Some((_, _, runs)) = results
                .iter()
                .find(|(p, w, _)| *p == path && *w == workload)
            {
                let rate = median_rate(runs);
                let mut p50: Vec<u32> = runs.iter().map(|s| s.p50_us).collect();
                p50.sort_unstable();
                let _ = writeln!(
                    out,
                    "| {} | {workload} | {rate:.0} | {:.2} | {} |",
                    path.name(),
                    rate / direct,
                    p50[p50.len() / 2]
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\nCost of each program per run (`kernel.bpf_stats_enabled`, on only for a separate \
         tcp-rr pass of each path; the agent's `lb_bpf_program_run_seconds` / `_runs`):\n"
    );
    let _ = writeln!(out, "| path | program | ns per run |");
    let _ = writeln!(out, "|---|---|---|");
    for (path, programs) in costs {
        for (program, ns) in programs {
            let _ = writeln!(out, "| {} | `{program}` | {ns:.0} |", path.name());
        }
    }
    out
}

/// This bench's section of benchmarks.md.
pub const SECTION: Marked = Marked {
    begin: "<!-- nodeport-acceleration:begin (cargo xtask bench --nodeport) -->",
    end: "<!-- nodeport-acceleration:end -->",
};

/// The bench's namespaces, processes and pins; all removed on drop. The SYN flood bench
/// (`flood.rs`) runs in it too.
pub(super) struct Lab {
    agent_bin: PathBuf,
    loadgen_bin: PathBuf,
    dir: PathBuf,
    server: Option<Child>,
    agent: Option<Child>,
}

impl Lab {
    /// Takes the benches' lock, installs and builds what the lab needs (debug binaries when
    /// `quick`), then sets the lab up; the lock is held until the first value is dropped.
    pub(super) fn open(quick: bool) -> Result<(Flock<File>, Self)> {
        let lock = super::lab::lock()?;
        install::ensure_build_prereqs()?;
        install::ensure_apt(&["iproute2", "curl", "procps"])?;
        let bins = super::build_agent_and_loadgen(quick)?;
        let mut lab = Self::new(&bins)?;
        lab.set_up()?;
        Ok((lock, lab))
    }

    fn new(bins: &Path) -> Result<Self> {
        let dir = crate::target_dir().join("bench-nodeport");
        let lab = Self {
            agent_bin: bins.join("lb-agent"),
            loadgen_bin: bins.join("lb-loadgen"),
            dir,
            server: None,
            agent: None,
        };
        lab.tear_down();
        std::fs::create_dir_all(lab.dir.join("manifests"))?;
        Ok(lab)
    }

    fn set_up(&mut self) -> Result<()> {
        for netns in [NODE, CLIENT, POD] {
            ip(&["netns", "add", netns])?;
            ip_in(netns, &["link", "set", "lo", "up"])?;
        }
        sysctl_in(NODE, "net.ipv4.ip_forward", "1")?;
        // As the sweep's clients: thousands of connections a second to one address would
        // otherwise run out of ports not in TIME_WAIT within a few runs.
        sysctl_in(CLIENT, "net.ipv4.tcp_tw_reuse", "1")?;
        sysctl_in(CLIENT, "net.ipv4.ip_local_port_range", "1024 65535")?;
        for (dev, peer, far, node_addr, far_addr) in [
            (EXT, "eth0", CLIENT, NODE_IP, CLIENT_IP),
            (POD_DEV, "eth0", POD, POD_GW, POD_IP),
        ] {
            ip_in(
                NODE,
                &[
                    "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", far,
                ],
            )?;
            ip_in(
                NODE,
                &["addr", "add", &format!("{node_addr}/24"), "dev", dev],
            )?;
            ip_in(NODE, &["link", "set", dev, "up"])?;
            ip_in(
                far,
                &["addr", "add", &format!("{far_addr}/24"), "dev", peer],
            )?;
            ip_in(far, &["link", "set", peer, "up"])?;
            ip_in(far, &["route", "add", "default", "via", node_addr])?;
        }
        let mut server = Command::new(&self.loadgen_bin);
        server
            .args(["--netns", POD, "serve", "--tcp", "8080", "--udp", "8080"])
            // Longer than the flood bench keeps its connections idle (`flood.rs`).
            .args(["--idle-s", "900"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut server = server.spawn().context("starting the echo server")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.take().context("server stdout")?),
            &mut line,
        )?;
        ensure!(line.contains("listening"), "the echo server said {line:?}");
        self.server = Some(server);
        let manifests = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: bench}}\n\
             spec:\n  type: NodePort\n  clusterIP: 10.96.150.10\n  ports:\n  \
             - {{port: 80, protocol: TCP, targetPort: 8080, nodePort: {NODE_PORT}}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: web-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nendpoints:\n- {{addresses: [{POD_IP}], conditions: {{ready: true}}}}\n\
             ports:\n- {{port: 8080, protocol: TCP}}\n"
        );
        std::fs::write(self.dir.join("manifests").join("web.yaml"), manifests)?;
        Ok(())
    }

    /// Attaches what `path` needs: nothing (direct), or the agent with or without XDP. The
    /// agent is stopped in between (its links stay; the next one swaps them or cleanup
    /// takes them).
    fn switch_to(&mut self, path: Path3) -> Result<()> {
        self.stop_agent();
        if path == Path3::Direct {
            self.cleanup();
            return self.probe(path);
        }
        self.start_agent(path == Path3::Xdp, &[])?;
        self.probe(path)
    }

    /// Starts the agent on the node (`--nodeport-acceleration native` when `xdp`, else
    /// `off`) with `extra` arguments, and waits until its programs are attached.
    pub(super) fn start_agent(&mut self, xdp: bool, extra: &[&str]) -> Result<()> {
        let mode = if xdp { "native" } else { "off" };
        let log = std::fs::File::create(self.dir.join("agent.log"))?;
        let mut agent = in_netns(NODE, &self.agent_bin);
        agent
            .arg("run")
            .arg("--manifests")
            .arg(self.dir.join("manifests"))
            .args([
                "--devices",
                EXT,
                "--socket-lb",
                "off",
                "--pod-devices",
                POD_DEV,
            ])
            .args(["--bpf-pin-path", PIN_DIR, "--healthz-bind-address", ""])
            .args([
                "--metrics-bind-address",
                METRICS,
                "--nodeport-acceleration",
                mode,
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log);
        self.agent = Some(agent.spawn().context("starting lb-agent")?);
        let links = Path::new(PIN_DIR).join("links");
        let wanted = links.join(format!("tc-ingress-{EXT}"));
        let xdp_link = links.join(format!("xdp-{EXT}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(wanted.exists() && (xdp_link.exists() == xdp)) {
            if let Some(agent) = &mut self.agent
                && let Some(status) = agent.try_wait()?
            {
                bail!(
                    "lb-agent exited ({status}); see {}",
                    self.dir.join("agent.log").display()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "lb-agent did not attach within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The NodePort as the client outside dials it.
    pub(super) fn node_port() -> String {
        format!("{NODE_IP}:{NODE_PORT}")
    }

    fn target(path: Path3) -> String {
        match path {
            Path3::Direct => format!("{POD_IP}:8080"),
            Path3::Tc | Path3::Xdp => Self::node_port(),
        }
    }

    /// 50 connections that must all succeed (and warm ARP up); retried while the agent
    /// writes its maps.
    pub(super) fn probe_node_port(&self) -> Result<()> {
        self.probe(Path3::Tc)
    }

    fn probe(&self, path: Path3) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let summary =
                self.loadgen(path, "tcp-crr", &["--count", "50", "--duration-ms", "5000"])?;
            if summary.ops == 50 && summary.errors == 0 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{}: {} of 50 connections ({:?})",
                path.name(),
                summary.ops,
                summary.first_error
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn load(&self, path: Path3, workload: &str, settings: &Settings) -> Result<Summary> {
        let summary = self.loadgen(
            path,
            workload,
            &[
                "--duration-ms",
                &settings.duration_ms.to_string(),
                "--workers",
                &settings.workers.to_string(),
            ],
        )?;
        ensure!(
            summary.errors == 0,
            "{} {workload}: {} errors ({:?})",
            path.name(),
            summary.errors,
            summary.first_error
        );
        Ok(summary)
    }

    /// `lb-loadgen` in the client's namespace (its subcommand and arguments to follow).
    pub(super) fn loadgen_in_client(&self) -> Command {
        let mut command = Command::new(&self.loadgen_bin);
        command.args(["--netns", CLIENT]);
        command
    }

    /// The client's network namespace.
    pub(super) fn client_netns() -> PathBuf {
        crate::lab::netns_path(CLIENT)
    }

    /// `lb-agent` with `args` on the bench's pins.
    pub(super) fn agent_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.agent_bin);
        command.args(args).args(["--bpf-pin-path", PIN_DIR]);
        command
    }

    fn loadgen(&self, path: Path3, workload: &str, args: &[&str]) -> Result<Summary> {
        let mut command = self.loadgen_in_client();
        command
            .args(["run", "--workload", workload])
            .args(["--target", &Self::target(path)])
            .args(args);
        let out = cmd::output(&mut command)?;
        serde_json::from_str(out.trim()).with_context(|| format!("lb-loadgen printed {out:?}"))
    }

    /// Each of the agent's programs' ns per run over a tcp-rr pass of `path`, with BPF
    /// stats on for that pass only.
    fn program_costs(&mut self, path: Path3, settings: &Settings) -> Result<Vec<(String, f64)>> {
        self.switch_to(path)?;
        let before = self.metrics()?;
        let stats = StatsOn::new()?;
        self.load(path, "tcp-rr", settings)?;
        drop(stats);
        let after = self.metrics()?;
        Ok(after
            .iter()
            .filter_map(|(name, (runs, seconds))| {
                let (runs0, seconds0) = before
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or((0.0, 0.0), |(_, v)| *v);
                let runs = runs - runs0;
                (runs > 0.0).then(|| (name.clone(), (seconds - seconds0) * 1e9 / runs))
            })
            .collect())
    }

    /// `lb_bpf_program_runs` and `lb_bpf_program_run_seconds` by program.
    fn metrics(&self) -> Result<Vec<(String, (f64, f64))>> {
        let text = cmd::output(
            in_netns(NODE, "curl").args(["-sf", &format!("http://{METRICS}/metrics")]),
        )?;
        let mut programs: Vec<(String, (f64, f64))> = Vec::new();
        for line in text.lines() {
            let (runs, rest) = if let Some(r) = line.strip_prefix("lb_bpf_program_runs_total{") {
                (true, r)
            } else if let Some(r) = line.strip_prefix("lb_bpf_program_run_seconds_total{") {
                (false, r)
            } else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let Some(name) = labels
                .strip_prefix("program=\"")
                .and_then(|l| l.strip_suffix('"'))
            else {
                continue;
            };
            let value: f64 = value.trim().parse().unwrap_or(0.0);
            let entry = match programs.iter_mut().find(|(n, _)| n == name) {
                Some(entry) => entry,
                None => {
                    programs.push((name.to_owned(), (0.0, 0.0)));
                    programs.last_mut().expect("just pushed")
                }
            };
            if runs {
                entry.1.0 = value;
            } else {
                entry.1.1 = value;
            }
        }
        Ok(programs)
    }

    fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(agent.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(agent.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    fn cleanup(&self) {
        if Path::new(PIN_DIR).exists() {
            let _ = self
                .agent_command(&["cleanup"])
                .stdout(Stdio::null())
                .status();
        }
    }

    fn tear_down(&self) {
        self.cleanup();
        for netns in [CLIENT, POD, NODE] {
            let _ = Command::new("ip")
                .args(["netns", "del", netns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agent();
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        self.tear_down();
    }
}

/// `kernel.bpf_stats_enabled=1` while held, put back as it was on drop.
struct StatsOn {
    before: String,
}

impl StatsOn {
    const KEY: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn new() -> Result<Self> {
        let before = std::fs::read_to_string(Self::KEY)?.trim().to_owned();
        std::fs::write(Self::KEY, "1")?;
        Ok(Self { before })
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::KEY, &self.before);
    }
}
