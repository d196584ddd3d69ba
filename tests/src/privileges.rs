//! Whether this machine lets the privileged tests run.

use std::sync::OnceLock;

use crate::{bpffs, cgroup, leftovers, names, netns::Netns};

static CHECK: OnceLock<Result<(), String>> = OnceLock::new();

/// Call first in every privileged test: `if !require_privileges() { return; }`.
///
/// Checks root, a cgroup2 mount, bpffs (mounting it if needed) and that a network namespace can
/// be created, then removes leftovers of crashed earlier runs (once per process). When something
/// is missing: under `CI=true` it panics with the reason (a privileged test must not pass by
/// skipping in CI); otherwise it prints why the test is skipped and returns false.
#[track_caller]
pub fn require_privileges() -> bool {
    let check = CHECK.get_or_init(|| {
        check()?;
        leftovers::cleanup_leftovers();
        Ok(())
    });
    match check {
        Ok(()) => true,
        Err(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("privileged test cannot run: {reason}")
        }
        Err(reason) => {
            eprintln!(
                "SKIPPED: privileged test cannot run: {reason} (set CI=true to fail instead)"
            );
            false
        }
    }
}

fn check() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not running as root".to_owned());
    }
    cgroup::cgroup2_root().ok_or("no cgroup2 mount in /proc/self/mountinfo")?;
    bpffs::ensure_bpffs()?;
    let probe = format!("{}-probe", names::unique());
    std::panic::catch_unwind(|| drop(Netns::create(&probe))).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        format!("cannot create a network namespace: {msg}")
    })
}
