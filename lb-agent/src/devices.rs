//! The node's external devices (`--devices`) and its addresses: where the tc programs are
//! attached, and which destination addresses a NodePort answers on.
use std::{collections::BTreeMap, io, net::Ipv4Addr};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData};
use lb_common::{DEVICES4_MAP, NODE_ADDRS4_MAP, NodeAddr};
use tracing::{debug, error, info, warn};

use crate::{maps::codec, netlink};

/// A device and its IPv4 addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub ifindex: u32,
    pub ipv4: Vec<Ipv4Addr>,
}

/// The devices named in `requested`, or by default the devices of the default route(s) and
/// those holding a global IPv4 address (neither loopback nor a bridge), in the agent's
/// network namespace.
///
/// # Errors
/// When a named device does not exist, or the interfaces cannot be listed.
pub fn resolve(requested: &[String]) -> io::Result<Vec<Device>> {
    let mut addresses: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    let mut flags: BTreeMap<String, nix::net::if_::InterfaceFlags> = BTreeMap::new();
    for ifaddr in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        flags.insert(ifaddr.interface_name.clone(), ifaddr.flags);
        let entry = addresses.entry(ifaddr.interface_name.clone()).or_default();
        if let Some(ip) = ifaddr
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|a| a.ip())
        {
            entry.push(ip);
        }
    }
    let names: Vec<String> = if requested.is_empty() {
        let mut names = default_route_devices()?;
        for (name, ips) in &addresses {
            let loopback = flags
                .get(name)
                .is_some_and(|f| f.contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK));
            let global = ips
                .iter()
                .any(|ip| !ip.is_loopback() && !ip.is_link_local());
            if !loopback && global && !is_bridge(name) && !names.contains(name) {
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
            let ipv4 = addresses.get(&name).cloned().unwrap_or_default();
            Ok(Device {
                name,
                ifindex,
                ipv4,
            })
        })
        .collect()
}

/// Devices of the IPv4 default route(s), from `/proc/net/route` (which shows the reading
/// process's network namespace).
fn default_route_devices() -> io::Result<Vec<String>> {
    let table = std::fs::read_to_string("/proc/net/route")?;
    let mut names = Vec::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000" {
            let name = fields[0].to_string();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// Whether `name` is a Linux bridge (its driver, asked through the ethtool ioctl, which
/// answers for the current network namespace unlike a sysfs mounted elsewhere).
fn is_bridge(name: &str) -> bool {
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
        return false;
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket used only for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `req` and `info` outlive the call; the kernel writes within their sizes.
    let ok = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut req) } == 0;
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    ok && info.driver.starts_with(b"bridge\0")
}

/// The node's devices as `--devices` asks for them, with their addresses kept in the
/// node-address and device maps as they come and go (DHCP, a LoadBalancer VIP added to the
/// node, a new interface under the default `--devices`).
#[derive(Debug)]
pub struct NodeAddresses {
    requested: Vec<String>,
    /// As last written to the maps.
    devices: Vec<Device>,
    maps: AddressMaps,
    /// `None` once reading the notifications failed: the addresses then stay as they are.
    changes: Option<netlink::Changes>,
}

impl NodeAddresses {
    /// Resolves the `requested` devices (see [`resolve`]) and writes their addresses, having
    /// subscribed to the link and address changes first, so one made meanwhile is not lost.
    /// Takes the two maps out of `ebpf` (its programs keep using them). Needs a tokio
    /// runtime, and opens the subscription in the calling thread's network namespace.
    ///
    /// # Errors
    /// When the subscription cannot be opened, a device cannot be resolved, or a map is
    /// missing or cannot be written.
    pub fn start(ebpf: &mut aya::Ebpf, requested: &[String]) -> anyhow::Result<Self> {
        let changes = netlink::Changes::open().context("subscribing to address changes")?;
        let mut maps = AddressMaps::take(ebpf)?;
        let devices = resolve(requested).context("finding the --devices")?;
        maps.program(&devices)
            .context("writing the node addresses")?;
        let addresses = describe(&devices);
        info!(?addresses, "node addresses for NodePorts");
        Ok(Self {
            requested: requested.to_vec(),
            devices,
            maps,
            changes: Some(changes),
        })
    }

