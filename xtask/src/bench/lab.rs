//! The bench's world: a node namespace with a bridge, backend pods, one client pod per variant,
//! two cgroups, two bpffs pin directories (one per agent), a scratch directory and the
//! long-running processes (the two agents, the echo servers). Every name starts with `lbbench`.
//!
//! ```text
//!  lbbench-be0..9   10.244.1.1..10  ─┐                          ┌─ lbbench-direct 10.244.0.2
//!  (lb-loadgen serve: TCP 8080,      ├─ br0 10.244.0.1/16 in ───┼─ lbbench-sock   10.244.0.3
//!   UDP 5353)                        │  lbbench-node (agents)   ├─ lbbench-tc     10.244.0.4
//!                                                               ├─ lbbench-iptl   10.244.0.5 …
//! ```
//! The socket LB's agent attaches to the `lbbench` cgroup, which only the socket client joins;
//! the tc LB's agent (`--socket-lb off`) attaches to the tc client's veth only. Each has its own
//! pin directory, so their maps are separate and they never see each other's traffic.
//! [`Lab`] is the guard (see [`crate::lab`]): creating it takes a lock (one bench at a time),
//! removes what an earlier run left and installs the Ctrl-C/SIGTERM handler; dropping it (or the
//! handler) stops the processes and removes everything. No rule is ever written outside these
//! namespaces.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use nix::fcntl::{Flock, FlockArg};

pub use crate::lab::{AGENT, die_with_parent, in_netns, remove_pins, sysctl_in};
use crate::lab::{World, remove_dir_if_present, remove_pin_dir, warn};

pub const PREFIX: &str = "lbbench";
pub const NODE_NETNS: &str = "lbbench-node";
/// The socket LB agent's pins.
pub const PIN_DIR: &str = "/sys/fs/bpf/lbbench";
/// The tc LB agent's pins (its own maps).
pub const TC_PIN_DIR: &str = "/sys/fs/bpf/lbbench-tc";
/// The tc LB agent's process (and log) name.
pub const TC_AGENT: &str = "agent-tc";
pub const RUN_DIR: &str = "/run/lbbench";
const LOCK_FILE: &str = "/run/lbbench.lock";
/// Where `kernel.bpf_stats_enabled` was before the bench set it (restored on teardown, also by
/// the next run when this one was killed).
const BPF_STATS_SAVED: &str = "/run/lbbench.bpf_stats_enabled";
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The bench's lab.
pub type Lab = crate::lab::Lab<Paths>;

/// Takes the lock (one bench at a time), then starts the lab, which keeps the lock.
pub fn start(paths: Paths) -> Result<Lab> {
    Lab::start_holding(paths, lock()?)
}

/// The bench's lock, held until dropped: one bench (or soak) at a time on a machine.
pub fn lock() -> Result<Flock<File>> {
    let lock = File::create(LOCK_FILE).with_context(|| format!("cannot create {LOCK_FILE}"))?;
    Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!("another `cargo xtask bench` holds {LOCK_FILE} ({errno})")
    })
}

/// Paths the bench works with.
pub struct Paths {
    /// `<cgroup2>/lbbench`: the agent attaches here; only the socket-LB client joins it.
    pub agent_cgroup: PathBuf,
    /// `<cgroup2>/lbbench-plain`: every other client (no program attached).
    pub plain_cgroup: PathBuf,
    pub agent_bin: PathBuf,
    pub loadgen_bin: PathBuf,
}

impl Paths {
    pub fn run_dir() -> &'static Path {
        Path::new(RUN_DIR)
    }

    pub fn logs() -> PathBuf {
        Self::run_dir().join("logs")
    }

    pub fn log(name: &str) -> PathBuf {
        Self::logs().join(format!("{name}.log"))
    }
}

