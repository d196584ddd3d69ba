//! The datapath's maps as the control plane sees them: one small interface over decoded
//! entries (the per-family encoding stays inside the implementations), a writer that turns
//! the desired state into ordered map operations, an in-memory fake for tests, and the
//! real BPF maps.
pub mod bpf;
pub mod dump;
pub mod fake;
pub mod writer;

use lb_common::{FrontendId, ServiceValue, SlotValue};

use crate::model::{Backend, L4Addr};

/// A map operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} in {map}: {source}")]
pub struct MapError {
    pub op: &'static str,
    pub map: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl MapError {
    /// Whether the kernel refused the write for want of room (`E2BIG` from a full hash
    /// map, `ENOSPC`, `ENOMEM`): a problem of the entries being added, not of the map.
    #[must_use]
    pub fn is_capacity(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
        )
    }
}

pub type Result<T, E = MapError> = std::result::Result<T, E>;

/// One entry of a services map: a frontend's master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub frontend: L4Addr,
    pub value: ServiceValue,
}

/// One map operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A frontend's master entry (in its family's services map).
    SetMaster(L4Addr, ServiceValue),
    DeleteMaster(L4Addr),
    /// An entry of the slots array, by index: only ever one no master names.
    SetSlot(u32, SlotValue),
    SetBackend(u32, Backend),
    DeleteBackend(u32, Backend),
    /// (backend id, frontend `rev_nat_id`): the backend may keep affinity clients.
    SetAffinityMatch(u32, FrontendId),
    DeleteAffinityMatch(u32, FrontendId),
    /// (frontend `rev_nat_id`, range): a `loadBalancerSourceRanges` entry.
    SetSourceRange(FrontendId, ipnet::IpNet),
    DeleteSourceRange(FrontendId, ipnet::IpNet),
    /// (backend, frontend `rev_nat_id`): the backend left the frontend; its claim in the
    /// peers map goes if it names that frontend (the datapath writes claims, see
    /// `lb_common::PeerKey`).
    ForgetPeer(Backend, FrontendId),
}

/// The load-balancing maps of both families. Implemented by the pinned BPF maps and by
/// [`fake::FakeMaps`].
pub trait LbMaps {
    /// Performs `ops`, which may run in any order or as batches: the writer only puts
    /// operations together that do not depend on each other.
    fn apply_ops(&mut self, ops: &[Op]) -> Result<()> {
        for op in ops {
            match op {
                Op::SetMaster(frontend, value) => self.set_master(frontend, *value)?,
                Op::DeleteMaster(frontend) => self.delete_master(frontend)?,
                Op::SetSlot(index, value) => self.set_slot(*index, *value)?,
                Op::SetBackend(id, backend) => self.set_backend(*id, backend)?,
                Op::DeleteBackend(id, backend) => self.delete_backend(*id, backend)?,
                Op::SetAffinityMatch(id, rev_nat_id) => {
                    self.set_affinity_match(*id, *rev_nat_id)?;
                }
                Op::DeleteAffinityMatch(id, rev_nat_id) => {
                    self.delete_affinity_match(*id, *rev_nat_id)?;
                }
                Op::SetSourceRange(id, range) => self.set_source_range(*id, *range)?,
                Op::DeleteSourceRange(id, range) => self.delete_source_range(*id, *range)?,
                Op::ForgetPeer(backend, rev_nat_id) => self.forget_peer(backend, *rev_nat_id)?,
            }
        }
        Ok(())
    }

