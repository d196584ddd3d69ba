//! Control-plane figures of the agent on the Kubernetes API (issue: the watch stream), or
//! on a manifests directory (`--manifests`): the time to program N Services with E
//! endpoints each from the initial list (or files), the time from a watch event (or a
//! rewritten file) to the map write (p50, p99), and the agent's memory at that size.
//!
//! It builds the same network-namespace topology as the tests, starts a fake API server
//! there holding the objects (or writes them as YAML, [`SERVICES_PER_FILE`] Services to a
//! file, as `cargo xtask bench` does), runs the agent (`LB_AGENT_BIN`, use a release build)
//! against it, and reads the agent's log: every map write is logged with its own duration,
//! and its timestamp gives the latency from the API server's write (or the file's rename) to
//! the map write. An endpoint change of a manifest rewrites the whole file of its Service.
//! Run it as root: `cargo xtask watch-bench` (or see `--help`).
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::{Agent, TestEnv, require_privileges};

/// Control-plane benchmark of lb-agent on a (fake) Kubernetes API server.
#[derive(Debug, Parser)]
struct Args {
    /// Services to create before the agent starts.
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    /// Endpoints per Service (one EndpointSlice each).
    #[arg(long, default_value_t = 10)]
    endpoints: u32,
    /// Single-slice updates to time after the initial sync.
    #[arg(long, default_value_t = 200)]
    events: u32,
    /// Read the Services from a manifests directory instead of the API server.
    #[arg(long)]
    manifests: bool,
    /// With --manifests: rewrite a changed file in place (truncate and write, as `echo >`
    /// does) instead of renaming a new file over it (as editors and `kubectl`-style tools do).
    #[arg(long, requires = "manifests")]
    in_place: bool,
}

/// Services per manifest file (a Service and its slice each), as `cargo xtask bench` writes.
const SERVICES_PER_FILE: u32 = 500;

fn main() {
    let args = Args::parse();
    assert!(
        require_privileges(),
        "run as root (network namespaces, cgroups, bpffs)"
    );
    let env = TestEnv::new();
    let mut versions = vec![0; args.services as usize];
    let (api, mut agent) = if args.manifests {
        for file in 0..args.services.div_ceil(SERVICES_PER_FILE) {
            write_file(&env, file, &args, &mut versions, None, false);
        }
        (None, lb_tests::Agent::new(env.agent_config()))
    } else {
        let (api, agent) = env.agent_on_api_server();
        let mut objects = Vec::with_capacity(2 * args.services as usize);
        for i in 0..args.services {
            objects.push(serde_json::to_value(svc(i)).expect("json"));
            objects.push(serde_json::to_value(slice(i, args.endpoints, 0)).expect("json"));
        }
        api.api().bulk_apply(objects).expect("bulk apply");
        (Some(api), agent)
    };

    let started = Instant::now();
    agent.start();
    let first = wait_for_writes(&agent, 1, Duration::from_secs(600));
    let sync_total = started.elapsed();
    let first_elapsed_us = field(&first[0], "elapsed_us").unwrap_or(0);
    let frontends = field(&first[0], "frontends").unwrap_or(0);
    assert_eq!(
        frontends,
        u64::from(args.services),
        "first write: {}",
        first[0]
    );
    let rss_sync_kib = agent.pid().and_then(rss_kib).unwrap_or(0);
    let map_kib = map_memory_kib(env.pins.path());

    let mut e2e_us = Vec::new();
    let mut write_us = Vec::new();
    for k in 0..args.events {
        let index = (k * 7919) % args.services;
        let before = writes(&agent).len();
        let sent = match &api {
            Some(api) => {
                let sent = SystemTime::now();
                api.apply(slice(index, args.endpoints, k + 1));
                sent
            }
            None => {
                let file = index / SERVICES_PER_FILE;
                write_file(&env, file, &args, &mut versions, Some(index), args.in_place)
            }
        };
        let lines = wait_for_writes(&agent, before + 1, Duration::from_secs(10));
        let line = &lines[before];
        write_us.push(field(line, "elapsed_us").unwrap_or(0));
        if let Some(at) = timestamp(line) {
            e2e_us.push(at.duration_since(sent).unwrap_or_default().as_micros() as u64);
        }
    }
    let rss_after_kib = agent.pid().and_then(rss_kib).unwrap_or(0);

    let source = if args.manifests {
        format!(
            "a manifests directory ({SERVICES_PER_FILE} Services a file, changes {})",
            if args.in_place {
                "written in place"
            } else {
                "renamed over"
            }
        )
    } else {
        "the API server".to_owned()
    };
    println!(
        "## Agent on {source}: {} Services × {} endpoints",
        args.services, args.endpoints
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| agent start → all {frontends} frontends in the maps | {:.2} s |",
        sync_total.as_secs_f64()
    );
    println!(
        "| of which the map write pass itself | {:.0} ms |",
        first_elapsed_us as f64 / 1000.0
    );
    println!(
        "| change → map written, p50 (API server write or file write to map write) | {} µs |",
        percentile(&e2e_us, 50)
    );
    println!(
        "| change → map written, p99 | {} µs |",
        percentile(&e2e_us, 99)
    );
    println!(
        "| agent's own work per event (model + map writes), p50 / p99 | {} / {} µs |",
        percentile(&write_us, 50),
        percentile(&write_us, 99)
    );
    println!(
        "| agent RSS after the initial sync / after {} events | {} / {} KiB |",
        args.events, rss_sync_kib, rss_after_kib
    );
    println!(
        "| agent RSS per Service | {:.1} KiB |",
        rss_after_kib as f64 / f64::from(args.services.max(1))
    );
    println!("| BPF map memory (services, backends, reverse NAT; both families) | {map_kib} KiB |");
    drop(agent);
    drop(api);
}

