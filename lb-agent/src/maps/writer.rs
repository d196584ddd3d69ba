//! The one writer of the maps: it holds what is programmed, and turns each new desired
//! state into the smallest ordered set of map operations.
//!
//! Order (Cilium's `lb.h` discipline), as eight phases over all the frontends of one apply:
//! removed frontends lose their master first (connects stop using them), then new backends
//! are created, then each changed frontend's slots are written into a new range of the
//! slots array (copy-on-write: a slot a master names is never written), then masters naming
//! their new ranges and counts; only then do stale affinity-match and source-range entries
//! go, and backends no frontend uses last. The ranges masters stopped naming are freed
//! after a grace period ([`slot_ranges`]). Within a phase no operation depends on another,
//! so a phase can go to the kernel as one batch.
//!
//! The in-cluster twin of an `externalTrafficPolicy: Local` frontend (its
//! [`Scope::Internal`](crate::model::Scope) entry, which in-cluster clients use while the
//! external master says `SVC_F_TWO_SCOPES`) has phases of its own around the masters': it
//! is written before the external master turns the flag on, and removed only after the
//! external master turned it off and names every endpoint. So switching the policy either
//! way never shows in-cluster clients the node-local endpoints only, not even if the agent
//! dies between two phases.
//! [`super::fake::FakeMaps`] checks, after every single operation, that no master ever
//! names a missing slot or backend, and that no slot a master names is written.
use std::collections::{BTreeMap, BTreeSet};

use crate::fast_hash::{HashMap, HashSet};

use lb_common::{SLOTS_MAP, ServiceValue};
use tracing::{debug, warn};

use super::{LbMaps, MapError, Op, Result, dump};

/// The phases of an apply, in the order they run.
const DROP_MASTERS: usize = 0;
const NEW_BACKENDS: usize = 1;
const SLOTS: usize = 2;
const INTERNAL_MASTERS: usize = 3;
const MASTERS: usize = 4;
const DROP_INTERNAL_MASTERS: usize = 5;
/// Affinity-match and source-range entries no master needs any more.
const DROP_STALE: usize = 6;
const DROP_BACKENDS: usize = 7;
/// The number of phases.
const PHASES: usize = 8;
/// The phases a large apply writes as it goes (see [`MapWriter::flush_upserts`]).
const UPSERT_PHASES: std::ops::RangeInclusive<usize> = DROP_MASTERS..=MASTERS;
/// Planned operations at which a large apply writes the upserts planned so far: about
/// 3 MiB of operations instead of 90 MiB for a first sync of 100,000 Services × 10.
const FLUSH_EVERY: usize = 65_536;
use crate::model::{Backend, BackendList, DesiredState, Frontend, L4Addr, ObjectRef, Protocol};
use crate::stale::StaleBackend;
use backend_table::{BackendRecord, BackendTable};
use slot_ranges::SlotRanges;
use std::net::SocketAddr;

/// Failpoint before each phase of an apply goes to the maps (see [`fail`]): `return`
/// makes that phase fail as a refused write would, after the phases before it were written.
pub const FAIL_PHASE: &str = "writer::phase";
/// Failpoint before each single operation of the frontend-by-frontend path (after a map
/// turned out full).
pub const FAIL_OP: &str = "writer::op";

/// The error an injected failure returns: `EIO`, which no map write means as "full".
#[allow(
    dead_code,
    reason = "called only where fail's `failpoints` feature compiles the failpoints in"
)]
fn injected(op: &'static str) -> MapError {
    MapError {
        op,
        map: "failpoint",
        source: std::io::Error::from_raw_os_error(libc::EIO),
    }
}

/// A frontend as it is in the maps: 48 bytes, one per frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    rev_nat_id: lb_common::FrontendId,
    flags: u32,
    /// Backend ids by slot, `slots[0]` being slot 1: entries `base..base + slots.len()` of
    /// the slots array, a range this frontend owns.
    slots: Box<[u32]>,
    /// Where the master's range starts (0 with no slots).
    base: u32,
    /// The backend count the master entry holds: `slots.len()`, except after adopting a
    /// master whose slots name missing backends or another frontend's range (then `slots`
    /// is empty, and the next apply writes a new range even when nothing else changed).
    master_count: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds; every slot's backend then has an
    /// affinity-match entry.
    affinity: Option<u32>,
    /// What few frontends have (`None`: nothing).
    rare: Option<Box<Rare>>,
}

/// The parts of a programmed frontend that few have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rare {
    /// `loadBalancerSourceRanges` entries of the frontend.
    source_ranges: BTreeSet<ipnet::IpNet>,
    /// An adopted master whose slots are unusable (`slots` empty) still names its range,
    /// `base..base + unusable_range`: the frontend owns it until a new master stops naming
    /// it (0: no such range, or one another master named first).
    unusable_range: u32,
}

static NO_SOURCE_RANGES: BTreeSet<ipnet::IpNet> = BTreeSet::new();

impl Programmed {
    /// A frontend whose master is not written yet.
    fn new(rev_nat_id: lb_common::FrontendId, flags: u32) -> Self {
        Self {
            rev_nat_id,
            flags,
            slots: Box::default(),
            base: 0,
            master_count: 0,
            affinity: None,
            rare: None,
        }
    }

