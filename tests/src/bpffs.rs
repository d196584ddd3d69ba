//! bpffs and the per-test pin directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::mount::{MsFlags, mount};

use crate::{bins, cmd, mounts, names};

/// Where bpffs is (or gets) mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// How long `lb-agent cleanup` may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Mounts bpffs at [`BPFFS`] unless it is mounted already.
pub fn ensure_bpffs() -> Result<(), String> {
    let _lock = names::global_lock();
    if mounts::is_mounted(BPFFS, "bpf") {
        return Ok(());
    }
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("mount -t bpf bpf {BPFFS}: {e}"))
}

/// `/sys/fs/bpf/lbt<pid>-<n>`: the agent's `--bpf-pin-path`. On drop, `lb-agent cleanup` runs
/// on it (detaching the links) and whatever is left is removed.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    #[track_caller]
    pub fn new() -> Self {
        ensure_bpffs().unwrap_or_else(|e| panic!("{e}"));
        let path = Path::new(BPFFS).join(names::unique());
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every file (pin) below the directory, sorted; empty when the directory is gone.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        collect_files(&self.path, &mut files);
        files.sort();
        files
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        remove(&self.path);
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Runs `lb-agent cleanup --bpf-pin-path DIR`.
pub fn agent_cleanup(dir: &Path) -> Result<String, String> {
    let bin = bins::agent();
    cmd::run(
        Command::new(&bin)
            .arg("cleanup")
            .arg("--bpf-pin-path")
            .arg(dir),
        CLEANUP_TIMEOUT,
    )
}

/// `lb-agent cleanup` (when the binary exists and pins are left), then removes the directory.
pub(crate) fn remove(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let mut left = Vec::new();
    collect_files(dir, &mut left);
    if !left.is_empty()
        && bins::agent().is_file()
        && let Err(err) = agent_cleanup(dir)
    {
        eprintln!("lb-tests: cleanup: {err}");
    }
    // Unlinking the remaining pins drops the last references to links and maps.
    if let Err(err) = fs::remove_dir_all(dir)
        && dir.exists()
    {
        eprintln!("lb-tests: cleanup: rm -r {}: {err}", dir.display());
    }
}

/// A directory standing in for a host's `/sys/fs/bpf` with nothing mounted on it yet: a
/// shared mount point (bound onto itself), so the bpffs that the DaemonSet's init container
/// mounts there with `Bidirectional` propagation appears here, as it would on the host.
///
/// On drop: `lb-agent cleanup` of the pins at `<dir>/lb` when bpffs is mounted, then every
/// mount on the directory is undone and the directory removed.
#[derive(Debug)]
pub struct SharedMountPoint {
    path: PathBuf,
}

impl SharedMountPoint {
    #[track_caller]
    pub fn new(path: &Path) -> Self {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let point = Self {
            path: path.to_owned(),
        };
        mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount --bind {0} {0}: {e}", path.display()));
        mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount --make-shared {}: {e}", path.display()));
        point
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Mounts a bpf filesystem on the directory (mode 0700), as systemd does on a host.
    #[track_caller]
    pub fn mount_bpffs(&self) {
        mount(
            Some("bpf"),
            &self.path,
            Some("bpf"),
            MsFlags::empty(),
            Some("mode=0700"),
        )
        .unwrap_or_else(|e| panic!("mount -t bpf bpf {}: {e}", self.path.display()));
    }

    /// Whether a bpf filesystem is mounted on the directory.
    pub fn has_bpffs(&self) -> bool {
        mounts::is_mounted(&self.path.to_string_lossy(), "bpf")
    }
}

impl Drop for SharedMountPoint {
    fn drop(&mut self) {
        let pins = self.path.join("lb");
        if self.has_bpffs()
            && pins.exists()
            && bins::agent().is_file()
            && let Err(err) = agent_cleanup(&pins)
        {
            eprintln!("lb-tests: cleanup: {err}");
        }
        mounts::unmount_below(&self.path);
        if let Err(err) = fs::remove_dir(&self.path) {
            eprintln!("lb-tests: cleanup: rmdir {}: {err}", self.path.display());
        }
    }
}
