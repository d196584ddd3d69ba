//! Soak: N Services on a (fake) API server under a steady stream of changes (EndpointSlice
//! updates that move endpoints, Services deleted and created again) for a fixed time, while
//! clients connect in a loop to probe Services whose endpoints change too but always keep
//! a ready one. It fails when a single probe connection fails, or when, after the changes
//! stop, the agent's maps do not hold exactly what the live objects need (frontends and
//! their backends, and the entry count of every map: no leaked slot, backend id,
//! reverse-NAT or conntrack entry), and it prints the agent's RSS over time beside that of a
//! fresh agent on the same objects.
//!
//! Run it as root through `cargo xtask bench --soak` (release agent; `--quick` for a short
//! form), which passes `LB_AGENT_BIN`.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use fake_apiserver::ResourceKind;
use lb_tests::bpffs::agent_cleanup;
use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::{Agent, ApiServer, TestEnv, require_privileges};
use serde::Serialize;

/// Churn soak of lb-agent on a (fake) Kubernetes API server.
#[derive(Debug, Parser)]
struct Args {
    /// Services (each with one EndpointSlice of 1 to 3 endpoints).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// API writes per second (slice updates, Service deletions and creations).
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// How long the changes go on, in seconds.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Print the figures as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Probe Services the clients connect to (their endpoints are the two real pods).
const PROBES: usize = 10;
const CT_MAPS: [&str; 3] = [
    lb_common::CT_TCP_MAP,
    lb_common::CT_HALF_OPEN_MAP,
    lb_common::CT_OTHER_MAP,
];

/// What a soak measured.
#[derive(Debug, Default, Serialize)]
struct Figures {
    services: usize,
    rate: u64,
    duration_s: u64,
    /// API writes made, and the rate achieved.
    changes: u64,
    achieved_rate: f64,
    /// Probe connections made and failed (by error).
    connections: u64,
    failures: BTreeMap<String, u64>,
    /// The agent's RSS sampled every 30 s during the changes, KiB.
    rss_kib: Vec<u64>,
    /// After the changes stopped and the maps settled: the soaked agent's RSS, and a fresh
    /// agent's on the same objects (cleaned maps, restarted), KiB.
    rss_end_kib: u64,
    rss_fresh_kib: u64,
    /// Frontends the live objects need at the end.
    frontends: usize,
    /// Entries of every map after the soak, and with the fresh agent.
    entries_end: BTreeMap<String, u64>,
    entries_fresh: BTreeMap<String, u64>,
    /// Seconds from the last change to maps equal to the live objects.
    settle_s: f64,
    /// Whether every check held.
    passed: bool,
    problems: Vec<String>,
}

/// The ClusterIP of Service `i`.
fn vip(i: usize) -> String {
    format!("10.97.{}.{}", i / 250, i % 250 + 1)
}

/// The endpoints of Service `i` at `version` (1 to 3 addresses, moved by every version).
fn endpoints(i: usize, version: u32) -> Vec<IpAddr> {
    let count = 1 + (i + version as usize) % 3;
    (0..count)
        .map(|e| {
            let n = (version as usize * 3 + e) % 120;
            format!("10.{}.{}.{}", 128 + n, i / 250, i % 250 + 1)
                .parse()
                .expect("ip")
        })
        .collect()
}

/// Frontend `ip:port` → sorted backends `ip:port`.
type Table = BTreeMap<String, Vec<String>>;

/// What the API server holds, as the soak changed it.
struct Live {
    /// Version of each bulk Service's slice, or `None` while it is deleted.
    bulk: Vec<Option<u32>>,
    /// Endpoints of each probe Service (a subset of the real pods, never empty).
    probes: Vec<Vec<IpAddr>>,
}

impl Live {
    fn table(&self) -> Table {
        let mut table = Table::new();
        for (i, version) in self.bulk.iter().enumerate() {
            if let Some(v) = version {
                let mut b: Vec<String> = endpoints(i, *v)
                    .iter()
                    .map(|ip| format!("{ip}:8080"))
                    .collect();
                b.sort();
                table.insert(format!("{}:80", vip(i)), b);
            }
        }
        for (p, eps) in self.probes.iter().enumerate() {
            let mut b: Vec<String> = eps.iter().map(|ip| format!("{ip}:8080")).collect();
            b.sort();
            table.insert(format!("10.96.1.{}:80", p + 1), b);
        }
        table
    }
}

fn bulk_service(i: usize) -> k8s_openapi::api::core::v1::Service {
    service(&format!("svc-{i}"), &vip(i))
        .port_full(Some("http"), 80, 8080, "TCP")
        .build()
}

fn slice_of(name: &str, ips: &[IpAddr]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    ips.iter()
        .fold(endpoint_slice(&format!("{name}-x"), name), |s, ip| {
            s.endpoint(*ip, true)
        })
        .port(Some("http"), 8080, "TCP")
        .build()
}

/// A small xorshift (fixed seed: runs are comparable).
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound.max(1) as u64) as usize
    }
}

