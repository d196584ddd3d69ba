//! The agent under test as a child process.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
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
/// How long the agent may take to attach its programs after it started.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);
/// The socket hooks (bpftool's `attach_type`s) the agent attaches to its cgroup; a test only
/// starts once all are there.
pub const SOCKET_HOOKS: [&str; 8] = [
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_udp4_sendmsg",
    "cgroup_udp6_sendmsg",
    "cgroup_udp4_recvmsg",
    "cgroup_udp6_recvmsg",
    "cgroup_inet4_getpeername",
    "cgroup_inet6_getpeername",
];

/// One frontend (virtual address:port/protocol) of `lb-agent services --output json`.
///
/// The fields after `protocol` are left empty (`None`, 0) when the agent does not print them, so
/// a test that does not look at them does not depend on them; `service` and `port_name` are
/// there only when `services` was given `--api-addr`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Frontend {
    pub address: String,
    pub port: u16,
    pub protocol: String,
    /// `IPv4` or `IPv6`.
    #[serde(default)]
    pub family: Option<String>,
    /// `ClusterIp`, `ExternalIp` or `LoadBalancer`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Backends taking new connections (the master entry's count).
    #[serde(default)]
    pub count: u16,
    #[serde(default)]
    pub rev_nat_id: u32,
    /// `SVC_F_*` flags of the master entry.
    #[serde(default)]
    pub flags: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds, when the frontend has affinity.
    #[serde(default)]
    pub affinity_timeout: Option<u32>,
    /// `namespace/name` of the Service (with `--api-addr`).
    #[serde(default)]
    pub service: Option<String>,
    /// `spec.ports[].name` (with `--api-addr`; empty for an unnamed port).
    #[serde(default)]
    pub port_name: Option<String>,
    pub backends: Vec<Backend>,
}

/// One backend slot of a [`Frontend`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Backend {
    #[serde(default)]
    pub slot: u16,
    #[serde(default)]
    pub backend_id: u32,
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub family: Option<String>,
    /// `Ready` or `Terminating`.
    #[serde(default)]
    pub state: Option<String>,
    /// EndpointSlice name or `pod/<name>` (with `--api-addr`).
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

impl Backend {
    /// `ip:port`, `[ipv6]:port`.
    #[track_caller]
    pub fn addr(&self) -> String {
        socket_addr(&self.address, self.port)
    }
}

impl Frontend {
    /// `ip:port`, `[ipv6]:port`.
    #[track_caller]
    pub fn addr(&self) -> String {
        socket_addr(&self.address, self.port)
    }

    /// Whether this is the frontend `addr` (`10.96.0.10:80`, `[fd00:96::10]:80`) of `protocol`.
    pub fn is(&self, addr: SocketAddr, protocol: &str) -> bool {
        self.address.parse::<IpAddr>().ok() == Some(addr.ip())
            && self.port == addr.port()
            && self.protocol.eq_ignore_ascii_case(protocol)
    }

    /// `ip:port` (`[ipv6]:port`) of each backend, sorted.
    pub fn backend_addrs(&self) -> Vec<String> {
        let mut addrs: Vec<_> = self.backends.iter().map(Backend::addr).collect();
        addrs.sort();
        addrs
    }

    /// The backend at `addr` (`10.244.0.2:8080`, `[fd00:244::2]:8080`), if listed.
    pub fn backend(&self, addr: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.addr() == addr)
    }

    /// `state` of each backend, by `ip:port`.
    pub fn backend_states(&self) -> std::collections::BTreeMap<String, String> {
        self.backends
            .iter()
            .map(|b| (b.addr(), b.state.clone().unwrap_or_default()))
            .collect()
    }
}

/// `ip:port`, or `[ipv6]:port`, from the separate JSON fields.
#[track_caller]
fn socket_addr(address: &str, port: u16) -> String {
    match address.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{address}:{port}"),
    }
}

/// Parses `ip:port` or `[ipv6]:port` for the frontend lookups.
fn parse_addr(addr: &str) -> Result<SocketAddr, String> {
    addr.parse().map_err(|e| format!("{addr}: {e}"))
}