/// (Re)writes manifest file `file`: its Services and their slices, the slice of `changed` (if
/// any) at its next version. Returns when the write began (before the text is on disk).
fn write_file(
    env: &TestEnv,
    file: u32,
    args: &Args,
    versions: &mut [u32],
    changed: Option<u32>,
    in_place: bool,
) -> SystemTime {
    if let Some(i) = changed {
        versions[i as usize] += 1;
    }
    let first = file * SERVICES_PER_FILE;
    let mut text = String::with_capacity(SERVICES_PER_FILE as usize * 800);
    for i in first..(first + SERVICES_PER_FILE).min(args.services) {
        service_yaml(&mut text, i, args.endpoints, versions[i as usize]);
    }
    let name = format!("services-{file:04}.yaml");
    let sent = SystemTime::now();
    if in_place {
        let path = env.manifests.dir().join(&name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    } else {
        env.manifests.write(&name, &text);
    }
    sent
}

/// Service `i` and its slice as YAML, as `cargo xtask bench` writes them (the same objects
/// as [`svc`] and [`slice`]).
fn service_yaml(out: &mut String, i: u32, endpoints: u32, version: u32) {
    use std::fmt::Write as _;
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 16 + i);
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: default}}\n\
         spec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-x\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nendpoints:\n"
    );
    for ip in slice_ips(i, endpoints, version) {
        let _ = writeln!(out, "- {{addresses: [{ip}], conditions: {{ready: true}}}}");
    }
    out.push_str("ports:\n- {name: http, port: 8080, protocol: TCP}\n");
}

fn svc(i: u32) -> k8s_openapi::api::core::v1::Service {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 16 + i);
    service(&format!("svc-{i}"), &ip.to_string())
        .port_full(Some("http"), 80, 8080, "TCP")
        .build()
}

/// The slice of Service `i`; `version` > 0 moves its first endpoint to an address no other
/// version uses, so every update is a real change.
fn slice(i: u32, endpoints: u32, version: u32) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    slice_ips(i, endpoints, version)
        .fold(
            endpoint_slice(&format!("svc-{i}-x"), &format!("svc-{i}")),
            |s, ip| s.endpoint(IpAddr::V4(ip), true),
        )
        .port(Some("http"), 8080, "TCP")
        .build()
}

/// The endpoints of Service `i`'s slice at `version`.
fn slice_ips(i: u32, endpoints: u32, version: u32) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    let moved = u32::from(Ipv4Addr::new(10, 192, 0, 0));
    (0..endpoints).map(move |e| match (e, version) {
        (0, v) if v > 0 => Ipv4Addr::from(moved + v),
        _ => Ipv4Addr::from(base + i * endpoints + e),
    })
}

fn writes(agent: &Agent) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("maps updated"))
        .map(str::to_owned)
        .collect()
}

fn wait_for_writes(agent: &Agent, count: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = writes(agent);
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "no map write within {timeout:?}:\n{}",
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `name=123` from a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let rest = line.split(&format!(" {name}=")).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The RFC 3339 timestamp that starts a text log line (`2026-11-23T14:06:19.105523Z`).
fn timestamp(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: u32 = format!("{frac:0<9}")[..9].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + min * 60 + s).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

fn percentile(values: &[u64], p: usize) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted
        .get((sorted.len().saturating_sub(1)) * p / 100)
        .copied()
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Memory of this agent's maps (pinned under `pins`) as the kernel accounts it.
fn map_memory_kib(pins: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(pins) else {
        return 0;
    };
    let mut bytes = 0;
    for entry in entries.flatten().filter(|e| e.path().is_file()) {
        let Ok(out) = std::process::Command::new("bpftool")
            .args(["map", "show", "pinned"])
            .arg(entry.path())
            .arg("-j")
            .output()
        else {
            continue;
        };
        let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        bytes += map["bytes_memlock"].as_u64().unwrap_or(0);
    }
    bytes / 1024
}
