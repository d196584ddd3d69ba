//! Service load-balancing maps, modelled on Cilium's `lb4_key`/`lb4_service`/`lb4_backend`
//! and Katran's arrays.
//!
//! A Service frontend (virtual address, port, protocol) has one *master* entry in the
//! services map of its family, holding its backend count and where its backend slots
//! start: the slots are `count` consecutive entries of the slots array ([`SLOTS_MAP`], one
//! for both families), each naming one backend id, the IPv4 ones holding the backend
//! inline. The backends map of the family, an array indexed by id, resolves an id to an
//! address and port (an id no backend holds is all zeros). Backend ids are one space across
//! both families, handed out lowest free first so they stay dense.
//!
//! Write order (the agent's job, see `lb-agent/src/maps/writer.rs`): backends first, then
//! the frontend's slots into a range of the slots array that no master names, then the
//! master naming that range with the new count; only then are the old range (after a grace
//! period, for connects that read the old master, unless the array has no other room) and
//! unused backends freed. A slot a master names is never written in place (an array entry is copied in place, so a reader
//! could see half of a write). A connect that reads the master at any moment therefore
//! finds every slot of its range filled with a live backend, and a Service whose backends
//! change never looks empty in between.
//!
//! The reverse-NAT maps are written by the datapath itself: when a socket is translated,
//! `(socket cookie, backend)` records the frontend it dialled, so `recvmsg` and
//! `getpeername` can show the application the Service address instead of the backend.
//!
//! Addresses and ports are stored in network byte order, as `bpf_sock_addr` carries them.

/// Name of the IPv4 services map (pinned under `--bpf-pin-path` with this name).
pub const SERVICES4_MAP: &str = "LB4_SERVICES";
/// Name of the IPv4 backends map.
pub const BACKENDS4_MAP: &str = "LB4_BACKENDS";
/// Name of the IPv4 reverse-NAT map.
pub const REVNAT4_MAP: &str = "LB4_REVNAT";
/// Name of the IPv6 services map.
pub const SERVICES6_MAP: &str = "LB6_SERVICES";
/// Name of the IPv6 backends map.
pub const BACKENDS6_MAP: &str = "LB6_BACKENDS";
/// Name of the IPv6 reverse-NAT map.
pub const REVNAT6_MAP: &str = "LB6_REVNAT";
/// Name of the backend slots array of both families ([`SlotValue`]): each master names
/// the range of it that holds its frontend's slots.
pub const SLOTS_MAP: &str = "LB_SLOTS";
/// Name of the map of which frontend a backend's TCP sockets dialled, written by the
/// socket path instead of a per-socket reverse-NAT record (see [`PeerKey`]).
pub const PEERS_MAP: &str = "LB_PEERS";
/// Name of the conntrack table of established TCP flows of the tc datapath (both
/// families): a flow enters it only once its client has completed the handshake.
pub const CT_TCP_MAP: &str = "LB_CT_TCP";
/// Name of the conntrack table of TCP flows whose handshake is not complete (half-open):
/// a SYN flood fills only this table, and its entries live seconds.
pub const CT_HALF_OPEN_MAP: &str = "LB_CT_HALF_OPEN";
/// Name of the conntrack table of the other protocols' flows (UDP).
pub const CT_OTHER_MAP: &str = "LB_CT_OTHER";
/// Name of the one-entry array holding when the agent last deleted a backend
/// (`CLOCK_MONOTONIC` ns): a tracked flow checks that its backend still exists only when its
/// last packet came before then. Not pinned: each agent writes it when it loads the object.
pub const BACKENDS_REMOVED_MAP: &str = "LB_BACKENDS_REMOVED";
/// Name of the one-entry array holding the datapath's clock calibration ([`Clock`]). Not
/// pinned: each agent measures the kernel's tick and writes it once its programs are loaded.
pub const CLOCK_MAP: &str = "LB_CLOCK";
/// Name of the program that reads the kernel's two clocks for that calibration (run by
/// the agent through `BPF_PROG_TEST_RUN`, never attached; see [`ClockSample`]).
pub const CLOCK_PROBE_PROGRAM: &str = "lb_clock_probe";
/// Name of the conntrack map of versions before the split into three tables; an agent
/// migrates its entries and removes it.
pub const LEGACY_CT_MAP: &str = "LB_CT";
/// Name of the one-entry map that holds the [`LAYOUT_VERSION`] the pinned maps were
/// written with.
pub const LAYOUT_MAP: &str = "LB_LAYOUT";
/// The version of the pinned maps' layout: raised whenever a pinned map changes its
/// meaning or shape, so that an agent knows what it adopts. An agent migrates the layouts
/// before its own (see `lb-agent/src/layout.rs`) and refuses newer ones.
///
/// 1: every layout before the version was recorded (up to the three conntrack tables).
/// 2: `LB_PEERS`, and this map.
/// 3: the backends maps are arrays indexed by backend id (they were hash maps).
/// 4: backend slots live in the slots array (they were services-map entries under slot
///    numbers `1..=count`); a master names its range (`ServiceValue::base`).
pub const LAYOUT_VERSION: u32 = 4;
/// Name of the datapath's per-CPU counters ([`Counter`]).
pub const COUNTERS_MAP: &str = "LB_COUNTERS";
/// Name of the map of this node's IPv4 addresses (NodePort frontends answer on each).
pub const NODE_ADDRS4_MAP: &str = "LB4_NODE_ADDRS";
/// Name of the map of this node's IPv6 addresses.
pub const NODE_ADDRS6_MAP: &str = "LB6_NODE_ADDRS";
/// Name of the map of each `--devices` interface's IPv4 address (the SNAT source).
pub const DEVICES4_MAP: &str = "LB4_DEVICES";
/// Name of the map of each `--devices` interface's IPv6 address (the SNAT source).
pub const DEVICES6_MAP: &str = "LB6_DEVICES";
/// Name of the session-affinity map: (client, frontend) to the backend it last got.
pub const AFFINITY_MAP: &str = "LB_AFFINITY";
/// Name of the map of the backends each affinity frontend may still keep a client on.
pub const AFFINITY_MATCH_MAP: &str = "LB_AFFINITY_MATCH";
/// Name of the map of each LoadBalancer frontend's `loadBalancerSourceRanges`.
pub const SOURCE_RANGES_MAP: &str = "LB_SOURCE_RANGES";
/// A frontend's id, its master's `rev_nat_id`: reverse-NAT, conntrack, affinity and
/// source-range entries name their frontend by it. 32 bits, so ids never run out before
/// the maps do (Cilium's 16-bit `rev_nat_index` caps a node at 65,535 frontends).
pub type FrontendId = u32;

