//! The tc datapath (after Cilium's `nodeport.h` and `bpf_lxc.c`, without the DSR variant),
//! for IPv4 and IPv6 alike:
//! - on the external devices' ingress, a packet from outside the node to a NodePort on a
//!   node address, to an external IP or to a LoadBalancer IP is DNATed to a backend
//!   (SNATed too when the backend is on another node under `externalTrafficPolicy:
//!   Cluster`);
//! - on the pod-facing devices' ingress (with `--socket-lb host-only` or `off`), a packet
//!   from a pod to any frontend, ClusterIPs included, is DNATed to a backend: the per-packet
//!   path for pods the socket hooks do not cover;
//! - on the egress of both, the backend's replies get the frontend the client dialled as
//!   their source.
//!
//! Every flow is tracked in the conntrack tables (`conntrack.rs`): only a TCP SYN starts a
//! TCP flow, and it counts as established once its client completes the handshake; the
//! kernel routes the translated packets.
//!
//! The ingress path is written over [`Frame`], so the XDP program of the external devices
//! (`xdp.rs`, `--nodeport-acceleration`) runs this same code on the same maps; what XDP
//! leaves to tc ends in [`Error::LeftToTc`].
use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::lpm_trie::Key, programs::TcContext};
use aya_log_ebpf::warn;
use lb_common::{
    BE_F_REMOTE, CT_DIR_ORIG, CT_DIR_REPLY, CT_F_SNAT, Counter, CtKey, CtValue, FrontendId,
    MON_HOOK_TC_POD, MON_OUT_FIREWALLED, MON_OUT_NO_ENDPOINTS, MON_OUT_NO_LOCAL_ENDPOINTS,
    MON_OUT_TRANSLATED, MON_PICK_RANDOM, PROTO_TCP, SNAT_PORT_COUNT, SNAT_PORT_MIN, SVC_F_LOCAL,
    SVC_F_NO_LOCAL, SVC_F_SOURCE_RANGES, SourceRange, is_snat_port, scale_draw,
};

use crate::{
    affinity::Client,
    conntrack,
    counters::count,
    family::{Family, V4, V6},
    maps::{LB_BACKENDS_REMOVED, LB_SOURCE_RANGES, NEW_FLOW, NewFlow},
    monitor::{self, Decision},
    nat::{Frame, Packet, RewriteError, same_addr},
    reject,
    xlate::{self, Pick, Picked, Scope},
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
    Conntrack,
    /// No free SNAT port for a flow to a backend on another node.
    NoSnatPort,
    /// The source is outside the frontend's `loadBalancerSourceRanges`.
    Firewalled,
    /// The frontend has no backend that may take the flow: none at all, or, when `local`,
    /// none on this node under a Local traffic policy while there are some elsewhere.
    NoBackends { local: bool },
    /// A TCP packet to a frontend that is no SYN and belongs to no tracked flow.
    OutOfFlow,
    /// Something the hook does not do itself (XDP: SNATed packets, rejects): the packet
    /// goes on untranslated to tc ingress, which does it with the same maps.
    LeftToTc,
}

/// What became of a packet the datapath let go on.
pub enum Outcome {
    /// Not for the datapath (or nothing to change): it goes on as it is.
    Untouched,
    /// Translated: the kernel routes it.
    Translated,
    /// Translated and redirected to its next hop: the helper's action.
    Redirected(i32),
}

impl From<RewriteError> for Error {
    fn from(_: RewriteError) -> Self {
        Self::Rewrite
    }
}

/// Maps an outcome to the tc action, logging what is not a plain drop by policy.
#[inline(always)]
pub fn action(ctx: &TcContext, result: Result<Outcome, Error>) -> i32 {
    match result {
        Ok(Outcome::Untouched | Outcome::Translated) => PASS,
        Ok(Outcome::Redirected(action)) => action,
        // Never at tc itself.
        Err(Error::LeftToTc) => PASS,
        // kube-proxy rejects traffic to a Service without endpoints: ICMP port unreachable,
        // so the client fails at once instead of after its timeout (at most
        // `lb_common::ICMP_PER_SEC` replies per second and CPU, as the kernel limits its own).
        Err(Error::NoBackends { local: false }) => {
            count(Counter::NoEndpoints);
            if !reject::within_rate() {
                count(Counter::IcmpRateLimited);
                return SHOT;
            }
            reject::port_unreachable(ctx).unwrap_or_else(|RewriteError| {
                warn!(ctx, "lb tc: rejecting a packet failed; dropped");
                SHOT
            })
        }
        Err(error) => {
            dropped(ctx, &error);
            SHOT
        }
    }
}

