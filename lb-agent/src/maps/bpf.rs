//! [`LbMaps`] over the real BPF maps, whether just loaded or opened from their pins.
use std::{io, path::Path};

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{
    Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError as AyaMapError, lpm_trie::Key,
};
use lb_common::{
    AFFINITY_MAP, AFFINITY_MATCH_MAP, AffinityKey, AffinityMatchKey, AffinityValue, BACKENDS4_MAP,
    BACKENDS6_MAP, Backend4, Backend6, BackendEntry, MapKind, PEERS_MAP, PeerKey, PeerValue,
    SERVICES4_MAP, SERVICES6_MAP, SLOTS_MAP, SOURCE_RANGES_MAP, Service4Key, Service6Key,
    ServiceValue, SlotValue, SourceRange, source_range_prefix,
};
use tracing::warn;

use super::{LbMaps, MapError, Op, Result, ServiceEntry, codec};
use crate::model::{Backend, L4Addr};

/// The service and backend maps of both families, of a loaded object or of a pin directory.
pub struct BpfMaps {
    services4: HashMap<MapData, Service4Key, ServiceValue>,
    services6: HashMap<MapData, Service6Key, ServiceValue>,
    /// The backend slots of both families, in the ranges the masters name.
    slots: Array<MapData, SlotValue>,
    /// Backends by id: arrays, an id no backend holds is all zeros.
    backends4: Array<MapData, Backend4>,
    backends6: Array<MapData, Backend6>,
    affinity_match: HashMap<MapData, AffinityMatchKey, u32>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    source_ranges: LpmTrie<MapData, SourceRange, u32>,
    peers: HashMap<MapData, PeerKey, PeerValue>,
    /// Each map's `max_entries` as the kernel created it (the `--max-*` flags).
    capacities: Vec<(&'static str, usize)>,
    /// When a backend was last deleted, for the datapath (`lb_common::BACKENDS_REMOVED_MAP`):
    /// only the loaded object has it (it is not pinned).
    backends_removed: Option<Array<MapData, u64>>,
}

impl std::fmt::Debug for BpfMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfMaps").finish_non_exhaustive()
    }
}

/// The maps `BpfMaps` is made of, in this order.
pub const MAP_NAMES: [&str; 9] = [
    SERVICES4_MAP,
    SERVICES6_MAP,
    SLOTS_MAP,
    BACKENDS4_MAP,
    BACKENDS6_MAP,
    AFFINITY_MATCH_MAP,
    AFFINITY_MAP,
    SOURCE_RANGES_MAP,
    PEERS_MAP,
];

