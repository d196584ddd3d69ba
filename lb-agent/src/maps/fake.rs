//! An in-memory [`LbMaps`] that also checks, after every single operation, the invariants the
//! datapath relies on: a master entry with `count = n` always names `n` written slots, each
//! naming a backend that exists, in a range no other master names; and no slot a master
//! names is ever written (an array entry is written in place, so a connect could read half
//! of it). A writer that ever leaves a half-written Service fails the test.
//! A map can be given a capacity ([`FakeMaps::set_capacity`]): adding an entry to a full
//! map then fails with `E2BIG`, as the kernel's hash maps do.
use std::collections::BTreeMap;

use lb_common::{
    AFFINITY_MATCH_MAP, BACKENDS4_MAP, BACKENDS6_MAP, SERVICES4_MAP, SERVICES6_MAP, SLOTS_MAP,
    SOURCE_RANGES_MAP, ServiceValue, SlotValue,
};

use super::{LbMaps, MapError, Result, ServiceEntry};
use crate::model::{Backend, L4Addr};

#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    /// Frontend to master entry, both families.
    pub services: BTreeMap<L4Addr, ServiceValue>,
    /// The slots array: the entries ever written (the rest read as zeros).
    pub slots: BTreeMap<u32, SlotValue>,
    /// (is IPv6, id) to backend: like the real maps, one backends map per family.
    pub backends: BTreeMap<(bool, u32), Backend>,
    /// Affinity-match entries: (backend id, frontend `rev_nat_id`).
    pub affinity_matches: std::collections::BTreeSet<(u32, lb_common::FrontendId)>,
    /// Source-range entries: (frontend `rev_nat_id`, range).
    pub source_ranges: std::collections::BTreeSet<(lb_common::FrontendId, ipnet::IpNet)>,
    /// Frontend ids whose client affinity entries were forgotten, in order.
    pub forgotten_affinity: Vec<lb_common::FrontendId>,
    /// Claims in the peers map (which the datapath writes): backend to frontend id.
    pub peers: BTreeMap<L4Addr, lb_common::FrontendId>,
    /// Number of writes and deletes performed, to check that only changes are written.
    pub operations: usize,
    /// Maximum number of entries by map name (unset: unbounded).
    pub capacity: BTreeMap<String, usize>,
    /// A test's own invariant, checked after every single operation as the built-in ones.
    pub check: Option<fn(&Self)>,
}

impl FakeMaps {
    /// Lets the map `name` (`LB4_SERVICES`, `LB6_BACKENDS`, …) hold at most `entries`.
    pub fn set_capacity(&mut self, name: &str, entries: usize) {
        self.capacity.insert(name.to_string(), entries);
    }

    /// The number of entries of the map `name`.
    fn len_of(&self, name: &str) -> usize {
        match name {
            SERVICES4_MAP | SERVICES6_MAP => {
                let v6 = name == SERVICES6_MAP;
                self.services
                    .keys()
                    .filter(|f| f.address.is_ipv6() == v6)
                    .count()
            }
            BACKENDS4_MAP | BACKENDS6_MAP => {
                let v6 = name == BACKENDS6_MAP;
                self.backends.keys().filter(|(f, _)| *f == v6).count()
            }
            AFFINITY_MATCH_MAP => self.affinity_matches.len(),
            SOURCE_RANGES_MAP => self.source_ranges.len(),
            _ => 0,
        }
    }

    /// Fails as the kernel does when adding a key to the full map `name`.
    fn room(&self, name: &'static str, exists: bool) -> Result<()> {
        match self.capacity.get(name) {
            Some(&cap) if !exists && self.len_of(name) >= cap => Err(MapError {
                op: "update",
                map: name,
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            }),
            _ => Ok(()),
        }
    }

    /// Panics if a connect could, at this instant, read a master whose slots or backends
    /// are missing, or slots another master names too.
    fn check_consistent(&self) {
        let mut named: BTreeMap<u32, L4Addr> = BTreeMap::new();
        for (frontend, master) in &self.services {
            for slot in 1..=master.count {
                let index = master.slot_index(slot);
                if let Some(other) = named.insert(index, *frontend) {
                    panic!("{frontend} and {other} both name slot index {index}");
                }
                let entry = self.slots.get(&index).unwrap_or_else(|| {
                    panic!(
                        "master {frontend} has count {} but slot {slot} (index {index}) was \
                         never written",
                        master.count
                    )
                });
                let family = frontend.address.is_ipv6();
                let backend = self.backends.get(&(family, entry.backend_id));
                assert!(
                    backend.is_some(),
                    "slot {slot} of {frontend} names backend {} which its family's map lacks",
                    entry.backend_id
                );
                if let Some(inline) = entry.inline_backend4() {
                    assert_eq!(
                        backend.and_then(super::codec::backend4),
                        Some(inline),
                        "slot {slot} of {frontend} holds another backend inline than {}",
                        entry.backend_id
                    );
                }
                if master.flags & lb_common::SVC_F_AFFINITY != 0 {
                    assert!(
                        self.affinity_matches
                            .contains(&(entry.backend_id, master.rev_nat_id)),
                        "affinity frontend {frontend} slot {slot}: backend {} has no match entry",
                        entry.backend_id
                    );
                }
            }
        }
    }

