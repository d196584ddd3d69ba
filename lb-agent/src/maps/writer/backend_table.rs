//! The writer's record of the backends map: each backend by id, how many slots name it,
//! and the id of each backend, held once.
//!
//! A million backends (100,000 Services × 10) make this the largest part of the writer's
//! record. Ids are handed out lowest free first, so they stay dense and the records are a
//! vector indexed by id; each is packed into 12 bytes (an IPv4 address inline, an IPv6 one
//! as an index into a side vector), where a [`Backend`] and its count took 28. The lookup
//! by backend is an index of ids into the records (4 bytes a backend) rather than a second
//! map holding each backend again.
use std::{
    collections::BTreeSet,
    hash::BuildHasher,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use hashbrown::HashTable;

use crate::model::{Backend, L4Addr, Protocol};

/// A backend in the maps, and the number of slots naming it.
#[derive(Clone, Copy, Debug)]
pub(super) struct BackendRecord {
    pub(super) backend: Backend,
    pub(super) refs: u32,
}

/// A record as the table keeps it: 12 bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Packed {
    /// IPv4: the address's bits; IPv6: its index in [`BackendTable::v6`].
    address: u32,
    port: u16,
    /// `TCP` or `UDP` (0: no backend holds the id), `IPV6`, and the backend's
    /// [`Backend::condition_bits`] from `CONDITION_SHIFT` on.
    meta: u8,
    refs: u32,
}

const TCP: u8 = 1;
const UDP: u8 = 2;
const PROTOCOL: u8 = TCP | UDP;
const IPV6: u8 = 1 << 2;
const CONDITION_SHIFT: u8 = 3;

const _: () = assert!(size_of::<Packed>() == 12);

#[derive(Debug, Default)]
pub(super) struct BackendTable {
    /// By id; id 0 is never handed out (the vector is empty or starts with an empty one).
    records: Vec<Packed>,
    /// The addresses of the IPv6 backends, by the index their records hold.
    v6: Vec<Ipv6Addr>,
    /// Indices of `v6` no record holds.
    v6_free: Vec<u32>,
    /// How many ids hold a record.
    live: usize,
    /// The ids below `records.len()` (0 aside) that hold none: handed out first.
    free: BTreeSet<u32>,
    /// The id of each backend (the first one recorded when a foreign writer left two).
    ids: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// [`Self::expect`] sized the table for an apply in progress.
    sized_ahead: bool,
}

impl BackendTable {
    pub(super) fn clear(&mut self) {
        self.records = Vec::new();
        self.v6 = Vec::new();
        self.v6_free = Vec::new();
        self.live = 0;
        self.free.clear();
        self.ids.clear();
    }

    pub(super) const fn len(&self) -> usize {
        self.live
    }

    pub(super) fn contains(&self, id: u32) -> bool {
        self.packed(id).is_some()
    }

    pub(super) fn get(&self, id: u32) -> Option<BackendRecord> {
        let packed = self.packed(id)?;
        Some(BackendRecord {
            backend: self.unpack(packed),
            refs: packed.refs,
        })
    }

    /// One more slot names `id`.
    pub(super) fn add_ref(&mut self, id: u32) {
        if let Some(packed) = self.packed_mut(id) {
            packed.refs += 1;
        }
    }

    /// One slot fewer names `id`: how many still do (`None`: no backend holds it).
    pub(super) fn drop_ref(&mut self, id: u32) -> Option<u32> {
        let packed = self.packed_mut(id)?;
        packed.refs = packed.refs.saturating_sub(1);
        Some(packed.refs)
    }

