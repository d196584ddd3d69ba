//! Who may take a virtual address: the rules that keep one Service from hijacking another's
//! traffic, or the node's (the CVE-2020-8554 class: `spec.externalIPs` and LoadBalancer
//! ingress IPs are written by whoever may edit a Service, and without these rules one of
//! them equal to another Service's ClusterIP would capture that Service's clients).
//!
//! - An external or LoadBalancer IP equal to a ClusterIP of another Service is refused on
//!   every port: ClusterIPs are allocated by the API server and always win.
//! - An external IP outside `--external-ip-cidrs` is refused.
//! - An external or LoadBalancer IP that is no unicast address a Service can take
//!   (unspecified, loopback, link-local, multicast) is refused: the API server's validation
//!   rejects them, and the manifests source has none. `0.0.0.0` in particular is how the
//!   maps spell a NodePort, on every node address.
//! - An external or LoadBalancer IP that is one of this node's NodePort addresses is taken
//!   (kube-proxy serves it), except on a port where another Service's NodePort answers:
//!   the NodePort wins.
//! - When two Services still want the same address, port and protocol, a ClusterIP beats
//!   an external or LoadBalancer IP, and between equals the first by namespace/name wins.
//!
//! Pure: [`crate::state::ClusterState`] keeps the indexes and calls these.
use std::{collections::BTreeSet, fmt, net::IpAddr, str::FromStr};

use crate::{
    fast_hash::HashMap,
    model::{Frontend, FrontendKind, L4Addr, ObjectRef},
    small_set::SmallSet,
};

/// An IP network, `address/prefix`, as the flags take them (host bits are cleared, as
/// kube-proxy's sloppy parse does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the network (never for an address of the other family).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask32(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask128(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }

    /// Whether this is `0.0.0.0/0` or `::/0`.
    #[must_use]
    pub const fn is_everything(&self) -> bool {
        self.prefix == 0
    }
}

fn mask32(bits: u32, prefix: u8) -> u32 {
    bits & !u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0)
}

fn mask128(bits: u128, prefix: u8) -> u128 {
    bits & !u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("{text:?} is not a CIDR (address/prefix)");
        let (address, prefix) = text.trim().split_once('/').ok_or_else(invalid)?;
        let address: IpAddr = address.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        let network = match address {
            IpAddr::V4(ip) if prefix <= 32 => IpAddr::V4(mask32(u32::from(ip), prefix).into()),
            IpAddr::V6(ip) if prefix <= 128 => IpAddr::V6(mask128(u128::from(ip), prefix).into()),
            _ => return Err(invalid()),
        };
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// One element of `--nodeport-addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    /// `primary`: the node's primary addresses (see [`NodePortAddresses::Primary`]).
    Primary,
    Cidr(Cidr),
}

impl FromStr for NodePortAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim() == "primary" {
            Ok(Self::Primary)
        } else {
            text.parse().map(Self::Cidr)
        }
    }
}

/// The node addresses NodePorts answer on (`--nodeport-addresses`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// kube-proxy's `primary` is the Node object's primary IP of each family; the agent's
    /// equivalent is the addresses of the `--devices`, the interfaces the node is reached
    /// through from outside (detected from the default routes when not given).
    #[default]
    Primary,
    /// Every address of the node (any interface, loopback excepted) inside one of these.
    Cidrs(Vec<Cidr>),
}

impl NodePortAddresses {
    /// The flag's elements as one value: `primary` alone, or CIDRs.
    ///
    /// # Errors
    /// When `primary` is given with CIDRs (kube-proxy refuses that too).
    pub fn from_elements(elements: &[NodePortAddress]) -> Result<Self, String> {
        let mut cidrs = Vec::new();
        for element in elements {
            match element {
                NodePortAddress::Primary if elements.len() == 1 => return Ok(Self::Primary),
                NodePortAddress::Primary => {
                    return Err("`primary` cannot be combined with CIDRs".to_string());
                }
                NodePortAddress::Cidr(cidr) => cidrs.push(*cidr),
            }
        }
        Ok(if cidrs.is_empty() {
            Self::Primary
        } else {
            Self::Cidrs(cidrs)
        })
    }

    /// Whether `ip`, an address of the node (of an external device when `on_device`),
    /// answers NodePorts. As kube-proxy, a family without a CIDR of its own matches all of
    /// that family.
    #[must_use]
    pub fn admits(&self, ip: IpAddr, on_device: bool) -> bool {
        match self {
            Self::Primary => on_device,
            Self::Cidrs(cidrs) => {
                let of_family: Vec<&Cidr> = cidrs
                    .iter()
                    .filter(|c| c.network.is_ipv4() == ip.is_ipv4())
                    .collect();
                !ip.is_loopback()
                    && (of_family.is_empty() || of_family.iter().any(|c| c.contains(ip)))
            }
        }
    }
}

