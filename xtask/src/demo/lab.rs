//! The demo's machine-side world: network namespaces on a bridge, a cgroup, a bpffs pin
//! directory, a scratch directory and the long-running processes (agent, web servers).
//!
//! Every name starts with `lbdemo`. [`Lab`] is the guard (see [`crate::lab`]): its `Drop` (and
//! the Ctrl-C/SIGTERM handler) kills the processes and removes everything carrying the prefix,
//! so the teardown is idempotent and also clears what an earlier, killed run left behind.
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context as _, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd;
pub use crate::lab::netns_path;
use crate::lab::{World, ip, ip_in, remove_dir_if_present};

pub const PREFIX: &str = "lbdemo";
pub const NODE_NETNS: &str = "lbdemo-node";
pub const PIN_DIR: &str = "/sys/fs/bpf/lbdemo";
pub const RUN_DIR: &str = "/run/lbdemo";
/// A machine outside the node (a laptop on the node's network), joined to its `ext0`.
pub const OUTSIDE_NETNS: &str = "lbdemo-outside";
/// The node's external device, where the tc datapath sits.
pub const EXT_DEVICE: &str = "ext0";
/// The node's address on its external network.
pub const NODE_EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const AGENT_PID_FILE: &str = "agent.pid";

/// The demo's lab.
pub type Lab = crate::lab::Lab<Paths>;

/// Paths the demo works with.
pub struct Paths {
    /// `<cgroup2 mount>/lbdemo`, where the agent attaches and the client runs.
    pub cgroup: PathBuf,
    pub agent_bin: PathBuf,
    pub testkit_bin: PathBuf,
}

impl Paths {
    pub fn run_dir() -> &'static Path {
        Path::new(RUN_DIR)
    }

    /// The directory the agent watches.
    pub fn manifests() -> PathBuf {
        Self::run_dir().join("manifests")
    }

    pub fn log(name: &str) -> PathBuf {
        Self::run_dir().join(format!("{name}.log"))
    }
}

impl World for Paths {
    const PREFIX: &'static str = PREFIX;
    const NODE_NETNS: &'static str = NODE_NETNS;
    const PIN_DIR: &'static str = PIN_DIR;
    const RUN_DIR: &'static str = RUN_DIR;
    const CLEANUP_WHAT: &'static str = "namespaces, cgroup, pins and processes";
    const STOP_GRACE: Duration = Duration::from_secs(3);
    const STOP_POLL: Duration = Duration::from_millis(50);
    const DIE_WITH_PARENT: bool = false;
    const PIN_CLEANUP_IN_NODE: bool = true;

    fn cgroups(&self) -> Vec<&Path> {
        vec![&self.cgroup]
    }

    fn agent_bin(&self) -> &Path {
        &self.agent_bin
    }

    fn log(name: &str) -> PathBuf {
        Self::log(name)
    }

    fn scratch_dir() -> PathBuf {
        Self::manifests()
    }

    /// The agent of an earlier run goes before its pins.
    fn remove_first(&self) {
        stop_recorded_agent();
    }

    fn remove_last(&self) {
        remove_resolv_confs();
    }

    /// The logs stay for reading.
    fn clear_run_dir(&self) {
        remove_dir_if_present(&Self::manifests());
        let _ = std::fs::remove_file(Self::run_dir().join(AGENT_PID_FILE));
    }
}

/// Where `ip netns exec` finds a pod's own resolv.conf.
pub fn resolv_conf_dir(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

/// Removes the demo's `/etc/netns/<PREFIX>-*` directories.
fn remove_resolv_confs() {
    let Ok(entries) = std::fs::read_dir("/etc/netns") else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{PREFIX}-"))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The network namespace of a pod.
pub fn pod_netns(pod: &str) -> String {
    format!("{PREFIX}-{pod}")
}

impl Lab {
    /// The outside machine: `lbdemo-outside` at 192.168.50.2/24, joined by a veth to the node's
    /// `ext0` (192.168.50.1/24); the node forwards, as a Kubernetes node does.
    pub fn add_outside(&self) -> Result<()> {
        self.guarded(|| {
            ip(&["netns", "add", OUTSIDE_NETNS])?;
            ip_in(OUTSIDE_NETNS, &["link", "set", "lo", "up"])?;
            ip_in(
                NODE_NETNS,
                &[
                    "link",
                    "add",
                    EXT_DEVICE,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    OUTSIDE_NETNS,
                ],
            )?;
            let node = format!("{NODE_EXT_IP}/24");
            ip_in(NODE_NETNS, &["addr", "add", &node, "dev", EXT_DEVICE])?;
            ip_in(NODE_NETNS, &["link", "set", EXT_DEVICE, "up"])?;
            let outside = format!("{OUTSIDE_IP}/24");
            ip_in(OUTSIDE_NETNS, &["addr", "add", &outside, "dev", "eth0"])?;
            ip_in(OUTSIDE_NETNS, &["link", "set", "eth0", "up"])?;
            cmd::output(Command::new("ip").args([
                "netns",
                "exec",
                NODE_NETNS,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]))
            .map(drop)
        })
    }

    /// Records the agent's pid so a later run can stop it if this one dies without cleaning up.
    pub fn write_agent_pid(pid: u32) -> Result<()> {
        let file = Paths::run_dir().join(AGENT_PID_FILE);
        std::fs::write(&file, pid.to_string())
            .with_context(|| format!("cannot write {}", file.display()))
    }
}

fn stop_recorded_agent() {
    let file = Paths::run_dir().join(AGENT_PID_FILE);
    let Ok(text) = std::fs::read_to_string(&file) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("lb-agent") {
        eprintln!("stopping the agent left by an earlier run (pid {pid})");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(file);
}
