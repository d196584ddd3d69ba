//! Whether the datapath is current, for `/readyz` on `--api-addr`: ready once the programs
//! are attached after the first sync, and not ready while the maps may be stale — the API
//! watch has been failing for longer than `--readyz-stale-after`, or the last map write
//! failed — and ready again once that is over. (`/healthz` stays about the process.)
//!
//! A watch that fails is retried by kube-rs with a growing backoff (0.8 s, 1.6 s, 3.2 s …
//! up to 30 s, each with up to as much again of jitter), each failed try reporting an
//! error and a successful one reporting nothing until an event comes. So a failure streak
//! ends at the first event, or once no error has followed the last one for longer than the
//! next retry can take ([`Streak::is_over`]).
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// `--readyz-stale-after`'s default.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(30);

/// The shortest quiet time after an error that ends a streak.
const MIN_QUIET: Duration = Duration::from_secs(2);
/// The longest: kube-rs's largest backoff (30 s) and its jitter (as much again).
const MAX_QUIET: Duration = Duration::from_secs(65);
/// The next gap is at most 4 times the last: twice the delay, each with up to as much
/// again of jitter.
const QUIET_PER_GAP: f64 = 4.5;

/// Consecutive watch failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Streak {
    since: Instant,
    last: Instant,
    /// The gap between the last two errors (the backoff it had reached).
    gap: Duration,
}

impl Streak {
    /// No error for longer than the next retry can take: it succeeded. While the API
    /// server holds the retries back (`held`: its `Retry-After`), the next retry comes
    /// only after that.
    fn is_over(&self, now: Instant, held: Option<Instant>) -> bool {
        if held.is_some_and(|until| now < until + MIN_QUIET) {
            return false;
        }
        let quiet = self.gap.mul_f64(QUIET_PER_GAP).clamp(MIN_QUIET, MAX_QUIET);
        now.saturating_duration_since(self.last) > quiet
    }
}

impl Inner {
    fn held(&self, resource: &str) -> Option<Instant> {
        self.holds
            .iter()
            .find(|(r, _)| *r == resource)
            .map(|(_, until)| *until)
    }
}

