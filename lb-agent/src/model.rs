//! The desired state the datapath should implement, independent of where it came from
//! (manifests or the API server) and of how the maps encode it.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

/// A transport protocol the load balancer programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number, as the maps store it.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::PROTO_TCP,
            Self::Udp => lb_common::PROTO_UDP,
        }
    }

    /// The protocol of an IANA number, if the load balancer handles it.
    #[must_use]
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            lb_common::PROTO_TCP => Some(Self::Tcp),
            lb_common::PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// An address, port and protocol: a Service frontend or a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl L4Addr {
    #[must_use]
    pub const fn new(address: Ipv4Addr, port: u16, protocol: Protocol) -> Self {
        Self {
            address,
            port,
            protocol,
        }
    }
}

impl serde::Serialize for L4Addr {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("L4Addr", 3)?;
        s.serialize_field("address", &self.address.to_string())?;
        s.serialize_field("port", &self.port)?;
        s.serialize_field("protocol", &self.protocol)?;
        s.end()
    }
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

/// `namespace/name` of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One Service port on one virtual address, and the backends that serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// The virtual address clients dial.
    pub address: L4Addr,
    /// The Service it belongs to.
    pub service: ObjectRef,
    /// `spec.ports[].name` (empty for a single unnamed port).
    pub port_name: String,
    /// Backends that take new connections, sorted and without duplicates.
    pub backends: Vec<L4Addr>,
}

/// Every frontend the node should serve, by virtual address.
pub type DesiredState = BTreeMap<L4Addr, Frontend>;
