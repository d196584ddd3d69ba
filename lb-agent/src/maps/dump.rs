//! Decoding the maps' contents into frontends and backends: for `lb-agent services`, for
//! the writer adopting what a previous agent left, and for the golden tests.
use std::collections::BTreeMap;

use serde::Serialize;

use super::{LbMaps, Result, ServiceEntry};
use crate::model::{Backend, EndpointState, FrontendKind, L4Addr};

/// One frontend as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendEntry {
    #[serde(flatten)]
    pub address: L4Addr,
    /// Which Service field the frontend comes from (`None`: flags the agent never writes).
    pub kind: Option<FrontendKind>,
    pub rev_nat_id: lb_common::FrontendId,
    pub flags: u32,
    /// The master's backend count.
    pub count: u16,
    /// Where its slots start in the slots array.
    pub slot_base: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds (master flag `SVC_F_AFFINITY`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
    /// Backend slots `1..=count`, as the slots array holds them.
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
    pub backend: Option<Backend>,
}

/// Everything in the maps, decoded.
#[derive(Clone, Debug, Default)]
pub struct MapContents {
    pub frontends: Vec<FrontendEntry>,
    pub backends: BTreeMap<u32, Backend>,
    /// Frontends whose slot range overlaps another's, or ends past the array's indices
    /// (only a foreign writer leaves one): the later of the two in address order.
    pub overlapping: Vec<L4Addr>,
    /// Affinity-match entries: (backend id, frontend `rev_nat_id`), sorted.
    pub affinity_matches: Vec<(u32, lb_common::FrontendId)>,
    /// Source-range entries: (frontend `rev_nat_id`, range), sorted.
    pub source_ranges: Vec<(lb_common::FrontendId, ipnet::IpNet)>,
}

/// Reads and decodes the maps.
///
/// # Errors
/// When a map cannot be read.
pub fn read(maps: &impl LbMaps) -> Result<MapContents> {
    let masters = maps.services()?;
    let ranges: Vec<(u32, u16)> = masters
        .iter()
        .map(|m| (m.value.base, m.value.count))
        .collect();
    let mut contents = decode(&masters, &maps.slots(&ranges)?, &maps.backends()?);
    contents.affinity_matches = maps.affinity_matches()?;
    contents.affinity_matches.sort_unstable();
    contents.source_ranges = maps.source_ranges()?;
    contents.source_ranges.sort_unstable();
    Ok(contents)
}

/// Decodes entries: `slots` holds the slots of each master of `masters` in turn.
#[must_use]
pub fn decode(
    masters: &[ServiceEntry],
    slots: &[lb_common::SlotValue],
    backends: &[(u32, Backend)],
) -> MapContents {
    let mut contents = MapContents {
        backends: backends.iter().copied().collect(),
        ..MapContents::default()
    };
    let mut frontends: BTreeMap<L4Addr, FrontendEntry> = BTreeMap::new();
    let mut slots = slots.iter();
    for entry in masters {
        let value = &entry.value;
        let frontend = FrontendEntry {
            address: entry.frontend,
            kind: super::codec::kind(value.flags),
            rev_nat_id: value.rev_nat_id,
            flags: value.flags,
            count: value.count,
            slot_base: value.base,
            affinity_timeout: (value.flags & lb_common::SVC_F_AFFINITY != 0)
                .then_some(value.backend_id),
            slots: (1..=value.count)
                .zip(slots.by_ref())
                .map(|(slot, s)| SlotEntry {
                    slot,
                    backend_id: s.backend_id,
                    backend: contents.backends.get(&s.backend_id).copied(),
                })
                .collect(),
        };
        frontends.insert(entry.frontend, frontend);
    }
    // The writer's own test of an adopted range: taken in address order, as it adopts them.
    let mut taken = super::writer::slot_ranges::SlotRanges::new(u32::MAX);
    for frontend in frontends.values() {
        if !taken.reserve(frontend.slot_base, u32::from(frontend.count)) {
            contents.overlapping.push(frontend.address);
        }
    }
    contents.frontends = frontends.into_values().collect();
    contents
}

/// The maps as sorted one-line entries, the format of the golden files:
/// `SVC 10.96.0.10:80/TCP SLOT=0 COUNT=2 REVNAT=1 FLAGS=0x1`,
/// `SVC 10.96.0.10:80/TCP SLOT=1 BACKEND=3`, `BE 3 10.244.0.2:8080/TCP` (with ` TERMINATING`
/// for a terminating backend).
#[must_use]
pub fn lines(contents: &MapContents) -> Vec<String> {
    let mut out = Vec::new();
    for f in &contents.frontends {
        let affinity = f
            .affinity_timeout
            .map(|t| format!(" AFFINITY={t}s"))
            .unwrap_or_default();
        out.push(format!(
            "SVC {} SLOT=0 COUNT={} REVNAT={} FLAGS={:#x}{affinity}",
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
        let state = match backend.state {
            EndpointState::Ready => "",
            EndpointState::Terminating => " TERMINATING",
        };
        let remote = if backend.remote { " REMOTE" } else { "" };
        out.push(format!("BE {id} {}{state}{remote}", backend.addr));
    }
    for (id, rev_nat_id) in &contents.affinity_matches {
        out.push(format!("AFFINITY-MATCH BACKEND={id} REVNAT={rev_nat_id}"));
    }
    for (rev_nat_id, range) in &contents.source_ranges {
        out.push(format!("SOURCE-RANGE REVNAT={rev_nat_id} {range}"));
    }
    for frontend in &contents.overlapping {
        out.push(format!("OVERLAPPING SLOTS SVC {frontend}"));
    }
    out
}