    /// The ids of the backends no slot names.
    pub(super) fn unused(&self) -> impl Iterator<Item = u32> + '_ {
        self.records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.meta & PROTOCOL != 0 && r.refs == 0)
            .filter_map(|(id, _)| u32::try_from(id).ok())
    }

    /// The id `backend` is recorded under.
    pub(super) fn id_of(&self, backend: &Backend) -> Option<u32> {
        self.find(self.hasher.hash_one(backend), backend)
    }

    /// The free ids, lowest first: the holes left by removed backends, then the ids past
    /// the highest. A plan takes them one by one as it needs them, so handing out a
    /// frontend's new backends is linear in their number.
    pub(super) fn free_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let past = u32::try_from(self.records.len().max(1)).unwrap_or(u32::MAX);
        self.free.iter().copied().chain(past..)
    }

    /// Records `backend` under the free `id`, named by no slot yet. When the backend is
    /// already recorded under another id, that one stays its id.
    pub(super) fn insert(&mut self, id: u32, backend: Backend) {
        let hash = self.hasher.hash_one(backend);
        let known = self.find(hash, &backend).is_some();
        self.record(id, backend, hash, !known);
    }

    /// Records `backend`, which no id holds (a plan found it absent, and a frontend's
    /// backends are distinct), under the free `id`: [`Self::insert`] without looking it up
    /// first, which took a third of a first sync's planning at a million backends.
    pub(super) fn insert_new(&mut self, id: u32, backend: Backend) {
        let hash = self.hasher.hash_one(backend);
        debug_assert!(
            self.find(hash, &backend).is_none(),
            "{backend:?} is recorded already"
        );
        self.record(id, backend, hash, true);
    }

    /// About `backends()` backends are coming into an empty table (a first sync's): the
    /// index grows to hold them now, instead of doubling its way there and finding every
    /// id's backend again at each step. A table holding any backend is left to grow as it
    /// goes (the estimate, a pass over the apply's frontends, is not even made), and
    /// [`Self::trim`] gives back what an overestimate took.
    pub(super) fn expect(&mut self, backends: impl FnOnce() -> usize) {
        if self.live > 0 {
            return;
        }
        let backends = backends();
        if backends == 0 {
            return;
        }
        self.with_index(|ids, table| ids.reserve(backends, |&id| table.hash_of(id)));
        // Ids start at 1: the vector holds one more record than there are ids.
        self.records
            .reserve_exact((backends + 1).saturating_sub(self.records.len()));
        self.sized_ahead = true;
    }

    /// After the apply [`Self::expect`] sized: an estimate that counted backends shared by
    /// several Services more than once leaves the index and the records larger than what
    /// they hold; they shrink to it (the index to no less than it would have grown to).
    pub(super) fn trim(&mut self) {
        if !std::mem::take(&mut self.sized_ahead) {
            return;
        }
        // Growing on its own the index is at least 7/16 full.
        if self.ids.len() * 8 < self.ids.capacity() * 3 {
            self.with_index(|ids, table| ids.shrink_to_fit(|&id| table.hash_of(id)));
        }
        if self.records.len() * 3 < self.records.capacity() * 2 {
            self.records.shrink_to_fit();
        }
    }

    fn record(&mut self, id: u32, backend: Backend, hash: u64, index_it: bool) {
        debug_assert!(!self.contains(id), "backend id {id} is taken");
        let at = index(id);
        if at >= self.records.len() {
            let holes = self.records.len().max(1)..at;
            self.free
                .extend(holes.filter_map(|i| u32::try_from(i).ok()));
            self.records.resize(at + 1, Packed::default());
        } else {
            self.free.remove(&id);
        }
        self.records[at] = self.pack(&backend);
        self.live += 1;
        if index_it {
            self.with_index(|ids, table| {
                ids.insert_unique(hash, id, |&id| table.hash_of(id));
            });
        }
    }

    /// Changes the index with the rest of the table at hand: growing or shrinking it
    /// rehashes every id, finding its backend in the records.
    fn with_index(&mut self, change: impl FnOnce(&mut HashTable<u32>, &Self)) {
        let mut ids = std::mem::take(&mut self.ids);
        change(&mut ids, self);
        self.ids = ids;
    }

    /// The hash of the backend `id` holds, for the index when it grows: only ids with a
    /// record are in it.
    fn hash_of(&self, id: u32) -> u64 {
        self.backend(id).map_or(0, |b| self.hasher.hash_one(b))
    }

    fn find(&self, hash: u64, backend: &Backend) -> Option<u32> {
        self.ids
            .find(hash, |&id| self.backend(id).as_ref() == Some(backend))
            .copied()
    }

    /// Forgets the backend of `id`; its id is free again.
    pub(super) fn remove(&mut self, id: u32) -> Option<BackendRecord> {
        let record = self.get(id)?;
        let packed = std::mem::take(&mut self.records[index(id)]);
        if packed.meta & IPV6 != 0 {
            self.v6_free.push(packed.address);
        }
        self.live -= 1;
        let hash = self.hasher.hash_one(record.backend);
        if let Ok(entry) = self.ids.find_entry(hash, |&other| other == id) {
            entry.remove();
        }
        self.free.insert(id);
        // Ids past the highest recorded are free without being listed.
        while self.records.len() > 1 && self.records.last().is_some_and(|r| r.meta == 0) {
            self.records.pop();
            if let Ok(top) = u32::try_from(self.records.len()) {
                self.free.remove(&top);
            }
        }
        if self.live == 0 {
            self.clear();
        }
        Some(record)
    }

    fn backend(&self, id: u32) -> Option<Backend> {
        self.packed(id).map(|p| self.unpack(p))
    }

    fn packed(&self, id: u32) -> Option<Packed> {
        self.records
            .get(index(id))
            .copied()
            .filter(|r| r.meta & PROTOCOL != 0)
    }

    fn packed_mut(&mut self, id: u32) -> Option<&mut Packed> {
        self.records
            .get_mut(index(id))
            .filter(|r| r.meta & PROTOCOL != 0)
    }

    /// `backend` packed, its IPv6 address (if any) stored aside.
    fn pack(&mut self, backend: &Backend) -> Packed {
        let protocol = match backend.addr.protocol {
            Protocol::Tcp => TCP,
            Protocol::Udp => UDP,
        };
        let (address, family) = match backend.addr.address {
            IpAddr::V4(ip) => (u32::from(ip), 0),
            IpAddr::V6(ip) => {
                let at = match self.v6_free.pop() {
                    Some(at) => {
                        self.v6[index(at)] = ip;
                        at
                    }
                    None => {
                        self.v6.push(ip);
                        u32::try_from(self.v6.len() - 1).unwrap_or(u32::MAX)
                    }
                };
                (at, IPV6)
            }
        };
        Packed {
            address,
            port: backend.addr.port,
            meta: protocol | family | backend.condition_bits() << CONDITION_SHIFT,
            refs: 0,
        }
    }

    fn unpack(&self, packed: Packed) -> Backend {
        let address = if packed.meta & IPV6 == 0 {
            IpAddr::V4(Ipv4Addr::from(packed.address))
        } else {
            IpAddr::V6(self.v6[index(packed.address)])
        };
        let protocol = if packed.meta & PROTOCOL == TCP {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        Backend::with_condition_bits(
            L4Addr::new(address, packed.port, protocol),
            packed.meta >> CONDITION_SHIFT,
        )
    }
}

