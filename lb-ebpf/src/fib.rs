//! Forwarding of SNATed packets without the kernel's input path (Cilium's
//! `fib_redirect`): a packet whose source became a node address would be dropped there as a
//! martian (a local source arriving from outside), so it is sent straight out of the device
//! the FIB names for its destination, with the Ethernet addresses of the next hop.
use core::{mem, ptr};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::nat::{Packet, RewriteError};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Redirects `packet` (already translated) to its next hop; the tc action to return. A
/// destination the FIB cannot resolve goes on through the stack (`TC_ACT_OK`).
// Its own BPF function: the lookup's parameters stay off the caller's stack.
#[inline(never)]
pub fn redirect(ctx: &TcContext, packet: &Packet) -> Result<i32, RewriteError> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid request to fill in.
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
    params.l4_protocol = packet.proto;
    params.sport = packet.sport;
    params.dport = packet.dport;
    if packet.v6 {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = packet.saddr;
        params.__bindgen_anon_4.ipv6_dst = packet.daddr;
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = packet.saddr[3];
        params.__bindgen_anon_4.ipv4_dst = packet.daddr[3];
    }
    // SAFETY: the skb context is valid for the run of the program.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper on the program's own skb and a stack struct of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &raw mut params,
            mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        ctx.store(0, &params.dmac, 0).map_err(|_| RewriteError)?;
        ctx.store(6, &params.smac, 0).map_err(|_| RewriteError)?;
        // SAFETY: helper with plain integers.
        return Ok(unsafe { bpf_redirect(params.ifindex, 0) } as i32);
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // The kernel resolves the neighbour and fills in the Ethernet header.
        // SAFETY: helper with no next-hop parameters.
        return Ok(unsafe { bpf_redirect_neigh(params.ifindex, ptr::null_mut(), 0, 0) } as i32);
    }
    Ok(crate::tc::PASS)
}
