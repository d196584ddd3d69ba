//! The node's devices: the external ones (`--devices`), where the tc programs for traffic
//! from outside are attached and whose addresses a NodePort answers on, and the pod-facing
//! ones (`--pod-devices`), where the per-packet path for pods is attached.
use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use lb_common::{DEVICES4_MAP, DEVICES6_MAP, NODE_ADDRS4_MAP, NODE_ADDRS6_MAP, NodeAddr};
use tracing::{debug, error, info, warn};

use crate::{maps::codec, netlink, ownership::NodePortAddresses};

/// A device and its addresses (IPv6: global ones, not link-local).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub ifindex: u32,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}

/// An address NodePorts answer on, and the interface holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddress {
    pub ip: IpAddr,
    pub ifindex: u32,
    pub device: String,
}

/// Interfaces by name: flags and addresses.
type Interfaces = BTreeMap<String, (nix::net::if_::InterfaceFlags, Vec<IpAddr>)>;

/// The interfaces of the agent's network namespace.
fn interfaces() -> io::Result<Interfaces> {
    let mut interfaces = Interfaces::new();
    for ifaddr in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let entry = interfaces
            .entry(ifaddr.interface_name.clone())
            .or_insert_with(|| (ifaddr.flags, Vec::new()));
        let Some(address) = ifaddr.address.as_ref() else {
            continue;
        };
        if let Some(a) = address.as_sockaddr_in() {
            entry.1.push(a.ip().into());
        } else if let Some(a) = address.as_sockaddr_in6() {
            entry.1.push(a.ip().into());
        }
    }
    Ok(interfaces)
}

/// A unicast address other than loopback and link-local: one a node can be reached at.
fn is_global(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => !ip.is_loopback() && !ip.is_link_local(),
        IpAddr::V6(ip) => !ip.is_loopback() && !ip.is_unicast_link_local() && !ip.is_multicast(),
    }
}

/// What one reading of the interfaces gives: the external devices, the pod-facing ones,
/// and the addresses NodePorts answer on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub devices: Vec<Device>,
    pub pods: Vec<String>,
    pub node_addresses: Vec<NodeAddress>,
}

/// The external devices and, with `requested_pods`, the pod-facing ones, from one reading
/// of the agent's network namespace's interfaces, and the node addresses `nodeport`
/// selects (see [`node_addresses`]).
///
/// External: the devices named in `requested`, or by default the devices of the default
/// route(s) and those holding a global address (neither loopback nor a bridge).
///
/// # Errors
/// When a named device does not exist, or the interfaces cannot be listed.
pub fn resolve(
    requested: &[String],
    requested_pods: Option<&[String]>,
    nodeport: &NodePortAddresses,
) -> io::Result<Resolved> {
    let interfaces = interfaces()?;
    let devices = external_devices(requested, &interfaces)?;
    let pods = requested_pods.map_or_else(Vec::new, |requested| {
        pod_devices(requested, &devices, &interfaces)
    });
    let node_addresses = node_addresses(&devices, &interfaces, nodeport, |name| {
        nix::net::if_::if_nametoindex(name).ok()
    });
    Ok(Resolved {
        devices,
        pods,
        node_addresses,
    })
}