#[derive(Debug, Default)]
struct Inner {
    attached: bool,
    /// Since when map writes fail (until a write succeeds).
    writes_failing: Option<Instant>,
    /// Until when the API server asked not to be asked about a resource (`Retry-After`).
    holds: Vec<(&'static str, Instant)>,
    /// The failing watches, by resource (one resource's events say nothing of another's
    /// watch).
    watches: Vec<(&'static str, Streak)>,
}

/// The agent's readiness, shared by the reconcile loop and the API server.
#[derive(Debug)]
pub struct Readiness {
    stale_after: Duration,
    inner: Mutex<Inner>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new(DEFAULT_STALE_AFTER)
    }
}

impl Readiness {
    /// Not ready until [`Self::attached`]; a watch failing for longer than `stale_after`
    /// makes it not ready.
    #[must_use]
    pub fn new(stale_after: Duration) -> Self {
        Self {
            stale_after,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The programs are attached and the first sync is in the maps.
    pub fn attached(&self) {
        self.with(|inner| inner.attached = true);
    }

    /// A map write failed at `now`.
    pub fn write_failed(&self, now: Instant) {
        self.with(|inner| {
            inner.writes_failing.get_or_insert(now);
        });
    }

    /// A sync wrote everything.
    pub fn write_succeeded(&self) {
        self.with(|inner| inner.writes_failing = None);
    }

    /// The watch of `resource` failed at `now` (it retries on its own).
    pub fn watch_failed(&self, resource: &'static str, now: Instant) {
        self.with(|inner| {
            let fresh = Streak {
                since: now,
                last: now,
                gap: Duration::ZERO,
            };
            let held = inner.held(resource);
            match inner.watches.iter_mut().find(|(r, _)| *r == resource) {
                Some((_, streak)) if !streak.is_over(now, held) => {
                    streak.gap = now.saturating_duration_since(streak.last);
                    streak.last = now;
                }
                Some((_, streak)) => *streak = fresh,
                None => inner.watches.push((resource, fresh)),
            }
        });
    }

    /// The API server asked not to be asked about `resource` before `until` (`Retry-After`
    /// on a 429 or 503): its watch cannot recover before then.
    pub fn watch_held(&self, resource: &'static str, until: Instant) {
        self.with(|inner| {
            inner.holds.retain(|(r, _)| *r != resource);
            inner.holds.push((resource, until));
        });
    }

    /// The watch of `resource` delivered an event: it works.
    pub fn watch_succeeded(&self, resource: &'static str) {
        self.with(|inner| {
            inner.watches.retain(|(r, _)| *r != resource);
            inner.holds.retain(|(r, _)| *r != resource);
        });
    }

    /// `Ok` when ready at `now`, else why not.
    ///
    /// # Errors
    /// The reason the datapath may be stale, as text for `/readyz`.
    pub fn check(&self, now: Instant) -> Result<(), String> {
        self.with(|inner| {
            if !inner.attached {
                return Err("the datapath is not attached yet (first sync pending)".into());
            }
            if let Some(since) = inner.writes_failing {
                let secs = now.saturating_duration_since(since).as_secs();
                return Err(format!("map writes have been failing for {secs} s"));
            }
            let holds = inner.holds.clone();
            let held = |resource: &str| holds.iter().find(|(r, _)| *r == resource).map(|(_, t)| *t);
            inner
                .watches
                .retain(|(resource, streak)| !streak.is_over(now, held(resource)));
            for (resource, streak) in &inner.watches {
                let failing = now.saturating_duration_since(streak.since);
                if failing > self.stale_after {
                    return Err(format!(
                        "the {resource} watch has been failing for {} s (over --readyz-stale-after {} s)",
                        failing.as_secs(),
                        self.stale_after.as_secs()
                    ));
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn not_ready_before_attached_nor_while_writes_fail() {
        let readiness = Readiness::new(10 * S);
        let t0 = Instant::now();
        assert!(readiness.check(t0).is_err());
        readiness.attached();
        assert_eq!(readiness.check(t0), Ok(()));
        readiness.write_failed(t0);
        let why = readiness.check(t0 + 3 * S).unwrap_err();
        assert!(
            why.contains("map writes have been failing for 3 s"),
            "{why}"
        );
        readiness.write_succeeded();
        assert_eq!(readiness.check(t0 + 4 * S), Ok(()));
    }

    /// Errors paced by the backoff: ready during the first `stale_after`, not ready after,
    /// ready again when an event comes, or when the errors stop.
    #[test]
    fn a_watch_failing_longer_than_the_threshold_is_stale_until_it_recovers() {
        let readiness = Readiness::new(5 * S);
        readiness.attached();
        let t0 = Instant::now();
        let mut t = t0;
        let mut gap = Duration::from_millis(800);
        while t < t0 + 12 * S {
            readiness.watch_failed("Service", t);
            // Another resource's events say nothing of this watch.
            readiness.watch_succeeded("Node");
            assert_eq!(
                readiness.check(t).is_ok(),
                t - t0 <= 5 * S,
                "at {:?}",
                t - t0
            );
            t += gap;
            gap *= 2;
        }
        // An event: recovered at once.
        readiness.watch_succeeded("Service");
        assert_eq!(readiness.check(t), Ok(()));

        // Again, and this time the errors just stop (the last at 5.6 s, 3.2 s after the one
        // before): 4.5 times that gap without an error ends the streak.
        let t1 = t + 100 * S;
        let mut t = t1;
        let mut gap = Duration::from_millis(800);
        while t < t1 + 12 * S {
            readiness.watch_failed("EndpointSlice", t);
            t += gap;
            gap *= 2;
        }
        let last = t - gap / 2;
        assert!(readiness.check(last + 14 * S).is_err());
        assert_eq!(readiness.check(last + 15 * S), Ok(()));
    }

    /// 429s with `Retry-After: 4`: the errors come 4 s apart from the start (longer than
    /// the quiet time of a first error), and still make one streak.
    #[test]
    fn errors_held_back_by_retry_after_are_one_streak() {
        let readiness = Readiness::new(5 * S);
        readiness.attached();
        let t0 = Instant::now();
        for i in 0..4 {
            let t = t0 + i * 4 * S;
            readiness.watch_held("Service", t + 4 * S);
            readiness.watch_failed("Service", t);
        }
        let why = readiness.check(t0 + 13 * S).unwrap_err();
        assert!(why.contains("failing for 13 s"), "{why}");
        readiness.watch_succeeded("Service");
        assert_eq!(readiness.check(t0 + 14 * S), Ok(()));
    }
}