impl BpfMaps {
    /// Wraps maps obtained by name (from a loaded object, or from pins).
    ///
    /// # Errors
    /// When a map is missing, has the wrong type or key/value size.
    pub fn from_maps(mut take: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        let mut capacities = Vec::new();
        let mut take = |name: &'static str| {
            let map = take(name)?;
            if let Map::HashMap(data)
            | Map::LruHashMap(data)
            | Map::LpmTrie(data)
            | Map::Array(data) = &map
                && let Ok(info) = data.info()
            {
                capacities.push((name, info.max_entries() as usize));
            }
            Ok::<_, MapError>(map)
        };
        let services4 = convert(SERVICES4_MAP, take(SERVICES4_MAP)?)?;
        let services6 = convert(SERVICES6_MAP, take(SERVICES6_MAP)?)?;
        let slots =
            Array::try_from(take(SLOTS_MAP)?).map_err(|e| aya_error("open", SLOTS_MAP, e))?;
        let backends4 = Array::try_from(take(BACKENDS4_MAP)?)
            .map_err(|e| aya_error("open", BACKENDS4_MAP, e))?;
        let backends6 = Array::try_from(take(BACKENDS6_MAP)?)
            .map_err(|e| aya_error("open", BACKENDS6_MAP, e))?;
        let affinity_match = convert(AFFINITY_MATCH_MAP, take(AFFINITY_MATCH_MAP)?)?;
        let affinity = convert(AFFINITY_MAP, take(AFFINITY_MAP)?)?;
        let source_ranges = LpmTrie::try_from(take(SOURCE_RANGES_MAP)?)
            .map_err(|e| aya_error("open", SOURCE_RANGES_MAP, e))?;
        let peers = convert(PEERS_MAP, take(PEERS_MAP)?)?;
        Ok(Self {
            services4,
            services6,
            slots,
            backends4,
            backends6,
            affinity_match,
            affinity,
            source_ranges,
            peers,
            capacities,
            backends_removed: None,
        })
    }

    /// These maps with the loaded object's backend-removal stamp, stamped now.
    ///
    /// # Errors
    /// When the map is not the expected array, or cannot be written.
    pub fn with_backends_removed(mut self, map: Map) -> Result<Self> {
        let array = Array::try_from(map)
            .map_err(|e| aya_error("open", lb_common::BACKENDS_REMOVED_MAP, e))?;
        self.backends_removed = Some(array);
        self.stamp_backends_removed()?;
        Ok(self)
    }

    /// Tells the datapath that backends were deleted until now: the tracked flows check
    /// their backend on their next packet (`backend_may_be_gone` in `lb-ebpf/src/tc.rs`).
    fn stamp_backends_removed(&mut self) -> Result<()> {
        let Some(array) = &mut self.backends_removed else {
            return Ok(());
        };
        let ns = crate::conntrack::monotonic_now_ns().map_err(|source| MapError {
            op: "stamp",
            map: lb_common::BACKENDS_REMOVED_MAP,
            source,
        })?;
        array
            .set(0, ns, 0)
            .map_err(|e| aya_error("update", lb_common::BACKENDS_REMOVED_MAP, e))
    }

    /// Writes backends that an agent of an earlier layout kept in hash maps (see
    /// `crate::layout::take_hashed_backends`) under the same ids: the slots name them.
    /// Those whose id is past the arrays' end are left out and reported; the frontends
    /// naming them are rewritten when the writer adopts the maps.
    ///
    /// # Errors
    /// When the arrays cannot be written.
    pub fn restore_backends(&mut self, old: &crate::layout::HashedBackends) -> Result<()> {
        let capacity = self.backends4.len();
        let fits = |id: &u32| *id < capacity;
        let (ids4, values4): (Vec<u32>, Vec<Backend4>) =
            old.v4.iter().copied().filter(|(id, _)| fits(id)).unzip();
        let (ids6, values6): (Vec<u32>, Vec<Backend6>) =
            old.v6.iter().copied().filter(|(id, _)| fits(id)).unzip();
        let dropped = old.v4.len() + old.v6.len() - ids4.len() - ids6.len();
        if dropped > 0 {
            warn!(
                dropped,
                capacity,
                "backends of the earlier layout with ids past --max-backends were not kept"
            );
        }
        update_batch(self.backends4.map(), BACKENDS4_MAP, &ids4, &values4)?;
        update_batch(self.backends6.map(), BACKENDS6_MAP, &ids6, &values6)
    }

    /// Writes the frontends an agent of an earlier layout kept with their slots in the
    /// services maps (see `crate::layout::take_slotted_services`): each whole frontend's
    /// slots into the next range of the slots array, then its master naming them. Those
    /// missing a slot or a backend (one past `--max-backends` that
    /// [`Self::restore_backends`] left out), or past the array's end, are left to the
    /// writer's first sync.
    ///
    /// # Errors
    /// When the maps cannot be read or written.
    pub fn restore_services(&mut self, old: &crate::layout::SlottedServices) -> Result<()> {
        if old.v4.is_empty() && old.v6.is_empty() {
            // Nothing to migrate (every start but one): no scan of the backends arrays.
            return Ok(());
        }
        let present: crate::fast_hash::HashSet<u32> =
            present_backends::<Backend4>(self.backends4.map(), BACKENDS4_MAP)?
                .into_iter()
                .map(|(id, _)| id)
                .chain(
                    present_backends::<Backend6>(self.backends6.map(), BACKENDS6_MAP)?
                        .into_iter()
                        .map(|(id, _)| id),
                )
                .collect();
        let mut placed = PlacedSlots {
            capacity: self.slots.len(),
            present: &present,
            indices: Vec::new(),
            values: Vec::new(),
        };
        let (k4, m4) = placed.masters(&old.v4);
        let (k6, m6) = placed.masters(&old.v6);
        let left = old.v4.len() + old.v6.len() - k4.len() - k6.len() - placed.indices.len();
        if left > 0 {
            warn!(
                entries = left,
                "services-map entries of the earlier layout left to the first sync"
            );
        }
        update_batch(self.slots.map(), SLOTS_MAP, &placed.indices, &placed.values)?;
        update_batch(self.services4.map(), SERVICES4_MAP, &k4, &m4)?;
        update_batch(self.services6.map(), SERVICES6_MAP, &k6, &m6)
    }

    /// Opens the maps pinned under `dir` (no agent needs to run).
    ///
    /// # Errors
    /// When a pin is missing or is not the expected map.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        Self::from_maps(|name| {
            let kind = lb_common::PINNED_MAPS
                .iter()
                .find(|spec| spec.name == name)
                .map_or(MapKind::Hash, |spec| spec.kind);
            MapData::from_pin(dir.join(name))
                .map(|data| aya_map(kind, data))
                .map_err(|e| aya_error("open pinned", name, e))
        })
    }
}