    /// The devices as last written.
    pub fn devices(&self) -> &[Device] {
        &self.devices
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
                "reading link and address changes failed; node addresses no longer follow them"
            );
            self.changes = None;
        }
    }

    /// Resolves the devices again and, when they changed, writes their addresses. Failures
    /// are logged, and the next change tries again.
    pub fn refresh(&mut self) {
        let devices = match resolve(&self.requested) {
            Ok(devices) => devices,
            Err(e) => {
                warn!(error = %e, "re-reading the devices failed; node addresses unchanged");
                return;
            }
        };
        if devices == self.devices {
            debug!("links or addresses changed, node addresses did not");
            return;
        }
        let (added, removed) = address_changes(&self.devices, &devices);
        match self.maps.program(&devices) {
            Ok(()) => {
                info!(?added, ?removed, "node addresses changed");
                self.devices = devices;
            }
            Err(e) => error!(
                error = format!("{e:#}"),
                "writing the node addresses failed; retrying on the next change"
            ),
        }
    }
}

/// `ip (device)` for each address of `devices`.
fn describe(devices: &[Device]) -> Vec<String> {
    devices
        .iter()
        .flat_map(|d| d.ipv4.iter().map(move |ip| format!("{ip} ({})", d.name)))
        .collect()
}

/// The addresses (as [`describe`] shows them) in `new` but not `old`, and in `old` but not
/// `new`.
fn address_changes(old: &[Device], new: &[Device]) -> (Vec<String>, Vec<String>) {
    let old = describe(old);
    let new = describe(new);
    let added = new.iter().filter(|a| !old.contains(a)).cloned().collect();
    let removed = old.iter().filter(|a| !new.contains(a)).cloned().collect();
    (added, removed)
}

/// The node-address and device maps, taken out of the loaded object.
#[derive(Debug)]
struct AddressMaps {
    node_addrs: HashMap<MapData, u32, NodeAddr>,
    devices: HashMap<MapData, u32, u32>,
}

impl AddressMaps {
    fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow::anyhow!("{name} missing from the object"))
        };
        Ok(Self {
            node_addrs: HashMap::try_from(take(NODE_ADDRS4_MAP)?)?,
            devices: HashMap::try_from(take(DEVICES4_MAP)?)?,
        })
    }

    /// Makes the maps hold exactly `devices`' IPv4 addresses. Each address is written
    /// before stale ones are removed, so an address that stays is never missing.
    fn program(&mut self, devices: &[Device]) -> anyhow::Result<()> {
        let wanted: BTreeMap<u32, NodeAddr> = devices
            .iter()
            .flat_map(|d| {
                d.ipv4.iter().map(|ip| {
                    (
                        codec::ip4(*ip),
                        NodeAddr {
                            ifindex: d.ifindex,
                            flags: 0,
                        },
                    )
                })
            })
            .collect();
        let stale: Vec<u32> = self
            .node_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for (addr, value) in &wanted {
            self.node_addrs.insert(addr, value, 0)?;
        }
        for addr in stale {
            self.node_addrs.remove(&addr)?;
        }
        let wanted: BTreeMap<u32, u32> = devices
            .iter()
            .filter_map(|d| Some((d.ifindex, codec::ip4(*d.ipv4.first()?))))
            .collect();
        let stale: Vec<u32> = self
            .devices
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for (ifindex, addr) in &wanted {
            self.devices.insert(ifindex, addr, 0)?;
        }
        for ifindex in stale {
            self.devices.remove(&ifindex)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, ifindex: u32, ipv4: &[&str]) -> Device {
        Device {
            name: name.to_owned(),
            ifindex,
            ipv4: ipv4.iter().map(|ip| ip.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn address_changes_name_added_and_removed_addresses_with_their_device() {
        let old = [
            device("ext0", 2, &["192.168.50.1", "192.168.50.10"]),
            device("ext1", 3, &["192.168.51.1"]),
        ];
        let new = [
            device("ext0", 2, &["192.168.50.1", "192.168.50.11"]),
            device("ext1", 3, &["192.168.51.1"]),
        ];
        assert_eq!(
            address_changes(&old, &new),
            (
                vec!["192.168.50.11 (ext0)".to_owned()],
                vec!["192.168.50.10 (ext0)".to_owned()]
            )
        );
        assert_eq!(address_changes(&new, &new), (vec![], vec![]));
    }
}
