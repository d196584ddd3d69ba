//! The desired-state model that every source feeds: the objects by identity, what each
//! Service translates to, and the frontends that result. Changes arrive object by object;
//! only the Services they touch are translated again, so a watch event costs one Service,
//! and [`ClusterState::recompute`] says exactly which frontends changed.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    categorize::NodeTopology,
    model::{DesiredState, HealthCheck, L4Addr, ObjectRef},
    translate::{
        Problem, SERVICE_NAME_LABEL, ServiceTranslation, Skipped, Sourced, ValidPod, ValidSlice,
        translate_service, validate_pod, validate_slice,
    },
};

#[derive(Debug)]
struct SliceEntry {
    /// The problems found in it: with the validated form, all that is kept of a slice
    /// (the raw object is most of the memory at 100k endpoints).
    problems: Vec<Problem>,
    /// The Service named by its label, valid or not.
    service: Option<ObjectRef>,
    valid: Option<ValidSlice>,
}

#[derive(Debug)]
struct PodEntry {
    object: Sourced<Pod>,
    valid: Option<ValidPod>,
}

/// Services, EndpointSlices and Pods, and the frontends they make.
#[derive(Debug, Default)]
pub struct ClusterState {
    /// This node's name: endpoints on it are local (`externalTrafficPolicy: Local`).
    node_name: Option<String>,
    /// This node's `topology.kubernetes.io/zone` label (from its Node object): endpoints
    /// hinted for this zone are preferred (topology hints, `trafficDistribution`).
    node_zone: Option<String>,
    services: HashMap<ObjectRef, Sourced<Service>>,
    services_by_namespace: HashMap<String, BTreeSet<ObjectRef>>,
    slices: HashMap<ObjectRef, SliceEntry>,
    slices_by_service: HashMap<ObjectRef, BTreeSet<ObjectRef>>,
    pods: HashMap<ObjectRef, PodEntry>,
    /// Problems of invalid slices and pods, by (kind, object).
    object_problems: BTreeMap<(&'static str, ObjectRef), Vec<Problem>>,
    /// The translation of every Service.
    results: HashMap<ObjectRef, ServiceTranslation>,
    /// The Services that want each frontend address; the first in name order gets it.
    contenders: HashMap<L4Addr, BTreeSet<ObjectRef>>,
    desired: DesiredState,
    /// Services to translate again.
    dirty: BTreeSet<ObjectRef>,
    /// Bumped whenever the set of problems may have changed, so reporting can skip the
    /// work when it has not.
    problems_version: u64,
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
    pub fn set_node_zone(&mut self, zone: Option<String>) {
        if self.node_zone == zone {
            return;
        }
        self.node_zone = zone;
        self.dirty.extend(self.services.keys().cloned());
    }

    /// This node's zone, as last set.
    #[must_use]
    pub fn node_zone(&self) -> Option<&str> {
        self.node_zone.as_deref()
    }

    /// Adds or updates a Service.
    pub fn apply_service(&mut self, service: Sourced<Service>) {
        let id = ObjectRef::of(&service.object.metadata);
        if self
            .services
            .get(&id)
            .is_some_and(|old| same(old, &service))
        {
            return;
        }
        self.services_by_namespace
            .entry(id.namespace.clone())
            .or_default()
            .insert(id.clone());
        self.services.insert(id.clone(), service);
        self.dirty.insert(id);
    }

    /// Removes a Service.
    pub fn delete_service(&mut self, id: &ObjectRef) {
        if self.services.remove(id).is_some() {
            if let Some(set) = self.services_by_namespace.get_mut(&id.namespace) {
                set.remove(id);
            }
            self.dirty.insert(id.clone());
        }
    }

    /// Adds or updates an EndpointSlice.
    pub fn apply_slice(&mut self, slice: Sourced<EndpointSlice>) {
        let id = ObjectRef::of(&slice.object.metadata);
        let service = slice_service(&slice.object);
        let (valid, problems) = validate_slice(&slice);
        let valid = valid.map(|(_, valid)| valid);
        if self.slices.get(&id).is_some_and(|old| {
            old.service == service && old.valid == valid && old.problems == problems
        }) {
            return;
        }
        self.delete_slice(&id);
        self.set_problems("EndpointSlice", &id, problems.clone());
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
                problems,
                service,
                valid,
            },
        );
    }

    /// Removes an EndpointSlice.
    pub fn delete_slice(&mut self, id: &ObjectRef) {
        self.set_problems("EndpointSlice", id, Vec::new());
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

    /// Adds or updates a Pod (the manifests source derives endpoints from Pods).
    pub fn apply_pod(&mut self, pod: Sourced<Pod>) {
        let id = ObjectRef::of(&pod.object.metadata);
        if self
            .pods
            .get(&id)
            .is_some_and(|old| same(&old.object, &pod))
        {
            return;
        }
        let (valid, problems) = validate_pod(&pod);
        self.set_problems("Pod", &id, problems);
        self.pods
            .insert(id.clone(), PodEntry { object: pod, valid });
        self.namespace_dirty(&id.namespace);
    }

    /// Removes a Pod.
    pub fn delete_pod(&mut self, id: &ObjectRef) {
        self.set_problems("Pod", id, Vec::new());
        if self.pods.remove(id).is_some() {
            self.namespace_dirty(&id.namespace);
        }
    }

    /// Makes the Services exactly `services` (a relist, or a re-read directory): objects
    /// that did not change cause no work and no change of the frontends.
    pub fn replace_services(&mut self, services: impl IntoIterator<Item = Sourced<Service>>) {
        let mut gone: BTreeSet<ObjectRef> = self.services.keys().cloned().collect();
        for service in services {
            gone.remove(&ObjectRef::of(&service.object.metadata));
            self.apply_service(service);
        }
        for id in gone {
            self.delete_service(&id);
        }
    }

    /// Makes the EndpointSlices exactly `slices`; see [`Self::replace_services`].
    pub fn replace_slices(&mut self, slices: impl IntoIterator<Item = Sourced<EndpointSlice>>) {
        let mut gone: BTreeSet<ObjectRef> = self.slices.keys().cloned().collect();
        for slice in slices {
            gone.remove(&ObjectRef::of(&slice.object.metadata));
            self.apply_slice(slice);
        }
        for id in gone {
            self.delete_slice(&id);
        }
    }

    /// Makes the Pods exactly `pods`; see [`Self::replace_services`].
    pub fn replace_pods(&mut self, pods: impl IntoIterator<Item = Sourced<Pod>>) {
        let mut gone: BTreeSet<ObjectRef> = self.pods.keys().cloned().collect();
        for pod in pods {
            gone.remove(&ObjectRef::of(&pod.object.metadata));
            self.apply_pod(pod);
        }
        for id in gone {
            self.delete_pod(&id);
        }
    }

    /// Translates the Services touched since the last call and updates the desired state.
    /// Returns the frontend addresses whose desired entry changed (added, updated or
    /// removed), sorted.
    pub fn recompute(&mut self) -> Vec<L4Addr> {
        let mut touched = BTreeSet::new();
        for id in std::mem::take(&mut self.dirty) {
            let new = self.services.get(&id).map(|service| {
                let slices: Option<Vec<&ValidSlice>> = self.slices_by_service.get(&id).map(|ids| {
                    ids.iter()
                        .filter_map(|s| self.slices.get(s)?.valid.as_ref())
                        .collect()
                });
                let pods: Vec<&ValidPod> = if slices.is_some() {
                    Vec::new()
                } else {
                    self.pods
                        .iter()
                        .filter(|(pod, _)| pod.namespace == id.namespace)
                        .filter_map(|(_, entry)| entry.valid.as_ref())
                        .collect()
                };
                translate_service(
                    service,
                    slices.as_deref(),
                    &pods,
                    NodeTopology {
                        name: self.node_name.as_deref(),
                        zone: self.node_zone.as_deref(),
                    },
                )
            });
            let old = match new {
                Some(new) => self.results.insert(id.clone(), new),
                None => self.results.remove(&id),
            };
            let problems =
                |r: Option<&ServiceTranslation>| r.map(|r| (r.problems.clone(), r.skipped.clone()));
            if problems(old.as_ref()) != problems(self.results.get(&id)) {
                self.problems_version += 1;
            }
            for f in old.iter().flat_map(|r| &r.frontends) {
                if let Some(set) = self.contenders.get_mut(&f.address) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.contenders.remove(&f.address);
                    }
                }
                touched.insert(f.address);
            }
            for f in self.results.get(&id).iter().flat_map(|r| &r.frontends) {
                self.contenders
                    .entry(f.address)
                    .or_default()
                    .insert(id.clone());
                touched.insert(f.address);
            }
        }
        let mut changed = Vec::new();
        if touched
            .iter()
            .any(|a| self.contenders.get(a).is_some_and(|set| set.len() > 1))
        {
            // A conflict may have appeared, moved or gone (the reports name the owner).
            self.problems_version += 1;
        }
        for address in touched {
            let wanted = self
                .contenders
                .get(&address)
                .and_then(|set| set.first())
                .and_then(|owner| self.results.get(owner))
                .and_then(|r| r.frontends.iter().find(|f| f.address == address));
            if self.desired.get(&address).map(AsRef::as_ref) == wanted.map(AsRef::as_ref) {
                continue;
            }
            match wanted {
                Some(frontend) => self.desired.insert(address, frontend.clone()),
                None => self.desired.remove(&address),
            };
            changed.push(address);
        }
        changed
    }

    /// The frontends as of the last [`Self::recompute`].
    #[must_use]
    pub const fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Every current problem, sorted: invalid objects, and Services that lost a frontend
    /// address to another Service.
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self.object_problems.values().flatten().cloned().collect();
        problems.extend(
            self.results
                .values()
                .flat_map(|r| r.problems.iter().cloned()),
        );
        for (address, set) in self.contenders.iter().filter(|(_, set)| set.len() > 1) {
            let owner = set.first().map(ToString::to_string).unwrap_or_default();
            for loser in set.iter().skip(1) {
                let field = self
                    .results
                    .get(loser)
                    .and_then(|r| r.fields.iter().find(|(a, _)| a == address));
                problems.push(Problem {
                    origin: self
                        .services
                        .get(loser)
                        .map(|s| s.origin.to_string())
                        .unwrap_or_default(),
                    object: format!("Service {loser}"),
                    field: field.map(|(_, f)| f.clone()).unwrap_or_default(),
                    message: if address.address.is_unspecified() {
                        format!(
                            "nodePort {}/{} is already taken by Service {owner}",
                            address.port, address.protocol
                        )
                    } else {
                        format!("{address} is already taken by Service {owner}")
                    },
                });
            }
        }
        problems.sort_by(|a, b| {
            (&a.origin, &a.object, &a.field, &a.message)
                .cmp(&(&b.origin, &b.object, &b.field, &b.message))
        });
        problems
    }

    /// The `healthCheckNodePort` of every Service that has one; on a clash, the first
    /// Service by namespace/name keeps the port.
    #[must_use]
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        let mut checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
        for check in self
            .results
            .values()
            .filter_map(|r| r.health_check.as_ref())
        {
            match checks.get(&check.port) {
                Some(kept) if kept.service <= check.service => {}
                _ => {
                    checks.insert(check.port, check.clone());
                }
            }
        }
        checks
    }

    /// Every Service or port left alone on purpose, sorted.
    #[must_use]
    pub fn skipped(&self) -> Vec<Skipped> {
        let mut skipped: Vec<Skipped> = self
            .results
            .values()
            .flat_map(|r| r.skipped.iter().cloned())
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

    fn set_problems(&mut self, kind: &'static str, id: &ObjectRef, problems: Vec<Problem>) {
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

fn same<T: PartialEq>(a: &Sourced<T>, b: &Sourced<T>) -> bool {
    a.object == b.object && a.origin == b.origin
}

fn slice_service(slice: &EndpointSlice) -> Option<ObjectRef> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ObjectRef {
        namespace: slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: name.clone(),
    })
}