/// The slots of migrated frontends, placed one range after the other from index 0.
struct PlacedSlots<'a> {
    capacity: u32,
    /// The backend ids the backends arrays hold.
    present: &'a crate::fast_hash::HashSet<u32>,
    indices: Vec<u32>,
    values: Vec<SlotValue>,
}

impl PlacedSlots<'_> {
    /// The keys and masters, naming their placed ranges, of the whole frontends of
    /// `entries` whose backends are all present and whose slots fit.
    fn masters<K: Copy + Ord + crate::layout::SlotKey>(
        &mut self,
        entries: &[(K, crate::layout::SlottedValue)],
    ) -> (Vec<K>, Vec<ServiceValue>) {
        let mut placed = (Vec::new(), Vec::new());
        for (key, master, slots) in crate::layout::whole_frontends(entries) {
            if !slots.iter().all(|s| self.present.contains(&s.backend_id)) {
                continue;
            }
            let base = u32::try_from(self.indices.len()).unwrap_or(u32::MAX);
            let len = u32::try_from(slots.len()).unwrap_or(u32::MAX);
            let Some(end) = base.checked_add(len).filter(|&end| end <= self.capacity) else {
                continue;
            };
            self.indices.extend(base..end);
            self.values.extend(slots);
            placed.0.push(key);
            placed
                .1
                .push(master.master(if len == 0 { 0 } else { base }));
        }
        placed
    }
}