/// The capacities of the maps that grow with the cluster, set by the agent's flags. The
/// programs declare the defaults; the loader sets these before it creates the maps, and a
/// pinned map is reused only if it was created with the same ones.
///
/// Memory (the kernel's own accounting, charged to the agent's memory cgroup): a hash map
/// allocates 16 B per bucket up front, one bucket per entry rounded up to a power of two
/// (the services map at the defaults: 2^18 buckets, 4 MiB per family), and then each entry
/// as it is written (about 64–96 B). Arrays and LRU maps (conntrack) are allocated whole
/// up front.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacities {
    /// Frontends per family (`--max-frontends`): one master entry in the services map each
    /// (an address, port and protocol of a Service, two for an `externalTrafficPolicy:
    /// Local` frontend with its in-cluster entry).
    pub frontends: u32,
    /// Backend slots of both families (`--max-backend-slots`): the slots array's entries,
    /// one per endpoint of each frontend (16 B each, allocated whole).
    pub backend_slots: u32,
    /// Backend ids (`--max-backends`): each backends map is an array of this many entries,
    /// indexed by id, and id 0 is never used, so this many distinct backends (address,
    /// port, protocol) of both families together, less one, fit.
    pub backends: u32,
    /// Conntrack entries of established TCP flows (`--max-conntrack`), two per flow.
    pub conntrack: u32,
    /// Conntrack entries of UDP flows (`--max-conntrack-other`), two per flow.
    pub conntrack_other: u32,
    /// Conntrack entries of TCP flows in their handshake (`--max-conntrack-half-open`), two
    /// per flow.
    pub conntrack_half_open: u32,
}

impl MapCapacities {
    /// Room for 100,000 Services × 10 endpoints in one family with a ClusterIP each, and
    /// for NodePorts and external addresses beside them (the slots array: 28 MiB).
    pub const DEFAULT: Self = Self {
        frontends: 262_144,
        backend_slots: 1_835_008,
        backends: 1_048_576,
        // Cilium's defaults (`bpf-ct-global-tcp-max`, `bpf-ct-global-any-max`).
        conntrack: 524_288,
        conntrack_other: 262_144,
        conntrack_half_open: 65_536,
    };

    /// Every map the agent pins, with its shape at these capacities.
    #[must_use]
    pub const fn pinned_maps(&self) -> [MapSpec; 20] {
        let services = self.frontends as usize;
        let backends = self.backends as usize;
        [
            MapSpec::of::<Service4Key, ServiceValue>(
                MapKind::Hash,
                SERVICES4_MAP,
                services,
                MAP_F_NO_PREALLOC,
            ),
            MapSpec::of::<u32, SlotValue>(
                MapKind::Array,
                SLOTS_MAP,
                self.backend_slots as usize,
                MAP_F_MMAPABLE,
            ),
            MapSpec::of::<u32, Backend4>(MapKind::Array, BACKENDS4_MAP, backends, MAP_F_MMAPABLE),
            MapSpec::of::<RevNat4Key, RevNat4Value>(
                MapKind::LruHash,
                REVNAT4_MAP,
                REVNAT4_MAX_ENTRIES,
                0,
            ),
            MapSpec::of::<Service6Key, ServiceValue>(
                MapKind::Hash,
                SERVICES6_MAP,
                services,
                MAP_F_NO_PREALLOC,
            ),
            MapSpec::of::<u32, Backend6>(MapKind::Array, BACKENDS6_MAP, backends, MAP_F_MMAPABLE),
            MapSpec::of::<RevNat6Key, RevNat6Value>(
                MapKind::LruHash,
                REVNAT6_MAP,
                REVNAT6_MAX_ENTRIES,
                0,
            ),
            MapSpec::of::<PeerKey, PeerValue>(
                MapKind::Hash,
                PEERS_MAP,
                PEERS_MAX_ENTRIES,
                MAP_F_NO_PREALLOC,
            ),
            MapSpec::of::<CtKey, CtValue>(MapKind::LruHash, CT_TCP_MAP, self.conntrack as usize, 0),
            MapSpec::of::<CtKey, CtValue>(
                MapKind::LruHash,
                CT_HALF_OPEN_MAP,
                self.conntrack_half_open as usize,
                0,
            ),
            MapSpec::of::<CtKey, CtValue>(
                MapKind::LruHash,
                CT_OTHER_MAP,
                self.conntrack_other as usize,
                0,
            ),
            MapSpec::of::<u32, u64>(MapKind::PerCpuArray, COUNTERS_MAP, COUNTER_COUNT, 0),
            MapSpec::of::<u32, u32>(MapKind::Array, LAYOUT_MAP, 1, 0),
            MapSpec::of::<u32, NodeAddr>(MapKind::Hash, NODE_ADDRS4_MAP, NODE_ADDRS_MAX_ENTRIES, 0),
            MapSpec::of::<[u32; 4], NodeAddr>(
                MapKind::Hash,
                NODE_ADDRS6_MAP,
                NODE_ADDRS_MAX_ENTRIES,
                0,
            ),
            MapSpec::of::<u32, u32>(MapKind::Hash, DEVICES4_MAP, NODE_ADDRS_MAX_ENTRIES, 0),
            MapSpec::of::<u32, [u32; 4]>(MapKind::Hash, DEVICES6_MAP, NODE_ADDRS_MAX_ENTRIES, 0),
            MapSpec::of::<AffinityKey, AffinityValue>(
                MapKind::LruHash,
                AFFINITY_MAP,
                AFFINITY_MAX_ENTRIES,
                0,
            ),
            MapSpec::of::<AffinityMatchKey, u32>(
                MapKind::Hash,
                AFFINITY_MATCH_MAP,
                AFFINITY_MATCH_MAX_ENTRIES,
                MAP_F_NO_PREALLOC,
            ),
            // An LPM trie key is the prefix length (a `u32`) followed by the data.
            MapSpec {
                kind: MapKind::LpmTrie,
                name: SOURCE_RANGES_MAP,
                key_size: 4 + core::mem::size_of::<SourceRange>(),
                value_size: 4,
                max_entries: SOURCE_RANGES_MAX_ENTRIES,
                flags: MAP_F_NO_PREALLOC,
            },
        ]
    }
}

impl Default for MapCapacities {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Every map the agent pins, with its shape at the default capacities.
pub const PINNED_MAPS: [MapSpec; 20] = MapCapacities::DEFAULT.pinned_maps();

/// The shape of a map as the kernel records it: a pinned map is reused only if it has
/// exactly this shape (the declarations in `lb-ebpf/src/maps.rs` use the same types and
/// constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub kind: MapKind,
    /// Name, and the file name of its pin.
    pub name: &'static str,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: usize,
    /// `BPF_F_*` map flags.
    pub flags: usize,
}

/// The kernel's map types the agent pins (`BPF_MAP_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
    LpmTrie,
    RingBuf,
}

