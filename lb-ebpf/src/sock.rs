//! Socket-level translation (Cilium's `bpf_sock.c`): at `connect()`/`sendmsg()` time a
//! Service frontend is replaced by a backend, so the packets themselves never carry the
//! virtual address and need no NAT; `recvmsg()` and `getpeername()` translate back, so the
//! application only ever sees the Service address it used.
//!
//! A translated UDP socket records `(cookie, backend) -> frontend` in the LRU reverse-NAT
//! map of the backend's family, as Cilium's `LB4_REVERSE_NAT_SK` does: written once per
//! connection, never deleted (a closed socket's record ages out of the LRU). A TCP socket
//! writes one only when its backend's claim in the peers map names another frontend
//! (`peer.rs`): the LRU insert was most of a `connect()`'s cost. A slot whose claim was
//! found for its frontend carries the peer mark (`lb_common::ServiceValue`), so later
//! connections through it skip the peers map too. Deleting it
//! when the socket closes took a `sock_release` program on every socket of the cgroup, as
//! costly as the record itself; socket-local storage, which the kernel frees with the
//! socket, costs two accounted allocations per connection, more than both (see
//! docs/benchmarks.md).
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use lb_common::{
    Counter, MON_HOOK_CONNECT, MON_HOOK_SENDMSG, MON_OUT_NO_ENDPOINTS, MON_OUT_NO_LOCAL_ENDPOINTS,
    MON_OUT_TRANSLATED, MON_PICK_RANDOM, MON_PICK_SOCKET_HASH, PROTO_TCP, PROTO_UDP,
    REV_NAT_DIRECT, to_v4_mapped, v4_mapped,
};

use crate::{
    affinity::Client,
    counters::count,
    family::{Family, V4, V6},
    monitor::{self, Decision},
    peer,
    xlate::{Forward, Pick, forward, frontend_is_current},
};

/// `--socket-lb host-only`: the cookie of the host's network namespace, set by the agent
/// when it loads the object; the forward hooks then translate only sockets of that
/// namespace, and pods' packets take the per-packet path at tc. 0 (`all`): every socket.
#[unsafe(no_mangle)]
static HOST_NETNS_COOKIE: u64 = 0;

/// What a forward hook decided.
pub enum Verdict {
    /// Not a Service frontend: leave the call untouched (also after a translation).
    Pass,
    /// A Service frontend without endpoints: refuse the call (`drop`: none this node may
    /// use under a Local traffic policy, though the Service has some elsewhere).
    NoBackends { drop: bool },
}

/// How a forward hook picks a backend.
#[derive(Clone, Copy)]
pub enum Hook {
    /// `connect()`: TCP and connected UDP, a random backend per connection.
    Connect,
    /// `sendmsg()` on an unconnected UDP socket: a backend per socket and Service.
    SendMsg,
}

impl Hook {
    /// The hook as the monitor names it.
    #[inline(always)]
    fn monitor_hook(self) -> u8 {
        match self {
            Self::Connect => MON_HOOK_CONNECT,
            Self::SendMsg => MON_HOOK_SENDMSG,
        }
    }

    /// How the hook picks, as the monitor names it.
    #[inline(always)]
    fn monitor_pick(self) -> u8 {
        match self {
            Self::Connect => MON_PICK_RANDOM,
            Self::SendMsg => MON_PICK_SOCKET_HASH,
        }
    }
}

/// Forward translation of an IPv4 `connect()`/`sendmsg()`.
#[inline(always)]
pub fn forward4(ctx: &SockAddrContext, hook: Hook) -> Verdict {
    if !covered(ctx) {
        return Verdict::Pass;
    }
    let sa = ctx.sock_addr;
    let Some(proto) = protocol(sa, hook) else {
        return Verdict::Pass;
    };
    // SAFETY: `sa` is the kernel's context for the whole run of the program.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    match forward_in::<V4>(ctx, ip, port, proto, hook) {
        Forward::To {
            backend: (ip, port),
            ..
        } => {
            // SAFETY: as above; these fields are writable in the forward hooks.
            unsafe {
                (*sa).user_ip4 = ip;
                (*sa).user_port = u32::from(port);
            }
            Verdict::Pass
        }
        Forward::NoBackends { drop, .. } => Verdict::NoBackends { drop },
        Forward::Pass => Verdict::Pass,
    }
}

