//! The two address families behind one interface, so the socket translation is written
//! once: each family has its own key and backend types and its own maps.
use lb_common::{
    Backend4, Backend6, FrontendId, HAIRPIN4, HAIRPIN6, RevNat4Key, RevNat4Value, RevNat6Key,
    RevNat6Value, Service4Key, Service6Key, ServiceKey, to_v4_mapped,
};

use crate::{
    maps::{
        LB4_BACKENDS, LB4_DEVICES, LB4_NODE_ADDRS, LB4_REVNAT, LB4_SERVICES, LB6_BACKENDS,
        LB6_DEVICES, LB6_NODE_ADDRS, LB6_REVNAT, LB6_SERVICES,
    },
    xlate::{Backends, Services, SlotBackend},
};

/// An address family's types and maps.
pub trait Family {
    /// An address as `bpf_sock_addr` holds it (network order).
    type Addr: Copy + PartialEq;
    type SvcKey: ServiceKey + 'static;
    type Backend: SlotBackend + 'static;

    fn services() -> &'static Services<Self::SvcKey>;
    fn backends() -> &'static Backends<Self::Backend>;
    /// The master key (external scope) of the frontend `addr:port/proto` itself.
    fn key(addr: Self::Addr, port: u16, proto: u8) -> Self::SvcKey;
    /// The master key of the NodePort frontend `port/proto`.
    fn node_port_key(port: u16, proto: u8) -> Self::SvcKey;
    /// Whether `addr` is one of this node's addresses (on the `--devices`).
    fn is_node_addr(addr: Self::Addr) -> bool;
    /// The address of the device `ifindex` (of the `--devices`), in the wire form.
    fn device_addr(ifindex: u32) -> Option<[u32; 4]>;
    /// An address in the four-word form packets and conntrack use (IPv4-mapped for IPv4).
    fn wire(addr: Self::Addr) -> [u32; 4];
    /// The family's address of a four-word one (inverse of [`Family::wire`]).
    fn from_wire(addr: &[u32; 4]) -> Self::Addr;
    /// A backend's address and port.
    fn backend_addr(backend: &Self::Backend) -> (Self::Addr, u16);
    /// A backend's `BE_F_*` flags.
    fn backend_flags(backend: &Self::Backend) -> u8;
    /// The hairpin SNAT source ([`lb_common::HAIRPIN4`], [`lb_common::HAIRPIN6`]) in the
    /// wire form.
    fn hairpin() -> [u32; 4];
    /// Records that socket `cookie`, talking to `backend`, dialled `frontend`.
    fn remember(
        cookie: u64,
        backend: (Self::Addr, u16),
        frontend: (Self::Addr, u16),
        rev_nat_id: FrontendId,
    );
    /// What socket `cookie` dialled to reach `backend`: (frontend address, port, frontend id).
    fn recall(cookie: u64, backend: (Self::Addr, u16)) -> Option<(Self::Addr, u16, FrontendId)>;

    /// The frontend a connection to `addr:port/proto` is for, and its master entry
    /// (external scope): the address's own frontend, else, on a node address, its NodePort
    /// (a pod dialling nodeIP:nodePort). A ClusterIP, the common case, costs one lookup.
    #[inline(always)]
    fn find_frontend(
        addr: Self::Addr,
        port: u16,
        proto: u8,
    ) -> Option<(Self::SvcKey, lb_common::ServiceValue)> {
        let own = Self::key(addr, port, proto);
        // SAFETY: copied out at once.
        if let Some(master) = unsafe { Self::services().get(own) }.copied() {
            return Some((own, master));
        }
        if !Self::is_node_addr(addr) {
            return None;
        }
        let node_port = Self::node_port_key(port, proto);
        // SAFETY: as above.
        unsafe { Self::services().get(node_port) }
            .copied()
            .map(|master| (node_port, master))
    }
}