    fn source_ranges(&self) -> &BTreeSet<ipnet::IpNet> {
        self.rare
            .as_ref()
            .map_or(&NO_SOURCE_RANGES, |r| &r.source_ranges)
    }

    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }

    /// Sets what few frontends have, holding nothing when it is nothing.
    fn set_rare(&mut self, source_ranges: BTreeSet<ipnet::IpNet>) {
        self.rare = (!source_ranges.is_empty()).then(|| {
            Box::new(Rare {
                source_ranges,
                unusable_range: 0,
            })
        });
    }

    /// The length of the slots range this frontend owns, from `base`: its slots', or an
    /// adopted unusable one's.
    fn owned_len(&self) -> u32 {
        if self.intact() {
            u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
        } else {
            self.rare.as_ref().map_or(0, |r| r.unusable_range)
        }
    }

    /// Whether the master names exactly the slots recorded (not so after adopting a
    /// master whose slots could not be used).
    fn intact(&self) -> bool {
        usize::from(self.master_count) == self.slots.len()
    }
}

/// What one apply changed, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_added: usize,
    pub frontends_updated: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub map_writes: usize,
    pub map_deletes: usize,
}

impl ApplyStats {
    fn add(&mut self, other: &Self) {
        self.frontends_added += other.frontends_added;
        self.frontends_updated += other.frontends_updated;
        self.frontends_removed += other.frontends_removed;
        self.backends_added += other.backends_added;
        self.backends_removed += other.backends_removed;
        self.map_writes += other.map_writes;
        self.map_deletes += other.map_deletes;
    }

    #[must_use]
    pub const fn is_noop(&self) -> bool {
        self.map_writes == 0 && self.map_deletes == 0
    }
}

/// Owns the maps and the record of what they hold.
#[derive(Debug)]
pub struct MapWriter<M> {
    maps: M,
    frontends: BTreeMap<L4Addr, Programmed>,
    /// Each backend by id, with the number of slots naming it.
    backends: BackendTable,
    /// The slots array's space.
    slot_ranges: SlotRanges,
    rev_nat_ids: BTreeSet<lb_common::FrontendId>,
    /// Operations of the apply in progress, by phase.
    plan: [Vec<Op>; PHASES],
    /// Frontend ids whose clients' affinity entries go at the end of the apply in progress.
    forget_affinity: BTreeSet<lb_common::FrontendId>,
    /// Backends UDP frontends stopped using since [`Self::take_stale_udp`] was last called.
    stale_udp: Vec<StaleBackend>,
    /// Frontend ids freed in the apply in progress (not handed out again before it ends).
    cooling_rev_nat_ids: BTreeSet<lb_common::FrontendId>,
    /// The frontends the last apply could not program.
    refused: BTreeMap<L4Addr, Refused>,
    /// The highest ids handed out (the maps' widths; lower in tests).
    max_rev_nat_id: lb_common::FrontendId,
    max_backend_id: u32,
    /// [`FLUSH_EVERY`] (lower in tests).
    flush_every: usize,
}