/// Counts why a packet is dropped (a failed rewrite is logged too), at tc or XDP.
#[inline(always)]
pub fn dropped<C: Frame>(ctx: &C, error: &Error) {
    let counter = match error {
        // kube-proxy drops traffic to a Local-policy frontend without local endpoints
        // while the Service has endpoints elsewhere.
        Error::NoBackends { .. } => Counter::NoEndpoints,
        // kube-proxy drops conntrack's INVALID packets, silently.
        Error::OutOfFlow => Counter::TcpOutOfFlowDropped,
        Error::Rewrite => {
            warn!(ctx, "lb: rewriting a packet failed; dropped");
            Counter::RewriteFailed
        }
        // Counted, not logged: a full table is what a flood looks like, and a log line per
        // packet would be the flood's second victim.
        Error::Conntrack => Counter::ConntrackFull,
        // kube-proxy's firewall chain drops, silently.
        Error::Firewalled => Counter::Firewalled,
        Error::NoSnatPort => Counter::SnatPortsExhausted,
        Error::LeftToTc => return,
    };
    count(counter);
}

/// Where the packets a program sees come from, which decides what they may reach.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From outside the node, on an external device: NodePorts, external and LoadBalancer
    /// IPs, in their external scope.
    Outside,
    /// From a pod of this node: every frontend, ClusterIPs included, in the internal scope.
    Pod,
}

/// Ingress: replies of SNATed flows back to their client, packets of tracked flows on to
/// their backend, and the first packet of a flow to a frontend to a backend chosen now.
#[inline(always)]
pub fn ingress<C: Frame>(ctx: &C, origin: Origin) -> Result<Outcome, Error> {
    let Some(mut packet) = Packet::parse(ctx) else {
        return Ok(Outcome::Untouched);
    };
    let now = conntrack::now();
    // Replies to SNATed flows: from backends on other nodes (outside), or from a pod to
    // the hairpin address (a pod that reached itself through a Service). They come back
    // to a port of the SNAT range, which spares every other packet (a client's to a
    // NodePort, one XDP translated) the lookups.
    if (origin == Origin::Outside || is_hairpin(&packet))
        && is_snat_port(u16::from_be(packet.dport))
        && let Some(action) = snat_reply(ctx, &mut packet, now)?
    {
        return Ok(action);
    }
    let was_tracked = match tracked(ctx, &mut packet, now)? {
        Tracked::Translated(action) => return Ok(action),
        Tracked::BackendGone => true,
        Tracked::No => false,
    };
    let flow = if packet.v6 {
        new_flow::<V6, C>(ctx, &packet, origin, was_tracked)?
    } else {
        new_flow::<V4, C>(ctx, &packet, origin, was_tracked)?
    };
    match flow {
        // SAFETY: this CPU's scratch slot, ours until the program returns.
        Some(flow) => start_flow(ctx, &mut packet, unsafe { &mut *flow }),
        None => Ok(Outcome::Untouched),
    }
}

/// What [`tracked`] found for a packet.
enum Tracked {
    /// The packet belongs to a tracked flow and was translated: this is what became of it.
    Translated(Outcome),
    /// It belonged to a flow whose backend is gone (or whose connection closed while a new
    /// one reuses its ports): the flow starts again, whatever the packet.
    BackendGone,
    /// It belongs to no tracked flow.
    No,
}

