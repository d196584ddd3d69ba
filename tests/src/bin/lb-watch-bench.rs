//! Control-plane figures of the agent on the Kubernetes API (issue: the watch stream):
//! the time to program N Services with E endpoints each from the initial list, the time
//! from a watch event to the map write (p50, p99), and the agent's memory at that size
//! beside the memory of the same agent holding nothing.
//!
//! It builds the same network-namespace topology as the tests, starts a fake API server
//! there, runs the agent (`LB_AGENT_BIN`, use a release build) against it, first with no
//! objects (the empty agent: its RSS and map memory are the baseline the per-Service figures
//! are taken from), then, restarted, with every object listed at once, and reads the agent's
//! log: every map write is logged with its own duration, and its timestamp gives the latency
//! from the API server's write to the map write.
//! Run it as root: `cargo xtask watch-bench`, or as part of `cargo xtask bench`, which reads
//! its `--json` result (see `--help`).
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant, SystemTime},
};

use clap::Parser;
use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::{Agent, TestEnv, require_privileges};
use serde::Serialize;

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
    /// Longest wait for the first sync, in seconds.
    #[arg(long, default_value_t = 600)]
    sync_timeout: u64,
    /// Print the figures as one JSON object (for `cargo xtask bench`) instead of a table.
    #[arg(long)]
    json: bool,
}

/// What one run measured; `cargo xtask bench` reads it (keep the two in step).
#[derive(Debug, Serialize)]
struct Figures {
    services: u32,
    endpoints: u32,
    /// Frontends in the first map write (one per Service port).
    frontends: u64,
    /// Agent start → the first `maps updated` (every frontend programmed), in seconds.
    sync_s: f64,
    /// Agent start → its `initial lists complete` line (both lists read and applied to the
    /// model), in seconds.
    listed_s: f64,
    /// `initial lists complete` → the first `maps updated`: translating every Service and
    /// writing the maps, in seconds.
    sync_write_s: f64,
    /// Of that, as the agent's `maps updated` line splits it: translating every Service,
    /// then planning and writing the maps, in seconds.
    translate_s: f64,
    write_s: f64,
    /// CPU time (user and system, every thread) the agent had used at the first write.
    sync_cpu_s: f64,
    /// RSS of the agent with nothing listed, after `ready`.
    rss_empty_kib: u64,
    /// RSS after the first sync, and after the events.
    rss_sync_kib: u64,
    rss_after_kib: u64,
    /// The agent's peak RSS (`VmHWM`: the initial list passes through its heap once).
    rss_peak_kib: u64,
    /// The kernel's accounting (`memlock`) of every map pinned by the agent, empty and
    /// after the events.
    map_empty_bytes: u64,
    map_bytes: u64,
    /// API server write → map written, one per event, in µs.
    event_us: Vec<u64>,
    /// The agent's own work per event (model and map writes), in µs.
    event_write_us: Vec<u64>,
}

fn main() {
    let args = Args::parse();
    assert!(
        require_privileges(),
        "run as root (network namespaces, cgroups, bpffs)"
    );
    let env = TestEnv::new();
    let (api, mut agent) = env.agent_on_api_server();
    // Per-object debug lines would slow the sync down: the figures need `maps updated`.
    agent.set_log_filter("info");

    // The empty agent: what it costs before any Service.
    agent.start();
    wait_for_lines(&agent, ": ready", 1, Duration::from_secs(60));
    let rss_empty_kib = agent
        .pid()
        .and_then(|pid| status_kib(pid, "VmRSS"))
        .unwrap_or(0);
    let map_empty_bytes = map_memory_bytes(env.pins.path());
    agent.stop(Duration::from_secs(10));

    let mut objects = Vec::with_capacity(2 * args.services as usize);
    for i in 0..args.services {
        objects.push(serde_json::to_value(svc(i)).expect("json"));
        objects.push(serde_json::to_value(slice(i, args.endpoints, 0)).expect("json"));
    }
    api.api().bulk_apply(objects).expect("bulk apply");

    let before_sync = writes(&agent).len();
    let started = Instant::now();
    agent.start();
    let first = wait_for_lines(
        &agent,
        "maps updated",
        before_sync + 1,
        Duration::from_secs(args.sync_timeout),
    );
    let sync_s = started.elapsed().as_secs_f64();
    let sync_cpu_s = agent.pid().and_then(cpu_seconds).unwrap_or(0.0);
    let first = &first[before_sync];
    let listed = lines(&agent, "initial lists complete");
    let listed = listed.last().and_then(|l| timestamp(l));
    let written = timestamp(first);
    let (listed_s, sync_write_s) = match (listed, written) {
        (Some(listed), Some(written)) => (
            sync_s
                - written
                    .duration_since(listed)
                    .unwrap_or_default()
                    .as_secs_f64(),
            written
                .duration_since(listed)
                .unwrap_or_default()
                .as_secs_f64(),
        ),
        _ => (0.0, 0.0),
    };
    let translate_s = field(first, "translate_us").unwrap_or(0) as f64 / 1e6;
    let write_s = field(first, "write_us").unwrap_or(0) as f64 / 1e6;
    let frontends = field(first, "frontends").unwrap_or(0);
    assert_eq!(frontends, u64::from(args.services), "first write: {first}");
    // The programs are attached after the first write: changes are timed from then on.
    wait_for_lines(&agent, ": ready", 2, Duration::from_secs(60));
    let rss_sync_kib = agent
        .pid()
        .and_then(|pid| status_kib(pid, "VmRSS"))
        .unwrap_or(0);

    let mut event_us = Vec::new();
    let mut event_write_us = Vec::new();
    for k in 0..args.events {
        let index = (k * 7919) % args.services;
        let before = writes(&agent).len();
        let sent = SystemTime::now();
        api.apply(slice(index, args.endpoints, k + 1));
        let lines = wait_for_lines(&agent, "maps updated", before + 1, Duration::from_secs(10));
        let line = &lines[before];
        event_write_us.push(field(line, "elapsed_us").unwrap_or(0));
        if let Some(at) = timestamp(line) {
            event_us.push(at.duration_since(sent).unwrap_or_default().as_micros() as u64);
        }
    }
    let figures = Figures {
        services: args.services,
        endpoints: args.endpoints,
        frontends,
        sync_s,
        listed_s,
        sync_write_s,
        translate_s,
        write_s,
        sync_cpu_s,
        rss_empty_kib,
        rss_sync_kib,
        rss_after_kib: agent
            .pid()
            .and_then(|pid| status_kib(pid, "VmRSS"))
            .unwrap_or(0),
        rss_peak_kib: agent
            .pid()
            .and_then(|pid| status_kib(pid, "VmHWM"))
            .unwrap_or(0),
        map_empty_bytes,
        map_bytes: map_memory_bytes(env.pins.path()),
        event_us,
        event_write_us,
    };
    if args.json {
        println!("{}", serde_json::to_string(&figures).expect("json"));
    } else {
        print_table(&figures);
    }
    drop(agent);
    drop(api);
}