impl MapSpec {
    /// The spec of a map with keys `K` and values `V`.
    #[must_use]
    pub const fn of<K, V>(
        kind: MapKind,
        name: &'static str,
        max_entries: usize,
        flags: usize,
    ) -> Self {
        Self {
            kind,
            name,
            key_size: core::mem::size_of::<K>(),
            value_size: core::mem::size_of::<V>(),
            max_entries,
            flags,
        }
    }
}

/// Declared capacity of each services map (one master entry per frontend): the default
/// [`MapCapacities`]; the loader sets the configured one.
pub const SERVICES_MAX_ENTRIES: usize = MapCapacities::DEFAULT.frontends as usize;
/// Declared capacity of the slots array (backend slots of both families).
pub const SLOTS_MAX_ENTRIES: usize = MapCapacities::DEFAULT.backend_slots as usize;
/// Declared capacity of each backends map: backend ids, both families' (an array, allocated
/// up front: 8 B an entry for IPv4, 24 B for IPv6, 32 MiB together at the default).
pub const BACKENDS_MAX_ENTRIES: usize = MapCapacities::DEFAULT.backends as usize;
/// Capacity of the affinity-match map: one entry per backend slot of the frontends with
/// `sessionAffinity: ClientIP` (allocated as written; 4 MiB of buckets).
pub const AFFINITY_MATCH_MAX_ENTRIES: usize = 262_144;
/// Capacity of each reverse-NAT map (translated sockets); least recently used entries are
/// evicted first, so it cannot grow without bound. LRU maps are preallocated: this is
/// their memory (about 9 MiB for IPv4, 7 MiB for IPv6).
pub const REVNAT4_MAX_ENTRIES: usize = 131_072;
/// Capacity of the IPv6 reverse-NAT map.
pub const REVNAT6_MAX_ENTRIES: usize = 65_536;
/// Capacity of the peers map: backends whose TCP sockets need no reverse-NAT record
/// (allocated as written: 4 MiB of buckets). When it is full, a connection to a backend
/// not in it writes its record, as before.
pub const PEERS_MAX_ENTRIES: usize = 262_144;

/// `BPF_F_NO_PREALLOC`: the services maps allocate entries as the agent writes them, so
/// their memory follows the cluster's size instead of their capacity. Only the agent
/// writes them, so the datapath never pays for an allocation.
pub const MAP_F_NO_PREALLOC: usize = 1;

/// `BPF_F_MMAPABLE`: the backends and slots arrays can be mapped into the agent's memory,
/// so that reading a million entries at start is a scan of memory, not a million copies
/// through `bpf()` (which cost a third of a second for the two empty backends arrays).
pub const MAP_F_MMAPABLE: usize = 1 << 10;

/// Declared capacity of the established-TCP conntrack table: two entries (original and
/// reply direction) per flow; least recently used entries are evicted first. Preallocated
/// (LRU), as the other two tables.
pub const CT_MAX_ENTRIES: usize = MapCapacities::DEFAULT.conntrack as usize;
/// Declared capacity of the half-open TCP conntrack table.
pub const CT_HALF_OPEN_MAX_ENTRIES: usize = MapCapacities::DEFAULT.conntrack_half_open as usize;
/// Declared capacity of the UDP conntrack table.
pub const CT_OTHER_MAX_ENTRIES: usize = MapCapacities::DEFAULT.conntrack_other as usize;
/// Capacity of the session-affinity map: (client, frontend) pairs of Services with
/// `sessionAffinity: ClientIP` (Cilium's default 64k). Least recently used entries are
/// evicted first; an evicted client simply picks afresh. Preallocated (LRU): about 5 MiB.
pub const AFFINITY_MAX_ENTRIES: usize = 65_536;

/// Capacity of the source-range map: every CIDR of every LoadBalancer frontend with
/// `loadBalancerSourceRanges` (allocated as written).
pub const SOURCE_RANGES_MAX_ENTRIES: usize = 16_384;

/// Capacity of the node-address map (addresses of the `--devices`).
pub const NODE_ADDRS_MAX_ENTRIES: usize = 256;

/// The `backend_slot` of every services-map key: the master's. Slot keys `1..=count` of
/// layouts before 4 are migrated into the slots array.
pub const MASTER_SLOT: u16 = 0;

/// IANA protocol numbers as the socket hooks see them in `bpf_sock_addr.protocol`.
pub const PROTO_TCP: u8 = 6;
/// UDP, see [`PROTO_TCP`].
pub const PROTO_UDP: u8 = 17;

/// Frontend scope of every frontend's first (or only) entry: what clients outside the
/// cluster get. Under `externalTrafficPolicy: Local` it names only node-local backends.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Frontend scope of the second entry of a frontend with [`SVC_F_TWO_SCOPES`]: what clients
/// inside the cluster (pods, and processes of the node) get, every endpoint of the Service,
/// as kube-proxy short-circuits in-cluster traffic to an `externalTrafficPolicy: Local`
/// Service's external addresses to all endpoints (Cilium's `LB_LOOKUP_SCOPE_INT`).
pub const SCOPE_INTERNAL: u8 = 1;

/// The frontend is a ClusterIP (`spec.clusterIP(s)`).
pub const SVC_F_CLUSTER_IP: u32 = 1 << 0;
/// The frontend is an external IP (`spec.externalIPs`).
pub const SVC_F_EXTERNAL_IP: u32 = 1 << 1;
/// The frontend is a LoadBalancer ingress IP (`status.loadBalancer.ingress[].ip`).
pub const SVC_F_LOADBALANCER: u32 = 1 << 2;

/// The frontend is a NodePort: its key has address 0 (any address of this node, see
/// [`NODE_ADDRS4_MAP`]) and the `nodePort` as port.
pub const SVC_F_NODEPORT: u32 = 1 << 3;
/// `externalTrafficPolicy: Local`: the slots name only node-local backends, and the tc
/// datapath never SNATs (the backend sees the client's address).
pub const SVC_F_LOCAL: u32 = 1 << 4;
/// The frontend's [`SCOPE_EXTERNAL`] entry is for clients outside the cluster only: clients
/// inside it look up the [`SCOPE_INTERNAL`] entry of the same frontend.
pub const SVC_F_TWO_SCOPES: u32 = 1 << 5;
/// `sessionAffinity: ClientIP`: a client keeps the backend it last got (see
/// [`AFFINITY_MAP`]); the master's `backend_id` field holds the timeout in seconds.
pub const SVC_F_AFFINITY: u32 = 1 << 6;
/// The frontend has no backend because its Local traffic policy leaves none on this node,
/// while the Service has endpoints elsewhere: traffic is dropped, as kube-proxy drops it,
/// not refused as for a Service without endpoints.
pub const SVC_F_NO_LOCAL: u32 = 1 << 7;

/// The frontend (a LoadBalancer IP) has `loadBalancerSourceRanges`: the tc paths drop a new
/// flow whose source is in none of them ([`SOURCE_RANGES_MAP`]), as kube-proxy's firewall
/// chain does.
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 8;