/// A map of `kind` as aya wraps it.
fn aya_map(kind: MapKind, data: MapData) -> Map {
    match kind {
        MapKind::Hash => Map::HashMap(data),
        MapKind::LruHash => Map::LruHashMap(data),
        MapKind::Array => Map::Array(data),
        MapKind::PerCpuArray => Map::PerCpuArray(data),
        MapKind::LpmTrie => Map::LpmTrie(data),
        MapKind::RingBuf => Map::RingBuf(data),
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

/// `array[index] = value`; an index past the end is a full map (`E2BIG`, as the kernel
/// answers a batch), not a broken one.
fn set_array<V: aya::Pod>(
    array: &mut Array<MapData, V>,
    name: &'static str,
    index: u32,
    value: V,
) -> Result<()> {
    match array.set(index, value, 0) {
        Err(AyaMapError::OutOfBounds { .. }) => Err(MapError {
            op: "update",
            map: name,
            source: io::Error::from_raw_os_error(libc::E2BIG),
        }),
        other => other.map_err(|e| aya_error("update", name, e)),
    }
}

/// The entries of `array` (a `BPF_F_MMAPABLE` array of `V`) that hold a backend, with
/// their ids. The array is mapped into memory a window at a time and scanned: reading a
/// million entries through `BPF_MAP_LOOKUP_BATCH` copies each one out of the kernel and
/// cost a third of a second for the two arrays, empty; a scan takes milliseconds, and the
/// window keeps the agent's resident memory from growing by the arrays' size.
pub(crate) fn present_backends<V: aya::Pod + BackendEntry>(
    array: &MapData,
    name: &'static str,
) -> Result<Vec<(u32, V)>> {
    let mut present = Vec::new();
    scan_array::<V>(array, name, |index, value| {
        if value.is_present() {
            present.push((index, value));
        }
    })?;
    Ok(present)
}

/// Calls `each` with every entry of `array` (a `BPF_F_MMAPABLE` array of `V`) and its
/// index, in order, reading the array through a window mapped into memory.
fn scan_array<V: aya::Pod>(
    array: &MapData,
    name: &'static str,
    mut each: impl FnMut(u32, V),
) -> Result<()> {
    /// Entries per window: a whole number of pages for any stride that is a multiple of 8.
    const WINDOW: usize = 65_536;
    let error = |op: &'static str| {
        let source = io::Error::last_os_error();
        MapError {
            op,
            map: name,
            source,
        }
    };
    let info = array.info().map_err(|e| aya_error("info", name, e))?;
    let entries = info.max_entries() as usize;
    // The kernel lays the values out 8-byte aligned (`elem_size`).
    let stride = size_of::<V>().next_multiple_of(8);
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let fd = array.fd().as_fd().as_raw_fd();
    for first in (0..entries).step_by(WINDOW) {
        let count = WINDOW.min(entries - first);
        let len = (count * stride).next_multiple_of(page);
        let offset = libc::off_t::try_from(first * stride).unwrap_or(libc::off_t::MAX);
        // SAFETY: a fresh shared read-only mapping of the map's values from `offset`, which
        // is page-aligned (`WINDOW * stride` is a multiple of the page size); the kernel
        // refuses a range past the values' end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(error("mmap"));
        }
        for i in 0..count {
            // SAFETY: entry `i` lies inside the mapping; the agent alone writes these maps,
            // and `V` is plain data of the map's value size.
            let value: V =
                unsafe { std::ptr::read_unaligned(base.cast::<u8>().add(i * stride).cast()) };
            each(u32::try_from(first + i).unwrap_or(u32::MAX), value);
        }
        // SAFETY: the mapping made above, no longer used.
        if unsafe { libc::munmap(base, len) } != 0 {
            return Err(error("munmap"));
        }
    }
    Ok(())
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

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries per `BPF_MAP_UPDATE_BATCH` call.
const BATCH: usize = 4096;

/// `bpf(BPF_MAP_UPDATE_BATCH)`: writes `keys[i] -> values[i]` in as few system calls as the
/// kernel allows (aya 0.14 has no batch operations). One syscall per entry costs about
/// 5 µs at 100k entries; a batch, a fraction of that.
fn update_batch<K: aya::Pod + Sync, V: aya::Pod + Sync>(
    map: &MapData,
    name: &'static str,
    keys: &[K],
    values: &[V],
) -> Result<()> {
    let fd = map.fd().as_fd().as_raw_fd();
    if keys.len() < PARALLEL_BATCH {
        return update_chunks(fd, name, keys, values);
    }
    // A large write (the first sync of a big cluster) is mostly the kernel's inserts, which
    // take a lock per bucket only: two threads halve it on two CPUs.
    let half = keys.len() / 2;
    let (first_keys, second_keys) = keys.split_at(half);
    let (first_values, second_values) = values.split_at(half);
    std::thread::scope(|scope| {
        let second = scope.spawn(|| update_chunks(fd, name, second_keys, second_values));
        let first = update_chunks(fd, name, first_keys, first_values);
        first.and(second.join().unwrap_or_else(|_| {
            Err(MapError {
                op: "batch update",
                map: name,
                source: io::Error::other("a writer thread panicked"),
            })
        }))
    })
}

/// Writes at or above which [`update_batch`] uses two threads (a thread costs tens of
/// microseconds; 8k inserts, milliseconds). The e2e start-up test of 10,000 Services writes
/// phases of this size, so both halves are exercised there.
const PARALLEL_BATCH: usize = 8_192;

/// `BPF_MAP_UPDATE_BATCH` of `keys` and `values`, [`BATCH`] at a time.
fn update_chunks<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::RawFd,
    name: &'static str,
    keys: &[K],
    values: &[V],
) -> Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    for (keys, values) in keys.chunks(BATCH).zip(values.chunks(BATCH)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is the batch member and points at `count` keys and values that
        // live through the call.
        unsafe { sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map_err(|source| MapError {
            op: "batch update",
            map: name,
            source,
        })?;
    }
    Ok(())
}

