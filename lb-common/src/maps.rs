//! Service load-balancing maps, modelled on Cilium's `lb4_key`/`lb4_service`/`lb4_backend`.
//!
//! A Service frontend (virtual address, port, protocol) occupies `count + 1` entries of the
//! services map: slot 0 is the *master* entry holding the backend count, slots `1..=count`
//! each hold one backend id. The backends map resolves an id to an address and port.
//!
//! Write order (the agent's job, see `lb-agent/src/maps/writer.rs`): backends first, then the
//! backend slots, then the master with the new count, and only then are surplus slots and
//! unused backends deleted. A connect that reads the master at any moment therefore finds
//! every slot `1..=count` filled with a live backend, and a Service whose backends change
//! never looks empty in between.

/// Name of the IPv4 services map (pinned under `--bpf-pin-path` with this name).
pub const SERVICES4_MAP: &str = "LB4_SERVICES";
/// Name of the IPv4 backends map.
pub const BACKENDS4_MAP: &str = "LB4_BACKENDS";
/// Every map the agent pins, in the order `cleanup` removes them.
pub const PINNED_MAPS: [&str; 2] = [SERVICES4_MAP, BACKENDS4_MAP];

/// Capacity of the services map in entries (one per frontend plus one per backend slot):
/// 10k Services with 10 endpoints each, with room to spare.
pub const SERVICES4_MAX_ENTRIES: usize = 262_144;
/// Capacity of the backends map (distinct backend address/port/protocol triples).
pub const BACKENDS4_MAX_ENTRIES: usize = 262_144;

/// The slot number of a frontend's master entry.
pub const MASTER_SLOT: u16 = 0;

/// IANA protocol numbers as the socket hooks see them in `bpf_sock_addr.protocol`.
pub const PROTO_TCP: u8 = 6;
/// UDP, see [`PROTO_TCP`].
pub const PROTO_UDP: u8 = 17;

/// Frontend scope: the frontend applies to every client (the only scope so far; the
/// node-local scope of traffic policies will take another value).
pub const SCOPE_EXTERNAL: u8 = 0;

/// Key of the services map.
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

/// Value of the services map. The master entry (slot 0) uses `count`, `rev_nat_id` and
/// `flags`; a backend slot uses `backend_id` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4Value {
    /// Backend slot: id of the backend in the backends map. Master: 0.
    pub backend_id: u32,
    /// Master: number of backend slots. 0 means the Service has no endpoints and a connect
    /// to it is refused. Backend slot: 0.
    pub count: u16,
    /// Master: id of this frontend for reverse translation, unique per frontend.
    pub rev_nat_id: u16,
    /// Master: `SVC_F_*` flags. Backend slot: 0.
    pub flags: u32,
}

/// The frontend is a ClusterIP (the only kind the socket path programs so far).
pub const SVC_F_CLUSTER_IP: u32 = 1 << 0;

/// Value of the backends map, keyed by a `u32` backend id (never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend4 {
    /// Backend (pod) IPv4 address, network byte order.
    pub address: u32,
    /// Backend port (the Service's resolved `targetPort`), network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BE_F_*` flags (none yet), always zero.
    pub flags: u8,
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

    /// The master entry's key of the same frontend.
    #[must_use]
    pub const fn master(&self) -> Self {
        Self::new(self.address, self.dport, self.proto, MASTER_SLOT)
    }

    /// Whether this is a master entry.
    #[must_use]
    pub const fn is_master(&self) -> bool {
        self.backend_slot == MASTER_SLOT
    }
}

impl Service4Value {
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

// The layout is an ABI between the two sides: a change here must be deliberate.
const _: () = assert!(core::mem::size_of::<Service4Key>() == 12);
const _: () = assert!(core::mem::align_of::<Service4Key>() == 4);
const _: () = assert!(core::mem::size_of::<Service4Value>() == 12);
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Service4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Service4Value {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend4 {}
}
