//! The layout version of the pinned maps (`LB_LAYOUT`, `lb_common::LAYOUT_VERSION`): an
//! agent adopts the maps a previous agent pinned only if it knows what they mean. Layouts
//! before its own are migrated (the steps are in [`crate::loader::load`]: old conntrack
//! entries moved into the three tables, backends moved from hash maps into arrays, backend
//! slots moved from the services maps into the slots array, retired links detached, new
//! maps created); a
//! newer layout is refused with what to do, never read with the wrong meaning.
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    BACKENDS4_MAP, BACKENDS6_MAP, Backend4, Backend6, LAYOUT_MAP, LAYOUT_VERSION, MASTER_SLOT,
    PINNED_MAPS, SERVICES4_MAP, SERVICES6_MAP, Service4Key, Service6Key, ServiceValue, SlotValue,
};

/// What the pin directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// No maps: a first start.
    Nothing,
    /// Maps of layout `n` (1 for the maps pinned before the version was recorded).
    Layout(u32),
}

/// The pins were written by a newer agent.
#[derive(Debug, thiserror::Error)]
#[error(
    "the maps pinned in {dir} have layout {found}, newer than this agent's {LAYOUT_VERSION}: \
     they were written by a newer lb, whose maps this one would misread. Run that version \
     (or newer), or remove them with `lb-agent cleanup --bpf-pin-path {dir}` (established \
     connections through tc lose their conntrack entries)"
)]
pub struct NewerLayout {
    pub dir: String,
    pub found: u32,
}

/// The layout of the maps pinned under `pin_dir`.
///
/// # Errors
/// When the version map exists but cannot be read.
pub fn found(pin_dir: &Path) -> std::io::Result<Found> {
    let path = pin_dir.join(LAYOUT_MAP);
    if path.exists() {
        let array = open(&path)?;
        return array
            .get(&0, 0)
            .map(Found::Layout)
            .map_err(std::io::Error::other);
    }
    let any_map = PINNED_MAPS
        .iter()
        .any(|spec| pin_dir.join(spec.name).exists())
        || pin_dir.join(lb_common::LEGACY_CT_MAP).exists();
    Ok(if any_map {
        Found::Layout(1)
    } else {
        Found::Nothing
    })
}

/// Whether this agent may adopt what it found.
///
/// # Errors
/// [`NewerLayout`] for a layout after [`LAYOUT_VERSION`].
pub fn check(pin_dir: &Path, found: Found) -> Result<(), NewerLayout> {
    match found {
        Found::Layout(n) if n > LAYOUT_VERSION => Err(NewerLayout {
            dir: pin_dir.display().to_string(),
            found: n,
        }),
        _ => Ok(()),
    }
}

/// Records that the maps under `pin_dir` now have this agent's layout (after its
/// migrations ran).
///
/// # Errors
/// When the version map cannot be written.
pub fn record(pin_dir: &Path) -> std::io::Result<()> {
    let mut array = open(&pin_dir.join(LAYOUT_MAP))?;
    array
        .set(0, LAYOUT_VERSION, 0)
        .map_err(std::io::Error::other)
}

/// The entries of a pair of hash maps (the IPv4 one's, the IPv6 one's) an agent of an
/// earlier layout pinned, taken out of their pins so that the loader creates this layout's
/// maps in their place.
#[derive(Debug)]
pub struct Taken<T4, T6> {
    pub v4: Vec<T4>,
    pub v6: Vec<T6>,
}

impl<T4, T6> Default for Taken<T4, T6> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

/// The backends an agent of layout 2 or earlier kept in hash maps keyed by id.
pub type HashedBackends = Taken<(u32, Backend4), (u32, Backend6)>;

/// The first layout whose backends maps are arrays.
const ARRAY_BACKENDS: u32 = 3;

/// Takes the backends out of hash-map pins of an earlier layout and removes those pins
/// (the programs of the running agent keep the maps they use until they are replaced);
/// the loader then writes them into the new arrays under the same ids
/// (`BpfMaps::restore_backends`). Nothing when the layout has arrays already.
///
/// # Errors
/// When a pin cannot be read or removed.
pub fn take_hashed_backends(pin_dir: &Path, found: Found) -> std::io::Result<HashedBackends> {
    take_before(
        pin_dir,
        found,
        ARRAY_BACKENDS,
        [BACKENDS4_MAP, BACKENDS6_MAP],
    )
}

