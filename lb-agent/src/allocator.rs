//! The agent's memory allocator: mimalloc, set up to hand freed memory back to the kernel
//! once the initial lists are read, and at once from then on.
//!
//! glibc's malloc had to be held to one arena (`M_ARENA_MAX=1`), or per-thread arenas kept
//! the initial list's peak resident long after it was freed; with one arena, the threads
//! that parse manifests and decode the API server's lists queued on its lock (a sixth of
//! their time in futex waits). mimalloc gives each thread its own heap, and with the
//! options below its resident memory stays at or below glibc's single arena: measured with
//! `lb-watch-bench --services 100000 --endpoints 10` and 10,000 / 100,000 Services from
//! YAML (docs/architecture.md, "Memory").
use std::{
    cell::Cell,
    ffi::c_long,
    sync::atomic::{AtomicU64, Ordering},
};

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay`: their places in
/// `mi_option_e` (mimalloc.h, v2 and v3 alike); libmimalloc-sys names only the older
/// options.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed pages stay committed before they are purged while the initial lists are
/// read: they pass through the heap page after page (kube-rs decodes each list page
/// whole), and purging each page's memory at once made the next one fault it in again — a
/// fifth of the agent's CPU time at 100,000 Services × 10. With the delay the agent took
/// 3.6–4.1 s of CPU to its first write instead of 5.0–6.3 (`lb-watch-bench`, the runs of
/// 2026-12-07 that measured both), at the same RSS after the sync and peak.
const STARTUP_PURGE_DELAY_MS: c_long = 1_000;

/// The purge delay once the lists are read: none, so an idle agent holds no freed page.
/// At 0 mimalloc no longer purges what the startup delay scheduled (it expects nothing to
/// be), so [`release_free_memory`] purges that first; what another thread frees between
/// the two steps stays committed until it is reused, a few pages at most. (A delay of
/// 1 ms instead left whatever was freed last before idling resident: 240–256 MB after the
/// same 20 events, against 240–245 MB at 0.)
const PURGE_DELAY_MS: c_long = 0;

/// Sets the allocator's options; call before mimalloc starts (the binary does it from an ELF
/// constructor), when no other thread exists.
/// - No eager commit of the arenas mimalloc reserves: memory is committed as it is used
///   (an empty agent otherwise holds ~48 MiB instead of ~19 MiB).
/// - Freed pages are purged (returned to the kernel) after [`STARTUP_PURGE_DELAY_MS`]
///   until [`release_free_memory`] runs, when the initial lists are read; from then on at
///   once ([`PURGE_DELAY_MS`]), so the translation's memory does not come on top of the
///   lists' and a relist's transient objects do not stay resident.
pub fn configure() {
    set(ARENA_EAGER_COMMIT, 0);
    set(PURGE_DELAY, STARTUP_PURGE_DELAY_MS);
}

fn set(option: libmimalloc_sys::mi_option_t, value: c_long) {
    // SAFETY: mi_option_set takes any option number and value. An option is a plain
    // aligned `long` that mimalloc stores and reads without atomics, so setting one while
    // other threads allocate is formally a data race in C11; mimalloc has no atomic setter,
    // and on the targets the agent runs on (x86-64, arm64) such a word is read whole, old
    // or new, at each thread's next purge decision.
    unsafe { libmimalloc_sys::mi_option_set(option, value) };
}

/// Hands the calling thread's free pages back to the kernel, with every page waiting for
/// its purge delay. The initial list passes through the heap once (kube-rs pages, our
/// relist buffer, the parsed manifests): without this the agent's RSS could keep that peak
/// for the rest of its life. From here on freed pages are purged at once, and each runtime
/// worker hands back its own heap's free pages the next time it goes idle
/// ([`on_worker_park`]).
pub fn release_free_memory() {
    collect();
    set(PURGE_DELAY, PURGE_DELAY_MS);
    COLLECT_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Bumped by [`release_free_memory`]: each worker collects once per bump.
static COLLECT_EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COLLECTED_EPOCH: Cell<u64> = const { Cell::new(0) };
}

/// For the runtime's `on_thread_park`: a worker about to idle hands its heap's free pages
/// back when [`release_free_memory`] asked for it since it last did (`mi_collect` reaches
/// the calling thread's pages only: the decoding workers' are out of reach of the thread
/// that asks).
pub fn on_worker_park() {
    let epoch = COLLECT_EPOCH.load(Ordering::Relaxed);
    if COLLECTED_EPOCH.replace(epoch) != epoch {
        collect();
    }
}

fn collect() {
    // SAFETY: mi_collect has no preconditions. `true` frees the calling thread's empty
    // pages and purges what waits for its delay (while the delay is not 0, and unless
    // another thread is purging at that moment: mimalloc runs one purge at a time).
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_numbers_are_those_of_eager_commit_and_purge_delay() {
        // Read before anything sets them: the two options' documented defaults (eager
        // commit 2, "on overcommitting systems"; purge delay 1,000 in mimalloc 3) are
        // distinctive, so a version that renumbered its options would read back others.
        // SAFETY: mi_option_get takes any option number.
        let defaults = unsafe {
            (
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
            )
        };
        assert_eq!(defaults, (2, 1000));
    }
}
