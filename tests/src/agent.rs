//! The agent under test as a child process.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::SocketAddrV4;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::{bins, cmd};

/// How long `lb-agent services` may take.
const SERVICES_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the agent log printed when a test fails.
const LOG_TAIL: usize = 300;

/// One frontend (ClusterIP:port/protocol) of `lb-agent services --output json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Frontend {
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub backends: Vec<Backend>,
}

/// One backend of a [`Frontend`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Backend {
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: String,
}

impl Frontend {
    /// `ip:port` of each backend, sorted.
    pub fn backend_addrs(&self) -> Vec<String> {
        let mut addrs: Vec<_> = self
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.address, b.port))
            .collect();
        addrs.sort();
        addrs
    }
}

/// What the agent is started with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub manifests: PathBuf,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    /// Network namespace to run in (`/run/netns/NAME`); the node namespace in [`crate::TestEnv`].
    pub netns: Option<String>,
    /// stdout and stderr of every run, appended.
    pub log: PathBuf,
    /// More arguments of `lb-agent run` (`--devices`, `--node-name`).
    pub extra_args: Vec<String>,
}

/// `lb-agent run --manifests DIR --cgroup CG --bpf-pin-path PIN` with `RUST_LOG=debug`.
///
/// On drop the process is stopped (SIGTERM, then SIGKILL) and, while panicking, the tail of its
/// log is printed so a failed test shows what the agent did (panic messages of its methods
/// therefore leave the log out).
#[derive(Debug)]
pub struct Agent {
    bin: PathBuf,
    config: AgentConfig,
    child: Option<Child>,
    runs: u32,
}

impl Agent {
    /// An agent that is not running yet; see [`Agent::start`].
    pub fn new(config: AgentConfig) -> Self {
        Self {
            bin: bins::agent(),
            config,
            child: None,
            runs: 0,
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Starts the agent (again, after [`Agent::kill`] or [`Agent::stop`]).
    #[track_caller]
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent is already running");
        bins::require(&self.bin, "cargo build -p lb-agent, or set LB_AGENT_BIN");
        self.runs += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.config.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.config.log.display()));
        let _ = writeln!(
            log,
            "===== lb-tests: agent run {} ({}) =====",
            self.runs,
            self.bin.display()
        );
        let err_log = log.try_clone().expect("dup log fd");
        let mut command = Command::new(&self.bin);
        command
            .arg("run")
            .arg("--manifests")
            .arg(&self.config.manifests)
            .arg("--cgroup")
            .arg(&self.config.cgroup)
            .arg("--bpf-pin-path")
            .arg(&self.config.pin_path)
            .args(&self.config.extra_args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        let netns = self.config.netns.as_ref().map(|name| {
            let path = Path::new("/run/netns").join(name);
            File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        });
        let netns_fd = netns.as_ref().map(AsRawFd::as_raw_fd);
        // SAFETY: only async-signal-safe calls (prctl, setns) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                die_with_parent()?;
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        drop(netns);
        self.child = Some(child);
    }

    /// SIGKILL: the agent gets no chance to clean anything up (as in a crash or OOM kill).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns the exit status when it exited by itself.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Whether the process still runs; panics with the log when it exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        let Some(child) = self.child.as_mut() else {
            panic!("agent is not started");
        };
        if let Ok(Some(status)) = child.try_wait() {
            self.child = None;
            panic!("agent exited with {status} (its log follows)");
        }
    }

    /// `lb-agent services --bpf-pin-path PIN --output json`; works while the agent is down too.
    pub fn services_json(&self) -> Result<serde_json::Value, String> {
        let out = cmd::run(
            Command::new(&self.bin)
                .arg("services")
                .arg("--bpf-pin-path")
                .arg(&self.config.pin_path)
                .args(["--output", "json"]),
            SERVICES_TIMEOUT,
        )?;
        serde_json::from_str(&out).map_err(|e| format!("lb-agent services: {e}: {out}"))
    }

    /// [`Agent::services_json`] as typed frontends.
    pub fn services(&self) -> Result<Vec<Frontend>, String> {
        let value = self.services_json()?;
        serde_json::from_value(value.clone())
            .map_err(|e| format!("lb-agent services: unexpected JSON ({e}): {value}"))
    }

    /// The TCP frontend `addr` ("10.96.0.10:80"), if listed.
    pub fn frontend(&self, addr: &str) -> Result<Option<Frontend>, String> {
        self.frontend_of(addr, "TCP")
    }

    /// The frontend `addr` of `protocol` ("TCP", "UDP"), if listed.
    pub fn frontend_of(&self, addr: &str, protocol: &str) -> Result<Option<Frontend>, String> {
        let want: SocketAddrV4 = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        Ok(self.services()?.into_iter().find(|f| {
            f.address == want.ip().to_string()
                && f.port == want.port()
                && f.protocol.eq_ignore_ascii_case(protocol)
        }))
    }

    /// Polls `lb-agent services` until the TCP frontend `addr` lists exactly `backends` backends.
    #[track_caller]
    pub fn wait_for_frontend(
        &mut self,
        addr: &str,
        backends: usize,
        timeout: Duration,
    ) -> Frontend {
        self.wait_for_frontend_of(addr, "TCP", backends, timeout)
    }

    /// [`Agent::wait_for_frontend`] for a frontend of `protocol`.
    #[track_caller]
    pub fn wait_for_frontend_of(
        &mut self,
        addr: &str,
        protocol: &str,
        backends: usize,
        timeout: Duration,
    ) -> Frontend {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            let last = match self.frontend_of(addr, protocol) {
                Ok(Some(f)) if f.backends.len() == backends => return f,
                Ok(Some(f)) => format!("{f:?}"),
                Ok(None) => format!("{addr} not listed"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "frontend {addr} did not get {backends} backends within {timeout:?}; last: {last}"
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `lb-agent services` until `addr` is not listed any more.
    #[track_caller]
    pub fn wait_for_no_frontend(&mut self, addr: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            let last = match self.frontend(addr) {
                Ok(None) => return,
                Ok(Some(f)) => format!("{f:?}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!("frontend {addr} still listed after {timeout:?}: {last}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The whole log of all runs.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.config.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log, framed for a test failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        let start = all.len().saturating_sub(lines);
        let mut out = format!(
            "----- agent log {} (last {} of {} lines) -----\n",
            self.config.log.display(),
            all.len() - start,
            all.len()
        );
        for line in &all[start..] {
            let _ = writeln!(out, "{line}");
        }
        out.push_str("----- end of agent log -----");
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.log_tail(LOG_TAIL));
        }
        self.stop(Duration::from_secs(3));
    }
}

/// Makes the child die with the test process (nextest timeouts, crashes).
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `pre_exec` hook for children that must not outlive the test.
pub(crate) fn set_die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        command.pre_exec(die_with_parent);
    }
}