fn main() {
    let passed = soak(Args::parse());
    std::process::exit(i32::from(!passed));
}

/// The soak; whether it passed. Its namespaces, pins and cgroup go when it returns (the
/// guards drop here, which `process::exit` would skip).
fn soak(args: Args) -> bool {
    assert!(
        require_privileges(),
        "run as root (network namespaces, cgroups, bpffs)"
    );
    let env = TestEnv::new();
    let pod_a = env.add_backend("soak-a", "soak", 8080);
    let pod_b = env.add_backend("soak-b", "soak", 8080);
    let pods: Vec<IpAddr> = vec![pod_a.pod.ip().into(), pod_b.pod.ip().into()];
    let client = env.topo.add_pod("client");
    let (api, mut agent) = env.agent_on_api_server();
    agent.set_log_filter("warn,lb_agent=info");

    let mut live = Live {
        bulk: vec![Some(0); args.services],
        probes: vec![pods.clone(); PROBES],
    };
    let mut objects = Vec::new();
    for i in 0..args.services {
        objects.push(serde_json::to_value(bulk_service(i)).expect("json"));
        objects.push(
            serde_json::to_value(slice_of(&format!("svc-{i}"), &endpoints(i, 0))).expect("json"),
        );
    }
    for p in 0..PROBES {
        let name = format!("probe-{p}");
        objects.push(
            serde_json::to_value(
                service(&name, &format!("10.96.1.{}", p + 1))
                    .port_full(Some("http"), 80, 8080, "TCP")
                    .build(),
            )
            .expect("json"),
        );
        objects.push(serde_json::to_value(slice_of(&name, &pods)).expect("json"));
    }
    api.api().bulk_apply(objects).expect("bulk apply");
    agent.start();
    let mut figures = Figures {
        services: args.services,
        rate: args.rate,
        duration_s: args.duration,
        ..Figures::default()
    };
    settle(&agent, &live.table(), Duration::from_secs(300)).expect("the initial sync");
    agent.wait_attached();
    eprintln!(
        "soak: {} Services programmed; {} changes/s for {} s",
        args.services, args.rate, args.duration
    );

    let stop = AtomicBool::new(false);
    let (connections, failures) = thread::scope(|scope| {
        let clients = scope.spawn(|| {
            let mut ok = 0u64;
            let mut failed = BTreeMap::<String, u64>::new();
            let mut p = 0;
            while !stop.load(Ordering::Relaxed) {
                let target = format!("10.96.1.{}:80", p % PROBES + 1);
                p += 1;
                let summary = client
                    .client_with()
                    .cgroup(&env.cgroup)
                    .count(50)
                    .interval_ms(5)
                    .timeout_ms(2000)
                    .run(&target);
                ok += u64::from(summary.ok);
                for (error, n) in summary.errors {
                    *failed.entry(format!("{target}: {error}")).or_default() += u64::from(n);
                }
            }
            (ok, failed)
        });
        churn(&api, &agent, &args, &mut live, &pods, &mut figures);
        stop.store(true, Ordering::Relaxed);
        clients.join().expect("client thread")
    });
    figures.connections = connections;
    figures.failures = failures;
    if !figures.failures.is_empty() {
        figures
            .problems
            .push(format!("probe connections failed: {:?}", figures.failures));
    }

    let want = live.table();
    figures.frontends = want.len();
    let settled = Instant::now();
    if let Err(e) = settle(&agent, &want, Duration::from_secs(120)) {
        figures.problems.push(format!("after the changes: {e}"));
    }
    figures.settle_s = settled.elapsed().as_secs_f64();
    figures.rss_end_kib = rss_kib(&agent);
    figures.entries_end = entries(&agent);
    check_entries(
        &want,
        &figures.entries_end.clone(),
        "after the soak",
        &mut figures,
    );
    // Reverse NAT: one LRU entry per connected socket, aged out, never more.
    let revnat = figures.entries_end.get(lb_common::REVNAT4_MAP).copied();
    if revnat.unwrap_or(u64::MAX) > figures.connections {
        figures.problems.push(format!(
            "{} holds {revnat:?} entries for {} connections",
            lb_common::REVNAT4_MAP,
            figures.connections
        ));
    }

    // A fresh agent on empty maps, same objects.
    agent.stop(Duration::from_secs(10));
    if let Err(e) = agent_cleanup(env.pins.path()) {
        figures.problems.push(format!("lb-agent cleanup: {e}"));
    }
    agent.start();
    if let Err(e) = settle(&agent, &want, Duration::from_secs(300)) {
        figures.problems.push(format!("a fresh agent: {e}"));
    }
    agent.wait_attached();
    figures.rss_fresh_kib = rss_kib(&agent);
    figures.entries_fresh = entries(&agent);
    for map in [
        "LB4_SERVICES",
        "LB_SLOTS",
        "LB4_BACKENDS",
        "LB_AFFINITY_MATCH",
        "LB_SOURCE_RANGES",
    ] {
        if figures.entries_end.get(map) != figures.entries_fresh.get(map) {
            figures.problems.push(format!(
                "{map}: {:?} entries after the soak, {:?} with a fresh agent",
                figures.entries_end.get(map),
                figures.entries_fresh.get(map)
            ));
        }
    }
    // Memory: the soaked agent holds what a fresh one holds, give or take allocator slack.
    if figures.rss_end_kib > figures.rss_fresh_kib * 3 / 2 + 16 * 1024 {
        figures.problems.push(format!(
            "RSS {} KiB after the soak, {} KiB for a fresh agent",
            figures.rss_end_kib, figures.rss_fresh_kib
        ));
    }
    figures.passed = figures.problems.is_empty();
    if args.json {
        println!("{}", serde_json::to_string(&figures).expect("json"));
    } else {
        print_table(&figures);
    }
    drop(agent);
    drop(api);
    figures.passed
}

