//! Service load-balancing maps, modelled on Cilium's `lb4_key`/`lb4_service`/`lb4_backend`.
//!
//! A Service frontend (virtual address, port, protocol) occupies `count + 1` entries of the
//! services map of its family: slot 0 is the *master* entry holding the backend count,
//! slots `1..=count` each hold one backend id. The backends map of the family resolves an id
//! to an address and port. Backend ids are one space across both families.
//!
//! Write order (the agent's job, see `lb-agent/src/maps/writer.rs`): backends first, then the
//! backend slots, then the master with the new count, and only then are surplus slots and
//! unused backends deleted. A connect that reads the master at any moment therefore finds
//! every slot `1..=count` filled with a live backend, and a Service whose backends change
//! never looks empty in between.
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
/// Every map the agent pins.
pub const PINNED_MAPS: [&str; 6] = [
    SERVICES4_MAP,
    BACKENDS4_MAP,
    REVNAT4_MAP,
    SERVICES6_MAP,
    BACKENDS6_MAP,
    REVNAT6_MAP,
];

/// Capacity of each services map in entries (one per frontend plus one per backend slot):
/// 10k Services with 10 endpoints each and both families, with room to spare.
pub const SERVICES_MAX_ENTRIES: usize = 262_144;
/// Capacity of each backends map (distinct backend address/port/protocol/state).
pub const BACKENDS_MAX_ENTRIES: usize = 262_144;
/// Capacity of each reverse-NAT map (translated sockets); least recently used entries are
/// evicted first, so it cannot grow without bound. LRU maps are preallocated: this is
/// their memory (about 9 MiB for IPv4, 7 MiB for IPv6).
pub const REVNAT4_MAX_ENTRIES: usize = 131_072;
/// Capacity of the IPv6 reverse-NAT map.
pub const REVNAT6_MAX_ENTRIES: usize = 65_536;

/// `BPF_F_NO_PREALLOC`: the services and backends maps allocate entries as the agent
/// writes them, so their memory follows the cluster's size instead of their capacity
/// (preallocated, the four would take about 80 MiB). Only the agent writes them, so the
/// datapath never pays for an allocation.
pub const MAP_F_NO_PREALLOC: usize = 1;

/// The slot number of a frontend's master entry.
pub const MASTER_SLOT: u16 = 0;

/// IANA protocol numbers as the socket hooks see them in `bpf_sock_addr.protocol`.
pub const PROTO_TCP: u8 = 6;
/// UDP, see [`PROTO_TCP`].
pub const PROTO_UDP: u8 = 17;

/// Frontend scope: the frontend applies to every client (the only scope so far; the
/// node-local scope of traffic policies will take another value).
pub const SCOPE_EXTERNAL: u8 = 0;

/// The frontend is a ClusterIP (`spec.clusterIP(s)`).
pub const SVC_F_CLUSTER_IP: u32 = 1 << 0;
/// The frontend is an external IP (`spec.externalIPs`).
pub const SVC_F_EXTERNAL_IP: u32 = 1 << 1;
/// The frontend is a LoadBalancer ingress IP (`status.loadBalancer.ingress[].ip`).
pub const SVC_F_LOADBALANCER: u32 = 1 << 2;

/// The backend is terminating: it gets new connections only because its Service has no
/// ready endpoint left (kube-proxy's fallback to serving, terminating endpoints).
pub const BE_F_TERMINATING: u8 = 1 << 0;

/// Key of the IPv4 services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4Key {
    /// Frontend IPv4 address, network byte order (as `bpf_sock_addr.user_ip4`).
    pub address: u32,
    /// Frontend port, network byte order.
    pub dport: u16,
    /// 0 for the master entry, `1..=count` for backend slots.
    pub backend_slot: u16,
    /// IP protocol number ([`PROTO_TCP`], [`PROTO_UDP`]).
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`].
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
    /// 0 for the master entry, `1..=count` for backend slots.
    pub backend_slot: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`].
    pub scope: u8,
    /// Explicit padding, always zero.
    pub pad: [u8; 2],
}

/// Value of both services maps. The master entry (slot 0) uses `count`, `rev_nat_id` and
/// `flags`; a backend slot uses `backend_id` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceValue {
    /// Backend slot: id of the backend in the backends map. Master: 0.
    pub backend_id: u32,
    /// Master: number of backend slots. 0 means the Service has no endpoints and a connect
    /// to it is refused. Backend slot: 0.
    pub count: u16,
    /// Master: id of this frontend, unique per frontend; reverse-NAT entries carry it so a
    /// stale entry (of a frontend since deleted) is never used. Backend slot: 0.
    pub rev_nat_id: u16,
    /// Master: `SVC_F_*` flags. Backend slot: 0.
    pub flags: u32,
}

/// Value of the IPv4 backends map, keyed by a `u32` backend id (never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// Value of the IPv6 backends map, keyed by a `u32` backend id (never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// The frontend's `rev_nat_id` when the entry was made.
    pub rev_nat_id: u16,
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
    /// The frontend's `rev_nat_id` when the entry was made.
    pub rev_nat_id: u16,
}

/// What both services-map key types offer the datapath and the agent.
pub trait ServiceKey: Copy {
    /// The same frontend's entry for `slot`.
    #[must_use]
    fn with_slot(&self, slot: u16) -> Self;
    /// Whether this is a master entry.
    fn is_master(&self) -> bool;
}

impl Service4Key {
    /// The key of `slot` of the frontend `address:dport/proto` (both in network order).
    #[must_use]
    pub const fn new(address: u32, dport: u16, proto: u8, backend_slot: u16) -> Self {
        Self {
            address,
            dport,
            backend_slot,
            proto,
            scope: SCOPE_EXTERNAL,
            pad: [0; 2],
        }
    }
}

impl Service6Key {
    /// The key of `slot` of the frontend `address:dport/proto` (both in network order).
    #[must_use]
    pub const fn new(address: [u32; 4], dport: u16, proto: u8, backend_slot: u16) -> Self {
        Self {
            address,
            dport,
            backend_slot,
            proto,
            scope: SCOPE_EXTERNAL,
            pad: [0; 2],
        }
    }
}

impl ServiceKey for Service4Key {
    fn with_slot(&self, slot: u16) -> Self {
        Self {
            backend_slot: slot,
            ..*self
        }
    }

    fn is_master(&self) -> bool {
        self.backend_slot == MASTER_SLOT
    }
}

impl ServiceKey for Service6Key {
    fn with_slot(&self, slot: u16) -> Self {
        Self {
            backend_slot: slot,
            ..*self
        }
    }

    fn is_master(&self) -> bool {
        self.backend_slot == MASTER_SLOT
    }
}

impl ServiceValue {
    /// A master entry with `count` backend slots.
    #[must_use]
    pub const fn master(count: u16, rev_nat_id: u16, flags: u32) -> Self {
        Self {
            backend_id: 0,
            count,
            rev_nat_id,
            flags,
        }
    }

    /// A backend slot pointing at `backend_id`.
    #[must_use]
    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            rev_nat_id: 0,
            flags: 0,
        }
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
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);
const _: () = assert!(core::mem::size_of::<RevNat4Key>() == 16);
const _: () = assert!(core::mem::size_of::<RevNat4Value>() == 8);
const _: () = assert!(core::mem::size_of::<RevNat6Key>() == 32);
const _: () = assert!(core::mem::size_of::<RevNat6Value>() == 20);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Service4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Service6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat4Value {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat6Value {}
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
}
