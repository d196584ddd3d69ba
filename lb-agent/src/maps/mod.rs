//! The datapath's maps as the control plane sees them: one small interface, a writer that
//! turns the desired state into ordered map operations, an in-memory fake for tests, and
//! the real BPF maps.
pub mod bpf;
pub mod dump;
pub mod fake;
pub mod writer;

use lb_common::{Backend4, Service4Key, Service4Value};

/// A map operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} in {map}: {source}")]
pub struct MapError {
    pub op: &'static str,
    pub map: &'static str,
    #[source]
    pub source: std::io::Error,
}

pub type Result<T, E = MapError> = std::result::Result<T, E>;

/// The load-balancing maps. Implemented by the pinned BPF maps and by [`fake::FakeMaps`].
pub trait LbMaps {
    /// Creates or overwrites a services map entry.
    fn set_service(&mut self, key: Service4Key, value: Service4Value) -> Result<()>;
    /// Deletes a services map entry (absent is not an error).
    fn delete_service(&mut self, key: Service4Key) -> Result<()>;
    /// Creates or overwrites a backend.
    fn set_backend(&mut self, id: u32, backend: Backend4) -> Result<()>;
    /// Deletes a backend (absent is not an error).
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    /// Every services map entry.
    fn services(&self) -> Result<Vec<(Service4Key, Service4Value)>>;
    /// Every backend.
    fn backends(&self) -> Result<Vec<(u32, Backend4)>>;
}

use std::net::Ipv4Addr;

use crate::model::{L4Addr, Protocol};

/// The services map key of `slot` of a frontend.
#[must_use]
pub fn service_key(frontend: &L4Addr, slot: u16) -> Service4Key {
    Service4Key::new(
        u32::from(frontend.address).to_be(),
        frontend.port.to_be(),
        frontend.protocol.number(),
        slot,
    )
}

/// The frontend a services map key belongs to (`None` for a protocol we never write).
#[must_use]
pub fn frontend_of(key: &Service4Key) -> Option<L4Addr> {
    Some(L4Addr::new(
        Ipv4Addr::from(u32::from_be(key.address)),
        u16::from_be(key.dport),
        Protocol::from_number(key.proto)?,
    ))
}

/// The backends map value of a backend.
#[must_use]
pub fn backend_value(backend: &L4Addr) -> Backend4 {
    Backend4 {
        address: u32::from(backend.address).to_be(),
        port: backend.port.to_be(),
        proto: backend.protocol.number(),
        flags: 0,
    }
}

/// The backend a backends map value describes.
#[must_use]
pub fn backend_of(value: &Backend4) -> Option<L4Addr> {
    Some(L4Addr::new(
        Ipv4Addr::from(u32::from_be(value.address)),
        u16::from_be(value.port),
        Protocol::from_number(value.proto)?,
    ))
}
