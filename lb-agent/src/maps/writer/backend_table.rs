//! The writer's record of the backends map: each backend by id, how many slots name it,
//! and the id of each backend, held once.
//!
//! A million backends (100,000 Services × 10) make this the largest part of the writer's
//! record. Ids are handed out lowest free first, so they stay dense and the records are a
//! vector indexed by id (28 bytes a backend; a hash table keyed by id cost 33 bytes a
//! bucket at half its buckets full, once its million entries had doubled it to 2^21).
//! The lookup by backend is an index of ids into the records (4 bytes a backend) rather
//! than a second map holding each 24-byte backend again.
use std::{collections::BTreeSet, hash::BuildHasher};

use hashbrown::HashTable;

use crate::model::Backend;

/// A backend in the maps, and the number of slots naming it.
#[derive(Clone, Copy, Debug)]
pub(super) struct BackendRecord {
    pub(super) backend: Backend,
    pub(super) refs: u32,
}

#[derive(Debug, Default)]
pub(super) struct BackendTable {
    /// By id; id 0 is never handed out (the vector is empty or starts with `None`).
    records: Vec<Option<BackendRecord>>,
    /// How many ids hold a record.
    live: usize,
    /// The ids below `records.len()` (0 aside) that hold none: handed out first.
    free: BTreeSet<u32>,
    /// The id of each backend (the first one recorded when a foreign writer left two).
    ids: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl BackendTable {
    pub(super) fn clear(&mut self) {
        self.records = Vec::new();
        self.live = 0;
        self.free.clear();
        self.ids.clear();
    }

    pub(super) const fn len(&self) -> usize {
        self.live
    }

    pub(super) fn contains(&self, id: u32) -> bool {
        self.get(id).is_some()
    }

    pub(super) fn get(&self, id: u32) -> Option<&BackendRecord> {
        self.records.get(index(id))?.as_ref()
    }

    pub(super) fn get_mut(&mut self, id: u32) -> Option<&mut BackendRecord> {
        self.records.get_mut(index(id))?.as_mut()
    }

    /// The ids of the backends no slot names.
    pub(super) fn unused(&self) -> impl Iterator<Item = u32> + '_ {
        self.records
            .iter()
            .enumerate()
            .filter(|(_, record)| record.is_some_and(|r| r.refs == 0))
            .filter_map(|(id, _)| u32::try_from(id).ok())
    }

    /// The id `backend` is recorded under.
    pub(super) fn id_of(&self, backend: &Backend) -> Option<u32> {
        let hash = self.hasher.hash_one(backend);
        self.ids
            .find(hash, |&id| self.backend(id) == Some(backend))
            .copied()
    }

    /// The free ids, lowest first: the holes left by removed backends, then the ids past
    /// the highest. A plan takes them one by one as it needs them, so handing out a
    /// frontend's new backends is linear in their number.
    pub(super) fn free_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let past = u32::try_from(self.records.len().max(1)).unwrap_or(u32::MAX);
        self.free.iter().copied().chain(past..)
    }

    /// Records `backend` under the free `id`, named by no slot yet. When the backend is
    /// already recorded under another id, that one stays its id.
    pub(super) fn insert(&mut self, id: u32, backend: Backend) {
        debug_assert!(!self.contains(id), "backend id {id} is taken");
        let at = index(id);
        if at >= self.records.len() {
            let holes = self.records.len().max(1)..at;
            self.free
                .extend(holes.filter_map(|i| u32::try_from(i).ok()));
            self.records.resize(at + 1, None);
        } else {
            self.free.remove(&id);
        }
        let hash = self.hasher.hash_one(backend);
        let known = self
            .ids
            .find(hash, |&other| self.backend(other) == Some(&backend))
            .is_some();
        self.records[at] = Some(BackendRecord { backend, refs: 0 });
        self.live += 1;
        if !known {
            let Self {
                records,
                ids,
                hasher,
                ..
            } = self;
            // Rehashing finds every id's backend: only ids with a record are in the index.
            ids.insert_unique(hash, id, |&id| match &records[index(id)] {
                Some(record) => hasher.hash_one(record.backend),
                None => 0,
            });
        }
    }

    /// Forgets the backend of `id`; its id is free again.
    pub(super) fn remove(&mut self, id: u32) -> Option<BackendRecord> {
        let record = self.records.get_mut(index(id))?.take()?;
        self.live -= 1;
        let hash = self.hasher.hash_one(record.backend);
        if let Ok(entry) = self.ids.find_entry(hash, |&other| other == id) {
            entry.remove();
        }
        self.free.insert(id);
        // Ids past the highest recorded are free without being listed.
        while self.records.len() > 1 && self.records.last().is_some_and(Option::is_none) {
            self.records.pop();
            if let Ok(top) = u32::try_from(self.records.len()) {
                self.free.remove(&top);
            }
        }
        if self.live == 0 {
            self.clear();
        }
        Some(record)
    }

    fn backend(&self, id: u32) -> Option<&Backend> {
        self.get(id).map(|r| &r.backend)
    }
}