/// A packet of a tracked flow goes on to the flow's backend.
// Its own BPF function: the stack of each call stays within the 512-byte limit.
#[inline(never)]
fn tracked<C: Frame>(ctx: &C, packet: &mut Packet, now: u64) -> Result<Tracked, Error> {
    let orig_key = conntrack::key(packet, CT_DIR_ORIG);
    let Some(entry) = conntrack::lookup(&orig_key, packet, now) else {
        return Ok(Tracked::No);
    };
    // The entry is read in place (SAFETY: a map value pointer, valid for the run of the
    // program), not copied: the stack is tight.
    let reusable = {
        let value = unsafe { &*entry.value };
        (!backend_may_be_gone(value) || backend_is_current(packet, value))
            && !(conntrack::is_syn(packet) && conntrack::is_closing(value.tcp_state))
    };
    if !reusable {
        conntrack::remove(&orig_key, entry.table);
        return Ok(Tracked::BackendGone);
    }
    // SAFETY: as above.
    if !C::SNAT && unsafe { (*entry.value).flags } & CT_F_SNAT != 0 {
        return Err(Error::LeftToTc);
    }
    let moved = conntrack::touch(&entry, &orig_key, packet, CT_DIR_ORIG, now);
    // SAFETY: as above (a moved flow's old value stays until `finish_move`).
    let outcome = translate(ctx, packet, unsafe { &*entry.value });
    if moved {
        conntrack::finish_move(&orig_key, entry.table);
    }
    outcome.map(Tracked::Translated)
}

/// A backend's reply to a flow SNATed to this node goes back to the client, from the
/// frontend it dialled; `None` when the packet is not one.
// Its own BPF function: the stack of each call stays within the 512-byte limit.
#[inline(never)]
fn snat_reply<C: Frame>(ctx: &C, packet: &mut Packet, now: u64) -> Result<Option<Outcome>, Error> {
    let reply_key = conntrack::key(packet, CT_DIR_REPLY);
    let Some(entry) = conntrack::lookup(&reply_key, packet, now) else {
        return Ok(None);
    };
    // SAFETY: a map value pointer, valid for the run of the program.
    if unsafe { (*entry.value).flags } & CT_F_SNAT == 0 {
        return Ok(None);
    }
    if !C::SNAT {
        return Err(Error::LeftToTc);
    }
    // A reply never completes a handshake, but may close the connection (its move is
    // finished once the packet is translated).
    let moved = conntrack::touch(&entry, &reply_key, packet, CT_DIR_REPLY, now);
    // SAFETY: as above; read in place, as the stack is tight.
    let value = unsafe { &*entry.value };
    packet.set_dst(ctx, value.snat_addr, value.snat_port)?;
    packet.set_src(ctx, value.nat_addr, value.nat_port)?;
    if moved {
        conntrack::finish_move(&reply_key, entry.table);
    }
    // Its source is now a node address: the stack would drop it as a martian.
    Ok(Some(Outcome::Redirected(ctx.redirect(packet)?)))
}

/// Egress: a backend's reply of a tracked flow leaves with the frontend the client dialled
/// as its source (towards a client outside the node, or a pod of this node).
#[inline(always)]
pub fn egress(ctx: &TcContext) -> Result<Outcome, Error> {
    let Some(mut packet) = Packet::parse(ctx) else {
        return Ok(Outcome::Untouched);
    };
    let now = conntrack::now();
    let key = conntrack::key(&packet, CT_DIR_REPLY);
    let Some(entry) = conntrack::lookup(&key, &packet, now) else {
        return Ok(Outcome::Untouched);
    };
    // SAFETY: a map value pointer, valid for the run of the program.
    if unsafe { (*entry.value).flags } & CT_F_SNAT != 0 {
        // Replies of SNATed flows come in through ingress, never out here.
        return Ok(Outcome::Untouched);
    }
    // A reply never completes a handshake, but may close the connection.
    let moved = conntrack::touch(&entry, &key, &packet, CT_DIR_REPLY, now);
    // SAFETY: as above.
    let (address, port) = unsafe { ((*entry.value).nat_addr, (*entry.value).nat_port) };
    packet.set_src(ctx, address, port)?;
    if moved {
        conntrack::finish_move(&key, entry.table);
    }
    Ok(Outcome::Translated)
}