    /// Creates or overwrites a frontend's master entry (in its family's services map).
    fn set_master(&mut self, frontend: &L4Addr, value: ServiceValue) -> Result<()>;
    /// Deletes a frontend's master entry (absent is not an error).
    fn delete_master(&mut self, frontend: &L4Addr) -> Result<()>;
    /// Writes entry `index` of the slots array (past its end: `E2BIG`, a full map).
    fn set_slot(&mut self, index: u32, value: SlotValue) -> Result<()>;
    /// Creates or overwrites a backend (in its family's map).
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    /// Deletes the backend `id` of `backend`'s family (absent is not an error).
    fn delete_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    /// Every master entry of both families.
    fn services(&self) -> Result<Vec<ServiceEntry>>;
    /// The slots of the ranges `(base, count)`, one after the other; a slot past the
    /// array's end reads as zeros (backend id 0, which no backend has).
    fn slots(&self, ranges: &[(u32, u16)]) -> Result<Vec<SlotValue>>;
    /// Every backend of both families.
    fn backends(&self) -> Result<Vec<(u32, Backend)>>;
    /// Records that backend `id` serves the affinity frontend `rev_nat_id`.
    fn set_affinity_match(&mut self, id: u32, rev_nat_id: FrontendId) -> Result<()>;
    /// Deletes an affinity-match entry (absent is not an error).
    fn delete_affinity_match(&mut self, id: u32, rev_nat_id: FrontendId) -> Result<()>;
    /// Every affinity-match entry: (backend id, frontend `rev_nat_id`).
    fn affinity_matches(&self) -> Result<Vec<(u32, FrontendId)>>;
    /// Forgets the clients' affinity entries of the frontends `rev_nat_ids` (removed, or
    /// affinity turned off), so a frontend that later gets the id, or turns affinity on
    /// again, starts afresh.
    fn forget_affinity(
        &mut self,
        rev_nat_ids: &std::collections::BTreeSet<FrontendId>,
    ) -> Result<()>;
    /// Allows `range` as a source of the frontend `rev_nat_id`.
    fn set_source_range(&mut self, rev_nat_id: FrontendId, range: ipnet::IpNet) -> Result<()>;
    /// Deletes a source-range entry (absent is not an error).
    fn delete_source_range(&mut self, rev_nat_id: FrontendId, range: ipnet::IpNet) -> Result<()>;
    /// Every source-range entry: (frontend `rev_nat_id`, range).
    fn source_ranges(&self) -> Result<Vec<(FrontendId, ipnet::IpNet)>>;
    /// Deletes `backend`'s claim in the peers map if the frontend `rev_nat_id` holds it
    /// (absent, or another frontend's, is not an error).
    fn forget_peer(&mut self, backend: &Backend, rev_nat_id: FrontendId) -> Result<()>;
    /// How many entries the map `name` holds at most, when known (for reports).
    fn capacity(&self, name: &str) -> Option<usize> {
        lb_common::PINNED_MAPS
            .iter()
            .find(|spec| spec.name == name)
            .map(|spec| spec.max_entries)
    }
}

/// How the maps encode the model: addresses in network-order words, protocol numbers,
/// scope bytes and flags. The model itself knows none of this.
pub mod codec {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use lb_common::{Backend4, Backend6, Service4Key, Service6Key, ServiceKey as _, SlotValue};

    use crate::model::{Backend, EndpointState, Frontend, FrontendKind, L4Addr, Protocol, Scope};