/// Forward translation of an IPv6 `connect()`/`sendmsg()`, including IPv4 Services dialled
/// through an IPv4-mapped address (`::ffff:10.96.0.10`).
#[inline(always)]
pub fn forward6(ctx: &SockAddrContext, hook: Hook) -> Verdict {
    if !covered(ctx) {
        return Verdict::Pass;
    }
    let sa = ctx.sock_addr;
    let Some(proto) = protocol(sa, hook) else {
        return Verdict::Pass;
    };
    let ip = read_user_ip6(sa);
    // SAFETY: as in `forward4`.
    let port = unsafe { (*sa).user_port } as u16;
    let outcome = match v4_mapped(&ip) {
        Some(ip4) => match forward_in::<V4>(ctx, ip4, port, proto, hook) {
            Forward::To {
                backend: (ip, port),
                rev_nat_id,
                why,
                claimed,
            } => Forward::To {
                backend: (to_v4_mapped(ip), port),
                rev_nat_id,
                why,
                claimed,
            },
            Forward::NoBackends { drop, rev_nat_id } => Forward::NoBackends { drop, rev_nat_id },
            Forward::Pass => Forward::Pass,
        },
        None => forward_in::<V6>(ctx, ip, port, proto, hook),
    };
    match outcome {
        Forward::To {
            backend: (ip, port),
            ..
        } => {
            write_user_ip6(sa, &ip);
            // SAFETY: as in `forward4`.
            unsafe { (*sa).user_port = u32::from(port) };
            Verdict::Pass
        }
        Forward::NoBackends { drop, .. } => Verdict::NoBackends { drop },
        Forward::Pass => Verdict::Pass,
    }
}

/// Reverse translation of an IPv4 `recvmsg()`/`getpeername()`: a backend's address becomes
/// the frontend the socket dialled.
pub fn reverse4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in `forward4`.
    let (ip, port, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    if let Some((ip, port)) = reverse_in::<V4>(ctx, ip, port, proto) {
        // SAFETY: writable in recvmsg and getpeername hooks.
        unsafe {
            (*sa).user_ip4 = ip;
            (*sa).user_port = u32::from(port);
        }
    }
}

/// Reverse translation of an IPv6 `recvmsg()`/`getpeername()`.
pub fn reverse6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let ip = read_user_ip6(sa);
    // SAFETY: as in `forward4`.
    let (port, proto) = unsafe { ((*sa).user_port as u16, (*sa).protocol as u8) };
    let frontend = match v4_mapped(&ip) {
        Some(ip4) => {
            reverse_in::<V4>(ctx, ip4, port, proto).map(|(ip, port)| (to_v4_mapped(ip), port))
        }
        None => reverse_in::<V6>(ctx, ip, port, proto),
    };
    if let Some((ip, port)) = frontend {
        write_user_ip6(sa, &ip);
        // SAFETY: as in `reverse4`.
        unsafe { (*sa).user_port = u32::from(port) };
    }
}

/// Forward lookup in family `F`; on a hit, records the reverse translation.
#[inline(always)]
fn forward_in<F: Family>(
    ctx: &SockAddrContext,
    ip: F::Addr,
    port: u16,
    proto: u8,
    hook: Hook,
) -> Forward<(F::Addr, u16)> {
    match forward(
        ctx,
        F::services(),
        F::backends(),
        F::find_frontend(ip, port, proto),
        pick(ctx, hook),
        // The client of session affinity is the socket's network namespace: a pod (as
        // kube-proxy sees a pod by its one address), or the node's own processes.
        // SAFETY: helper on the program's own context.
        || Client::Netns(unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }),
        // A TCP socket's record serves only getpeername(): none is needed while the
        // backend's claim names this frontend (see `peer`).
        |backend, rev_nat_id| {
            let backend = F::backend_addr(backend);
            matches!(hook, Hook::Connect)
                && proto == PROTO_TCP
                && peer::claimed_for(
                    (F::wire(backend.0), backend.1),
                    (F::wire(ip), port),
                    rev_nat_id,
                )
        },
    ) {
        Forward::To {
            backend,
            rev_nat_id,
            why,
            claimed,
        } => {
            count(Counter::SockTranslated);
            let backend = F::backend_addr(&backend);
            let decision = Decision {
                outcome: MON_OUT_TRANSLATED,
                pick: Decision::pick_kind(why.slot, hook.monitor_pick()),
                slot: why.slot,
                count: why.count,
                svc_flags: why.flags,
                rev_nat_id,
                backend: F::wire(backend.0),
                backend_port: backend.1,
            };
            monitor::sock(
                ctx,
                hook.monitor_hook(),
                proto,
                &(F::wire(ip), port),
                &decision,
            );
            let record = match hook {
                Hook::Connect if proto == PROTO_TCP => !claimed,
                Hook::Connect => true,
                // An unconnected UDP socket runs this for every datagram: the record is
                // written only when it changes (a lookup is far cheaper than an LRU update).
                Hook::SendMsg => F::recall(cookie(ctx), backend) != Some((ip, port, rev_nat_id)),
            };
            if record {
                F::remember(cookie(ctx), backend, (ip, port), rev_nat_id);
            }
            Forward::To {
                backend,
                rev_nat_id,
                why,
                claimed,
            }
        }
        Forward::NoBackends { drop, rev_nat_id } => {
            count(Counter::NoEndpoints);
            let outcome = if drop {
                MON_OUT_NO_LOCAL_ENDPOINTS
            } else {
                MON_OUT_NO_ENDPOINTS
            };
            let decision = Decision::refused(outcome, rev_nat_id, 0);
            monitor::sock(
                ctx,
                hook.monitor_hook(),
                proto,
                &(F::wire(ip), port),
                &decision,
            );
            Forward::NoBackends { drop, rev_nat_id }
        }
        Forward::Pass => {
            if matches!(hook, Hook::Connect) && proto == PROTO_TCP {
                direct_connect::<F>(ctx, ip, port);
            }
            Forward::Pass
        }
    }
}

