//! Driving `lb-agent` for the bench: start it from nothing on a manifests directory (as the
//! socket LB or as the tc LB), follow its log (`ready`, `maps updated … elapsed_us=…`), read its
//! memory, and read the run-time statistics and map sizes of exactly its programs (found through
//! the bench's cgroup or the agent's pinned links, so other agents on the machine with the same
//! program names are never counted).
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::lab::{self, AGENT, Lab, PIN_DIR, Paths, TC_AGENT, TC_PIN_DIR};
use crate::cmd;

/// A running agent.
pub struct Agent {
    pub pid: u32,
    /// Its process (and log) name in the lab.
    name: &'static str,
    log: PathBuf,
    started: Instant,
}

/// One `maps updated` log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update {
    pub frontends: usize,
    pub elapsed_us: u64,
    /// The line's timestamp: when the agent had written the maps.
    pub at: Option<SystemTime>,
}

/// Start to `ready` (object loaded, maps written, programs attached), and the first map
/// write as the agent logs it (none when it had nothing to write).
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    pub ready_s: f64,
    pub first: Option<Update>,
}

impl Agent {
    /// The socket LB: `lb-agent run --socket-lb all` on `manifests` inside the node namespace,
    /// attached to the bench's agent cgroup, with a fresh pin directory.
    pub fn start_socket(lab: &Lab, manifests: &Path) -> Result<Self> {
        let args = [
            OsStr::new("--socket-lb"),
            OsStr::new("all"),
            OsStr::new("--cgroup"),
            lab.paths().agent_cgroup.as_os_str(),
        ];
        Self::start(lab, AGENT, PIN_DIR, manifests, &args)
    }

    /// The tc LB: `lb-agent run --socket-lb off --pod-devices DEVICE` on `manifests` inside the
    /// node namespace: no socket programs, the per-packet path on `device` (the tc client's
    /// veth) only, and its own pin directory, so its maps are not the socket LB's.
    pub fn start_tc(lab: &Lab, manifests: &Path, device: &str) -> Result<Self> {
        let args = ["--socket-lb", "off", "--pod-devices", device].map(OsStr::new);
        Self::start(lab, TC_AGENT, TC_PIN_DIR, manifests, &args)
    }

    fn start(
        lab: &Lab,
        name: &'static str,
        pin_dir: &str,
        manifests: &Path,
        args: &[&OsStr],
    ) -> Result<Self> {
        std::fs::create_dir_all(pin_dir).with_context(|| format!("cannot create {pin_dir}"))?;
        let mut command = lab::in_netns(lab::NODE_NETNS, &lab.paths().agent_bin);
        command
            .arg("run")
            .arg("--manifests")
            .arg(manifests)
            .args(args)
            .args(["--bpf-pin-path", pin_dir])
            // Two agents (socket and tc variants) share the node namespace: neither serves
            // kube-proxy's node health port or metrics port, which only one could bind.
            .arg("--healthz-bind-address=")
            .arg("--metrics-bind-address=")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        let started = Instant::now();
        // nsenter execs the agent: the pid is the agent's.
        let pid = lab.spawn(name, command)?;
        Ok(Self {
            pid,
            name,
            log: Paths::log(name),
            started,
        })
    }

    /// Its process (and log) name in the lab.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every `maps updated` line so far.
    pub fn updates(&self) -> Vec<Update> {
        parse_updates(&self.log_text())
    }

    /// Waits for `ready`. `Ok(None)` when it took longer than `cap` (the agent is then left
    /// running for the caller to stop).
    pub fn wait_ready(&self, lab: &Lab, cap: Duration) -> Result<Option<Ready>> {
        loop {
            let text = self.log_text();
            if text.lines().any(|l| l.trim_end().ends_with(": ready")) {
                return Ok(Some(Ready {
                    ready_s: self.started.elapsed().as_secs_f64(),
                    first: parse_updates(&text).first().copied(),
                }));
            }
            if let Some(status) = lab.exited(self.name) {
                bail!(
                    "lb-agent ({}) exited ({status}) before it was ready:\n{}",
                    self.name,
                    tail(&text, 15)
                );
            }
            if self.started.elapsed() > cap {
                return Ok(None);
            }
            sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the log has more than `seen` `maps updated` lines; returns the newest and
    /// when it was seen.
    pub fn wait_update(&self, lab: &Lab, seen: usize, timeout: Duration) -> Result<Update> {
        let deadline = Instant::now() + timeout;
        loop {
            let updates = self.updates();
            if updates.len() > seen {
                return Ok(updates[updates.len() - 1]);
            }
            if let Some(status) = lab.exited(self.name) {
                bail!("lb-agent ({}) exited ({status})", self.name);
            }
            if Instant::now() > deadline {
                bail!(
                    "no `maps updated` within {timeout:?}:\n{}",
                    tail(&self.log_text(), 10)
                );
            }
            sleep(Duration::from_millis(1));
        }
    }

    /// Error lines the agent logged, and warnings about what it did not program (an invalid
    /// manifest or a full map would make the comparison unfair).
    pub fn errors(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| {
                l.contains(" ERROR ") || (l.contains(" WARN ") && l.contains("not programmed"))
            })
            .take(20)
            .map(str::to_owned)
            .collect()
    }

    /// What the agent reported it could not fit into its maps (a full map, no free id):
    /// its problems that are not about an invalid object, the agent's own words.
    pub fn refusals(&self) -> Vec<String> {
        refusals(&self.log_text())
    }

    /// CPU time the agent has used (user + system), from `/proc/PID/stat`.
    pub fn cpu(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        cpu_time(&stat)
    }

    /// Resident memory (`VmRSS`) in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS")
    }