/// The backend is terminating: it gets new connections only because its Service has no
/// ready endpoint left (kube-proxy's fallback to serving, terminating endpoints).
pub const BE_F_TERMINATING: u8 = 1 << 0;
/// The backend runs on another node (its endpoint's `nodeName` differs from this node's):
/// traffic from outside to it is SNATed to the node address under
/// `externalTrafficPolicy: Cluster`, so the reply comes back through this node.
pub const BE_F_REMOTE: u8 = 1 << 1;

/// Conntrack direction of a key: the client's packets (client → frontend).
pub const CT_DIR_ORIG: u8 = 0;
/// Conntrack direction of a key: the backend's packets (backend → client, or backend →
/// SNAT address and port).
pub const CT_DIR_REPLY: u8 = 1;

/// The flow is SNATed: the backend sees `snat_addr:snat_port` as its client.
pub const CT_F_SNAT: u8 = 1 << 0;

/// TCP state bit: a SYN was seen.
pub const CT_TCP_SYN: u8 = 1 << 0;
/// TCP state bit: a packet of the reply direction was seen (the flow is established).
pub const CT_TCP_SEEN_REPLY: u8 = 1 << 1;
/// TCP state bit: a FIN was seen from the client.
pub const CT_TCP_FIN_ORIG: u8 = 1 << 2;
/// TCP state bit: a FIN was seen from the backend.
pub const CT_TCP_FIN_REPLY: u8 = 1 << 3;
/// TCP state bit: an RST was seen.
pub const CT_TCP_RST: u8 = 1 << 4;
/// TCP state bit: the client acknowledged the backend's SYN-ACK: the handshake is
/// complete and the flow lives in the established table.
pub const CT_TCP_ESTABLISHED: u8 = 1 << 5;

/// Lifetime of an idle established TCP connection, in nanoseconds (Cilium's 6 h).
pub const CT_TCP_LIFETIME_NS: u64 = 21_600 * 1_000_000_000;
/// Lifetime of an idle TCP flow in its handshake (half-open: SYN sent, or SYN-ACK seen
/// and the client's ACK not yet), in nanoseconds. A client retransmits its SYN after 1, 2,
/// 4 and 8 s; a longer silence starts the flow afresh.
pub const CT_SYN_LIFETIME_NS: u64 = 10 * 1_000_000_000;
/// Lifetime of a closing TCP connection (FIN from both sides, or RST), in nanoseconds.
pub const CT_CLOSE_LIFETIME_NS: u64 = 10 * 1_000_000_000;
/// The three conntrack tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtTable {
    /// [`CT_TCP_MAP`]: TCP flows whose client completed the handshake.
    Established,
    /// [`CT_HALF_OPEN_MAP`]: TCP flows in their handshake.
    HalfOpen,
    /// [`CT_OTHER_MAP`]: every other protocol's flows.
    Other,
}

impl CtTable {
    /// How long an idle entry of this table in TCP state `tcp_state` lives, in
    /// nanoseconds: the datapath and the agent's sweep apply the same rule.
    #[must_use]
    pub const fn lifetime_ns(self, tcp_state: u8) -> u64 {
        let closing = tcp_state & CT_TCP_RST != 0
            || tcp_state & (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY)
                == (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY);
        match self {
            Self::Other => CT_UDP_LIFETIME_NS,
            _ if closing => CT_CLOSE_LIFETIME_NS,
            Self::HalfOpen => CT_SYN_LIFETIME_NS,
            Self::Established => CT_TCP_LIFETIME_NS,
        }
    }

    /// The table's map name.
    #[must_use]
    pub const fn map_name(self) -> &'static str {
        match self {
            Self::Established => CT_TCP_MAP,
            Self::HalfOpen => CT_HALF_OPEN_MAP,
            Self::Other => CT_OTHER_MAP,
        }
    }
}

/// Lifetime of an idle UDP flow, in nanoseconds.
pub const CT_UDP_LIFETIME_NS: u64 = 60 * 1_000_000_000;

/// The datapath's per-CPU counters: index of each in [`COUNTERS_MAP`] (a per-CPU array;
/// the agent sums the CPUs).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// Connections and datagram destinations the socket hooks translated to a backend.
    SockTranslated = 0,
    /// Flows the tc datapath started (a SYN, or a UDP datagram, to a frontend).
    TcFlowsStarted = 1,
    /// TCP flows that completed their handshake (moved to the established table).
    TcFlowsEstablished = 2,
    /// Connections or packets refused because the frontend has no endpoint it may use.
    NoEndpoints = 3,
    /// New flows dropped because a conntrack table refused the entry.
    ConntrackFull = 4,
    /// New flows dropped because no SNAT port was free.
    SnatPortsExhausted = 5,
    /// TCP packets to a frontend that start no flow and belong to none (not a SYN):
    /// dropped, as kube-proxy drops conntrack's INVALID packets.
    TcpOutOfFlowDropped = 6,
    /// ICMP unreachable replies not sent: over the rate limit.
    IcmpRateLimited = 7,
    /// Packets dropped by `loadBalancerSourceRanges`.
    Firewalled = 8,
    /// Packets dropped because a rewrite helper failed.
    RewriteFailed = 9,
    /// Backends kept by `sessionAffinity: ClientIP`.
    AffinityHits = 10,
}

/// Number of [`Counter`]s (entries of [`COUNTERS_MAP`]).
pub const COUNTER_COUNT: usize = 11;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Self; COUNTER_COUNT] = [
        Self::SockTranslated,
        Self::TcFlowsStarted,
        Self::TcFlowsEstablished,
        Self::NoEndpoints,
        Self::ConntrackFull,
        Self::SnatPortsExhausted,
        Self::TcpOutOfFlowDropped,
        Self::IcmpRateLimited,
        Self::Firewalled,
        Self::RewriteFailed,
        Self::AffinityHits,
    ];

    /// The counter's name in reports and metrics (snake case).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SockTranslated => "sock_translated",
            Self::TcFlowsStarted => "tc_flows_started",
            Self::TcFlowsEstablished => "tc_flows_established",
            Self::NoEndpoints => "no_endpoints",
            Self::ConntrackFull => "conntrack_full",
            Self::SnatPortsExhausted => "snat_ports_exhausted",
            Self::TcpOutOfFlowDropped => "tcp_out_of_flow_dropped",
            Self::IcmpRateLimited => "icmp_rate_limited",
            Self::Firewalled => "firewalled",
            Self::RewriteFailed => "rewrite_failed",
            Self::AffinityHits => "affinity_hits",
        }
    }
}

/// ICMP unreachable replies the tc datapath sends per second and CPU at most (Linux's
/// `icmp_msgs_per_sec` default), after a burst of [`ICMP_BURST`].
pub const ICMP_PER_SEC: u64 = 1_000;
/// The burst of ICMP replies allowed before the rate applies (Linux's `icmp_msgs_burst`).
pub const ICMP_BURST: u64 = 50;

