//! The desired-state model that every source feeds: the objects by identity, in the
//! compact validated forms of [`crate::translate`] (no Kubernetes object is kept), what
//! each Service translates to, and the frontends that result. Changes arrive object by
//! object through the [`Reconciler`](crate::reconcile::Reconciler), the only writer; only
//! the Services they touch are translated again, so a watch event costs one Service, and
//! [`ClusterState::recompute`] says exactly which frontends changed.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use smallvec::SmallVec;

use crate::{
    categorize::NodeTopology,
    dns::records::{self, ServiceRecords},
    fast_hash::HashMap,
    model::{
        DEFAULT_NAMESPACE, DesiredState, Frontend, FrontendKind, HealthCheck, L4Addr, ObjectRef,
        Protocol,
    },
    ownership::{self, ExternalIpCidrs},
    small_set::SmallSet,
    source::change::Kind,
    translate::{
        CheckedService, HEADLESS_LABEL, Problem, SERVICE_NAME_LABEL, ServiceTranslation, Skipped,
        Sourced, ValidPod, ValidSlice, translate_service, validate_pod, validate_service,
        validate_slice,
    },
};

/// Dirty Services at or above which [`ClusterState::recompute`] translates on several
/// threads (a thread costs tens of microseconds; a Service about 8 µs).
const PARALLEL_TRANSLATION: usize = 4_096;
/// At most this many translating threads.
const MAX_TRANSLATORS: usize = 4;

#[derive(Debug)]
struct SliceEntry {
    /// The Service named by its label, valid or not. (Its problems are in
    /// `object_problems`.)
    service: Option<ObjectRef>,
    /// Boxed: a slice entry sits in a hash table, where every bucket is as large as an
    /// entry, full or not.
    valid: Option<Box<ValidSlice>>,
    /// `metadata.resourceVersion` (0: none).
    resource_version: u64,
    /// File (or `api`) it came from (shared).
    origin: Arc<str>,
    /// A headless Service's slice: DNS reads it, the proxy ignores it altogether (it does
    /// not even make the Service one "with slices").
    headless: bool,
}

/// A Service that wants a frontend address and does not get it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Loser {
    service: ObjectRef,
    /// The field the address comes from.
    field: String,
    message: String,
}

/// Services, EndpointSlices and Pods, and the frontends they make.
#[derive(Debug, Default)]
pub struct ClusterState {
    /// This node's name: endpoints on it are local (`externalTrafficPolicy: Local`).
    node_name: Option<String>,
    /// This node's `topology.kubernetes.io/zone` label (from its Node object): endpoints
    /// hinted for this zone are preferred (topology hints, `trafficDistribution`).
    node_zone: Option<String>,
    /// Boxed, as the slices' entries.
    services: HashMap<ObjectRef, Box<CheckedService>>,
    services_by_namespace: HashMap<Arc<str>, BTreeSet<ObjectRef>>,
    slices: HashMap<ObjectRef, SliceEntry>,
    slices_by_service: HashMap<ObjectRef, SmallSet<ObjectRef>>,
    /// Pods (the manifests source's endpoints): `None` for one that is no endpoint.
    /// Ordered by namespace then name, so a namespace's pods are a range, in name order.
    pods: BTreeMap<ObjectRef, Option<ValidPod>>,
    /// Problems of invalid slices and pods, by (kind, object).
    object_problems: BTreeMap<(Kind, ObjectRef), Vec<Problem>>,
    /// The frontends every Service translates to.
    /// Most Services have one frontend: held in place, not in an allocation of its own.
    results: HashMap<ObjectRef, SmallVec<[Arc<Frontend>; 1]>>,
    /// The Services with problems or skipped parts.
    with_problems: BTreeSet<ObjectRef>,
    /// The Services with a `healthCheckNodePort`, and it.
    health_checks: BTreeMap<ObjectRef, HealthCheck>,
    /// The Services that want each frontend address; [`ClusterState::decide`] says which
    /// gets it. Ordered, so the addresses on one IP are a range (a ClusterIP appearing
    /// refuses external IPs equal to it on every port).
    contenders: BTreeMap<L4Addr, SmallSet<ObjectRef>>,
    /// The Services holding each ClusterIP.
    cluster_ips: HashMap<IpAddr, SmallSet<ObjectRef>>,
    /// `--external-ip-cidrs`.
    external_ip_cidrs: ExternalIpCidrs,
    /// This node's NodePort addresses, as the node-address maps hold them.
    node_addresses: BTreeSet<IpAddr>,
    /// IPs whose frontends are to be decided again (the node addresses changed).
    pending_ips: BTreeSet<IpAddr>,
    /// The Services that want an address and do not get it, and why.
    losers: HashMap<L4Addr, Vec<Loser>>,
    desired: DesiredState,
    /// Services to translate again.
    dirty: BTreeSet<ObjectRef>,
    /// Bumped whenever the set of problems may have changed, so reporting can skip the
    /// work when it has not.
    problems_version: u64,
    /// The DNS records of the Services translated since the index last took them (`None`:
    /// the Service has no name any more).
    dns_changes: Vec<(ObjectRef, Option<ServiceRecords>)>,
}

