//! The machine-side world shared by `cargo xtask demo` and `cargo xtask bench`: a node network
//! namespace with a bridge, pod namespaces on it, cgroups, a bpffs pin directory, a scratch
//! directory and the long-running processes (the agent, the servers).
//!
//! Every name starts with the [`World`]'s prefix. [`Lab`] is the guard: creating it removes what
//! an earlier, killed run left and installs the Ctrl-C/SIGTERM handler; dropping it (or the
//! handler) kills the processes and removes everything carrying the prefix, so the teardown is
//! idempotent.
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
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{cmd, host};

const NETNS_DIR: &str = "/run/netns";
const BRIDGE: &str = "br0";
/// The bridge's address: the pods' gateway ("the node").
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const POD_PREFIX_LEN: u8 = 16;
/// The agent's process (and log) name in a lab.
pub const AGENT: &str = "agent";

/// What one lab (the demo's, the bench's) names and keeps, and what it does besides the
/// common set-up and teardown. `Self` is the lab's paths, held by the [`Lab`].
pub trait World: Send + Sync + 'static {
    /// The prefix of every namespace, cgroup and directory (`lbdemo`, `lbbench`).
    const PREFIX: &'static str;
    /// `<PREFIX>-node`: the node namespace with the bridge.
    const NODE_NETNS: &'static str;
    /// `/sys/fs/bpf/<PREFIX>`.
    const PIN_DIR: &'static str;
    /// `/run/<PREFIX>`.
    const RUN_DIR: &'static str;
    /// What the teardown message says it removes.
    const CLEANUP_WHAT: &'static str;
    /// How long a process gets to exit on SIGTERM before SIGKILL, and how often to check.
    const STOP_GRACE: Duration;
    const STOP_POLL: Duration;
    /// Whether spawned processes get SIGKILL when this one dies (see [`die_with_parent`]).
    const DIE_WITH_PARENT: bool;
    /// Whether `lb-agent cleanup` runs in the node namespace (while it exists).
    const PIN_CLEANUP_IN_NODE: bool;

    /// The cgroups to create and remove.
    fn cgroups(&self) -> Vec<&Path>;
    fn agent_bin(&self) -> &Path;
    /// Where the output of the process started as `name` goes.
    fn log(name: &str) -> PathBuf;
    /// The scratch directory created (inside the run directory) before anything else.
    fn scratch_dir() -> PathBuf;
    /// Extra preparation after the directories, before the node namespace.
    fn prepare(&self) -> Result<()> {
        Ok(())
    }
    /// Extra removal before the pins go.
    fn remove_first(&self) {}
    /// Extra removal after the cgroups, before the run directory.
    fn remove_last(&self) {}
    /// What goes from the run directory after a run (at start it goes whole).
    fn clear_run_dir(&self);
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

struct Inner<W: World> {
    paths: W,
    state: Mutex<State>,
    /// Set by the signal handler before it tears down and exits.
    interrupted: AtomicBool,
    /// Whatever the lab keeps for its lifetime (the bench's lock).
    _held: Box<dyn Send + Sync>,
}

/// The guard: creating it clears leftovers and installs the signal handler; dropping it tears
/// everything down.
pub struct Lab<W: World> {
    inner: Arc<Inner<W>>,
}

impl<W: World> Lab<W> {
    pub fn start(paths: W) -> Result<Self> {
        Self::start_holding(paths, ())
    }