/// First port the tc datapath SNATs to (Cilium's `NODEPORT_PORT_MIN_NAT`).
pub const SNAT_PORT_MIN: u16 = 32_768;
/// Number of SNAT ports, from [`SNAT_PORT_MIN`] (to 60999, clear of the NodePort range).
pub const SNAT_PORT_COUNT: u16 = 28_232;

/// Whether `port` (host byte order) is one the tc datapath SNATs to: only a packet to such
/// a port can be a reply of an SNATed flow, so no other packet looks for one.
#[must_use]
pub const fn is_snat_port(port: u16) -> bool {
    port >= SNAT_PORT_MIN && port - SNAT_PORT_MIN < SNAT_PORT_COUNT
}

/// The source a pod's flow to a Service it backs itself (hairpin) is SNATed to, IPv4
/// (Cilium's `IPV4_LOOPBACK`, link-local): the pod answers it through its default route,
/// so the reply comes back through the pod's own device to be translated back.
pub const HAIRPIN4: [u8; 4] = [169, 254, 42, 1];
/// The hairpin source for IPv6: an address of the discard-only prefix `100::/64`
/// (RFC 6666), which no host has.
pub const HAIRPIN6: [u8; 16] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42, 0, 1];

/// Key of the IPv4 services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4Key {
    /// Frontend IPv4 address, network byte order (as `bpf_sock_addr.user_ip4`).
    pub address: u32,
    /// Frontend port, network byte order.
    pub dport: u16,
    /// Always [`MASTER_SLOT`]: the key keeps the field of layouts before 4, whose backend
    /// slots were entries of this map under `1..=count`.
    pub backend_slot: u16,
    /// IP protocol number ([`PROTO_TCP`], [`PROTO_UDP`]).
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`] or [`SCOPE_INTERNAL`].
    pub scope: u8,
    /// Explicit padding, always zero.
    pub pad: [u8; 2],
}

/// Key of the IPv6 services map; as [`Service4Key`] with a 16-byte address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service6Key {
    /// Frontend IPv6 address as four network-order words (as `bpf_sock_addr.user_ip6`).
    pub address: [u32; 4],
    /// Frontend port, network byte order.
    pub dport: u16,
    /// Always [`MASTER_SLOT`]: the key keeps the field of layouts before 4, whose backend
    /// slots were entries of this map under `1..=count`.
    pub backend_slot: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`] or [`SCOPE_INTERNAL`].
    pub scope: u8,
    /// Explicit padding, always zero.
    pub pad: [u8; 2],
}

/// Value of both services maps: a frontend's master entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceValue {
    /// The session-affinity timeout in seconds with [`SVC_F_AFFINITY`], else 0 (Cilium's
    /// union of the two; the field names a backend in no entry since layout 4).
    pub backend_id: u32,
    /// Id of this frontend, unique per frontend; reverse-NAT entries carry it so a stale
    /// entry (of a frontend since deleted) is never used.
    pub rev_nat_id: FrontendId,
    /// `SVC_F_*` flags.
    pub flags: u32,
    /// Number of backend slots. 0 means the Service has no endpoints and a connect to it is
    /// refused.
    pub count: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
    /// Index in the slots array ([`SLOTS_MAP`]) of the first of the `count` slots (slot
    /// `n`, `1..=count`, is entry `base + n - 1`); 0 when `count` is 0.
    pub base: u32,
}

/// Value of the slots array: one backend slot of a frontend, naming its backend by id, and
/// an IPv4 slot holding it inline as well, so a connection needs no second lookup:
///
/// ```text
///            backend_id   peer_mark           backend
/// IPv4 slot  backend id   peer mark (below)   the backend (Backend4, protocol ≠ 0)
/// IPv6 slot  backend id   peer mark (below)   zeros
/// ```
///
/// The peer mark is written by the socket datapath, never by the agent (whose writes of a
/// slot set it to 0): the frontend's id once the backend's claim in the peers map was found
/// to name this frontend (see [`PeerKey`]), so later TCP connections through the slot skip
/// that lookup. The agent forgets a claim only after its frontend's master stopped naming
/// the slots that named the backend. The bytes are those of a layout-3 slot entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotValue {
    /// Id of the backend in its family's backends map.
    pub backend_id: u32,
    /// The peer mark: 0, or the id of the frontend the backend's claim names.
    pub peer_mark: FrontendId,
    /// An IPv4 slot's backend inline; zeros (protocol 0) in an IPv6 slot.
    pub backend: Backend4,
}

/// Value of the IPv4 backends map, at the index of its backend id (never 0). All zeros
/// (protocol 0) where no backend holds the id: see [`BackendEntry::is_present`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend4 {
    /// Backend (pod) IPv4 address, network byte order.
    pub address: u32,
    /// Backend port (the Service's resolved `targetPort`), network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BE_F_*` flags.
    pub flags: u8,
}

