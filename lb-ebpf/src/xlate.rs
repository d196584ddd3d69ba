//! Family-independent service lookup: frontend key in, backend out. The socket hooks in
//! `sock.rs` read and write the addresses; this module only decides.
use aya_ebpf::{
    EbpfContext,
    btf_maps::{Array, HashMap},
    helpers::bpf_get_prandom_u32,
};
use aya_log_ebpf::warn;
use lb_common::{
    BACKENDS_MAX_ENTRIES, Backend4, Backend6, BackendEntry, FrontendId, MAP_F_MMAPABLE,
    MAP_F_NO_PREALLOC, SCOPE_INTERNAL, SERVICES_MAX_ENTRIES, SLOTS_MAX_ENTRIES, SVC_F_AFFINITY,
    SVC_F_NO_LOCAL, SVC_F_TWO_SCOPES, ServiceKey, ServiceValue, SlotValue,
};

use crate::{
    affinity::{self, Client},
    maps::{LB_DRAW, LB_SLOTS},
};

/// A family's services map.
pub type Services<K> = HashMap<K, ServiceValue, SERVICES_MAX_ENTRIES, MAP_F_NO_PREALLOC>;
/// A family's backends map: an array indexed by backend id (a lookup the verifier inlines,
/// no hashing).
pub type Backends<B> = Array<B, BACKENDS_MAX_ENTRIES, MAP_F_MMAPABLE>;
/// The slots array of both families: each master names its range of it.
pub type Slots = Array<SlotValue, SLOTS_MAX_ENTRIES, MAP_F_MMAPABLE>;

/// A family's backend value, as a backend slot may hold it inline (`SlotValue`).
pub trait SlotBackend: BackendEntry {
    /// The backend `slot` holds inline, if it holds one (then the backends map is not read).
    fn inline(slot: &SlotValue) -> Option<Self>;
}

impl SlotBackend for Backend4 {
    #[inline(always)]
    fn inline(slot: &SlotValue) -> Option<Self> {
        slot.inline_backend4()
    }
}

impl SlotBackend for Backend6 {
    #[inline(always)]
    fn inline(_: &SlotValue) -> Option<Self> {
        None
    }
}

/// The backend holding `id`, if one does.
#[inline(always)]
pub fn backend<B: BackendEntry>(backends: &Backends<B>, id: u32) -> Option<B> {
    backends.get(id).copied().filter(BackendEntry::is_present)
}

/// The outcome of a forward lookup.
pub enum Forward<B> {
    /// Not a Service frontend, or one in an inconsistent state: leave the call alone.
    Pass,
    /// A frontend without endpoints: refuse; `drop` when the Service has endpoints, only
    /// none that its Local traffic policy lets this node use (kube-proxy drops those).
    NoBackends { drop: bool, rev_nat_id: FrontendId },
    /// Translate to `backend`; `rev_nat_id` identifies the frontend for the reverse path;
    /// `claimed`: the backend's peer claim names this frontend (the `claim` of [`forward`]).
    To {
        backend: B,
        rev_nat_id: FrontendId,
        why: Why,
        claimed: bool,
    },
}

/// How a backend was chosen (what the monitor shows).
#[derive(Clone, Copy)]
pub struct Why {
    /// The slot picked, `1..=count`; 0 when session affinity kept the client's backend.
    pub slot: u16,
    /// The frontend's backend count.
    pub count: u16,
    /// The frontend master's `SVC_F_*` flags.
    pub flags: u32,
}

/// A backend picked for a frontend: its id, its value, and its slot (0: kept by affinity)
/// at `index` of the slots array; `peer_marked`: the slot carries the frontend's peer mark
/// (see `SlotValue`).
pub struct Picked<B> {
    pub id: u32,
    pub backend: B,
    pub slot: u16,
    pub index: u32,
    pub peer_marked: bool,
}

/// Who is asking: clients outside the cluster get a frontend's external scope, clients
/// inside it (sockets of the node, pods) its internal one where it has two.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    External,
    Internal,
}

