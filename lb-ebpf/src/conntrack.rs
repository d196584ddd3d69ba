//! Connection tracking of the tc datapath (after Cilium's `conntrack.h`, reduced): one LRU
//! entry per direction of a translated flow, each keyed by the 5-tuple as its packets are
//! on the wire at the hook that looks them up. Entries expire by idle time, with a short
//! lifetime once TCP closes (FIN or RST), and LRU eviction bounds each table.
//!
//! Three tables keep a flood from emptying the one that matters. A TCP flow starts in the
//! half-open table (only a SYN starts one) and moves to the established table when its
//! client acknowledges the backend's SYN-ACK; half-open entries live seconds. A spoofed
//! SYN flood, whose handshakes never complete, therefore only ever fills the half-open
//! table: established flows, and the SNAT ports they hold, are never evicted for it. A
//! flow that closes (RST, or a FIN from each side) moves back to the half-open table for
//! its last seconds, so the established table holds live connections only and a churn of
//! short ones cannot evict a long-idle one either. Other protocols (UDP) have their own
//! table.
use lb_common::{
    CT_DIR_ORIG, CT_DIR_REPLY, CT_F_SNAT, CT_TCP_ESTABLISHED, CT_TCP_FIN_ORIG, CT_TCP_FIN_REPLY,
    CT_TCP_RST, CT_TCP_SEEN_REPLY, CT_TCP_SYN, Counter, CtKey, CtValue, PROTO_TCP,
};

use crate::{
    counters::count,
    maps::{Conntrack, LB_CT_HALF_OPEN, LB_CT_OTHER, LB_CT_TCP},
    nat::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The table an entry lives in.
pub use lb_common::CtTable as Table;

/// The map of `table`.
#[inline(always)]
fn map(table: Table) -> &'static Conntrack {
    match table {
        Table::Established => &LB_CT_TCP,
        Table::HalfOpen => &LB_CT_HALF_OPEN,
        Table::Other => &LB_CT_OTHER,
    }
}

/// A live entry: its value (a map value pointer, valid for the run of the program) and
/// the table holding it.
#[derive(Clone, Copy)]
pub struct Entry {
    pub value: *mut CtValue,
    pub table: Table,
}

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

/// Now, in the clock the entries use: `CLOCK_MONOTONIC` as of the last tick (at most a few
/// milliseconds behind, against lifetimes of seconds), read from `jiffies` (`clock.rs`).
#[inline(always)]
pub fn now() -> u64 {
    crate::clock::now()
}

/// The live entry of `packet`'s `key`, in whichever table holds it (expired entries are
/// deleted and not returned). Established flows, the most packets, are looked up first;
/// a packet with SYN set (a client's SYN, a backend's SYN-ACK) belongs to a half-open flow
/// if to any, so for it the half-open table comes first and a handshake's packets do not
/// each miss in the established table.
#[inline(always)]
pub fn lookup(key: &CtKey, packet: &Packet, now: u64) -> Option<Entry> {
    if key.proto != PROTO_TCP {
        return lookup_in(Table::Other, key, now);
    }
    if packet.tcp_flags & TCP_SYN != 0 {
        return lookup_in(Table::HalfOpen, key, now)
            .or_else(|| lookup_in(Table::Established, key, now));
    }
    lookup_in(Table::Established, key, now).or_else(|| lookup_in(Table::HalfOpen, key, now))
}

#[inline(always)]
fn lookup_in(table: Table, key: &CtKey, now: u64) -> Option<Entry> {
    let value = map(table).get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid for the run of the program.
    let (last_seen, state) = unsafe { ((*value).last_seen_ns, (*value).tcp_state) };
    if now.saturating_sub(last_seen) > table.lifetime_ns(state) {
        let _ = map(table).remove(key);
        return None;
    }
    Some(Entry { value, table })
}

/// Deletes `key`'s entry from `table`.
#[inline(always)]
pub fn remove(key: &CtKey, table: Table) {
    let _ = map(table).remove(key);
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

/// The state both entries of a new flow start in: what its first packet (from the client)
/// says, so creating the flow needs no second look at the entries.
#[inline(always)]
pub fn first_state(packet: &Packet) -> u8 {
    if packet.proto != PROTO_TCP {
        return 0;
    }
    state_bits(packet, CT_DIR_ORIG, 0)
}

/// The state bits a packet of direction `dir` adds to an entry in `state`.
#[inline(always)]
fn state_bits(packet: &Packet, dir: u8, state: u8) -> u8 {
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
    } else {
        if flags & TCP_FIN != 0 {
            bits |= CT_TCP_FIN_ORIG;
        }
        // The client's ACK after the backend answered completes the handshake. (A reply
        // to a spoofed SYN goes to an address that never answers it.)
        if state & CT_TCP_SEEN_REPLY != 0 && flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK {
            bits |= CT_TCP_ESTABLISHED;
        }
    }
    bits
}

