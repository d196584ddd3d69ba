//! What kube-proxy's conntrack cleanup does for UDP, on lb's two datapaths: when a UDP
//! frontend stops using a backend (removed, no longer ready), traffic that is pinned to it
//! must move to a live one at once.
//!
//! - The socket path pins a *connected* UDP socket to its backend at `connect()`. Such a
//!   socket is destroyed (`SOCK_DESTROY` over `NETLINK_SOCK_DIAG`, in the socket's network
//!   namespace), so the application gets an error on its next call and reconnects through
//!   the Service (Cilium's socket termination). Only sockets lb translated to that backend
//!   for that frontend are touched: their cookie has a reverse-NAT entry naming both.
//!   Unconnected sockets pick per datagram and are never touched.
//! - The tc path pins a UDP flow in `LB_CT`: its original-direction entry for the backend
//!   and frontend is deleted, so the next datagram picks afresh. Its reply entry stays until
//!   it expires (60 s idle): a datagram the removed backend already sent still leaves with
//!   the frontend's address instead of reaching the client untranslated.
use std::{
    collections::{BTreeSet, HashSet},
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    CT_DIR_ORIG, CT_OTHER_MAP, CtKey, CtValue, PROTO_UDP, REVNAT4_MAP, REVNAT6_MAP, RevNat4Key,
    RevNat4Value, RevNat6Key, RevNat6Value, to_v4_mapped,
};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};
use tracing::{debug, warn};

use crate::maps::codec;

/// A backend a UDP frontend stopped using: the frontend by its id, the backend by address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StaleBackend {
    pub rev_nat_id: lb_common::FrontendId,
    pub backend: SocketAddr,
}

/// What one cleanup did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    pub sockets_destroyed: usize,
    pub flows_deleted: usize,
}

/// A map operation or a netlink exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening pinned map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("sock_diag in {netns}: {source}")]
    Netlink {
        netns: String,
        #[source]
        source: std::io::Error,
    },
}

/// Ends the socket-path sockets and tc-path flows pinned to `stale` backends, reading and
/// changing the maps pinned under `pin_dir`.
///
/// # Errors
/// When a pinned map cannot be opened. Failures in one network namespace are logged and
/// the others still cleaned.
pub fn clean(pin_dir: &Path, stale: &[StaleBackend]) -> Result<Cleanup, Error> {
    if stale.is_empty() {
        return Ok(Cleanup::default());
    }
    let stale: BTreeSet<StaleBackend> = stale.iter().copied().collect();
    let flows_deleted = delete_flows(pin_dir, &stale)?;
    let cookies = translated_sockets(pin_dir, &stale)?;
    let sockets_destroyed = if cookies.is_empty() {
        0
    } else {
        let backends: HashSet<SocketAddr> = stale.iter().map(|s| s.backend).collect();
        destroy_sockets(&cookies, &backends)
    };
    Ok(Cleanup {
        sockets_destroyed,
        flows_deleted,
    })
}

fn open<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &'static str,
    lru: bool,
) -> Result<HashMap<MapData, K, V>, Error> {
    let map =
        MapData::from_pin(pin_dir.join(name)).map_err(|source| Error::Map { map: name, source })?;
    let map = if lru {
        Map::LruHashMap(map)
    } else {
        Map::HashMap(map)
    };
    HashMap::try_from(map).map_err(|source| Error::Map { map: name, source })
}

/// The cookies of sockets the socket path translated to a stale backend for its frontend.
fn translated_sockets(
    pin_dir: &Path,
    stale: &BTreeSet<StaleBackend>,
) -> Result<HashSet<u64>, Error> {
    let mut cookies = HashSet::new();
    let mut consider = |cookie: u64, backend: SocketAddr, rev_nat_id: lb_common::FrontendId| {
        if stale.contains(&StaleBackend {
            rev_nat_id,
            backend,
        }) {
            cookies.insert(cookie);
        }
    };
    let revnat4: HashMap<MapData, RevNat4Key, RevNat4Value> = open(pin_dir, REVNAT4_MAP, true)?;
    for (key, value) in revnat4.iter().filter_map(Result::ok) {
        let backend = SocketAddr::new(codec::from_ip4(key.address).into(), u16::from_be(key.port));
        consider(key.cookie, backend, value.rev_nat_id);
    }
    let revnat6: HashMap<MapData, RevNat6Key, RevNat6Value> = open(pin_dir, REVNAT6_MAP, true)?;
    for (key, value) in revnat6.iter().filter_map(Result::ok) {
        let backend = SocketAddr::new(codec::from_ip6(key.address).into(), u16::from_be(key.port));
        consider(key.cookie, backend, value.rev_nat_id);
    }
    Ok(cookies)
}