impl<M: LbMaps> MapWriter<M> {
    /// Takes over maps that may already hold entries (written by a previous agent): what
    /// is there is recorded as programmed, so the first apply changes only what differs.
    ///
    /// # Errors
    /// When the maps cannot be read.
    pub fn adopt(maps: M) -> Result<Self> {
        let slot_capacity = maps
            .capacity(SLOTS_MAP)
            .map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX));
        let mut writer = Self {
            maps,
            frontends: BTreeMap::new(),
            backends: BackendTable::default(),
            slot_ranges: SlotRanges::new(slot_capacity),
            rev_nat_ids: BTreeSet::new(),
            plan: Default::default(),
            forget_affinity: BTreeSet::new(),
            stale_udp: Vec::new(),
            cooling_rev_nat_ids: BTreeSet::new(),
            refused: BTreeMap::new(),
            max_rev_nat_id: lb_common::FrontendId::MAX,
            max_backend_id: u32::MAX,
            flush_every: FLUSH_EVERY,
        };
        writer.readopt()?;
        Ok(writer)
    }

    /// Forgets the record and reads it back from the maps: after a failed write the record
    /// may be ahead of the maps, and the next full apply must start from what is there.
    ///
    /// # Errors
    /// When the maps cannot be read.
    pub fn readopt(&mut self) -> Result<()> {
        let contents = dump::read(&self.maps)?;
        self.frontends.clear();
        self.backends.clear();
        self.rev_nat_ids.clear();
        self.plan = Default::default();
        self.slot_ranges.reset();
        for (&id, &backend) in &contents.backends {
            // Two ids for one backend can only come from a foreign writer: keep the first,
            // the other is dropped as unused.
            self.backends.insert(id, backend);
        }
        for entry in contents.frontends {
            let mut slots: Vec<u32> = entry
                .slots
                .iter()
                .map_while(|slot| slot.backend.map(|_| slot.backend_id))
                .collect();
            let whole = slots.len() == usize::from(entry.count);
            let reserved = self
                .slot_ranges
                .reserve(entry.slot_base, u32::from(entry.count));
            let mut unusable_range = 0;
            if !(whole && reserved) {
                // Slots naming missing backends, or a range another master names too (only a
                // foreign writer leaves either): the next apply writes a new range. The old
                // one stays reserved while the master names it.
                warn!(frontend = %entry.address, "adopted frontend's backend slots are unusable");
                if reserved {
                    unusable_range = u32::from(entry.count);
                }
                slots.clear();
            }
            for id in &slots {
                self.backends.add_ref(*id);
            }
            self.rev_nat_ids.insert(entry.rev_nat_id);
            let mut programmed = Programmed {
                slots: slots.into_boxed_slice(),
                base: entry.slot_base,
                master_count: entry.count,
                affinity: entry.affinity_timeout,
                ..Programmed::new(entry.rev_nat_id, entry.flags)
            };
            if unusable_range > 0 {
                programmed.rare_mut().unusable_range = unusable_range;
            }
            self.frontends.insert(entry.address, programmed);
        }
        // Ranges retired before (by this writer) stay out of use for their grace period.
        self.slot_ranges.reserve_cooling();
        // The affinity-match map must hold exactly the slots of the affinity frontends
        // adopted; a missing entry only costs a client its affinity, so the fix-up order
        // does not matter.
        let wanted: BTreeSet<(u32, lb_common::FrontendId)> = self
            .frontends
            .values()
            .filter(|p| p.affinity.is_some())
            .flat_map(|p| p.slots.iter().map(|id| (*id, p.rev_nat_id)))
            .collect();
        let present: BTreeSet<(u32, lb_common::FrontendId)> =
            contents.affinity_matches.iter().copied().collect();
        for &(id, rev_nat_id) in present.difference(&wanted) {
            self.maps.delete_affinity_match(id, rev_nat_id)?;
        }
        for &(id, rev_nat_id) in wanted.difference(&present) {
            self.maps.set_affinity_match(id, rev_nat_id)?;
        }
        // Source ranges belong to the frontend of their id; those of no frontend go.
        let mut by_id: HashMap<lb_common::FrontendId, &mut Programmed> = self
            .frontends
            .values_mut()
            .map(|p| (p.rev_nat_id, p))
            .collect();
        for (rev_nat_id, range) in contents.source_ranges {
            match by_id.get_mut(&rev_nat_id) {
                Some(p) => {
                    p.rare_mut().source_ranges.insert(range);
                }
                None => self.maps.delete_source_range(rev_nat_id, range)?,
            }
        }
        debug!(
            frontends = self.frontends.len(),
            backends = self.backends.len(),
            "adopted map contents"
        );
        Ok(())
    }

    /// The backends UDP frontends stopped using in the applies since the last call: their
    /// connected sockets and tracked flows are to be ended ([`crate::stale`]).
    pub fn take_stale_udp(&mut self) -> Vec<StaleBackend> {
        std::mem::take(&mut self.stale_udp)
    }

    /// Records that the UDP frontend `old` no longer uses the backends of `ids`.
    fn note_stale(
        &mut self,
        address: &L4Addr,
        rev_nat_id: lb_common::FrontendId,
        ids: impl Iterator<Item = u32>,
    ) {
        if address.protocol != Protocol::Udp {
            return;
        }
        for id in ids {
            if let Some(BackendRecord { backend, .. }) = self.backends.get(id) {
                self.stale_udp.push(StaleBackend {
                    rev_nat_id,
                    backend: SocketAddr::new(backend.addr.address, backend.addr.port),
                });
            }
        }
    }

    /// The maps, for reading.
    pub const fn maps(&self) -> &M {
        &self.maps
    }

    /// The maps, to play the datapath's part in tests.
    #[cfg(test)]
    pub const fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Makes the maps implement `desired`, writing only what differs; also drops whatever
    /// an adopted map held that `desired` lacks. Used for the first sync.
    ///
    /// # Errors
    /// When a map operation fails; the record stays consistent with what was written, so
    /// the next apply retries the rest.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyStats> {
        let stale = self
            .frontends
            .keys()
            .filter(|a| !desired.contains_key(a))
            .copied();
        let changed: Vec<L4Addr> = stale.chain(desired.keys().copied()).collect();
        // Backends no slot names (left by a previous agent) go too.
        let released = self.backends.unused().collect();
        self.apply_with(desired, &changed, released)
    }

    /// Writes the frontends at `changed` as `desired` has them (removing those it lacks):
    /// the incremental form of [`Self::apply`], for a watch event.
    ///
    /// # Errors
    /// As [`Self::apply`].
    pub fn apply_changes(
        &mut self,
        desired: &DesiredState,
        changed: &[L4Addr],
    ) -> Result<ApplyStats> {
        self.apply_with(desired, changed, BTreeSet::new())
    }

    fn apply_with(
        &mut self,
        desired: &DesiredState,
        changed: &[L4Addr],
        released: BTreeSet<u32>,
    ) -> Result<ApplyStats> {
        // Frontends refused before are tried again with every apply: room may have appeared.
        let mut changed: BTreeSet<L4Addr> = changed.iter().copied().collect();
        changed.extend(std::mem::take(&mut self.refused).into_keys());
        let stale_before = self.stale_udp.len();
        let result = self.apply_batched(desired, &changed, released);
        let result = match result {
            Err(e) if e.is_capacity() => {
                // A phase did not fit: the maps hold a prefix of the phases (consistent, as
                // each phase only adds what later ones name). Start again from what is there,
                // frontend by frontend, so only the frontends that do not fit are left out.
                warn!(error = %e, "a map is full; writing frontend by frontend");
                self.refused.clear();
                self.stale_udp.truncate(stale_before);
                self.readopt()?;
                self.apply_per_frontend(desired, &changed)
            }
            other => other,
        };
        // The masters of this apply are written (or the maps re-read): the slot ranges they
        // stopped naming start their grace period.
        self.slot_ranges.end_apply(std::time::Instant::now());
        let freed_ids = !std::mem::take(&mut self.cooling_rev_nat_ids).is_empty();
        if freed_ids && !self.refused.is_empty() {
            // The frontend ids this apply freed may be handed out now that their entries
            // are gone: a frontend refused for want of one gets it at once.
            let mut stats = result?;
            stats.add(&self.apply_with(desired, &[], BTreeSet::new())?);
            return Ok(stats);
        }
        result
    }

    /// The common case: every phase of every frontend as one batch per map.
    fn apply_batched(
        &mut self,
        desired: &DesiredState,
        changed: &BTreeSet<L4Addr>,
        mut released: BTreeSet<u32>,
    ) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        let max = usize::try_from(self.max_backend_id).unwrap_or(usize::MAX);
        self.backends
            .expect(|| backends_to_come(desired, changed).min(max));
        // Removals first: an address that moves between Services is freed before reuse.
        for address in changed.iter().filter(|a| !desired.contains_key(a)) {
            self.remove_frontend(*address, &mut released, &mut stats);
        }
        let mut last: Option<L4Addr> = None;
        for frontend in changed.iter().filter_map(|a| desired.get(a)) {
            // Twins (one address, port and protocol in both scopes) sort next to each other:
            // never written apart, so the external master never names a missing twin.
            let a = frontend.address;
            let twin = last.is_some_and(|l| {
                (l.address, l.port, l.protocol) == (a.address, a.port, a.protocol)
            });
            if !twin && self.planned_upserts() >= self.flush_every {
                self.flush_upserts()?;
            }
            last = Some(frontend.address);
            match self.plan_upsert(frontend) {
                Ok(None) => {}
                Ok(Some(mut plan)) => {
                    for (phase, op) in std::mem::take(&mut plan.ops) {
                        self.plan[phase].push(op);
                    }
                    self.commit(plan, &mut released, &mut stats);
                }
                Err(reason) => self.refuse(frontend, reason),
            }
        }
        self.delete_unused_backends(released, &mut stats);
        self.backends.trim();
        self.flush_plan()?;
        let forget = std::mem::take(&mut self.forget_affinity);
        self.maps.forget_affinity(&forget)?;
        Ok(stats)
    }

    /// After a map turned out full: the removals, then each frontend on its own (one that
    /// does not fit is undone and left as it was), then the backends no one uses.
    fn apply_per_frontend(
        &mut self,
        desired: &DesiredState,
        changed: &BTreeSet<L4Addr>,
    ) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        let mut released: BTreeSet<u32> = self.backends.unused().collect();
        for address in changed.iter().filter(|a| !desired.contains_key(a)) {
            self.remove_frontend(*address, &mut released, &mut stats);
        }
        self.flush_plan()?;
        for frontend in changed.iter().filter_map(|a| desired.get(a)) {
            match self.plan_upsert(frontend) {
                Ok(None) => {}
                Ok(Some(mut plan)) => {
                    let ops = std::mem::take(&mut plan.ops);
                    match self.write_one(&plan, &ops)? {
                        None => self.commit(plan, &mut released, &mut stats),
                        Some(e) => {
                            if let Some((base, len)) = plan.range {
                                self.slot_ranges.free_now(base, len);
                            }
                            let reason = self.full_reason(&e);
                            self.refuse(frontend, reason);
                        }
                    }
                }
                Err(reason) => self.refuse(frontend, reason),
            }
        }
        self.delete_unused_backends(released, &mut stats);
        self.backends.trim();
        self.flush_plan()?;
        let forget = std::mem::take(&mut self.forget_affinity);
        self.maps.forget_affinity(&forget)?;
        Ok(stats)
    }

    /// The upsert operations planned and not yet written.
    fn planned_upserts(&self) -> usize {
        self.plan[UPSERT_PHASES].iter().map(Vec::len).sum()
    }

    /// Writes the removed masters and the upserts planned so far, in phase order, and
    /// keeps the rest (deletions) for the end of the apply. Each frontend's backends still
    /// precede its slots, and its slots its master; what later frontends add is written
    /// later. A large apply (the first sync of a big cluster) so never holds all its
    /// operations at once. On a failure the maps hold a prefix of each frontend's phases,
    /// as when the last flush fails.
    fn flush_upserts(&mut self) -> Result<()> {
        for phase in UPSERT_PHASES {
            if !self.plan[phase].is_empty() {
                fail::fail_point!(FAIL_PHASE, |_| Err(injected("apply_ops")));
                self.maps.apply_ops(&self.plan[phase])?;
                // Cleared, not taken: the next chunk reuses the memory.
                self.plan[phase].clear();
            }
        }
        Ok(())
    }

    /// Sends the planned phases to the maps, in order.
    fn flush_plan(&mut self) -> Result<()> {
        for phase in std::mem::take(&mut self.plan) {
            if !phase.is_empty() {
                fail::fail_point!(FAIL_PHASE, |_| Err(injected("apply_ops")));
                self.maps.apply_ops(&phase)?;
            }
        }
        Ok(())
    }

    /// Writes one frontend's operations one by one. When one does not fit, those already
    /// written are undone (in reverse, so the frontend is never half-written) and the error
    /// is returned as `Ok(Some(_))`; any other failure is an error.
    fn write_one(&mut self, plan: &FrontendPlan, ops: &[(usize, Op)]) -> Result<Option<MapError>> {
        for (done, (_, op)) in ops.iter().enumerate() {
            let written = (|| {
                fail::fail_point!(FAIL_OP, |_| Err(injected("apply_ops")));
                self.maps.apply_ops(std::slice::from_ref(op))
            })();
            let Err(e) = written else {
                continue;
            };
            if !e.is_capacity() {
                return Err(e);
            }
            for (_, op) in ops[..done].iter().rev() {
                if let Some(undo) = plan.undo(op) {
                    self.maps.apply_ops(&[undo])?;
                }
            }
            return Ok(Some(e));
        }
        Ok(None)
    }

    /// What a full map says in a report.
    fn full_reason(&self, e: &MapError) -> String {
        let errno = match e.source.raw_os_error() {
            Some(libc::E2BIG) => "E2BIG".to_string(),
            Some(libc::ENOSPC) => "ENOSPC".to_string(),
            Some(libc::ENOMEM) => "ENOMEM".to_string(),
            _ => e.source.to_string(),
        };
        match self.maps.capacity(e.map) {
            Some(entries) => format!("{} is full ({entries} entries; {} {errno})", e.map, e.op),
            None => format!("{} is full ({} {errno})", e.map, e.op),
        }
    }

    fn refuse(&mut self, frontend: &Frontend, reason: String) {
        warn!(address = %frontend.address, service = %frontend.service, %reason, "frontend not programmed");
        self.refused.insert(
            frontend.address,
            Refused {
                service: frontend.service.clone(),
                port_name: frontend.port_name.clone(),
                reason,
            },
        );
    }

    /// The frontends the last apply could not program (a map full, or no free id), each
    /// left as it was; they are tried again with every apply.
    #[must_use]
    pub const fn refused(&self) -> &BTreeMap<L4Addr, Refused> {
        &self.refused
    }

    /// Limits the ids handed out (tests: exhausting 65,535 frontend ids takes a knob).
    pub fn set_id_limits(&mut self, frontends: lb_common::FrontendId, backends: u32) {
        self.max_rev_nat_id = frontends.max(1);
        self.max_backend_id = backends.max(1);
    }

    /// What writing `frontend` takes (`None`: nothing to do; an error: the ids or slots it
    /// needs are not free). Nothing changes but the slots range it takes, which the plan
    /// gives back if it is not written ([`FrontendPlan::range`]).
    fn plan_upsert(&mut self, frontend: &Frontend) -> Result<Option<FrontendPlan>, String> {
        let address = frontend.address;
        let count = frontend.backends.len().min(usize::from(u16::MAX));
        if count < frontend.backends.len() {
            warn!(%address, backends = frontend.backends.len(), "more backends than slots; using the first 65535");
        }
        let flags = super::codec::frontend_flags(frontend);
        let affinity = frontend.affinity_timeout.map(std::num::NonZeroU32::get);
        let mut stats = ApplyStats::default();
        let old = match self.frontends.get(&address) {
            Some(old)
                if old.intact()
                    && old.flags == flags
                    && old.affinity == affinity
                    && old.source_ranges().iter().eq(frontend.source_ranges.iter())
                    && self.same_backends(old, &frontend.backends) =>
            {
                return Ok(None);
            }
            Some(old) => Some(old.clone()),
            None => None,
        };
        let is_new = old.is_none();
        let old = match old {
            Some(old) => old,
            None => {
                let Some(rev_nat_id) = self.free_rev_nat_id() else {
                    return Err(format!(
                        "no free frontend id (all {} in use)",
                        self.max_rev_nat_id
                    ));
                };
                Programmed::new(rev_nat_id, flags)
            }
        };
        let mut ops = Vec::new();
        let mut ids = Vec::with_capacity(count);
        let mut new_backends = Vec::new();
        let mut free_ids = self.backends.free_ids();
        for backend in frontend.backends.iter().take(count) {
            if let Some(id) = self.backends.id_of(&backend) {
                ids.push(id);
                continue;
            }
            let Some(id) = self.free_backend_id(&mut free_ids, new_backends.len()) else {
                return Err(format!(
                    "no free backend id (all {} in use)",
                    self.max_backend_id
                ));
            };
            ops.push((NEW_BACKENDS, Op::SetBackend(id, backend)));
            stats.map_writes += 1;
            stats.backends_added += 1;
            new_backends.push((id, backend));
            ids.push(id);
        }
        drop(free_ids);
        let slots = assign_slots(&old.slots, &ids);
        let new_range = old.slots[..] != slots[..] || !old.intact();
        let base = if !new_range || slots.is_empty() {
            if slots.is_empty() { 0 } else { old.base }
        } else {
            let len = u32::try_from(slots.len()).unwrap_or(u32::MAX);
            let Some(base) = self.slot_ranges.allocate(len, std::time::Instant::now()) else {
                return Err(format!(
                    "{SLOTS_MAP} is full ({} entries, {} in use; {len} wanted, the largest free \
                     range is {})",
                    self.slot_ranges.capacity(),
                    self.slot_ranges.used(),
                    self.slot_ranges.largest_free()
                ));
            };
            // Each slot holds its backend (inline for IPv4): found by id, sorted once.
            let mut backend_of: Vec<(u32, Backend)> = ids
                .iter()
                .copied()
                .zip(frontend.backends.iter().take(count))
                .collect();
            backend_of.sort_unstable_by_key(|&(id, _)| id);
            for (index, &id) in (base..).zip(slots.iter()) {
                let value = match backend_of.binary_search_by_key(&id, |&(id, _)| id) {
                    Ok(at) => super::codec::slot(id, &backend_of[at].1),
                    Err(_) => lb_common::SlotValue::by_id(id),
                };
                ops.push((SLOTS, Op::SetSlot(index, value)));
                stats.map_writes += 1;
            }
            base
        };
        let forget_affinity = plan_affinity_matches(&old, &slots, affinity, &mut ops, &mut stats);
        let source_ranges: BTreeSet<ipnet::IpNet> =
            frontend.source_ranges.iter().copied().collect();
        plan_source_ranges(&old, &source_ranges, &mut ops, &mut stats);
        let count = u16::try_from(slots.len()).unwrap_or(u16::MAX);
        if is_new || new_range || flags != old.flags || affinity != old.affinity {
            let phase = if address.is_internal() {
                INTERNAL_MASTERS
            } else {
                MASTERS
            };
            ops.push((
                phase,
                Op::SetMaster(
                    address,
                    master_value(count, old.rev_nat_id, flags, base, affinity),
                ),
            ));
            stats.map_writes += 1;
        }
        let wanted: HashSet<L4Addr> = frontend.backends.iter().map(|b| b.addr).collect();
        let left = old.slots.iter().filter_map(|id| self.backends.get(*id));
        for record in left.filter(|r| !wanted.contains(&r.backend.addr)) {
            forget_peer(&mut ops, address, record.backend, old.rev_nat_id);
        }
        // Each frontend's operations in phase order (the sort is stable).
        ops.sort_by_key(|(phase, _)| *phase);
        if is_new {
            stats.frontends_added += 1;
        } else {
            stats.frontends_updated += 1;
        }
        debug!(%address, service = %frontend.service, backends = slots.len(), "planned frontend");
        let mut new = Programmed {
            slots: slots.into_boxed_slice(),
            base,
            master_count: count,
            affinity,
            ..Programmed::new(old.rev_nat_id, flags)
        };
        new.set_rare(source_ranges);
        let range = (new_range && !new.slots.is_empty()).then(|| (new.base, new.owned_len()));
        Ok(Some(FrontendPlan {
            address,
            is_new,
            range,
            new,
            old,
            kept: frontend.backends.iter().map(|b| b.addr).collect(),
            new_backends,
            ops,
            stats,
            forget_affinity,
        }))
    }

    /// Records a planned frontend as written.
    fn commit(&mut self, plan: FrontendPlan, released: &mut BTreeSet<u32>, stats: &mut ApplyStats) {
        let FrontendPlan {
            address,
            old,
            new,
            kept,
            new_backends,
            stats: delta,
            forget_affinity,
            range,
            ..
        } = plan;
        if range.is_some() || new.slots.is_empty() {
            // The master stops naming the old range when this apply writes it.
            self.slot_ranges.retire(old.base, old.owned_len());
        }
        for (id, backend) in new_backends {
            self.backends.insert_new(id, backend);
        }
        self.rev_nat_ids.insert(new.rev_nat_id);
        if forget_affinity {
            self.forget_affinity.insert(new.rev_nat_id);
        }
        for id in &new.slots {
            self.backends.add_ref(*id);
        }
        // A backend whose id changed with its state (ready to terminating) is still used.
        let now: HashSet<u32> = new.slots.iter().copied().collect();
        let dropped: Vec<u32> = old
            .slots
            .iter()
            .filter(|id| !now.contains(id))
            .filter(|id| {
                self.backends
                    .get(**id)
                    .is_none_or(|r| !kept.contains(&r.backend.addr))
            })
            .copied()
            .collect();
        self.note_stale(&address, old.rev_nat_id, dropped.into_iter());
        self.release(&old.slots, released);
        stats.add(&delta);
        self.frontends.insert(address, new);
    }

    /// Whether `programmed` already holds exactly `wanted` (in any slot order).
    fn same_backends(&self, programmed: &Programmed, wanted: &BackendList) -> bool {
        if programmed.slots.len() != wanted.len() {
            return false;
        }
        let slots: HashSet<u32> = programmed.slots.iter().copied().collect();
        wanted.iter().all(|b| {
            self.backends
                .id_of(&b)
                .is_some_and(|id| slots.contains(&id))
        })
    }

    fn remove_frontend(
        &mut self,
        address: L4Addr,
        released: &mut BTreeSet<u32>,
        stats: &mut ApplyStats,
    ) {
        let Some(old) = self.frontends.remove(&address) else {
            return;
        };
        let phase = if address.is_internal() {
            DROP_INTERNAL_MASTERS
        } else {
            DROP_MASTERS
        };
        let mut ops = vec![(phase, Op::DeleteMaster(address))];
        stats.map_deletes += 1;
        self.slot_ranges.retire(old.base, old.owned_len());
        if plan_affinity_matches(&old, &[], None, &mut ops, stats) {
            self.forget_affinity.insert(old.rev_nat_id);
        }
        plan_source_ranges(&old, &BTreeSet::new(), &mut ops, stats);
        for record in old.slots.iter().filter_map(|id| self.backends.get(*id)) {
            forget_peer(&mut ops, address, record.backend, old.rev_nat_id);
        }
        for (phase, op) in ops {
            self.plan[phase].push(op);
        }
        self.note_stale(&address, old.rev_nat_id, old.slots.iter().copied());
        // Not handed out again in this apply: its affinity and source-range entries go
        // only after the new frontends' are written.
        self.rev_nat_ids.remove(&old.rev_nat_id);
        self.cooling_rev_nat_ids.insert(old.rev_nat_id);
        self.release(&old.slots, released);
        stats.frontends_removed += 1;
        debug!(%address, "removed frontend");
    }

    /// Drops one reference per slot; ids left without any are candidates for deletion.
    fn release(&mut self, ids: &[u32], released: &mut BTreeSet<u32>) {
        for id in ids {
            if self.backends.drop_ref(*id) == Some(0) {
                released.insert(*id);
            }
        }
    }

    /// Deletes the `released` backends that no slot names any more (after every frontend
    /// was written, so a backend moving between Services is never deleted and re-created).
    fn delete_unused_backends(&mut self, released: BTreeSet<u32>, stats: &mut ApplyStats) {
        for id in released {
            if self.backends.get(id).is_some_and(|r| r.refs > 0) {
                continue;
            }
            let Some(BackendRecord { backend, .. }) = self.backends.remove(id) else {
                continue;
            };
            self.plan[DROP_BACKENDS].push(Op::DeleteBackend(id, backend));
            stats.map_deletes += 1;
            stats.backends_removed += 1;
        }
    }

    /// A free frontend id (ids start at 1): one past the highest in use, or the lowest
    /// free one once the top is reached. An id is never handed out while a frontend holds
    /// it, nor in the apply that freed it.
    fn free_rev_nat_id(&self) -> Option<lb_common::FrontendId> {
        let max = self.max_rev_nat_id;
        let free = |id: &lb_common::FrontendId| {
            !self.rev_nat_ids.contains(id) && !self.cooling_rev_nat_ids.contains(id)
        };
        let next = self
            .rev_nat_ids
            .last()
            .map_or(Some(1), |last| last.checked_add(1));
        match next {
            Some(id) if id <= max && free(&id) => Some(id),
            _ => (1..=max).find(free),
        }
    }

    /// The next of `free_ids` (the record's free ids, lowest first), when fewer than all
    /// ids are taken (`planned`: ids this plan already took from it). An id freed in an
    /// apply is handed out from the next one on: its backend's entry is deleted at the end
    /// of the apply that freed it, and a tracked flow that still names it finds another
    /// backend there.
    fn free_backend_id(
        &self,
        free_ids: &mut impl Iterator<Item = u32>,
        planned: usize,
    ) -> Option<u32> {
        let taken = self.backends.len().saturating_add(planned);
        if u32::try_from(taken).map_or(true, |taken| taken >= self.max_backend_id) {
            return None;
        }
        free_ids.next()
    }
}