/// The addresses NodePorts answer on (`--nodeport-addresses`): with `primary`, those of
/// the external devices (the agent's equivalent of the Node's primary IPs: the interfaces
/// the node is reached through); with CIDRs, every address of any interface inside them
/// (as kube-proxy), except loopback and IPv6 link-local ones. `index` gives an interface's
/// index by name.
fn node_addresses(
    devices: &[Device],
    interfaces: &Interfaces,
    nodeport: &NodePortAddresses,
    index: impl Fn(&str) -> Option<u32>,
) -> Vec<NodeAddress> {
    let address = |ip: IpAddr, ifindex, device: &str| NodeAddress {
        ip,
        ifindex,
        device: device.to_owned(),
    };
    match nodeport {
        NodePortAddresses::Primary => devices
            .iter()
            .flat_map(|d| {
                let v4 = d.ipv4.iter().map(|ip| IpAddr::V4(*ip));
                let v6 = d.ipv6.iter().map(|ip| IpAddr::V6(*ip));
                v4.chain(v6).map(|ip| address(ip, d.ifindex, &d.name))
            })
            .collect(),
        NodePortAddresses::Cidrs(_) => interfaces
            .iter()
            .filter_map(|(name, (_, ips))| Some((name, index(name)?, ips)))
            .flat_map(|(name, ifindex, ips)| {
                ips.iter()
                    .filter(|ip| {
                        !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
                            && !ip.is_multicast()
                            && nodeport.admits(**ip, false)
                    })
                    .map(move |ip| address(*ip, ifindex, name))
            })
            .collect(),
    }
}

/// The external devices among `interfaces` (see [`resolve`]).
fn external_devices(requested: &[String], interfaces: &Interfaces) -> io::Result<Vec<Device>> {
    let names: Vec<String> = if requested.is_empty() {
        let mut names = default_route_devices()?;
        for (name, (flags, ips)) in interfaces {
            let loopback = flags.contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
            let global = ips.iter().any(is_global);
            if !loopback
                && global
                && driver(name).as_deref() != Some("bridge")
                && !names.contains(name)
            {
                names.push(name.clone());
            }
        }
        names
    } else {
        requested.to_vec()
    };
    names
        .into_iter()
        .map(|name| {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str()).map_err(|e| {
                io::Error::new(io::ErrorKind::NotFound, format!("device {name}: {e}"))
            })?;
            let ips = interfaces
                .get(&name)
                .map(|(_, ips)| ips.as_slice())
                .unwrap_or_default();
            let ipv4 = ips
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(ip) => Some(*ip),
                    IpAddr::V6(_) => None,
                })
                .collect();
            let ipv6 = ips
                .iter()
                .filter(|ip| is_global(ip))
                .filter_map(|ip| match ip {
                    IpAddr::V6(ip) => Some(*ip),
                    IpAddr::V4(_) => None,
                })
                .collect();
            Ok(Device {
                name,
                ifindex,
                ipv4,
                ipv6,
            })
        })
        .collect()
}

/// The pod-facing devices: those named in `requested`, or by default every veth without a
/// global address that is not an external device (the host side of a pod's veth pair,
/// whether it is a bridge port or routed).
fn pod_devices(requested: &[String], external: &[Device], interfaces: &Interfaces) -> Vec<String> {
    if !requested.is_empty() {
        return requested.to_vec();
    }
    interfaces
        .iter()
        .filter(|(name, (_, ips))| {
            !external.iter().any(|d| &d.name == *name)
                && !ips.iter().any(is_global)
                && driver(name).as_deref() == Some("veth")
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Devices of the IPv4 and IPv6 default route(s), from `/proc/net/route` and
/// `/proc/net/ipv6_route` (which show the reading process's network namespace).
fn default_route_devices() -> io::Result<Vec<String>> {
    let route = std::fs::read_to_string("/proc/net/route")?;
    // Absent when the kernel has no IPv6.
    let ipv6_route = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    Ok(default_routes_in(&route, &ipv6_route))
}

/// The devices of the default routes in the kernel's route tables as procfs shows them.
fn default_routes_in(route: &str, ipv6_route: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    };
    for line in route.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000" {
            add(fields[0]);
        }
    }
    // IPv6: `::/0` routes, except the reject routes the kernel keeps on `lo`.
    const RTF_REJECT: u32 = 0x0200;
    for line in ipv6_route.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let default =
            fields.len() == 10 && fields[0].bytes().all(|b| b == b'0') && fields[1] == "00";
        let reject = u32::from_str_radix(fields.get(8).unwrap_or(&"0"), 16)
            .is_ok_and(|flags| flags & RTF_REJECT != 0);
        if default && !reject && fields[9] != "lo" {
            add(fields[9]);
        }
    }
    names
}

