//! The desired state the datapath should implement, independent of where it came from
//! (manifests or the API server) and of how the maps encode it.
use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use triomphe::ThinArc;

mod backend_list;
pub use backend_list::BackendList;

/// A transport protocol the load balancer programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
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
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Lookup scope of a frontend (as Cilium's `L3n4Addr.Scope`).
    pub scope: Scope,
}

/// Which clients a frontend entry is for: [`Scope::External`] for every backend and
/// frontend except the in-cluster entry of a frontend with two (an
/// `externalTrafficPolicy: Local` Service's NodePort, external or LoadBalancer IP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every client (or, for a frontend with two entries, clients outside the cluster).
    #[default]
    External,
    /// Clients inside the cluster, of a frontend with two entries.
    Internal,
}

impl L4Addr {
    #[must_use]
    pub fn new(address: impl Into<IpAddr>, port: u16, protocol: Protocol) -> Self {
        Self {
            address: address.into(),
            port,
            protocol,
            scope: Scope::External,
        }
    }

    /// The same frontend's in-cluster entry.
    #[must_use]
    pub const fn internal(self) -> Self {
        Self {
            scope: Scope::Internal,
            ..self
        }
    }

    /// Whether this is the in-cluster entry of a frontend with two scopes.
    #[must_use]
    pub const fn is_internal(&self) -> bool {
        matches!(self.scope, Scope::Internal)
    }
}

impl serde::Serialize for L4Addr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("L4Addr", 5)?;
        s.serialize_field("address", &self.address.to_string())?;
        s.serialize_field("port", &self.port)?;
        s.serialize_field("protocol", &self.protocol)?;
        s.serialize_field(
            "family",
            if self.address.is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            },
        )?;
        if self.is_internal() {
            s.serialize_field("scope", "internal")?;
        } else {
            s.skip_field("scope")?;
        }
        s.end()
    }
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol)?,
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol)?,
        }
        if self.is_internal() {
            f.write_str(" (in-cluster)")?;
        }
        Ok(())
    }
}

/// `namespace/name` of a Kubernetes object: one shared allocation holding both strings
/// behind an 8-byte pointer (the model holds each Service's reference in a dozen indexes,
/// and a clone costs no allocation). Equality, order and hash are those of the
/// (namespace, name) pair.
#[derive(Clone)]
pub struct ObjectRef(ThinArc<u32, u8>);

impl ObjectRef {
    /// The namespace (empty for a cluster-scoped object).
    #[must_use]
    pub fn namespace(&self) -> &str {
        self.parts().0
    }

    #[must_use]
    pub fn name(&self) -> &str {
        self.parts().1
    }

    /// (namespace, name).
    fn parts(&self) -> (&str, &str) {
        let split = self.0.header.header as usize;
        let (namespace, name) = self.0.slice.split_at(split);
        // SAFETY: the bytes are the namespace's then the name's, copied from two `&str` in
        // `new`, and `split` is the namespace's length: each part is valid UTF-8.
        unsafe {
            (
                std::str::from_utf8_unchecked(namespace),
                std::str::from_utf8_unchecked(name),
            )
        }
    }
}

impl PartialEq for ObjectRef {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(&*self.0, &*other.0) || self.parts() == other.parts()
    }
}

impl Eq for ObjectRef {}

impl PartialOrd for ObjectRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ObjectRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

/// As the pair of strings (namespace, name): a borrowed pair with the same fields in the
/// same order finds it in a map ([`crate::dns::index`]).
impl std::hash::Hash for ObjectRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (namespace, name) = self.parts();
        namespace.hash(state);
        name.hash(state);
    }
}

impl fmt::Debug for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectRef")
            .field("namespace", &self.namespace())
            .field("name", &self.name())
            .finish()
    }
}

impl serde::Serialize for ObjectRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("ObjectRef", 2)?;
        s.serialize_field("namespace", self.namespace())?;
        s.serialize_field("name", self.name())?;
        s.end()
    }
}

/// Serializes a shared string as the string (serde's `rc` feature would rebuild every
/// crate that uses serde for this one).
fn shared_opt_str<S: serde::Serializer>(
    text: &Option<Arc<str>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match text {
        Some(text) => serializer.serialize_some(&**text),
        None => serializer.serialize_none(),
    }
}

