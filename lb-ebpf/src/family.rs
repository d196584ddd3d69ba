//! The two address families behind one interface, so the socket translation is written
//! once: each family has its own key and backend types and its own maps.
use lb_common::{
    Backend4, Backend6, RevNat4Key, RevNat4Value, RevNat6Key, RevNat6Value, Service4Key,
    Service6Key, ServiceKey,
};

use crate::{
    maps::{
        LB4_BACKENDS, LB4_NODE_ADDRS, LB4_REVNAT, LB4_SERVICES, LB6_BACKENDS, LB6_REVNAT,
        LB6_SERVICES,
    },
    xlate::{Backends, Services},
};

/// An address family's types and maps.
pub trait Family {
    /// An address as `bpf_sock_addr` holds it (network order).
    type Addr: Copy;
    type SvcKey: ServiceKey + 'static;
    type Backend: Copy + 'static;

    fn services() -> &'static Services<Self::SvcKey>;
    fn backends() -> &'static Backends<Self::Backend>;
    /// The master key of the frontend `addr:port/proto`.
    fn frontend(addr: Self::Addr, port: u16, proto: u8) -> Self::SvcKey;
    /// A backend's address and port.
    fn backend_addr(backend: &Self::Backend) -> (Self::Addr, u16);
    /// Records that socket `cookie`, talking to `backend`, dialled `frontend`.
    fn remember(
        cookie: u64,
        backend: (Self::Addr, u16),
        frontend: (Self::Addr, u16),
        rev_nat_id: u16,
    );
    /// What socket `cookie` dialled to reach `backend`: (frontend address, port, frontend id).
    fn recall(cookie: u64, backend: (Self::Addr, u16)) -> Option<(Self::Addr, u16, u16)>;
    /// Forgets the record of socket `cookie` talking to `backend`.
    fn forget(cookie: u64, backend: (Self::Addr, u16));
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
    fn frontend(addr: u32, port: u16, proto: u8) -> Service4Key {
        // A node address: its NodePorts (a pod dialling nodeIP:nodePort), unless the address
        // is a frontend of its own on that port.
        // SAFETY: presence only.
        if unsafe { LB4_NODE_ADDRS.get(addr) }.is_some() {
            let own = Service4Key::new(addr, port, proto, 0);
            // SAFETY: presence only.
            if unsafe { LB4_SERVICES.get(own) }.is_none() {
                return Service4Key::node_port(port, proto);
            }
            return own;
        }
        Service4Key::new(addr, port, proto, 0)
    }

    #[inline(always)]
    fn backend_addr(backend: &Backend4) -> (u32, u16) {
        (backend.address, backend.port)
    }

    #[inline(always)]
    fn remember(cookie: u64, backend: (u32, u16), frontend: (u32, u16), rev_nat_id: u16) {
        let key = RevNat4Key {
            cookie,
            address: backend.0,
            port: backend.1,
            pad: [0; 2],
        };
        let value = RevNat4Value {
            address: frontend.0,
            port: frontend.1,
            rev_nat_id,
        };
        // A failed insert only costs the reverse view (getpeername/recvmsg): go on.
        let _ = LB4_REVNAT.insert(key, value, 0);
    }

    #[inline(always)]
    fn recall(cookie: u64, backend: (u32, u16)) -> Option<(u32, u16, u16)> {
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

    #[inline(always)]
    fn forget(cookie: u64, backend: (u32, u16)) {
        let key = RevNat4Key {
            cookie,
            address: backend.0,
            port: backend.1,
            pad: [0; 2],
        };
        let _ = LB4_REVNAT.remove(key);
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
    fn frontend(addr: [u32; 4], port: u16, proto: u8) -> Service6Key {
        Service6Key::new(addr, port, proto, 0)
    }

    #[inline(always)]
    fn backend_addr(backend: &Backend6) -> ([u32; 4], u16) {
        (backend.address, backend.port)
    }

    #[inline(always)]
    fn remember(cookie: u64, backend: ([u32; 4], u16), frontend: ([u32; 4], u16), rev_nat_id: u16) {
        let key = RevNat6Key {
            cookie,
            address: backend.0,
            port: backend.1,
            pad: [0; 6],
        };
        let value = RevNat6Value {
            address: frontend.0,
            port: frontend.1,
            rev_nat_id,
        };
        let _ = LB6_REVNAT.insert(key, value, 0);
    }

    #[inline(always)]
    fn recall(cookie: u64, backend: ([u32; 4], u16)) -> Option<([u32; 4], u16, u16)> {
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

    #[inline(always)]
    fn forget(cookie: u64, backend: ([u32; 4], u16)) {
        let key = RevNat6Key {
            cookie,
            address: backend.0,
            port: backend.1,
            pad: [0; 6],
        };
        let _ = LB6_REVNAT.remove(key);
    }
}
