//! Decoding the maps' contents into frontends and backends: for `lb-agent services`, for
//! the writer adopting what a previous agent left, and for the golden tests.
use std::collections::BTreeMap;

use lb_common::{Backend4, Service4Key, Service4Value};
use serde::Serialize;

use super::{LbMaps, Result, backend_of, frontend_of};
use crate::model::L4Addr;

/// One frontend as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendEntry {
    #[serde(flatten)]
    pub address: L4Addr,
    pub rev_nat_id: u16,
    pub flags: u32,
    /// The master's backend count.
    pub count: u16,
    /// Backend slots present in the map, in slot order (normally exactly `1..=count`).
    #[serde(rename = "backends")]
    pub slots: Vec<SlotEntry>,
}

/// One backend slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlotEntry {
    pub slot: u16,
    pub backend_id: u32,
    /// `None` when the slot names a backend the backends map does not hold.
    #[serde(flatten)]
    pub backend: Option<L4Addr>,
}

/// Everything in the maps, decoded.
#[derive(Clone, Debug, Default)]
pub struct MapContents {
    pub frontends: Vec<FrontendEntry>,
    pub backends: BTreeMap<u32, L4Addr>,
    /// Entries no frontend explains: slots without a master, unknown protocols.
    pub stray_services: Vec<Service4Key>,
    /// Backend ids whose value cannot be decoded.
    pub stray_backends: Vec<u32>,
}

/// Reads and decodes the maps.
///
/// # Errors
/// When a map cannot be read.
pub fn read(maps: &impl LbMaps) -> Result<MapContents> {
    Ok(decode(&maps.services()?, &maps.backends()?))
}

/// Decodes raw entries.
#[must_use]
pub fn decode(
    services: &[(Service4Key, Service4Value)],
    backends: &[(u32, Backend4)],
) -> MapContents {
    let mut contents = MapContents::default();
    for (id, value) in backends {
        match backend_of(value) {
            Some(backend) => {
                contents.backends.insert(*id, backend);
            }
            None => contents.stray_backends.push(*id),
        }
    }
    let mut frontends: BTreeMap<L4Addr, FrontendEntry> = BTreeMap::new();
    for (key, value) in services.iter().filter(|(k, _)| k.is_master()) {
        let Some(address) = frontend_of(key) else {
            contents.stray_services.push(*key);
            continue;
        };
        frontends.insert(
            address,
            FrontendEntry {
                address,
                rev_nat_id: value.rev_nat_id,
                flags: value.flags,
                count: value.count,
                slots: Vec::new(),
            },
        );
    }
    for (key, value) in services.iter().filter(|(k, _)| !k.is_master()) {
        match frontend_of(key).and_then(|a| frontends.get_mut(&a)) {
            Some(frontend) => frontend.slots.push(SlotEntry {
                slot: key.backend_slot,
                backend_id: value.backend_id,
                backend: contents.backends.get(&value.backend_id).copied(),
            }),
            None => contents.stray_services.push(*key),
        }
    }
    for frontend in frontends.values_mut() {
        frontend.slots.sort_by_key(|s| s.slot);
    }
    contents.frontends = frontends.into_values().collect();
    contents
}

/// The maps as sorted one-line entries, the format of the golden files:
/// `SVC 10.96.0.10:80/TCP SLOT=0 COUNT=2 REVNAT=1 FLAGS=0x1`,
/// `SVC 10.96.0.10:80/TCP SLOT=1 BACKEND=3`, `BE 3 10.244.0.2:8080/TCP`.
#[must_use]
pub fn lines(contents: &MapContents) -> Vec<String> {
    let mut out = Vec::new();
    for f in &contents.frontends {
        out.push(format!(
            "SVC {} SLOT=0 COUNT={} REVNAT={} FLAGS={:#x}",
            f.address, f.count, f.rev_nat_id, f.flags
        ));
        for s in &f.slots {
            out.push(format!(
                "SVC {} SLOT={} BACKEND={}",
                f.address, s.slot, s.backend_id
            ));
        }
    }
    for (id, backend) in &contents.backends {
        out.push(format!("BE {id} {backend}"));
    }
    for key in &contents.stray_services {
        out.push(format!("STRAY SVC {key:?}"));
    }
    for id in &contents.stray_backends {
        out.push(format!("STRAY BE {id}"));
    }
    out
}
