//! The bench's world: a node namespace with a bridge, backend pods, one client pod per variant,
//! two cgroups, a bpffs pin directory, a scratch directory and the long-running processes (the
//! agent, the echo servers). Every name starts with `lbbench`.
//!
//! ```text
//!  lbbench-be0..9   10.244.1.1..10  ─┐                          ┌─ lbbench-direct 10.244.0.2
//!  (lb-loadgen serve: TCP 8080,      ├─ br0 10.244.0.1/16 in ───┼─ lbbench-sock   10.244.0.3
//!   UDP 5353)                        │  lbbench-node (agent)    ├─ lbbench-iptl   10.244.0.4 …
//! ```
//! [`Lab`] is the guard: creating it takes a lock (one bench at a time), removes what an earlier
//! run left and installs the Ctrl-C/SIGTERM handler; dropping it (or the handler) stops the
//! processes and removes everything. No rule is ever written outside these namespaces.
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{cmd, host};

pub const PREFIX: &str = "lbbench";
pub const NODE_NETNS: &str = "lbbench-node";
pub const PIN_DIR: &str = "/sys/fs/bpf/lbbench";
pub const RUN_DIR: &str = "/run/lbbench";
const LOCK_FILE: &str = "/run/lbbench.lock";
const NETNS_DIR: &str = "/run/netns";
const BRIDGE: &str = "br0";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const POD_PREFIX_LEN: u8 = 16;
/// Where `kernel.bpf_stats_enabled` was before the bench set it (restored on teardown, also by
/// the next run when this one was killed).
const BPF_STATS_SAVED: &str = "/run/lbbench.bpf_stats_enabled";
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The agent's process name in the lab.
pub const AGENT: &str = "agent";

/// `/run/netns/NAME`.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
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

struct Tracked {
    name: String,
    child: Child,
}

#[derive(Default)]
struct State {
    children: Vec<Tracked>,
    /// Set when the teardown starts: nothing new may be created after it.
    stopping: bool,
    torn_down: bool,
    next_veth: u32,
}

struct Inner {
    paths: Paths,
    state: Mutex<State>,
    interrupted: AtomicBool,
    _lock: Flock<File>,
}

pub struct Lab {
    inner: Arc<Inner>,
}

