//! The writer's record of the backends map: each backend by id, how many slots name it,
//! and the id of each backend, held once.
//!
//! A million backends (100,000 Services × 10) make this the largest part of the writer's
//! record, so the lookup by backend is an index of ids into the records (4 bytes a
//! backend) rather than a second map holding each 24-byte backend again.
use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::{fast_hash::HashMap, model::Backend};

/// A backend in the maps, and the number of slots naming it.
#[derive(Clone, Copy, Debug)]
pub(super) struct BackendRecord {
    pub(super) backend: Backend,
    pub(super) refs: u32,
}

#[derive(Debug, Default)]
pub(super) struct BackendTable {
    records: HashMap<u32, BackendRecord>,
    /// The id of each backend (the first one recorded when a foreign writer left two).
    ids: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl BackendTable {
    pub(super) fn clear(&mut self) {
        self.records.clear();
        self.ids.clear();
    }

    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    pub(super) fn contains(&self, id: u32) -> bool {
        self.records.contains_key(&id)
    }

    pub(super) fn get(&self, id: u32) -> Option<&BackendRecord> {
        self.records.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: u32) -> Option<&mut BackendRecord> {
        self.records.get_mut(&id)
    }

    /// The ids of the backends no slot names.
    pub(super) fn unused(&self) -> impl Iterator<Item = u32> + '_ {
        self.records
            .iter()
            .filter(|(_, record)| record.refs == 0)
            .map(|(id, _)| *id)
    }

    /// The id `backend` is recorded under.
    pub(super) fn id_of(&self, backend: &Backend) -> Option<u32> {
        let hash = self.hasher.hash_one(backend);
        self.ids
            .find(hash, |id| self.records[id].backend == *backend)
            .copied()
    }

    /// Records `backend` under the free `id`, named by no slot yet. When the backend is
    /// already recorded under another id, that one stays its id.
    pub(super) fn insert(&mut self, id: u32, backend: Backend) {
        debug_assert!(!self.records.contains_key(&id), "backend id {id} is taken");
        let hash = self.hasher.hash_one(backend);
        let known = self
            .ids
            .find(hash, |other| self.records[other].backend == backend)
            .is_some();
        self.records.insert(id, BackendRecord { backend, refs: 0 });
        if !known {
            let Self {
                records,
                ids,
                hasher,
            } = self;
            ids.insert_unique(hash, id, |id| hasher.hash_one(records[id].backend));
        }
    }

    /// Forgets the backend of `id`.
    pub(super) fn remove(&mut self, id: u32) -> Option<BackendRecord> {
        let record = *self.records.get(&id)?;
        let hash = self.hasher.hash_one(record.backend);
        if let Ok(entry) = self.ids.find_entry(hash, |&other| other == id) {
            entry.remove();
        }
        self.records.remove(&id)
    }
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
}
