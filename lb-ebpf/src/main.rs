//! eBPF programs of the service load balancer. Each hook family lives in its own module;
//! the entry points here stay a few lines long and only map results to return codes.
#![no_std]
#![no_main]

mod maps;
mod sock;

use aya_ebpf::{
    helpers::generated::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext,
};

use sock::Verdict;

/// Return value of a `cgroup_sock_addr` program that lets the call go on.
const SOCK_ALLOW: i32 = 1;
/// Return value that rejects the call; the errno comes from `bpf_set_retval`.
const SOCK_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// `connect()` on an IPv4 socket (TCP, and UDP sockets that connect): translate a Service
/// frontend to one of its backends.
#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    match sock::connect4(&ctx) {
        Verdict::Pass | Verdict::Translated => SOCK_ALLOW,
        Verdict::NoBackends => {
            // kube-proxy REJECTs traffic to a Service without endpoints: the client must
            // see ECONNREFUSED at once, not a hang.
            // SAFETY: helper call with a constant; allowed in connect hooks (kernel 5.18+).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            SOCK_REJECT
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