    /// Peak resident memory (`VmHWM`) in KiB.
    pub fn peak_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM")
    }

    fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status_kib(&status, field)
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The problems of a text log that say a valid object was not programmed, as
/// `<what>: not programmed: <why>` (the log line's prefix cut off).
fn refusals(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" ERROR ") && l.contains("not programmed"))
        .filter(|l| !l.contains("invalid object"))
        .map(|l| {
            // `<time>  ERROR <target>: <problem>`
            let message = l.split_once(" ERROR ").map_or(l, |(_, rest)| rest);
            message
                .split_once(": ")
                .map_or(message, |(_, problem)| problem)
                .trim()
                .to_owned()
        })
        .collect()
}

/// utime + stime of a `/proc/PID/stat` line, in `USER_HZ` (100 per second on Linux).
fn cpu_time(stat: &str) -> Option<Duration> {
    // The command name may contain spaces: count the fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// A `… kB` field of `/proc/PID/status`.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The `maps updated` lines of a text log (`… maps updated frontends=3 … elapsed_us=120`).
fn parse_updates(log: &str) -> Vec<Update> {
    log.lines()
        .filter(|line| line.contains("maps updated"))
        .filter_map(|line| {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|value| value.parse::<u64>().ok())
            };
            Some(Update {
                frontends: usize::try_from(field("frontends")?).ok()?,
                elapsed_us: field("elapsed_us")?,
                at: timestamp(line),
            })
        })
        .collect()
}

/// The RFC 3339 timestamp that starts a text log line (`2026-11-23T14:06:19.105523Z  INFO …`).
fn timestamp(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?;
    let at: k8s_openapi::jiff::Timestamp = stamp.parse().ok()?;
    let nanos = u64::try_from(at.as_nanosecond()).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// One program of the agent, as `bpftool prog show -j` reports it.
#[derive(Debug, Deserialize)]
struct ProgInfo {
    id: u32,
    #[serde(default)]
    name: String,
    #[serde(default)]
    run_time_ns: u64,
    #[serde(default)]
    run_cnt: u64,
}

#[derive(Debug, Deserialize)]
struct MapInfo {
    #[serde(default)]
    name: String,
    #[serde(default)]
    bytes_memlock: u64,
    #[serde(default)]
    max_entries: u64,
}

#[derive(Debug, Deserialize)]
struct Attached {
    id: u32,
}

/// Cumulative run count and time of each of the agent's programs, by name.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgStats(pub BTreeMap<String, (u64, u64)>);

impl ProgStats {
    /// `self - earlier`, per program.
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(name, &(cnt, ns))| {
                    let (cnt0, ns0) = earlier.0.get(name).copied().unwrap_or_default();
                    (
                        name.clone(),
                        (cnt.saturating_sub(cnt0), ns.saturating_sub(ns0)),
                    )
                })
                .collect(),
        )
    }

    pub fn add(&mut self, other: &Self) {
        for (name, &(cnt, ns)) in &other.0 {
            let entry = self.0.entry(name.clone()).or_default();
            entry.0 += cnt;
            entry.1 += ns;
        }
    }
}

/// A link pinned by the agent, as `bpftool link show -j` reports it.
#[derive(Debug, Deserialize)]
struct LinkInfo {
    prog_id: u32,
}

/// Ids of the programs attached through the links the agent pinned under `pin_dir`
/// (`bpftool link show pinned`): for the tc LB, its programs on the tc client's veth.
pub fn linked_programs(pin_dir: &Path) -> Result<BTreeSet<u32>> {
    let links = pin_dir.join("links");
    let entries =
        std::fs::read_dir(&links).with_context(|| format!("cannot list {}", links.display()))?;
    let mut ids = BTreeSet::new();
    for entry in entries {
        let path = entry?.path();
        let out = cmd::output(
            Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(&path),
        )?;
        let link: LinkInfo = serde_json::from_str(out.trim())
            .with_context(|| format!("unexpected `bpftool link show` output: {out}"))?;
        ids.insert(link.prog_id);
    }
    Ok(ids)
}

/// The id of the program pinned at `pin` (`bpftool prog show pinned`).
pub fn pinned_program(pin: &Path) -> Result<u32> {
    let out = cmd::output(
        Command::new("bpftool")
            .args(["-j", "prog", "show", "pinned"])
            .arg(pin),
    )?;
    let program: ProgInfo = serde_json::from_str(out.trim())
        .with_context(|| format!("unexpected `bpftool prog show` output: {out}"))?;
    Ok(program.id)
}

