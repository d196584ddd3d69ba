//! The tc datapath for traffic from outside the node (after Cilium's `nodeport.h`, IPv4,
//! without the XDP and DSR variants): on the external devices' ingress, a packet to a
//! NodePort on a node address, to an external IP or to a LoadBalancer IP is DNATed to a
//! backend (SNATed too when the backend is on another node under
//! `externalTrafficPolicy: Cluster`), and the flow is tracked in `LB4_CT`; on their egress,
//! the backend's replies get the frontend the client dialled as their source. The kernel
//! routes the translated packets.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32, programs::TcContext};
use aya_log_ebpf::warn;
use lb_common::{
    BE_F_REMOTE, Backend4, CT_DIR_ORIG, CT_DIR_REPLY, CT_F_SNAT, Ct4Value, SNAT_PORT_COUNT,
    SNAT_PORT_MIN, SVC_F_LOCAL, SVC_F_TC_KINDS, Service4Key, ServiceKey as _, ServiceValue,
};

use crate::{
    conntrack, fib,
    maps::{LB4_BACKENDS, LB4_CT, LB4_DEVICES, LB4_NODE_ADDRS, LB4_SERVICES},
    nat::{Packet, RewriteError},
    reject,
};

/// `TC_ACT_OK` (linux/pkt_cls.h): let the packet go on (translated or not). Spelled out
/// because the bindings' type of the constant differs between targets.
pub const PASS: i32 = 0;
/// `TC_ACT_SHOT`: drop the packet.
const SHOT: i32 = 2;

/// How many random SNAT ports are tried before a new flow is dropped.
const SNAT_TRIES: u32 = 16;

/// What went wrong with a packet the datapath is responsible for.
pub enum Error {
    /// A rewrite helper failed half-way: the packet must be dropped.
    Rewrite,
    /// The conntrack map refused a new entry.
    Conntrack(i32),
    /// No free SNAT port for a flow to a backend on another node.
    NoSnatPort,
    /// The frontend has no backend that may take the flow: none at all, or, when `local`
    /// (`externalTrafficPolicy: Local`), none on this node.
    NoBackends { local: bool },
}

impl From<RewriteError> for Error {
    fn from(_: RewriteError) -> Self {
        Self::Rewrite
    }
}

/// Maps an outcome to the tc action, logging what is not a plain drop by policy.
#[inline(always)]
pub fn action(ctx: &TcContext, result: Result<i32, Error>) -> i32 {
    match result {
        Ok(action) => action,
        // kube-proxy drops traffic to an eTP=Local frontend without local endpoints (it
        // rejects when the Service has none at all, which a Local master, counting only
        // this node's endpoints, cannot tell apart yet)...
        Err(Error::NoBackends { local: true }) => SHOT,
        // ...and rejects traffic to a Service without endpoints: ICMP port unreachable, so
        // the client fails at once instead of after its timeout.
        Err(Error::NoBackends { local: false }) => {
            reject::port_unreachable(ctx).unwrap_or_else(|RewriteError| {
                warn!(ctx, "lb tc: rejecting a packet failed; dropped");
                SHOT
            })
        }
        Err(Error::Rewrite) => {
            warn!(ctx, "lb tc: rewriting a packet failed; dropped");
            SHOT
        }
        Err(Error::Conntrack(e)) => {
            warn!(ctx, "lb tc: conntrack insert failed ({}); dropped", e);
            SHOT
        }
        Err(Error::NoSnatPort) => {
            warn!(ctx, "lb tc: no free SNAT port; dropped");
            SHOT
        }
    }
}

