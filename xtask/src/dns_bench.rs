//! `cargo xtask dns-bench` (and the last part of `cargo xtask bench`): queries per second and
//! p99 latency of the agent's cluster DNS for Service names, with `dnsperf`, side by side
//! with `dnsmasq` serving the same names from a hosts file, at 1,000 and 100,000 Services.
//!
//! Both servers run in one network namespace (`lbdns-node`) on its loopback: the agent on
//! 127.0.0.1:53 (from a manifests directory of N Services, nothing else), dnsmasq on
//! 127.0.0.1:5300. Throughput: dnsperf as fast as the servers answer (4 clients, 200 queries
//! outstanding) over every name in a shuffled order; latency: dnsperf at a fixed rate,
//! every query's time (`-v`), p50/p99 of those. Rounds alternate the servers, medians are
//! reported. Everything is bounded in time and count and removed afterwards.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::lab::{Lab, World, in_netns};
use crate::{cmd, host, install};

const PREFIX: &str = "lbdns";
const NODE_NETNS: &str = "lbdns-node";
const PIN_DIR: &str = "/sys/fs/bpf/lbdns";
const RUN_DIR: &str = "/run/lbdns";
const AGENT_PORT: u16 = 53;
const DNSMASQ_PORT: u16 = 5300;
/// The rate of the latency runs (queries per second), well below either server's limit.
const LATENCY_QPS: u32 = 2000;
/// How long the agent may take to answer the last Service's name after it starts.
const READY_LIMIT: Duration = Duration::from_secs(600);

/// What the bench needs from apt besides the build prerequisites.
pub const APT_PACKAGES: &[&str] = &["dnsperf", "dnsmasq-base", "bind9-dnsutils", "iproute2"];

#[derive(clap::Args)]
pub struct Args {
    /// 1,000 Services, 2-second runs, one round, debug binaries.
    #[arg(long)]
    quick: bool,
    /// Service counts [default: 1000,100000; --quick: 1000].
    #[arg(long, value_delimiter = ',', value_name = "N,…")]
    services: Vec<usize>,
    /// Directory for dns.md [default: docs/, --quick: target/bench-quick/].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

struct Paths {
    cgroup: PathBuf,
    agent_bin: PathBuf,
}

impl World for Paths {
    const PREFIX: &'static str = PREFIX;
    const NODE_NETNS: &'static str = NODE_NETNS;
    const PIN_DIR: &'static str = PIN_DIR;
    const RUN_DIR: &'static str = RUN_DIR;
    const CLEANUP_WHAT: &'static str = "namespace, cgroup, pins and processes";
    const STOP_GRACE: Duration = Duration::from_secs(3);
    const STOP_POLL: Duration = Duration::from_millis(50);
    const DIE_WITH_PARENT: bool = true;
    const PIN_CLEANUP_IN_NODE: bool = true;

    fn cgroups(&self) -> Vec<&Path> {
        vec![&self.cgroup]
    }

    fn agent_bin(&self) -> &Path {
        &self.agent_bin
    }

    fn log(name: &str) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{name}.log"))
    }

    fn scratch_dir() -> PathBuf {
        Path::new(RUN_DIR).join("manifests")
    }

    fn clear_run_dir(&self) {
        crate::lab::remove_dir_if_present(Path::new(RUN_DIR));
    }
}

/// One server's figures at one size.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    qps: f64,
    p50_us: f64,
    p99_us: f64,
    lost: u64,
}

/// `cargo xtask dns-bench`.
pub fn run(args: &Args) -> Result<()> {
    host::require_root("`cargo xtask dns-bench` (a network namespace, eBPF)")?;
    install::ensure_build_prereqs()?;
    let profile = if args.quick { "dev" } else { "release" };
    let mut build = cmd::cargo();
    build.args(["build", "-p", "lb-agent", "--profile", profile]);
    cmd::run(&mut build)?;
    let bin_dir = crate::target_dir().join(if args.quick { "debug" } else { "release" });
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None if args.quick => crate::target_dir().join("bench-quick"),
        None => crate::repo_root().join("docs"),
    };
    let sizes = if !args.services.is_empty() {
        args.services.clone()
    } else if args.quick {
        vec![1000]
    } else {
        vec![1000, 100_000]
    };
    measure(&bin_dir, &sizes, args.quick, &out)
}

