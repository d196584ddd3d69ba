//! The tc datapath's answer to a packet for a Service without endpoints: kube-proxy REJECTs
//! it (`-j REJECT`, ICMP port unreachable), so the client sees "connection refused" at once
//! instead of waiting for its timeout. The packet in hand becomes that ICMP reply and goes
//! back out of the device it came in on (after Cilium's `tail_no_service_ipv4`/`_ipv6`).
//!
//! The reply quotes the original IP header and the first 8 bytes of its L4 header (RFC 792;
//! for IPv6 the fixed header, RFC 4443 allows any amount up to the minimum MTU), which is
//! what the client's stack needs to find the socket. The headers are parsed from the skb at
//! `ETH_HLEN`, independently of the translation's own parser, and the reply is assembled on
//! the stack and written with one `bpf_skb_store_bytes` after one `bpf_skb_change_tail`, so
//! no packet pointer ever needs a bounds check.
use core::ptr;

use aya_ebpf::{
    bindings::BPF_F_RECOMPUTE_CSUM,
    helpers::generated::{
        bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    programs::TcContext,
};

use lb_common::{ICMP_BURST, ICMP_PER_SEC};

use crate::{conntrack, maps::ICMP_BUDGET, nat::RewriteError};

/// Whether this CPU may send one more ICMP reply now: a token bucket of [`ICMP_BURST`]
/// tokens refilled at [`ICMP_PER_SEC`] (the kernel's own `icmp_msgs_per_sec` and
/// `icmp_msgs_burst`), so a flood to a Service without endpoints is not answered in full.
#[inline(always)]
pub fn within_rate() -> bool {
    let Some(budget) = ICMP_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, ours until the program returns.
    let budget = unsafe { &mut *budget };
    let now = conntrack::now();
    let earned = now.saturating_sub(budget.refilled_ns) * ICMP_PER_SEC / 1_000_000_000;
    if earned > 0 {
        budget.tokens = (budget.tokens + earned).min(ICMP_BURST);
        budget.refilled_ns = now;
    }
    if budget.tokens == 0 {
        return false;
    }
    budget.tokens -= 1;
    true
}

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// `IPDEFTTL`, also the hop limit of the IPv6 reply.
const TTL: u8 = 64;
/// `ICMP_DEST_UNREACH` / `ICMP_PORT_UNREACH`.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// `ICMPV6_DEST_UNREACH` / `ICMPV6_PORT_UNREACH`.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
/// How much of the L4 header the reply quotes.
const L4_QUOTE: u32 = 8;
/// The IPv4 header without options.
const IPV4_HLEN: u32 = 20;
/// The longest IPv4 header (IHL 15) and the L4 bytes after it, in 32-bit words (the
/// buffers are word arrays so zeroing them takes a few stores, not a `memset` loop).
const QUOTE4_MAX_WORDS: usize = (60 + L4_QUOTE as usize) / 4;
/// The IPv6 fixed header and the 8 bytes after it, in words.
const QUOTE6_WORDS: usize = (40 + L4_QUOTE as usize) / 4;

/// An IPv4 header without options, as written on the wire.
#[repr(C)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    /// Network order, as the fields below.
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// The IPv6 fixed header.
#[repr(C)]
struct Ipv6Header {
    /// Version, traffic class and flow label.
    vtc_flow: u32,
    payload_len: u16,
    nexthdr: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// The ICMP and ICMPv6 header of a destination unreachable message.
#[repr(C)]
struct IcmpHeader {
    kind: u8,
    code: u8,
    check: u16,
    /// Unused in a destination unreachable message: zero.
    unused: u32,
}

/// The IPv4 reply after the Ethernet header. 4-byte aligned and a multiple of 4 long in
/// every part `bpf_csum_diff` sums.
#[repr(C)]
struct Reply4 {
    ip: Ipv4Header,
    icmp: IcmpHeader,
    /// The original IP header and the first 8 bytes of its payload; only
    /// `ihl * 4 + 8` bytes are used.
    quote: [u32; QUOTE4_MAX_WORDS],
}

/// The IPv6 reply after the Ethernet header.
#[repr(C)]
struct Reply6 {
    ip: Ipv6Header,
    icmp: IcmpHeader,
    quote: [u32; QUOTE6_WORDS],
}

/// The IPv6 pseudo-header of the ICMPv6 checksum (RFC 8200, 8.1).
#[repr(C)]
struct Pseudo6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    /// Upper-layer packet length, network order.
    len: u32,
    /// Three zero bytes and the next header, network order.
    nexthdr: u32,
}

const _: () = assert!(size_of::<Ipv4Header>() == IPV4_HLEN as usize);
const _: () = assert!(size_of::<Ipv6Header>() == 40 && size_of::<IcmpHeader>() == 8);
const _: () = assert!(size_of::<Reply4>() == 96 && size_of::<Reply6>() == 96);
const _: () = assert!(size_of::<Pseudo6>() == 40);

/// Turns the packet into an ICMP (ICMPv6) port unreachable reply to its sender and
/// redirects it out of the device it arrived on; the tc action to return. An error leaves
/// the packet possibly half-rewritten: it must be dropped.
// Its own BPF function: the reply is built on its own stack, not the caller's.
#[inline(never)]
pub fn port_unreachable(ctx: &TcContext) -> Result<i32, RewriteError> {
    let ether_type = u16::from_be(ctx.load::<u16>(12).map_err(|_| RewriteError)?);
    // The reply's Ethernet addresses are the request's, swapped.
    let macs: [u8; 12] = ctx.load(0).map_err(|_| RewriteError)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    match ether_type {
        ETH_P_IP => ipv4(ctx)?,
        ETH_P_IPV6 => ipv6(ctx)?,
        _ => return Err(RewriteError),
    }
    ctx.store(0, &swapped, 0).map_err(|_| RewriteError)?;
    // SAFETY: the skb context is valid for the run of the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper with plain integers.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Rewrites everything after the Ethernet header into an ICMP port unreachable reply.
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Result<(), RewriteError> {
    let version_ihl: u8 = ctx.load(ETH_HLEN as usize).map_err(|_| RewriteError)?;
    if version_ihl >> 4 != 4 {
        return Err(RewriteError);
    }
    // The option words, 0..=10, computed where the compiler cannot see through it and
    // bounded by one comparison on that very value: the verifier then knows the lengths of
    // the copies below (28..=68 bytes of quote) are neither zero nor beyond the buffers.
    let options = core::hint::black_box(u32::from(version_ihl & 0x0f).wrapping_sub(5)) & 0x0f;
    if options > 10 {
        return Err(RewriteError);
    }
    let quote_len = IPV4_HLEN + options * 4 + L4_QUOTE;
    let tos: u8 = ctx.load(ETH_HLEN as usize + 1).map_err(|_| RewriteError)?;
    let saddr: u32 = ctx.load(ETH_HLEN as usize + 12).map_err(|_| RewriteError)?;
    let daddr: u32 = ctx.load(ETH_HLEN as usize + 16).map_err(|_| RewriteError)?;
    let reply_len = IPV4_HLEN + size_of::<IcmpHeader>() as u32 + quote_len;
    let mut reply = Reply4 {
        ip: Ipv4Header {
            version_ihl: 0x45,
            tos,
            tot_len: (reply_len as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: TTL,
            protocol: IPPROTO_ICMP,
            check: 0,
            saddr: daddr,
            daddr: saddr,
        },
        icmp: IcmpHeader {
            kind: ICMP_DEST_UNREACH,
            code: ICMP_PORT_UNREACH,
            check: 0,
            unused: 0,
        },
        quote: [0; QUOTE4_MAX_WORDS],
    };
    // SAFETY: helper on the program's own skb into a stack buffer of at least `quote_len`
    // bytes; it fails when the packet is shorter.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            ETH_HLEN,
            reply.quote.as_mut_ptr().cast(),
            quote_len,
        )
    };
    if rc != 0 {
        return Err(RewriteError);
    }
    reply.ip.check = fold(sum(
        ptr::from_ref(&reply.ip).cast(),
        size_of::<Ipv4Header>() as u32,
        0,
    )?);
    reply.icmp.check = fold(sum(
        ptr::from_ref(&reply.icmp).cast(),
        size_of::<IcmpHeader>() as u32 + quote_len,
        0,
    )?);
    write(ctx, ptr::from_ref(&reply).cast(), reply_len)
}

/// Rewrites everything after the Ethernet header into an ICMPv6 port unreachable reply.
#[inline(always)]
fn ipv6(ctx: &TcContext) -> Result<(), RewriteError> {
    let version: u8 = ctx.load(ETH_HLEN as usize).map_err(|_| RewriteError)?;
    if version >> 4 != 6 {
        return Err(RewriteError);
    }
    let saddr: [u32; 4] = ctx.load(ETH_HLEN as usize + 8).map_err(|_| RewriteError)?;
    let daddr: [u32; 4] = ctx.load(ETH_HLEN as usize + 24).map_err(|_| RewriteError)?;
    // The ICMPv6 message: its header and the quote.
    let icmp_len = (size_of::<IcmpHeader>() + QUOTE6_WORDS * 4) as u32;
    let mut reply = Reply6 {
        ip: Ipv6Header {
            vtc_flow: (6u32 << 28).to_be(),
            payload_len: (icmp_len as u16).to_be(),
            nexthdr: IPPROTO_ICMPV6,
            hop_limit: TTL,
            saddr: daddr,
            daddr: saddr,
        },
        icmp: IcmpHeader {
            kind: ICMPV6_DEST_UNREACH,
            code: ICMPV6_PORT_UNREACH,
            check: 0,
            unused: 0,
        },
        quote: ctx.load(ETH_HLEN as usize).map_err(|_| RewriteError)?,
    };
    let pseudo = Pseudo6 {
        saddr: daddr,
        daddr: saddr,
        len: icmp_len.to_be(),
        nexthdr: u32::from(IPPROTO_ICMPV6).to_be(),
    };
    let seed = sum(
        ptr::from_ref(&pseudo).cast(),
        size_of::<Pseudo6>() as u32,
        0,
    )?;
    reply.icmp.check = fold(sum(ptr::from_ref(&reply.icmp).cast(), icmp_len, seed)?);
    write(
        ctx,
        ptr::from_ref(&reply).cast(),
        size_of::<Reply6>() as u32,
    )
}

/// Resizes the packet to the Ethernet header and `len` bytes of `reply`, and writes them
/// after the Ethernet header (keeping a `CHECKSUM_COMPLETE` skb's sum right).
#[inline(always)]
fn write(ctx: &TcContext, reply: *const u8, len: u32) -> Result<(), RewriteError> {
    // SAFETY: helper on the program's own skb; no packet pointer is held across it.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, ETH_HLEN + len, 0) } != 0 {
        return Err(RewriteError);
    }
    // SAFETY: `reply` points at a stack value of at least `len` initialised bytes.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb.cast(),
            ETH_HLEN,
            reply.cast(),
            len,
            u64::from(BPF_F_RECOMPUTE_CSUM),
        )
    };
    if rc == 0 { Ok(()) } else { Err(RewriteError) }
}

/// The 32-bit one's complement sum of `len` bytes at `data` (a multiple of 4) added to
/// `seed`, by `bpf_csum_diff`.
#[inline(always)]
fn sum(data: *const u32, len: u32, seed: u32) -> Result<u32, RewriteError> {
    // SAFETY: `data` points at a stack value of at least `len` initialised bytes; the
    // helper only reads it.
    let sum = unsafe { bpf_csum_diff(ptr::null_mut(), 0, data.cast_mut(), len, seed) };
    u32::try_from(sum).map_err(|_| RewriteError)
}

/// Folds a 32-bit sum into the 16-bit checksum field, as stored in the packet.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
