//! Loading the eBPF object, pinning its maps, attaching its programs through pinned links,
//! and taking all of it away again (`lb-agent cleanup`).
//!
//! Pin layout under `--bpf-pin-path`: one file per map (`LB4_SERVICES`, `LB4_BACKENDS`) and
//! `links/<hook>` per attached program. Pinned maps are reused by the next agent, so the
//! datapath keeps its state across restarts; pinned links keep the programs attached after
//! the agent exits.
use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        Program, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{CgroupAttachMode, FdLink, PinnedLink},
    },
};
use lb_common::MapCapacities;
use tracing::{debug, info, warn};

use std::os::fd::AsFd as _;

use crate::{
    links::{Target, Transaction},
    maps::bpf::BpfMaps,
};

/// The eBPF object built from `lb-ebpf` by `build.rs` for this very build of the agent.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The cgroup programs (`cgroup_sock_addr` and `cgroup_sock`): (program name in the
/// object, pin name under `links/`).
pub const CGROUP_PROGRAMS: [(&str, &str); 8] = [
    ("lb_connect4", "connect4"),
    ("lb_connect6", "connect6"),
    ("lb_sendmsg4", "sendmsg4"),
    ("lb_sendmsg6", "sendmsg6"),
    ("lb_recvmsg4", "recvmsg4"),
    ("lb_recvmsg6", "recvmsg6"),
    ("lb_getpeername4", "getpeername4"),
    ("lb_getpeername6", "getpeername6"),
];

/// Pin names of cgroup programs earlier versions attached and this one no longer has
/// (`sock_release` dropped connected sockets' reverse-NAT records, which now live in the
/// socket itself): their links are detached when found.
const RETIRED_CGROUP_LINKS: [&str; 1] = ["sock_release"];

/// The tc programs of the external devices: (program name, attach point, pin name prefix;
/// the device's name follows). Attached in this order: the reply path (egress) runs before
/// the path that translates (ingress), so no connection is translated on a device whose
/// replies would still pass untranslated.
pub const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("lb_tc_egress", TcAttachType::Egress, "tc-egress-"),
    ("lb_tc_ingress", TcAttachType::Ingress, "tc-ingress-"),
];

/// The tc programs of the pod-facing devices (with `--socket-lb host-only|off`): ingress is
/// what the pod sends, egress what it receives. Egress first, as for [`TC_PROGRAMS`]: a
/// new pod's first connection must not be translated before its reply can be.
pub const POD_TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("lb_tc_egress", TcAttachType::Egress, "tc-pod-egress-"),
    ("lb_tc_from_pod", TcAttachType::Ingress, "tc-pod-ingress-"),
];

/// The XDP program of the external devices (`--nodeport-acceleration`): (program name,
/// pin name prefix; the device's name follows).
pub const XDP_PROGRAM: (&str, &str) = ("lb_xdp", "xdp-");

/// Whether packets from outside to NodePorts, external and LoadBalancer IPs are translated
/// at XDP on the external devices (`--nodeport-acceleration`, Cilium's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NodePortAcceleration {
    /// Native (driver) XDP on every external device; the agent fails, naming the device,
    /// where a device cannot take it.
    Native,
    /// Native XDP where a device supports it; the others keep tc only (said in the log and
    /// in `services --summary`).
    BestEffort,
    /// No XDP: tc ingress translates (and XDP programs a previous agent attached are
    /// detached).
    #[default]
    Off,
}

/// Where connect-time (socket) translation runs (`--socket-lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SocketLb {
    /// Every socket in `--cgroup`, pods' and the node's: no per-packet work for them.
    #[default]
    All,
    /// Only sockets in the host's network namespace (the agent's); pods get the per-packet
    /// path at tc on their devices, so a sidecar in the pod sees the ClusterIP.
    HostOnly,
    /// No socket programs: pods get the per-packet path; processes of the node itself
    /// reach Services only through their NodePorts, external and LoadBalancer IPs.
    Off,
}