/// Makes `args.rate` API writes per second for `args.duration` seconds, sampling the
/// agent's RSS every 30 s.
fn churn(
    api: &ApiServer,
    agent: &Agent,
    args: &Args,
    live: &mut Live,
    pods: &[IpAddr],
    figures: &mut Figures,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let tick = Duration::from_millis(10);
    let per_tick = (args.rate / 100).max(1);
    let started = Instant::now();
    let end = started + Duration::from_secs(args.duration);
    let mut next_sample = started;
    let mut next_tick = started;
    let mut changes = 0u64;
    while Instant::now() < end {
        if Instant::now() >= next_sample {
            figures.rss_kib.push(rss_kib(agent));
            next_sample += Duration::from_secs(30);
        }
        for _ in 0..per_tick {
            // One write in 25 moves a probe's endpoints (never to none).
            if rng.below(25) == 0 {
                let p = rng.below(PROBES);
                live.probes[p] = match rng.below(3) {
                    0 => vec![pods[0]],
                    1 => vec![pods[1]],
                    _ => pods.to_vec(),
                };
                api.apply(slice_of(&format!("probe-{p}"), &live.probes[p]));
                changes += 1;
                continue;
            }
            let i = rng.below(live.bulk.len());
            let name = format!("svc-{i}");
            match live.bulk[i] {
                // One in ten writes to a live Service deletes it (with its slice).
                Some(_) if rng.below(10) == 0 => {
                    api.delete(ResourceKind::Service, "default", &name);
                    api.delete(ResourceKind::EndpointSlice, "default", &format!("{name}-x"));
                    live.bulk[i] = None;
                    changes += 2;
                }
                Some(v) => {
                    api.apply(slice_of(&name, &endpoints(i, v + 1)));
                    live.bulk[i] = Some(v + 1);
                    changes += 1;
                }
                None => {
                    api.apply(bulk_service(i));
                    api.apply(slice_of(&name, &endpoints(i, 0)));
                    live.bulk[i] = Some(0);
                    changes += 2;
                }
            }
        }
        next_tick += tick;
        if let Some(wait) = next_tick.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    figures.changes = changes;
    figures.achieved_rate = changes as f64 / started.elapsed().as_secs_f64();
}

/// Waits until the maps hold exactly `want` (consistent: each master's count is its
/// number of slots).
fn settle(agent: &Agent, want: &Table, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match programmed(agent) {
            Ok(table) if &table == want => return Ok(()),
            Ok(table) => {
                let differ = want
                    .iter()
                    .filter(|(k, v)| table.get(*k) != Some(v))
                    .count();
                let extra = table.keys().filter(|k| !want.contains_key(*k)).count();
                format!("{differ} frontends missing or different, {extra} not wanted")
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("not within {timeout:?}: {last}"));
        }
        thread::sleep(Duration::from_secs(1));
    }
}

