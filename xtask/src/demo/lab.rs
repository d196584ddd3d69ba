//! The demo's machine-side world: network namespaces on a bridge, a cgroup, a bpffs pin
//! directory, a scratch directory and the long-running processes (agent, web servers).
//!
//! Every name starts with `lbdemo`. [`Lab`] is the guard: its `Drop` (and the Ctrl-C/SIGTERM
//! handler) kills the processes and removes everything carrying the prefix, so the teardown is
//! idempotent and also clears what an earlier, killed run left behind.
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{cmd, host};

pub const PREFIX: &str = "lbdemo";
pub const NODE_NETNS: &str = "lbdemo-node";
pub const PIN_DIR: &str = "/sys/fs/bpf/lbdemo";
pub const RUN_DIR: &str = "/run/lbdemo";
const NETNS_DIR: &str = "/run/netns";
const BRIDGE: &str = "br0";
/// The bridge's address: the pods' gateway ("the node").
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const POD_PREFIX_LEN: u8 = 16;
/// A machine outside the node (a laptop on the node's network), joined to its `ext0`.
pub const OUTSIDE_NETNS: &str = "lbdemo-outside";
/// The node's external device, where the tc datapath sits.
pub const EXT_DEVICE: &str = "ext0";
/// The node's address on its external network.
pub const NODE_EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const AGENT_PID_FILE: &str = "agent.pid";

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

/// `/run/netns/lbdemo-<name>`: what `nsenter --net=` and `setns` take.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

/// The network namespace of a pod.
pub fn pod_netns(pod: &str) -> String {
    format!("{PREFIX}-{pod}")
}

/// A long-running process the lab owns.
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
    /// veth names in the node namespace are `veth<N>`.
    next_veth: u32,
}

struct Inner {
    paths: Paths,
    state: Mutex<State>,
    /// Set by the signal handler before it tears down and exits.
    interrupted: AtomicBool,
}

/// The guard: creating it clears leftovers and installs the signal handler; dropping it tears
/// everything down.
pub struct Lab {
    inner: Arc<Inner>,
}

