//! `lb-agent monitor` as a child process: its JSON lines collected as they come, its
//! stderr kept for failure messages, and the switch it holds read from the pinned map.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running `lb-agent monitor --output json`.
#[derive(Debug)]
pub struct Monitor {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl Monitor {
    /// Spawns `command` (an `lb-agent monitor … --output json` ready to run) and waits until
    /// it says the switch is on.
    #[track_caller]
    pub fn spawn(mut command: Command) -> Self {
        command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting lb-agent monitor: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or_else(
                    |e| serde_json::json!({ "unparsed": line, "error": e.to_string() }),
                );
                sink.lock().unwrap().push(value);
            }
        });
        let err_sink = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut all = err_sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let monitor = Self {
            child: Some(child),
            lines,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !monitor.stderr().contains("monitor on") {
            assert!(
                Instant::now() < deadline,
                "lb-agent monitor did not turn on within 10 s: {}",
                monitor.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
        monitor
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Every decision printed so far.
    pub fn decisions(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a decision that `wanted` accepts and returns it.
    #[track_caller]
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.decisions().into_iter().find(|d| wanted(d)) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no decision {what} within {timeout:?}; seen: {:#?}\nstderr: {}",
                self.decisions(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT (Ctrl-C), and waits for it to exit; returns whether it exited successfully.
    pub fn interrupt(&mut self) -> bool {
        self.signal_and_wait(Signal::SIGINT)
    }

    /// SIGKILL: no chance to turn the switch off.
    pub fn kill(&mut self) {
        self.signal_and_wait(Signal::SIGKILL);
    }

    /// Waits for it to exit by itself (`--count`); returns whether it succeeded.
    #[track_caller]
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("monitor running");
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the monitor") {
                self.child = None;
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "monitor still running after {timeout:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal_and_wait(&mut self, signal: Signal) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
        child.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The deadline the monitor switch pinned in `pin_dir` holds (`CLOCK_MONOTONIC` ns; 0: off),
/// read with `bpftool map dump pinned`.
#[track_caller]
pub fn switch_until_ns(pin_dir: &Path) -> u64 {
    let path = pin_dir.join("LB_MONITOR_SWITCH");
    let out = crate::cmd::run(
        Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&path),
        crate::cmd::PLUMBING_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("bpftool map dump pinned {}: {e}", path.display()));
    let dump: serde_json::Value = serde_json::from_str(&out).expect("bpftool JSON");
    dump[0]["value"]["until_ns"]
        .as_u64()
        .or_else(|| dump[0]["formatted"]["value"]["until_ns"].as_u64())
        .unwrap_or_else(|| panic!("no until_ns in {out}"))
}

/// Whether the monitor switch pinned in `pin_dir` is on now.
#[track_caller]
pub fn switch_is_on(pin_dir: &Path) -> bool {
    switch_until_ns(pin_dir) > crate::clock::monotonic_ns()
}