/// Ingress of an external device: replies of SNATed flows back to their client, and
/// packets to a frontend on to a backend.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> Result<i32, Error> {
    let Some(mut packet) = Packet::parse(ctx) else {
        return Ok(PASS);
    };
    let now = conntrack::now();
    let reply_key = conntrack::key(&packet, CT_DIR_REPLY);
    if let Some(entry) = conntrack::lookup(&reply_key, now) {
        // SAFETY: a map value pointer, valid for the run of the program.
        let value = unsafe { *entry };
        if value.flags & CT_F_SNAT != 0 {
            conntrack::touch(entry, &packet, CT_DIR_REPLY, now);
            packet.set_dst(ctx, value.snat_addr, value.snat_port)?;
            packet.set_src(ctx, value.nat_addr, value.nat_port)?;
            // Its source is now a node address: the stack would drop it as a martian.
            return Ok(fib::redirect(ctx, &packet)?);
        }
    }
    let orig_key = conntrack::key(&packet, CT_DIR_ORIG);
    if let Some(entry) = conntrack::lookup(&orig_key, now) {
        // SAFETY: as above.
        let value = unsafe { *entry };
        if backend_is_current(&value)
            && !(conntrack::is_syn(&packet) && conntrack::is_closing(value.tcp_state))
        {
            conntrack::touch(entry, &packet, CT_DIR_ORIG, now);
            return translate(ctx, &mut packet, &value);
        }
        // The backend is gone (or a new connection reuses a closed one's ports): the flow
        // starts again with a backend of today.
        let _ = LB4_CT.remove(orig_key);
    }
    let Some((key, master)) = frontend(&packet) else {
        return Ok(PASS);
    };
    new_flow(ctx, &mut packet, &key, &master, now)
}

/// Egress of an external device: a backend's reply of a tracked flow leaves with the
/// frontend the client dialled as its source.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> Result<i32, Error> {
    let Some(mut packet) = Packet::parse(ctx) else {
        return Ok(PASS);
    };
    let now = conntrack::now();
    let key = conntrack::key(&packet, CT_DIR_REPLY);
    let Some(entry) = conntrack::lookup(&key, now) else {
        return Ok(PASS);
    };
    // SAFETY: a map value pointer, valid for the run of the program.
    let value = unsafe { *entry };
    if value.flags & CT_F_SNAT != 0 {
        // Replies of SNATed flows come in through ingress, never out here.
        return Ok(PASS);
    }
    conntrack::touch(entry, &packet, CT_DIR_REPLY, now);
    packet.set_src(ctx, value.nat_addr, value.nat_port)?;
    Ok(PASS)
}

/// The master entry of the frontend a packet from outside is addressed to: a NodePort when
/// the destination is a node address, else an external or LoadBalancer IP (a ClusterIP is
/// not served to clients outside the node).
#[inline(always)]
fn frontend(packet: &Packet) -> Option<(Service4Key, ServiceValue)> {
    // SAFETY: the value is only tested for presence.
    let key = if unsafe { LB4_NODE_ADDRS.get(packet.daddr) }.is_some() {
        Service4Key::node_port(packet.dport, packet.proto)
    } else {
        Service4Key::new(packet.daddr, packet.dport, packet.proto, 0)
    };
    // SAFETY: copied out at once.
    let master = unsafe { LB4_SERVICES.get(key) }.copied()?;
    (master.flags & SVC_F_TC_KINDS != 0).then_some((key, master))
}