impl Lab {
    pub fn start(paths: Paths) -> Result<Self> {
        remove_everything(&paths, true);
        let inner = Arc::new(Inner {
            paths,
            state: Mutex::new(State::default()),
            interrupted: AtomicBool::new(false),
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

    /// Call on an error before reporting it. A Ctrl-C also kills the foreground command
    /// (curl), so the error may only be the signal's echo. In that case this waits for the
    /// handler, which tears down and exits with 130, instead of reporting a misleading error.
    pub fn defer_to_signal_handler(&self) {
        sleep(Duration::from_millis(300));
        while self.inner.interrupted.load(Ordering::SeqCst) {
            std::thread::park();
        }
    }

    pub fn paths(&self) -> &Paths {
        &self.inner.paths
    }

    /// bpffs, the cgroup, the scratch directory and the node namespace with its bridge.
    fn prepare(&self) -> Result<()> {
        self.create(|_| {
            host::ensure_bpffs()?;
            let cgroup = &self.paths().cgroup;
            std::fs::create_dir_all(cgroup)
                .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
            std::fs::create_dir_all(PIN_DIR).with_context(|| format!("cannot create {PIN_DIR}"))?;
            std::fs::create_dir_all(Paths::manifests())
                .with_context(|| format!("cannot create {}", Paths::manifests().display()))?;
            ip(&["netns", "add", NODE_NETNS])?;
            ip_in(NODE_NETNS, &["link", "set", "lo", "up"])?;
            ip_in(NODE_NETNS, &["link", "add", BRIDGE, "type", "bridge"])?;
            let gateway = format!("{GATEWAY}/{POD_PREFIX_LEN}");
            ip_in(NODE_NETNS, &["addr", "add", &gateway, "dev", BRIDGE])?;
            ip_in(NODE_NETNS, &["link", "set", BRIDGE, "up"])
        })
    }

    /// A pod's network namespace: `eth0` with `ip`/16, a veth to the bridge, a default route
    /// via the bridge. Nothing routes out of the machine.
    pub fn add_pod_netns(&self, netns: &str, address: Ipv4Addr) -> Result<()> {
        self.create(|state| {
            let veth = format!("veth{}", state.next_veth);
            state.next_veth += 1;
            ip(&["netns", "add", netns])?;
            ip_in(
                NODE_NETNS,
                &["link", "add", &veth, "type", "veth", "peer", "name", "eth0"],
            )?;
            ip_in(NODE_NETNS, &["link", "set", "eth0", "netns", netns])?;
            ip_in(NODE_NETNS, &["link", "set", &veth, "master", BRIDGE, "up"])?;
            ip_in(netns, &["link", "set", "lo", "up"])?;
            ip_in(
                netns,
                &[
                    "addr",
                    "add",
                    &format!("{address}/{POD_PREFIX_LEN}"),
                    "dev",
                    "eth0",
                ],
            )?;
            ip_in(netns, &["link", "set", "eth0", "up"])?;
            ip_in(
                netns,
                &["route", "add", "default", "via", &GATEWAY.to_string()],
            )
        })
    }

    /// The outside machine: `lbdemo-outside` at 192.168.50.2/24, joined by a veth to the node's
    /// `ext0` (192.168.50.1/24); the node forwards, as a Kubernetes node does.
    pub fn add_outside(&self) -> Result<()> {
        self.create(|_| {
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

    /// Removes a pod's namespace (its veth goes with it), as the kubelet removes the sandbox.
    pub fn del_pod_netns(&self, netns: &str) -> Result<()> {
        self.create(|_| {
            kill_netns_processes(netns);
            ip(&["netns", "del", netns])
        })
    }

    /// Starts a long-running process in its own process group, output to `<RUN_DIR>/<name>.log`.
    pub fn spawn(&self, name: &str, mut command: Command) -> Result<u32> {
        use std::os::unix::process::CommandExt as _;
        self.create(|state| {
            let log = File::create(Paths::log(name))
                .with_context(|| format!("cannot create {}", Paths::log(name).display()))?;
            command
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0);
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

    /// Records the agent's pid so a later run can stop it if this one dies without cleaning up.
    pub fn write_agent_pid(pid: u32) -> Result<()> {
        let file = Paths::run_dir().join(AGENT_PID_FILE);
        std::fs::write(&file, pid.to_string())
            .with_context(|| format!("cannot write {}", file.display()))
    }

    /// Stops the process started as `name` (SIGTERM, then SIGKILL after 3 s).
    pub fn stop(&self, name: &str) -> Result<()> {
        self.create(|state| {
            let at = state.children.iter().position(|t| t.name == name);
            let tracked = at
                .map(|at| state.children.remove(at))
                .with_context(|| format!("no process named {name}"))?;
            terminate(tracked);
            Ok(())
        })
    }

    /// `Some(status)` once the process started as `name` has exited.
    pub fn exited(&self, name: &str) -> Option<String> {
        let mut state = self.inner.lock();
        let tracked = state.children.iter_mut().find(|t| t.name == name)?;
        let status = tracked.child.try_wait().ok()??;
        Some(status.to_string())
    }

    /// Runs `f` under the state lock unless the teardown has begun, so that the signal
    /// handler never races a half-created namespace or process.
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

    /// Idempotent: the first call stops everything, later calls return at once.
    fn teardown(&self) {
        let mut state = self.lock();
        state.stopping = true;
        if state.torn_down {
            return;
        }
        state.torn_down = true;
        println!("cleaning up the {PREFIX} namespaces, cgroup, pins and processes");
        // The agent first, so that it stops writing maps before the pins go.
        state.children.sort_by_key(|t| t.name != "agent");
        for tracked in state.children.drain(..) {
            terminate(tracked);
        }
        remove_everything(&self.paths, false);
    }
}

/// SIGTERM, up to 3 s to exit, then SIGKILL; always reaps.
fn terminate(mut tracked: Tracked) {
    if let Ok(Some(_)) = tracked.child.try_wait() {
        return;
    }
    let Ok(raw) = i32::try_from(tracked.child.id()) else {
        return;
    };
    let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = tracked.child.try_wait() {
            return;
        }
        sleep(Duration::from_millis(50));
    }
    eprintln!("{} did not stop on SIGTERM: killing it", tracked.name);
    let _ = tracked.child.kill();
    let _ = tracked.child.wait();
}

/// Removes everything carrying the prefix: the agent of an earlier run, the pins (via
/// `lb-agent cleanup`), the namespaces and their processes, the cgroup and the scratch files.
/// `whole_run_dir` also removes the logs (at start; after a run they stay for reading).
fn remove_everything(paths: &Paths, whole_run_dir: bool) {
    stop_recorded_agent();
    remove_pins(paths);
    for netns in leftover_netns() {
        kill_netns_processes(&netns);
        warn(cmd::cleanup(
            Command::new("ip").args(["netns", "del", &netns]),
        ));
    }
    remove_cgroup(&paths.cgroup);
    let run_dir = Paths::run_dir();
    if whole_run_dir {
        remove_dir_if_present(run_dir);
    } else {
        remove_dir_if_present(&Paths::manifests());
        let _ = std::fs::remove_file(run_dir.join(AGENT_PID_FILE));
    }
}

fn warn(result: Result<()>) {
    if let Err(error) = result {
        eprintln!("warning: {error:#}");
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

/// `lb-agent cleanup` detaches and unpins what the agent made; then the directory goes.
/// It runs in the node namespace while that exists, where the agent's devices are.
fn remove_pins(paths: &Paths) {
    let pins = Path::new(PIN_DIR);
    if !pins.exists() {
        return;
    }
    if paths.agent_bin.is_file() {
        let mut cleanup = if netns_path(NODE_NETNS).exists() {
            let mut nsenter = Command::new("nsenter");
            nsenter
                .arg(format!("--net={}", netns_path(NODE_NETNS).display()))
                .arg(&paths.agent_bin);
            nsenter
        } else {
            Command::new(&paths.agent_bin)
        };
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

/// SIGKILL for every process in the namespace (servers a killed run left behind).
fn kill_netns_processes(netns: &str) {
    let Ok(pids) = cmd::output(Command::new("ip").args(["netns", "pids", netns])) else {
        return;
    };
    for pid in pids.split_whitespace().filter_map(|pid| pid.parse().ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// A cgroup directory can be removed once no process is in it (control files stay).
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
    if dir.exists() {
        warn(
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display())),
        );
    }
}

fn ip(args: &[&str]) -> Result<()> {
    cmd::output(Command::new("ip").args(args)).map(drop)
}

/// `ip -n NETNS ...`
fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    cmd::output(Command::new("ip").args(["-n", netns]).args(args)).map(drop)
}