impl ClusterState {
    /// An empty state for the node `node_name`.
    #[must_use]
    pub fn new(node_name: Option<String>) -> Self {
        Self {
            node_name,
            ..Self::default()
        }
    }

    /// Sets this node's zone (its Node's `topology.kubernetes.io/zone` label, `None` when
    /// unlabelled or unknown); every Service is translated again when it changed.
    pub(crate) fn set_node_zone(&mut self, zone: Option<String>) {
        if self.node_zone == zone {
            return;
        }
        self.node_zone = zone;
        self.dirty.extend(self.services.keys().cloned());
    }

    /// Sets `--external-ip-cidrs`: external IPs outside them are not taken.
    pub(crate) fn set_external_ip_cidrs(&mut self, cidrs: ExternalIpCidrs) {
        if self.external_ip_cidrs != cidrs {
            self.external_ip_cidrs = cidrs;
            self.pending_ips
                .extend(self.contenders.keys().map(|a| a.address));
        }
    }

    /// Sets this node's NodePort addresses (what the node-address maps hold): an external
    /// IP on one of them yields to another Service's NodePort on the same port.
    pub(crate) fn set_node_addresses(&mut self, addresses: BTreeSet<IpAddr>) {
        self.pending_ips.extend(
            self.node_addresses
                .symmetric_difference(&addresses)
                .copied(),
        );
        self.node_addresses = addresses;
    }

    /// This node's zone, as last set.
    #[must_use]
    pub fn node_zone(&self) -> Option<&str> {
        self.node_zone.as_deref()
    }

    /// Adds or updates a Service: it is validated here, and only its compact form kept.
    pub(crate) fn apply_service(&mut self, service: Sourced<Service>) {
        let mut checked = validate_service(&service);
        drop(service);
        if let Some(old) = self.services.get(&checked.id) {
            keep_last_valid(&mut checked, old);
        }
        let old = self.services.get_mut(&checked.id);
        if let Some(old) = old {
            // Its entries were written when they last changed, not when it last arrived.
            checked.stamp.written_at = old.stamp.written_at;
            if **old == checked {
                old.stamp = checked.stamp;
                return;
            }
        }
        let old = self.services.get(&checked.id);
        let id = checked.id.clone();
        let changed = old.map_or(NONE, |old| findings(old)) != findings(&checked);
        self.note_problems(&id, changed, findings(&checked) != NONE);
        self.services_by_namespace
            .entry(crate::model::intern(id.namespace()))
            .or_default()
            .insert(id.clone());
        self.services.insert(id.clone(), Box::new(checked));
        self.dirty.insert(id);
    }

    /// Removes a Service.
    pub(crate) fn delete_service(&mut self, id: &ObjectRef) {
        if let Some(old) = self.services.remove(id) {
            self.note_problems(id, findings(&old) != NONE, false);
            if let Some(set) = self.services_by_namespace.get_mut(id.namespace()) {
                set.remove(id);
            }
            self.dirty.insert(id.clone());
        }
    }

    /// Keeps the index of Services with problems, and says when they changed.
    fn note_problems(&mut self, id: &ObjectRef, changed: bool, has_any: bool) {
        if changed {
            self.problems_version += 1;
        }
        if has_any {
            self.with_problems.insert(id.clone());
        } else {
            self.with_problems.remove(id);
        }
    }

