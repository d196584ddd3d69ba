//! Socket-level translation (Cilium's `bpf_sock.c`): at `connect()` time a Service frontend
//! is replaced by a backend, so the packets themselves never carry the virtual address and
//! need no NAT.
use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::SockAddrContext};
use aya_log_ebpf::warn;
use lb_common::{Backend4, PROTO_TCP, PROTO_UDP, Service4Key, Service4Value};

use crate::maps::{LB4_BACKENDS, LB4_SERVICES};

/// What a socket hook decided.
pub enum Verdict {
    /// Not a Service frontend (or an inconsistent one): leave the call untouched.
    Pass,
    /// The destination was rewritten to a backend.
    Translated,
    /// A Service frontend without endpoints: refuse the call.
    NoBackends,
}

/// Forward translation for `connect4`.
pub fn connect4(ctx: &SockAddrContext) -> Verdict {
    // SAFETY: the kernel hands the hook a valid `bpf_sock_addr` for its whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Verdict::Pass;
    }
    // `user_port` carries the port in network order in its low 16 bits.
    let key = Service4Key::new(sa.user_ip4, sa.user_port as u16, proto, 0);
    let Some(master) = lookup_service(&key) else {
        return Verdict::Pass;
    };
    if master.count == 0 {
        return Verdict::NoBackends;
    }
    let Some(backend) = pick_backend(&key, master.count) else {
        warn!(
            ctx,
            "service {:i}: backend slot missing",
            u32::from_be(key.address)
        );
        return Verdict::Pass;
    };
    sa.user_ip4 = backend.address;
    sa.user_port = u32::from(backend.port);
    Verdict::Translated
}

/// A random backend among the frontend's `count` slots (kube-proxy's `statistic --mode
/// random`, Cilium's default for the socket path).
fn pick_backend(frontend: &Service4Key, count: u16) -> Option<Backend4> {
    // SAFETY: helper without arguments.
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(count)) as u16 + 1;
    let mut slot_key = *frontend;
    slot_key.backend_slot = slot;
    let backend_id = lookup_service(&slot_key)?.backend_id;
    // SAFETY: the value is copied out before the program can be preempted by an update.
    unsafe { LB4_BACKENDS.get(backend_id) }.copied()
}

fn lookup_service(key: &Service4Key) -> Option<Service4Value> {
    // SAFETY: as above, the value is copied out at once.
    unsafe { LB4_SERVICES.get(key) }.copied()
}
