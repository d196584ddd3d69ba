//! An in-memory [`LbMaps`] that also checks, after every single operation, the invariant the
//! datapath relies on: a master entry with `count = n` always has slots `1..=n`, each naming
//! a backend that exists. A writer that ever leaves a half-written Service fails the test.
//! A map can be given a capacity ([`FakeMaps::set_capacity`]): adding an entry to a full
//! map then fails with `E2BIG`, as the kernel's hash maps do.
use std::collections::BTreeMap;

use lb_common::{
    AFFINITY_MATCH_MAP, BACKENDS4_MAP, BACKENDS6_MAP, SERVICES4_MAP, SERVICES6_MAP,
    SOURCE_RANGES_MAP, ServiceValue,
};

use super::{LbMaps, MapError, Result, ServiceEntry};
use crate::model::{Backend, L4Addr};

#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    /// (frontend, slot) to value, both families.
    pub services: BTreeMap<(L4Addr, u16), ServiceValue>,
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
                    .filter(|(f, _)| f.address.is_ipv6() == v6)
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
    /// are missing.
    fn check_consistent(&self) {
        for ((frontend, _), master) in self.services.iter().filter(|((_, slot), _)| *slot == 0) {
            for slot in 1..=master.count {
                let entry = self.services.get(&(*frontend, slot)).unwrap_or_else(|| {
                    panic!(
                        "master {frontend} has count {} but slot {slot} is missing",
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

    /// Panics if a frontend guarded by source ranges has none (it would drop everything).
    fn check_source_ranges(&self) {
        for ((frontend, _), master) in self.services.iter().filter(|((_, slot), _)| *slot == 0) {
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
    fn set_service(&mut self, frontend: &L4Addr, slot: u16, value: ServiceValue) -> Result<()> {
        let map = if frontend.address.is_ipv6() {
            SERVICES6_MAP
        } else {
            SERVICES4_MAP
        };
        self.room(map, self.services.contains_key(&(*frontend, slot)))?;
        self.services.insert((*frontend, slot), value);
        self.done()
    }

    fn delete_service(&mut self, frontend: &L4Addr, slot: u16) -> Result<()> {
        self.services.remove(&(*frontend, slot));
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
            .map(|(&(frontend, slot), &value)| ServiceEntry {
                frontend,
                slot,
                value,
            })
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
