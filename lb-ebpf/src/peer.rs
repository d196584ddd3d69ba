//! The peers map (`lb_common::PeerKey`): which frontend a backend's TCP sockets dialled,
//! claimed by the first connection, so that later ones need no per-socket record.
use lb_common::{FrontendId, PROTO_TCP, PeerKey, PeerValue};

use crate::maps::LB_PEERS;

/// `BPF_NOEXIST`: only a backend nobody claimed is claimed.
const BPF_NOEXIST: u64 = 1;

/// Whether `backend`'s claim names `frontend` `id`, taking the claim for it if the
/// backend has none: then a TCP socket to `backend` through `frontend` needs no record of
/// its own.
#[inline(always)]
pub fn claimed_for(backend: ([u32; 4], u16), frontend: ([u32; 4], u16), id: FrontendId) -> bool {
    let key = key(backend);
    // SAFETY: compared at once.
    if let Some(claim) = unsafe { LB_PEERS.get(key) } {
        return claim.rev_nat_id == id && claim.address == frontend.0 && claim.port == frontend.1;
    }
    let claim = PeerValue {
        address: frontend.0,
        port: frontend.1,
        pad: 0,
        rev_nat_id: id,
    };
    // Two first connections at once: the one that lost writes its record.
    LB_PEERS.insert(key, claim, BPF_NOEXIST).is_ok()
}

/// Whether some frontend claimed `backend`.
#[inline(always)]
pub fn is_claimed(backend: ([u32; 4], u16)) -> bool {
    LB_PEERS.get_ptr(key(backend)).is_some()
}

/// The frontend (address, port, id) that claimed `backend`, if any.
#[inline(always)]
pub fn claim_of(backend: ([u32; 4], u16)) -> Option<([u32; 4], u16, FrontendId)> {
    // SAFETY: copied out at once.
    let claim = unsafe { LB_PEERS.get(key(backend)) }.copied()?;
    Some((claim.address, claim.port, claim.rev_nat_id))
}

#[inline(always)]
fn key((address, port): ([u32; 4], u16)) -> PeerKey {
    PeerKey {
        address,
        port,
        proto: PROTO_TCP,
        pad: 0,
    }
}