/// The vector index of `id`.
fn index(id: u32) -> usize {
    usize::try_from(id).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointState, L4Addr, Protocol};

    fn backend(last: u8) -> Backend {
        let addr = L4Addr::new([10, 0, 0, last], 80, Protocol::Tcp);
        Backend::new(addr, EndpointState::Ready)
    }

    #[test]
    fn a_backend_is_found_by_its_id_and_its_id_by_it_until_removed() {
        let mut table = BackendTable::default();
        table.insert(7, backend(1));
        table.insert(9, backend(2));
        assert_eq!(table.id_of(&backend(1)), Some(7));
        assert_eq!(table.get(9).map(|r| r.backend), Some(backend(2)));
        assert_eq!(table.remove(7).map(|r| r.backend), Some(backend(1)));
        assert_eq!(table.id_of(&backend(1)), None);
        assert!(!table.contains(7));
        assert_eq!(table.id_of(&backend(2)), Some(9));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_backend_recorded_twice_keeps_its_first_id_until_that_one_goes() {
        let mut table = BackendTable::default();
        table.insert(3, backend(1));
        table.insert(4, backend(1));
        assert_eq!(table.id_of(&backend(1)), Some(3));
        table.remove(4);
        assert_eq!(table.id_of(&backend(1)), Some(3));
        table.remove(3);
        assert_eq!(table.id_of(&backend(1)), None);
    }

    #[test]
    fn ids_are_handed_out_lowest_free_first_so_they_stay_dense() {
        let mut table = BackendTable::default();
        let first = |table: &BackendTable, n: usize| table.free_ids().take(n).collect::<Vec<_>>();
        assert_eq!(first(&table, 3), [1, 2, 3]);
        for id in 1..=5 {
            table.insert(id, backend(u8::try_from(id).unwrap()));
        }
        assert_eq!(first(&table, 1), [6]);
        table.remove(2);
        table.remove(4);
        assert_eq!(
            first(&table, 3),
            [2, 4, 6],
            "the holes first, then past the highest"
        );
        table.insert(4, backend(40));
        assert_eq!(first(&table, 2), [2, 6]);
        // Removing the highest ids shrinks the record; holes below stay listed.
        table.remove(5);
        table.remove(4);
        assert_eq!(first(&table, 2), [2, 4]);
        // An adopted id far past the rest leaves the ids between free.
        table.insert(9, backend(9));
        assert_eq!(first(&table, 5), [2, 4, 5, 6, 7]);
        assert_eq!(table.unused().collect::<Vec<_>>(), [1, 3, 9]);
        for id in [1, 3, 9] {
            table.remove(id);
        }
        assert_eq!((table.len(), first(&table, 1)), (0, vec![1]));
    }

    /// The index of ids grows (and rehashes) as backends come: every one stays found.
    #[test]
    fn every_backend_is_found_after_the_index_grew() {
        let mut table = BackendTable::default();
        let backend = |i: u32| {
            let addr = L4Addr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i), 80, Protocol::Tcp);
            Backend::new(addr, EndpointState::Ready)
        };
        for id in 1..=5_000 {
            table.insert(id, backend(id));
        }
        assert!((1..=5_000).all(|id| table.id_of(&backend(id)) == Some(id)));
    }
}