/// About how many distinct backends the `changed` frontends name: those of their ClusterIP
/// frontends (a Service's other frontends name the same endpoints, or a node-local subset of
/// them; endpoints several Services share are counted once each). For
/// [`BackendTable::expect`], which uses it on a first sync only: an undercount leaves the
/// rest to grow as it comes, an overcount is trimmed after the apply.
fn backends_to_come(desired: &DesiredState, changed: &BTreeSet<L4Addr>) -> usize {
    changed
        .iter()
        .filter_map(|a| desired.get(a))
        .filter(|f| f.kind == crate::model::FrontendKind::ClusterIp)
        .map(|f| f.backends.len())
        .sum()
}

/// A master entry.
fn master_value(
    count: u16,
    rev_nat_id: lb_common::FrontendId,
    flags: u32,
    base: u32,
    affinity: Option<u32>,
) -> ServiceValue {
    match affinity {
        Some(timeout) => ServiceValue::affinity_master(count, rev_nat_id, flags, base, timeout),
        None => ServiceValue::master(count, rev_nat_id, flags, base),
    }
}

/// A TCP frontend's claim on a backend it stopped using goes after its master stopped
/// naming the backend (the datapath claims a backend for the first frontend whose sockets
/// reach it, which then need no reverse-NAT record: see `lb_common::PeerKey`).
fn forget_peer(
    ops: &mut Vec<(usize, Op)>,
    frontend: L4Addr,
    backend: Backend,
    rev_nat_id: lb_common::FrontendId,
) {
    if frontend.protocol == Protocol::Tcp {
        ops.push((DROP_BACKENDS, Op::ForgetPeer(backend, rev_nat_id)));
    }
}

