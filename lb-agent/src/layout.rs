//! The layout version of the pinned maps (`LB_LAYOUT`, `lb_common::LAYOUT_VERSION`): an
//! agent adopts the maps a previous agent pinned only if it knows what they mean. Layouts
//! before its own are migrated (the steps are in [`crate::loader::load`]: old conntrack
//! entries moved into the three tables, backends moved from hash maps into arrays, retired
//! links detached, new maps created); a
//! newer layout is refused with what to do, never read with the wrong meaning.
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    BACKENDS4_MAP, BACKENDS6_MAP, Backend4, Backend6, LAYOUT_MAP, LAYOUT_VERSION, PINNED_MAPS,
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

/// The backends an agent of layout 2 or earlier kept in hash maps keyed by id, taken out
/// of their pins so that the loader creates the arrays of this layout in their place.
#[derive(Debug, Default)]
pub struct HashedBackends {
    pub v4: Vec<(u32, Backend4)>,
    pub v6: Vec<(u32, Backend6)>,
}

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
    let mut taken = HashedBackends::default();
    if !matches!(found, Found::Layout(n) if n < ARRAY_BACKENDS) {
        return Ok(taken);
    }
    taken.v4 = take_hashed(pin_dir, BACKENDS4_MAP)?;
    taken.v6 = take_hashed(pin_dir, BACKENDS6_MAP)?;
    Ok(taken)
}

fn take_hashed<V: aya::Pod>(pin_dir: &Path, name: &str) -> std::io::Result<Vec<(u32, V)>> {
    let path = pin_dir.join(name);
    let Ok(data) = MapData::from_pin(&path) else {
        return Ok(Vec::new());
    };
    let is_hash = data
        .info()
        .map_err(std::io::Error::other)?
        .map_type()
        .is_ok_and(|t| t == aya::maps::MapType::Hash);
    if !is_hash {
        return Ok(Vec::new());
    }
    let map: HashMap<MapData, u32, V> =
        HashMap::try_from(Map::HashMap(data)).map_err(std::io::Error::other)?;
    let entries = map
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)?;
    std::fs::remove_file(&path)?;
    Ok(entries)
}

fn open(path: &Path) -> std::io::Result<Array<MapData, u32>> {
    let data = MapData::from_pin(path).map_err(std::io::Error::other)?;
    Array::try_from(Map::Array(data)).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

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