    /// Adds or updates an EndpointSlice: it is validated here, and only its compact form
    /// kept.
    pub(crate) fn apply_slice(&mut self, slice: Sourced<EndpointSlice>) {
        let id = ObjectRef::of(&slice.object.metadata);
        // The Service's own name, shared, when it is known.
        let headless = is_headless_slice(&slice.object);
        // An FQDN slice is no slice of its Service's at all (kube-proxy ignores them): the
        // Service keeps its endpoints from its other slices, or its pods.
        let fqdn = slice.object.address_type == "FQDN";
        let service = slice_service(&slice.object).filter(|_| !fqdn).map(|s| {
            self.services
                .get_key_value(&s)
                .map_or(s, |(known, _)| known.clone())
        });
        let (valid, problems) = validate_slice(&slice, &id);
        let resource_version = crate::translate::Stamp::of(&slice.object.metadata).resource_version;
        let origin = Arc::clone(&slice.origin);
        drop(slice);
        let mut valid = valid.map(|(_, valid)| Box::new(valid));
        let mut service = service;
        let mut headless = headless;
        let mut problems = problems;
        // An edit that fails validation changes nothing: the last valid version stays.
        if valid.is_none()
            && !problems.is_empty()
            && let Some(old) = self.slices.get(&id)
            && old.valid.is_some()
        {
            valid.clone_from(&old.valid);
            service.clone_from(&old.service);
            headless = old.headless;
            last_valid_stays(&mut problems);
        }
        if self.has_problems(Kind::EndpointSlice, &id, &problems)
            && let Some(old) = self.slices.get_mut(&id)
            && old.service == service
            && old.valid == valid
            && old.headless == headless
        {
            old.resource_version = resource_version;
            old.origin = origin;
            return;
        }
        self.delete_slice(&id);
        self.set_problems(Kind::EndpointSlice, &id, problems);
        if let Some(service) = &service {
            self.slices_by_service
                .entry(service.clone())
                .or_default()
                .insert(id.clone());
            self.dirty.insert(service.clone());
        }
        self.slices.insert(
            id,
            SliceEntry {
                service,
                valid,
                resource_version,
                origin,
                headless,
            },
        );
    }

    /// Removes an EndpointSlice.
    pub(crate) fn delete_slice(&mut self, id: &ObjectRef) {
        self.set_problems(Kind::EndpointSlice, id, Vec::new());
        let Some(old) = self.slices.remove(id) else {
            return;
        };
        if let Some(service) = old.service {
            if let Some(set) = self.slices_by_service.get_mut(&service) {
                set.remove(id);
                if set.is_empty() {
                    self.slices_by_service.remove(&service);
                }
            }
            self.dirty.insert(service);
        }
    }

    /// Adds or updates a Pod (the manifests source derives endpoints from Pods): it is
    /// validated here, and only its compact form kept.
    pub(crate) fn apply_pod(&mut self, pod: Sourced<Pod>) {
        let id = ObjectRef::of(&pod.object.metadata);
        let (mut valid, mut problems) = validate_pod(&pod);
        drop(pod);
        // An edit that fails validation changes nothing: the last valid version stays.
        if valid.is_none()
            && !problems.is_empty()
            && let Some(Some(old)) = self.pods.get(&id)
        {
            valid = Some(old.clone());
            last_valid_stays(&mut problems);
        }
        if self.has_problems(Kind::Pod, &id, &problems) && self.pods.get(&id) == Some(&valid) {
            return;
        }
        self.set_problems(Kind::Pod, &id, problems);
        self.pods.insert(id.clone(), valid);
        self.namespace_dirty(id.namespace());
    }

    /// Removes a Pod.
    pub(crate) fn delete_pod(&mut self, id: &ObjectRef) {
        self.set_problems(Kind::Pod, id, Vec::new());
        if self.pods.remove(id).is_some() {
            self.namespace_dirty(id.namespace());
        }
    }

    /// A Service as validated, with its stamp.
    #[must_use]
    pub fn service(&self, id: &ObjectRef) -> Option<&CheckedService> {
        self.services.get(id).map(AsRef::as_ref)
    }

