//! The node's external devices (`--devices`) and its addresses: where the tc programs are
//! attached, and which destination addresses a NodePort answers on.
use std::{collections::BTreeMap, io, net::Ipv4Addr};

use aya::maps::{HashMap, MapData};
use lb_common::{DEVICES4_MAP, NODE_ADDRS4_MAP, NodeAddr};
use tracing::info;

use crate::maps::codec;

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

/// Makes the node-address and device maps hold exactly `devices`' IPv4 addresses.
///
/// # Errors
/// When a map cannot be read or written.
pub fn program_addresses(ebpf: &mut aya::Ebpf, devices: &[Device]) -> anyhow::Result<()> {
    let mut node_addrs: HashMap<&mut MapData, u32, NodeAddr> = HashMap::try_from(
        ebpf.map_mut(NODE_ADDRS4_MAP)
            .ok_or_else(|| anyhow::anyhow!("{NODE_ADDRS4_MAP} missing from the object"))?,
    )?;
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
    let stale: Vec<u32> = node_addrs
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains_key(k))
        .collect();
    for (addr, value) in &wanted {
        node_addrs.insert(addr, value, 0)?;
    }
    for addr in stale {
        node_addrs.remove(&addr)?;
    }
    let mut device_map: HashMap<&mut MapData, u32, u32> = HashMap::try_from(
        ebpf.map_mut(DEVICES4_MAP)
            .ok_or_else(|| anyhow::anyhow!("{DEVICES4_MAP} missing from the object"))?,
    )?;
    let wanted: BTreeMap<u32, u32> = devices
        .iter()
        .filter_map(|d| Some((d.ifindex, codec::ip4(*d.ipv4.first()?))))
        .collect();
    let stale: Vec<u32> = device_map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains_key(k))
        .collect();
    for (ifindex, addr) in &wanted {
        device_map.insert(ifindex, addr, 0)?;
    }
    for ifindex in stale {
        device_map.remove(&ifindex)?;
    }
    let addresses: Vec<String> = devices
        .iter()
        .flat_map(|d| d.ipv4.iter().map(move |ip| format!("{ip} ({})", d.name)))
        .collect();
    info!(?addresses, "node addresses for NodePorts");
    Ok(())
}