/// How a backend slot is chosen.
#[derive(Clone, Copy)]
pub enum Pick {
    /// At random, for each new connection (kube-proxy's `statistic --mode random`).
    Random,
    /// From a per-socket hash, so the datagrams an unconnected UDP socket sends to one
    /// Service keep going to one backend while the backends stay the same, as they would
    /// under kube-proxy's conntrack entry.
    Hash(u32),
}

/// Picks one of the backends of `frontend` (a master key and its entry, as found), for a
/// client inside the cluster. `claim` is asked, unless the picked slot carries the peer mark
/// already, whether the backend's peer claim names this frontend (the socket path's TCP
/// connects take it; others answer false); a yes marks the slot, so the next connection
/// through it need not ask.
#[inline(always)]
pub fn forward<C: EbpfContext, K: ServiceKey, B: SlotBackend>(
    ctx: &C,
    services: &Services<K>,
    backends: &Backends<B>,
    frontend: Option<(K, ServiceValue)>,
    pick: Pick,
    client: impl FnOnce() -> Client,
    claim: impl FnOnce(&B, FrontendId) -> bool,
) -> Forward<B> {
    let Some((_, master)) = frontend.map(|(k, m)| in_scope(services, k, m, Scope::Internal)) else {
        return Forward::Pass;
    };
    if master.count == 0 {
        return Forward::NoBackends {
            drop: master.flags & SVC_F_NO_LOCAL != 0,
            rev_nat_id: master.rev_nat_id,
        };
    }
    match pick_for(ctx, backends, &master, pick, client) {
        Some(picked) => {
            let claimed = picked.peer_marked || {
                let claimed = claim(&picked.backend, master.rev_nat_id);
                if claimed && picked.slot > 0 {
                    mark_peer(&LB_SLOTS, picked.index, master.rev_nat_id);
                }
                claimed
            };
            Forward::To {
                backend: picked.backend,
                rev_nat_id: master.rev_nat_id,
                why: Why {
                    slot: picked.slot,
                    count: master.count,
                    flags: master.flags,
                },
                claimed,
            }
        }
        None => Forward::Pass,
    }
}

/// The master entry of the frontend `frontend` (whose external-scope master is `master`)
/// for clients of `scope`, and its key.
#[inline(always)]
pub fn in_scope<K: ServiceKey>(
    services: &Services<K>,
    frontend: K,
    master: ServiceValue,
    scope: Scope,
) -> (K, ServiceValue) {
    if scope == Scope::Internal && master.flags & SVC_F_TWO_SCOPES != 0 {
        let key = frontend.with_scope(SCOPE_INTERNAL);
        // The writer adds the in-cluster master before the external one names it, and
        // removes it only after the external one stopped; a foreign writer's missing twin
        // falls back to the external entry.
        if let Some(internal) = lookup(services, &key) {
            return (key, internal);
        }
    }
    (frontend, master)
}

/// Picks a backend of the frontend of `master` for `client`: the one it keeps under
/// session affinity, else one of [`pick_backend`] (then remembered when the frontend has
/// affinity). `client` is asked only under affinity.
#[inline(always)]
pub fn pick_for<C: EbpfContext, B: SlotBackend>(
    ctx: &C,
    backends: &Backends<B>,
    master: &ServiceValue,
    pick: Pick,
    client: impl FnOnce() -> Client,
) -> Option<Picked<B>> {
    if master.flags & SVC_F_AFFINITY == 0 {
        return pick_backend(ctx, backends, master, pick);
    }
    let affinity_key = affinity::key(client(), master.rev_nat_id);
    let now = affinity::now();
    if let Some((id, backend)) = affinity::recall(backends, &affinity_key, master, now) {
        return Some(Picked {
            id,
            backend,
            slot: 0,
            index: 0,
            peer_marked: false,
        });
    }
    let picked = pick_backend(ctx, backends, master, pick)?;
    affinity::remember(&affinity_key, picked.id, now);
    Some(picked)
}