    /// The EndpointSlices of a Service, with their resourceVersions (0: none) and origins,
    /// by name.
    #[must_use]
    pub fn slices_of(&self, service: &ObjectRef) -> Vec<(ObjectRef, u64, Arc<str>)> {
        let mut slices: Vec<(ObjectRef, u64, Arc<str>)> = self
            .slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| {
                let entry = self.slices.get(id)?;
                Some((
                    id.clone(),
                    entry.resource_version,
                    Arc::clone(&entry.origin),
                ))
            })
            .collect();
        slices.sort();
        slices
    }

    /// Notes that the frontends of `service` were written at `at` (seconds since the epoch).
    pub(crate) fn mark_written(&mut self, service: &ObjectRef, at: u32) {
        if let Some(checked) = self.services.get_mut(service) {
            checked.stamp.written_at = at;
        }
    }

    /// The objects of `kind` held (none for Nodes: the state keeps only the zone).
    #[must_use]
    pub fn ids(&self, kind: Kind) -> Vec<ObjectRef> {
        match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Node => Vec::new(),
        }
    }

    /// The DNS records of the Services translated since the last call (`None`: no name).
    pub(crate) fn take_dns_changes(&mut self) -> Vec<(ObjectRef, Option<ServiceRecords>)> {
        std::mem::take(&mut self.dns_changes)
    }

    /// [`Self::translate_one`] of each of `ids`, in order (a Service that is gone: no
    /// records, no frontends). Translation only reads the state, so a large batch (the
    /// first sync of a big cluster: 100,000 Services take most of a second on one CPU) is
    /// split between the CPUs; the caller puts the results in place one by one.
    fn translate_all(
        &self,
        ids: &[ObjectRef],
    ) -> Vec<(Option<ServiceRecords>, ServiceTranslation)> {
        let one = |id: &ObjectRef| self.translate_one(id).unwrap_or_default();
        let workers =
            std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_TRANSLATORS));
        if workers < 2 || ids.len() < PARALLEL_TRANSLATION {
            return ids.iter().map(one).collect();
        }
        let chunk = ids.len().div_ceil(workers);
        std::thread::scope(|scope| {
            let parts: Vec<_> = ids
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
                .collect();
            parts
                .into_iter()
                .flat_map(|part| {
                    part.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        })
    }

    /// The DNS records and the translation of Service `id` as the state has it (`None`:
    /// no such Service). Reads the state only.
    fn translate_one(
        &self,
        id: &ObjectRef,
    ) -> Option<(Option<ServiceRecords>, ServiceTranslation)> {
        let service = self.services.get(id)?;
        let entries = || {
            self.slices_by_service
                .get(id)
                .into_iter()
                .flatten()
                .filter_map(|s| self.slices.get(s))
        };
        // The proxy's: the Service has slices when it has any but a headless Service's;
        // DNS reads those too.
        let slices: Option<Vec<&ValidSlice>> = entries().any(|e| !e.headless).then(|| {
            entries()
                .filter(|e| !e.headless)
                .filter_map(|e| e.valid.as_deref())
                .collect()
        });
        let dns_slices: Option<Vec<&ValidSlice>> = entries()
            .next()
            .is_some()
            .then(|| entries().filter_map(|e| e.valid.as_deref()).collect());
        let pods: Vec<&ValidPod> = if slices.is_some() && dns_slices.is_some() {
            Vec::new()
        } else {
            // The namespace's pods only, by name, as slices are: when two pods share an
            // address the first one's endpoint is used, and that must not depend on the
            // order the pods arrived in (found by the property tests).
            self.pods
                .range(ObjectRef::new(id.namespace(), "")..)
                .take_while(|(pod, _)| pod.namespace() == id.namespace())
                .filter_map(|(_, valid)| valid.as_ref())
                .collect()
        };
        let dns = records::build(service, dns_slices.as_deref(), &pods);
        let pods: Vec<&ValidPod> = if slices.is_some() { Vec::new() } else { pods };
        let translation = translate_service(
            service,
            slices.as_deref(),
            &pods,
            NodeTopology {
                name: self.node_name.as_deref(),
                zone: self.node_zone.as_deref(),
            },
        );
        Some((dns, translation))
    }

    /// Translates the Services touched since the last call and updates the desired state.
    /// Returns the frontend addresses whose desired entry changed (added, updated or
    /// removed), sorted.
    pub(crate) fn recompute(&mut self) -> Vec<L4Addr> {
        let mut touched = BTreeSet::new();
        let mut ips = std::mem::take(&mut self.pending_ips);
        let dirty: Vec<ObjectRef> = std::mem::take(&mut self.dirty).into_iter().collect();
        let translations = self.translate_all(&dirty);
        for (id, (dns, new)) in dirty.into_iter().zip(translations) {
            self.dns_changes.push((id.clone(), dns));
            match new.health_check {
                Some(check) => self.health_checks.insert(id.clone(), check),
                None => self.health_checks.remove(&id),
            };
            let old = if new.frontends.is_empty() {
                self.results.remove(&id)
            } else {
                let frontends = new.frontends.into_iter().collect();
                self.results.insert(id.clone(), frontends)
            };
            let old_ips = cluster_ips_of(old.as_deref());
            let new_ips = cluster_ips_of(self.results.get(&id).map(SmallVec::as_slice));
            for ip in old_ips.difference(&new_ips) {
                if let Some(set) = self.cluster_ips.get_mut(ip) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.cluster_ips.remove(ip);
                    }
                }
                ips.insert(*ip);
            }
            for ip in new_ips.difference(&old_ips) {
                self.cluster_ips.entry(*ip).or_default().insert(id.clone());
                ips.insert(*ip);
            }
            for f in old.iter().flat_map(|r| r.iter()) {
                if let Some(set) = self.contenders.get_mut(&f.address) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.contenders.remove(&f.address);
                    }
                }
                touched.insert(f.address);
            }
            for f in self.results.get(&id).iter().flat_map(|r| r.iter()) {
                self.contenders
                    .entry(f.address)
                    .or_default()
                    .insert(id.clone());
                touched.insert(f.address);
            }
        }
        // A ClusterIP that came or went, or a node address: every frontend on that IP.
        for ip in &ips {
            touched.extend(addresses_on(&self.contenders, *ip));
        }
        // A NodePort that came or went: the external IPs on node addresses on its port.
        let node_ports: Vec<L4Addr> = touched
            .iter()
            .filter(|a| a.address.is_unspecified())
            .copied()
            .collect();
        for node_port in node_ports {
            for ip in &self.node_addresses {
                touched.extend(
                    addresses_on(&self.contenders, *ip)
                        .filter(|a| a.port == node_port.port && a.protocol == node_port.protocol),
                );
            }
        }
        let mut changed = Vec::new();
        for address in touched {
            let (wanted, losers) = self.decide(&address);
            let old_losers = if losers.is_empty() {
                self.losers.remove(&address)
            } else {
                self.losers.insert(address, losers)
            };
            if old_losers.as_ref() != self.losers.get(&address) {
                // A conflict or refusal appeared, moved or went (the reports name them).
                self.problems_version += 1;
            }
            if self.desired.get(&address).map(AsRef::as_ref) == wanted.as_deref() {
                continue;
            }
            match wanted {
                Some(frontend) => self.desired.insert(address, frontend),
                None => self.desired.remove(&address),
            };
            changed.push(address);
        }
        changed
    }

    /// Which Service's frontend takes `address` (see [`ownership`]), and the Services that
    /// want it and do not get it, with why.
    fn decide(&self, address: &L4Addr) -> (Option<Arc<Frontend>>, Vec<Loser>) {
        let Some(set) = self.contenders.get(address) else {
            return (None, Vec::new());
        };
        let frontend_of = |id: &ObjectRef, address: &L4Addr| {
            self.results.get(id)?.iter().find(|f| f.address == *address)
        };
        let node_port_owner = |key: &L4Addr| {
            self.contenders
                .get(key)?
                .iter()
                .find(|id| frontend_of(id, key).is_some_and(|f| f.kind == FrontendKind::NodePort))
                .cloned()
        };
        let context = ownership::Context {
            cluster_ips: &self.cluster_ips,
            external_ip_cidrs: &self.external_ip_cidrs,
            node_addresses: &self.node_addresses,
            node_port_owner: &node_port_owner,
        };
        let port_field = |id: &ObjectRef| {
            frontend_of(id, address)
                .zip(self.services.get(id))
                .map(|(frontend, service)| service.frontend_field(frontend))
                .unwrap_or_default()
        };
        let mut losers = Vec::new();
        let mut eligible = Vec::new();
        for id in set {
            // One Service may want the address twice (an external IP that is also one of
            // its LoadBalancer IPs): each refusal is reported, the first allowed is kept.
            let mut allowed = None;
            let mine = self.results.get(id).into_iter().flat_map(|r| r.iter());
            for frontend in mine.filter(|f| f.address == *address) {
                match ownership::refusal(frontend, &context) {
                    Some(message) => losers.push(Loser {
                        service: id.clone(),
                        field: self
                            .services
                            .get(id)
                            .and_then(|s| s.address_field(frontend))
                            .unwrap_or_else(|| port_field(id)),
                        message,
                    }),
                    None => {
                        allowed.get_or_insert(frontend);
                    }
                }
            }
            eligible.extend(allowed);
        }
        eligible.sort_by(|a, b| ownership::rank(a).cmp(&ownership::rank(b)));
        let winner = eligible.first().map(|f| (*f).clone());
        if let Some(owner) = &winner {
            for frontend in eligible.iter().skip(1) {
                losers.push(Loser {
                    service: frontend.service.clone(),
                    field: port_field(&frontend.service),
                    message: if address.address.is_unspecified() {
                        format!(
                            "nodePort {}/{} is already taken by Service {}",
                            address.port, address.protocol, owner.service
                        )
                    } else {
                        format!("{address} is already taken by Service {}", owner.service)
                    },
                });
            }
        }
        (winner, losers)
    }

    /// The frontends as of the last [`Self::recompute`].
    #[must_use]
    pub const fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Every current problem, sorted: invalid objects, Services that lost a frontend
    /// address to another Service, and addresses refused (see [`ownership`]).
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self.object_problems.values().flatten().cloned().collect();
        problems.extend(
            self.with_problems
                .iter()
                .filter_map(|id| self.services.get(id))
                .flat_map(|s| s.problems.iter().cloned()),
        );
        for loser in self.losers.values().flatten() {
            problems.push(Problem {
                origin: self
                    .services
                    .get(&loser.service)
                    .map(|s| s.origin.to_string())
                    .unwrap_or_default(),
                object: format!("Service {}", loser.service),
                field: loser.field.clone(),
                message: loser.message.clone(),
            });
        }
        problems.sort_by(|a, b| {
            (&a.origin, &a.object, &a.field, &a.message)
                .cmp(&(&b.origin, &b.object, &b.field, &b.message))
        });
        // One refused external IP is refused on each of its ports: one report.
        problems.dedup();
        problems
    }

    /// A problem on the port `port_name` of the Service `service` (a frontend the maps
    /// could not take), with the Service's origin and the port's field.
    #[must_use]
    pub fn port_problem(&self, service: &ObjectRef, port_name: &str, message: String) -> Problem {
        let checked = self.services.get(service);
        Problem {
            origin: checked.map(|s| s.origin.to_string()).unwrap_or_default(),
            object: format!("Service {service}"),
            field: checked.map_or_else(|| "spec.ports".to_string(), |s| s.port_field(port_name)),
            message,
        }
    }

    /// The `healthCheckNodePort` of every Service that has one; on a clash, the first
    /// Service by namespace/name keeps the port.
    #[must_use]
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        let mut checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
        for check in self.health_checks.values() {
            match checks.get(&check.port) {
                Some(kept) if kept.service <= check.service => {}
                _ => {
                    checks.insert(check.port, check.clone());
                }
            }
        }
        checks
    }

    /// The objects not (wholly) programmed, with why: `invalid` (a field that cannot be
    /// programmed) or `address_conflict` (an address another Service holds, or refused).
    #[must_use]
    pub fn rejected(&self) -> Vec<(Kind, &'static str, ObjectRef)> {
        let mut rejected: Vec<(Kind, &'static str, ObjectRef)> = self
            .object_problems
            .keys()
            .map(|(kind, id)| (*kind, "invalid", id.clone()))
            .collect();
        rejected.extend(
            self.with_problems
                .iter()
                .filter(|id| {
                    self.services
                        .get(*id)
                        .is_some_and(|s| !s.problems.is_empty())
                })
                .map(|id| (Kind::Service, "invalid", id.clone())),
        );
        rejected.extend(
            self.losers
                .values()
                .flatten()
                .map(|l| (Kind::Service, "address_conflict", l.service.clone())),
        );
        rejected
    }

    /// Every Service or port left alone on purpose, sorted.
    #[must_use]
    pub fn skipped(&self) -> Vec<Skipped> {
        let mut skipped: Vec<Skipped> = self
            .with_problems
            .iter()
            .filter_map(|id| self.services.get(id))
            .flat_map(|s| s.skipped.iter().cloned())
            .collect();
        skipped.sort_by(|a, b| (&a.object, &a.reason).cmp(&(&b.object, &b.reason)));
        skipped
    }

    /// Numbers of objects held, for logs.
    #[must_use]
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.services.len(), self.slices.len(), self.pods.len())
    }

    fn namespace_dirty(&mut self, namespace: &str) {
        if let Some(services) = self.services_by_namespace.get(namespace) {
            self.dirty.extend(services.iter().cloned());
        }
    }

    /// Whether the object's problems are exactly `problems` already.
    fn has_problems(&self, kind: Kind, id: &ObjectRef, problems: &[Problem]) -> bool {
        let old = self.object_problems.get(&(kind, id.clone()));
        old.map_or(problems.is_empty(), |old| old == problems)
    }

    fn set_problems(&mut self, kind: Kind, id: &ObjectRef, problems: Vec<Problem>) {
        let key = (kind, id.clone());
        let old = if problems.is_empty() {
            self.object_problems.remove(&key)
        } else {
            self.object_problems.insert(key.clone(), problems)
        };
        if old.as_ref() != self.object_problems.get(&key) {
            self.problems_version += 1;
        }
    }

    /// A number that changes whenever [`Self::problems`] may return something new.
    #[must_use]
    pub const fn problems_version(&self) -> u64 {
        self.problems_version
    }
}

