//! An in-memory [`LbMaps`] that also checks, after every single operation, the invariant the
//! datapath relies on: a master entry with `count = n` always has slots `1..=n`, each naming
//! a backend that exists. A writer that ever leaves a half-written Service fails the test.
use std::collections::BTreeMap;

use lb_common::{Backend4, Service4Key, Service4Value};

use super::{LbMaps, Result};

#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    pub services: BTreeMap<Service4Key, Service4Value>,
    pub backends: BTreeMap<u32, Backend4>,
    /// Number of writes and deletes performed, to check that only changes are written.
    pub operations: usize,
}

impl FakeMaps {
    /// Panics if a connect could, at this instant, read a master whose slots or backends
    /// are missing.
    fn check_consistent(&self) {
        for (key, value) in self.services.iter().filter(|(k, _)| k.is_master()) {
            for slot in 1..=value.count {
                let mut slot_key = *key;
                slot_key.backend_slot = slot;
                let entry = self.services.get(&slot_key).unwrap_or_else(|| {
                    panic!(
                        "master {key:?} has count {} but slot {slot} is missing",
                        value.count
                    )
                });
                assert!(
                    self.backends.contains_key(&entry.backend_id),
                    "slot {slot_key:?} names backend {} which does not exist",
                    entry.backend_id
                );
            }
        }
    }

    fn done(&mut self) -> Result<()> {
        self.operations += 1;
        self.check_consistent();
        Ok(())
    }
}

impl LbMaps for FakeMaps {
    fn set_service(&mut self, key: Service4Key, value: Service4Value) -> Result<()> {
        self.services.insert(key, value);
        self.done()
    }

    fn delete_service(&mut self, key: Service4Key) -> Result<()> {
        self.services.remove(&key);
        self.done()
    }

    fn set_backend(&mut self, id: u32, backend: Backend4) -> Result<()> {
        self.backends.insert(id, backend);
        self.done()
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.backends.remove(&id);
        self.done()
    }

    fn services(&self) -> Result<Vec<(Service4Key, Service4Value)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backends(&self) -> Result<Vec<(u32, Backend4)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
}