/// `bpf(cmd, attr)`, for the commands aya 0.14 does not offer (batch updates, key walks,
/// link updates): what the call returns (a new fd for the commands that open one).
///
/// # Safety
/// `attr` must be the member of `union bpf_attr` that `cmd` reads, and every pointer in it
/// valid for the call.
pub(crate) unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: the caller's; the size is the member's, which the kernel accepts.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if rc >= 0 {
        Ok(rc)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl LbMaps for BpfMaps {
    fn capacity(&self, name: &str) -> Option<usize> {
        self.capacities
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, entries)| *entries)
    }

    /// Sets go to the kernel as batches, one per map, and so do freed backends (zeros
    /// written to their array entries); deletes one by one (a batch delete stops at the
    /// first absent key). Deleted backends are stamped once, after all of them.
    fn apply_ops(&mut self, ops: &[Op]) -> Result<()> {
        let mut backend_deleted = false;
        let (mut s4, mut v4, mut s6, mut v6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut slots, mut slot_values) = (Vec::new(), Vec::new());
        let (mut b4, mut bv4, mut b6, mut bv6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for op in ops {
            match op {
                Op::SetMaster(frontend, value) => {
                    if let Some(key) = codec::service4_key(frontend) {
                        s4.push(key);
                        v4.push(*value);
                    } else if let Some(key) = codec::service6_key(frontend) {
                        s6.push(key);
                        v6.push(*value);
                    }
                }
                Op::SetSlot(index, value) => {
                    slots.push(*index);
                    slot_values.push(*value);
                }
                Op::SetBackend(id, backend) => {
                    if let Some(value) = codec::backend4(backend) {
                        b4.push(*id);
                        bv4.push(value);
                    } else if let Some(value) = codec::backend6(backend) {
                        b6.push(*id);
                        bv6.push(value);
                    }
                }
                Op::DeleteMaster(frontend) => self.delete_master(frontend)?,
                Op::DeleteBackend(id, backend) => {
                    backend_deleted = true;
                    if backend.addr.address.is_ipv4() {
                        b4.push(*id);
                        bv4.push(Backend4::default());
                    } else {
                        b6.push(*id);
                        bv6.push(Backend6::default());
                    }
                }
                Op::SetAffinityMatch(id, rev_nat_id) => {
                    self.set_affinity_match(*id, *rev_nat_id)?
                }
                Op::DeleteAffinityMatch(id, rev_nat_id) => {
                    self.delete_affinity_match(*id, *rev_nat_id)?;
                }
                Op::SetSourceRange(id, range) => self.set_source_range(*id, *range)?,
                Op::DeleteSourceRange(id, range) => self.delete_source_range(*id, *range)?,
                Op::ForgetPeer(backend, rev_nat_id) => self.forget_peer(backend, *rev_nat_id)?,
            }
        }
        if slots.iter().any(|&index| index >= self.slots.len()) {
            return Err(MapError {
                op: "batch update",
                map: SLOTS_MAP,
                source: io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        update_batch(self.slots.map(), SLOTS_MAP, &slots, &slot_values)?;
        update_batch(self.services4.map(), SERVICES4_MAP, &s4, &v4)?;
        update_batch(self.services6.map(), SERVICES6_MAP, &s6, &v6)?;
        update_batch(self.backends4.map(), BACKENDS4_MAP, &b4, &bv4)?;
        update_batch(self.backends6.map(), BACKENDS6_MAP, &b6, &bv6)?;
        if backend_deleted {
            self.stamp_backends_removed()?;
        }
        Ok(())
    }

    fn set_master(&mut self, frontend: &L4Addr, value: ServiceValue) -> Result<()> {
        if let Some(key) = codec::service4_key(frontend) {
            self.services4
                .insert(key, value, 0)
                .map_err(|e| aya_error("update", SERVICES4_MAP, e))
        } else if let Some(key) = codec::service6_key(frontend) {
            self.services6
                .insert(key, value, 0)
                .map_err(|e| aya_error("update", SERVICES6_MAP, e))
        } else {
            Ok(())
        }
    }

    fn delete_master(&mut self, frontend: &L4Addr) -> Result<()> {
        if let Some(key) = codec::service4_key(frontend) {
            ignore_missing(self.services4.remove(&key), SERVICES4_MAP)
        } else if let Some(key) = codec::service6_key(frontend) {
            ignore_missing(self.services6.remove(&key), SERVICES6_MAP)
        } else {
            Ok(())
        }
    }

    fn set_slot(&mut self, index: u32, value: SlotValue) -> Result<()> {
        set_array(&mut self.slots, SLOTS_MAP, index, value)
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        if let Some(value) = codec::backend4(backend) {
            set_array(&mut self.backends4, BACKENDS4_MAP, id, value)
        } else if let Some(value) = codec::backend6(backend) {
            set_array(&mut self.backends6, BACKENDS6_MAP, id, value)
        } else {
            Ok(())
        }
    }

    fn delete_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.apply_ops(&[Op::DeleteBackend(id, *backend)])
    }

    fn services(&self) -> Result<Vec<ServiceEntry>> {
        let mut entries = Vec::new();
        for item in self.services4.iter() {
            let (key, value) = item.map_err(|e| aya_error("dump", SERVICES4_MAP, e))?;
            match codec::from_service4_key(&key) {
                Some(frontend) => entries.push(ServiceEntry { frontend, value }),
                None => undecodable(SERVICES4_MAP, &key),
            }
        }
        for item in self.services6.iter() {
            let (key, value) = item.map_err(|e| aya_error("dump", SERVICES6_MAP, e))?;
            match codec::from_service6_key(&key) {
                Some(frontend) => entries.push(ServiceEntry { frontend, value }),
                None => undecodable(SERVICES6_MAP, &key),
            }
        }
        Ok(entries)
    }

    /// One pass over the mapped array, whatever the number of ranges.
    fn slots(&self, ranges: &[(u32, u16)]) -> Result<Vec<SlotValue>> {
        let total: usize = ranges.iter().map(|&(_, count)| usize::from(count)).sum();
        if total == 0 {
            return Ok(Vec::new());
        }
        // Where each wanted index goes in the answer, in index order.
        let mut wanted: Vec<(u32, usize)> = Vec::with_capacity(total);
        for &(base, count) in ranges {
            for i in 0..u32::from(count) {
                wanted.push((base.wrapping_add(i), wanted.len()));
            }
        }
        wanted.sort_unstable();
        let mut out = vec![SlotValue::default(); total];
        let mut next = wanted.iter().peekable();
        scan_array::<SlotValue>(self.slots.map(), SLOTS_MAP, |index, value| {
            while let Some(&&(at, position)) = next.peek() {
                if at != index {
                    break;
                }
                out[position] = value;
                next.next();
            }
        })?;
        Ok(out)
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        let mut backends = Vec::new();
        for (id, value) in present_backends::<Backend4>(self.backends4.map(), BACKENDS4_MAP)? {
            match codec::from_backend4(&value) {
                Some(backend) => backends.push((id, backend)),
                None => undecodable(BACKENDS4_MAP, &value),
            }
        }
        for (id, value) in present_backends::<Backend6>(self.backends6.map(), BACKENDS6_MAP)? {
            match codec::from_backend6(&value) {
                Some(backend) => backends.push((id, backend)),
                None => undecodable(BACKENDS6_MAP, &value),
            }
        }
        Ok(backends)
    }

    fn set_affinity_match(&mut self, id: u32, rev_nat_id: lb_common::FrontendId) -> Result<()> {
        self.affinity_match
            .insert(match_key(id, rev_nat_id), 0, 0)
            .map_err(|e| aya_error("update", AFFINITY_MATCH_MAP, e))
    }

    fn delete_affinity_match(&mut self, id: u32, rev_nat_id: lb_common::FrontendId) -> Result<()> {
        ignore_missing(
            self.affinity_match.remove(&match_key(id, rev_nat_id)),
            AFFINITY_MATCH_MAP,
        )
    }

    fn affinity_matches(&self) -> Result<Vec<(u32, lb_common::FrontendId)>> {
        let mut out = Vec::new();
        for key in self.affinity_match.keys() {
            let key = key.map_err(|e| aya_error("dump", AFFINITY_MATCH_MAP, e))?;
            out.push((key.backend_id, key.rev_nat_id));
        }
        Ok(out)
    }

    fn set_source_range(
        &mut self,
        rev_nat_id: lb_common::FrontendId,
        range: ipnet::IpNet,
    ) -> Result<()> {
        self.source_ranges
            .insert(&range_key(rev_nat_id, range), 0, 0)
            .map_err(|e| aya_error("update", SOURCE_RANGES_MAP, e))
    }

    fn delete_source_range(
        &mut self,
        rev_nat_id: lb_common::FrontendId,
        range: ipnet::IpNet,
    ) -> Result<()> {
        ignore_missing(
            self.source_ranges.remove(&range_key(rev_nat_id, range)),
            SOURCE_RANGES_MAP,
        )
    }

    fn source_ranges(&self) -> Result<Vec<(lb_common::FrontendId, ipnet::IpNet)>> {
        let mut out = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(|e| aya_error("dump", SOURCE_RANGES_MAP, e))?;
            match from_range_key(&key) {
                Some(entry) => out.push(entry),
                None => undecodable(SOURCE_RANGES_MAP, &key.prefix_len()),
            }
        }
        Ok(out)
    }

    fn forget_peer(&mut self, backend: &Backend, rev_nat_id: lb_common::FrontendId) -> Result<()> {
        let key = codec::peer_key(backend);
        match self.peers.get(&key, 0) {
            Ok(claim) if claim.rev_nat_id == rev_nat_id => {
                ignore_missing(self.peers.remove(&key), PEERS_MAP)
            }
            Ok(_) | Err(AyaMapError::KeyNotFound) => Ok(()),
            Err(e) => Err(aya_error("lookup", PEERS_MAP, e)),
        }
    }

    fn forget_affinity(
        &mut self,
        rev_nat_ids: &std::collections::BTreeSet<lb_common::FrontendId>,
    ) -> Result<()> {
        if rev_nat_ids.is_empty() {
            return Ok(());
        }
        let stale: Vec<AffinityKey> = self
            .affinity
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| rev_nat_ids.contains(&k.rev_nat_id))
            .collect();
        for key in stale {
            ignore_missing(self.affinity.remove(&key), AFFINITY_MAP)?;
        }
        Ok(())
    }
}

