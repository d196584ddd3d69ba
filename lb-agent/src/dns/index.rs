//! The read-only view cluster DNS answers from: every Service's records by name, the
//! namespaces that have Services, and the Services owning each address (for PTR). The
//! [`Reconciler`](crate::reconcile::Reconciler) changes it in the sync that writes the
//! maps, Service by Service (a change costs what changed); the DNS server and the API only
//! read it, under a read lock held for one answer. A Service's entry shares its validated
//! form with the state: about 100 bytes per Service, and as much again for the reverse
//! (PTR) index, which only the DNS server reads: without it (`--dns-addr` off, as in the
//! API mode by default) the index serves `lb-agent env` alone and skips that cost.
use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
};

use hashbrown::{Equivalent, HashMap};
use smallvec::SmallVec;

use super::records::{Answer, ServiceRecords};
use crate::model::ObjectRef;

/// The index, shared between the reconciler (the one writer) and its readers.
pub type SharedDnsIndex = Arc<RwLock<DnsIndex>>;

/// Every Service's records.
#[derive(Debug)]
pub struct DnsIndex {
    services: HashMap<ObjectRef, ServiceRecords>,
    /// Services per namespace: a namespace with none does not exist for DNS.
    namespaces: HashMap<Arc<str>, u32>,
    /// The Services whose ClusterIP or ready endpoint each address is (`None`: not kept,
    /// no DNS server reads it).
    ptr: Option<HashMap<IpAddr, SmallVec<[ObjectRef; 1]>>>,
    /// Counts the changes: an answer encoded from one generation is the answer to the
    /// same question as long as the generation is the same (the server's answer cache).
    generation: u64,
}

/// The index a DNS server reads: names and addresses.
impl Default for DnsIndex {
    fn default() -> Self {
        Self {
            services: HashMap::new(),
            namespaces: HashMap::new(),
            ptr: Some(HashMap::new()),
            generation: 0,
        }
    }
}

/// A Service's name borrowed from a question: looks up an [`ObjectRef`] without building
/// one (same fields, same order, so the same hash).
#[derive(Hash)]
struct NameRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

impl Equivalent<ObjectRef> for NameRef<'_> {
    fn equivalent(&self, key: &ObjectRef) -> bool {
        key.namespace() == self.namespace && key.name() == self.name
    }
}

impl DnsIndex {
    /// An index of names only, with no reverse (PTR) index: for `lb-agent env` when no
    /// DNS server runs.
    #[must_use]
    pub fn names_only() -> Self {
        Self {
            ptr: None,
            ..Self::default()
        }
    }

    /// Replaces the records of each Service named (`None`: removes them).
    pub fn apply(&mut self, changes: Vec<(ObjectRef, Option<ServiceRecords>)>) {
        // Before the writer's lock is released, so no reader sees the new records under
        // the old generation.
        self.generation = self.generation.wrapping_add(1);
        for (id, records) in changes {
            if let Some(old) = self.services.remove(&id) {
                self.unlink(&id, &old);
            }
            if let Some(new) = records {
                self.link(&id, &new);
                self.services.insert(id, new);
            }
        }
    }

    fn link(&mut self, id: &ObjectRef, records: &ServiceRecords) {
        *self
            .namespaces
            .entry(crate::model::intern(id.namespace()))
            .or_default() += 1;
        let Some(ptr) = &mut self.ptr else { return };
        for ip in ptr_addresses(records) {
            let owners = ptr.entry(ip).or_default();
            if !owners.contains(id) {
                owners.push(id.clone());
            }
        }
    }

    fn unlink(&mut self, id: &ObjectRef, records: &ServiceRecords) {
        if let Some(count) = self.namespaces.get_mut(id.namespace()) {
            *count -= 1;
            if *count == 0 {
                self.namespaces.remove(id.namespace());
            }
        }
        let Some(ptr) = &mut self.ptr else { return };
        for ip in ptr_addresses(records) {
            if let Some(owners) = ptr.get_mut(&ip) {
                owners.retain(|o| o != id);
                if owners.is_empty() {
                    ptr.remove(&ip);
                }
            }
        }
    }

    /// The Service `name` in `namespace`.
    #[must_use]
    pub fn service(&self, namespace: &str, name: &str) -> Option<(&ObjectRef, &ServiceRecords)> {
        self.services.get_key_value(&NameRef { namespace, name })
    }

    /// Whether `namespace` has any Service.
    #[must_use]
    pub fn namespace_exists(&self, namespace: &str) -> bool {
        self.namespaces.contains_key(namespace)
    }

    /// The Services `ip` is a ClusterIP or ready endpoint of.
    pub fn ptr(&self, ip: &IpAddr) -> impl Iterator<Item = (&ObjectRef, &ServiceRecords)> {
        self.ptr
            .iter()
            .filter_map(|ptr| ptr.get(ip))
            .flatten()
            .filter_map(|id| self.services.get_key_value(id))
    }

    /// The Services of `namespace`, in no particular order.
    pub fn in_namespace<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = (&'a ObjectRef, &'a ServiceRecords)> + 'a {
        self.services
            .iter()
            .filter(move |(id, _)| id.namespace() == namespace)
    }

    /// Which state of the index this is: it changes with every [`apply`](Self::apply).
    #[must_use]
    pub const fn generation(&self) -> u64 {
        self.generation
    }

    /// How many Services have records.
    #[must_use]
    pub fn len(&self) -> usize {
        self.services.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// The addresses with a PTR record to a Service's names.
fn ptr_addresses(records: &ServiceRecords) -> SmallVec<[IpAddr; 2]> {
    match records.answer() {
        Answer::ExternalName(_) => SmallVec::new(),
        _ => records.addresses(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::records::{DnsService, Facts, ServiceKind};

    fn apply_one(index: &mut DnsIndex, ip: &str) {
        let dns = DnsService {
            kind: ServiceKind::ClusterIps(Box::new([ip.parse().unwrap()])),
            ports: Box::default(),
        };
        let records = ServiceRecords {
            facts: Facts::Own(Arc::new(dns)),
            endpoints: Box::default(),
        };
        index.apply(vec![(ObjectRef::new("ns", "web"), Some(records))]);
    }

    #[test]
    fn only_the_dns_servers_index_answers_for_addresses() {
        let ip: IpAddr = "10.96.0.20".parse().unwrap();
        let mut full = DnsIndex::default();
        apply_one(&mut full, "10.96.0.20");
        assert_eq!(
            full.ptr(&ip)
                .map(|(id, _)| id.to_string())
                .collect::<Vec<_>>(),
            ["ns/web"]
        );
        let mut names = DnsIndex::names_only();
        apply_one(&mut names, "10.96.0.20");
        assert!(names.service("ns", "web").is_some());
        assert!(names.namespace_exists("ns"));
        assert_eq!(names.ptr(&ip).count(), 0);
        // Removal unlinks in both.
        full.apply(vec![(ObjectRef::new("ns", "web"), None)]);
        assert_eq!(full.ptr(&ip).count(), 0);
        assert!(!full.namespace_exists("ns"));
    }
}