/// The first packet of a flow: if it is addressed to a frontend it may reach, picks a
/// backend as the socket path would and returns the flow's translation, built in the
/// per-CPU scratch slot; `None` when the packet is for no frontend. Only a SYN starts a
/// TCP flow, unless the packet's flow was tracked until its backend went away
/// (`was_tracked`): it starts again, so the client hears from a live backend (a reset).
// Its own BPF function: the stack of each call stays within the 512-byte limit.
#[inline(never)]
fn new_flow<F: Family, C: Frame>(
    ctx: &C,
    packet: &Packet,
    origin: Origin,
    was_tracked: bool,
) -> Result<Option<*mut NewFlow>, Error> {
    let scope = match origin {
        Origin::Outside => Scope::External,
        Origin::Pod => Scope::Internal,
    };
    let Some((_, master)) =
        F::find_frontend(F::from_wire(&packet.daddr), packet.dport, packet.proto)
            .map(|(key, master)| xlate::in_scope(F::services(), key, master, scope))
    else {
        return Ok(None);
    };
    if C::SNAT && origin == Origin::Outside && xdp_on() && translated_already(packet) {
        return Ok(None);
    }
    // A ClusterIP reached from outside the node (a route to the Service CIDR through this
    // node) is served as kube-proxy serves it, like an external IP under
    // `externalTrafficPolicy: Cluster`: SNATed only to reach a backend on another node
    // (kube-proxy masquerades it only with a local-traffic detector or --masquerade-all).
    if master.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(master.rev_nat_id, &packet.saddr)
    {
        let decision = Decision::refused(MON_OUT_FIREWALLED, master.rev_nat_id, master.flags);
        monitor_tc::<C>(packet, origin, &decision);
        return Err(Error::Firewalled);
    }
    if master.count == 0 {
        let local = master.flags & SVC_F_NO_LOCAL != 0;
        // The reject is a new packet: tc ingress answers it (and tells the monitor).
        if !local && !C::REJECT {
            return Err(Error::LeftToTc);
        }
        let outcome = if local {
            MON_OUT_NO_LOCAL_ENDPOINTS
        } else {
            MON_OUT_NO_ENDPOINTS
        };
        let decision = Decision::refused(outcome, master.rev_nat_id, master.flags);
        monitor_tc::<C>(packet, origin, &decision);
        return Err(Error::NoBackends { local });
    }
    if packet.proto == PROTO_TCP && !was_tracked && !conntrack::is_syn(packet) {
        return Err(Error::OutOfFlow);
    }
    // The client of session affinity is the packet's source: a client outside the node,
    // or a pod by its address.
    let picked = xlate::pick_for(ctx, F::backends(), &master, Pick::Random, || {
        Client::Addr(packet.saddr)
    });
    let Some(Picked {
        id: backend_id,
        backend,
        slot,
        ..
    }) = picked
    else {
        return Ok(None);
    };
    let (address, port) = F::backend_addr(&backend);
    let decision = Decision {
        outcome: MON_OUT_TRANSLATED,
        pick: Decision::pick_kind(slot, MON_PICK_RANDOM),
        slot,
        count: master.count,
        svc_flags: master.flags,
        rev_nat_id: master.rev_nat_id,
        backend: F::wire(address),
        backend_port: port,
    };
    monitor_tc::<C>(packet, origin, &decision);
    // A backend on another node needs SNAT under `externalTrafficPolicy: Cluster` so its
    // replies come back through this node (under Local there is none, and the client
    // address is kept). A pod's address is routable in the cluster: its flows need none,
    // except when the pod reached itself (hairpin): it would answer itself directly.
    let hairpin = origin == Origin::Pod && same_addr(&F::wire(address), &packet.saddr);
    let snat = hairpin
        || (origin == Origin::Outside
            && F::backend_flags(&backend) & BE_F_REMOTE != 0
            && master.flags & SVC_F_LOCAL == 0);
    let Some(slot) = NEW_FLOW.get_ptr_mut(0) else {
        return Ok(None);
    };
    // SAFETY: this CPU's scratch slot, ours until the program returns.
    let orig = unsafe { &mut (*slot).orig };
    orig.nat_addr = F::wire(address);
    orig.snat_addr = if hairpin {
        F::hairpin()
    } else if snat {
        snat_address::<F, C>(ctx, packet)
    } else {
        [0; 4]
    };
    orig.nat_port = port;
    orig.snat_port = 0;
    orig.rev_nat_id = master.rev_nat_id;
    orig.flags = if snat { CT_F_SNAT } else { 0 };
    // The first packet's state, as `conntrack::touch` would record it on both entries.
    orig.tcp_state = conntrack::first_state(packet);
    orig.backend_id = backend_id;
    orig.pad = [0; 2];
    // Read again, not passed in: BPF functions take at most five arguments.
    let now = conntrack::now();
    orig.created_ns = now;
    orig.last_seen_ns = now;
    Ok(Some(slot))
}