/// Measures both servers at each size and writes `out/dns.md`.
pub fn measure(bin_dir: &Path, sizes: &[usize], quick: bool, out: &Path) -> Result<()> {
    install::ensure_apt(APT_PACKAGES)?;
    let paths = Paths {
        cgroup: host::cgroup2_root()?.join(PREFIX),
        agent_bin: bin_dir.join("lb-agent"),
    };
    let lab = crate::lab::Lab::start(paths)?;
    let seconds = if quick { 2 } else { 10 };
    let rounds = if quick { 1 } else { 3 };
    let mut rows = Vec::new();
    for &services in sizes {
        let result = measure_size(&lab, services, seconds, rounds);
        if result.is_err() {
            lab.defer_to_signal_handler();
        }
        rows.push((services, result?));
    }
    drop(lab);
    let report = report(&rows, seconds, rounds);
    println!("\n{report}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("dns.md"), report)?;
    println!("report: {}", out.join("dns.md").display());
    Ok(())
}

fn measure_size(
    lab: &crate::lab::Lab<Paths>,
    services: usize,
    seconds: u32,
    rounds: usize,
) -> Result<(Figures, Figures)> {
    let dir = Paths::scratch_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let names: Vec<(String, String)> = (0..services)
        .map(|i| {
            let ip = cluster_ip(i);
            (format!("svc-{i}.bench.svc.cluster.local"), ip)
        })
        .collect();
    let mut yaml = String::with_capacity(services * 200);
    let mut hosts = String::with_capacity(services * 48);
    for (i, (name, ip)) in names.iter().enumerate() {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: bench\nspec:\n  clusterIP: {ip}\n  ports:\n  - port: 80\n"
        );
        let _ = writeln!(hosts, "{ip} {name}");
    }
    std::fs::write(dir.join("services.yaml"), yaml)?;
    let hosts_file = Path::new(RUN_DIR).join("hosts");
    std::fs::write(&hosts_file, hosts)?;
    // Every name once, in a shuffled order (a fixed stride through the list).
    let stride = 7919 % services.max(1);
    let mut queries = String::with_capacity(services * 40);
    let mut at = 0;
    for _ in 0..services {
        let _ = writeln!(queries, "{} A", names[at].0);
        at = (at + stride.max(1)) % services;
    }
    let query_file = Path::new(RUN_DIR).join("queries.txt");
    std::fs::write(&query_file, queries)?;

    println!("==> {services} Services: starting the agent and dnsmasq");
    let mut agent = in_netns(NODE_NETNS, &lab.paths().agent_bin);
    agent
        .arg("run")
        .arg("--manifests")
        .arg(&dir)
        .arg("--cgroup")
        .arg(&lab.paths().cgroup)
        .args(["--bpf-pin-path", PIN_DIR, "--healthz-bind-address", ""])
        .args(["--metrics-bind-address", ""])
        .args(["--dns-addr", &format!("127.0.0.1:{AGENT_PORT}")])
        .args(["--dns-no-forward", "--dns-ttl", "5"])
        .env("RUST_LOG", "warn");
    lab.spawn("agent", agent)?;
    let mut dnsmasq = in_netns(NODE_NETNS, "dnsmasq");
    dnsmasq
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
        ])
        .args(["--listen-address=127.0.0.1", "--user=root", "--local-ttl=5"])
        .arg(format!("--port={DNSMASQ_PORT}"))
        .arg(format!("--addn-hosts={}", hosts_file.display()))
        .arg("--pid-file=");
    lab.spawn("dnsmasq", dnsmasq)?;
    let last = &names[services - 1];
    let started = Instant::now();
    wait_for_answer(lab, "agent", AGENT_PORT, &last.0, &last.1, READY_LIMIT)?;
    println!(
        "the agent answers all {services} names {:.1} s after it started",
        started.elapsed().as_secs_f64()
    );
    wait_for_answer(
        lab,
        "dnsmasq",
        DNSMASQ_PORT,
        &last.0,
        &last.1,
        Duration::from_secs(60),
    )?;

    let mut lb = Vec::new();
    let mut masq = Vec::new();
    for round in 0..rounds {
        // Alternate which goes first, so drift hits both alike.
        let order = if round % 2 == 0 {
            [AGENT_PORT, DNSMASQ_PORT]
        } else {
            [DNSMASQ_PORT, AGENT_PORT]
        };
        for port in order {
            let figures = figures(port, &query_file, seconds)?;
            println!(
                "  round {}: {:<7} {:>9.0} qps  p50 {:>6.0} µs  p99 {:>6.0} µs  lost {}",
                round + 1,
                if port == AGENT_PORT { "lb" } else { "dnsmasq" },
                figures.qps,
                figures.p50_us,
                figures.p99_us,
                figures.lost
            );
            if port == AGENT_PORT {
                lb.push(figures);
            } else {
                masq.push(figures);
            }
        }
    }
    lab.stop("dnsmasq")?;
    lab.stop("agent")?;
    Ok((median(&lb), median(&masq)))
}

