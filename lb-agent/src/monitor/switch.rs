//! The monitor's switch (`lb_common::MONITOR_SWITCH_MAP`): a lease the monitor holds while
//! it runs. [`Switch::renew`] moves its deadline [`MONITOR_LEASE_SECS`] ahead; dropping the
//! switch writes 0 (off). A monitor killed before it can leaves a deadline that passes by
//! itself. One monitor at a time: the switch's pin is locked (`flock`) while one runs, as
//! two readers of one ring buffer would each see part of the events.
use std::{fs::File, os::fd::AsRawFd as _, path::Path, time::Duration};

use aya::maps::{Array, Map, MapData};
use lb_common::{MONITOR_LEASE_SECS, MONITOR_SWITCH_MAP, MonitorSwitch};

use crate::summary::open_pin;

/// The switch, held on.
pub struct Switch {
    map: Array<MapData, MonitorSwitch>,
    /// Holds the lock on the pin.
    _lock: File,
}

impl Switch {
    /// Opens the switch pinned under `pin_dir` for this monitor alone; [`Switch::renew`]
    /// turns it on.
    ///
    /// # Errors
    /// When it is not pinned there or another monitor holds it.
    pub fn acquire(pin_dir: &Path) -> anyhow::Result<Self> {
        let path = pin_dir.join(MONITOR_SWITCH_MAP);
        let lock = File::open(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (is an agent of this version running with --bpf-pin-path {}?)",
                path.display(),
                pin_dir.display()
            )
        })?;
        // SAFETY: flock on our own open file.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            anyhow::ensure!(
                error.raw_os_error() != Some(libc::EWOULDBLOCK),
                "another `lb-agent monitor` is running on {} (only one at a time: two would \
                 each see part of the decisions)",
                pin_dir.display()
            );
            tracing::debug!(error = %error, "could not lock the monitor switch; going on");
        }
        let map = Array::try_from(Map::Array(open_pin(pin_dir, MONITOR_SWITCH_MAP)?))?;
        Ok(Self { map, _lock: lock })
    }

    /// Moves the deadline [`MONITOR_LEASE_SECS`] ahead of now.
    ///
    /// # Errors
    /// When the map cannot be written.
    pub fn renew(&mut self) -> anyhow::Result<()> {
        let until = monotonic_now() + Duration::from_secs(MONITOR_LEASE_SECS);
        self.set(u64::try_from(until.as_nanos()).unwrap_or(u64::MAX))
    }

    fn set(&mut self, until_ns: u64) -> anyhow::Result<()> {
        self.map
            .set(0, MonitorSwitch { until_ns }, 0)
            .map_err(|e| anyhow::anyhow!("writing {MONITOR_SWITCH_MAP}: {e}"))
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        if let Err(e) = self.set(0) {
            tracing::warn!(error = %e, "could not turn the monitor off: it goes off within {MONITOR_LEASE_SECS} s");
        }
    }
}

/// The switch's state as pinned under `pin_dir`: `Some(deadline)` while on (for tests and
/// `services --summary`-like checks), `None` when off or expired.
///
/// # Errors
/// When it is not pinned there or cannot be read.
pub fn state(pin_dir: &Path) -> anyhow::Result<Option<Duration>> {
    let map: Array<MapData, MonitorSwitch> =
        Array::try_from(Map::Array(open_pin(pin_dir, MONITOR_SWITCH_MAP)?))?;
    let until = Duration::from_nanos(map.get(&0, 0)?.until_ns);
    Ok((until > monotonic_now()).then_some(until))
}

/// `CLOCK_MONOTONIC` now: the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(Duration::ZERO, Duration::from)
}