/// Records a new flow whose original-direction translation is `flow.orig` (without its
/// SNAT port yet) and translates its first packet.
// Its own BPF function: the stack of each call stays within the 512-byte limit.
#[inline(never)]
fn start_flow<C: Frame>(
    ctx: &C,
    packet: &mut Packet,
    flow: &mut NewFlow,
) -> Result<Outcome, Error> {
    flow.orig_key = conntrack::key(packet, CT_DIR_ORIG);
    // The reply restores the frontend as the client dialled it (a NodePort: this node's
    // address it was sent to).
    flow.reply = flow.orig;
    flow.reply.nat_addr = packet.daddr;
    flow.reply.nat_port = packet.dport;
    flow.reply_key = conntrack::key(packet, CT_DIR_REPLY);
    flow.reply_key.saddr = flow.orig.nat_addr;
    flow.reply_key.sport = flow.orig.nat_port;
    flow.reply_key.daddr = packet.saddr;
    flow.reply_key.dport = packet.sport;
    if flow.orig.flags & CT_F_SNAT != 0 {
        flow.reply.snat_addr = packet.saddr;
        flow.reply.snat_port = packet.sport;
        flow.reply_key.daddr = flow.orig.snat_addr;
        let mut created = false;
        for _ in 0..SNAT_TRIES {
            let offset = scale_draw(xlate::draw(), u32::from(SNAT_PORT_COUNT)) as u16;
            let port = (SNAT_PORT_MIN + offset).to_be();
            flow.reply_key.dport = port;
            flow.orig.snat_port = port;
            let flags = u64::from(BPF_NOEXIST);
            if conntrack::create(
                &flow.orig_key,
                &flow.orig,
                &flow.reply_key,
                &flow.reply,
                flags,
            )
            .is_ok()
            {
                created = true;
                break;
            }
        }
        if !created {
            return Err(Error::NoSnatPort);
        }
    } else {
        conntrack::create(&flow.orig_key, &flow.orig, &flow.reply_key, &flow.reply, 0)
            .map_err(|_| Error::Conntrack)?;
    }
    count(Counter::TcFlowsStarted);
    // Both entries were created with the first packet's state and time (`new_flow`): no
    // touch, which would look both up again to record the same.
    translate(ctx, packet, &flow.orig)
}

/// Applies the original direction's translation of a tracked flow; an SNATed packet is
/// redirected to its next hop (its source is a node address now), the others are routed
/// by the kernel. A hook that does not forward SNATed packets leaves them untouched to tc.
#[inline(always)]
fn translate<C: Frame>(ctx: &C, packet: &mut Packet, value: &CtValue) -> Result<Outcome, Error> {
    let snat = value.flags & CT_F_SNAT != 0;
    if snat && !C::SNAT {
        return Err(Error::LeftToTc);
    }
    packet.set_dst(ctx, value.nat_addr, value.nat_port)?;
    if snat {
        packet.set_src(ctx, value.snat_addr, value.snat_port)?;
        return Ok(Outcome::Redirected(ctx.redirect(packet)?));
    }
    if C::SNAT && host_routing() {
        return Ok(Outcome::Redirected(ctx.redirect(packet)?));
    }
    Ok(Outcome::Translated)
}

/// `--bpf-host-routing`: set by the agent when it loads the object. Then a packet
/// translated at tc ingress goes straight to its next hop (`fib::redirect`), skipping the
/// node's input and forward paths (netfilter included) as Cilium's eBPF host routing
/// does; 0: the kernel routes it.
#[unsafe(no_mangle)]
static HOST_ROUTING: u8 = 0;

#[inline(always)]
fn host_routing() -> bool {
    loader_flag(&raw const HOST_ROUTING)
}

/// A flag global the loader may have set (non-zero: on).
#[inline(always)]
fn loader_flag(flag: *const u8) -> bool {
    // SAFETY: a read of a global of this object; volatile so it is not folded to its
    // compiled-in 0.
    unsafe { core::ptr::read_volatile(flag) != 0 }
}

/// `--nodeport-acceleration native|best-effort`: set by the agent when it loads the object.
/// Only then can tc ingress see a packet XDP translated ([`translated_already`]); without
/// XDP a new flow from outside skips that check.
#[unsafe(no_mangle)]
static XDP_ON: u8 = 0;

