//! The capabilities `lb-agent run` needs, and naming the missing ones when the kernel refused
//! something. The agent never refuses to start on its own: it tries, and when a step fails
//! for lack of permission the error says which of these the process does not have.
use std::io;

/// A capability the agent uses, with its bit in `CapEff` and what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    bit: u32,
    pub needed_for: &'static str,
}

/// What `lb-agent run` needs (deploy/daemonset.yaml adds exactly these). Kernels >= 5.11
/// account BPF memory to the memory cgroup, so no `CAP_SYS_RESOURCE` for `RLIMIT_MEMLOCK`.
pub const NEEDED: [Capability; 3] = [
    Capability {
        name: "CAP_BPF",
        bit: 39,
        needed_for: "creating and pinning the maps, loading the programs",
    },
    Capability {
        name: "CAP_NET_ADMIN",
        bit: 12,
        needed_for: "loading the cgroup socket and tc programs, attaching tc",
    },
    Capability {
        name: "CAP_PERFMON",
        bit: 38,
        needed_for: "the verifier accepting the programs' pointer arithmetic",
    },
];

/// The capabilities of [`NEEDED`] missing from `cap_eff` (the hex `CapEff` of
/// `/proc/self/status`).
pub fn missing_from(cap_eff: u64) -> Vec<Capability> {
    NEEDED
        .into_iter()
        .filter(|cap| cap_eff & (1 << cap.bit) == 0)
        .collect()
}

/// This process's effective capabilities.
fn effective() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

/// Whether `error` (or a cause of it) is the kernel saying EPERM or EACCES.
fn is_permission_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            .is_some_and(|errno| errno == libc::EPERM || errno == libc::EACCES)
            || {
                let text = cause.to_string();
                text.contains("Operation not permitted") || text.contains("Permission denied")
            }
    })
}

/// `error`, with the missing capabilities named when it is a permission error and any of
/// [`NEEDED`] is missing.
pub fn explain(error: anyhow::Error) -> anyhow::Error {
    if !is_permission_error(&error) {
        return error;
    }
    let Ok(cap_eff) = effective() else {
        return error;
    };
    let missing = missing_from(cap_eff);
    if missing.is_empty() {
        return error;
    }
    let names: Vec<String> = missing
        .iter()
        .map(|cap| format!("{} ({})", cap.name, cap.needed_for))
        .collect();
    error.context(format!(
        "the kernel refused a step and lb-agent lacks {}: run it as root or add {} to \
         the container's capabilities",
        names.join(", "),
        missing
            .iter()
            .map(|cap| cap.name.trim_start_matches("CAP_"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_are_read_from_cap_eff() {
        // CAP_NET_ADMIN, CAP_PERFMON and CAP_BPF: 0xc0_0000_1000.
        assert!(missing_from(0xc0_0000_1000).is_empty());
        let names = |caps: Vec<Capability>| caps.iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(names(missing_from(0x80_0000_1000)), ["CAP_PERFMON"]);
        assert_eq!(names(missing_from(0x40_0000_1000)), ["CAP_BPF"]);
        assert_eq!(names(missing_from(0xc0_0000_0000)), ["CAP_NET_ADMIN"]);
        assert_eq!(missing_from(0).len(), 3);
    }

    #[test]
    fn only_permission_errors_are_explained() {
        let denied = anyhow::Error::new(io::Error::from_raw_os_error(libc::EPERM));
        assert!(is_permission_error(
            &denied.context("creating map LB4_SERVICES")
        ));
        let other = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOENT));
        assert!(!is_permission_error(&other));
    }
}