/// A Service edit that fails validation (problems, no valid form) keeps the last valid
/// version in effect, with the new version's problems saying so.
fn keep_last_valid(checked: &mut CheckedService, old: &CheckedService) {
    if checked.valid.is_some() || checked.problems.is_empty() || old.valid.is_none() {
        return;
    }
    checked.valid.clone_from(&old.valid);
    checked.dns.clone_from(&old.dns);
    checked.origin = Arc::clone(&old.origin);
    checked.stamp = old.stamp;
    checked.skipped.clone_from(&old.skipped);
    last_valid_stays(&mut checked.problems);
}

/// Says on each problem of a refused edit that the last valid version stays in effect.
fn last_valid_stays(problems: &mut [Problem]) {
    for problem in problems {
        problem
            .message
            .push_str("; the last valid version stays in effect");
    }
}

/// The ClusterIPs among a translation's frontends.
fn cluster_ips_of(frontends: Option<&[Arc<Frontend>]>) -> BTreeSet<IpAddr> {
    frontends
        .into_iter()
        .flatten()
        .filter(|f| f.kind == FrontendKind::ClusterIp)
        .map(|f| f.address.address)
        .collect()
}

/// A Service's problems and skipped parts.
type Findings<'a> = (&'a [Problem], &'a [Skipped]);

