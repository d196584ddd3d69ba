//! The datapath's clock: `CLOCK_MONOTONIC` as the conntrack entries carry it, read from
//! `jiffies` (a load the verifier inlines) once the agent has calibrated it, else through
//! `bpf_ktime_get_coarse_ns` (a helper call that was a tenth of a tracked packet's cost).
//! The calibration is `lb_common::Clock`; the agent measures it with [`probe`].
use aya_ebpf::{
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};
use lb_common::{CLOCK_SAMPLE_OFFSET, ClockSample};

use crate::{
    maps::LB_CLOCK,
    nat::{direct, write_at},
};

/// Now, in nanoseconds of `CLOCK_MONOTONIC` as of the last tick (at most two ticks
/// behind it, never ahead).
#[inline(always)]
pub fn now() -> u64 {
    match LB_CLOCK.get(0) {
        Some(clock) if clock.ns_per_jiffy != 0 => {
            // SAFETY: helper without arguments.
            let jiffies = unsafe { bpf_jiffies64() };
            jiffies
                .wrapping_mul(clock.ns_per_jiffy)
                .wrapping_add(clock.offset_ns)
        }
        // SAFETY: helper without arguments.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// Writes both clocks, read at one instant, into the test packet the agent runs
/// `lb_clock_probe` on (`lb_common::ClockSample`).
#[inline(always)]
pub fn probe(ctx: &TcContext) {
    let Some(at) = direct::<ClockSample, _>(ctx, CLOCK_SAMPLE_OFFSET) else {
        return;
    };
    // SAFETY: helpers without arguments.
    let sample = unsafe {
        ClockSample {
            jiffies: bpf_jiffies64(),
            ns: bpf_ktime_get_coarse_ns(),
        }
    };
    write_at(at, &sample);
}