/// The hash maps `[IPv4 one, IPv6 one]` pinned under `pin_dir`, taken out of their pins
/// when `found` is a layout before `changed_in` (nothing otherwise).
fn take_before<K4: aya::Pod, V4: aya::Pod, K6: aya::Pod, V6: aya::Pod>(
    pin_dir: &Path,
    found: Found,
    changed_in: u32,
    [map4, map6]: [&str; 2],
) -> std::io::Result<Taken<(K4, V4), (K6, V6)>> {
    if !matches!(found, Found::Layout(n) if n < changed_in) {
        return Ok(Taken::default());
    }
    Ok(Taken {
        v4: take_hashed(pin_dir, map4)?,
        v6: take_hashed(pin_dir, map6)?,
    })
}

/// The entries of the hash map pinned as `name` (nothing if it is not a hash map of `K`
/// to `V`), its pin removed.
fn take_hashed<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
) -> std::io::Result<Vec<(K, V)>> {
    let path = pin_dir.join(name);
    let Ok(data) = MapData::from_pin(&path) else {
        return Ok(Vec::new());
    };
    let info = data.info().map_err(std::io::Error::other)?;
    let is_hash = info.map_type().is_ok_and(|t| t == aya::maps::MapType::Hash);
    if !is_hash
        || info.key_size() as usize != size_of::<K>()
        || info.value_size() as usize != size_of::<V>()
    {
        return Ok(Vec::new());
    }
    let map: HashMap<MapData, K, V> =
        HashMap::try_from(Map::HashMap(data)).map_err(std::io::Error::other)?;
    let entries = map
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)?;
    std::fs::remove_file(&path)?;
    Ok(entries)
}

/// A services-map value of the layouts before 4 (16 bytes): a master, or a backend slot
/// (`backend_slot` 1..=count of its key) holding an IPv4 backend inline in the fields a
/// master uses for itself.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SlottedValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub flags: u32,
    pub count: u16,
    pub pad: u16,
}

// SAFETY: plain `#[repr(C)]` integers without padding; every bit pattern is valid.
unsafe impl aya::Pod for SlottedValue {}

impl SlottedValue {
    /// This slot as the slots array holds it (its peer mark cleared).
    #[must_use]
    pub const fn slot(&self) -> SlotValue {
        SlotValue {
            backend_id: self.backend_id,
            peer_mark: 0,
            backend: Backend4 {
                address: self.flags,
                port: self.count,
                proto: self.pad as u8,
                flags: (self.pad >> 8) as u8,
            },
        }
    }

    /// This master, naming `count` slots from `base`.
    #[must_use]
    pub const fn master(&self, base: u32) -> ServiceValue {
        ServiceValue {
            backend_id: self.backend_id,
            rev_nat_id: self.rev_nat_id,
            flags: self.flags,
            count: self.count,
            pad: 0,
            base,
        }
    }
}

/// The services maps of a layout before 4, masters and slots together.
pub type SlottedServices = Taken<(Service4Key, SlottedValue), (Service6Key, SlottedValue)>;

/// The first layout whose backend slots are in the slots array.
const SLOTS_ARRAY: u32 = 4;

/// Takes the masters and slots out of the services-map pins of an earlier layout and
/// removes those pins (the running agent's programs keep their maps until replaced); the
/// loader then writes them into this layout's maps (`BpfMaps::restore_services`), so the
/// frontends keep working while the agent's first sync runs. Nothing when the layout has
/// the slots array already.
///
/// # Errors
/// When a pin cannot be read or removed.
pub fn take_slotted_services(pin_dir: &Path, found: Found) -> std::io::Result<SlottedServices> {
    take_before(pin_dir, found, SLOTS_ARRAY, [SERVICES4_MAP, SERVICES6_MAP])
}

