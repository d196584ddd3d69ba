//! Calibrates the datapath's clock (`lb_common::Clock`): the programs read `jiffies`, a
//! load the verifier inlines, instead of calling `bpf_ktime_get_coarse_ns` on every packet,
//! once the agent has told them the kernel's tick and how jiffies line up with
//! `CLOCK_MONOTONIC`. Both come from the kernel itself: the probe program reads the two
//! clocks at one instant, twice, a quarter of a second apart. Until then (and if the
//! readings make no sense) the datapath keeps calling the helper, which is correct, only
//! slower.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{ProgramFd, SchedClassifier},
};
use lb_common::{CLOCK_MAP, CLOCK_PROBE_PROGRAM, CLOCK_SAMPLE_OFFSET, Clock, ClockSample};
use tracing::{info, warn};

/// How far apart the two readings are: 62 ticks at 250 Hz, so one tick of rounding is
/// under 2% and the kernel's tick rates (at least 20% apart) cannot be mistaken.
const SPAN: Duration = Duration::from_millis(250);

/// The tick rates Linux is built with (`CONFIG_HZ`).
const KERNEL_HZ: [u64; 4] = [100, 250, 300, 1000];

/// The calibration two readings give: the kernel's tick (`TICK_NSEC` of the nearest
/// `CONFIG_HZ` to the measured rate), and an offset that puts the clock one tick behind
/// the second reading (a reading can catch jiffies just incremented while the coarse
/// time is not yet: the clock must never run ahead of `CLOCK_MONOTONIC`, or a flow's last
/// packet could seem to come after a backend's removal it raced with). `None` when the
/// readings do not fit any tick rate within 10% (or went backwards).
#[must_use]
pub fn calibrate(first: ClockSample, second: ClockSample) -> Option<Clock> {
    let jiffies = second.jiffies.checked_sub(first.jiffies)?;
    let ns = second.ns.checked_sub(first.ns)?;
    if jiffies == 0 {
        return None;
    }
    let measured = ns as f64 / jiffies as f64;
    let tick_ns = KERNEL_HZ
        .iter()
        .map(|hz| (1_000_000_000 + hz / 2) / hz)
        .find(|&tick| (measured - tick as f64).abs() <= tick as f64 / 10.0)?;
    let offset_ns = second
        .ns
        .wrapping_sub(second.jiffies.wrapping_mul(tick_ns))
        .wrapping_sub(tick_ns);
    Some(Clock {
        ns_per_jiffy: tick_ns,
        offset_ns,
    })
}

/// Loads the probe program and starts a thread that reads the clocks twice, [`SPAN`]
/// apart, and writes the calibration into the datapath's clock map. Nothing waits for it.
pub fn calibrate_in_background(ebpf: &mut Ebpf) {
    let Some(map) = ebpf.take_map(CLOCK_MAP) else {
        warn!("the eBPF object has no clock map; the datapath reads the kernel's clock helper");
        return;
    };
    let probe = match probe_fd(ebpf) {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot load the clock probe; the datapath reads the kernel's clock helper");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("clock".into())
        .spawn(move || {
            if let Err(e) = measure_and_write(&probe, map) {
                warn!(error = %e, "cannot calibrate the datapath's clock; it reads the kernel's clock helper");
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the clock calibration; the datapath reads the kernel's clock helper");
    }
}

fn probe_fd(ebpf: &mut Ebpf) -> anyhow::Result<ProgramFd> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(CLOCK_PROBE_PROGRAM)
        .ok_or_else(|| anyhow::anyhow!("no program {CLOCK_PROBE_PROGRAM}"))?
        .try_into()?;
    program.load()?;
    Ok(program.fd()?.try_clone()?)
}

fn measure_and_write(probe: &ProgramFd, map: aya::maps::Map) -> anyhow::Result<()> {
    let first = sample(probe)?;
    std::thread::sleep(SPAN);
    let second = sample(probe)?;
    let Some(clock) = calibrate(first, second) else {
        anyhow::bail!("the readings {first:?} and {second:?} fit no kernel tick rate");
    };
    let mut array: Array<MapData, Clock> = Array::try_from(map)?;
    array.set(0, clock, 0)?;
    info!(
        hz = 1_000_000_000 / clock.ns_per_jiffy,
        "the datapath reads its clock from jiffies"
    );
    Ok(())
}

/// `union bpf_attr`'s `test` member (`BPF_PROG_TEST_RUN`).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

/// Runs the probe once on a test packet and reads what it wrote there. Through the raw
/// syscall, not aya's `TestRun`: the calibration thread holds only the program's fd, while
/// the object stays with the agent for attaching.
fn sample(probe: &ProgramFd) -> std::io::Result<ClockSample> {
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const LEN: usize = CLOCK_SAMPLE_OFFSET + size_of::<ClockSample>();
    let data_in = [0u8; LEN];
    let mut data_out = [0u8; LEN];
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(probe.as_fd().as_raw_fd()).unwrap_or(u32::MAX),
        data_size_in: LEN as u32,
        data_size_out: LEN as u32,
        data_in: data_in.as_ptr() as u64,
        data_out: data_out.as_mut_ptr() as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is the `test` member, pointing at buffers of the sizes given, which
    // live through the call.
    unsafe { crate::maps::bpf::sys_bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&data_out[at..at + 8]);
        u64::from_ne_bytes(bytes)
    };
    Ok(ClockSample {
        jiffies: word(CLOCK_SAMPLE_OFFSET),
        ns: word(CLOCK_SAMPLE_OFFSET + 8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two readings `span_ms` apart at `hz`, starting at `jiffies`.
    fn readings(hz: u64, jiffies: u64, span_ms: u64) -> (ClockSample, ClockSample) {
        let tick = 1_000_000_000 / hz;
        let first = ClockSample {
            jiffies,
            ns: 7_000_000_000,
        };
        let ticks = span_ms * hz / 1000;
        let second = ClockSample {
            jiffies: jiffies + ticks,
            ns: first.ns + ticks * tick,
        };
        (first, second)
    }

    #[test]
    fn each_kernel_tick_rate_is_found_and_the_clock_runs_a_tick_behind() {
        for hz in KERNEL_HZ {
            let (first, second) = readings(hz, 4_295_000_000, 250);
            let clock = calibrate(first, second).expect("a tick rate");
            assert_eq!(clock.ns_per_jiffy, (1_000_000_000 + hz / 2) / hz, "{hz} Hz");
            let now = second
                .jiffies
                .wrapping_mul(clock.ns_per_jiffy)
                .wrapping_add(clock.offset_ns);
            assert_eq!(now, second.ns - clock.ns_per_jiffy, "{hz} Hz");
        }
    }

    #[test]
    fn a_reading_off_by_a_tick_still_finds_the_rate() {
        let (first, mut second) = readings(250, 10, 250);
        second.jiffies += 1;
        assert_eq!(
            calibrate(first, second).map(|c| c.ns_per_jiffy),
            Some(4_000_000)
        );
    }

    #[test]
    fn readings_that_fit_no_tick_rate_leave_the_helper_in_place() {
        let first = ClockSample { jiffies: 10, ns: 0 };
        // 180 Hz: between 100 and 250, within 10% of neither.
        let odd = ClockSample {
            jiffies: 55,
            ns: 250_000_000,
        };
        assert_eq!(calibrate(first, odd), None);
        // No tick in between, or time going backwards.
        assert_eq!(calibrate(first, first), None);
        let backwards = ClockSample { jiffies: 5, ns: 0 };
        assert_eq!(calibrate(first, backwards), None);
    }
}