fn print_table(f: &Figures) {
    let per_service =
        |now: u64, empty: u64| now.saturating_sub(empty) as f64 / f64::from(f.services.max(1));
    println!(
        "## Agent on the API server: {} Services × {} endpoints",
        f.services, f.endpoints
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| agent start → all {} frontends in the maps | {:.2} s |",
        f.frontends, f.sync_s
    );
    println!(
        "| of which reading both lists into the model / translating and writing the maps | {:.2} s / {:.2} s |",
        f.listed_s, f.sync_write_s
    );
    println!(
        "| of the latter, translating every Service / planning and writing the maps | {:.2} s / {:.2} s |",
        f.translate_s, f.write_s
    );
    println!(
        "| the agent's CPU time (every thread) at that first write | {:.2} s |",
        f.sync_cpu_s
    );
    println!(
        "| watch event → map written, p50 / p99 (API server write to map write) | {} / {} µs |",
        percentile(&f.event_us, 50),
        percentile(&f.event_us, 99)
    );
    println!(
        "| agent's own work per event (model + map writes), p50 / p99 | {} / {} µs |",
        percentile(&f.event_write_us, 50),
        percentile(&f.event_write_us, 99)
    );
    println!(
        "| agent RSS empty / after the initial sync / after {} events / peak | {} / {} / {} / {} KiB |",
        f.event_us.len(),
        f.rss_empty_kib,
        f.rss_sync_kib,
        f.rss_after_kib,
        f.rss_peak_kib
    );
    println!(
        "| agent RSS per Service (minus the empty agent) | {:.0} bytes |",
        per_service(f.rss_after_kib * 1024, f.rss_empty_kib * 1024)
    );
    println!(
        "| BPF map memory (every pinned map, kernel's memlock) empty / now | {} / {} KiB |",
        f.map_empty_bytes / 1024,
        f.map_bytes / 1024
    );
    println!(
        "| BPF map memory per Service (minus the empty maps) | {:.0} bytes |",
        per_service(f.map_bytes, f.map_empty_bytes)
    );
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
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    let moved = u32::from(Ipv4Addr::new(10, 192, 0, 0));
    (0..endpoints)
        .fold(
            endpoint_slice(&format!("svc-{i}-x"), &format!("svc-{i}")),
            |s, e| {
                let ip = match (e, version) {
                    (0, v) if v > 0 => Ipv4Addr::from(moved + v),
                    _ => Ipv4Addr::from(base + i * endpoints + e),
                };
                s.endpoint(IpAddr::V4(ip), true)
            },
        )
        .port(Some("http"), 8080, "TCP")
        .build()
}

fn writes(agent: &Agent) -> Vec<String> {
    lines(agent, "maps updated")
}

/// The log lines (of every run) containing `what`.
fn lines(agent: &Agent, what: &str) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

/// Waits until the log holds `count` lines containing `what`; returns all of them.
fn wait_for_lines(agent: &Agent, what: &str, count: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = lines(agent, what);
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} line within {timeout:?}:\n{}",
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
    let stamp: k8s_openapi::jiff::Timestamp = line.split_whitespace().next()?.parse().ok()?;
    let nanos = u64::try_from(stamp.as_nanosecond()).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_nanos(nanos))
}

fn percentile(values: &[u64], p: usize) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted
        .get((sorted.len().saturating_sub(1)) * p / 100)
        .copied()
        .unwrap_or(0)
}

/// The CPU time a process has used, user and system, in seconds (`/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat(5), the 12th and 13th after the command.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

/// A `… kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Memory of this agent's maps (pinned under `pins`) as the kernel accounts it.
fn map_memory_bytes(pins: &std::path::Path) -> u64 {
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
    bytes
}
