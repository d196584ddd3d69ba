//! The test's own cgroup v2 directory, where the agent attaches and clients run.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::{mounts, names};

/// Where cgroup v2 is mounted (fstype `cgroup2` in `/proc/self/mountinfo`); it is
/// `/sys/fs/cgroup/unified` on hybrid hosts, so it is never assumed.
pub fn cgroup2_root() -> Option<PathBuf> {
    mounts::find("cgroup2")
}

/// A child cgroup of the cgroup2 root named `lbt<pid>-<n>`; removed on drop.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    #[track_caller]
    pub fn new() -> Self {
        let root = cgroup2_root().expect("no cgroup2 mount in /proc/self/mountinfo");
        let path = root.join(names::unique());
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// The cgroup directory, as `lb-agent run --cgroup` and `lb-testkit --cgroup` take it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pids currently in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        pids(&self.path)
    }

    /// Programs attached to this cgroup, as `bpftool -j cgroup show PATH` lists them (one JSON
    /// object each, with `id`, `attach_type`, `name`, ...).
    #[track_caller]
    pub fn attached_programs(&self) -> Vec<serde_json::Value> {
        attached_programs(&self.path)
    }
}

/// Programs attached to the cgroup `dir` (`bpftool -j cgroup show DIR`).
#[track_caller]
pub fn attached_programs(dir: &Path) -> Vec<serde_json::Value> {
    let mut command = std::process::Command::new("bpftool");
    command.arg("-j").arg("cgroup").arg("show").arg(dir);
    let out = crate::cmd::run(&mut command, crate::cmd::PLUMBING_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e} (is bpftool installed? apt-get install bpftool)"));
    if out.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bpftool cgroup show: {e}: {out}"))
}

/// The `attach_type`s of the programs attached to the cgroup `dir` (`cgroup_inet4_connect`, ...).
#[track_caller]
pub fn attach_types(dir: &Path) -> std::collections::BTreeSet<String> {
    attached_programs(dir)
        .iter()
        .filter_map(|p| p["attach_type"].as_str().map(str::to_owned))
        .collect()
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(err) = remove(&self.path) {
            eprintln!("lb-tests: cleanup: cgroup {}: {err}", self.path.display());
        }
    }
}

fn pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Removes a cgroup directory and its children: their processes move to the parent first.
pub(crate) fn remove(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove(&entry.path())?;
        }
    }
    let parent = dir.parent().unwrap_or(dir);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in pids(dir) {
            // The process may have exited meanwhile; rmdir below tells if anything is left.
            let _ = fs::write(parent.join("cgroup.procs"), pid.to_string());
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) if Instant::now() >= deadline => return Err(err),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}
