//! The datapath's per-CPU counters (`LB_COUNTERS`, indexed by `lb_common::Counter`): a
//! plain increment of this CPU's slot, no atomics; the agent sums the CPUs.
use lb_common::Counter;

use crate::maps::LB_COUNTERS;

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = LB_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for the run of the program.
        unsafe { *slot += 1 };
    }
}