/// Source ranges: new ones before the master (which may turn the guard on) and stale
/// ones after it, so a guarded frontend is never left without a range.
fn plan_source_ranges(
    old: &Programmed,
    wanted: &BTreeSet<ipnet::IpNet>,
    ops: &mut Vec<(usize, Op)>,
    stats: &mut ApplyStats,
) {
    for range in wanted.difference(old.source_ranges()) {
        ops.push((NEW_BACKENDS, Op::SetSourceRange(old.rev_nat_id, *range)));
        stats.map_writes += 1;
    }
    for range in old.source_ranges().difference(wanted) {
        ops.push((DROP_STALE, Op::DeleteSourceRange(old.rev_nat_id, *range)));
        stats.map_deletes += 1;
    }
}

/// Affinity-match entries for the new `slots`: new ones before any slot or master names
/// them (with the new backends), stale ones after the master stops naming them (with the
/// stale source ranges). When affinity is turned off, the slots change before the master drops
/// its flag: a backend new to a slot gets a match for that moment too, removed with the
/// others (found by the property tests). Returns whether affinity is turned off, which
/// also forgets the clients' entries, so turning it on again starts afresh.
fn plan_affinity_matches(
    old: &Programmed,
    slots: &[u32],
    affinity: Option<u32>,
    ops: &mut Vec<(usize, Op)>,
    stats: &mut ApplyStats,
) -> bool {
    let id = old.rev_nat_id;
    let had: BTreeSet<u32> = match old.affinity {
        Some(_) => old.slots.iter().copied().collect(),
        None => BTreeSet::new(),
    };
    let wants: BTreeSet<u32> = match affinity {
        Some(_) => slots.iter().copied().collect(),
        None => BTreeSet::new(),
    };
    // Named by an affinity master at some point of the write.
    let during: BTreeSet<u32> = match (old.affinity, affinity) {
        (Some(_), None) => slots.iter().copied().collect(),
        _ => wants.clone(),
    };
    for backend in during.difference(&had) {
        ops.push((NEW_BACKENDS, Op::SetAffinityMatch(*backend, id)));
        stats.map_writes += 1;
    }
    let stale: BTreeSet<u32> = had.union(&during).copied().collect();
    for backend in stale.difference(&wants) {
        ops.push((DROP_STALE, Op::DeleteAffinityMatch(*backend, id)));
        stats.map_deletes += 1;
    }
    old.affinity.is_some() && affinity.is_none()
}