/// Value of the IPv6 backends map, at the index of its backend id (never 0); all zeros
/// where no backend holds the id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend6 {
    /// Backend (pod) IPv6 address as four network-order words.
    pub address: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BE_F_*` flags.
    pub flags: u8,
}

/// An entry of a backends array, either family.
pub trait BackendEntry: Copy {
    /// Whether a backend holds this entry's id: the agent writes every backend with its
    /// protocol, and an id it frees as all zeros.
    fn is_present(&self) -> bool;
}

impl BackendEntry for Backend4 {
    #[inline(always)]
    fn is_present(&self) -> bool {
        self.proto != 0
    }
}

impl BackendEntry for Backend6 {
    #[inline(always)]
    fn is_present(&self) -> bool {
        self.proto != 0
    }
}

/// Key of the IPv4 reverse-NAT map: a translated socket and the backend it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevNat4Key {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// Backend IPv4 address, network byte order.
    pub address: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: [u8; 2],
}

/// Value of the IPv4 reverse-NAT map: the frontend the socket dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevNat4Value {
    /// Frontend IPv4 address, network byte order.
    pub address: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
    /// The frontend's `rev_nat_id` when the entry was made.
    pub rev_nat_id: FrontendId,
}

/// Key of the IPv6 reverse-NAT map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevNat6Key {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// Backend IPv6 address as four network-order words.
    pub address: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: [u8; 6],
}

/// Value of the IPv6 reverse-NAT map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevNat6Value {
    /// Frontend IPv6 address as four network-order words.
    pub address: [u32; 4],
    /// Frontend port, network byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
    /// The frontend's `rev_nat_id` when the entry was made.
    pub rev_nat_id: FrontendId,
}

/// Key of the peers map: a backend (both families, IPv4-mapped for IPv4).
///
/// A TCP socket needs its reverse translation only for `getpeername()`, and only the
/// frontend it dialled: a per-socket LRU record costs more than all the lookups of a
/// `connect()` (the LRU's insert walks its lists). So the first TCP connection to a backend
/// through a frontend claims the backend here (`BPF_NOEXIST`), and every later TCP
/// connection to it through the same frontend writes nothing; a connection through another
/// frontend (two Services sharing a pod and port, or a NodePort beside its ClusterIP)
/// finds the claim taken and writes its own record, which `getpeername()` reads first.
///
/// A socket that dials a claimed backend directly (not through a Service) writes a record
/// that says so ([`REV_NAT_DIRECT`]). One that dialled a pod directly *before* any
/// connection through a Service claimed it, and calls `getpeername()` only after, sees the
/// Service's address: nothing on such a socket tells it apart without a write on every
/// `connect()` (socket cookies are handed out in per-CPU batches, so they do not order
/// sockets). The agent deletes a claim when its backend leaves that frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    /// Backend address as four network-order words.
    pub address: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// IP protocol number (only [`PROTO_TCP`] is written).
    pub proto: u8,
    /// Explicit padding, always zero.
    pub pad: u8,
}

/// Value of the peers map: the frontend that claimed the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerValue {
    /// Frontend address as dialled, four network-order words (IPv4-mapped for IPv4).
    pub address: [u32; 4],
    /// Frontend port, network byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
    /// The frontend's `rev_nat_id`.
    pub rev_nat_id: FrontendId,
}

/// [`RevNat4Value::rev_nat_id`] of the record of a TCP socket that dialled a claimed
/// backend directly: `getpeername()` leaves its address alone (no frontend has id 0).
pub const REV_NAT_DIRECT: FrontendId = 0;

/// [`AffinityKey::client_kind`]: the client is a network namespace, by its cookie
/// (`bpf_get_netns_cookie`) in `client[0..2]`: the socket path, which runs before the
/// socket has a source address. A pod is one network namespace, so this is the pod, as
/// kube-proxy sees it by its address; the node's own processes share one.
pub const AFFINITY_CLIENT_NETNS: u8 = 1;
/// [`AffinityKey::client_kind`]: the client is a source address (four words, IPv4-mapped
/// for IPv4): the tc paths, for clients outside the node and pods served per packet.
pub const AFFINITY_CLIENT_ADDR: u8 = 2;

/// Key of the session-affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// The client: an address, or a network-namespace cookie (see `client_kind`).
    pub client: [u32; 4],
    /// The frontend (its master's `rev_nat_id`).
    pub rev_nat_id: FrontendId,
    /// [`AFFINITY_CLIENT_NETNS`] or [`AFFINITY_CLIENT_ADDR`].
    pub client_kind: u8,
    /// Explicit padding, always zero.
    pub pad: [u8; 3],
}

/// Value of the session-affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityValue {
    /// The backend the client got.
    pub backend_id: u32,
    /// Explicit padding, always zero.
    pub pad: u32,
    /// The datapath's clock ([`Clock`]) at the client's last new connection to the
    /// frontend: the entry holds while less than the frontend's timeout has passed since
    /// (kube-proxy's `recent --rcheck --seconds`; [`AffinityValue::expired`]).
    pub last_used_ns: u64,
}

impl AffinityValue {
    /// Whether more than `timeout_s` seconds passed between the entry's last use and `now`.
    /// A last use after `now` is recent, not a wrap: the datapath's clock steps back by up
    /// to a tick when the agent calibrates it (the coarse-clock helper until then, which
    /// runs up to a tick ahead of `jiffies`) or a restarted agent calibrates it again.
    #[must_use]
    pub const fn expired(&self, now: u64, timeout_s: u32) -> bool {
        now.saturating_sub(self.last_used_ns) > timeout_s as u64 * 1_000_000_000
    }
}

/// Key of the affinity-match map, written by the agent for every backend slot of a frontend
/// with [`SVC_F_AFFINITY`] (Cilium's `lb_affinity_match`): an affinity entry is used only
/// while its backend still serves its frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    /// A backend of the frontend.
    pub backend_id: u32,
    /// The frontend's `rev_nat_id`.
    pub rev_nat_id: FrontendId,
}

/// The data of a source-range (LPM trie) key, after its prefix length: the frontend, then
/// the address. A range `a/p` of a frontend has prefix length `32 + p` (IPv6) or
/// `32 + 96 + p` (IPv4, stored IPv4-mapped), so the frontend always matches whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// The frontend's `rev_nat_id`, network byte order (the trie compares bytes).
    pub rev_nat_id: FrontendId,
    /// The range's address as four network-order words (IPv4-mapped for IPv4).
    pub addr: [u32; 4],
}

/// Prefix length (in bits of [`SourceRange`]) of a source-range key for a range of
/// `bits` bits of an address of the given family.
#[must_use]
pub const fn source_range_prefix(ipv6: bool, bits: u32) -> u32 {
    if ipv6 { 32 + bits } else { 32 + 96 + bits }
}

/// Key of the conntrack map: a packet's 5-tuple as it is on the wire at the hook that looks
/// it up, and the direction. One map serves both families (as Katran's `flow_key`): IPv4
/// addresses are stored IPv4-mapped (`::ffff:a.b.c.d`). The original direction is keyed by
/// the client's packet as it arrives (client → frontend); the reply direction by the
/// backend's packet (backend → client, or backend → SNAT address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source address as four network-order words.
    pub saddr: [u32; 4],
    /// Destination address as four network-order words.
    pub daddr: [u32; 4],
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`CT_DIR_ORIG`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    /// Explicit padding, always zero.
    pub pad: [u8; 2],
}

/// Value of the conntrack map.
///
/// Original direction: DNAT to `nat_addr:nat_port` (the backend), and with [`CT_F_SNAT`]
/// SNAT to `snat_addr:snat_port`. Reply direction: the source becomes `nat_addr:nat_port`
/// (the frontend the client dialled), and with [`CT_F_SNAT`] the destination becomes
/// `snat_addr:snat_port` (the client). Addresses as in [`CtKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtValue {
    /// Address to translate to (see the type's description).
    pub nat_addr: [u32; 4],
    /// SNAT address (original) or client address (reply); zero without SNAT.
    pub snat_addr: [u32; 4],
    /// Port to translate to, network byte order.
    pub nat_port: u16,
    /// SNAT port (original) or client port (reply), network byte order.
    pub snat_port: u16,
    /// `rev_nat_id` of the frontend when the flow was created.
    pub rev_nat_id: FrontendId,
    /// Backend id chosen for the flow (so a removed backend's flows can be recognised).
    pub backend_id: u32,
    /// `CT_F_*` flags.
    pub flags: u8,
    /// `CT_TCP_*` bits seen so far (shared meaning in both directions' entries).
    pub tcp_state: u8,
    /// Explicit padding, always zero.
    pub pad: [u8; 2],
    /// When the flow was created: `CLOCK_MONOTONIC` ns as of the last tick (the datapath's
    /// clock, [`Clock`]).
    pub created_ns: u64,
    /// The same clock at the last packet of this direction.
    pub last_seen_ns: u64,
}

