//! The decision monitor (`lb-agent monitor`): the datapath describes each translation
//! decision it takes (a connect or datagram at the socket hooks, the first packet of a flow
//! at tc) in a [`MonitorEvent`] on the ring buffer [`MONITOR_EVENTS_MAP`], but only while
//! the switch [`MONITOR_SWITCH_MAP`] is on.
//!
//! The switch is a lease: `lb-agent monitor` writes a deadline ([`MonitorSwitch::until_ns`],
//! `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`) a few seconds ahead and renews it
//! while it runs; it writes 0 when it exits. A monitor killed without a chance to do so
//! leaves a deadline that passes by itself, so the datapath never keeps describing decisions
//! nobody reads. Off (0), a decision costs the datapath one array lookup (which the
//! verifier inlines into a load) and a compare; an expired lease adds one clock read.
//!
//! Both maps are pinned beside the others, so the monitor finds them without the agent.
use crate::{FrontendId, MapKind, MapSpec};

/// Name of the one-entry array holding the [`MonitorSwitch`].
pub const MONITOR_SWITCH_MAP: &str = "LB_MONITOR_SWITCH";
/// Name of the ring buffer of [`MonitorEvent`]s.
pub const MONITOR_EVENTS_MAP: &str = "LB_MONITOR_EVENTS";
/// Size of the ring buffer in bytes (a power of two, a multiple of the page size): about
/// 2,000 events, what a reader polling every 100 ms keeps up with at 20,000 decisions/s.
/// When it is full, further events are lost (and counted by the reader as gaps, not by
/// the datapath): the datapath never waits for the monitor.
pub const MONITOR_EVENTS_BYTES: usize = 256 * 1024;
/// How far ahead `lb-agent monitor` sets the switch's deadline, in seconds; it renews it
/// every second, so a killed monitor leaves the switch on for at most this long.
pub const MONITOR_LEASE_SECS: u64 = 3;

/// The monitor's switch, the only value of [`MONITOR_SWITCH_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorSwitch {
    /// Decisions are described while `bpf_ktime_get_ns()` is below this; 0: off.
    pub until_ns: u64,
}

/// Where a decision was taken ([`MonitorEvent::hook`]).
pub const MON_HOOK_CONNECT: u8 = 1;
/// `sendmsg()` on an unconnected UDP socket.
pub const MON_HOOK_SENDMSG: u8 = 2;
/// tc ingress of an external device: a client outside the node.
pub const MON_HOOK_TC_EXTERNAL: u8 = 3;
/// tc ingress of a pod-facing device: a pod on the per-packet path.
pub const MON_HOOK_TC_POD: u8 = 4;
/// XDP on an external device (`--nodeport-acceleration`): a client outside the node.
pub const MON_HOOK_XDP: u8 = 5;

/// What was decided ([`MonitorEvent::outcome`]): translated to the backend in the event.
pub const MON_OUT_TRANSLATED: u8 = 1;
/// Refused: the frontend has no endpoints (ECONNREFUSED at a socket, ICMP unreachable at tc).
pub const MON_OUT_NO_ENDPOINTS: u8 = 2;
/// Dropped: a Local traffic policy leaves no endpoint on this node (EHOSTUNREACH at a
/// socket), though the Service has some elsewhere.
pub const MON_OUT_NO_LOCAL_ENDPOINTS: u8 = 3;
/// Dropped at tc: the client is outside the frontend's `loadBalancerSourceRanges`.
pub const MON_OUT_FIREWALLED: u8 = 4;

/// How the backend was picked ([`MonitorEvent::pick`]): slot `slot` of `count` at random.
pub const MON_PICK_RANDOM: u8 = 0;
/// Slot `slot` of `count` from the socket's hash (unconnected UDP keeps one backend).
pub const MON_PICK_SOCKET_HASH: u8 = 1;
/// Kept by `sessionAffinity: ClientIP` (`slot` is 0: the entry names the backend).
pub const MON_PICK_AFFINITY: u8 = 2;

/// One translation decision. Addresses are four network-order words (IPv4-mapped for
/// IPv4), ports network order, as in the other maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// When (`bpf_ktime_get_ns`, `CLOCK_MONOTONIC`).
    pub time_ns: u64,
    /// Socket hooks: the client socket's network namespace cookie (a pod, or the host); 0
    /// at tc.
    pub netns_cookie: u64,
    /// Socket hooks: the cgroup v2 id of the calling task; 0 at tc.
    pub cgroup_id: u64,
    /// Socket hooks: the calling process (thread group id); 0 at tc.
    pub pid: u32,
    /// The frontend's id (its master's `rev_nat_id`).
    pub rev_nat_id: FrontendId,
    /// tc: the packet's source address; 0 at the socket hooks (not chosen yet at connect).
    pub client: [u32; 4],
    /// The address the client dialled (a NodePort: the node address it was sent to).
    pub frontend: [u32; 4],
    /// The backend chosen; 0 unless translated.
    pub backend: [u32; 4],
    /// tc: the packet's source port; 0 at the socket hooks.
    pub client_port: u16,
    /// The port the client dialled.
    pub frontend_port: u16,
    /// The backend's port; 0 unless translated.
    pub backend_port: u16,
    /// The backend slot picked, `1..=count`; 0 when kept by affinity or not translated.
    pub slot: u16,
    /// The frontend's backend count as the datapath read it.
    pub count: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// `MON_HOOK_*`.
    pub hook: u8,
    /// `MON_OUT_*`.
    pub outcome: u8,
    /// `MON_PICK_*` (meaningful when translated).
    pub pick: u8,
    pub pad: [u8; 2],
    /// The frontend master's `SVC_F_*` flags (local-only, affinity, two scopes, …).
    pub svc_flags: u32,
    /// Socket hooks: the calling task's name (`comm`); zeros at tc.
    pub comm: [u8; 16],
    pub pad2: u32,
}

const _: () = assert!(core::mem::size_of::<MonitorSwitch>() == 8);
const _: () = assert!(core::mem::size_of::<MonitorEvent>() == 120);
// The ring buffer reserves in 8-byte units: no tail for the kernel to pad.
const _: () = assert!(core::mem::size_of::<MonitorEvent>().is_multiple_of(8));

/// The monitor's maps with their shapes (a ring buffer has no key or value size).
pub const MONITOR_MAPS: [MapSpec; 2] = [
    MapSpec::of::<u32, MonitorSwitch>(MapKind::Array, MONITOR_SWITCH_MAP, 1, 0),
    MapSpec {
        kind: MapKind::RingBuf,
        name: MONITOR_EVENTS_MAP,
        key_size: 0,
        value_size: 0,
        max_entries: MONITOR_EVENTS_BYTES,
        flags: 0,
    },
];

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` integers and arrays only, no implicit padding (sizes asserted).
    unsafe impl aya::Pod for super::MonitorSwitch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MonitorEvent {}
}