/// Deletes the original-direction conntrack entry of every UDP flow of a stale (frontend,
/// backend): the flow's next datagram picks a live backend. The reply entry is kept, so a
/// reply the old backend has in flight is still translated back (a reply entry is only ever
/// used for packets from that backend to that client; it expires on its own).
fn delete_flows(pin_dir: &Path, stale: &BTreeSet<StaleBackend>) -> Result<usize, Error> {
    let mut ct: HashMap<MapData, CtKey, CtValue> = open(pin_dir, CT_OTHER_MAP, true)?;
    let wire = |addr: SocketAddr| -> ([u32; 4], u16) {
        let ip = match addr.ip() {
            IpAddr::V4(ip) => to_v4_mapped(codec::ip4(ip)),
            IpAddr::V6(ip) => codec::ip6(ip),
        };
        (ip, addr.port().to_be())
    };
    let stale_wire: HashSet<(lb_common::FrontendId, [u32; 4], u16)> = stale
        .iter()
        .map(|s| {
            let (ip, port) = wire(s.backend);
            (s.rev_nat_id, ip, port)
        })
        .collect();
    let doomed: Vec<CtKey> = ct
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, value)| {
            // The original direction names the backend in its value.
            key.dir == CT_DIR_ORIG
                && key.proto == PROTO_UDP
                && stale_wire.contains(&(value.rev_nat_id, value.nat_addr, value.nat_port))
        })
        .map(|(key, _)| key)
        .collect();
    let mut deleted = 0;
    for key in &doomed {
        if ct.remove(key).is_ok() {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Every network namespace of the machine, by one path that opens it: the agent's own,
/// each process's, and the named ones. Deduplicated by inode.
fn network_namespaces() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut consider = |path: PathBuf| {
        if let Ok(meta) = fs::metadata(&path)
            && seen.insert((meta.dev(), meta.ino()))
        {
            out.push(path);
        }
    };
    consider(PathBuf::from("/proc/thread-self/ns/net"));
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            consider(entry.path());
        }
    }
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                consider(entry.path().join("ns/net"));
            }
        }
    }
    out
}

/// Destroys, in every network namespace, the connected UDP sockets with one of `cookies`
/// whose peer is one of `backends`. Each namespace is entered on a thread of its own.
fn destroy_sockets(cookies: &HashSet<u64>, backends: &HashSet<SocketAddr>) -> usize {
    let mut destroyed = 0;
    for netns in network_namespaces() {
        let (cookies, backends) = (cookies.clone(), backends.clone());
        let name = netns.display().to_string();
        let result = std::thread::spawn(move || -> Result<usize, Error> {
            let fail = |source| Error::Netlink {
                netns: netns.display().to_string(),
                source,
            };
            let file = fs::File::open(&netns).map_err(fail)?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| fail(e.into()))?;
            let mut n = 0;
            for family in [AF_INET, AF_INET6] {
                for socket in udp_sockets(family).map_err(fail)? {
                    let peer = SocketAddr::new(socket.destination_address, socket.destination_port);
                    if backends.contains(&peer) && cookies.contains(&cookie(&socket)) {
                        match destroy(family, socket) {
                            Ok(()) => n += 1,
                            Err(e) => {
                                warn!(%peer, error = %e, "destroying a stale UDP socket failed")
                            }
                        }
                    }
                }
            }
            Ok(n)
        })
        .join();
        match result {
            Ok(Ok(n)) => destroyed += n,
            Ok(Err(e)) => debug!(netns = name, error = %e, "network namespace skipped"),
            Err(_) => warn!(netns = name, "socket cleanup thread panicked"),
        }
    }
    destroyed
}

/// The kernel's 64-bit socket cookie, as `inet_diag` splits it into two native words.
fn cookie(socket: &SocketId) -> u64 {
    let c = socket.cookie;
    u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        | (u64::from(u32::from_ne_bytes([c[4], c[5], c[6], c[7]])) << 32)
}

fn sock_diag() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    Ok(socket)
}

fn request(family: u8, socket_id: SocketId) -> InetRequest {
    InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    }
}

fn send<T>(socket: &Socket, flags: u16, payload: T) -> std::io::Result<()>
where
    T: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
    NetlinkPayload<T>: From<T>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// The UDP sockets of `family` in this thread's network namespace.
fn udp_sockets(family: u8) -> std::io::Result<Vec<SocketId>> {
    let socket = sock_diag()?;
    let id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_DUMP,
        SockDiagMessage::InetRequest(request(family, id)),
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[offset..size])
                .map_err(std::io::Error::other)?;
            let length = message.header.length as usize;
            match message.payload {
                // Connected sockets only: they have a peer.
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response))
                    if response.header.socket_id.destination_port != 0 =>
                {
                    out.push(response.header.socket_id.clone());
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => return Err(std::io::Error::other(format!("{e:?}"))),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// `SOCK_DESTROY` of one socket (matched by its addresses, ports and cookie).
fn destroy(family: u8, socket_id: SocketId) -> std::io::Result<()> {
    let socket = sock_diag()?;
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_ACK,
        SockDiagDestroy::new(SockDiagMessage::InetRequest(request(family, socket_id))),
    )?;
    let mut buf = vec![0; 4096];
    let size = socket.recv(&mut &mut buf[..], 0)?;
    let message = <NetlinkMessage<SockDiagDestroy>>::deserialize(&buf[..size])
        .map_err(std::io::Error::other)?;
    match message.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_read_as_the_kernel_splits_it() {
        let mut id = SocketId::new_v4();
        let cookie: u64 = 0x0000_0001_0000_2a2b;
        id.cookie[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id.cookie[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        assert_eq!(super::cookie(&id), cookie);
    }

    #[test]
    fn every_namespace_is_listed_once() {
        let all = network_namespaces();
        let unique: HashSet<u64> = all
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.ino())
            .collect();
        assert_eq!(unique.len(), all.len());
        assert!(!all.is_empty(), "at least the agent's own");
    }
}
