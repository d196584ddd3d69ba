//! `lb-agent services --summary`: how full each pinned map is and what it costs the kernel,
//! read from the pins without the agent (the first thing to look at when a Service is
//! reported "not programmed: … is full"), the datapath's counters (`LB_COUNTERS`,
//! summed over the CPUs), and where the programs are attached (the pinned links: the
//! socket hooks, `tc-*-<dev>` and `xdp-<dev>`).
use std::{
    fmt::Write as _,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{COUNTERS_MAP, Counter, PINNED_MAPS};

use crate::{
    inspect::OutputFormat,
    maps::bpf::{present_backends, sys_bpf},
};

/// One pinned map's fill.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapFill {
    /// The map's name (and pin file name).
    pub name: &'static str,
    /// Entries it holds now.
    pub entries: u64,
    /// Entries it can hold (`max_entries`).
    pub capacity: u64,
    /// Bytes the kernel accounts to it (`memlock` in its fdinfo: buckets and entries for
    /// hash maps allocated as written, everything for preallocated ones).
    pub memory_bytes: u64,
}

/// Reads every map pinned under `pin_dir` and renders their fill.
///
/// # Errors
/// When a map is not pinned there or cannot be read.
pub fn summary(pin_dir: &Path, format: OutputFormat) -> anyhow::Result<String> {
    let fills = PINNED_MAPS
        .iter()
        .filter(|spec| spec.name != COUNTERS_MAP)
        .map(|spec| {
            let path = pin_dir.join(spec.name);
            fill(spec.name, &path).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e} (is an agent running with --bpf-pin-path {}?)",
                    path.display(),
                    pin_dir.display()
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let counters = counters(pin_dir)?;
    let links = links(pin_dir);
    Ok(match format {
        OutputFormat::Json => {
            let counters: std::collections::BTreeMap<&str, u64> =
                counters.iter().map(|(c, n)| (c.name(), *n)).collect();
            serde_json::to_string_pretty(&serde_json::json!({
                "maps": fills,
                "counters": counters,
                "links": links,
            }))? + "\n"
        }
        OutputFormat::Table => {
            table(&fills) + "\n" + &counters_table(&counters) + "\n" + &links_table(&links)
        }
    })
}

/// The agent's links pinned under `pin_dir` (pin names, sorted): where its programs run.
#[must_use]
pub fn links(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pin_dir.join(crate::loader::LINKS_DIR))
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| crate::loader::is_agent_link(name))
        .collect();
    names.sort();
    names
}

fn links_table(links: &[String]) -> String {
    let xdp: Vec<&str> = links
        .iter()
        .filter_map(|l| l.strip_prefix(crate::loader::XDP_PROGRAM.1))
        .collect();
    let xdp = if xdp.is_empty() {
        "none".to_owned()
    } else {
        xdp.join(", ")
    };
    format!("LINKS {}\nXDP (native) on: {xdp}\n", links.join(" "))
}

/// The datapath's counters pinned under `pin_dir`, each summed over the CPUs.
///
/// # Errors
/// When the counters map is not pinned there or cannot be read.
pub fn counters(pin_dir: &Path) -> anyhow::Result<Vec<(Counter, u64)>> {
    let data = open_pin(pin_dir, COUNTERS_MAP)?;
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    Counter::ALL
        .iter()
        .map(|&counter| {
            let per_cpu = map.get(&(counter as u32), 0)?;
            Ok((counter, per_cpu.iter().sum()))
        })
        .collect()
}

/// The map `name` pinned under `pin_dir`, for a command run beside the agent: the error
/// says where it looked and what is probably missing.
///
/// # Errors
/// When no map is pinned there.
pub fn open_pin(pin_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (is an agent running with --bpf-pin-path {}?)",
            path.display(),
            pin_dir.display()
        )
    })
}

fn counters_table(counters: &[(Counter, u64)]) -> String {
    let mut out = format!("{:<26} {:>12}\n", "DATAPATH COUNTER", "COUNT");
    for (counter, n) in counters {
        let _ = writeln!(out, "{:<26} {n:>12}", counter.name());
    }
    out
}

