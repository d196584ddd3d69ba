//! The slots array's space: each frontend's slots take one range of consecutive entries,
//! which its master names (`lb_common::ServiceValue::base`).
//!
//! A frontend whose backends change gets a new range, written before its master flips to
//! it; the old one is *retired*: free only once no connect can still be reading it through
//! the old master. A BPF program reads the master and then the slot within one run, under
//! RCU, so the old range is kept out of use for [`GRACE`] after the apply that flipped the
//! master ended. Only when the array has no other room is a cooling range handed out
//! earlier (a connect would then need to stall for the whole apply between its two reads to
//! see a slot of another frontend).
//!
//! Free space is kept as ranges by start (to merge a freed range with its neighbours) and by
//! length (best fit: the smallest free range that holds the request, which keeps large
//! ranges whole for large Services).
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// How long a retired range stays out of use after the apply that retired it.
pub const GRACE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct SlotRanges {
    /// Entries of the array.
    capacity: u32,
    /// Free ranges: start to length.
    free: BTreeMap<u32, u32>,
    /// The same ranges as (length, start).
    by_len: BTreeSet<(u32, u32)>,
    /// Ranges retired in the apply in progress: its masters may still name them.
    retiring: Vec<(u32, u32)>,
    /// Retired ranges and when their apply ended, oldest first.
    cooling: VecDeque<(Instant, u32, u32)>,
    /// Entries in ranges handed out (retiring and cooling ones included).
    used: u32,
}

impl SlotRanges {
    /// An empty array of `capacity` entries.
    pub fn new(capacity: u32) -> Self {
        let mut ranges = Self {
            capacity,
            free: BTreeMap::new(),
            by_len: BTreeSet::new(),
            retiring: Vec::new(),
            cooling: VecDeque::new(),
            used: 0,
        };
        ranges.insert_free(0, capacity);
        ranges
    }

    /// Starts again from an empty array, for the writer re-reading the maps: it reserves
    /// the ranges the masters name, then calls [`Self::reserve_cooling`].
    pub fn reset(&mut self) {
        // Ranges retired by an apply that failed midway cool from now (their masters may
        // have flipped already).
        self.end_apply(Instant::now());
        let cooling = std::mem::take(&mut self.cooling);
        *self = Self::new(self.capacity);
        self.cooling = cooling;
    }

    /// After a [`Self::reset`]: keeps the ranges that were cooling out of use for the rest
    /// of their grace period (a master may have named them a moment ago), except those a
    /// master names again.
    pub fn reserve_cooling(&mut self) {
        let cooling = std::mem::take(&mut self.cooling);
        for (at, base, len) in cooling {
            if self.reserve(base, len) {
                self.cooling.push_back((at, base, len));
            }
        }
    }

    /// The array's entries.
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries held by ranges in use or cooling.
    pub const fn used(&self) -> u32 {
        self.used
    }

    /// Takes the range `base..base + len` (an adopted master's): false when it is not
    /// wholly free (past the end, or overlapping a range taken already).
    pub fn reserve(&mut self, base: u32, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = base.checked_add(len) else {
            return false;
        };
        let Some((&start, &free_len)) = self.free.range(..=base).next_back() else {
            return false;
        };
        if start + free_len < end {
            return false;
        }
        self.remove_free(start, free_len);
        self.insert_free(start, base - start);
        self.insert_free(end, start + free_len - end);
        self.used += len;
        true
    }

    /// A free range of `len` entries (`len` > 0), its start; `None` when no free range is
    /// long enough. Ranges that cooled for [`GRACE`] are freed first; when no range fits
    /// even then, every cooling range is freed and the search runs once more.
    pub fn allocate(&mut self, len: u32, now: Instant) -> Option<u32> {
        self.release_cooled(now);
        if let Some(base) = self.best_fit(len) {
            return Some(base);
        }
        if self.cooling.is_empty() {
            return None;
        }
        tracing::debug!(
            len,
            cooling = self.cooling.len(),
            "slots array full: retired ranges reused before their grace period"
        );
        while let Some((_, base, cooled)) = self.cooling.pop_front() {
            self.release(base, cooled);
        }
        self.best_fit(len)
    }

    /// Marks `base..base + len` as no longer named once the apply in progress ends.
    pub fn retire(&mut self, base: u32, len: u32) {
        if len > 0 {
            self.retiring.push((base, len));
        }
    }

    /// Frees a range no master ever named (a write undone).
    pub fn free_now(&mut self, base: u32, len: u32) {
        if len > 0 {
            self.release(base, len);
        }
    }

    /// The apply ended at `now`: the ranges it retired start cooling.
    pub fn end_apply(&mut self, now: Instant) {
        for (base, len) in self.retiring.drain(..) {
            self.cooling.push_back((now, base, len));
        }
    }