/// Value of the clock array ([`CLOCK_MAP`]): how the datapath reads `CLOCK_MONOTONIC`
/// (the clock of the conntrack entries' times) from `jiffies`, a load the verifier inlines,
/// instead of calling `bpf_ktime_get_coarse_ns` on every packet (as Cilium's datapath
/// reads jiffies when it can):
///
/// ```text
/// now_ns = jiffies × ns_per_jiffy + offset_ns      (wrapping u64)
/// ```
///
/// `ns_per_jiffy` 0: not calibrated yet (the agent measures the tick after loading its
/// programs); the datapath then calls the helper. A calibrated clock runs at most two ticks
/// behind `CLOCK_MONOTONIC`, never ahead of it, as `bpf_ktime_get_coarse_ns` does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    /// The kernel's tick in nanoseconds (`TICK_NSEC`), 0 when not calibrated.
    pub ns_per_jiffy: u64,
    /// `CLOCK_MONOTONIC` minus `jiffies × ns_per_jiffy`, wrapping.
    pub offset_ns: u64,
}

/// What [`CLOCK_PROBE_PROGRAM`] writes into its test packet, 14 bytes in (after the
/// Ethernet header), native byte order: both clocks read at one instant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockSample {
    /// `jiffies_64`.
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns`: `CLOCK_MONOTONIC` as of the last tick.
    pub ns: u64,
}

/// Offset of [`ClockSample`] in the probe's test packet.
pub const CLOCK_SAMPLE_OFFSET: usize = 14;

/// Value of the node-address maps, keyed by an address in network byte order (IPv4: a
/// `u32`, IPv6: four words).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddr {
    /// Interface index of the device holding the address.
    pub ifindex: u32,
    /// Reserved, always zero.
    pub flags: u32,
}

/// What both services-map key types offer the datapath and the agent.
pub trait ServiceKey: Copy {
    /// The same frontend's entry in `scope`.
    #[must_use]
    fn with_scope(&self, scope: u8) -> Self;
}

impl Service4Key {
    /// The master key of the NodePort frontend `nodePort/proto` (port in network order).
    #[must_use]
    pub const fn node_port(dport: u16, proto: u8) -> Self {
        Self::new(0, dport, proto)
    }

    /// The master key of the frontend `address:dport/proto` (both in network order).
    #[must_use]
    pub const fn new(address: u32, dport: u16, proto: u8) -> Self {
        Self {
            address,
            dport,
            backend_slot: MASTER_SLOT,
            proto,
            scope: SCOPE_EXTERNAL,
            pad: [0; 2],
        }
    }
}

impl Service6Key {
    /// The master key of the NodePort frontend `nodePort/proto` (port in network order).
    #[must_use]
    pub const fn node_port(dport: u16, proto: u8) -> Self {
        Self::new([0; 4], dport, proto)
    }

    /// The master key of the frontend `address:dport/proto` (both in network order).
    #[must_use]
    pub const fn new(address: [u32; 4], dport: u16, proto: u8) -> Self {
        Self {
            address,
            dport,
            backend_slot: MASTER_SLOT,
            proto,
            scope: SCOPE_EXTERNAL,
            pad: [0; 2],
        }
    }
}

impl ServiceKey for Service4Key {
    fn with_scope(&self, scope: u8) -> Self {
        Self { scope, ..*self }
    }
}

impl ServiceKey for Service6Key {
    fn with_scope(&self, scope: u8) -> Self {
        Self { scope, ..*self }
    }
}

impl ServiceValue {
    /// A master entry with `count` backend slots from `base` of the slots array.
    #[must_use]
    pub const fn master(count: u16, rev_nat_id: FrontendId, flags: u32, base: u32) -> Self {
        Self {
            backend_id: 0,
            rev_nat_id,
            flags,
            count,
            pad: 0,
            base,
        }
    }

    /// A master entry of a frontend with session affinity held for `timeout_s` seconds.
    #[must_use]
    pub const fn affinity_master(
        count: u16,
        rev_nat_id: FrontendId,
        flags: u32,
        base: u32,
        timeout_s: u32,
    ) -> Self {
        Self {
            backend_id: timeout_s,
            ..Self::master(count, rev_nat_id, flags, base)
        }
    }

    /// The slots-array index of slot `slot` (`1..=count`).
    #[must_use]
    pub const fn slot_index(&self, slot: u16) -> u32 {
        self.base.wrapping_add(slot as u32).wrapping_sub(1)
    }

    /// The slot (`1..=count`, `count` at least 1) a 32-bit `seed` draws ([`scale_draw`]).
    #[must_use]
    pub const fn slot_for(&self, seed: u32) -> u16 {
        scale_draw(seed, self.count as u32) as u16 + 1
    }
}

/// A 32-bit `seed` scaled to `[0, n)`: its place in `[0, 2^32)` times `n`, by a multiply
/// and a shift (Lemire's range reduction), as uniform as a modulo for a uniform seed and a
/// multiply instead of a division on the datapath. It reads the seed's high bits, which a
/// multiplicative hash mixes best.
#[must_use]
pub const fn scale_draw(seed: u32, n: u32) -> u32 {
    ((seed as u64 * n as u64) >> 32) as u32
}

/// One step of the datapath's backend draw: Vigna's xorshift64* generator, from a non-zero
/// `state` to the next state (never zero) and a 32-bit output (the product's high half,
/// its best-mixed bits). Cheap enough to run in the program itself on a per-CPU state,
/// where `bpf_get_prandom_u32` is a helper call per connection.
#[must_use]
pub const fn draw_step(mut state: u64) -> (u64, u32) {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    (
        state,
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32,
    )
}

impl SlotValue {
    /// A slot naming `backend_id` only (an IPv6 slot).
    #[must_use]
    pub const fn by_id(backend_id: u32) -> Self {
        Self {
            backend_id,
            peer_mark: 0,
            backend: Backend4 {
                address: 0,
                port: 0,
                proto: 0,
                flags: 0,
            },
        }
    }

    /// An IPv4 slot naming `backend_id`, `backend`, with the backend inline.
    #[must_use]
    pub const fn inline4(backend_id: u32, backend: Backend4) -> Self {
        Self {
            backend_id,
            peer_mark: 0,
            backend,
        }
    }

    /// The backend an IPv4 slot holds inline, if it holds one.
    #[must_use]
    pub const fn inline_backend4(&self) -> Option<Backend4> {
        if self.backend.proto == 0 {
            None
        } else {
            Some(self.backend)
        }
    }

    /// Whether the datapath marked this slot: its backend's peer claim names the frontend
    /// `rev_nat_id` (see the type's documentation).
    #[must_use]
    pub const fn peer_marked_for(&self, rev_nat_id: FrontendId) -> bool {
        rev_nat_id != 0 && self.peer_mark == rev_nat_id
    }
}

/// The IPv4 address of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), words in network
/// order as `bpf_sock_addr.user_ip6` holds them.
#[must_use]
pub const fn v4_mapped(address: &[u32; 4]) -> Option<u32> {
    if address[0] == 0 && address[1] == 0 && address[2] == u32::from_be(0x0000_ffff) {
        Some(address[3])
    } else {
        None
    }
}

/// The IPv4-mapped IPv6 form of an IPv4 address (network order).
#[must_use]
pub const fn to_v4_mapped(address: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), address]
}

// The layout is an ABI between the two sides (and with maps a previous agent pinned): a
// change here must be deliberate.
const _: () = assert!(core::mem::size_of::<Service4Key>() == 12);
const _: () = assert!(core::mem::size_of::<Service6Key>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 20);
const _: () = assert!(core::mem::size_of::<SlotValue>() == 16);
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);
const _: () = assert!(core::mem::size_of::<RevNat4Key>() == 16);
const _: () = assert!(core::mem::size_of::<RevNat4Value>() == 12);
const _: () = assert!(core::mem::size_of::<RevNat6Key>() == 32);
const _: () = assert!(core::mem::size_of::<RevNat6Value>() == 24);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 20);
const _: () = assert!(core::mem::size_of::<PeerValue>() == 24);
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);
const _: () = assert!(core::mem::size_of::<CtValue>() == 64);
const _: () = assert!(core::mem::size_of::<Clock>() == 16);
const _: () = assert!(core::mem::size_of::<ClockSample>() == 16);
const _: () = assert!(core::mem::size_of::<NodeAddr>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityMatchKey>() == 8);
const _: () = assert!(core::mem::size_of::<SourceRange>() == 20);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Service4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Service6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat4Value {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::PeerValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat6Value {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Clock {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityMatchKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceRange {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_round_trip() {
        let ip = u32::from_be_bytes([10, 96, 0, 10]).to_be();
        assert_eq!(v4_mapped(&to_v4_mapped(ip)), Some(ip));
        assert_eq!(v4_mapped(&[0, 0, 0, ip]), None);
    }

    #[test]
    fn an_ipv4_slot_gives_back_the_backend_it_holds_inline() {
        let backend = Backend4 {
            address: u32::from_be_bytes([10, 244, 1, 7]).to_be(),
            port: 8080u16.to_be(),
            proto: PROTO_UDP,
            flags: BE_F_TERMINATING | BE_F_REMOTE,
        };
        let slot = SlotValue::inline4(42, backend);
        assert_eq!(slot.backend_id, 42);
        assert_eq!(slot.inline_backend4(), Some(backend));
        // A slot by id only (IPv6) holds none, and no slot starts marked.
        assert_eq!(SlotValue::by_id(42).inline_backend4(), None);
        assert!(!slot.peer_marked_for(7));
        assert!(!slot.peer_marked_for(0));
        let marked = SlotValue {
            peer_mark: 7,
            ..slot
        };
        assert!(marked.peer_marked_for(7));
        assert!(!marked.peer_marked_for(8));
    }

    #[test]
    fn a_master_names_its_slots_from_its_base() {
        let master = ServiceValue::master(3, 1, SVC_F_CLUSTER_IP, 100);
        assert_eq!(master.slot_index(1), 100);
        assert_eq!(master.slot_index(3), 102);
    }

    #[test]
    fn snat_ports_are_the_range_the_datapath_draws_from() {
        let last = SNAT_PORT_MIN + scale_draw(u32::MAX, u32::from(SNAT_PORT_COUNT)) as u16;
        assert_eq!(last, 60_999);
        assert!(is_snat_port(SNAT_PORT_MIN) && is_snat_port(last));
        assert!(!is_snat_port(SNAT_PORT_MIN - 1) && !is_snat_port(last + 1));
        // NodePorts (30000-32767 by default) are never taken for SNAT replies.
        assert!(!is_snat_port(30_080) && !is_snat_port(32_767));
    }

    #[test]
    fn affinity_lasts_its_timeout_and_a_stamp_ahead_of_the_clock_is_recent() {
        let entry = AffinityValue {
            backend_id: 7,
            pad: 0,
            last_used_ns: 50_000_000_000,
        };
        assert!(!entry.expired(60_000_000_000, 10));
        assert!(entry.expired(60_000_000_001, 10));
        // The clock stepped back a tick (4 ms) after the entry was written.
        assert!(!entry.expired(49_996_000_000, 10));
    }

    #[test]
    fn a_draw_lands_on_every_slot_alike_and_never_outside() {
        let master = ServiceValue::master(10, 7, 0, 100);
        assert_eq!(master.slot_for(0), 1);
        assert_eq!(master.slot_for(u32::MAX), 10);
        // Seeds spread evenly over the 32-bit range: each slot gets a tenth of them, to
        // the one seed that rounding moves.
        let mut hits = [0u32; 11];
        for i in 0..100_000u64 {
            let seed = (i * (1u64 << 32) / 100_000) as u32;
            hits[usize::from(master.slot_for(seed))] += 1;
        }
        assert_eq!(hits[0], 0);
        assert!(
            hits[1..].iter().all(|n| n.abs_diff(10_000) <= 1),
            "{hits:?}"
        );
        // One slot: always slot 1.
        let single = ServiceValue::master(1, 7, 0, 100);
        assert_eq!(single.slot_for(u32::MAX), 1);
    }

    #[test]
    fn the_draw_spreads_connections_evenly_over_the_slots() {
        let master = ServiceValue::master(10, 7, 0, 100);
        let mut hits = [0u32; 11];
        let mut state = 0x1234_5678_u64 | 1 << 32;
        for _ in 0..100_000 {
            let (next, drawn) = draw_step(state);
            assert_ne!(next, 0, "the state never falls to zero");
            state = next;
            hits[usize::from(master.slot_for(drawn))] += 1;
        }
        assert_eq!(hits[0], 0);
        // 10,000 each expected; a standard deviation is about 95.
        assert!(
            hits[1..].iter().all(|n| n.abs_diff(10_000) < 500),
            "{hits:?}"
        );
        // Consecutive draws are not correlated slot to slot (no fixed cycle over slots).
        let mut same = 0;
        let (mut state, mut last) = (state, 0);
        for _ in 0..10_000 {
            let (next, drawn) = draw_step(state);
            state = next;
            let slot = master.slot_for(drawn);
            same += u32::from(slot == last);
            last = slot;
        }
        assert!(
            same.abs_diff(1_000) < 150,
            "{same} repeats of the previous slot"
        );
    }
}