    /// Like [`Self::start`]; `held` is kept until the lab goes (or the process exits).
    pub fn start_holding(paths: W, held: impl Send + Sync + 'static) -> Result<Self> {
        remove_everything(&paths, true);
        let inner = Arc::new(Inner {
            paths,
            state: Mutex::new(State::default()),
            interrupted: AtomicBool::new(false),
            _held: Box::new(held),
        });
        let on_signal = Arc::clone(&inner);
        set_signal_teardown(Some(Box::new(move || {
            on_signal.interrupted.store(true, Ordering::SeqCst);
            eprintln!("\ninterrupted: cleaning up");
            on_signal.teardown();
        })))?;
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

    pub fn paths(&self) -> &W {
        &self.inner.paths
    }

    /// bpffs, the cgroups, the pin and scratch directories, then the node namespace with its
    /// bridge.
    fn prepare(&self) -> Result<()> {
        self.create(|_| {
            host::ensure_bpffs()?;
            for cgroup in self.paths().cgroups() {
                std::fs::create_dir_all(cgroup)
                    .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
            }
            let pins = W::PIN_DIR;
            std::fs::create_dir_all(pins).with_context(|| format!("cannot create {pins}"))?;
            let scratch = W::scratch_dir();
            std::fs::create_dir_all(&scratch)
                .with_context(|| format!("cannot create {}", scratch.display()))?;
            self.paths().prepare()?;
            let node = W::NODE_NETNS;
            ip(&["netns", "add", node])?;
            ip_in(node, &["link", "set", "lo", "up"])?;
            ip_in(node, &["link", "add", BRIDGE, "type", "bridge"])?;
            let gateway = format!("{GATEWAY}/{POD_PREFIX_LEN}");
            ip_in(node, &["addr", "add", &gateway, "dev", BRIDGE])?;
            ip_in(node, &["link", "set", BRIDGE, "up"])
        })
    }

    /// A pod namespace `netns` with `eth0` = `address`/16 on a veth to the bridge and a default
    /// route via the bridge; nothing routes out of the machine. Returns the name of the veth's
    /// node end (the pod's device, as the agent's `--pod-devices` names it).
    pub fn add_pod_netns(&self, netns: &str, address: Ipv4Addr) -> Result<String> {
        self.create(|state| {
            let veth = format!("veth{}", state.next_veth);
            state.next_veth += 1;
            let node = W::NODE_NETNS;
            ip(&["netns", "add", netns])?;
            ip_in(
                node,
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
                ],
            )?;
            ip_in(node, &["link", "set", &veth, "master", BRIDGE, "up"])?;
            ip_in(netns, &["link", "set", "lo", "up"])?;
            let cidr = format!("{address}/{POD_PREFIX_LEN}");
            ip_in(netns, &["addr", "add", &cidr, "dev", "eth0"])?;
            ip_in(netns, &["link", "set", "eth0", "up"])?;
            ip_in(
                netns,
                &["route", "add", "default", "via", &GATEWAY.to_string()],
            )?;
            Ok(veth)
        })
    }

    /// Removes a pod's namespace (its veth goes with it), as the kubelet removes the sandbox.
    pub fn del_pod_netns(&self, netns: &str) -> Result<()> {
        self.create(|_| {
            kill_netns_processes(netns);
            ip(&["netns", "del", netns])
        })
    }