impl World for Paths {
    const PREFIX: &'static str = PREFIX;
    const NODE_NETNS: &'static str = NODE_NETNS;
    const PIN_DIR: &'static str = PIN_DIR;
    const RUN_DIR: &'static str = RUN_DIR;
    const CLEANUP_WHAT: &'static str = "namespaces, cgroups, pins and processes";
    const STOP_GRACE: Duration = Duration::from_secs(5);
    const STOP_POLL: Duration = Duration::from_millis(20);
    /// Killed with the bench, even by a `kill -9`.
    const DIE_WITH_PARENT: bool = true;
    const PIN_CLEANUP_IN_NODE: bool = false;

    fn cgroups(&self) -> Vec<&Path> {
        vec![&self.agent_cgroup, &self.plain_cgroup]
    }

    fn agent_bin(&self) -> &Path {
        &self.agent_bin
    }

    fn log(name: &str) -> PathBuf {
        Self::log(name)
    }

    fn scratch_dir() -> PathBuf {
        Self::logs()
    }

    fn prepare(&self) -> Result<()> {
        save_bpf_stats_setting()
    }

    /// The tc agent's pins (the socket agent's go next, as in every lab).
    fn remove_first(&self) {
        remove_pin_dir(self, Path::new(TC_PIN_DIR));
    }

    fn remove_last(&self) {
        restore_bpf_stats_setting();
    }

    /// The logs stay in `/run/lbbench/logs` for reading; the large generated inputs go.
    fn clear_run_dir(&self) {
        if let Ok(entries) = std::fs::read_dir(Self::run_dir()) {
            for entry in entries.flatten() {
                if entry.file_name() != "logs" {
                    remove_dir_if_present(&entry.path());
                }
            }
        }
    }
}

/// The node routes, as a node does: the tc LB's translated packets (to a backend, with the
/// gateway's MAC address) go through its IP stack, in and out of the bridge. No ICMP redirects
/// for that hairpin: the client reaches the backend through the node on purpose.
pub fn enable_forwarding() -> Result<()> {
    sysctl_in(NODE_NETNS, "net.ipv4.ip_forward", "1")?;
    sysctl_in(NODE_NETNS, "net.ipv4.conf.all.send_redirects", "0")?;
    sysctl_in(NODE_NETNS, "net.ipv4.conf.br0.send_redirects", "0")
}

/// Both agents' programs and pins (`lb-agent cleanup` of each pin directory).
pub fn remove_all_pins(paths: &Paths) {
    remove_pin_dir(paths, Path::new(TC_PIN_DIR));
    remove_pins(paths);
}

/// Removes `/run/lbbench` with the logs (after a successful run).
pub fn remove_run_dir() {
    remove_dir_if_present(Paths::run_dir());
}

/// Remembers `kernel.bpf_stats_enabled` (unless a killed run already did) so the teardown can
/// put it back.
fn save_bpf_stats_setting() -> Result<()> {
    if Path::new(BPF_STATS_SAVED).exists() {
        return Ok(());
    }
    let value = std::fs::read_to_string(BPF_STATS_SYSCTL)
        .with_context(|| format!("cannot read {BPF_STATS_SYSCTL}"))?;
    std::fs::write(BPF_STATS_SAVED, value.trim())
        .with_context(|| format!("cannot write {BPF_STATS_SAVED}"))
}

/// Turns BPF run-time statistics on (`run_time_ns`/`run_cnt` in `bpftool prog show`).
pub fn enable_bpf_stats() -> Result<()> {
    std::fs::write(BPF_STATS_SYSCTL, "1")
        .with_context(|| format!("cannot write {BPF_STATS_SYSCTL}"))
}

fn restore_bpf_stats_setting() {
    let Ok(saved) = std::fs::read_to_string(BPF_STATS_SAVED) else {
        return;
    };
    warn(
        std::fs::write(BPF_STATS_SYSCTL, saved.trim())
            .with_context(|| format!("cannot restore {BPF_STATS_SYSCTL}")),
    );
    let _ = std::fs::remove_file(BPF_STATS_SAVED);
}