/// What the agent is started with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub manifests: PathBuf,
    /// When set, the agent watches the API server of this kubeconfig instead of `manifests`.
    pub kubeconfig: Option<PathBuf>,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    /// Network namespace to run in (`/run/netns/NAME`); the node namespace in [`crate::TestEnv`].
    pub netns: Option<String>,
    /// stdout and stderr of every run, appended.
    pub log: PathBuf,
    /// `--api-addr` of `lb-agent run`, given to `lb-agent services` too (which then runs in
    /// `netns` as well, where the address is reachable).
    pub api_addr: Option<SocketAddr>,
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
    /// The run whose programs were seen attached by [`Agent::wait_attached`].
    attached_run: Option<u32>,
    log_filter: String,
}

impl Agent {
    /// An agent that is not running yet; see [`Agent::start`].
    pub fn new(config: AgentConfig) -> Self {
        Self {
            bin: bins::agent(),
            config,
            child: None,
            runs: 0,
            attached_run: None,
            log_filter: "debug".to_owned(),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// `RUST_LOG` of the next start (default `debug`).
    pub fn set_log_filter(&mut self, filter: &str) {
        self.log_filter = filter.to_owned();
    }

    /// The process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
        command.arg("run");
        match &self.config.kubeconfig {
            Some(kubeconfig) => command.arg("--kubeconfig").arg(kubeconfig),
            None => command.arg("--manifests").arg(&self.config.manifests),
        };
        command
            .arg("--cgroup")
            .arg(&self.config.cgroup)
            .arg("--bpf-pin-path")
            .arg(&self.config.pin_path)
            .args(
                self.config
                    .api_addr
                    .iter()
                    .flat_map(|addr| ["--api-addr".to_owned(), addr.to_string()]),
            )
            .args(&self.config.extra_args)
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        let netns = self.enter_netns(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        drop(netns);
        self.child = Some(child);
    }

    /// Makes `command` die with the test and run in the agent's network namespace (only that
    /// namespace: bpffs and cgroup2 stay visible). The returned file must live until the spawn.
    #[track_caller]
    fn enter_netns(&self, command: &mut Command) -> Option<File> {
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
        netns
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

    /// Waits up to `timeout` for the agent to exit by itself: its status, or `None` (it
    /// still runs).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let status = self.child.as_mut()?.try_wait().ok().flatten();
            if status.is_some() {
                self.child = None;
                return status;
            }
            thread::sleep(Duration::from_millis(20));
        }
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

    /// `lb-agent services --bpf-pin-path PIN --output FORMAT`, with the agent's `--api-addr`
    /// when it has one, run in the agent's network namespace (where that address is reachable).
    /// Works while the agent is down too, without the API.
    pub fn services_output(&self, format: &str) -> Result<String, String> {
        self.services_output_with(format, true)
    }

    /// `lb-agent services` as [`Agent::services_output`], with `--api-addr` only if `use_api`.
    pub fn services_output_with(&self, format: &str, use_api: bool) -> Result<String, String> {
        let mut command = Command::new(&self.bin);
        command
            .arg("services")
            .arg("--bpf-pin-path")
            .arg(&self.config.pin_path)
            .args(["--output", format]);
        if let Some(addr) = self.config.api_addr
            && use_api
            && self.child.is_some()
        {
            command.arg("--api-addr").arg(addr.to_string());
        }
        let netns = self.enter_netns(&mut command);
        let out = cmd::run(&mut command, SERVICES_TIMEOUT);
        drop(netns);
        out
    }

    /// `lb-agent explain ARGS --bpf-pin-path PIN --api-addr ADDR`, run in the agent's
    /// network namespace.
    pub fn explain_output(&self, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new(&self.bin);
        command
            .arg("explain")
            .args(args)
            .arg("--bpf-pin-path")
            .arg(&self.config.pin_path);
        if let Some(addr) = self.config.api_addr {
            command.arg("--api-addr").arg(addr.to_string());
        }
        let netns = self.enter_netns(&mut command);
        let out = cmd::run(&mut command, SERVICES_TIMEOUT);
        drop(netns);
        out
    }

    /// `lb-agent monitor --output json ARGS --bpf-pin-path PIN` (and the agent's
    /// `--api-addr`), run in the agent's network namespace, once it says it is on.
    #[track_caller]
    pub fn monitor(&self, args: &[&str]) -> crate::monitor::Monitor {
        let mut command = Command::new(&self.bin);
        command
            .args(["monitor", "--output", "json"])
            .args(args)
            .arg("--bpf-pin-path")
            .arg(&self.config.pin_path);
        if let Some(addr) = self.config.api_addr {
            command.arg("--api-addr").arg(addr.to_string());
        }
        let netns = self.enter_netns(&mut command);
        let monitor = crate::monitor::Monitor::spawn(command);
        drop(netns);
        monitor
    }

    /// `lb-agent services --summary --output json`: each pinned map's `name`, `entries`,
    /// `capacity` and `memory_bytes`.
    pub fn map_summary(&self) -> Result<Vec<serde_json::Value>, String> {
        self.summary_part("maps")
    }

    /// How many entries the pinned map `name` holds (`services --summary`).
    pub fn map_entries(&self, name: &str) -> Result<u64, String> {
        self.map_summary()?
            .iter()
            .find(|m| m["name"] == name)
            .and_then(|m| m["entries"].as_u64())
            .ok_or_else(|| format!("{name} is not in the summary"))
    }

    /// The datapath's counters (`lb-agent services --summary -o json`), by name.
    pub fn counters(&self) -> Result<std::collections::BTreeMap<String, u64>, String> {
        self.summary_part("counters")
    }

    /// The agent's pinned links (`lb-agent services --summary -o json`): `connect4`,
    /// `tc-ingress-ext0`, `xdp-ext0`...
    pub fn links(&self) -> Result<Vec<String>, String> {
        self.summary_part("links")
    }

    /// The member `part` of `lb-agent services --summary --output json`.
    fn summary_part<T: serde::de::DeserializeOwned>(&self, part: &str) -> Result<T, String> {
        let mut command = Command::new(&self.bin);
        command
            .args([
                "services",
                "--summary",
                "--output",
                "json",
                "--bpf-pin-path",
            ])
            .arg(&self.config.pin_path);
        let netns = self.enter_netns(&mut command);
        let out = cmd::run(&mut command, SERVICES_TIMEOUT);
        drop(netns);
        let summary: serde_json::Value =
            serde_json::from_str(&out?).map_err(|e| format!("services --summary: {e}"))?;
        serde_json::from_value(summary[part].clone())
            .map_err(|e| format!("services --summary: {part}: {e}"))
    }

    /// [`Agent::services_output`] as JSON.
    pub fn services_json(&self) -> Result<serde_json::Value, String> {
        let out = self.services_output("json")?;
        serde_json::from_str(&out).map_err(|e| format!("lb-agent services: {e}: {out}"))
    }

    /// [`Agent::services_output`] as the table it prints for people.
    pub fn services_table(&self) -> Result<String, String> {
        self.services_output("table")
    }

    /// [`Agent::services_json`] as typed frontends.
    pub fn services(&self) -> Result<Vec<Frontend>, String> {
        let value = self.services_json()?;
        serde_json::from_value(value.clone())
            .map_err(|e| format!("lb-agent services: unexpected JSON ({e}): {value}"))
    }

    /// The TCP frontend `addr` (`10.96.0.10:80`, `[fd00:96::10]:80`), if listed.
    pub fn frontend(&self, addr: &str) -> Result<Option<Frontend>, String> {
        self.frontend_proto(addr, "TCP")
    }

    /// The frontend `addr` of `protocol` (`TCP`, `UDP`), if listed.
    pub fn frontend_proto(&self, addr: &str, protocol: &str) -> Result<Option<Frontend>, String> {
        let want = parse_addr(addr)?;
        Ok(self.services()?.into_iter().find(|f| f.is(want, protocol)))
    }

    /// Waits until every hook of [`SOCKET_HOOKS`] is attached to the agent's cgroup.
    ///
    /// The agent pins and fills its maps before it attaches its programs, one after the other, so
    /// `lb-agent services` may list a frontend while connects are not yet translated (or
    /// `sendmsg` is and `recvmsg` is not yet). Every `wait_for_*` waits for this first.
    #[track_caller]
    pub fn wait_attached(&mut self) {
        if self.attached_run == Some(self.runs) {
            return;
        }
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        let per_packet = self
            .config
            .extra_args
            .windows(2)
            .any(|w| w[0] == "--socket-lb" && w[1] != "all");
        if per_packet {
            // The tc programs of the pods' devices are attached after the socket programs (or
            // without them): the agent says when all are.
            while !self.log_of_this_run().contains("lb_agent::agent: ready") {
                self.assert_running();
                assert!(
                    Instant::now() < deadline,
                    "the agent was not ready within {ATTACH_TIMEOUT:?}"
                );
                thread::sleep(Duration::from_millis(50));
            }
            self.attached_run = Some(self.runs);
            return;
        }
        loop {
            self.assert_running();
            let attached = crate::cgroup::attach_types(&self.config.cgroup);
            let missing: Vec<&str> = SOCKET_HOOKS
                .into_iter()
                .filter(|hook| !attached.contains(*hook))
                .collect();
            if missing.is_empty() {
                self.attached_run = Some(self.runs);
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the agent did not attach {missing:?} to {} within {ATTACH_TIMEOUT:?}; \
                     attached: {attached:?}",
                    self.config.cgroup.display()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log of the current run only.
    fn log_of_this_run(&self) -> String {
        let log = self.log();
        log.rsplit("===== lb-tests: agent run")
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// The flows of `lb-agent conntrack --output json`.
    #[track_caller]
    pub fn conntrack(&self) -> Vec<serde_json::Value> {
        let out = crate::cmd::run(
            Command::new(crate::bins::agent())
                .arg("conntrack")
                .arg("--bpf-pin-path")
                .arg(&self.config.pin_path)
                .args(["--output", "json"]),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Polls `lb-agent services` until `ready` returns something for its frontends; panics with
    /// `what` and the last listing after `timeout`. Waits for [`Agent::wait_attached`] first.
    #[track_caller]
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&[Frontend]) -> Option<T>,
    ) -> T {
        self.wait_attached();
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            let last = match self.services() {
                Ok(frontends) => match ready(&frontends) {
                    Some(found) => return found,
                    None => format!("{frontends:#?}"),
                },
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!("{what}: not within {timeout:?}; last listing: {last}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `lb-agent services` until the TCP frontend `addr` lists exactly `backends` backends.
    #[track_caller]
    pub fn wait_for_frontend(
        &mut self,
        addr: &str,
        backends: usize,
        timeout: Duration,
    ) -> Frontend {
        self.wait_for_frontend_proto(addr, "TCP", backends, timeout)
    }

    /// Polls `lb-agent services` until the frontend `addr` of `protocol` lists exactly `backends`
    /// backends (with `--api-addr`: and carries its Service name).
    #[track_caller]
    pub fn wait_for_frontend_proto(
        &mut self,
        addr: &str,
        protocol: &str,
        backends: usize,
        timeout: Duration,
    ) -> Frontend {
        let want = parse_addr(addr).unwrap_or_else(|e| panic!("{e}"));
        let api = self.config.api_addr.is_some();
        self.wait_until(
            &format!("frontend {addr}/{protocol} with {backends} backends"),
            timeout,
            |frontends| {
                frontends
                    .iter()
                    .find(|f| {
                        f.is(want, protocol)
                            && f.backends.len() == backends
                            // The API may publish a sync a moment after the maps show it.
                            && (!api
                                || (f.service.is_some()
                                    && f.backends.iter().all(|b| b.source.is_some())))
                    })
                    .cloned()
            },
        )
    }

    /// Polls `lb-agent services` until the TCP frontend `addr` is not listed any more.
    #[track_caller]
    pub fn wait_for_no_frontend(&mut self, addr: &str, timeout: Duration) {
        self.wait_for_no_frontend_proto(addr, "TCP", timeout);
    }

    /// Polls `lb-agent services` until the frontend `addr` of `protocol` is not listed any more.
    #[track_caller]
    pub fn wait_for_no_frontend_proto(&mut self, addr: &str, protocol: &str, timeout: Duration) {
        let want = parse_addr(addr).unwrap_or_else(|e| panic!("{e}"));
        self.wait_until(
            &format!("frontend {addr}/{protocol} gone"),
            timeout,
            |frontends| (!frontends.iter().any(|f| f.is(want, protocol))).then_some(()),
        );
    }

    /// Waits until the agent's log contains `needle`; panics with the log's tail after
    /// `timeout`.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the agent did not report {needle:?} within {timeout:?}\n{}",
                self.log_tail(20)
            );
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
