//! The node's devices: the external ones (`--devices`), where the tc programs for traffic
//! from outside are attached and whose addresses a NodePort answers on, and the pod-facing
//! ones (`--pod-devices`), where the per-packet path for pods is attached.
use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use lb_common::{DEVICES4_MAP, DEVICES6_MAP, NODE_ADDRS4_MAP, NODE_ADDRS6_MAP, NodeAddr};
use tracing::info;

use crate::maps::codec;

/// A device and its addresses (IPv6: global ones, not link-local).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub ifindex: u32,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}

/// The interfaces of the agent's network namespace: name → (flags, addresses).
fn interfaces() -> io::Result<BTreeMap<String, (nix::net::if_::InterfaceFlags, Vec<IpAddr>)>> {
    let mut interfaces: BTreeMap<String, (nix::net::if_::InterfaceFlags, Vec<IpAddr>)> =
        BTreeMap::new();
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

/// The devices named in `requested`, or by default the devices of the default route(s) and
/// those holding a global IPv4 address (neither loopback nor a bridge), in the agent's
/// network namespace.
///
/// # Errors
/// When a named device does not exist, or the interfaces cannot be listed.
pub fn resolve(requested: &[String]) -> io::Result<Vec<Device>> {
    let interfaces = interfaces()?;
    let names: Vec<String> = if requested.is_empty() {
        let mut names = default_route_devices()?;
        for (name, (flags, ips)) in &interfaces {
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
///
/// # Errors
/// When the interfaces cannot be listed.
pub fn pod_devices(requested: &[String], external: &[Device]) -> io::Result<Vec<String>> {
    if !requested.is_empty() {
        return Ok(requested.to_vec());
    }
    Ok(interfaces()?
        .into_iter()
        .filter(|(name, (_, ips))| {
            !external.iter().any(|d| &d.name == name)
                && !ips.iter().any(is_global)
                && driver(name).as_deref() == Some("veth")
        })
        .map(|(name, _)| name)
        .collect())
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

/// Makes the node-address and device maps of both families hold exactly `devices'`
/// addresses.
///
/// # Errors
/// When a map cannot be read or written.
pub fn program_addresses(ebpf: &mut aya::Ebpf, devices: &[Device]) -> anyhow::Result<()> {
    let node = |ifindex| NodeAddr { ifindex, flags: 0 };
    sync_map(
        ebpf,
        NODE_ADDRS4_MAP,
        devices
            .iter()
            .flat_map(|d| d.ipv4.iter().map(|ip| (codec::ip4(*ip), node(d.ifindex))))
            .collect(),
    )?;
    sync_map(
        ebpf,
        NODE_ADDRS6_MAP,
        devices
            .iter()
            .flat_map(|d| d.ipv6.iter().map(|ip| (codec::ip6(*ip), node(d.ifindex))))
            .collect(),
    )?;
    sync_map(
        ebpf,
        DEVICES4_MAP,
        devices
            .iter()
            .filter_map(|d| Some((d.ifindex, codec::ip4(*d.ipv4.first()?))))
            .collect(),
    )?;
    sync_map(
        ebpf,
        DEVICES6_MAP,
        devices
            .iter()
            .filter_map(|d| Some((d.ifindex, codec::ip6(*d.ipv6.first()?))))
            .collect(),
    )?;
    let addresses: Vec<String> = devices
        .iter()
        .flat_map(|d| {
            let v4 = d.ipv4.iter().map(ToString::to_string);
            let v6 = d.ipv6.iter().map(ToString::to_string);
            v4.chain(v6).map(move |ip| format!("{ip} ({})", d.name))
        })
        .collect();
    info!(?addresses, "node addresses for NodePorts");
    Ok(())
}

/// Makes the hash map `name` hold exactly `wanted`.
fn sync_map<K: Pod + Ord, V: Pod>(
    ebpf: &mut aya::Ebpf,
    name: &str,
    wanted: BTreeMap<K, V>,
) -> anyhow::Result<()> {
    let mut map: HashMap<&mut MapData, K, V> = HashMap::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| anyhow::anyhow!("{name} missing from the object"))?,
    )?;
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains_key(k))
        .collect();
    for (key, value) in &wanted {
        map.insert(key, value, 0)?;
    }
    for key in stale {
        map.remove(&key)?;
    }
    Ok(())
}