/// Picks one of the `master.count` (at least one) backends of the frontend of `master`:
/// its slot is an entry of the slots array, read at an offset the verifier inlines.
#[inline(always)]
pub fn pick_backend<C: EbpfContext, B: SlotBackend>(
    ctx: &C,
    backends: &Backends<B>,
    master: &ServiceValue,
    pick: Pick,
) -> Option<Picked<B>> {
    // A frontend with one backend needs no draw.
    let slot = if master.count == 1 {
        1
    } else {
        let seed = match pick {
            Pick::Random => draw(),
            Pick::Hash(hash) => hash,
        };
        master.slot_for(seed)
    };
    let index = master.slot_index(slot);
    let Some(entry) = LB_SLOTS.get(index).copied() else {
        slot_missing(ctx, master.count, slot);
        return None;
    };
    let backend = match B::inline(&entry) {
        Some(backend) => backend,
        None => backend(backends, entry.backend_id)?,
    };
    Some(Picked {
        id: entry.backend_id,
        backend,
        slot,
        index,
        peer_marked: entry.peer_marked_for(master.rev_nat_id),
    })
}

/// A random 32-bit number for a backend draw: a step of this CPU's xorshift64* generator
/// (`lb_common::draw_step`) on a per-CPU array entry the verifier inlines, where
/// `bpf_get_prandom_u32` is a helper call on every connection. Seeded by the helper on a
/// CPU's first draw. (A program interrupting another on the same CPU may draw the same
/// number: two connections then share a backend, which a random draw may do anyway.)
#[inline(always)]
pub fn draw() -> u32 {
    let Some(state) = LB_DRAW.get_ptr_mut(0) else {
        // SAFETY: helper without arguments.
        return unsafe { bpf_get_prandom_u32() };
    };
    // SAFETY: this CPU's entry, valid for the run of the program.
    let mut x = unsafe { *state };
    if x == 0 {
        // SAFETY: helper without arguments. The high half keeps the state non-zero.
        x = u64::from(unsafe { bpf_get_prandom_u32() }) | 1 << 32;
    }
    let (next, drawn) = lb_common::draw_step(x);
    // SAFETY: as above.
    unsafe { *state = next };
    drawn
}

/// A master never names slots past the array's end: say so if it happens. Not inlined:
/// the log call's code stays out of the connect path.
#[inline(never)]
fn slot_missing<C: EbpfContext>(ctx: &C, count: u16, slot: u16) {
    warn!(
        ctx,
        "lb: slot {} of a frontend's {} is past the slots array", slot, count
    );
}

/// Puts the peer mark of frontend `rev_nat_id` on its backend slot at `index` of the slots
/// array. The agent writes a new range for each change and never writes a slot a master
/// names, so the mark lands on the slot it was meant for, or on a retired one (should that
/// be handed out again, a mark naming another frontend means nothing there: a slot counts
/// as marked only for the frontend whose id it holds).
#[inline(always)]
fn mark_peer(slots: &Slots, index: u32, rev_nat_id: FrontendId) {
    if let Some(entry) = slots.get_ptr_mut(index) {
        // SAFETY: a map value; a concurrent reader sees the old or the new word.
        unsafe { core::ptr::write_volatile(&raw mut (*entry).peer_mark, rev_nat_id) };
    }
}

/// Whether `frontend` (as found, and as a client inside the cluster sees it) still exists
/// as the frontend `rev_nat_id` named: a reverse-NAT entry made for a frontend since
/// deleted (or replaced) must not be used.
#[inline(always)]
pub fn frontend_is_current<K: ServiceKey>(
    services: &Services<K>,
    frontend: Option<(K, ServiceValue)>,
    rev_nat_id: FrontendId,
) -> bool {
    frontend
        .is_some_and(|(k, m)| in_scope(services, k, m, Scope::Internal).1.rev_nat_id == rev_nat_id)
}

#[inline(always)]
fn lookup<K: ServiceKey>(services: &Services<K>, key: &K) -> Option<ServiceValue> {
    // SAFETY: the value is copied out before any other map operation.
    unsafe { services.get(key) }.copied()
}
