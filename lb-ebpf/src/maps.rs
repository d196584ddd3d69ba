//! The maps, as BTF maps so `bpftool map dump` prints typed entries. Their layout is
//! defined in `lb-common`; only the declarations live here.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AFFINITY_MATCH_MAX_ENTRIES, AFFINITY_MAX_ENTRIES, AffinityKey, AffinityMatchKey, AffinityValue,
    Backend4, Backend6, COUNTER_COUNT, CT_MAX_ENTRIES, Clock, CtKey, CtValue, MAP_F_NO_PREALLOC,
    NODE_ADDRS_MAX_ENTRIES, NodeAddr, PEERS_MAX_ENTRIES, PeerKey, PeerValue, REVNAT4_MAX_ENTRIES,
    REVNAT6_MAX_ENTRIES, RevNat4Key, RevNat4Value, RevNat6Key, RevNat6Value, SERVICES_MAX_ENTRIES,
    SOURCE_RANGES_MAX_ENTRIES, Service4Key, Service6Key, ServiceValue, SourceRange,
};

use crate::xlate::{Backends, Slots};

/// IPv4 frontends: their master entries (see `lb_common::maps`).
#[btf_map]
pub static LB4_SERVICES: HashMap<
    Service4Key,
    ServiceValue,
    SERVICES_MAX_ENTRIES,
    MAP_F_NO_PREALLOC,
> = HashMap::new();

/// The backend slots of both families' frontends: each master names its range.
#[btf_map]
pub static LB_SLOTS: Slots = Array::new();

/// IPv4 backends, indexed by backend id.
#[btf_map]
pub static LB4_BACKENDS: Backends<Backend4> = Array::new();

/// (socket, IPv4 backend) to the frontend it dialled.
#[btf_map]
pub static LB4_REVNAT: LruHashMap<RevNat4Key, RevNat4Value, REVNAT4_MAX_ENTRIES> =
    LruHashMap::new();

/// IPv6 frontends: their master entries.
#[btf_map]
pub static LB6_SERVICES: HashMap<
    Service6Key,
    ServiceValue,
    SERVICES_MAX_ENTRIES,
    MAP_F_NO_PREALLOC,
> = HashMap::new();

/// IPv6 backends, indexed by backend id.
#[btf_map]
pub static LB6_BACKENDS: Backends<Backend6> = Array::new();

/// (socket, IPv6 backend) to the frontend it dialled.
#[btf_map]
pub static LB6_REVNAT: LruHashMap<RevNat6Key, RevNat6Value, REVNAT6_MAX_ENTRIES> =
    LruHashMap::new();

/// Backend to the frontend its TCP sockets dialled (both families; see
/// `lb_common::PeerKey`).
#[btf_map]
pub static LB_PEERS: HashMap<PeerKey, PeerValue, PEERS_MAX_ENTRIES, MAP_F_NO_PREALLOC> =
    HashMap::new();

/// A conntrack table (both directions, both families). The three are declared with one
/// capacity; the loader gives each its own (`--max-conntrack*`).
pub type Conntrack = LruHashMap<CtKey, CtValue, CT_MAX_ENTRIES>;

/// TCP flows whose client completed the handshake.
#[btf_map]
pub static LB_CT_TCP: Conntrack = LruHashMap::new();

/// TCP flows in their handshake (half-open): what a SYN flood fills.
#[btf_map]
pub static LB_CT_HALF_OPEN: Conntrack = LruHashMap::new();

/// Flows of the other protocols (UDP).
#[btf_map]
pub static LB_CT_OTHER: Conntrack = LruHashMap::new();

/// When the agent last deleted a backend (`lb_common::BACKENDS_REMOVED_MAP`). Not pinned.
#[btf_map]
pub static LB_BACKENDS_REMOVED: Array<u64, 1> = Array::new();

/// The datapath clock's calibration (`lb_common::CLOCK_MAP`). Not pinned.
#[btf_map]
pub static LB_CLOCK: Array<Clock, 1> = Array::new();

/// The layout version of the pinned maps (`lb_common::LAYOUT_VERSION`): written and read
/// by the agent only.
#[btf_map]
pub static LB_LAYOUT: Array<u32, 1> = Array::new();

/// The datapath's counters, one slot per `lb_common::Counter` and CPU.
#[btf_map]
pub static LB_COUNTERS: PerCpuArray<u64, COUNTER_COUNT> = PerCpuArray::new();

/// This CPU's ICMP reply budget: tokens and when they were last refilled.
#[repr(C)]
pub struct IcmpBudget {
    pub tokens: u64,
    pub refilled_ns: u64,
}

/// This CPU's state of the backend draw (`xlate::draw`): xorshift64*, seeded from
/// `bpf_get_prandom_u32` on first use. Not pinned.
#[btf_map]
pub static LB_DRAW: PerCpuArray<u64, 1> = PerCpuArray::new();

/// One [`IcmpBudget`] per CPU. Not pinned: a new agent starts with a full budget.
#[btf_map]
pub static ICMP_BUDGET: PerCpuArray<IcmpBudget, 1> = PerCpuArray::new();

/// This node's IPv4 addresses (on the `--devices`): a NodePort answers on each.
#[btf_map]
pub static LB4_NODE_ADDRS: HashMap<u32, NodeAddr, NODE_ADDRS_MAX_ENTRIES> = HashMap::new();

/// This node's IPv6 addresses (on the `--devices`).
#[btf_map]
pub static LB6_NODE_ADDRS: HashMap<[u32; 4], NodeAddr, NODE_ADDRS_MAX_ENTRIES> = HashMap::new();

/// Interface index of each `--devices` interface to its IPv4 address (the SNAT source).
#[btf_map]
pub static LB4_DEVICES: HashMap<u32, u32, NODE_ADDRS_MAX_ENTRIES> = HashMap::new();

/// Interface index of each `--devices` interface to its IPv6 address (the SNAT source).
#[btf_map]
pub static LB6_DEVICES: HashMap<u32, [u32; 4], NODE_ADDRS_MAX_ENTRIES> = HashMap::new();

/// (client, frontend) to the backend the client keeps under `sessionAffinity: ClientIP`.
#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue, AFFINITY_MAX_ENTRIES> =
    LruHashMap::new();

/// (backend, frontend) pairs an affinity entry may use: written by the agent.
#[btf_map]
pub static LB_AFFINITY_MATCH: HashMap<
    AffinityMatchKey,
    u32,
    AFFINITY_MATCH_MAX_ENTRIES,
    MAP_F_NO_PREALLOC,
> = HashMap::new();

/// `loadBalancerSourceRanges` of the LoadBalancer frontends: (frontend, range) prefixes.
#[btf_map]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRange, u32, SOURCE_RANGES_MAX_ENTRIES> = LpmTrie::new();

/// A new flow's two conntrack entries while they are built. Together with the packet and
/// the frontend lookup they would not fit the 512-byte BPF stack, so they are built in this
/// per-CPU slot (a tc program runs to completion on its CPU). Not pinned: scratch only.
#[repr(C)]
pub struct NewFlow {
    pub orig_key: CtKey,
    pub orig: CtValue,
    pub reply_key: CtKey,
    pub reply: CtValue,
}

/// One [`NewFlow`] per CPU.
#[btf_map]
pub static NEW_FLOW: PerCpuArray<NewFlow, 1> = PerCpuArray::new();
