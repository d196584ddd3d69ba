//! The decision monitor (layout and switch in `lb_common::monitor`): each decision point
//! calls [`sock`] or [`tc`], which cost one array lookup while the switch is off and
//! otherwise describe the decision on the ring buffer. Its two maps are declared here, not
//! in `maps.rs`, so the monitor stays one file.
use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    btf_maps::{Array, RingBuf},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie},
    },
    macros::btf_map,
    programs::SockAddrContext,
};
use lb_common::{FrontendId, MON_PICK_AFFINITY, MONITOR_EVENTS_BYTES, MonitorEvent, MonitorSwitch};

/// The switch: decisions are described while it holds a deadline still ahead.
#[btf_map]
pub static LB_MONITOR_SWITCH: Array<MonitorSwitch, 1> = Array::new();

/// The described decisions, read by `lb-agent monitor`.
#[btf_map]
pub static LB_MONITOR_EVENTS: RingBuf<MonitorEvent, MONITOR_EVENTS_BYTES> = RingBuf::new();

/// A decision, as the lookup took it.
#[derive(Clone, Copy)]
pub struct Decision {
    /// `MON_OUT_*`.
    pub outcome: u8,
    /// `MON_PICK_*`.
    pub pick: u8,
    /// The slot picked (0: kept by affinity, or none).
    pub slot: u16,
    /// The frontend's backend count.
    pub count: u16,
    /// The master's `SVC_F_*` flags.
    pub svc_flags: u32,
    pub rev_nat_id: FrontendId,
    /// The backend (wire form) and port; zeros unless translated.
    pub backend: [u32; 4],
    pub backend_port: u16,
}

impl Decision {
    /// A decision without a backend.
    #[inline(always)]
    pub fn refused(outcome: u8, rev_nat_id: FrontendId, svc_flags: u32) -> Self {
        Self {
            outcome,
            pick: 0,
            slot: 0,
            count: 0,
            svc_flags,
            rev_nat_id,
            backend: [0; 4],
            backend_port: 0,
        }
    }

    /// A pick of `slot` (0: kept by affinity) made with `pick`.
    #[inline(always)]
    pub fn pick_kind(slot: u16, pick: u8) -> u8 {
        if slot == 0 { MON_PICK_AFFINITY } else { pick }
    }
}

/// A decision at a socket hook for `frontend:port/proto` (wire form).
#[inline(always)]
pub fn sock(
    ctx: &SockAddrContext,
    hook: u8,
    proto: u8,
    frontend: &([u32; 4], u16),
    decision: &Decision,
) {
    emit(|event| {
        // SAFETY: helpers on the program's own context; all allowed in cgroup sock_addr
        // programs.
        unsafe {
            event.netns_cookie = bpf_get_netns_cookie(ctx.sock_addr.cast());
            event.cgroup_id = bpf_get_current_cgroup_id();
        }
        event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        event.comm = bpf_get_current_comm().unwrap_or_default();
        event.frontend = frontend.0;
        event.frontend_port = frontend.1;
        event.proto = proto;
        event.hook = hook;
        fill(event, decision);
    });
}

/// A decision at tc for the first packet of a flow from `client` to `frontend` (wire form,
/// with ports).
#[inline(always)]
pub fn tc(
    hook: u8,
    proto: u8,
    client: &([u32; 4], u16),
    frontend: &([u32; 4], u16),
    decision: &Decision,
) {
    emit(|event| {
        event.client = client.0;
        event.client_port = client.1;
        event.frontend = frontend.0;
        event.frontend_port = frontend.1;
        event.proto = proto;
        event.hook = hook;
        fill(event, decision);
    });
}

#[inline(always)]
fn fill(event: &mut MonitorEvent, decision: &Decision) {
    event.rev_nat_id = decision.rev_nat_id;
    event.backend = decision.backend;
    event.backend_port = decision.backend_port;
    event.slot = decision.slot;
    event.count = decision.count;
    event.outcome = decision.outcome;
    event.pick = decision.pick;
    event.svc_flags = decision.svc_flags;
}

/// Writes an event (zeroed, timed, then `describe`d) into the ring buffer while the switch
/// is on; a full ring buffer loses the event, the datapath never waits.
#[inline(always)]
fn emit(describe: impl FnOnce(&mut MonitorEvent)) {
    let Some(switch) = LB_MONITOR_SWITCH.get_ptr(0) else {
        return;
    };
    // SAFETY: a map value pointer, valid for the run of the program.
    let until = unsafe { (*switch).until_ns };
    if until == 0 {
        return;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= until {
        return;
    }
    let Some(mut entry) = LB_MONITOR_EVENTS.reserve(0) else {
        return;
    };
    let event = entry.write(MonitorEvent::default());
    event.time_ns = now;
    describe(event);
    // No wakeup: waking the reader is an interrupt's work per decision (ten times the
    // decision itself, measured); the monitor drains the ring on a timer instead.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}
