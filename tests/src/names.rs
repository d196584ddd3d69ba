//! Names of everything a test creates: `lbt<pid>-<n>`.
//!
//! nextest runs each test in its own process, so the pid keeps parallel tests apart and tells
//! [`crate::cleanup_leftovers`] whether the owner of a leftover is still alive.

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every object the tests create (namespaces, cgroups, pin and temp directories).
pub const PROJECT_PREFIX: &str = "lbt";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name no other object of this run carries: `lbt<pid>-<n>`.
pub fn unique() -> String {
    format!(
        "{PROJECT_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid a name made by [`unique`] carries.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PROJECT_PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('-') {
        return None;
    }
    digits.parse().ok()
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new("/proc").join(pid.to_string()).exists()
}

/// Serialises the machine-wide steps of parallel test processes (creating network namespaces,
/// mounting bpffs, removing leftovers) with an exclusive `flock` on `/run/lb-tests.lock`.
pub fn global_lock() -> nix::fcntl::Flock<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lb-tests.lock")
        .expect("opening /run/lb-tests.lock");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .expect("flock /run/lb-tests.lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_of_unique_names() {
        let name = unique();
        assert_eq!(owner_pid(&name), Some(std::process::id()));
        assert_eq!(owner_pid("lbt123-4-node"), Some(123));
        assert_eq!(owner_pid("lbt123"), None);
        assert_eq!(owner_pid("lbtx-1"), None);
        assert_eq!(owner_pid("cni-1234"), None);
        assert!(pid_alive(std::process::id()));
    }
}
