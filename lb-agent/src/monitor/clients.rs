//! Who a socket-hook client is: the socket hooks see the client's network namespace (by
//! cookie), not its address, which the kernel has not chosen yet at `connect()`. The
//! monitor finds each namespace's addresses by entering it: the named ones (`/run/netns`)
//! and those of every process (`/proc/PID/ns/net`), each once.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

/// Network namespace cookies and their addresses, learnt on demand.
pub struct Netnses {
    /// The monitor's own namespace (the node's, beside the agent).
    node: u64,
    known: HashMap<u64, Vec<IpAddr>>,
    scanned: Option<Instant>,
}

/// The least time between two scans: an unknown cookie (a namespace already gone) must not
/// make every event scan.
const RESCAN_AFTER: Duration = Duration::from_secs(1);

impl Netnses {
    #[must_use]
    pub fn new() -> Self {
        Self {
            node: crate::loader::netns_cookie().unwrap_or(0),
            known: HashMap::new(),
            scanned: None,
        }
    }

    /// Whether `cookie` is the node's own namespace.
    #[must_use]
    pub fn is_node(&self, cookie: u64) -> bool {
        cookie == self.node
    }

    /// The addresses of the namespace `cookie` (loopback left out), scanning the
    /// namespaces again if it is new.
    pub fn addresses(&mut self, cookie: u64) -> &[IpAddr] {
        if !self.known.contains_key(&cookie)
            && self.scanned.is_none_or(|at| at.elapsed() >= RESCAN_AFTER)
        {
            self.scan();
        }
        self.known.get(&cookie).map_or(&[], Vec::as_slice)
    }

    fn scan(&mut self) {
        self.scanned = Some(Instant::now());
        let paths = namespace_paths();
        // setns changes the calling thread's namespace: a thread of its own does it.
        match std::thread::spawn(move || paths.into_iter().filter_map(|p| visit(&p)).collect())
            .join()
        {
            Ok(found) => self.known = found,
            Err(_) => tracing::debug!("scanning the network namespaces failed"),
        }
    }
}

impl Default for Netnses {
    fn default() -> Self {
        Self::new()
    }
}

/// One path per distinct network namespace.
fn namespace_paths() -> Vec<PathBuf> {
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path().join("ns/net"));
    let mut seen = HashSet::new();
    named
        .chain(processes)
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| seen.insert((m.dev(), m.ino()))))
        .collect()
}

/// Enters the namespace at `path` (on the scanning thread) and reads its cookie and
/// addresses.
fn visit(path: &PathBuf) -> Option<(u64, Vec<IpAddr>)> {
    let file = File::open(path).ok()?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
    let cookie = crate::loader::netns_cookie().ok()?;
    let addresses = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter_map(|ifa| {
            let address = ifa.address?;
            let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            (!ip.is_loopback()).then_some(ip)
        })
        .collect();
    Some((cookie, addresses))
}