/// The vector index of `id`.
fn index(id: u32) -> usize {
    usize::try_from(id).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointState, L4Addr, Protocol};

    /// Backend `i` of many: 10.0.0.0 + i, port 80.
    fn numbered(i: u32) -> Backend {
        let addr = L4Addr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i), 80, Protocol::Tcp);
        Backend::new(addr, EndpointState::Ready)
    }

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

    #[test]
    fn ids_are_handed_out_lowest_free_first_so_they_stay_dense() {
        let mut table = BackendTable::default();
        let first = |table: &BackendTable, n: usize| table.free_ids().take(n).collect::<Vec<_>>();
        assert_eq!(first(&table, 3), [1, 2, 3]);
        for id in 1..=5 {
            table.insert(id, backend(u8::try_from(id).unwrap()));
        }
        assert_eq!(first(&table, 1), [6]);
        table.remove(2);
        table.remove(4);
        assert_eq!(
            first(&table, 3),
            [2, 4, 6],
            "the holes first, then past the highest"
        );
        table.insert(4, backend(40));
        assert_eq!(first(&table, 2), [2, 6]);
        // Removing the highest ids shrinks the record; holes below stay listed.
        table.remove(5);
        table.remove(4);
        assert_eq!(first(&table, 2), [2, 4]);
        // An adopted id far past the rest leaves the ids between free.
        table.insert(9, backend(9));
        assert_eq!(first(&table, 5), [2, 4, 5, 6, 7]);
        assert_eq!(table.unused().collect::<Vec<_>>(), [1, 3, 9]);
        for id in [1, 3, 9] {
            table.remove(id);
        }
        assert_eq!((table.len(), first(&table, 1)), (0, vec![1]));
    }

    #[test]
    fn a_backend_comes_back_as_it_went_in_whatever_its_family_and_state() {
        let mut table = BackendTable::default();
        let mut v6 = Backend::new(
            L4Addr::new(
                "fd00::7".parse::<std::net::IpAddr>().unwrap(),
                53,
                Protocol::Udp,
            ),
            EndpointState::Terminating,
        );
        v6.remote = true;
        table.insert(1, v6);
        table.insert(2, backend(2));
        assert_eq!(table.get(1).map(|r| r.backend), Some(v6));
        assert_eq!(table.id_of(&v6), Some(1));
        table.remove(1);
        // Its address's place is reused by the next IPv6 backend.
        let other = Backend::new(
            L4Addr::new(
                "fd00::8".parse::<std::net::IpAddr>().unwrap(),
                80,
                Protocol::Tcp,
            ),
            EndpointState::Ready,
        );
        table.insert(3, other);
        assert_eq!(table.v6.len(), 1);
        assert_eq!(table.get(3).map(|r| r.backend), Some(other));
        assert_eq!(table.get(2).map(|r| r.backend), Some(backend(2)));
        table.add_ref(3);
        assert_eq!(table.drop_ref(3), Some(0));
        assert_eq!(table.drop_ref(1), None, "no backend holds it");
    }

    /// The index of ids grows (and rehashes) as backends come: every one stays found.
    #[test]
    fn every_backend_is_found_after_the_index_grew() {
        let mut table = BackendTable::default();
        for id in 1..=5_000 {
            table.insert(id, numbered(id));
        }
        assert!((1..=5_000).all(|id| table.id_of(&numbered(id)) == Some(id)));
    }

    #[test]
    fn a_first_sync_sized_in_advance_finds_every_backend_and_grows_past_its_estimate() {
        let mut table = BackendTable::default();
        table.expect(|| 3_000);
        for id in 1..=3_000 {
            table.insert_new(id, numbered(id));
        }
        // An estimate is no limit, and a table holding backends is not sized again.
        table.expect(|| 10);
        for id in 3_001..=5_000 {
            table.insert_new(id, numbered(id));
        }
        table.trim();
        assert!((1..=5_000).all(|id| table.id_of(&numbered(id)) == Some(id)));
        assert_eq!(table.free_ids().next(), Some(5_001), "ids stay dense");
    }

    #[test]
    fn an_overestimate_is_given_back_after_the_apply() {
        let mut table = BackendTable::default();
        // Four Services selecting the same pods: their endpoints counted four times.
        table.expect(|| 4_000);
        for id in 1..=1_000 {
            table.insert_new(id, numbered(id));
        }
        table.trim();
        assert!(
            table.ids.capacity() < 2_000 && table.records.capacity() < 1_500,
            "index for {} and records for {} after trimming, holding 1,000",
            table.ids.capacity(),
            table.records.capacity()
        );
        assert!((1..=1_000).all(|id| table.id_of(&numbered(id)) == Some(id)));
    }
}