    /// The master naming slot `index`, if one does.
    fn named_by(&self, index: u32) -> Option<&L4Addr> {
        self.services.iter().find_map(|(frontend, master)| {
            let first = master.base;
            (master.count > 0 && index >= first && index - first < u32::from(master.count))
                .then_some(frontend)
        })
    }

    /// Panics if a frontend guarded by source ranges has none (it would drop everything).
    fn check_source_ranges(&self) {
        for (frontend, master) in &self.services {
            if master.flags & lb_common::SVC_F_SOURCE_RANGES != 0 {
                assert!(
                    self.source_ranges
                        .iter()
                        .any(|(id, _)| *id == master.rev_nat_id),
                    "{frontend} is guarded by source ranges but has none"
                );
            }
        }
    }

    fn done(&mut self) -> Result<()> {
        self.check_source_ranges();
        self.operations += 1;
        self.check_consistent();
        if let Some(check) = self.check {
            check(self);
        }
        Ok(())
    }
}

impl LbMaps for FakeMaps {
    fn set_master(&mut self, frontend: &L4Addr, value: ServiceValue) -> Result<()> {
        let map = if frontend.address.is_ipv6() {
            SERVICES6_MAP
        } else {
            SERVICES4_MAP
        };
        self.room(map, self.services.contains_key(frontend))?;
        self.services.insert(*frontend, value);
        self.done()
    }

    fn delete_master(&mut self, frontend: &L4Addr) -> Result<()> {
        self.services.remove(frontend);
        self.done()
    }

    fn set_slot(&mut self, index: u32, value: SlotValue) -> Result<()> {
        if let Some(frontend) = self.named_by(index) {
            panic!("slot index {index} written in place while {frontend}'s master names it");
        }
        if self
            .capacity
            .get(SLOTS_MAP)
            .is_some_and(|&cap| index as usize >= cap)
        {
            return Err(MapError {
                op: "update",
                map: SLOTS_MAP,
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        self.slots.insert(index, value);
        self.done()
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        let v6 = backend.addr.address.is_ipv6();
        let map = if v6 { BACKENDS6_MAP } else { BACKENDS4_MAP };
        self.room(map, self.backends.contains_key(&(v6, id)))?;
        self.backends
            .insert((backend.addr.address.is_ipv6(), id), *backend);
        self.done()
    }

    fn delete_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends.remove(&(backend.addr.address.is_ipv6(), id));
        self.done()
    }

    fn services(&self) -> Result<Vec<ServiceEntry>> {
        Ok(self
            .services
            .iter()
            .map(|(&frontend, &value)| ServiceEntry { frontend, value })
            .collect())
    }

    fn slots(&self, ranges: &[(u32, u16)]) -> Result<Vec<SlotValue>> {
        Ok(ranges
            .iter()
            .flat_map(|&(base, count)| (0..u32::from(count)).map(move |i| base.wrapping_add(i)))
            .map(|index| self.slots.get(&index).copied().unwrap_or_default())
            .collect())
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        Ok(self.backends.iter().map(|(&(_, id), b)| (id, *b)).collect())
    }

    fn set_affinity_match(&mut self, id: u32, rev_nat_id: lb_common::FrontendId) -> Result<()> {
        let exists = self.affinity_matches.contains(&(id, rev_nat_id));
        self.room(AFFINITY_MATCH_MAP, exists)?;
        self.affinity_matches.insert((id, rev_nat_id));
        self.done()
    }

    fn delete_affinity_match(&mut self, id: u32, rev_nat_id: lb_common::FrontendId) -> Result<()> {
        self.affinity_matches.remove(&(id, rev_nat_id));
        self.done()
    }

    fn affinity_matches(&self) -> Result<Vec<(u32, lb_common::FrontendId)>> {
        Ok(self.affinity_matches.iter().copied().collect())
    }

    fn forget_affinity(
        &mut self,
        rev_nat_ids: &std::collections::BTreeSet<lb_common::FrontendId>,
    ) -> Result<()> {
        self.forgotten_affinity.extend(rev_nat_ids);
        Ok(())
    }

    fn set_source_range(
        &mut self,
        rev_nat_id: lb_common::FrontendId,
        range: ipnet::IpNet,
    ) -> Result<()> {
        let exists = self.source_ranges.contains(&(rev_nat_id, range));
        self.room(SOURCE_RANGES_MAP, exists)?;
        self.source_ranges.insert((rev_nat_id, range));
        self.done()
    }

    fn delete_source_range(
        &mut self,
        rev_nat_id: lb_common::FrontendId,
        range: ipnet::IpNet,
    ) -> Result<()> {
        self.source_ranges.remove(&(rev_nat_id, range));
        self.done()
    }

    fn source_ranges(&self) -> Result<Vec<(lb_common::FrontendId, ipnet::IpNet)>> {
        Ok(self.source_ranges.iter().copied().collect())
    }

    fn forget_peer(&mut self, backend: &Backend, rev_nat_id: lb_common::FrontendId) -> Result<()> {
        if self.peers.get(&backend.addr) == Some(&rev_nat_id) {
            self.peers.remove(&backend.addr);
        }
        Ok(())
    }

    fn capacity(&self, name: &str) -> Option<usize> {
        self.capacity.get(name).copied()
    }
}