impl Lab {
    pub fn start(paths: Paths) -> Result<Self> {
        let lock = File::create(LOCK_FILE).with_context(|| format!("cannot create {LOCK_FILE}"))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            anyhow::anyhow!("another `cargo xtask bench` holds {LOCK_FILE} ({errno})")
        })?;
        remove_everything(&paths, true);
        let inner = Arc::new(Inner {
            paths,
            state: Mutex::new(State::default()),
            interrupted: AtomicBool::new(false),
            _lock: lock,
        });
        let on_signal = Arc::clone(&inner);
        ctrlc::set_handler(move || {
            on_signal.interrupted.store(true, Ordering::SeqCst);
            eprintln!("\ninterrupted: cleaning up");
            on_signal.teardown();
            std::process::exit(130);
        })
        .context("cannot install the Ctrl-C handler")?;
        let lab = Self { inner };
        lab.prepare()?;
        Ok(lab)
    }

    /// After an error: if it was the echo of a Ctrl-C, let the handler finish and exit.
    pub fn defer_to_signal_handler(&self) {
        sleep(Duration::from_millis(300));
        while self.inner.interrupted.load(Ordering::SeqCst) {
            std::thread::park();
        }
    }

    pub fn paths(&self) -> &Paths {
        &self.inner.paths
    }

    fn prepare(&self) -> Result<()> {
        self.create(|_| {
            host::ensure_bpffs()?;
            for cgroup in [&self.paths().agent_cgroup, &self.paths().plain_cgroup] {
                std::fs::create_dir_all(cgroup)
                    .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
            }
            std::fs::create_dir_all(PIN_DIR).with_context(|| format!("cannot create {PIN_DIR}"))?;
            std::fs::create_dir_all(Paths::logs())
                .with_context(|| format!("cannot create {}", Paths::logs().display()))?;
            save_bpf_stats_setting()?;
            ip(&["netns", "add", NODE_NETNS])?;
            ip_in(NODE_NETNS, &["link", "set", "lo", "up"])?;
            ip_in(NODE_NETNS, &["link", "add", BRIDGE, "type", "bridge"])?;
            let gateway = format!("{GATEWAY}/{POD_PREFIX_LEN}");
            ip_in(NODE_NETNS, &["addr", "add", &gateway, "dev", BRIDGE])?;
            ip_in(NODE_NETNS, &["link", "set", BRIDGE, "up"])
        })
    }

    /// A pod namespace `netns` with `eth0` = `address`/16 on a veth to the bridge and a default
    /// route via the bridge; nothing routes out of the machine.
    pub fn add_pod(&self, netns: &str, address: Ipv4Addr) -> Result<()> {
        self.create(|state| {
            let veth = format!("veth{}", state.next_veth);
            state.next_veth += 1;
            ip(&["netns", "add", netns])?;
            ip_in(
                NODE_NETNS,
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
                ],
            )?;
            ip_in(NODE_NETNS, &["link", "set", &veth, "master", BRIDGE, "up"])?;
            ip_in(netns, &["link", "set", "lo", "up"])?;
            let cidr = format!("{address}/{POD_PREFIX_LEN}");
            ip_in(netns, &["addr", "add", &cidr, "dev", "eth0"])?;
            ip_in(netns, &["link", "set", "eth0", "up"])?;
            ip_in(
                netns,
                &["route", "add", "default", "via", &GATEWAY.to_string()],
            )
        })
    }

    /// Starts a long-running process in its own process group (output to its log), killed
    /// with the bench.
    pub fn spawn(&self, name: &str, mut command: Command) -> Result<u32> {
        self.create(|state| {
            let log = File::create(Paths::log(name))
                .with_context(|| format!("cannot create {}", Paths::log(name).display()))?;
            command
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0);
            die_with_parent(&mut command);
            let child = command
                .spawn()
                .with_context(|| format!("cannot start `{}`", cmd::describe(&command)))?;
            let pid = child.id();
            state.children.push(Tracked {
                name: name.to_owned(),
                child,
            });
            Ok(pid)
        })
    }

    /// Stops the process started as `name` (SIGTERM, SIGKILL after 5 s); a no-op if unknown.
    pub fn stop(&self, name: &str) {
        let tracked = {
            let mut state = self.inner.lock();
            let at = state.children.iter().position(|t| t.name == name);
            at.map(|at| state.children.remove(at))
        };
        if let Some(tracked) = tracked {
            terminate(tracked);
        }
    }

    /// `Some(status)` once the process started as `name` has exited.
    pub fn exited(&self, name: &str) -> Option<String> {
        let mut state = self.inner.lock();
        let tracked = state.children.iter_mut().find(|t| t.name == name)?;
        let status = tracked.child.try_wait().ok()??;
        Some(status.to_string())
    }

    /// Runs `f` under the state lock unless the teardown has begun.
    fn create<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut state = self.inner.lock();
        if state.stopping {
            bail!("interrupted");
        }
        f(&mut state)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.inner.teardown();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn teardown(&self) {
        let mut state = self.lock();
        state.stopping = true;
        if state.torn_down {
            return;
        }
        state.torn_down = true;
        println!("cleaning up the {PREFIX} namespaces, cgroups, pins and processes");
        state.children.sort_by_key(|t| t.name != AGENT);
        for tracked in state.children.drain(..) {
            terminate(tracked);
        }
        remove_everything(&self.paths, false);
    }
}

/// SIGKILL for the child if this process dies first (a `kill -9` of the bench).
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// SIGTERM, up to 5 s to exit, then SIGKILL; always reaps.
fn terminate(mut tracked: Tracked) {
    if let Ok(Some(_)) = tracked.child.try_wait() {
        return;
    }
    let Ok(raw) = i32::try_from(tracked.child.id()) else {
        return;
    };
    let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = tracked.child.try_wait() {
            return;
        }
        sleep(Duration::from_millis(20));
    }
    eprintln!("{} did not stop on SIGTERM: killing it", tracked.name);
    let _ = tracked.child.kill();
    let _ = tracked.child.wait();
}