impl SocketLb {
    /// Whether the pod-facing devices get the per-packet path.
    #[must_use]
    pub const fn per_packet_for_pods(self) -> bool {
        !matches!(self, Self::All)
    }
}

/// Directory under the pin path holding the pinned links.
pub const LINKS_DIR: &str = "links";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("bpf filesystem at {path}: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error(
        "pinned map {path} does not match this agent ({found}; expected {expected}); \
         it was left by an incompatible version or other --max-* capacities: run \
         `lb-agent cleanup` first, or start with the capacities it was created with"
    )]
    IncompatiblePin {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("attaching {name}: {message}")]
    Attach { name: &'static str, message: String },
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error(
        "--nodeport-acceleration native: device {device} cannot take a native (driver) XDP \
         program: {message}; use best-effort to keep tc only on such devices, or off"
    )]
    NativeXdp { device: String, message: String },
    #[error("pinning link {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error(transparent)]
    Map(#[from] crate::maps::MapError),
    #[error(transparent)]
    NewerLayout(#[from] crate::layout::NewerLayout),
    #[error("reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+): {source}")]
    Netns { source: io::Error },
}

/// The cookie of the agent's network namespace (the host's, for a node agent).
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a socket used only for the getsockopt below and closed after it.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` outlive the call; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    let result = if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    };
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    result
}

/// The loaded object and its maps.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub maps: BpfMaps,
}

/// Loads the object, reusing the maps pinned under `pin_dir` (or creating and pinning them
/// with `capacities`).
///
/// # Errors
/// When bpffs is unavailable, a pinned map is incompatible, or the kernel refuses the object.
pub fn load(
    pin_dir: &Path,
    socket_lb: SocketLb,
    host_routing: bool,
    acceleration: NodePortAcceleration,
    capacities: &MapCapacities,
) -> Result<Loaded, LoadError> {
    crate::mounts::ensure_bpffs(pin_dir).map_err(|source| LoadError::Bpffs {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    let found = crate::layout::found(pin_dir).map_err(|source| LoadError::Bpffs {
        path: pin_dir.join(lb_common::LAYOUT_MAP),
        source,
    })?;
    crate::layout::check(pin_dir, found)?;
    let hashed_backends =
        crate::layout::take_hashed_backends(pin_dir, found).map_err(|source| LoadError::Bpffs {
            path: pin_dir.join(lb_common::BACKENDS4_MAP),
            source,
        })?;
    let slotted_services =
        crate::layout::take_slotted_services(pin_dir, found).map_err(|source| {
            LoadError::Bpffs {
                path: pin_dir.join(lb_common::SERVICES4_MAP),
                source,
            }
        })?;
    let specs = capacities.pinned_maps();
    check_pinned_maps(pin_dir, &specs)?;
    check_pinned_maps(pin_dir, &lb_common::MONITOR_MAPS)?;
    let mut loader = EbpfLoader::new();
    for spec in specs.iter().chain(&lb_common::MONITOR_MAPS) {
        loader.map_pin_path(spec.name, pin_dir.join(spec.name));
        loader.map_max_entries(
            spec.name,
            u32::try_from(spec.max_entries).unwrap_or(u32::MAX),
        );
    }
    let host_netns_cookie = match socket_lb {
        SocketLb::HostOnly => netns_cookie().map_err(|source| LoadError::Netns { source })?,
        SocketLb::All | SocketLb::Off => 0,
    };
    loader.override_global("HOST_NETNS_COOKIE", &host_netns_cookie, true);
    let host_routing = u8::from(host_routing);
    loader.override_global("HOST_ROUTING", &host_routing, true);
    let xdp_on = u8::from(acceleration != NodePortAcceleration::Off);
    loader.override_global("XDP_ON", &xdp_on, true);
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    match crate::conntrack::migrate_legacy_table(pin_dir) {
        Ok(0) => {}
        Ok(moved) => info!(
            moved,
            "moved the flows of the old conntrack map into the three tables"
        ),
        Err(e) => {
            warn!(error = %e, "could not move the flows of the old conntrack map; they start afresh")
        }
    }
    let mut maps = BpfMaps::from_maps(|name| {
        ebpf.take_map(name).ok_or_else(|| crate::maps::MapError {
            op: "take",
            map: name,
            source: io::Error::new(io::ErrorKind::NotFound, "missing from the eBPF object"),
        })
    })?;
    maps.restore_backends(&hashed_backends)?;
    maps.restore_services(&slotted_services)?;
    crate::layout::record(pin_dir).map_err(|source| LoadError::Bpffs {
        path: pin_dir.join(lb_common::LAYOUT_MAP),
        source,
    })?;
    if let crate::layout::Found::Layout(old) = found
        && old < lb_common::LAYOUT_VERSION
    {
        info!(
            from = old,
            to = lb_common::LAYOUT_VERSION,
            "migrated the pinned maps' layout"
        );
    }
    let removed = ebpf
        .take_map(lb_common::BACKENDS_REMOVED_MAP)
        .ok_or_else(|| crate::maps::MapError {
            op: "take",
            map: lb_common::BACKENDS_REMOVED_MAP,
            source: io::Error::new(io::ErrorKind::NotFound, "missing from the eBPF object"),
        })?;
    // Before the programs run: every tracked flow checks its backend once (those a previous
    // agent deleted included), then only after the deletions this agent stamps.
    let maps = maps.with_backends_removed(removed)?;
    Ok(Loaded { ebpf, maps })
}

/// Refuses to reuse a pinned map whose shape differs from what this agent's programs expect:
/// the kernel would accept the programs and they would read garbage.
fn check_pinned_maps(pin_dir: &Path, specs: &[lb_common::MapSpec]) -> Result<(), LoadError> {
    for spec in specs {
        let path = pin_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let shape = |t: String, k: usize, v: usize, n: usize, f: usize| {
            format!("{t}, key {k} B, value {v} B, {n} entries, flags {f:#x}")
        };
        let found = match MapData::from_pin(&path).and_then(|m| m.info()) {
            Ok(i) => shape(
                i.map_type()
                    .map_or_else(|_| "unknown type".to_string(), |t| format!("{t:?}")),
                i.key_size() as usize,
                i.value_size() as usize,
                i.max_entries() as usize,
                i.map_flags() as usize,
            ),
            Err(e) => format!("unreadable: {e}"),
        };
        let expected = shape(
            format!("{:?}", map_type(spec.kind)),
            spec.key_size,
            spec.value_size,
            spec.max_entries,
            spec.flags,
        );
        if found != expected {
            return Err(LoadError::IncompatiblePin {
                path,
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// aya's name of a map kind, as [`check_pinned_maps`] reads it back from the kernel.
const fn map_type(kind: lb_common::MapKind) -> aya::maps::MapType {
    use aya::maps::MapType;
    use lb_common::MapKind;
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::LruHash => MapType::LruHash,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::LpmTrie => MapType::LpmTrie,
        MapKind::RingBuf => MapType::RingBuf,
    }
}

/// Attaches every cgroup program to `cgroup` through a link pinned under `pin_dir/links`.
/// A link a previous agent left on the same cgroup keeps its place: its program is swapped
/// for this agent's in one step (`BPF_LINK_UPDATE`, see [`crate::links`]), so connects are
/// translated throughout, once. A failure half-way puts the previous programs back.
///
/// # Errors
/// When the cgroup cannot be opened or the kernel refuses the attachment.
pub fn attach_cgroup_programs(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    pin_dir: &Path,
) -> Result<(), LoadError> {
    let links = pin_dir.join(LINKS_DIR);
    fs::create_dir_all(&links).map_err(|source| LoadError::Bpffs {
        path: links.clone(),
        source,
    })?;
    let cgroup_fd = File::open(cgroup).map_err(|source| LoadError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let target = Target::cgroup(cgroup).map_err(|source| LoadError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let mut transaction = Transaction::default();
    for (name, pin_name) in CGROUP_PROGRAMS {
        let path = links.join(pin_name);
        let attach_error = |e: anyhow::Error| LoadError::Attach {
            name,
            message: format!("{e:#}"),
        };
        let program = program_mut(ebpf, name)?;
        let fd = load_cgroup_program(program).map_err(attach_error)?;
        if transaction.swap_if_pinned(&path, || Ok(target), fd.as_fd()) {
            continue;
        }
        let link = attach_to_cgroup(program, &cgroup_fd).map_err(attach_error)?;
        replace_pinned_link(&path, link)?;
        transaction.created(&path);
    }
    detach_retired_links(&links)?;
    transaction.commit();
    info!(
        programs = CGROUP_PROGRAMS.len(),
        cgroup = %cgroup.display(),
        "attached socket programs"
    );
    Ok(())
}

/// Programs by how long the kernel takes to verify them, longest first (the tc and XDP
/// ingress programs take about 35 ms each here, `lb_connect6` 20, the others 10 or less):
/// [`load_programs`] hands them out in this order.
const LONGEST_TO_VERIFY: [&str; 5] = [
    "lb_tc_ingress",
    "lb_tc_from_pod",
    "lb_xdp",
    "lb_connect6",
    "lb_connect4",
];

/// Loads (has the kernel verify) every program that attaching with this configuration will
/// need, without attaching any: the attach functions then find them loaded. Verification is
/// most of a first attach's time (~120 ms of CPU for this object), and it needs no Service,
/// so the agent runs this on a thread of its own while it reads its source and writes the
/// maps, and the kernel verifies on two threads at once (the longest first, so both finish
/// together: about 60 ms). A program that fails to load is left unloaded: attaching loads
/// it again and reports the error with its name.
pub fn load_programs(ebpf: &mut Ebpf, socket_lb: SocketLb, acceleration: NodePortAcceleration) {
    let mut names: Vec<&str> = Vec::new();
    if socket_lb != SocketLb::Off {
        names.extend(CGROUP_PROGRAMS.iter().map(|(name, _)| *name));
    }
    names.extend(
        TC_PROGRAMS
            .iter()
            .chain(&POD_TC_PROGRAMS)
            .map(|(name, ..)| *name),
    );
    if acceleration != NodePortAcceleration::Off {
        names.push(XDP_PROGRAM.0);
    }
    names.sort_unstable();
    names.dedup();
    let mut queue: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| names.contains(name))
        .collect();
    // Popped from the end: the longest go last in the vector, the unranked first.
    queue.sort_by_key(|(name, _)| {
        LONGEST_TO_VERIFY
            .iter()
            .position(|n| n == name)
            .map_or(0, |i| LONGEST_TO_VERIFY.len() - i)
    });
    let queue = std::sync::Mutex::new(queue);
    let load_queued = || {
        while let Some((name, program)) = queue.lock().ok().and_then(|mut q| q.pop()) {
            if let Err(e) = load_once(program) {
                debug!(
                    program = name,
                    error = error_chain(&e),
                    "loading ahead failed; attaching will say why"
                );
            }
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(load_queued);
        load_queued();
    });
}

/// Attaches the tc programs to the ingress and egress of each external device and of each
/// pod-facing one (TCX links, pinned under `pin_dir/links` as `tc-ingress-<dev>`,
/// `tc-egress-<dev>`, `tc-pod-ingress-<dev>`, `tc-pod-egress-<dev>`), replacing a previous
/// agent's links only once the new ones run; links of devices no longer listed (or gone)
/// are detached. `attached` holds the pin names this agent attached already (a program
/// cannot be attached twice to one hook): they are kept as they are.
///
/// # Errors
/// When a device does not exist or the kernel refuses the attachment.
pub fn attach_tc_programs(
    ebpf: &mut Ebpf,
    external: &[String],
    pods: &[String],
    pin_dir: &Path,
    attached: &mut std::collections::BTreeSet<String>,
) -> Result<(), LoadError> {
    let links = pin_dir.join(LINKS_DIR);
    fs::create_dir_all(&links).map_err(|source| LoadError::Bpffs {
        path: links.clone(),
        source,
    })?;
    let mut wanted = std::collections::BTreeSet::new();
    let mut transaction = Transaction::default();
    let sets = [(&TC_PROGRAMS, external), (&POD_TC_PROGRAMS, pods)];
    for (programs, devices) in sets {
        for (name, attach_type, prefix) in programs {
            let program_error = |e: aya::programs::ProgramError| LoadError::Attach {
                name,
                message: error_chain(&e),
            };
            let program = program_mut(ebpf, name)?;
            load_once(program).map_err(program_error)?;
            let program: &mut SchedClassifier = program.try_into().map_err(program_error)?;
            for device in devices {
                let pin_name = format!("{prefix}{device}");
                let path = links.join(&pin_name);
                if wanted.contains(&pin_name) {
                    continue;
                }
                if attached.contains(&pin_name) && path.exists() {
                    wanted.insert(pin_name);
                    continue;
                }
                // A previous agent's link on this device keeps its place; its program is
                // swapped for this one in one step.
                let device_index = || {
                    nix::net::if_::if_nametoindex(device.as_str())
                        .map(Target::Device)
                        .map_err(io::Error::from)
                };
                let fd = program.fd().map_err(program_error)?.as_fd();
                if !transaction.swap_if_pinned(&path, device_index, fd) {
                    let link_id = program
                        .attach(device, *attach_type)
                        .map_err(program_error)?;
                    let link = program.take_link(link_id).map_err(program_error)?;
                    let link = FdLink::try_from(link).map_err(|e| pin_error(&path, &e))?;
                    replace_pinned_link(&path, link)?;
                    transaction.created(&path);
                }
                attached.insert(pin_name.clone());
                wanted.insert(pin_name);
            }
        }
    }
    let stale = fs::read_dir(&links).map_err(|source| LoadError::Bpffs {
        path: links.clone(),
        source,
    })?;
    for entry in stale.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_tc = TC_PROGRAMS
            .iter()
            .chain(&POD_TC_PROGRAMS)
            .any(|(_, _, p)| name.starts_with(p));
        if is_tc && !wanted.contains(&name) {
            attached.remove(&name);
            let path = entry.path();
            drop(unpin_link(&path));
            info!(link = %path.display(), "detached the tc program of a device no longer listed");
        }
    }
    transaction.commit();
    info!(external = ?external, pods = pods.len(), "attached tc programs");
    Ok(())
}

/// Attaches the XDP program to each external device in native (driver) mode through a link
/// pinned as `pin_dir/links/xdp-<dev>` (a previous agent's link on the same device has its
/// program swapped in place), and detaches the XDP links of devices no longer listed, or
/// all of them with `--nodeport-acceleration off`. Returns the devices that run it; with
/// `best-effort`, a device that refuses native XDP is left on tc only (and logged).
/// `attached` holds the pin names this agent attached already: they are kept.
///
/// # Errors
/// With `native`, when a device cannot take native XDP; when the kernel refuses the
/// program, or a pin cannot be written.
pub fn attach_xdp_programs(
    ebpf: &mut Ebpf,
    external: &[String],
    mode: NodePortAcceleration,
    pin_dir: &Path,
    attached: &mut std::collections::BTreeSet<String>,
) -> Result<Vec<String>, LoadError> {
    let links = pin_dir.join(LINKS_DIR);
    let (name, prefix) = XDP_PROGRAM;
    let mut wanted = std::collections::BTreeSet::new();
    let mut transaction = Transaction::default();
    let mut on_xdp = Vec::new();
    if mode != NodePortAcceleration::Off {
        fs::create_dir_all(&links).map_err(|source| LoadError::Bpffs {
            path: links.clone(),
            source,
        })?;
        let program_error = |e: aya::programs::ProgramError| LoadError::Attach {
            name,
            message: error_chain(&e),
        };
        let program = program_mut(ebpf, name)?;
        load_once(program).map_err(program_error)?;
        let program: &mut Xdp = program.try_into().map_err(program_error)?;
        for device in external {
            let pin_name = format!("{prefix}{device}");
            let path = links.join(&pin_name);
            if wanted.contains(&pin_name) {
                continue;
            }
            if !(attached.contains(&pin_name) && path.exists()) {
                let device_index = || {
                    nix::net::if_::if_nametoindex(device.as_str())
                        .map(Target::Device)
                        .map_err(io::Error::from)
                };
                let fd = program.fd().map_err(program_error)?.as_fd();
                if !transaction.swap_if_pinned(&path, device_index, fd) {
                    let attach = program
                        .attach(device, XdpMode::Driver)
                        .map_err(|e| error_chain(&e))
                        .and_then(|id| program.take_link(id).map_err(|e| error_chain(&e)))
                        .and_then(|link| FdLink::try_from(link).map_err(|e| error_chain(&e)));
                    let link = match (attach, mode) {
                        (Ok(link), _) => link,
                        (Err(message), NodePortAcceleration::Native) => {
                            return Err(LoadError::NativeXdp {
                                device: device.clone(),
                                message,
                            });
                        }
                        (Err(message), _) => {
                            warn!(
                                device = %device,
                                error = %message,
                                "no native XDP on this device; it keeps tc only (--nodeport-acceleration best-effort)"
                            );
                            continue;
                        }
                    };
                    replace_pinned_link(&path, link)?;
                    transaction.created(&path);
                }
            }
            attached.insert(pin_name.clone());
            wanted.insert(pin_name);
            on_xdp.push(device.clone());
        }
    }
    if links.is_dir() {
        let stale = fs::read_dir(&links).map_err(|source| LoadError::Bpffs {
            path: links.clone(),
            source,
        })?;
        for entry in stale.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && !wanted.contains(&name) {
                attached.remove(&name);
                let path = entry.path();
                drop(unpin_link(&path));
                info!(link = %path.display(), "detached the XDP program of a device no longer accelerated");
            }
        }
    }
    transaction.commit();
    if mode != NodePortAcceleration::Off {
        info!(devices = ?on_xdp, mode = ?mode, "attached the XDP program");
    }
    Ok(on_xdp)
}

/// Detaches the cgroup programs a previous agent pinned (`--socket-lb off`).
///
/// # Errors
/// When a pin exists but cannot be removed.
pub fn detach_cgroup_programs(pin_dir: &Path) -> io::Result<()> {
    for (_, pin_name) in CGROUP_PROGRAMS {
        let path = pin_dir.join(LINKS_DIR).join(pin_name);
        if path.exists() {
            unpin_link(&path)?;
            info!(link = %path.display(), "detached a socket program (--socket-lb off)");
        }
    }
    detach_retired_links(&pin_dir.join(LINKS_DIR)).map_err(|e| match e {
        LoadError::Pin { path, message } => {
            io::Error::other(format!("{}: {message}", path.display()))
        }
        other => io::Error::other(other.to_string()),
    })
}

/// Detaches the links of [`RETIRED_CGROUP_LINKS`] a previous version left under `links`.
fn detach_retired_links(links: &Path) -> Result<(), LoadError> {
    for pin_name in RETIRED_CGROUP_LINKS {
        let path = links.join(pin_name);
        if path.exists() {
            unpin_link(&path).map_err(|e| pin_error(&path, &e))?;
            info!(link = %path.display(), "detached a program this version no longer has");
        }
    }
    Ok(())
}

/// Unpins the link at `path`; dropping its last fd detaches the program. A pin that is no
/// link is removed.
fn unpin_link(path: &Path) -> io::Result<()> {
    match PinnedLink::from_pin(path) {
        // Unpin, then drop the last fd: the kernel detaches the program.
        Ok(link) => drop(link.unpin()?),
        Err(e) => {
            warn!(link = %path.display(), error = %e, "not a link; removing the pin");
            fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// Loads (has the kernel verify) `program` unless it is loaded already: the attach
/// functions and [`load_programs`] ahead of them share it, so a program is verified once.
/// Program types the agent does not attach are left as they are.
fn load_once(program: &mut Program) -> Result<(), aya::programs::ProgramError> {
    macro_rules! once {
        ($program:expr) => {
            if $program.fd().is_err() {
                $program.load()?;
            }
        };
    }
    match program {
        Program::CgroupSockAddr(p) => once!(p),
        Program::CgroupSock(p) => once!(p),
        Program::SchedClassifier(p) => once!(p),
        Program::Xdp(p) => once!(p),
        _ => {}
    }
    Ok(())
}

/// Loads a cgroup program (once) and returns its fd.
fn load_cgroup_program(program: &mut Program) -> anyhow::Result<std::os::fd::OwnedFd> {
    if !matches!(program, Program::CgroupSockAddr(_) | Program::CgroupSock(_)) {
        anyhow::bail!("{:?} is not a cgroup socket program", program.prog_type());
    }
    load_once(program)?;
    let fd = match program {
        Program::CgroupSockAddr(p) => p.fd()?,
        Program::CgroupSock(p) => p.fd()?,
        _ => unreachable!("checked above"),
    };
    Ok(fd.as_fd().try_clone_to_owned()?)
}

/// Attaches a loaded cgroup program to `cgroup` through a link the caller owns.
fn attach_to_cgroup(program: &mut Program, cgroup: &File) -> anyhow::Result<FdLink> {
    macro_rules! attach {
        ($program:expr) => {{
            let id = $program.attach(cgroup, CgroupAttachMode::Single)?;
            FdLink::try_from($program.take_link(id)?)?
        }};
    }
    Ok(match program {
        Program::CgroupSockAddr(p) => attach!(p),
        Program::CgroupSock(p) => attach!(p),
        other => anyhow::bail!("{:?} is not a cgroup socket program", other.prog_type()),
    })
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Program, LoadError> {
    ebpf.program_mut(name).ok_or_else(|| LoadError::Attach {
        name,
        message: "not in the eBPF object".to_string(),
    })
}

/// An error and its sources, `: `-separated (aya's syscall errors keep the errno in their
/// source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn pin_error(path: &Path, error: &dyn std::fmt::Display) -> LoadError {
    LoadError::Pin {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

/// Pins `new` at `path`, detaching whatever link was pinned there before, after `new` runs.
fn replace_pinned_link(path: &Path, new: FdLink) -> Result<(), LoadError> {
    // Unpinning returns the old link as an fd: it stays attached until dropped below.
    let old = if path.exists() {
        let old = PinnedLink::from_pin(path).map_err(|e| pin_error(path, &e))?;
        Some(old.unpin().map_err(|e| pin_error(path, &e))?)
    } else {
        None
    };
    new.pin(path).map_err(|e| pin_error(path, &e))?;
    if old.is_some() {
        debug!(link = %path.display(), "replaced the previous agent's link");
    }
    drop(old);
    Ok(())
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub links_detached: Vec<PathBuf>,
    pub maps_removed: Vec<PathBuf>,
    /// Entries the agent never creates, left where they are (and with them the directory).
    pub left: Vec<PathBuf>,
}

/// Whether `name` is a link pin the agent creates (a socket program's, or a tc program's
/// on a device), or one an earlier version created.
#[must_use]
pub fn is_agent_link(name: &str) -> bool {
    CGROUP_PROGRAMS.iter().any(|(_, pin)| *pin == name)
        || RETIRED_CGROUP_LINKS.contains(&name)
        || TC_PROGRAMS
            .iter()
            .chain(&POD_TC_PROGRAMS)
            .map(|(_, _, prefix)| *prefix)
            .chain([XDP_PROGRAM.1])
            .any(|prefix| name.strip_prefix(prefix).is_some_and(|dev| !dev.is_empty()))
}

/// Whether `name` is a map pin the agent creates, or one an earlier version created.
#[must_use]
pub fn is_agent_map(name: &str) -> bool {
    lb_common::PINNED_MAPS
        .iter()
        .chain(&lb_common::MONITOR_MAPS)
        .any(|spec| spec.name == name)
        || name == lb_common::LEGACY_CT_MAP
}

/// Detaches the links and removes the maps the agent pins under `pin_dir` (by their
/// names: nothing else is touched), then the directories if that emptied them.
///
/// # Errors
/// When a pin exists but cannot be removed.
pub fn cleanup(pin_dir: &Path) -> io::Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let name_of = |path: &Path| path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
    let links = pin_dir.join(LINKS_DIR);
    if links.is_dir() {
        for entry in fs::read_dir(&links)? {
            let path = entry?.path();
            if name_of(&path).is_some_and(|n| is_agent_link(&n)) {
                unpin_link(&path)?;
                report.links_detached.push(path);
            } else {
                report.left.push(path);
            }
        }
        remove_if_empty(&links)?;
    }
    if pin_dir.is_dir() {
        for entry in fs::read_dir(pin_dir)? {
            let path = entry?.path();
            if path == links {
                continue;
            }
            if name_of(&path).is_some_and(|n| is_agent_map(&n)) && path.is_file() {
                fs::remove_file(&path)?;
                report.maps_removed.push(path);
            } else {
                report.left.push(path);
            }
        }
        remove_if_empty(pin_dir)?;
    }
    Ok(report)
}

/// Removes `dir` when it is empty.
fn remove_if_empty(dir: &Path) -> io::Result<()> {
    if fs::read_dir(dir)?.next().is_none() {
        fs::remove_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod cleanup_tests {
    use super::*;

    #[test]
    fn only_the_names_the_agent_pins_are_its_own() {
        assert!(is_agent_link("connect4") && is_agent_link("tc-pod-ingress-veth1"));
        assert!(is_agent_link("xdp-eth0") && !is_agent_link("xdp-"));
        assert!(!is_agent_link("tc-ingress-") && !is_agent_link("cilium_connect4"));
        assert!(is_agent_map("LB4_SERVICES") && is_agent_map("LB_CT"));
        assert!(is_agent_map("LB_MONITOR_SWITCH") && is_agent_map("LB_MONITOR_EVENTS"));
        assert!(!is_agent_map("LB4_SERVICES.old") && !is_agent_map("cilium_lb4_services"));
    }

    /// Cleanup removes its maps and leaves anything else, and then the directory too.
    #[test]
    fn cleanup_leaves_what_it_did_not_create() {
        let dir = std::env::temp_dir().join(format!("lb-cleanup-{}", std::process::id()));
        fs::create_dir_all(dir.join(LINKS_DIR)).unwrap();
        for name in ["LB4_SERVICES", "LB_CT", "someone-elses-map"] {
            fs::write(dir.join(name), "").unwrap();
        }
        fs::write(dir.join(LINKS_DIR).join("their-link"), "").unwrap();
        let report = cleanup(&dir).unwrap();
        let names = |paths: &[PathBuf]| {
            let mut names: Vec<String> = paths
                .iter()
                .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
                .collect();
            names.sort();
            names
        };
        let removed = names(&report.maps_removed);
        let left = names(&report.left);
        let still_there = dir.join("someone-elses-map").exists();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(removed, ["LB4_SERVICES", "LB_CT"]);
        assert_eq!(left, ["links/their-link", "someone-elses-map"]);
        assert!(still_there);
    }
}