impl ObjectRef {
    /// The reference of an object (namespace `default` when unset, as the API server does).
    #[must_use]
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
            meta.name.as_deref().unwrap_or_default(),
        )
    }

    /// `namespace/name`.
    ///
    /// # Panics
    /// When the namespace is longer than 4 GiB.
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        let split = u32::try_from(namespace.len()).expect("a namespace shorter than 4 GiB");
        let bytes = Counted {
            bytes: namespace.bytes().chain(name.bytes()),
            left: namespace.len() + name.len(),
        };
        Self(ThinArc::from_header_and_iter(split, bytes))
    }
}

/// The bytes of both strings, with their count (as the allocation needs it up front).
struct Counted<I> {
    bytes: I,
    left: usize,
}

impl<I: Iterator<Item = u8>> Iterator for Counted<I> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let byte = self.bytes.next()?;
        self.left -= 1;
        Some(byte)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<I: Iterator<Item = u8>> ExactSizeIterator for Counted<I> {}

/// The namespace of an object that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The shared copy of `text`: for the few strings that recur in many objects (namespaces,
/// node names, zones), so that each is held once however many objects name it.
#[must_use]
pub fn intern(text: &str) -> Arc<str> {
    static STRINGS: std::sync::Mutex<Interned> = std::sync::Mutex::new(Interned {
        set: None,
        purge_at: 1024,
    });
    let mut strings = STRINGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    strings.get(text)
}

/// The set behind [`intern`]: strings nothing else holds any more are dropped whenever it
/// has doubled.
struct Interned {
    set: Option<std::collections::HashSet<Arc<str>>>,
    purge_at: usize,
}

impl Interned {
    fn get(&mut self, text: &str) -> Arc<str> {
        let set = self.set.get_or_insert_default();
        if let Some(shared) = set.get(text) {
            return Arc::clone(shared);
        }
        if set.len() >= self.purge_at {
            set.retain(|s| Arc::strong_count(s) > 1);
            self.purge_at = (2 * set.len()).max(1024);
        }
        let shared: Arc<str> = Arc::from(text);
        set.insert(Arc::clone(&shared));
        shared
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace(), self.name())
    }
}

/// Which Service field a frontend comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)`.
    ClusterIp,
    /// `spec.externalIPs`.
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
    /// `spec.ports[].nodePort` of a NodePort or LoadBalancer Service, on every node address
    /// (the frontend's address is the unspecified address of its family).
    NodePort,
}

/// The state of an endpoint that receives new connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum EndpointState {
    /// Ready: takes new connections.
    #[default]
    Ready,
    /// Serving but terminating: takes new connections only because no endpoint of the
    /// Service is ready (kube-proxy's terminating-endpoint fallback).
    Terminating,
}

/// A backend as the datapath knows it: where to send, and in which state it was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: L4Addr,
    pub state: EndpointState,
    /// The endpoint runs on another node (its `nodeName` is known and not this node's):
    /// traffic from outside the node is SNATed to reach it (`externalTrafficPolicy: Cluster`).
    pub remote: bool,
}

impl Backend {
    /// A backend on this node (or of unknown node).
    #[must_use]
    pub const fn new(addr: L4Addr, state: EndpointState) -> Self {
        Self {
            addr,
            state,
            remote: false,
        }
    }

    /// Its state and whether it is remote as two bits ([`Self::TERMINATING`],
    /// [`Self::REMOTE`]): how the compact forms hold them (`model::BackendList`, the
    /// writer's backend table).
    #[must_use]
    pub const fn condition_bits(&self) -> u8 {
        let terminating = match self.state {
            EndpointState::Ready => 0,
            EndpointState::Terminating => Self::TERMINATING,
        };
        terminating | if self.remote { Self::REMOTE } else { 0 }
    }

    /// The backend at `addr` whose state and place `bits` give ([`Self::condition_bits`];
    /// other bits are ignored).
    #[must_use]
    pub const fn with_condition_bits(addr: L4Addr, bits: u8) -> Self {
        Self {
            addr,
            state: if bits & Self::TERMINATING == 0 {
                EndpointState::Ready
            } else {
                EndpointState::Terminating
            },
            remote: bits & Self::REMOTE != 0,
        }
    }

    /// [`Self::condition_bits`] of a terminating backend.
    pub const TERMINATING: u8 = 1 << 0;
    /// [`Self::condition_bits`] of a remote backend.
    pub const REMOTE: u8 = 1 << 1;
}

impl serde::Serialize for Backend {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Backend", 6)?;
        s.serialize_field("address", &self.addr.address.to_string())?;
        s.serialize_field("port", &self.addr.port)?;
        s.serialize_field("protocol", &self.addr.protocol)?;
        s.serialize_field(
            "family",
            if self.addr.address.is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            },
        )?;
        s.serialize_field("state", &self.state)?;
        s.serialize_field("remote", &self.remote)?;
        s.end()
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            EndpointState::Ready => write!(f, "{}", self.addr)?,
            EndpointState::Terminating => write!(f, "{} (terminating)", self.addr)?,
        }
        if self.remote {
            f.write_str(" (remote)")?;
        }
        Ok(())
    }
}