const NONE: Findings<'static> = (&[], &[]);

fn findings(service: &CheckedService) -> Findings<'_> {
    (&service.problems, &service.skipped)
}

/// The frontend addresses wanted on `ip`, every port, protocol and scope: the map is
/// ordered by IP first, and `ip`'s first possible address is port 0, TCP, external.
fn addresses_on<V>(
    contenders: &BTreeMap<L4Addr, V>,
    ip: IpAddr,
) -> impl Iterator<Item = L4Addr> + '_ {
    contenders
        .range(L4Addr::new(ip, 0, Protocol::Tcp)..)
        .map(|(address, _)| *address)
        .take_while(move |address| address.address == ip)
}

/// Whether a slice is a headless Service's.
fn is_headless_slice(slice: &EndpointSlice) -> bool {
    slice
        .metadata
        .labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key(HEADLESS_LABEL))
}

/// The Service a slice belongs to.
fn slice_service(slice: &EndpointSlice) -> Option<ObjectRef> {
    let labels = slice.metadata.labels.as_ref()?;
    let name = labels.get(SERVICE_NAME_LABEL)?;
    let namespace = slice.metadata.namespace.as_deref();
    Some(ObjectRef::new(namespace.unwrap_or(DEFAULT_NAMESPACE), name))
}