/// Picks a backend for a new flow, records the flow and translates its first packet.
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    packet: &mut Packet,
    key: &Service4Key,
    master: &ServiceValue,
    now: u64,
) -> Result<i32, Error> {
    if master.count == 0 {
        return Err(Error::NoBackends {
            local: master.flags & SVC_F_LOCAL != 0,
        });
    }
    // SAFETY: helper without arguments.
    let seed = unsafe { bpf_get_prandom_u32() };
    let slot = (seed % u32::from(master.count)) as u16 + 1;
    // SAFETY: copied out at once.
    let Some(entry) = unsafe { LB4_SERVICES.get(key.with_slot(slot)) }.copied() else {
        warn!(
            ctx,
            "lb tc: frontend has count {} but slot {} is missing", master.count, slot
        );
        return Ok(PASS);
    };
    // SAFETY: copied out at once.
    let Some(backend) = unsafe { LB4_BACKENDS.get(entry.backend_id) }.copied() else {
        return Ok(PASS);
    };
    let mut orig = Ct4Value {
        nat_addr: backend.address,
        snat_addr: 0,
        nat_port: backend.port,
        snat_port: 0,
        rev_nat_id: master.rev_nat_id,
        flags: 0,
        tcp_state: 0,
        backend_id: entry.backend_id,
        pad: 0,
        created_ns: now,
        last_seen_ns: now,
    };
    // The reply restores the frontend as the client dialled it (a NodePort: this node's
    // address it was sent to).
    let mut reply = Ct4Value {
        nat_addr: packet.daddr,
        nat_port: packet.dport,
        ..orig
    };
    let snat = needs_snat(&backend, master);
    let mut reply_key = conntrack::key(packet, CT_DIR_REPLY);
    reply_key.saddr = backend.address;
    reply_key.sport = backend.port;
    reply_key.daddr = packet.saddr;
    reply_key.dport = packet.sport;
    let orig_key = conntrack::key(packet, CT_DIR_ORIG);
    if snat {
        let snat_addr = snat_address(ctx, packet);
        orig.flags = CT_F_SNAT;
        orig.snat_addr = snat_addr;
        reply.flags = CT_F_SNAT;
        reply.snat_addr = packet.saddr;
        reply.snat_port = packet.sport;
        reply_key.daddr = snat_addr;
        let mut created = false;
        for _ in 0..SNAT_TRIES {
            // SAFETY: helper without arguments.
            let r = unsafe { bpf_get_prandom_u32() };
            let port = (SNAT_PORT_MIN + (r % u32::from(SNAT_PORT_COUNT)) as u16).to_be();
            reply_key.dport = port;
            orig.snat_port = port;
            match conntrack::create(&orig_key, &orig, &reply_key, &reply, u64::from(BPF_NOEXIST)) {
                Ok(()) => {
                    created = true;
                    break;
                }
                Err(_) => continue,
            }
        }
        if !created {
            return Err(Error::NoSnatPort);
        }
    } else {
        conntrack::create(&orig_key, &orig, &reply_key, &reply, 0).map_err(Error::Conntrack)?;
    }
    if let Some(entry) = LB4_CT.get_ptr_mut(orig_key) {
        conntrack::touch(entry, packet, CT_DIR_ORIG, now);
    }
    translate(ctx, packet, &orig)
}

/// Applies the original direction's translation of a tracked flow; an SNATed packet is
/// redirected to its next hop (its source is a node address now), the others are routed
/// by the kernel.
#[inline(always)]
fn translate(ctx: &TcContext, packet: &mut Packet, value: &Ct4Value) -> Result<i32, Error> {
    packet.set_dst(ctx, value.nat_addr, value.nat_port)?;
    if value.flags & CT_F_SNAT != 0 {
        packet.set_src(ctx, value.snat_addr, value.snat_port)?;
        return Ok(fib::redirect(ctx, packet)?);
    }
    Ok(PASS)
}

/// Whether the flow's backend still exists as it was chosen: a removed backend's flows
/// pick a new one (for UDP what kube-proxy's conntrack flush does; a TCP flow gets a reset
/// from the new backend, which is the outcome the client would get anyway).
#[inline(always)]
fn backend_is_current(value: &Ct4Value) -> bool {
    // SAFETY: copied out at once.
    unsafe { LB4_BACKENDS.get(value.backend_id) }
        .is_some_and(|b| b.address == value.nat_addr && b.port == value.nat_port)
}

/// A backend on another node needs SNAT under `externalTrafficPolicy: Cluster` (under
/// Local there is none, and the client address is kept).
#[inline(always)]
fn needs_snat(backend: &Backend4, master: &ServiceValue) -> bool {
    backend.flags & BE_F_REMOTE != 0 && master.flags & SVC_F_LOCAL == 0
}

/// The SNAT source: the node address the packet was sent to, else the address of the
/// device it arrived on.
#[inline(always)]
fn snat_address(ctx: &TcContext, packet: &Packet) -> u32 {
    // SAFETY: presence only.
    if unsafe { LB4_NODE_ADDRS.get(packet.daddr) }.is_some() {
        return packet.daddr;
    }
    // SAFETY: the skb context is valid for the run of the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: copied out at once.
    unsafe { LB4_DEVICES.get(ifindex) }
        .copied()
        .unwrap_or(packet.daddr)
}