/// The driver of device `name` (`bridge`, `veth`, …), asked through the ethtool ioctl,
/// which answers for the current network namespace unlike a sysfs mounted elsewhere.
fn driver(name: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 5 * 4],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 5 * 4],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &raw mut info,
        pad: [0; 16],
    };
    let bytes = name.as_bytes();
    if bytes.len() >= 16 {
        return None;
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket used only for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` and `info` outlive the call; the kernel writes within their sizes.
    let ok = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut req) } == 0;
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    if !ok {
        return None;
    }
    let end = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The node's devices as configured, followed as they come and go: the external devices'
/// addresses are kept in the node-address and device maps (DHCP, a LoadBalancer VIP added
/// to the node, a new interface under the default `--devices`), and the caller learns when
/// the set of devices the tc programs belong on changed (a new pod's veth, with the
/// per-packet path for pods).
#[derive(Debug)]
pub struct NodeDevices {
    requested: Vec<String>,
    /// `--pod-devices`, when pods get the per-packet path; `None` when they do not.
    requested_pods: Option<Vec<String>>,
    /// `--nodeport-addresses`.
    nodeport: NodePortAddresses,
    /// As last written to the maps.
    devices: Vec<Device>,
    /// As last written to the maps.
    node_addresses: Vec<NodeAddress>,
    pods: Vec<String>,
    maps: AddressMaps,
    /// `None` once reading the notifications failed: the devices then stay as they are.
    changes: Option<netlink::Changes>,
}

impl NodeDevices {
    /// Resolves the `requested` devices (see [`resolve`]) and writes their addresses, and
    /// with `requested_pods` the pod-facing devices (see [`pod_devices`]), having subscribed
    /// to the link and address changes first, so one made meanwhile is not lost. Takes the
    /// address maps out of `ebpf` (its programs keep using them). Needs a tokio runtime, and
    /// opens the subscription in the calling thread's network namespace.
    ///
    /// # Errors
    /// When the subscription cannot be opened, a device cannot be resolved, or a map is
    /// missing or cannot be written.
    pub fn start(
        ebpf: &mut aya::Ebpf,
        requested: &[String],
        requested_pods: Option<&[String]>,
        nodeport: NodePortAddresses,
    ) -> anyhow::Result<Self> {
        let changes = netlink::Changes::open().context("subscribing to address changes")?;
        let mut maps = AddressMaps::take(ebpf)?;
        let Resolved {
            devices,
            pods,
            node_addresses,
        } = resolve(requested, requested_pods, &nodeport).context("finding the --devices")?;
        maps.program(&devices, &node_addresses)
            .context("writing the node addresses")?;
        let addresses = describe(&node_addresses);
        info!(?addresses, "node addresses for NodePorts");
        Ok(Self {
            requested: requested.to_vec(),
            requested_pods: requested_pods.map(<[String]>::to_vec),
            nodeport,
            devices,
            node_addresses,
            pods,
            maps,
            changes: Some(changes),
        })
    }

    /// The addresses NodePorts answer on, as last written to the maps.
    #[must_use]
    pub fn node_addresses(&self) -> std::collections::BTreeSet<IpAddr> {
        self.node_addresses.iter().map(|a| a.ip).collect()
    }

    /// The external devices' names, as last resolved.
    #[must_use]
    pub fn external(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name.clone()).collect()
    }

    /// The pod-facing devices, as last resolved (none without the per-packet path).
    #[must_use]
    pub fn pods(&self) -> &[String] {
        &self.pods
    }

    /// Resolves when the node's links or addresses changed (a burst of changes once), and
    /// never once the notifications cannot be read. Cancel-safe.
    pub async fn changed(&mut self) {
        let Some(changes) = &mut self.changes else {
            return std::future::pending().await;
        };
        if let Err(e) = changes.next().await {
            error!(
                error = %e,
                "reading link and address changes failed; devices no longer follow them"
            );
            self.changes = None;
        }
    }

    /// Resolves the devices again and, when their addresses changed, writes them. Returns
    /// whether the set of devices the tc programs belong on changed. Failures are logged,
    /// and the next change tries again.
    pub fn refresh(&mut self) -> bool {
        let resolved = match resolve(
            &self.requested,
            self.requested_pods.as_deref(),
            &self.nodeport,
        ) {
            Ok(resolved) => resolved,
            Err(e) => {
                warn!(error = %e, "re-reading the devices failed; node addresses unchanged");
                return false;
            }
        };
        let Resolved {
            devices,
            pods,
            node_addresses,
        } = resolved;
        let names_changed = pods != self.pods
            || devices
                .iter()
                .map(|d| &d.name)
                .ne(self.devices.iter().map(|d| &d.name));
        self.pods = pods;
        if devices == self.devices && node_addresses == self.node_addresses {
            debug!("links or addresses changed, node addresses did not");
            return names_changed;
        }
        let (added, removed) = address_changes(&self.node_addresses, &node_addresses);
        match self.maps.program(&devices, &node_addresses) {
            Ok(()) => {
                info!(?added, ?removed, "node addresses changed");
                self.devices = devices;
                self.node_addresses = node_addresses;
            }
            Err(e) => error!(
                error = format!("{e:#}"),
                "writing the node addresses failed; retrying on the next change"
            ),
        }
        names_changed
    }
}

/// `ip (device)` for each address.
fn describe(addresses: &[NodeAddress]) -> Vec<String> {
    addresses
        .iter()
        .map(|a| format!("{} ({})", a.ip, a.device))
        .collect()
}

/// The addresses (as [`describe`] shows them) in `new` but not `old`, and in `old` but not
/// `new`.
fn address_changes(old: &[NodeAddress], new: &[NodeAddress]) -> (Vec<String>, Vec<String>) {
    let old = describe(old);
    let new = describe(new);
    let added = new.iter().filter(|a| !old.contains(a)).cloned().collect();
    let removed = old.iter().filter(|a| !new.contains(a)).cloned().collect();
    (added, removed)
}

/// The node-address and device maps of both families, taken out of the loaded object.
#[derive(Debug)]
struct AddressMaps {
    node_addrs4: HashMap<MapData, u32, NodeAddr>,
    node_addrs6: HashMap<MapData, [u32; 4], NodeAddr>,
    devices4: HashMap<MapData, u32, u32>,
    devices6: HashMap<MapData, u32, [u32; 4]>,
}

impl AddressMaps {
    fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow::anyhow!("{name} missing from the object"))
        };
        Ok(Self {
            node_addrs4: HashMap::try_from(take(NODE_ADDRS4_MAP)?)?,
            node_addrs6: HashMap::try_from(take(NODE_ADDRS6_MAP)?)?,
            devices4: HashMap::try_from(take(DEVICES4_MAP)?)?,
            devices6: HashMap::try_from(take(DEVICES6_MAP)?)?,
        })
    }

    /// Makes the maps hold exactly the node addresses `addresses` and the `devices`' SNAT
    /// sources (a device's first address of the family).
    fn program(&mut self, devices: &[Device], addresses: &[NodeAddress]) -> anyhow::Result<()> {
        let node = |ifindex| NodeAddr { ifindex, flags: 0 };
        sync_map(
            &mut self.node_addrs4,
            addresses
                .iter()
                .filter_map(|a| match a.ip {
                    IpAddr::V4(ip) => Some((codec::ip4(ip), node(a.ifindex))),
                    IpAddr::V6(_) => None,
                })
                .collect(),
        )?;
        sync_map(
            &mut self.node_addrs6,
            addresses
                .iter()
                .filter_map(|a| match a.ip {
                    IpAddr::V6(ip) => Some((codec::ip6(ip), node(a.ifindex))),
                    IpAddr::V4(_) => None,
                })
                .collect(),
        )?;
        sync_map(
            &mut self.devices4,
            devices
                .iter()
                .filter_map(|d| Some((d.ifindex, codec::ip4(*d.ipv4.first()?))))
                .collect(),
        )?;
        sync_map(
            &mut self.devices6,
            devices
                .iter()
                .filter_map(|d| Some((d.ifindex, codec::ip6(*d.ipv6.first()?))))
                .collect(),
        )
    }
}

/// A map of node addresses or devices, as [`sync_map`] sees it (the fake in the tests has
/// the kernel's capacity limit).
trait AddressMap<K, V> {
    fn keys(&self) -> Vec<K>;
    fn insert(&mut self, key: &K, value: &V) -> Result<(), aya::maps::MapError>;
    fn remove(&mut self, key: &K) -> Result<(), aya::maps::MapError>;
}

impl<K: Pod, V: Pod> AddressMap<K, V> for HashMap<MapData, K, V> {
    fn keys(&self) -> Vec<K> {
        HashMap::keys(self).filter_map(Result::ok).collect()
    }

    fn insert(&mut self, key: &K, value: &V) -> Result<(), aya::maps::MapError> {
        HashMap::insert(self, key, value, 0)
    }

    fn remove(&mut self, key: &K) -> Result<(), aya::maps::MapError> {
        HashMap::remove(self, key)
    }
}

/// Makes `map` hold exactly `wanted`: entries that stay are overwritten first, then stale
/// ones removed, then new ones added. An address that stays is never missing, and a full
/// map (256 entries) still takes a change of addresses, since the stale entries make the
/// room the new ones need.
fn sync_map<K: Pod + Ord, V: Pod>(
    map: &mut impl AddressMap<K, V>,
    wanted: BTreeMap<K, V>,
) -> anyhow::Result<()> {
    let present: std::collections::BTreeSet<K> = map.keys().into_iter().collect();
    for (key, value) in wanted.iter().filter(|(k, _)| present.contains(k)) {
        map.insert(key, value)?;
    }
    for key in present.iter().filter(|k| !wanted.contains_key(k)) {
        map.remove(key)?;
    }
    for (key, value) in wanted.iter().filter(|(k, _)| !present.contains(k)) {
        map.insert(key, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map with the kernel's behaviour when full: adding a key fails with `E2BIG`.
    struct FullableMap {
        entries: BTreeMap<u32, u32>,
        capacity: usize,
    }

    impl AddressMap<u32, u32> for FullableMap {
        fn keys(&self) -> Vec<u32> {
            self.entries.keys().copied().collect()
        }

        fn insert(&mut self, key: &u32, value: &u32) -> Result<(), aya::maps::MapError> {
            if !self.entries.contains_key(key) && self.entries.len() >= self.capacity {
                return Err(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: io::Error::from_raw_os_error(libc::E2BIG),
                }));
            }
            self.entries.insert(*key, *value);
            Ok(())
        }

        fn remove(&mut self, key: &u32) -> Result<(), aya::maps::MapError> {
            self.entries.remove(key);
            Ok(())
        }
    }

    #[test]
    fn a_full_node_address_map_takes_a_change_of_addresses() {
        let capacity = lb_common::NODE_ADDRS_MAX_ENTRIES;
        let mut map = FullableMap {
            entries: (0..).take(capacity).map(|k| (k, 1)).collect(),
            capacity,
        };
        // Half the addresses stay (their device changed), half are replaced.
        let half = u32::try_from(capacity / 2).unwrap();
        let wanted: BTreeMap<u32, u32> = (half..half + u32::try_from(capacity).unwrap())
            .map(|k| (k, 2))
            .collect();
        sync_map(&mut map, wanted.clone()).unwrap();
        assert_eq!(map.entries, wanted);
    }

    fn device(name: &str, ifindex: u32, ipv4: &[&str]) -> Device {
        Device {
            name: name.to_owned(),
            ifindex,
            ipv4: ipv4.iter().map(|ip| ip.parse().unwrap()).collect(),
            ipv6: Vec::new(),
        }
    }

    #[test]
    fn default_routes_of_both_families_without_the_reject_routes() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t00000000\t0132A8C0\t0003\t0\t0\t0\t00000000\n\
                     eth0\t0032A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        let zeros = "00000000000000000000000000000000";
        let ipv6_route = format!(
            "{zeros} 00 {zeros} 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth1\n\
             {zeros} 00 {zeros} 00 {zeros} ffffffff 00000001 00000000 00200200       lo\n\
             fd000000000000000000000000000000 40 {zeros} 00 {zeros} 00000100 00000001 00000000 00000001     eth1\n"
        );
        assert_eq!(default_routes_in(route, &ipv6_route), ["eth0", "eth1"]);
    }

    fn primary(devices: &[Device]) -> Vec<NodeAddress> {
        node_addresses(
            devices,
            &Interfaces::new(),
            &NodePortAddresses::Primary,
            |_| None,
        )
    }

    #[test]
    fn address_changes_name_added_and_removed_addresses_with_their_device() {
        let old = primary(&[
            device("ext0", 2, &["192.168.50.1", "192.168.50.10"]),
            device("ext1", 3, &["192.168.51.1"]),
        ]);
        let new = primary(&[
            device("ext0", 2, &["192.168.50.1", "192.168.50.11"]),
            device("ext1", 3, &["192.168.51.1"]),
        ]);
        assert_eq!(
            address_changes(&old, &new),
            (
                vec!["192.168.50.11 (ext0)".to_owned()],
                vec!["192.168.50.10 (ext0)".to_owned()]
            )
        );
        assert_eq!(address_changes(&new, &new), (vec![], vec![]));
    }

    #[test]
    fn nodeport_addresses_primary_is_the_devices_cidrs_any_interface() {
        use nix::net::if_::InterfaceFlags;
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|ip| ip.parse().unwrap()).collect() };
        let mut interfaces = Interfaces::new();
        let flags = InterfaceFlags::empty();
        interfaces.insert("lo".into(), (flags, ips(&["127.0.0.1", "::1"])));
        interfaces.insert(
            "ext0".into(),
            (flags, ips(&["192.168.50.1", "fd00::1", "fe80::1"])),
        );
        interfaces.insert("cni0".into(), (flags, ips(&["10.244.0.1"])));
        let devices = [Device {
            name: "ext0".into(),
            ifindex: 2,
            ipv4: vec!["192.168.50.1".parse().unwrap()],
            ipv6: vec!["fd00::1".parse().unwrap()],
        }];
        let index = |name: &str| match name {
            "lo" => Some(1),
            "ext0" => Some(2),
            "cni0" => Some(3),
            _ => None,
        };
        let list = |nodeport: &NodePortAddresses| {
            let mut found = describe(&node_addresses(&devices, &interfaces, nodeport, index));
            found.sort();
            found
        };
        assert_eq!(
            list(&NodePortAddresses::Primary),
            ["192.168.50.1 (ext0)", "fd00::1 (ext0)"]
        );
        let cidrs = |list: &[&str]| {
            NodePortAddresses::Cidrs(list.iter().map(|c| c.parse().unwrap()).collect())
        };
        // No IPv6 CIDR: every IPv6 address but link-local and loopback.
        assert_eq!(
            list(&cidrs(&["10.244.0.0/16"])),
            ["10.244.0.1 (cni0)", "fd00::1 (ext0)"]
        );
        assert_eq!(
            list(&cidrs(&["0.0.0.0/0", "::/0"])),
            ["10.244.0.1 (cni0)", "192.168.50.1 (ext0)", "fd00::1 (ext0)"]
        );
        assert_eq!(
            list(&cidrs(&["192.168.50.1/32", "fd00:1::/64"])),
            ["192.168.50.1 (ext0)"]
        );
    }
}
