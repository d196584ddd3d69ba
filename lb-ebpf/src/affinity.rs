//! `sessionAffinity: ClientIP` (Cilium's `lb4_affinity_*`): a client that got a backend of
//! an affinity frontend keeps it for its next connections while less than the frontend's
//! timeout passes between them, and while the backend still serves the frontend (the
//! agent's affinity-match entries say so). Otherwise it picks afresh and is remembered.
use lb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, BackendEntry, Counter, FrontendId, ServiceValue,
};

use crate::{
    counters::count,
    maps::{LB_AFFINITY, LB_AFFINITY_MATCH},
    xlate::{self, Backends},
};

/// Who the client is.
#[derive(Clone, Copy)]
pub enum Client {
    /// A network namespace, by cookie (the socket path: a pod, or the host).
    Netns(u64),
    /// A source address in the four-word wire form (the tc paths).
    Addr([u32; 4]),
}

/// The affinity key of `client` for the frontend `rev_nat_id`.
#[inline(always)]
pub fn key(client: Client, rev_nat_id: FrontendId) -> AffinityKey {
    let (client, client_kind) = match client {
        Client::Netns(cookie) => (
            [cookie as u32, (cookie >> 32) as u32, 0, 0],
            lb_common::AFFINITY_CLIENT_NETNS,
        ),
        Client::Addr(addr) => (addr, lb_common::AFFINITY_CLIENT_ADDR),
    };
    AffinityKey {
        client,
        rev_nat_id,
        client_kind,
        pad: [0; 3],
    }
}

/// Now, in the clock affinity entries use: `CLOCK_MONOTONIC` as of the last tick (at most a few
/// milliseconds behind, against timeouts of seconds): the datapath's clock (`clock.rs`).
#[inline(always)]
pub fn now() -> u64 {
    crate::clock::now()
}

/// The backend `key`'s client kept for the frontend `master`, if the entry is fresh and the
/// backend still serves the frontend; refreshes the entry's time (kube-proxy's `recent`
/// list is updated by every new connection through it).
#[inline(always)]
pub fn recall<B: BackendEntry>(
    backends: &Backends<B>,
    key: &AffinityKey,
    master: &ServiceValue,
    now: u64,
) -> Option<(u32, B)> {
    let entry = LB_AFFINITY.get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid for the run of the program.
    let value = unsafe { *entry };
    // The master's `backend_id` field holds the timeout in seconds.
    if value.expired(now, master.backend_id) {
        return None;
    }
    let backend_id = value.backend_id;
    let serves = AffinityMatchKey {
        backend_id,
        rev_nat_id: key.rev_nat_id,
    };
    // SAFETY: presence only.
    unsafe { LB_AFFINITY_MATCH.get(serves) }?;
    let backend = xlate::backend(backends, backend_id)?;
    // SAFETY: as above; a plain store into the value.
    unsafe { (*entry).last_used_ns = now };
    count(Counter::AffinityHits);
    Some((backend_id, backend))
}

/// Records that `key`'s client got `backend_id`.
#[inline(always)]
pub fn remember(key: &AffinityKey, backend_id: u32, now: u64) {
    let value = AffinityValue {
        backend_id,
        pad: 0,
        last_used_ns: now,
    };
    // A failed insert only costs the client its affinity next time.
    let _ = LB_AFFINITY.insert(key, value, 0);
}