/// A TCP `connect()` to an address that is no frontend: if it dials a backend some
/// frontend claimed, it records that `getpeername()` must leave it alone (see
/// `lb_common::PeerKey`).
#[inline(always)]
fn direct_connect<F: Family>(ctx: &SockAddrContext, ip: F::Addr, port: u16) {
    if peer::is_claimed((F::wire(ip), port)) {
        F::remember(cookie(ctx), (ip, port), (ip, port), REV_NAT_DIRECT);
    }
}

/// Reverse lookup in family `F`: the frontend this socket dialled to reach `ip:port`, if
/// that frontend still exists as it was.
#[inline(always)]
fn reverse_in<F: Family>(
    ctx: &SockAddrContext,
    ip: F::Addr,
    port: u16,
    proto: u8,
) -> Option<(F::Addr, u16)> {
    let (address, port, rev_nat_id) = match F::recall(cookie(ctx), (ip, port)) {
        Some((_, _, REV_NAT_DIRECT)) => return None,
        Some(record) => record,
        // A TCP socket without a record dialled the frontend that claimed its backend
        // (if these hooks cover it at all).
        None if proto == PROTO_TCP && covered(ctx) => {
            let (address, port, id) = peer::claim_of((F::wire(ip), port))?;
            (F::from_wire(&address), port, id)
        }
        None => return None,
    };
    frontend_is_current(
        F::services(),
        F::find_frontend(address, port, proto),
        rev_nat_id,
    )
    .then_some((address, port))
}

/// The protocol of the call, if this hook translates it: TCP and UDP at connect, only UDP
/// at sendmsg (a TCP sendmsg with an address is a TFO connect, which connect handles).
#[inline(always)]
fn protocol(sa: *mut bpf_sock_addr, hook: Hook) -> Option<u8> {
    // SAFETY: as in `forward4`.
    let proto = unsafe { (*sa).protocol } as u8;
    match (hook, proto) {
        (Hook::Connect, PROTO_TCP | PROTO_UDP) | (Hook::SendMsg, PROTO_UDP) => Some(proto),
        _ => None,
    }
}

#[inline(always)]
fn pick(ctx: &SockAddrContext, hook: Hook) -> Pick {
    match hook {
        Hook::Connect => Pick::Random,
        // Fold the 64-bit cookie; the low bits alone are sequential.
        Hook::SendMsg => {
            let c = cookie(ctx);
            Pick::Hash(((c >> 32) as u32 ^ c as u32).wrapping_mul(0x9e37_79b1))
        }
    }
}

/// Whether this socket is one the socket hooks translate (see [`HOST_NETNS_COOKIE`]).
#[inline(always)]
fn covered(ctx: &SockAddrContext) -> bool {
    // SAFETY: a read of a global the loader may have set; volatile so it is not folded.
    let host = unsafe { read_volatile(&raw const HOST_NETNS_COOKIE) };
    // SAFETY: helper on the program's own context.
    host == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == host
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// `user_ip6`, read one word at a time (the verifier rejects a wider access).
#[inline(always)]
fn read_user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: in-bounds reads of the context.
    unsafe {
        let p = addr_of!((*sa).user_ip6);
        [
            read_volatile(&(*p)[0]),
            read_volatile(&(*p)[1]),
            read_volatile(&(*p)[2]),
            read_volatile(&(*p)[3]),
        ]
    }
}

#[inline(always)]
fn write_user_ip6(sa: *mut bpf_sock_addr, ip: &[u32; 4]) {
    // SAFETY: in-bounds writes of the context, one word at a time.
    unsafe {
        let p = addr_of_mut!((*sa).user_ip6);
        write_volatile(&mut (*p)[0], ip[0]);
        write_volatile(&mut (*p)[1], ip[1]);
        write_volatile(&mut (*p)[2], ip[2]);
        write_volatile(&mut (*p)[3], ip[3]);
    }
}