/// Records a packet of `dir` (whose key is `key`) on its entry, and on the other
/// direction's entry when the TCP state changes (so both directions expire together once
/// the connection closes). The packet that completes a handshake moves both entries to
/// the established table, and the one that closes the connection (an RST, or the second
/// side's FIN) moves them back to the half-open table, where closed flows spend their last
/// seconds among the handshakes: the established table holds live connections only, so a
/// churn of short connections cannot make its LRU evict a long-idle live one. After a move
/// this returns true, and `entry`'s value, still valid, is the caller's to translate the
/// packet with and then delete from `entry.table` ([`finish_move`]), which spares a lookup
/// of the copy just inserted.
// Its own BPF function: the stack of each call stays within the 512-byte limit. Keys and
// values go to the helpers by reference, from the stack or the map itself, never copied.
#[inline(never)]
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn touch(entry: &Entry, key: &CtKey, packet: &Packet, dir: u8, now: u64) -> bool {
    // SAFETY: a map value pointer, valid for the run of the program.
    let value = unsafe { &mut *entry.value };
    // The clock moves a tick at a time: the packets of a busy flow within one tick leave
    // the entry's cache line clean (a line written by every packet moves between the CPUs
    // the flow's packets run on).
    if value.last_seen_ns != now {
        value.last_seen_ns = now;
    }
    if packet.proto != PROTO_TCP {
        return false;
    }
    let bits = state_bits(packet, dir, value.tcp_state);
    if value.tcp_state | bits == value.tcp_state {
        return false;
    }
    value.tcp_state |= bits;
    let state = value.tcp_state;
    let peer = peer_key(value, packet, dir);
    let peer_value = map(entry.table).get_ptr_mut(&peer);
    if let Some(other) = peer_value {
        // SAFETY: as above.
        unsafe { (*other).tcp_state |= state };
    }
    let closing = is_closing(state);
    let to = match entry.table {
        Table::HalfOpen if state & CT_TCP_ESTABLISHED != 0 && !closing => Table::Established,
        Table::Established if closing => Table::HalfOpen,
        _ => return false,
    };
    // Both entries move. The copies are made from the map values themselves (no stack
    // copy); a refused insert (an LRU table cannot be full for long) leaves the flow where
    // it is, where it keeps working until it idles out.
    if map(to).insert(key, value, 0).is_err() {
        count(Counter::ConntrackFull);
        return false;
    }
    if let Some(other) = peer_value {
        // SAFETY: as above.
        let _ = map(to).insert(&peer, unsafe { &*other }, 0);
        let _ = map(entry.table).remove(&peer);
    }
    if to == Table::Established {
        count(Counter::TcFlowsEstablished);
    }
    true
}

/// Deletes the entry `key` of a flow [`touch`] moved out of `from`, once its packet is
/// translated.
#[inline(always)]
pub fn finish_move(key: &CtKey, from: Table) {
    let _ = map(from).remove(key);
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

/// Creates both entries of a new flow, in the half-open table for TCP and the other table
/// otherwise. `orig` is the translation of the client's packets, `reply` the key and value
/// of the backend's. `reply_flags` `BPF_NOEXIST` claims the reply key (an SNAT port) only
/// if no flow of either TCP table holds it. Errors when a table refuses an entry.
#[inline(always)]
pub fn create(
    orig_key: &CtKey,
    orig: &CtValue,
    reply_key: &CtKey,
    reply: &CtValue,
    reply_flags: u64,
) -> Result<(), i32> {
    let table = if orig_key.proto == PROTO_TCP {
        if reply_flags != 0 && LB_CT_TCP.get_ptr(reply_key).is_some() {
            return Err(-17); // EEXIST: the port is held by an established flow
        }
        Table::HalfOpen
    } else {
        Table::Other
    };
    map(table).insert(reply_key, reply, reply_flags)?;
    if let Err(e) = map(table).insert(orig_key, orig, 0) {
        let _ = map(table).remove(reply_key);
        return Err(e);
    }
    Ok(())
}