/// Removes everything carrying the prefix. `at_start` also removes the logs (after a run they
/// stay in `/run/lbbench/logs` for reading; the large generated inputs go).
fn remove_everything(paths: &Paths, at_start: bool) {
    remove_pins(paths);
    for netns in leftover_netns() {
        kill_netns_processes(&netns);
        warn(cmd::cleanup(
            Command::new("ip").args(["netns", "del", &netns]),
        ));
    }
    for cgroup in [&paths.agent_cgroup, &paths.plain_cgroup] {
        remove_cgroup(cgroup);
    }
    restore_bpf_stats_setting();
    let run_dir = Paths::run_dir();
    if at_start {
        remove_dir_if_present(run_dir);
    } else if let Ok(entries) = std::fs::read_dir(run_dir) {
        for entry in entries.flatten() {
            if entry.file_name() != "logs" {
                remove_dir_if_present(&entry.path());
            }
        }
    }
}

/// Removes `/run/lbbench` with the logs (after a successful run).
pub fn remove_run_dir() {
    remove_dir_if_present(Paths::run_dir());
}

fn warn(result: Result<()>) {
    if let Err(error) = result {
        eprintln!("warning: {error:#}");
    }
}

/// `lb-agent cleanup` detaches and unpins what the agent made; then the directory goes.
pub fn remove_pins(paths: &Paths) {
    let pins = Path::new(PIN_DIR);
    if !pins.exists() {
        return;
    }
    if paths.agent_bin.is_file() {
        let mut cleanup = Command::new(&paths.agent_bin);
        cleanup.args(["cleanup", "--bpf-pin-path", PIN_DIR]);
        warn(cmd::cleanup(&mut cleanup));
    }
    if pins.exists() {
        warn(std::fs::remove_dir_all(pins).with_context(|| format!("cannot remove {PIN_DIR}")));
    }
}

fn leftover_netns() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let prefix = format!("{PREFIX}-");
    let mut names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix))
        .collect();
    // Pods before the node: their veths end on its bridge.
    names.sort_by_key(|name| name == NODE_NETNS);
    names
}

/// SIGKILL for every process in the namespace (servers and clients of a killed run).
fn kill_netns_processes(netns: &str) {
    let Ok(pids) = cmd::output(Command::new("ip").args(["netns", "pids", netns])) else {
        return;
    };
    for pid in pids.split_whitespace().filter_map(|pid| pid.parse().ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Kills what is left in the cgroup, then removes the directory.
fn remove_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    let procs = cgroup.join("cgroup.procs");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = std::fs::read_to_string(&procs).unwrap_or_default();
        if pids.trim().is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids.split_whitespace().filter_map(|pid| pid.parse().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        sleep(Duration::from_millis(50));
    }
    warn(
        std::fs::remove_dir(cgroup)
            .with_context(|| format!("cannot remove cgroup {}", cgroup.display())),
    );
}

fn remove_dir_if_present(dir: &Path) {
    let result = if dir.is_dir() {
        std::fs::remove_dir_all(dir)
    } else if dir.exists() {
        std::fs::remove_file(dir)
    } else {
        return;
    };
    warn(result.with_context(|| format!("cannot remove {}", dir.display())));
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

fn ip(args: &[&str]) -> Result<()> {
    cmd::output(Command::new("ip").args(args)).map(drop)
}

/// `ip -n NETNS ...`
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    cmd::output(Command::new("ip").args(["-n", netns]).args(args)).map(drop)
}

/// A command run inside `netns` (`nsenter --net`, which keeps this machine's mounts).
pub fn in_netns(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns_path(netns).display()))
        .arg(program);
    command
}

/// Sets a namespaced sysctl inside `netns`.
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    cmd::output(in_netns(netns, "sysctl").args(["-q", "-w", &format!("{key}={value}")])).map(drop)
}