    /// IANA protocol number, as the maps store it.
    #[must_use]
    pub const fn protocol_number(protocol: Protocol) -> u8 {
        match protocol {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    /// The protocol of an IANA number, if the load balancer handles it.
    #[must_use]
    pub const fn protocol(number: u8) -> Option<Protocol> {
        match number {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// The `SCOPE_*` byte of a scope.
    #[must_use]
    pub const fn scope_byte(scope: Scope) -> u8 {
        match scope {
            Scope::External => lb_common::SCOPE_EXTERNAL,
            Scope::Internal => lb_common::SCOPE_INTERNAL,
        }
    }

    /// The scope a `SCOPE_*` byte names (`None` for one never written).
    #[must_use]
    pub const fn scope(byte: u8) -> Option<Scope> {
        match byte {
            lb_common::SCOPE_EXTERNAL => Some(Scope::External),
            lb_common::SCOPE_INTERNAL => Some(Scope::Internal),
            _ => None,
        }
    }

    /// The `SVC_F_*` flag of a frontend kind.
    #[must_use]
    pub const fn kind_flag(kind: FrontendKind) -> u32 {
        match kind {
            FrontendKind::ClusterIp => lb_common::SVC_F_CLUSTER_IP,
            FrontendKind::ExternalIp => lb_common::SVC_F_EXTERNAL_IP,
            FrontendKind::LoadBalancer => lb_common::SVC_F_LOADBALANCER,
            FrontendKind::NodePort => lb_common::SVC_F_NODEPORT,
        }
    }

    /// The kind a flags word names (the lowest kind flag set).
    #[must_use]
    pub const fn kind(flags: u32) -> Option<FrontendKind> {
        if flags & lb_common::SVC_F_CLUSTER_IP != 0 {
            Some(FrontendKind::ClusterIp)
        } else if flags & lb_common::SVC_F_EXTERNAL_IP != 0 {
            Some(FrontendKind::ExternalIp)
        } else if flags & lb_common::SVC_F_LOADBALANCER != 0 {
            Some(FrontendKind::LoadBalancer)
        } else if flags & lb_common::SVC_F_NODEPORT != 0 {
            Some(FrontendKind::NodePort)
        } else {
            None
        }
    }

    /// The `SVC_F_*` flags of a frontend's master entry. A node-local frontend (the
    /// external scope) always has an in-cluster twin with every endpoint.
    #[must_use]
    pub fn frontend_flags(frontend: &Frontend) -> u32 {
        let flag = |on: bool, flag: u32| if on { flag } else { 0 };
        kind_flag(frontend.kind)
            | flag(
                frontend.local_only,
                lb_common::SVC_F_LOCAL | lb_common::SVC_F_TWO_SCOPES,
            )
            | flag(frontend.no_local_endpoints, lb_common::SVC_F_NO_LOCAL)
            | flag(
                frontend.affinity_timeout.is_some(),
                lb_common::SVC_F_AFFINITY,
            )
            | flag(
                !frontend.source_ranges.is_empty(),
                lb_common::SVC_F_SOURCE_RANGES,
            )
    }

    /// The `BE_F_*` flags of a backend.
    #[must_use]
    pub const fn backend_flags(backend: &Backend) -> u8 {
        let terminating = match backend.state {
            EndpointState::Ready => 0,
            EndpointState::Terminating => lb_common::BE_F_TERMINATING,
        };
        let remote = if backend.remote {
            lb_common::BE_F_REMOTE
        } else {
            0
        };
        terminating | remote
    }

    /// The backend state `BE_F_*` flags name.
    #[must_use]
    pub const fn endpoint_state(flags: u8) -> EndpointState {
        if flags & lb_common::BE_F_TERMINATING != 0 {
            EndpointState::Terminating
        } else {
            EndpointState::Ready
        }
    }

    /// An IPv4 address as the maps hold it.
    #[must_use]
    pub fn ip4(ip: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(ip.octets())
    }

    /// An IPv6 address as the maps hold it.
    #[must_use]
    pub fn ip6(ip: Ipv6Addr) -> [u32; 4] {
        let o = ip.octets();
        std::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }

    #[must_use]
    pub fn from_ip4(word: u32) -> Ipv4Addr {
        Ipv4Addr::from(word.to_ne_bytes())
    }

    #[must_use]
    pub fn from_ip6(words: [u32; 4]) -> Ipv6Addr {
        let mut octets = [0; 16];
        for (i, w) in words.iter().enumerate() {
            octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(octets)
    }

    /// The master key of an IPv4 frontend (`None` for an IPv6 one).
    #[must_use]
    pub fn service4_key(frontend: &L4Addr) -> Option<Service4Key> {
        match frontend.address {
            IpAddr::V4(ip) => Some(
                Service4Key::new(
                    ip4(ip),
                    frontend.port.to_be(),
                    protocol_number(frontend.protocol),
                )
                .with_scope(scope_byte(frontend.scope)),
            ),
            IpAddr::V6(_) => None,
        }
    }

    /// The master key of an IPv6 frontend (`None` for an IPv4 one).
    #[must_use]
    pub fn service6_key(frontend: &L4Addr) -> Option<Service6Key> {
        match frontend.address {
            IpAddr::V6(ip) => Some(
                Service6Key::new(
                    ip6(ip),
                    frontend.port.to_be(),
                    protocol_number(frontend.protocol),
                )
                .with_scope(scope_byte(frontend.scope)),
            ),
            IpAddr::V4(_) => None,
        }
    }

    /// The frontend of an IPv4 master key (`None` for a protocol or slot never written).
    #[must_use]
    pub fn from_service4_key(key: &Service4Key) -> Option<L4Addr> {
        let protocol = protocol(key.proto)?;
        let frontend = L4Addr::new(from_ip4(key.address), u16::from_be(key.dport), protocol);
        (key.backend_slot == lb_common::MASTER_SLOT).then_some(())?;
        Some(L4Addr {
            scope: scope(key.scope)?,
            ..frontend
        })
    }

    /// The frontend of an IPv6 master key.
    #[must_use]
    pub fn from_service6_key(key: &Service6Key) -> Option<L4Addr> {
        let protocol = protocol(key.proto)?;
        let frontend = L4Addr::new(from_ip6(key.address), u16::from_be(key.dport), protocol);
        (key.backend_slot == lb_common::MASTER_SLOT).then_some(())?;
        Some(L4Addr {
            scope: scope(key.scope)?,
            ..frontend
        })
    }

    /// The peers-map key of a backend (its address in the four-word form).
    #[must_use]
    pub fn peer_key(backend: &Backend) -> lb_common::PeerKey {
        lb_common::PeerKey {
            address: match backend.addr.address {
                IpAddr::V4(ip) => lb_common::to_v4_mapped(ip4(ip)),
                IpAddr::V6(ip) => ip6(ip),
            },
            port: backend.addr.port.to_be(),
            proto: protocol_number(backend.addr.protocol),
            pad: 0,
        }
    }

    /// The backend slot naming backend `id`, `backend`: an IPv4 one holds it inline.
    #[must_use]
    pub fn slot(id: u32, backend: &Backend) -> SlotValue {
        backend4(backend).map_or(SlotValue::by_id(id), |b| SlotValue::inline4(id, b))
    }

    #[must_use]
    pub fn backend4(backend: &Backend) -> Option<Backend4> {
        match backend.addr.address {
            IpAddr::V4(ip) => Some(Backend4 {
                address: ip4(ip),
                port: backend.addr.port.to_be(),
                proto: protocol_number(backend.addr.protocol),
                flags: backend_flags(backend),
            }),
            IpAddr::V6(_) => None,
        }
    }

    #[must_use]
    pub fn backend6(backend: &Backend) -> Option<Backend6> {
        match backend.addr.address {
            IpAddr::V6(ip) => Some(Backend6 {
                address: ip6(ip),
                port: backend.addr.port.to_be(),
                proto: protocol_number(backend.addr.protocol),
                flags: backend_flags(backend),
            }),
            IpAddr::V4(_) => None,
        }
    }

    #[must_use]
    pub fn from_backend4(value: &Backend4) -> Option<Backend> {
        Some(Backend {
            addr: L4Addr::new(
                from_ip4(value.address),
                u16::from_be(value.port),
                protocol(value.proto)?,
            ),
            state: endpoint_state(value.flags),
            remote: value.flags & lb_common::BE_F_REMOTE != 0,
        })
    }

    #[must_use]
    pub fn from_backend6(value: &Backend6) -> Option<Backend> {
        Some(Backend {
            addr: L4Addr::new(
                from_ip6(value.address),
                u16::from_be(value.port),
                protocol(value.proto)?,
            ),
            state: endpoint_state(value.flags),
            remote: value.flags & lb_common::BE_F_REMOTE != 0,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn addresses_are_stored_in_network_order() {
            let ip: Ipv4Addr = "10.96.0.10".parse().unwrap();
            assert_eq!(ip4(ip).to_ne_bytes(), [10, 96, 0, 10]);
            assert_eq!(from_ip4(ip4(ip)), ip);
            let v6: Ipv6Addr = "fd00::1:2".parse().unwrap();
            assert_eq!(from_ip6(ip6(v6)), v6);
            let mapped: Ipv6Addr = "::ffff:10.96.0.10".parse().unwrap();
            assert_eq!(lb_common::v4_mapped(&ip6(mapped)), Some(ip4(ip)));
            assert_eq!(lb_common::to_v4_mapped(ip4(ip)), ip6(mapped));
        }
    }
}