/// Everything the translation looks at, as whole objects (tests, `lb-agent translate`).
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: Vec<Sourced<Service>>,
    pub endpoint_slices: Vec<Sourced<EndpointSlice>>,
    pub pods: Vec<Sourced<Pod>>,
}

/// The result of a translation.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub frontends: DesiredState,
    /// Invalid objects (reported as errors; the rest is still programmed).
    pub problems: Vec<Problem>,
    /// Objects left alone on purpose (headless, ExternalName, another proxy's, SCTP ports).
    pub skipped: Vec<Skipped>,
}

/// Translates the objects into the frontends this node serves: the whole-snapshot form of
/// [`ClusterState`], which does the same incrementally.
#[must_use]
pub fn translate(objects: &ClusterObjects) -> Translation {
    translate_for_node(objects, None)
}

/// [`translate`] on the node `node` (for the node-local traffic policies).
#[must_use]
pub fn translate_for_node(objects: &ClusterObjects, node: Option<&str>) -> Translation {
    translate_on(objects, node, None)
}

/// [`translate`] on the node `node` in zone `zone` (for topology hints).
#[must_use]
pub fn translate_on(
    objects: &ClusterObjects,
    node: Option<&str>,
    zone: Option<&str>,
) -> Translation {
    let mut state = ClusterState::new(node.map(str::to_owned));
    state.set_node_zone(zone.map(str::to_owned));
    objects
        .services
        .iter()
        .for_each(|o| state.apply_service(o.clone()));
    objects
        .endpoint_slices
        .iter()
        .for_each(|o| state.apply_slice(o.clone()));
    objects.pods.iter().for_each(|o| state.apply_pod(o.clone()));
    state.recompute();
    Translation {
        frontends: state.desired().clone(),
        problems: state.problems(),
        skipped: state.skipped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Scope;

    #[test]
    fn a_large_batch_translates_on_several_threads_as_one_by_one() {
        let mut state = ClusterState::new(Some("node-a".into()));
        let services = u32::try_from(PARALLEL_TRANSLATION).unwrap() + 100;
        for i in 0..services {
            let ip = std::net::Ipv4Addr::from(0x0a60_0010 + i);
            let object = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
                "spec": {
                    "type": if i % 3 == 0 { "NodePort" } else { "ClusterIP" },
                    "clusterIP": ip.to_string(),
                    "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
                },
            }))
            .unwrap();
            state.apply_service(Sourced {
                origin: "api".into(),
                object,
            });
            let object = serde_json::from_value(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("svc-{i}-x"),
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
                },
                "addressType": "IPv4",
                "endpoints": [{
                    "addresses": [std::net::Ipv4Addr::from(0x0a80_0000 + i).to_string()],
                    "conditions": {"ready": i % 5 != 0},
                    "nodeName": if i % 2 == 0 { "node-a" } else { "node-b" },
                }],
                "ports": [{"port": 8080, "protocol": "TCP"}],
            }))
            .unwrap();
            state.apply_slice(Sourced {
                origin: "api".into(),
                object,
            });
        }
        let mut ids: Vec<ObjectRef> = state.services.keys().cloned().collect();
        ids.sort();
        // One that is gone: no records, no frontends, in its place.
        ids.insert(7, ObjectRef::new("default", "gone"));
        let sequential: Vec<_> = ids
            .iter()
            .map(|id| state.translate_one(id).unwrap_or_default())
            .collect();
        assert!(
            sequential
                .iter()
                .filter(|(_, t)| !t.frontends.is_empty())
                .count()
                > 4_000
        );
        assert_eq!(state.translate_all(&ids), sequential);
    }

    #[test]
    fn the_addresses_on_an_ip_are_every_port_protocol_and_scope_of_it_alone() {
        let ip = |last: u8| IpAddr::from([10, 96, 0, last]);
        let mut contenders = BTreeMap::new();
        let wanted = [
            L4Addr::new(ip(2), 0, Protocol::Tcp),
            L4Addr::new(ip(2), 53, Protocol::Udp),
            L4Addr::new(ip(2), 65535, Protocol::Udp).internal(),
        ];
        let others = [
            L4Addr::new(ip(1), 65535, Protocol::Udp).internal(),
            L4Addr::new(ip(3), 0, Protocol::Tcp),
            L4Addr::new(std::net::Ipv6Addr::LOCALHOST, 0, Protocol::Tcp),
        ];
        for address in wanted.iter().chain(&others) {
            contenders.insert(*address, ());
        }
        assert_eq!(wanted[2].scope, Scope::Internal);
        let on: Vec<L4Addr> = addresses_on(&contenders, ip(2)).collect();
        assert_eq!(on, wanted);
    }
}
