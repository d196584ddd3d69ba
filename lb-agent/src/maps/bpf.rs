//! [`LbMaps`] over the real BPF maps, whether just loaded or opened from their pins.
use std::{io, path::Path};

use aya::maps::{HashMap, Map, MapData, MapError as AyaMapError};
use lb_common::{
    BACKENDS4_MAP, BACKENDS6_MAP, Backend4, Backend6, SERVICES4_MAP, SERVICES6_MAP, Service4Key,
    Service6Key, ServiceValue,
};
use tracing::warn;

use super::{LbMaps, MapError, Result, ServiceEntry, codec};
use crate::model::{Backend, L4Addr};

/// The service and backend maps of both families, of a loaded object or of a pin directory.
pub struct BpfMaps {
    services4: HashMap<MapData, Service4Key, ServiceValue>,
    services6: HashMap<MapData, Service6Key, ServiceValue>,
    backends4: HashMap<MapData, u32, Backend4>,
    backends6: HashMap<MapData, u32, Backend6>,
}

impl std::fmt::Debug for BpfMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfMaps").finish_non_exhaustive()
    }
}

/// The maps `BpfMaps` is made of, in this order.
pub const MAP_NAMES: [&str; 4] = [SERVICES4_MAP, SERVICES6_MAP, BACKENDS4_MAP, BACKENDS6_MAP];

impl BpfMaps {
    /// Wraps maps obtained by name (from a loaded object, or from pins).
    ///
    /// # Errors
    /// When a map is missing, has the wrong type or key/value size.
    pub fn from_maps(mut take: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            services4: convert(SERVICES4_MAP, take(SERVICES4_MAP)?)?,
            services6: convert(SERVICES6_MAP, take(SERVICES6_MAP)?)?,
            backends4: convert(BACKENDS4_MAP, take(BACKENDS4_MAP)?)?,
            backends6: convert(BACKENDS6_MAP, take(BACKENDS6_MAP)?)?,
        })
    }

    /// Opens the maps pinned under `dir` (no agent needs to run).
    ///
    /// # Errors
    /// When a pin is missing or is not the expected map.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        Self::from_maps(|name| {
            MapData::from_pin(dir.join(name))
                .map(Map::HashMap)
                .map_err(|e| aya_error("open pinned", name, e))
        })
    }
}

fn convert<K: aya::Pod, V: aya::Pod>(
    name: &'static str,
    map: Map,
) -> Result<HashMap<MapData, K, V>> {
    HashMap::try_from(map).map_err(|e| aya_error("open", name, e))
}

fn aya_error(op: &'static str, map: &'static str, err: AyaMapError) -> MapError {
    let source = match err {
        AyaMapError::SyscallError(e) => e.io_error,
        other => io::Error::other(other.to_string()),
    };
    MapError { op, map, source }
}

/// Deleting an absent key is fine: the writer's record and the map agree on the outcome.
fn ignore_missing(result: Result<(), AyaMapError>, map: &'static str) -> Result<()> {
    match result {
        Err(AyaMapError::KeyNotFound) => Ok(()),
        Err(AyaMapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other.map_err(|e| aya_error("delete", map, e)),
    }
}

/// An entry the agent cannot have written (unknown protocol): reported, then left alone.
fn undecodable(map: &'static str, what: &dyn std::fmt::Debug) {
    warn!(map, entry = ?what, "undecodable map entry ignored");
}

impl LbMaps for BpfMaps {
    fn set_service(&mut self, frontend: &L4Addr, slot: u16, value: ServiceValue) -> Result<()> {
        if let Some(key) = codec::service4_key(frontend, slot) {
            self.services4
                .insert(key, value, 0)
                .map_err(|e| aya_error("update", SERVICES4_MAP, e))
        } else if let Some(key) = codec::service6_key(frontend, slot) {
            self.services6
                .insert(key, value, 0)
                .map_err(|e| aya_error("update", SERVICES6_MAP, e))
        } else {
            Ok(())
        }
    }

    fn delete_service(&mut self, frontend: &L4Addr, slot: u16) -> Result<()> {
        if let Some(key) = codec::service4_key(frontend, slot) {
            ignore_missing(self.services4.remove(&key), SERVICES4_MAP)
        } else if let Some(key) = codec::service6_key(frontend, slot) {
            ignore_missing(self.services6.remove(&key), SERVICES6_MAP)
        } else {
            Ok(())
        }
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        if let Some(value) = codec::backend4(backend) {
            self.backends4
                .insert(id, value, 0)
                .map_err(|e| aya_error("update", BACKENDS4_MAP, e))
        } else if let Some(value) = codec::backend6(backend) {
            self.backends6
                .insert(id, value, 0)
                .map_err(|e| aya_error("update", BACKENDS6_MAP, e))
        } else {
            Ok(())
        }
    }

    fn delete_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        if backend.addr.address.is_ipv4() {
            ignore_missing(self.backends4.remove(&id), BACKENDS4_MAP)
        } else {
            ignore_missing(self.backends6.remove(&id), BACKENDS6_MAP)
        }
    }

    fn services(&self) -> Result<Vec<ServiceEntry>> {
        let mut entries = Vec::new();
        for item in self.services4.iter() {
            let (key, value) = item.map_err(|e| aya_error("dump", SERVICES4_MAP, e))?;
            match codec::from_service4_key(&key) {
                Some((frontend, slot)) => entries.push(ServiceEntry {
                    frontend,
                    slot,
                    value,
                }),
                None => undecodable(SERVICES4_MAP, &key),
            }
        }
        for item in self.services6.iter() {
            let (key, value) = item.map_err(|e| aya_error("dump", SERVICES6_MAP, e))?;
            match codec::from_service6_key(&key) {
                Some((frontend, slot)) => entries.push(ServiceEntry {
                    frontend,
                    slot,
                    value,
                }),
                None => undecodable(SERVICES6_MAP, &key),
            }
        }
        Ok(entries)
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        let mut backends = Vec::new();
        for item in self.backends4.iter() {
            let (id, value) = item.map_err(|e| aya_error("dump", BACKENDS4_MAP, e))?;
            match codec::from_backend4(&value) {
                Some(backend) => backends.push((id, backend)),
                None => undecodable(BACKENDS4_MAP, &value),
            }
        }
        for item in self.backends6.iter() {
            let (id, value) = item.map_err(|e| aya_error("dump", BACKENDS6_MAP, e))?;
            match codec::from_backend6(&value) {
                Some(backend) => backends.push((id, backend)),
                None => undecodable(BACKENDS6_MAP, &value),
            }
        }
        Ok(backends)
    }
}
