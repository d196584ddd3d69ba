//! [`LbMaps`] over the real BPF maps, whether just loaded or opened from their pins.
use std::{io, path::Path};

use aya::maps::{HashMap, Map, MapData, MapError as AyaMapError};
use lb_common::{BACKENDS4_MAP, Backend4, SERVICES4_MAP, Service4Key, Service4Value};

use super::{LbMaps, MapError, Result};

/// The load-balancing maps of a loaded object or of a pin directory.
pub struct BpfMaps {
    services: HashMap<MapData, Service4Key, Service4Value>,
    backends: HashMap<MapData, u32, Backend4>,
}

impl std::fmt::Debug for BpfMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfMaps").finish_non_exhaustive()
    }
}

impl BpfMaps {
    /// Wraps maps taken from a loaded [`aya::Ebpf`].
    ///
    /// # Errors
    /// When a map has the wrong type or key/value size.
    pub fn new(services: Map, backends: Map) -> Result<Self> {
        Ok(Self {
            services: HashMap::try_from(services)
                .map_err(|e| aya_error("open", SERVICES4_MAP, e))?,
            backends: HashMap::try_from(backends)
                .map_err(|e| aya_error("open", BACKENDS4_MAP, e))?,
        })
    }

    /// Opens the maps pinned under `dir` (no agent needs to run).
    ///
    /// # Errors
    /// When a pin is missing or is not the expected map.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        let open = |name: &'static str| {
            MapData::from_pin(dir.join(name))
                .map(Map::HashMap)
                .map_err(|e| aya_error("open pinned", name, e))
        };
        Self::new(open(SERVICES4_MAP)?, open(BACKENDS4_MAP)?)
    }
}

fn aya_error(op: &'static str, map: &'static str, err: AyaMapError) -> MapError {
    let source = match err {
        AyaMapError::SyscallError(e) => e.io_error,
        other => io::Error::other(other.to_string()),
    };
    MapError { op, map, source }
}

/// Deleting an absent key is fine: the writer's record and the map agree on the outcome.
fn ignore_missing(
    result: Result<(), AyaMapError>,
    op: &'static str,
    map: &'static str,
) -> Result<()> {
    match result {
        Err(AyaMapError::KeyNotFound) => Ok(()),
        Err(AyaMapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other.map_err(|e| aya_error(op, map, e)),
    }
}

impl LbMaps for BpfMaps {
    fn set_service(&mut self, key: Service4Key, value: Service4Value) -> Result<()> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| aya_error("update", SERVICES4_MAP, e))
    }

    fn delete_service(&mut self, key: Service4Key) -> Result<()> {
        ignore_missing(self.services.remove(&key), "delete", SERVICES4_MAP)
    }

    fn set_backend(&mut self, id: u32, backend: Backend4) -> Result<()> {
        self.backends
            .insert(id, backend, 0)
            .map_err(|e| aya_error("update", BACKENDS4_MAP, e))
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends.remove(&id), "delete", BACKENDS4_MAP)
    }

    fn services(&self) -> Result<Vec<(Service4Key, Service4Value)>> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| aya_error("dump", SERVICES4_MAP, e))
    }

    fn backends(&self) -> Result<Vec<(u32, Backend4)>> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| aya_error("dump", BACKENDS4_MAP, e))
    }
}