/// Where an endpoint came from and where it runs: kept for inspection and for the
/// node-local traffic policies.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EndpointInfo {
    /// The EndpointSlice, or the Pod the endpoint was derived from (shown as `pod/<name>`).
    pub source: EndpointSource,
    /// `nodeName` of the endpoint (or the Pod's `spec.nodeName`), interned.
    #[serde(serialize_with = "shared_opt_str")]
    pub node_name: Option<Arc<str>>,
    /// `zone` of the endpoint, interned.
    #[serde(serialize_with = "shared_opt_str")]
    pub zone: Option<Arc<str>>,
}

/// Where an endpoint came from: its EndpointSlice (the slice's own reference, shared), or
/// the Pod it was derived from (manifests without slices). Shown as the slice's name, or
/// `pod/<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointSource {
    Slice(ObjectRef),
    Pod(ObjectRef),
}

impl Default for EndpointSource {
    fn default() -> Self {
        Self::Slice(ObjectRef::new("", ""))
    }
}

impl fmt::Display for EndpointSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Slice(id) => f.write_str(id.name()),
            Self::Pod(id) => write!(f, "pod/{}", id.name()),
        }
    }
}

impl serde::Serialize for EndpointSource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One Service port on one virtual address, and the backends that serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// The virtual address clients dial.
    pub address: L4Addr,
    pub kind: FrontendKind,
    /// `externalTrafficPolicy: Local` applies: only node-local backends, no SNAT.
    pub local_only: bool,
    /// No backend because a Local traffic policy leaves none on this node while the
    /// Service has endpoints elsewhere: kube-proxy drops such traffic instead of rejecting
    /// it as it does for a Service without endpoints.
    pub no_local_endpoints: bool,
    /// `sessionAffinity: ClientIP`: how long, in seconds, a client keeps its backend after
    /// its last new connection.
    pub affinity_timeout: Option<std::num::NonZeroU32>,
    /// `loadBalancerSourceRanges` (LoadBalancer IPs only): new flows from other sources
    /// are dropped. Empty: every source.
    pub source_ranges: Box<[ipnet::IpNet]>,
    /// The Service it belongs to.
    pub service: ObjectRef,
    /// `spec.ports[].name` (empty for a single unnamed port).
    pub port_name: Arc<str>,
    /// Backends that take new connections, sorted and without duplicates, all of the
    /// frontend's address family and protocol.
    pub backends: BackendList,
    /// What is known of each backend, in the same order (shared with the validated
    /// EndpointSlice it came from).
    pub backend_info: Box<[Arc<EndpointInfo>]>,
}

/// A Service's `healthCheckNodePort` (LoadBalancer, `externalTrafficPolicy: Local`): load
/// balancers ask it whether this node has endpoints of the Service.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HealthCheck {
    pub port: u16,
    pub service: ObjectRef,
    /// Ready (or, failing those, serving terminating) endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// Every frontend the node should serve, by virtual address. Frontends are shared (the
/// model, the API's view and each Service's translation hold the same one).
pub type DesiredState = BTreeMap<L4Addr, Arc<Frontend>>;

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher as _;

    use super::*;

    /// One allocation holds both strings; they come back as given, and the reference
    /// orders, compares and hashes as the (namespace, name) pair, whatever the bytes
    /// joined would say ("a-b" sorts after "a" though '-' sorts before '/').
    #[test]
    fn an_object_ref_is_its_namespace_and_name_pair() {
        let id = ObjectRef::new("kube-system", "coredns");
        assert_eq!((id.namespace(), id.name()), ("kube-system", "coredns"));
        assert_eq!(id.to_string(), "kube-system/coredns");
        assert_eq!(ObjectRef::new("", "node-1").namespace(), "");
        let (a, ab) = (ObjectRef::new("a", "x"), ObjectRef::new("a-b", "x"));
        assert!(a < ab);
        assert_eq!(a, ObjectRef::new("a", "x"));
        assert_ne!(ObjectRef::new("ab", "c"), ObjectRef::new("a", "bc"));
        let hasher = foldhash::fast::FixedState::default();
        assert_eq!(
            hasher.hash_one(&ab),
            hasher.hash_one(("a-b", "x")),
            "a borrowed pair must find it in a map"
        );
    }
}