/// `--external-ip-cidrs`: which `spec.externalIPs` are honoured (none given: all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalIpCidrs(pub Vec<Cidr>);

impl ExternalIpCidrs {
    /// Whether the external IP `ip` may be taken.
    #[must_use]
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|c| c.contains(ip))
    }
}

impl fmt::Display for ExternalIpCidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&list.join(","))
    }
}

/// What the rules look at besides the frontend itself.
pub struct Context<'a> {
    /// Every ClusterIP, with the Services holding it.
    pub cluster_ips: &'a HashMap<IpAddr, SmallSet<ObjectRef>>,
    pub external_ip_cidrs: &'a ExternalIpCidrs,
    /// This node's NodePort addresses (as written to the node-address maps).
    pub node_addresses: &'a BTreeSet<IpAddr>,
    /// The Service owning the NodePort frontend (unspecified address) `key`, if any.
    pub node_port_owner: &'a dyn Fn(&L4Addr) -> Option<ObjectRef>,
}

/// Why `frontend` may not take its address whoever else wants it, or `None` when it may.
#[must_use]
pub fn refusal(frontend: &Frontend, context: &Context<'_>) -> Option<String> {
    let ip = frontend.address.address;
    let service = &frontend.service;
    match frontend.kind {
        FrontendKind::ClusterIp | FrontendKind::NodePort => return None,
        FrontendKind::ExternalIp | FrontendKind::LoadBalancer => {}
    }
    if !is_takeable(ip) {
        return Some(format!(
            "{ip} is not a unicast address a Service can take; not taken"
        ));
    }
    if let Some(other) = context
        .cluster_ips
        .get(&ip)
        .and_then(|holders| holders.iter().find(|h| *h != service))
    {
        return Some(format!(
            "{ip} is the ClusterIP of Service {other}; not taken"
        ));
    }
    if frontend.kind == FrontendKind::ExternalIp && !context.external_ip_cidrs.admits(ip) {
        return Some(format!(
            "{ip} is outside --external-ip-cidrs ({}); not taken",
            context.external_ip_cidrs
        ));
    }
    if context.node_addresses.contains(&ip) {
        let node_port = L4Addr::new(
            unspecified(ip),
            frontend.address.port,
            frontend.address.protocol,
        );
        if let Some(owner) = (context.node_port_owner)(&node_port).filter(|o| o != service) {
            return Some(format!(
                "{ip} is a node address, where nodePort {}/{} of Service {owner} answers; not taken",
                node_port.port, node_port.protocol
            ));
        }
    }
    None
}

/// The order in which contenders for one address win: ClusterIPs first, then by name.
#[must_use]
pub fn rank(frontend: &Frontend) -> (u8, &ObjectRef) {
    let kind = match frontend.kind {
        FrontendKind::ClusterIp => 0,
        FrontendKind::NodePort => 1,
        FrontendKind::ExternalIp | FrontendKind::LoadBalancer => 2,
    };
    (kind, &frontend.service)
}

/// A unicast address a Service may take as an external or LoadBalancer IP (what the API
/// server's `ValidateNonSpecialIP` admits).
fn is_takeable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_loopback() || v4.is_link_local() || v4.is_multicast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_unicast_link_local()
                || v6.is_multicast())
        }
    }
}

