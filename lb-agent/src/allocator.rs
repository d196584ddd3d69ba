//! The agent's memory allocator: mimalloc, set up to hand freed memory back to the kernel at
//! once.
//!
//! glibc's malloc had to be held to one arena (`M_ARENA_MAX=1`), or per-thread arenas kept
//! the initial list's peak resident long after it was freed; with one arena, the threads
//! that parse manifests and decode the API server's lists queued on its lock (a sixth of
//! their time in futex waits). mimalloc gives each thread its own heap, and with the two
//! options below its resident memory stays at or below glibc's single arena: measured with
//! `lb-watch-bench --services 100000 --endpoints 10` and 10,000 / 100,000 Services from
//! YAML (docs/architecture.md, "Memory").
use std::ffi::c_long;

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay`: their places in
/// `mi_option_e` (mimalloc.h, v2 and v3 alike); libmimalloc-sys names only the older
/// options.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets the allocator's options; call before mimalloc starts (the binary does it from an ELF
/// constructor), when no other thread exists.
/// - No eager commit of the arenas mimalloc reserves: memory is committed as it is used
///   (an empty agent otherwise holds ~48 MiB instead of ~19 MiB).
/// - Freed pages are purged (returned to the kernel) at once instead of after a delay, so
///   the initial sync's transient objects do not stay resident.
pub fn configure() {
    set(ARENA_EAGER_COMMIT, 0);
    set(PURGE_DELAY, 0);
}

fn set(option: libmimalloc_sys::mi_option_t, value: c_long) {
    // SAFETY: mi_option_set takes any option number and value; called before other threads
    // allocate (mimalloc's options are not synchronised).
    unsafe { libmimalloc_sys::mi_option_set(option, value) };
}

/// Hands the heap's free pages back to the kernel. The initial list passes through the heap
/// once (kube-rs pages, our relist buffer, the parsed manifests): without this the agent's
/// RSS could keep that peak for the rest of its life.
pub fn release_free_memory() {
    // SAFETY: mi_collect has no preconditions; `true` also collects other threads'
    // abandoned pages.
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