    /// A description of the free space, for a refusal: the largest free range.
    pub fn largest_free(&self) -> u32 {
        self.by_len.last().map_or(0, |&(len, _)| len)
    }

    fn release_cooled(&mut self, now: Instant) {
        while let Some(&(at, base, len)) = self.cooling.front() {
            if now.saturating_duration_since(at) < GRACE {
                break;
            }
            self.cooling.pop_front();
            self.release(base, len);
        }
    }

    fn best_fit(&mut self, len: u32) -> Option<u32> {
        let &(free_len, start) = self.by_len.range((len, 0)..).next()?;
        self.remove_free(start, free_len);
        self.insert_free(start + len, free_len - len);
        self.used += len;
        Some(start)
    }

    /// Returns `base..base + len` to the free space, merged with its free neighbours.
    fn release(&mut self, base: u32, len: u32) {
        self.used -= len;
        let (mut start, mut end) = (base, base + len);
        if let Some((&before, &before_len)) = self.free.range(..base).next_back()
            && before + before_len == base
        {
            self.remove_free(before, before_len);
            start = before;
        }
        if let Some(&after_len) = self.free.get(&end) {
            self.remove_free(end, after_len);
            end += after_len;
        }
        self.insert_free(start, end - start);
    }

    fn insert_free(&mut self, start: u32, len: u32) {
        if len > 0 {
            self.free.insert(start, len);
            self.by_len.insert((len, start));
        }
    }

    fn remove_free(&mut self, start: u32, len: u32) {
        self.free.remove(&start);
        self.by_len.remove(&(len, start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_range_that_fits_is_handed_out_and_freed_ranges_merge() {
        let now = Instant::now();
        let mut ranges = SlotRanges::new(100);
        let a = ranges.allocate(10, now).unwrap();
        let b = ranges.allocate(5, now).unwrap();
        let c = ranges.allocate(10, now).unwrap();
        assert_eq!((a, b, c), (0, 10, 15));
        assert_eq!(ranges.used(), 25);
        ranges.free_now(b, 5);
        // The 5-entry hole fits 4 entries better than the tail of 75.
        assert_eq!(ranges.allocate(4, now), Some(10));
        ranges.free_now(10, 4);
        ranges.free_now(a, 10);
        ranges.free_now(c, 10);
        assert_eq!(ranges.used(), 0);
        assert_eq!(ranges.largest_free(), 100, "all merged into one range");
        assert_eq!(ranges.allocate(101, now), None);
        assert_eq!(ranges.allocate(100, now), Some(0));
    }

    #[test]
    fn a_retired_range_is_handed_out_again_only_after_its_grace_period() {
        let start = Instant::now();
        let mut ranges = SlotRanges::new(20);
        let old = ranges.allocate(10, start).unwrap();
        ranges.retire(old, 10);
        let new = ranges.allocate(10, start).unwrap();
        assert_ne!(old, new, "not reused within its apply");
        ranges.end_apply(start);
        ranges.free_now(new, 10);
        assert_eq!(
            ranges.allocate(10, start),
            Some(new),
            "a cooling range is not handed out while another fits"
        );
        assert_eq!(ranges.allocate(10, start + GRACE), Some(old));
    }

    #[test]
    fn a_full_array_reuses_a_cooling_range_rather_than_refuse() {
        let now = Instant::now();
        let mut ranges = SlotRanges::new(10);
        let old = ranges.allocate(10, now).unwrap();
        ranges.retire(old, 10);
        assert_eq!(ranges.allocate(1, now), None, "still named in its apply");
        ranges.end_apply(now);
        assert_eq!(ranges.allocate(10, now), Some(old));
    }

    #[test]
    fn adopted_ranges_are_reserved_and_overlaps_refused() {
        let mut ranges = SlotRanges::new(100);
        assert!(ranges.reserve(20, 10));
        assert!(!ranges.reserve(25, 10), "overlaps 20..30");
        assert!(!ranges.reserve(95, 10), "past the end");
        assert!(ranges.reserve(0, 20));
        assert_eq!(ranges.used(), 30);
        assert_eq!(ranges.allocate(70, Instant::now()), Some(30));
    }

    #[test]
    fn cooling_ranges_survive_a_reset() {
        let now = Instant::now();
        let mut ranges = SlotRanges::new(10);
        let old = ranges.allocate(10, now).unwrap();
        ranges.retire(old, 10);
        ranges.end_apply(now);
        ranges.reset();
        ranges.reserve_cooling();
        assert_eq!(ranges.used(), 10);
        assert_eq!(ranges.allocate(10, now + GRACE), Some(old));
    }
}