    /// Starts a long-running process in its own process group, output to its log.
    pub fn spawn(&self, name: &str, mut command: Command) -> Result<u32> {
        self.create(|state| {
            let log = File::create(W::log(name))
                .with_context(|| format!("cannot create {}", W::log(name).display()))?;
            command
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0);
            if W::DIE_WITH_PARENT {
                die_with_parent(&mut command);
            }
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

    /// Stops the process started as `name` (SIGTERM, then SIGKILL after the grace period);
    /// fails if there is none or the teardown has begun.
    pub fn stop(&self, name: &str) -> Result<()> {
        self.create(|state| {
            let at = state.children.iter().position(|t| t.name == name);
            let tracked = at
                .map(|at| state.children.remove(at))
                .with_context(|| format!("no process named {name}"))?;
            terminate::<W>(tracked);
            Ok(())
        })
    }

    /// Stops the process started as `name` like [`Self::stop`]; a no-op if unknown.
    pub fn stop_if_running(&self, name: &str) {
        let tracked = {
            let mut state = self.inner.lock();
            let at = state.children.iter().position(|t| t.name == name);
            at.map(|at| state.children.remove(at))
        };
        if let Some(tracked) = tracked {
            terminate::<W>(tracked);
        }
    }

    /// `Some(status)` once the process started as `name` has exited.
    pub fn exited(&self, name: &str) -> Option<String> {
        let mut state = self.inner.lock();
        let tracked = state.children.iter_mut().find(|t| t.name == name)?;
        let status = tracked.child.try_wait().ok()??;
        Some(status.to_string())
    }

    /// Runs `f` like the lab's own steps: under the state lock, unless the teardown has begun.
    pub fn guarded<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.create(|_| f())
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

impl<W: World> Drop for Lab<W> {
    fn drop(&mut self) {
        self.inner.teardown();
        // A later lab of the same process (the bench runs the DNS bench after its own)
        // installs its teardown in turn.
        let _ = set_signal_teardown(None);
    }
}

/// What a Ctrl-C tears down: the lab of this process that runs now, if any.
type Teardown = Box<dyn Fn() + Send>;
static SIGNAL_TEARDOWN: Mutex<Option<Teardown>> = Mutex::new(None);
static SIGNAL_HANDLER: std::sync::OnceLock<std::result::Result<(), String>> =
    std::sync::OnceLock::new();

/// Makes `teardown` what a Ctrl-C runs before the process exits with 130. The handler is
/// installed once per process (the `ctrlc` crate allows one); the labs take turns in it.
fn set_signal_teardown(teardown: Option<Teardown>) -> Result<()> {
    *SIGNAL_TEARDOWN
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = teardown;
    SIGNAL_HANDLER
        .get_or_init(|| {
            ctrlc::set_handler(|| {
                if let Some(teardown) = SIGNAL_TEARDOWN
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                {
                    teardown();
                }
                std::process::exit(130);
            })
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(anyhow::Error::msg)
        .context("cannot install the Ctrl-C handler")
}

impl<W: World> Inner<W> {
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
        println!("cleaning up the {} {}", W::PREFIX, W::CLEANUP_WHAT);
        // The agent first, so that it stops writing maps before the pins go.
        state.children.sort_by_key(|t| t.name != AGENT);
        for tracked in state.children.drain(..) {
            terminate::<W>(tracked);
        }
        remove_everything(&self.paths, false);
    }
}

/// SIGKILL for the child if this process dies first (a `kill -9` of xtask).
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// SIGTERM, up to the grace period to exit, then SIGKILL; always reaps.
fn terminate<W: World>(mut tracked: Tracked) {
    if let Ok(Some(_)) = tracked.child.try_wait() {
        return;
    }
    let Ok(raw) = i32::try_from(tracked.child.id()) else {
        return;
    };
    let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
    let deadline = Instant::now() + W::STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = tracked.child.try_wait() {
            return;
        }
        sleep(W::STOP_POLL);
    }
    eprintln!("{} did not stop on SIGTERM: killing it", tracked.name);
    let _ = tracked.child.kill();
    let _ = tracked.child.wait();
}

/// Removes everything carrying the prefix: the pins (via `lb-agent cleanup`), the namespaces
/// and their processes, the cgroups and the scratch files. `at_start` also removes the logs
/// (after a run they stay for reading).
fn remove_everything<W: World>(paths: &W, at_start: bool) {
    paths.remove_first();
    remove_pins(paths);
    for netns in leftover_netns::<W>() {
        kill_netns_processes(&netns);
        warn(cmd::cleanup(
            Command::new("ip").args(["netns", "del", &netns]),
        ));
    }
    for cgroup in paths.cgroups() {
        remove_cgroup(cgroup);
    }
    paths.remove_last();
    if at_start {
        remove_dir_if_present(Path::new(W::RUN_DIR));
    } else {
        paths.clear_run_dir();
    }
}

/// Prints a clean-up failure and goes on.
pub fn warn(result: Result<()>) {
    if let Err(error) = result {
        eprintln!("warning: {error:#}");
    }
}

/// `lb-agent cleanup` detaches and unpins what the agent made; then the directory goes.
pub fn remove_pins<W: World>(paths: &W) {
    remove_pin_dir(paths, Path::new(W::PIN_DIR));
}

/// [`remove_pins`] for the pin directory `pins` of a further agent of the lab.
pub fn remove_pin_dir<W: World>(paths: &W, pins: &Path) {
    if !pins.exists() {
        return;
    }
    let agent_bin = paths.agent_bin();
    if agent_bin.is_file() {
        let mut cleanup = if W::PIN_CLEANUP_IN_NODE && netns_path(W::NODE_NETNS).exists() {
            in_netns(W::NODE_NETNS, agent_bin)
        } else {
            Command::new(agent_bin)
        };
        cleanup.arg("cleanup").arg("--bpf-pin-path").arg(pins);
        warn(cmd::cleanup(&mut cleanup));
    }
    if pins.exists() {
        warn(
            std::fs::remove_dir_all(pins)
                .with_context(|| format!("cannot remove {}", pins.display())),
        );
    }
}

fn leftover_netns<W: World>() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let prefix = format!("{}-", W::PREFIX);
    let mut names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix))
        .collect();
    // Pods before the node: their veths end on its bridge.
    names.sort_by_key(|name| name == W::NODE_NETNS);
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

/// A cgroup directory can be removed once no process is in it (control files stay): kills
/// what is left in it, then removes it.
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

/// Removes a directory with its contents, or a file; nothing if absent.
pub fn remove_dir_if_present(dir: &Path) {
    let result = if dir.is_dir() {
        std::fs::remove_dir_all(dir)
    } else if dir.exists() {
        std::fs::remove_file(dir)
    } else {
        return;
    };
    warn(result.with_context(|| format!("cannot remove {}", dir.display())));
}

/// `/run/netns/NAME`: what `nsenter --net=` and `setns` take.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

/// `ip ...`
pub fn ip(args: &[&str]) -> Result<()> {
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