#[inline(always)]
fn xdp_on() -> bool {
    loader_flag(&raw const XDP_ON)
}

/// Describes a new flow's decision to the monitor.
// Its own BPF function: inlined, it changed `new_flow`'s register allocation enough for the
// verifier to refuse it ("cannot return stack pointer to the caller").
#[inline(never)]
fn monitor_tc<C: Frame>(packet: &Packet, origin: Origin, decision: &Decision) {
    let hook = match origin {
        Origin::Outside => C::OUTSIDE_HOOK,
        Origin::Pod => MON_HOOK_TC_POD,
    };
    monitor::tc(
        hook,
        packet.proto,
        &(packet.saddr, packet.sport),
        &(packet.daddr, packet.dport),
        decision,
    );
}

/// Whether `packet`, to a frontend, is the translated form of a tracked flow (client →
/// backend), which XDP translated and passed on: its backend is itself a frontend (a
/// host-network pod on a node port, say), and it must not be translated again. Found by
/// the flow's reply entry (backend → client), which only a translation made.
// Its own BPF function: the stack of each call stays within the 512-byte limit.
#[inline(never)]
fn translated_already(packet: &Packet) -> bool {
    let key = CtKey {
        saddr: packet.daddr,
        daddr: packet.saddr,
        sport: packet.dport,
        dport: packet.sport,
        proto: packet.proto,
        dir: CT_DIR_REPLY,
        pad: [0; 2],
    };
    // SAFETY: a map value pointer, valid for the run of the program.
    conntrack::lookup(&key, packet, conntrack::now())
        .is_some_and(|entry| unsafe { (*entry.value).flags } & CT_F_SNAT == 0)
}

/// Whether a packet is addressed to the hairpin SNAT source of its family.
#[inline(always)]
fn is_hairpin(packet: &Packet) -> bool {
    let hairpin = if packet.v6 {
        V6::hairpin()
    } else {
        V4::hairpin()
    };
    same_addr(&packet.daddr, &hairpin)
}

/// Whether the agent deleted a backend since the flow's last packet: only then can its
/// backend be gone, and [`backend_is_current`] is asked. Most packets thus skip the backends
/// map (a lookup that misses the cache on a busy node) for a read of one array entry.
/// The agent stamps the time after its deletions, so a packet that sees the old stamp
/// raced with them, as it would have raced with the lookup.
#[inline(always)]
fn backend_may_be_gone(value: &CtValue) -> bool {
    LB_BACKENDS_REMOVED
        .get(0)
        .is_none_or(|&removed| value.last_seen_ns <= removed)
}

/// Whether the flow's backend still exists as it was chosen: a removed backend's flows
/// pick a new one (for UDP what kube-proxy's conntrack flush does; a TCP flow gets a reset
/// from the new backend, which is the outcome the client would get anyway).
#[inline(always)]
fn backend_is_current(packet: &Packet, value: &CtValue) -> bool {
    if packet.v6 {
        backend_is_current_in::<V6>(value)
    } else {
        backend_is_current_in::<V4>(value)
    }
}

#[inline(always)]
fn backend_is_current_in<F: Family>(value: &CtValue) -> bool {
    crate::xlate::backend(F::backends(), value.backend_id).is_some_and(|b| {
        let (address, port) = F::backend_addr(&b);
        same_addr(&F::wire(address), &value.nat_addr) && port == value.nat_port
    })
}

/// The SNAT source: the node address the packet was sent to, else the address of the
/// device it arrived on.
#[inline(always)]
fn snat_address<F: Family, C: Frame>(ctx: &C, packet: &Packet) -> [u32; 4] {
    if F::is_node_addr(F::from_wire(&packet.daddr)) {
        return packet.daddr;
    }
    F::device_addr(ctx.ifindex()).unwrap_or(packet.daddr)
}

/// Whether `saddr` (wire form) is inside one of the `loadBalancerSourceRanges` of the
/// frontend `rev_nat_id`.
#[inline(always)]
fn source_allowed(rev_nat_id: FrontendId, saddr: &[u32; 4]) -> bool {
    let key = Key::new(
        32 + 128,
        SourceRange {
            rev_nat_id: rev_nat_id.to_be(),
            addr: *saddr,
        },
    );
    LB_SOURCE_RANGES.get(&key).is_some()
}