/// The LPM key of `range` for the frontend `rev_nat_id`.
fn range_key(rev_nat_id: lb_common::FrontendId, range: ipnet::IpNet) -> Key<SourceRange> {
    let (addr, ipv6) = match range.network() {
        std::net::IpAddr::V4(ip) => (lb_common::to_v4_mapped(codec::ip4(ip)), false),
        std::net::IpAddr::V6(ip) => (codec::ip6(ip), true),
    };
    Key::new(
        source_range_prefix(ipv6, u32::from(range.prefix_len())),
        SourceRange {
            rev_nat_id: rev_nat_id.to_be(),
            addr,
        },
    )
}

/// The frontend and range of an LPM key (inverse of [`range_key`]).
fn from_range_key(key: &Key<SourceRange>) -> Option<(lb_common::FrontendId, ipnet::IpNet)> {
    let data = key.data();
    let bits = key.prefix_len().checked_sub(32)?;
    let net = match lb_common::v4_mapped(&data.addr) {
        Some(ip4) if bits >= 96 => {
            ipnet::IpNet::new(codec::from_ip4(ip4).into(), (bits - 96) as u8)
        }
        _ => ipnet::IpNet::new(codec::from_ip6(data.addr).into(), bits as u8),
    }
    .ok()?;
    Some((lb_common::FrontendId::from_be(data.rev_nat_id), net))
}

const fn match_key(backend_id: u32, rev_nat_id: lb_common::FrontendId) -> AffinityMatchKey {
    AffinityMatchKey {
        backend_id,
        rev_nat_id,
    }
}