fn programmed(agent: &Agent) -> Result<Table, String> {
    let mut table = Table::new();
    for f in agent.services()? {
        if usize::from(f.count) != f.backends.len() {
            return Err(format!(
                "{}: count {} but {} slots",
                f.addr(),
                f.count,
                f.backends.len()
            ));
        }
        table.insert(f.addr(), f.backend_addrs());
    }
    Ok(table)
}

/// The maps must hold what `want` needs: one master and a slot per backend for each
/// frontend, one backend entry per distinct backend, no tracked flow (the socket path keeps
/// none), and at most one reverse-NAT entry per probe connection made.
fn check_entries(want: &Table, entries: &BTreeMap<String, u64>, when: &str, f: &mut Figures) {
    let slots: usize = want.values().map(Vec::len).sum();
    let backends: std::collections::BTreeSet<&String> = want.values().flatten().collect();
    let expect = [
        ("LB4_SERVICES", want.len() as u64),
        ("LB_SLOTS", slots as u64),
        ("LB4_BACKENDS", backends.len() as u64),
        ("LB_AFFINITY_MATCH", 0),
        ("LB_SOURCE_RANGES", 0),
    ];
    let tracked = CT_MAPS.iter().map(|m| (*m, 0));
    for (map, n) in expect.into_iter().chain(tracked) {
        let got = entries.get(map).copied();
        if got != Some(n) {
            f.problems.push(format!(
                "{when}: {map} holds {got:?} entries, the objects need {n}"
            ));
        }
    }
}

fn entries(agent: &Agent) -> BTreeMap<String, u64> {
    agent
        .map_summary()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["entries"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn rss_kib(agent: &Agent) -> u64 {
    let Some(pid) = agent.pid() else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn print_table(f: &Figures) {
    println!(
        "## Soak: {} Services, {} API writes/s for {} s",
        f.services, f.rate, f.duration_s
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| API writes made (achieved rate) | {} ({:.0}/s) |",
        f.changes, f.achieved_rate
    );
    println!(
        "| probe connections made / failed | {} / {} |",
        f.connections,
        f.failures.values().sum::<u64>()
    );
    println!(
        "| agent RSS during the changes, every 30 s (KiB) | {} |",
        f.rss_kib
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| agent RSS at the end / a fresh agent on the same objects | {} / {} KiB |",
        f.rss_end_kib, f.rss_fresh_kib
    );
    println!(
        "| last change → maps equal to the objects | {:.1} s |",
        f.settle_s
    );
    println!("| frontends at the end | {} |", f.frontends);
    for (map, n) in &f.entries_end {
        println!(
            "| {map} entries at the end / fresh agent | {n} / {} |",
            f.entries_fresh.get(map).copied().unwrap_or_default()
        );
    }
    println!(
        "| result | {} |",
        if f.passed {
            "passed".to_owned()
        } else {
            format!("FAILED: {}", f.problems.join("; "))
        }
    );
}