/// Ids of the programs attached to `cgroup` (`bpftool cgroup show`).
pub fn attached_programs(cgroup: &Path) -> Result<BTreeSet<u32>> {
    let out = cmd::output(
        Command::new("bpftool")
            .arg("-j")
            .arg("cgroup")
            .arg("show")
            .arg(cgroup),
    )?;
    if out.trim().is_empty() {
        return Ok(BTreeSet::new());
    }
    let attached: Vec<Attached> =
        serde_json::from_str(out.trim()).context("unexpected `bpftool cgroup show` output")?;
    Ok(attached.into_iter().map(|a| a.id).collect())
}

fn programs(ids: &BTreeSet<u32>) -> Result<Vec<ProgInfo>> {
    let out = cmd::output(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let all: Vec<ProgInfo> =
        serde_json::from_str(out.trim()).context("unexpected `bpftool prog show` output")?;
    Ok(all.into_iter().filter(|p| ids.contains(&p.id)).collect())
}

/// Run counts and times of the programs `ids`.
pub fn prog_stats(ids: &BTreeSet<u32>) -> Result<ProgStats> {
    Ok(ProgStats(
        programs(ids)?
            .into_iter()
            .map(|p| (p.name, (p.run_cnt, p.run_time_ns)))
            .collect(),
    ))
}

/// One of the agent's maps: name, capacity and the memory the kernel charges for it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapMemory {
    pub name: String,
    pub max_entries: u64,
    pub bytes_memlock: u64,
}

/// Every map the agent pinned under `pin_dir` (`bpftool map show pinned`), whichever of its
/// programs use it.
pub fn pinned_maps(pin_dir: &Path) -> Result<Vec<MapMemory>> {
    let entries =
        std::fs::read_dir(pin_dir).with_context(|| format!("cannot list {}", pin_dir.display()))?;
    let mut maps = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        let out = cmd::output(
            Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(&path),
        )?;
        let map: MapInfo = serde_json::from_str(out.trim())
            .with_context(|| format!("unexpected `bpftool map show` output: {out}"))?;
        maps.push(MapMemory {
            name: map.name,
            max_entries: map.max_entries,
            bytes_memlock: map.bytes_memlock,
        });
    }
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_maps_updated_lines() {
        let log = "2026-01-01T00:00:00.000001Z  INFO lb_agent::agent: starting node=(unset)\n\
                   2026-01-01T00:00:00.2Z  INFO lb_agent::agent: maps updated frontends=101 added=101 updated=0 removed=0 map_writes=303 map_deletes=0 elapsed_us=4521\n\
                   2026-01-01T00:00:00.3Z  INFO lb_agent::agent: ready\n\
                   2026-01-01T00:00:01Z  INFO lb_agent::agent: maps updated frontends=101 added=0 updated=1 removed=0 map_writes=3 map_deletes=1 elapsed_us=77\n";
        assert_eq!(
            parse_updates(log)
                .iter()
                .map(|u| (u.frontends, u.elapsed_us))
                .collect::<Vec<_>>(),
            [(101, 4521), (101, 77)]
        );
        let at = parse_updates(log)[1].at.expect("a timestamp");
        let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap();
        assert_eq!(since_epoch.as_secs(), 1_767_225_601, "2026-01-01T00:00:01Z");
    }

    #[test]
    fn refusals_are_the_agents_map_problems_not_invalid_objects() {
        let log = "2026-01-01T00:00:00Z ERROR lb_agent::agent: bench/svc-000009: spec.ports[0]: not programmed: LB4_SERVICES is full (5 entries)\n\
                   2026-01-01T00:00:00Z ERROR lb_agent::agent: invalid object, not programmed: bench/x: spec.ports[0].port: 0\n\
                   2026-01-01T00:00:00Z  INFO lb_agent::agent: ready\n";
        assert_eq!(
            refusals(log),
            ["bench/svc-000009: spec.ports[0]: not programmed: LB4_SERVICES is full (5 entries)"]
        );
    }

    #[test]
    fn reads_cpu_time() {
        let stat = "1234 (lb agent) S 1 1234 1234 0 -1 4194560 2000 0 0 0 250 130 0 0 20 0 5 0";
        assert_eq!(cpu_time(stat), Some(Duration::from_millis(3800)));
    }

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tlb-agent\nVmPeak:\t  100 kB\nVmHWM:\t   30000 kB\nVmRSS:\t   23456 kB\nThreads:\t4\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(23456));
        assert_eq!(status_kib(status, "VmHWM"), Some(30000));
    }

    #[test]
    fn stats_differences_per_program() {
        let before = ProgStats([("lb_connect4".to_owned(), (10, 1000))].into());
        let after = ProgStats(
            [
                ("lb_connect4".to_owned(), (30, 3000)),
                ("lb_sock_release".to_owned(), (5, 50)),
            ]
            .into(),
        );
        let delta = after.since(&before);
        assert_eq!(delta.0["lb_connect4"], (20, 2000));
        assert_eq!(delta.0["lb_sock_release"], (5, 50));
    }
}