/// One frontend's change, planned but not yet recorded.
struct FrontendPlan {
    address: L4Addr,
    is_new: bool,
    /// The new slots range it writes, (base, length): given back if the plan is undone.
    range: Option<(u32, u32)>,
    old: Programmed,
    new: Programmed,
    /// The addresses of the wanted backends (a backend whose state changed stays).
    kept: HashSet<L4Addr>,
    /// Backends created for it, with their new ids.
    new_backends: Vec<(u32, Backend)>,
    /// Its operations, with their phases, in phase order.
    ops: Vec<(usize, Op)>,
    stats: ApplyStats,
    /// Affinity turned off: the clients' entries go.
    forget_affinity: bool,
}

impl FrontendPlan {
    /// What puts back what `op`, one of this plan's writes, replaced (`None` for a delete:
    /// deletes come after every write of a frontend, so they are never undone; and for a
    /// slot: the new range was never named).
    fn undo(&self, op: &Op) -> Option<Op> {
        let old = &self.old;
        Some(match *op {
            Op::SetMaster(address, _) if !self.is_new => {
                // The slots the record holds (an adopted master with unusable slots goes
                // back to naming none: never to a range that is not its own).
                let count = u16::try_from(old.slots.len()).unwrap_or(u16::MAX);
                let base = if count == 0 { 0 } else { old.base };
                Op::SetMaster(
                    address,
                    master_value(count, old.rev_nat_id, old.flags, base, old.affinity),
                )
            }
            Op::SetMaster(address, _) => Op::DeleteMaster(address),
            Op::SetSlot(..) => return None,
            Op::SetBackend(id, backend) => Op::DeleteBackend(id, backend),
            Op::SetAffinityMatch(id, rev_nat_id) => Op::DeleteAffinityMatch(id, rev_nat_id),
            Op::SetSourceRange(id, range) => Op::DeleteSourceRange(id, range),
            Op::DeleteMaster(..)
            | Op::DeleteBackend(..)
            | Op::DeleteAffinityMatch(..)
            | Op::DeleteSourceRange(..)
            | Op::ForgetPeer(..) => return None,
        })
    }
}

/// A frontend the writer could not program (a map full, or no free id): it is left as it
/// was (absent if new).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The Service it belongs to.
    pub service: ObjectRef,
    /// `spec.ports[].name` of the frontend.
    pub port_name: std::sync::Arc<str>,
    /// What stood in the way, e.g. `LB4_SERVICES is full (262144 entries): …`.
    pub reason: String,
}

/// Places the wanted backend ids in slots: a backend that stays keeps its slot if that slot
/// still exists, the others fill the free slots in order. This keeps slot numbers stable (an
/// unconnected UDP socket picks its slot by hash), though every change writes a new range.
fn assign_slots(old: &[u32], wanted: &[u32]) -> Vec<u32> {
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let mut slots: Vec<Option<u32>> = vec![None; wanted.len()];
    let mut placed = BTreeSet::new();
    for (index, id) in old.iter().enumerate().take(wanted.len()) {
        if wanted_set.contains(id) && placed.insert(*id) {
            slots[index] = Some(*id);
        }
    }
    let mut rest = wanted.iter().filter(|id| !placed.contains(id));
    slots
        .into_iter()
        .map(|slot| slot.or_else(|| rest.next().copied()).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests;

mod backend_table;
pub mod slot_ranges;
