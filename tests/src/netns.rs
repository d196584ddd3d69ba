//! Named network namespaces (`ip netns`), removed on drop.

use std::path::PathBuf;

use crate::cmd;
use crate::names;

/// A network namespace `/run/netns/NAME` with its loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (which should start with a name from [`names::unique`]).
    #[track_caller]
    pub fn create(name: &str) -> Self {
        {
            // Parallel first-time `ip netns add` calls race on setting up /run/netns.
            let _lock = names::global_lock();
            cmd::ip(&["netns", "add", name]);
        }
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"]);
        // No duplicate address detection on the interfaces made in it (link-local addresses
        // included): a tentative address holds back the first packets of a fresh topology.
        crate::topology::sysctl(name, "net.ipv6.conf.default.accept_dad=0");
        netns
    }

    /// The namespace's name, as `ip netns` and `lb-testkit --netns` take it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...`, panicking on failure.
    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        cmd::ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Deletes a namespace, reporting (not panicking on) failure.
pub(crate) fn delete(name: &str) {
    if let Err(err) = cmd::run(
        std::process::Command::new("ip").args(["netns", "del", name]),
        cmd::PLUMBING_TIMEOUT,
    ) {
        eprintln!("lb-tests: cleanup: {err}");
    }
}