/// IPv4.
pub struct V4;
/// IPv6.
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    type SvcKey = Service4Key;
    type Backend = Backend4;

    #[inline(always)]
    fn services() -> &'static Services<Service4Key> {
        &LB4_SERVICES
    }

    #[inline(always)]
    fn backends() -> &'static Backends<Backend4> {
        &LB4_BACKENDS
    }

    #[inline(always)]
    fn key(addr: u32, port: u16, proto: u8) -> Service4Key {
        Service4Key::new(addr, port, proto)
    }

    #[inline(always)]
    fn node_port_key(port: u16, proto: u8) -> Service4Key {
        Service4Key::node_port(port, proto)
    }

    #[inline(always)]
    fn is_node_addr(addr: u32) -> bool {
        // SAFETY: presence only.
        unsafe { LB4_NODE_ADDRS.get(addr) }.is_some()
    }

    #[inline(always)]
    fn device_addr(ifindex: u32) -> Option<[u32; 4]> {
        // SAFETY: copied out at once.
        unsafe { LB4_DEVICES.get(ifindex) }.map(|a| to_v4_mapped(*a))
    }

    #[inline(always)]
    fn wire(addr: u32) -> [u32; 4] {
        to_v4_mapped(addr)
    }

    #[inline(always)]
    fn from_wire(addr: &[u32; 4]) -> u32 {
        addr[3]
    }

    #[inline(always)]
    fn backend_addr(backend: &Backend4) -> (u32, u16) {
        (backend.address, backend.port)
    }

    #[inline(always)]
    fn backend_flags(backend: &Backend4) -> u8 {
        backend.flags
    }

    #[inline(always)]
    fn hairpin() -> [u32; 4] {
        to_v4_mapped(u32::from_ne_bytes(HAIRPIN4))
    }

    #[inline(always)]
    fn remember(cookie: u64, backend: (u32, u16), frontend: (u32, u16), rev_nat_id: FrontendId) {
        let key = RevNat4Key {
            cookie,
            address: backend.0,
            port: backend.1,
            pad: [0; 2],
        };
        let value = RevNat4Value {
            address: frontend.0,
            port: frontend.1,
            pad: 0,
            rev_nat_id,
        };
        // A failed insert only costs the reverse view (getpeername/recvmsg): go on.
        let _ = LB4_REVNAT.insert(key, value, 0);
    }

    #[inline(always)]
    fn recall(cookie: u64, backend: (u32, u16)) -> Option<(u32, u16, FrontendId)> {
        let key = RevNat4Key {
            cookie,
            address: backend.0,
            port: backend.1,
            pad: [0; 2],
        };
        // SAFETY: copied out at once.
        let v = unsafe { LB4_REVNAT.get(key) }.copied()?;
        Some((v.address, v.port, v.rev_nat_id))
    }
}

impl Family for V6 {
    type Addr = [u32; 4];
    type SvcKey = Service6Key;
    type Backend = Backend6;

    #[inline(always)]
    fn services() -> &'static Services<Service6Key> {
        &LB6_SERVICES
    }

    #[inline(always)]
    fn backends() -> &'static Backends<Backend6> {
        &LB6_BACKENDS
    }

    #[inline(always)]
    fn key(addr: [u32; 4], port: u16, proto: u8) -> Service6Key {
        Service6Key::new(addr, port, proto)
    }

    #[inline(always)]
    fn node_port_key(port: u16, proto: u8) -> Service6Key {
        Service6Key::node_port(port, proto)
    }

    #[inline(always)]
    fn is_node_addr(addr: [u32; 4]) -> bool {
        // SAFETY: presence only.
        unsafe { LB6_NODE_ADDRS.get(addr) }.is_some()
    }

    #[inline(always)]
    fn device_addr(ifindex: u32) -> Option<[u32; 4]> {
        // SAFETY: copied out at once.
        unsafe { LB6_DEVICES.get(ifindex) }.copied()
    }

    #[inline(always)]
    fn wire(addr: [u32; 4]) -> [u32; 4] {
        addr
    }

    #[inline(always)]
    fn from_wire(addr: &[u32; 4]) -> [u32; 4] {
        *addr
    }

    #[inline(always)]
    fn backend_addr(backend: &Backend6) -> ([u32; 4], u16) {
        (backend.address, backend.port)
    }

    #[inline(always)]
    fn backend_flags(backend: &Backend6) -> u8 {
        backend.flags
    }

    #[inline(always)]
    fn hairpin() -> [u32; 4] {
        let b = HAIRPIN6;
        [
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        ]
    }

    #[inline(always)]
    fn remember(
        cookie: u64,
        backend: ([u32; 4], u16),
        frontend: ([u32; 4], u16),
        rev_nat_id: FrontendId,
    ) {
        let key = RevNat6Key {
            cookie,
            address: backend.0,
            port: backend.1,
            pad: [0; 6],
        };
        let value = RevNat6Value {
            address: frontend.0,
            port: frontend.1,
            pad: 0,
            rev_nat_id,
        };
        let _ = LB6_REVNAT.insert(key, value, 0);
    }

    #[inline(always)]
    fn recall(cookie: u64, backend: ([u32; 4], u16)) -> Option<([u32; 4], u16, FrontendId)> {
        let key = RevNat6Key {
            cookie,
            address: backend.0,
            port: backend.1,
            pad: [0; 6],
        };
        // SAFETY: copied out at once.
        let v = unsafe { LB6_REVNAT.get(key) }.copied()?;
        Some((v.address, v.port, v.rev_nat_id))
    }
}