/// The fill of every map pinned under `pin_dir` that can be read (for `/metrics`; a map
/// that cannot is left out and logged at debug level).
#[must_use]
pub fn readable_fills(pin_dir: &Path) -> Vec<MapFill> {
    PINNED_MAPS
        .iter()
        .filter(|spec| spec.name != COUNTERS_MAP)
        .filter_map(|spec| {
            fill(spec.name, &pin_dir.join(spec.name))
                .inspect_err(|e| tracing::debug!(map = spec.name, error = %e, "map fill unread"))
                .ok()
        })
        .collect()
}

fn table(fills: &[MapFill]) -> String {
    let mut out = format!(
        "{:<20} {:>10} {:>10} {:>6} {:>10}\n",
        "MAP", "ENTRIES", "CAPACITY", "FILL", "MEMORY"
    );
    for f in fills {
        let percent = if f.capacity == 0 {
            0.0
        } else {
            f.entries as f64 * 100.0 / f.capacity as f64
        };
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>10} {:>5.1}% {:>7.1} MiB",
            f.name,
            f.entries,
            f.capacity,
            percent,
            f.memory_bytes as f64 / f64::from(1 << 20)
        );
    }
    let total: u64 = fills.iter().map(|f| f.memory_bytes).sum();
    let _ = writeln!(
        out,
        "{:<20} {:>10} {:>10} {:>6} {:>7.1} MiB",
        "total",
        "",
        "",
        "",
        total as f64 / f64::from(1 << 20)
    );
    out
}

/// The fill of the map pinned at `path`.
fn fill(name: &'static str, path: &Path) -> io::Result<MapFill> {
    let map = MapData::from_pin(path).map_err(io::Error::other)?;
    let info = map.info().map_err(io::Error::other)?;
    let entries = match name {
        // Arrays indexed by backend id: the ids a backend holds.
        lb_common::BACKENDS4_MAP => present_backends::<lb_common::Backend4>(&map, name)
            .map_err(|e| e.source)?
            .len() as u64,
        lb_common::BACKENDS6_MAP => present_backends::<lb_common::Backend6>(&map, name)
            .map_err(|e| e.source)?
            .len() as u64,
        // The slots array: the slots the masters name (retired ranges keep their values).
        lb_common::SLOTS_MAP => match path.parent() {
            Some(dir) => named_slots(dir)?,
            None => 0,
        },
        _ => count_entries(map.fd().as_fd(), info.key_size() as usize)?,
    };
    let fd = map.fd().as_fd();
    Ok(MapFill {
        name,
        entries,
        capacity: u64::from(info.max_entries()),
        memory_bytes: memlock(fd)?,
    })
}

/// The slots the masters of both services maps pinned under `dir` name (their counts).
fn named_slots(dir: &Path) -> io::Result<u64> {
    let maps = crate::maps::bpf::BpfMaps::open_pinned(dir).map_err(|e| e.source)?;
    let masters = crate::maps::LbMaps::services(&maps).map_err(|e| e.source)?;
    Ok(masters.iter().map(|m| u64::from(m.value.count)).sum())
}

/// The number of keys in the map, by walking them (`BPF_MAP_GET_NEXT_KEY`): the kernel
/// keeps no count it would tell. An entry deleted during the walk restarts it from the
/// first key at worst, so the count is a moment's, not exact under churn.
fn count_entries(fd: BorrowedFd<'_>, key_size: usize) -> io::Result<u64> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut count = 0u64;
    let mut first = true;
    loop {
        let mut attr = Attr {
            map_fd: fd.as_raw_fd() as u32,
            pad: 0,
            // A null key asks for the first one.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` is the element member and points at buffers of the map's key size
        // that outlive the call.
        match unsafe { sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(e) => return Err(e),
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}

/// The `memlock:` line of the map's fdinfo: what the kernel accounts to it.
fn memlock(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no memlock line in the map's fdinfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_fill_and_memory() {
        let out = table(&[MapFill {
            name: "LB4_SERVICES",
            entries: 1_100_001,
            capacity: 2_097_152,
            memory_bytes: 3 << 20,
        }]);
        let line = out.lines().nth(1).unwrap();
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            ["LB4_SERVICES", "1100001", "2097152", "52.5%", "3.0", "MiB"]
        );
        assert!(out.lines().last().unwrap().starts_with("total"), "{out}");
    }
}