/// A ClusterIP for Service `i` in 10.96.0.0/12 (never .0).
fn cluster_ip(i: usize) -> String {
    let n = u32::try_from(i).unwrap_or(u32::MAX) + 1;
    format!("10.{}.{}.{}", 96 + (n >> 16), (n >> 8) & 0xff, n & 0xff)
}

/// Waits until the server started as `server` on `port` answers `name` with `ip`; fails
/// at once if the server exits (its log is in the run directory).
fn wait_for_answer<W: World>(
    lab: &Lab<W>,
    server: &str,
    port: u16,
    name: &str,
    ip: &str,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = lab.exited(server) {
            bail!(
                "the {server} exited ({status}) before it answered {name}; see {}",
                Paths::log(server).display()
            );
        }
        let out = cmd::capture(in_netns(NODE_NETNS, "dig").args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+short",
            "+tries=1",
            "+time=1",
            name,
        ]))?;
        if String::from_utf8_lossy(&out.stdout).trim() == ip {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("port {port} did not answer {name} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One throughput run and one latency run of dnsperf against `port`.
fn figures(port: u16, queries: &Path, seconds: u32) -> Result<Figures> {
    let base = |command: &mut Command| {
        command
            .args(["-s", "127.0.0.1", "-p", &port.to_string()])
            .arg("-d")
            .arg(queries)
            .args(["-l", &seconds.to_string(), "-t", "2"]);
    };
    let mut throughput = in_netns(NODE_NETNS, "dnsperf");
    base(&mut throughput);
    throughput.args(["-c", "4", "-q", "200"]);
    let text = cmd::output(&mut throughput)?;
    let qps = field(&text, "Queries per second:")
        .with_context(|| format!("no queries per second in dnsperf's output:\n{text}"))?;
    let lost = field(&text, "Queries lost:").unwrap_or_default() as u64;
    let mut latency = in_netns(NODE_NETNS, "dnsperf");
    base(&mut latency);
    latency.args(["-c", "1", "-Q", &LATENCY_QPS.to_string(), "-v"]);
    let text = cmd::output(&mut latency)?;
    // `> NOERROR svc-1.bench.svc.cluster.local A 0.000123`: each answer's time, seconds.
    let mut times: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with('>'))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    if times.is_empty() {
        bail!(
            "dnsperf -v printed no answer times:\n{}",
            &text[..text.len().min(2000)]
        );
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Ok(Figures {
        qps,
        p50_us: at(0.50),
        p99_us: at(0.99),
        lost,
    })
}

/// The first number after `label` in dnsperf's summary.
fn field(text: &str, label: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
    line.split(label)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn median(runs: &[Figures]) -> Figures {
    let pick = |f: fn(&Figures) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or_default()
    };
    Figures {
        qps: pick(|f| f.qps),
        p50_us: pick(|f| f.p50_us),
        p99_us: pick(|f| f.p99_us),
        lost: runs.iter().map(|f| f.lost).sum(),
    }
}

fn report(rows: &[(usize, (Figures, Figures))], seconds: u32, rounds: usize) -> String {
    let mut text = String::from("# Cluster DNS: lb against dnsmasq\n\n");
    let _ = writeln!(
        text,
        "`cargo xtask dns-bench`: dnsperf (Debian's 2.10) against the agent's cluster DNS and \
         against dnsmasq serving the same names from a hosts file, in one network namespace on \
         its loopback. Throughput: 4 clients, 200 queries outstanding, {seconds} s; latency: \
         {LATENCY_QPS} queries/s, each answer's time (p50, p99). Medians of {rounds} \
         alternating round(s); each name asked once per pass, in a shuffled order.\n"
    );
    text.push_str(
        "| Services | lb qps | dnsmasq qps | lb / dnsmasq | lb p50 | lb p99 | dnsmasq p50 | dnsmasq p99 | lost (lb, dnsmasq) |\n",
    );
    text.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (services, (lb, masq)) in rows {
        let _ = writeln!(
            text,
            "| {services} | {:.0} | {:.0} | {:.2}× | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {}, {} |",
            lb.qps,
            masq.qps,
            lb.qps / masq.qps.max(1.0),
            lb.p50_us,
            lb.p99_us,
            masq.p50_us,
            masq.p99_us,
            lb.lost,
            masq.lost
        );
    }
    text
}