/// The unspecified address of `ip`'s family: how the maps key a NodePort.
#[must_use]
pub const fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_clear_host_bits_and_match_their_family_only() {
        let cases = [
            ("10.96.0.0/12", "10.96.0.10", true),
            ("10.96.0.0/12", "10.112.0.1", false),
            ("10.96.0.7/12", "10.100.1.1", true),
            ("192.168.50.10/32", "192.168.50.10", true),
            ("192.168.50.10/32", "192.168.50.11", false),
            ("0.0.0.0/0", "203.0.113.1", true),
            ("0.0.0.0/0", "fd00::1", false),
            ("fd00::/64", "fd00::1", true),
            ("fd00::/64", "fd00:0:0:1::1", false),
            ("::/0", "2001:db8::1", true),
            ("::/0", "10.0.0.1", false),
        ];
        for (network, address, inside) in cases {
            assert_eq!(
                cidr(network).contains(ip(address)),
                inside,
                "{network} contains {address}"
            );
        }
        assert_eq!(cidr("10.96.0.7/12").to_string(), "10.96.0.0/12");
        for bad in [
            "10.96.0.0",
            "10.96.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn nodeport_addresses_primary_alone_or_cidrs_per_family() {
        let parse = |list: &[&str]| {
            let elements: Vec<NodePortAddress> = list.iter().map(|e| e.parse().unwrap()).collect();
            NodePortAddresses::from_elements(&elements)
        };
        assert_eq!(parse(&["primary"]), Ok(NodePortAddresses::Primary));
        assert!(parse(&["primary", "10.0.0.0/8"]).is_err());
        let primary = NodePortAddresses::Primary;
        assert!(primary.admits(ip("192.168.50.1"), true));
        assert!(!primary.admits(ip("10.244.0.1"), false));
        let only_v4 = parse(&["192.168.50.0/24"]).unwrap();
        let cases = [
            ("192.168.50.1", true),
            ("192.168.51.1", false),
            // No IPv6 CIDR given: every IPv6 address of the node (as kube-proxy).
            ("fd00::1", true),
            ("127.0.0.1", false),
        ];
        for (address, admitted) in cases {
            assert_eq!(only_v4.admits(ip(address), false), admitted, "{address}");
        }
        let with_loopback = parse(&["127.0.0.0/8"]).unwrap();
        assert!(!with_loopback.admits(ip("127.0.0.1"), false));
    }

    fn frontend(service: &str, kind: FrontendKind, address: &str, port: u16) -> Frontend {
        Frontend {
            address: L4Addr::new(ip(address), port, Protocol::Tcp),
            kind,
            local_only: false,
            no_local_endpoints: false,
            affinity_timeout: None,
            source_ranges: Box::default(),
            service: ObjectRef::new("ns", service),
            port_name: "".into(),
            backends: crate::model::BackendList::default(),
            backend_info: Box::default(),
        }
    }

    #[test]
    fn refusal_table() {
        let mut cluster_ips = HashMap::default();
        let mut dns = SmallSet::default();
        dns.insert(ObjectRef::new("ns", "dns"));
        cluster_ips.insert(ip("10.96.0.10"), dns);
        let node_addresses = BTreeSet::from([ip("192.168.50.1")]);
        let node_port_owner =
            |key: &L4Addr| (key.port == 30080).then(|| ObjectRef::new("ns", "np"));
        let allowed = ExternalIpCidrs(vec![cidr("192.168.0.0/16"), cidr("10.96.0.0/12")]);
        let context = Context {
            cluster_ips: &cluster_ips,
            external_ip_cidrs: &allowed,
            node_addresses: &node_addresses,
            node_port_owner: &node_port_owner,
        };
        use FrontendKind::{ClusterIp, ExternalIp, LoadBalancer, NodePort};
        let cases: [(&str, FrontendKind, &str, u16, Option<&str>); 12] = [
            ("a", ClusterIp, "10.96.0.10", 80, None),
            ("a", NodePort, "0.0.0.0", 30080, None),
            ("a", ExternalIp, "192.168.60.1", 80, None),
            (
                "a",
                ExternalIp,
                "10.96.0.10",
                8080,
                Some("10.96.0.10 is the ClusterIP of Service ns/dns; not taken"),
            ),
            (
                "a",
                LoadBalancer,
                "10.96.0.10",
                53,
                Some("10.96.0.10 is the ClusterIP of Service ns/dns; not taken"),
            ),
            // Its own ClusterIP: no other Service is hurt.
            ("dns", ExternalIp, "10.96.0.10", 80, None),
            (
                "a",
                ExternalIp,
                "203.0.113.1",
                80,
                Some(
                    "203.0.113.1 is outside --external-ip-cidrs (192.168.0.0/16,10.96.0.0/12); not taken",
                ),
            ),
            // The CIDRs are about spec.externalIPs only.
            ("a", LoadBalancer, "203.0.113.1", 80, None),
            (
                "a",
                ExternalIp,
                "0.0.0.0",
                80,
                Some("0.0.0.0 is not a unicast address a Service can take; not taken"),
            ),
            (
                "a",
                ExternalIp,
                "127.0.0.1",
                80,
                Some("127.0.0.1 is not a unicast address a Service can take; not taken"),
            ),
            (
                "a",
                ExternalIp,
                "192.168.50.1",
                30080,
                Some(
                    "192.168.50.1 is a node address, where nodePort 30080/TCP of Service ns/np answers; not taken",
                ),
            ),
            // A node address on a port no NodePort uses is served, as kube-proxy does.
            ("a", ExternalIp, "192.168.50.1", 80, None),
        ];
        for (service, kind, address, port, expected) in cases {
            let f = frontend(service, kind, address, port);
            assert_eq!(
                refusal(&f, &context).as_deref(),
                expected,
                "{service} {kind:?} {address}:{port}"
            );
        }
        // The NodePort's own Service may also have the node address as an external IP.
        let own = frontend("np", ExternalIp, "192.168.50.1", 30080);
        assert_eq!(refusal(&own, &context), None);
    }

    #[test]
    fn a_cluster_ip_outranks_an_external_ip_whatever_the_names() {
        let cluster = frontend("z", FrontendKind::ClusterIp, "10.96.0.10", 80);
        let external = frontend("a", FrontendKind::ExternalIp, "10.96.0.10", 80);
        assert!(rank(&cluster) < rank(&external));
        let other = frontend("b", FrontendKind::ExternalIp, "10.96.0.10", 80);
        assert!(rank(&external) < rank(&other));
    }
}