/// The masters of `entries` (a services map of a layout before 4) whose slots `1..=count`
/// are all there, each with its slots in order.
pub fn whole_frontends<K: Copy + Ord + SlotKey>(
    entries: &[(K, SlottedValue)],
) -> Vec<(K, SlottedValue, Vec<SlotValue>)> {
    let by_key: std::collections::BTreeMap<K, SlottedValue> = entries.iter().copied().collect();
    let mut whole = Vec::new();
    for (key, master) in entries.iter().filter(|(k, _)| k.slot() == MASTER_SLOT) {
        let slots: Option<Vec<SlotValue>> = (1..=master.count)
            .map(|n| by_key.get(&key.at_slot(n)).map(SlottedValue::slot))
            .collect();
        if let Some(slots) = slots {
            whole.push((*key, *master, slots));
        }
    }
    whole
}

/// The slot number in a services-map key of a layout before 4.
pub trait SlotKey {
    fn slot(&self) -> u16;
    #[must_use]
    fn at_slot(&self, slot: u16) -> Self;
}

macro_rules! slot_key {
    ($key:ty) => {
        impl SlotKey for $key {
            fn slot(&self) -> u16 {
                self.backend_slot
            }

            fn at_slot(&self, slot: u16) -> Self {
                Self {
                    backend_slot: slot,
                    ..*self
                }
            }
        }
    };
}

slot_key!(Service4Key);
slot_key!(Service6Key);

fn open(path: &Path) -> std::io::Result<Array<MapData, u32>> {
    let data = MapData::from_pin(path).map_err(std::io::Error::other)?;
    Array::try_from(Map::Array(data)).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_of_the_services_map_become_array_entries_of_whole_frontends_only() {
        let web = Service4Key::new(u32::from_ne_bytes([10, 96, 0, 10]), 80u16.to_be(), 6);
        let broken = Service4Key::new(u32::from_ne_bytes([10, 96, 0, 11]), 80u16.to_be(), 6);
        let master = |count| SlottedValue {
            backend_id: 0,
            rev_nat_id: 7,
            flags: lb_common::SVC_F_CLUSTER_IP,
            count,
            pad: 0,
        };
        let slot = |id, last_octet| SlottedValue {
            backend_id: id,
            rev_nat_id: 7,
            flags: u32::from_ne_bytes([10, 244, 0, last_octet]),
            count: 8080u16.to_be(),
            pad: 6,
        };
        let entries = vec![
            (web, master(2)),
            (web.at_slot(2), slot(4, 4)),
            (web.at_slot(1), slot(3, 3)),
            (broken, master(2)),
            (broken.at_slot(1), slot(3, 3)),
        ];
        let whole = whole_frontends(&entries);
        assert_eq!(
            whole.len(),
            1,
            "the frontend missing slot 2 is left to the sync"
        );
        let (key, value, slots) = &whole[0];
        assert_eq!(*key, web);
        assert_eq!(value.master(40).base, 40);
        assert_eq!(value.master(40).count, 2);
        let ids: Vec<u32> = slots.iter().map(|s| s.backend_id).collect();
        assert_eq!(ids, [3, 4], "in slot order");
        assert_eq!(slots[0].peer_mark, 0, "peer marks are not carried over");
        assert_eq!(
            slots[0]
                .inline_backend4()
                .map(|b| (b.address, b.port, b.proto)),
            Some((u32::from_ne_bytes([10, 244, 0, 3]), 8080u16.to_be(), 6))
        );
    }

    #[test]
    fn a_newer_layout_is_refused_with_what_to_do() {
        let dir = Path::new("/sys/fs/bpf/lb");
        assert!(check(dir, Found::Nothing).is_ok());
        assert!(
            check(dir, Found::Layout(1)).is_ok(),
            "older layouts are migrated"
        );
        assert!(check(dir, Found::Layout(LAYOUT_VERSION)).is_ok());
        let error = check(dir, Found::Layout(LAYOUT_VERSION + 1))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&format!("layout {}", LAYOUT_VERSION + 1)),
            "{error}"
        );
        assert!(
            error.contains("lb-agent cleanup --bpf-pin-path /sys/fs/bpf/lb"),
            "{error}"
        );
    }
}
