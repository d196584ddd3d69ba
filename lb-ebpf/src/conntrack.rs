//! Connection tracking of the tc datapath (after Cilium's `conntrack.h`, reduced): one LRU
//! entry per direction of a translated flow, each keyed by the 5-tuple as its packets are
//! on the wire at the hook that looks them up. Entries expire by idle time, with a short
//! lifetime once TCP closes (FIN or RST), and LRU eviction bounds the map.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    CT_CLOSE_LIFETIME_NS, CT_DIR_ORIG, CT_DIR_REPLY, CT_F_SNAT, CT_SYN_LIFETIME_NS,
    CT_TCP_FIN_ORIG, CT_TCP_FIN_REPLY, CT_TCP_LIFETIME_NS, CT_TCP_RST, CT_TCP_SEEN_REPLY,
    CT_TCP_SYN, CT_UDP_LIFETIME_NS, CtKey, CtValue, PROTO_TCP,
};

use crate::{
    maps::LB_CT,
    nat::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The key of `packet` in direction `dir`.
#[inline(always)]
pub fn key(packet: &Packet, dir: u8) -> CtKey {
    CtKey {
        saddr: packet.saddr,
        daddr: packet.daddr,
        sport: packet.sport,
        dport: packet.dport,
        proto: packet.proto,
        dir,
        pad: [0; 2],
    }
}

/// Now, in the clock the entries use.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The live entry of `key` (expired entries are deleted and not returned).
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtValue> {
    let entry = LB_CT.get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid for the run of the program.
    let (last_seen, state) = unsafe { ((*entry).last_seen_ns, (*entry).tcp_state) };
    if now.saturating_sub(last_seen) > lifetime(key.proto, state) {
        let _ = LB_CT.remove(key);
        return None;
    }
    Some(entry)
}

/// How long an idle entry in `state` lives.
#[inline(always)]
fn lifetime(proto: u8, state: u8) -> u64 {
    if proto != PROTO_TCP {
        CT_UDP_LIFETIME_NS
    } else if is_closing(state) {
        CT_CLOSE_LIFETIME_NS
    } else if state & CT_TCP_SEEN_REPLY == 0 {
        CT_SYN_LIFETIME_NS
    } else {
        CT_TCP_LIFETIME_NS
    }
}

/// An RST, or a FIN from each side.
#[inline(always)]
pub fn is_closing(state: u8) -> bool {
    state & CT_TCP_RST != 0
        || state & (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY) == (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY)
}

/// A TCP SYN without ACK: the start of a new connection.
#[inline(always)]
pub fn is_syn(packet: &Packet) -> bool {
    packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The state bits a packet of direction `dir` adds.
#[inline(always)]
fn state_bits(packet: &Packet, dir: u8) -> u8 {
    let flags = packet.tcp_flags;
    let mut bits = 0;
    if flags & TCP_SYN != 0 {
        bits |= CT_TCP_SYN;
    }
    if flags & TCP_RST != 0 {
        bits |= CT_TCP_RST;
    }
    if dir == CT_DIR_REPLY {
        bits |= CT_TCP_SEEN_REPLY;
        if flags & TCP_FIN != 0 {
            bits |= CT_TCP_FIN_REPLY;
        }
    } else if flags & TCP_FIN != 0 {
        bits |= CT_TCP_FIN_ORIG;
    }
    bits
}

/// Records a packet of `dir` on its entry, and on the other direction's entry when the TCP
/// state changes (so both directions expire together once the connection closes).
// Its own BPF function: the stack of each call stays within the 512-byte limit.
#[inline(never)]
pub fn touch(entry: *mut CtValue, packet: &Packet, dir: u8, now: u64) {
    // SAFETY: a map value pointer, valid for the run of the program.
    let value = unsafe { &mut *entry };
    value.last_seen_ns = now;
    if packet.proto != PROTO_TCP {
        return;
    }
    let bits = state_bits(packet, dir);
    if value.tcp_state | bits == value.tcp_state {
        return;
    }
    value.tcp_state |= bits;
    let state = value.tcp_state;
    let peer = peer_key(value, packet, dir);
    if let Some(other) = LB_CT.get_ptr_mut(peer) {
        // SAFETY: as above.
        unsafe { (*other).tcp_state |= state };
    }
}

/// The key of the other direction's entry of the flow `packet` belongs to (as the packet is
/// before translation).
#[inline(always)]
fn peer_key(value: &CtValue, packet: &Packet, dir: u8) -> CtKey {
    let snat = value.flags & CT_F_SNAT != 0;
    if dir == CT_DIR_ORIG {
        // Reply: backend → client (or → SNAT address).
        let (daddr, dport) = if snat {
            (value.snat_addr, value.snat_port)
        } else {
            (packet.saddr, packet.sport)
        };
        CtKey {
            saddr: value.nat_addr,
            daddr,
            sport: value.nat_port,
            dport,
            proto: packet.proto,
            dir: CT_DIR_ORIG ^ 1,
            pad: [0; 2],
        }
    } else {
        // Original: client → frontend.
        let (saddr, sport) = if snat {
            (value.snat_addr, value.snat_port)
        } else {
            (packet.daddr, packet.dport)
        };
        CtKey {
            saddr,
            daddr: value.nat_addr,
            sport,
            dport: value.nat_port,
            proto: packet.proto,
            dir: CT_DIR_ORIG,
            pad: [0; 2],
        }
    }
}

/// Creates both entries of a new flow. `orig` is the translation of the client's packets,
/// `reply` the key and value of the backend's. Errors when the map refuses an entry.
#[inline(always)]
pub fn create(
    orig_key: &CtKey,
    orig: &CtValue,
    reply_key: &CtKey,
    reply: &CtValue,
    reply_flags: u64,
) -> Result<(), i32> {
    LB_CT.insert(reply_key, reply, reply_flags)?;
    if let Err(e) = LB_CT.insert(orig_key, orig, 0) {
        let _ = LB_CT.remove(reply_key);
        return Err(e);
    }
    Ok(())
}
