//! Removal of what crashed earlier runs left behind.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{bpffs, cgroup, names, netns};

/// Removes network namespaces, cgroups, pin directories and temp directories named
/// `lbt<pid>-…` whose pid is no longer alive. Objects of live processes (tests running in
/// parallel) are left alone.
pub fn cleanup_leftovers() {
    let _lock = names::global_lock();
    for name in stale_entries(Path::new("/run/netns")) {
        eprintln!("lb-tests: removing leftover netns {name}");
        netns::delete(&name);
    }
    if let Some(root) = cgroup::cgroup2_root() {
        for name in stale_entries(&root) {
            let path = root.join(&name);
            eprintln!("lb-tests: removing leftover cgroup {}", path.display());
            if let Err(err) = cgroup::remove(&path) {
                eprintln!("lb-tests: cleanup: {}: {err}", path.display());
            }
        }
    }
    let bpf = PathBuf::from(bpffs::BPFFS);
    for name in stale_entries(&bpf) {
        let path = bpf.join(&name);
        eprintln!("lb-tests: removing leftover pins {}", path.display());
        bpffs::remove(&path);
    }
    let tmp = std::env::temp_dir();
    for name in stale_entries(&tmp) {
        let path = tmp.join(&name);
        eprintln!("lb-tests: removing leftover {}", path.display());
        // Containers of a crashed container test, then the mounts it made there.
        crate::podman::remove_containers(&path.join("podman"));
        crate::mounts::unmount_below(&path);
        let _ = fs::remove_dir_all(&path);
    }
}

/// Names in `dir` made by [`names::unique`] whose owner process is gone.
fn stale_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| names::owner_pid(name).is_some_and(|pid| !names::pid_alive(pid)))
        .collect()
}
