//! eBPF programs of the service load balancer. Each hook family lives in its own module;
//! the entry points here stay a few lines long and only map results to return codes.
#![no_std]
#![no_main]

mod affinity;
mod clock;
mod conntrack;
mod counters;
mod family;
mod fib;
mod maps;
mod monitor;
mod nat;
mod peer;
mod reject;
mod sock;
mod tc;
mod xdp;
mod xlate;

use aya_ebpf::{
    helpers::generated::bpf_set_retval,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

use sock::{Hook, Verdict};

/// Return value of a cgroup socket program that lets the call go on.
const ALLOW: i32 = 1;
/// Return value that rejects the call; the errno comes from `bpf_set_retval`.
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Maps a forward verdict to the hook's return value. kube-proxy REJECTs traffic to a
/// Service without endpoints: the caller must get ECONNREFUSED at once, not a hang. It
/// DROPs traffic that a Local traffic policy leaves without an endpoint on this node; a
/// socket hook sees no packet to drop, so the call fails at once with EHOSTUNREACH (as
/// Cilium's socket LB does), telling the two cases apart.
fn forward_result(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => ALLOW,
        Verdict::NoBackends { drop } => {
            let errno = if drop { EHOSTUNREACH } else { ECONNREFUSED };
            // SAFETY: helper call with a constant; allowed in connect and sendmsg hooks.
            unsafe { bpf_set_retval(-errno) };
            REJECT
        }
    }
}

/// `connect()` on an IPv4 socket (TCP and UDP).
#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    forward_result(sock::forward4(&ctx, Hook::Connect))
}

/// `connect()` on an IPv6 socket, IPv4-mapped destinations included.
#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    forward_result(sock::forward6(&ctx, Hook::Connect))
}

/// `sendto()`/`sendmsg()` with a destination on an unconnected IPv4 UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward_result(sock::forward4(&ctx, Hook::SendMsg))
}

/// `sendto()`/`sendmsg()` with a destination on an unconnected IPv6 UDP socket.
#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward_result(sock::forward6(&ctx, Hook::SendMsg))
}

/// `recvfrom()`/`recvmsg()` on an IPv4 UDP socket: replies appear to come from the Service.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx);
    ALLOW // recvmsg programs must return 1
}

/// `recvfrom()`/`recvmsg()` on an IPv6 UDP socket.
#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx);
    ALLOW
}

/// `getpeername()` on an IPv4 socket: the Service address it dialled, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx);
    ALLOW
}

/// `getpeername()` on an IPv6 socket.
#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx);
    ALLOW
}

/// tc ingress of an external device: NodePort, external and LoadBalancer IPs from outside
/// (what XDP translated already goes on untouched).
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    tc::action(&ctx, tc::ingress(&ctx, tc::Origin::Outside))
}

/// XDP of an external device (`--nodeport-acceleration`): tc ingress's translation, in the
/// driver.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    xdp::ingress(&ctx)
}

/// tc ingress of a pod-facing device (packets from the pod): every frontend, per packet,
/// for pods the socket hooks do not cover (`--socket-lb host-only|off`).
#[classifier]
pub fn lb_tc_from_pod(ctx: TcContext) -> i32 {
    tc::action(&ctx, tc::ingress(&ctx, tc::Origin::Pod))
}

/// tc egress of an external or pod-facing device: replies of tracked flows get their
/// frontend back.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    tc::action(&ctx, tc::egress(&ctx))
}

/// Never attached: the agent runs it on a test packet to read the kernel's clocks, and
/// calibrates the datapath's clock from two such readings (`clock.rs`).
#[classifier]
pub fn lb_clock_probe(ctx: TcContext) -> i32 {
    clock::probe(&ctx);
    tc::PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
