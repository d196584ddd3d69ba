//! Property tests of the reconcile core: random sequences of Service, EndpointSlice and Pod
//! adds, updates and deletes go through the [`Reconciler`] into in-memory maps, as the
//! agent's sources hand them over (a few changes, then a sync).
//!
//! - After every single map operation: every master's slots `1..=count` exist and name a
//!   backend of their family, no two masters name one slot, no slot a master names is
//!   written (the fake itself checks these), and no frontend id is held by two frontend
//!   addresses.
//! - After every sync: the maps hold exactly the desired state (counts match the desired
//!   backends, no overlapping slot ranges), every backend is used by a slot, every
//!   affinity-match entry names a live backend and frontend.
//! - After the sequence: the maps equal what a fresh agent writes for the final objects
//!   (incremental = from scratch, ids aside), and a fresh agent adopting them writes nothing.
//!
//! `LB_PROPTEST_CASES` (or proptest's own `PROPTEST_CASES`) sets the number of sequences
//! [default: 1,000, about 10 s in a debug build].
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use lb_agent::{
    api::SharedStatus,
    maps::{LbMaps, Result as MapResult, ServiceEntry, dump, fake::FakeMaps, writer::MapWriter},
    model::{Backend, L4Addr},
    reconcile::{Reconciler, SyncKind},
    source::change::{Change, Kind, Object},
};
use lb_common::{FrontendId, ServiceValue, SlotValue};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Sequences run when neither variable says otherwise.
const DEFAULT_CASES: u32 = 1000;
const SERVICES: usize = 4;
const SLICES: usize = 4;
const PODS: usize = 5;
const NODE: &str = "node-a";

// ---- The objects ----------------------------------------------------------------------

#[derive(Clone, Debug)]
struct ServiceSpec {
    /// Last octet of the ClusterIP: few, so Services contend for addresses.
    ip: u8,
    node_port: bool,
    local: bool,
    affinity: bool,
    app: u8,
    /// Which of the two ports (http/TCP, dns/UDP) it has (at least one).
    ports: u8,
    named_target: bool,
    node_port_base: u16,
}

#[derive(Clone, Debug)]
struct EndpointSpec {
    ip: u8,
    ready: bool,
    terminating: bool,
    remote: bool,
}

#[derive(Clone, Debug)]
struct SliceSpec {
    service: usize,
    endpoints: Vec<EndpointSpec>,
    udp_port: bool,
}

#[derive(Clone, Debug)]
struct PodSpec {
    ip: u8,
    app: u8,
    ready: bool,
    remote: bool,
}

#[derive(Clone, Debug)]
enum Op {
    ApplyService(usize, ServiceSpec),
    DeleteService(usize),
    ApplySlice(usize, SliceSpec),
    DeleteSlice(usize),
    ApplyPod(usize, PodSpec),
    DeletePod(usize),
    /// The changes so far are written.
    Sync,
}

fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    (
        1..=5u8,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0..2u8,
        1..=3u8,
        any::<bool>(),
        0..3u16,
    )
        .prop_map(
            |(ip, node_port, local, affinity, app, ports, named_target, node_port_base)| {
                ServiceSpec {
                    ip,
                    node_port,
                    local: node_port && local,
                    affinity,
                    app,
                    ports,
                    named_target,
                    node_port_base,
                }
            },
        )
}

fn endpoint_spec() -> impl Strategy<Value = EndpointSpec> {
    (1..=8u8, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(ip, ready, terminating, remote)| EndpointSpec {
            ip,
            ready,
            terminating,
            remote,
        },
    )
}

fn slice_spec() -> impl Strategy<Value = SliceSpec> {
    (
        0..SERVICES,
        proptest::collection::vec(endpoint_spec(), 0..5),
        any::<bool>(),
    )
        .prop_map(|(service, endpoints, udp_port)| SliceSpec {
            service,
            endpoints,
            udp_port,
        })
}

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    (1..=8u8, 0..2u8, any::<bool>(), any::<bool>()).prop_map(|(ip, app, ready, remote)| PodSpec {
        ip,
        app,
        ready,
        remote,
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SERVICES, service_spec()).prop_map(|(i, s)| Op::ApplyService(i, s)),
        1 => (0..SERVICES).prop_map(Op::DeleteService),
        4 => (0..SLICES, slice_spec()).prop_map(|(i, s)| Op::ApplySlice(i, s)),
        1 => (0..SLICES).prop_map(Op::DeleteSlice),
        3 => (0..PODS, pod_spec()).prop_map(|(i, p)| Op::ApplyPod(i, p)),
        1 => (0..PODS).prop_map(Op::DeletePod),
        3 => Just(Op::Sync),
    ]
}

fn service_json(i: usize, s: &ServiceSpec) -> Value {
    let mut ports = Vec::new();
    if s.ports & 1 != 0 {
        let target = if s.named_target {
            json!("http")
        } else {
            json!(8080)
        };
        let mut port = json!({"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"});
        if s.node_port {
            port["nodePort"] = json!(30080 + s.node_port_base);
        }
        ports.push(port);
    }
    if s.ports & 2 != 0 {
        ports.push(json!({"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"}));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
        "spec": {
            "clusterIP": format!("10.96.0.{}", s.ip),
            "type": if s.node_port { "NodePort" } else { "ClusterIP" },
            "externalTrafficPolicy": if s.local { "Local" } else { "Cluster" },
            "sessionAffinity": if s.affinity { "ClientIP" } else { "None" },
            "selector": {"app": format!("app-{}", s.app)},
            "ports": ports,
        },
    })
}

fn node_of(remote: bool) -> &'static str {
    if remote { "node-b" } else { NODE }
}

fn slice_json(i: usize, s: &SliceSpec) -> Value {
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": [format!("10.244.0.{}", e.ip)],
                "conditions": {
                    "ready": e.ready && !e.terminating,
                    "serving": e.ready,
                    "terminating": e.terminating,
                },
                "nodeName": node_of(e.remote),
            })
        })
        .collect();
    let mut ports = vec![json!({"name": "http", "port": 8080, "protocol": "TCP"})];
    if s.udp_port {
        ports.push(json!({"name": "dns", "port": 53, "protocol": "UDP"}));
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("slice-{i}"),
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": format!("svc-{}", s.service)},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

fn pod_json(i: usize, p: &PodSpec) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("pod-{i}"),
            "namespace": "default",
            "labels": {"app": format!("app-{}", p.app)},
        },
        "spec": {
            "nodeName": node_of(p.remote),
            "containers": [{
                "name": "c",
                "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                ],
            }],
        },
        "status": {
            "phase": "Running",
            "podIP": format!("10.244.0.{}", p.ip),
            "conditions": [{"type": "Ready", "status": if p.ready { "True" } else { "False" }}],
        },
    })
}

fn parse<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a generated object parses")
}

fn object(kind: Kind, value: Value) -> Object {
    match kind {
        Kind::Service => Object::Service(Box::new(parse(value))),
        Kind::EndpointSlice => Object::EndpointSlice(Box::new(parse(value))),
        Kind::Pod => Object::Pod(Box::new(parse(value))),
        Kind::Node => unreachable!("no Nodes are generated"),
    }
}

fn apply(kind: Kind, value: Value) -> Change {
    Change::Apply {
        origin: Arc::from("generated.yaml"),
        object: object(kind, value),
    }
}

/// The objects in effect, by kind and name, as JSON.
type World = BTreeMap<(Kind, String), Value>;

/// The change `op` makes, and the world after it.
fn change_of(op: &Op, world: &mut World) -> Option<Change> {
    let (kind, name, value) = match op {
        Op::ApplyService(i, s) => (Kind::Service, format!("svc-{i}"), Some(service_json(*i, s))),
        Op::DeleteService(i) => (Kind::Service, format!("svc-{i}"), None),
        Op::ApplySlice(i, s) => (
            Kind::EndpointSlice,
            format!("slice-{i}"),
            Some(slice_json(*i, s)),
        ),
        Op::DeleteSlice(i) => (Kind::EndpointSlice, format!("slice-{i}"), None),
        Op::ApplyPod(i, p) => (Kind::Pod, format!("pod-{i}"), Some(pod_json(*i, p))),
        Op::DeletePod(i) => (Kind::Pod, format!("pod-{i}"), None),
        Op::Sync => return None,
    };
    let key = (kind, name.clone());
    Some(match value {
        Some(value) => {
            world.insert(key, value.clone());
            apply(kind, value)
        }
        None => {
            world.remove(&key);
            Change::Delete {
                kind,
                id: lb_agent::model::ObjectRef::new("default", &name),
            }
        }
    })
}

// ---- Maps that check themselves after every operation ---------------------------------

/// [`FakeMaps`] (which checks slots and backends after each operation) with the frontend
/// ids checked too: no id is ever held by the masters of two frontend addresses.
#[derive(Clone, Debug, Default)]
struct CheckedMaps(FakeMaps);

impl CheckedMaps {
    fn check(&self) {
        let mut owners: BTreeMap<FrontendId, (std::net::IpAddr, u16, u8)> = BTreeMap::new();
        for (frontend, value) in &self.0.services {
            // The two scopes of one address share its id.
            let address = (frontend.address, frontend.port, frontend.protocol as u8);
            if let Some(other) = owners.insert(value.rev_nat_id, address) {
                assert_eq!(
                    other, address,
                    "frontend id {} held by two frontends",
                    value.rev_nat_id
                );
            }
        }
    }
}

impl LbMaps for CheckedMaps {
    fn set_master(&mut self, frontend: &L4Addr, value: ServiceValue) -> MapResult<()> {
        self.0.set_master(frontend, value)?;
        self.check();
        Ok(())
    }
    fn delete_master(&mut self, frontend: &L4Addr) -> MapResult<()> {
        self.0.delete_master(frontend)?;
        self.check();
        Ok(())
    }
    fn set_slot(&mut self, index: u32, value: SlotValue) -> MapResult<()> {
        self.0.set_slot(index, value)
    }
    fn slots(&self, ranges: &[(u32, u16)]) -> MapResult<Vec<SlotValue>> {
        self.0.slots(ranges)
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> MapResult<()> {
        self.0.set_backend(id, backend)
    }
    fn delete_backend(&mut self, id: u32, backend: &Backend) -> MapResult<()> {
        self.0.delete_backend(id, backend)
    }
    fn services(&self) -> MapResult<Vec<ServiceEntry>> {
        self.0.services()
    }
    fn backends(&self) -> MapResult<Vec<(u32, Backend)>> {
        self.0.backends()
    }
    fn set_affinity_match(&mut self, id: u32, rev_nat_id: FrontendId) -> MapResult<()> {
        self.0.set_affinity_match(id, rev_nat_id)
    }
    fn delete_affinity_match(&mut self, id: u32, rev_nat_id: FrontendId) -> MapResult<()> {
        self.0.delete_affinity_match(id, rev_nat_id)
    }
    fn affinity_matches(&self) -> MapResult<Vec<(u32, FrontendId)>> {
        self.0.affinity_matches()
    }
    fn forget_affinity(&mut self, rev_nat_ids: &BTreeSet<FrontendId>) -> MapResult<()> {
        self.0.forget_affinity(rev_nat_ids)
    }
    fn set_source_range(&mut self, rev_nat_id: FrontendId, range: ipnet::IpNet) -> MapResult<()> {
        self.0.set_source_range(rev_nat_id, range)
    }
    fn delete_source_range(
        &mut self,
        rev_nat_id: FrontendId,
        range: ipnet::IpNet,
    ) -> MapResult<()> {
        self.0.delete_source_range(rev_nat_id, range)
    }
    fn source_ranges(&self) -> MapResult<Vec<(FrontendId, ipnet::IpNet)>> {
        self.0.source_ranges()
    }
    fn forget_peer(&mut self, backend: &Backend, rev_nat_id: FrontendId) -> MapResult<()> {
        self.0.forget_peer(backend, rev_nat_id)
    }
}

fn agent(maps: CheckedMaps) -> Reconciler<CheckedMaps> {
    Reconciler::new(
        MapWriter::adopt(maps).expect("fake maps are read"),
        SharedStatus::default(),
        Some(NODE.to_string()),
        Arc::default(),
    )
}

// ---- What is compared -----------------------------------------------------------------

/// The maps with ids replaced by what they stand for: each frontend with its flags, count
/// and the backends of its slots (sorted), every backend, and the affinity matches as
/// (frontend address, backend).
#[derive(Debug, PartialEq, Eq)]
struct Canonical {
    frontends: BTreeMap<L4Addr, (u32, u16, Option<u32>, Vec<String>)>,
    backends: BTreeSet<String>,
    affinity: BTreeSet<(String, String)>,
}

fn canonical(maps: &FakeMaps) -> Canonical {
    let contents = dump::read(maps).expect("fake maps are read");
    let by_id: BTreeMap<FrontendId, String> = contents
        .frontends
        .iter()
        .map(|f| {
            (
                f.rev_nat_id,
                format!("{}:{}", f.address.address, f.address.port),
            )
        })
        .collect();
    let backend = |id: &u32| {
        contents
            .backends
            .get(id)
            .map_or_else(|| format!("missing {id}"), |b| format!("{b:?}"))
    };
    Canonical {
        frontends: contents
            .frontends
            .iter()
            .map(|f| {
                let mut slots: Vec<String> =
                    f.slots.iter().map(|s| backend(&s.backend_id)).collect();
                slots.sort();
                (f.address, (f.flags, f.count, f.affinity_timeout, slots))
            })
            .collect(),
        backends: contents
            .backends
            .values()
            .map(|b| format!("{b:?}"))
            .collect(),
        affinity: contents
            .affinity_matches
            .iter()
            .map(|(id, rev)| (by_id.get(rev).cloned().unwrap_or_default(), backend(id)))
            .collect(),
    }
}

/// What holds after every sync: the maps are exactly the desired state, nothing leaked.
fn check_synced(reconciler: &Reconciler<CheckedMaps>) {
    let maps = &reconciler.writer().maps().0;
    let contents = dump::read(maps).expect("fake maps are read");
    assert!(
        contents.overlapping.is_empty(),
        "overlapping slot ranges: {:?}",
        contents.overlapping
    );
    let desired = reconciler.state().desired();
    let programmed: BTreeSet<L4Addr> = contents.frontends.iter().map(|f| f.address).collect();
    let wanted: BTreeSet<L4Addr> = desired.keys().copied().collect();
    assert_eq!(
        programmed, wanted,
        "the maps hold exactly the desired frontends"
    );
    let mut used = BTreeSet::new();
    for f in &contents.frontends {
        let want = &desired[&f.address];
        assert_eq!(
            usize::from(f.count),
            want.backends.len(),
            "{}: count against desired backends",
            f.address
        );
        let slots: Vec<u16> = f.slots.iter().map(|s| s.slot).collect();
        let expected: Vec<u16> = (1..=f.count).collect();
        assert_eq!(slots, expected, "{}: slots exactly 1..=count", f.address);
        let mut got: Vec<Backend> = f.slots.iter().filter_map(|s| s.backend).collect();
        got.sort();
        let mut want_backends = want.backends.iter().collect::<Vec<_>>();
        want_backends.sort();
        assert_eq!(got, want_backends, "{}: backends", f.address);
        used.extend(f.slots.iter().map(|s| s.backend_id));
    }
    let held: BTreeSet<u32> = contents.backends.keys().copied().collect();
    assert_eq!(held, used, "every backend is used by a slot (no leak)");
    let live_ids: BTreeSet<FrontendId> = contents.frontends.iter().map(|f| f.rev_nat_id).collect();
    for (id, rev) in &contents.affinity_matches {
        assert!(
            held.contains(id) && live_ids.contains(rev),
            "stale affinity match {id}/{rev}"
        );
    }
}

fn run(ops: &[Op]) {
    let mut reconciler = agent(CheckedMaps::default());
    let mut world = World::new();
    let mut first = true;
    let sync = |reconciler: &mut Reconciler<CheckedMaps>, first: &mut bool| {
        let kind = if std::mem::take(first) {
            SyncKind::Full
        } else {
            SyncKind::Changes
        };
        reconciler
            .sync(kind, Instant::now())
            .expect("fake maps take every write");
        check_synced(reconciler);
    };
    for op in ops {
        match change_of(op, &mut world) {
            Some(change) => reconciler.apply(change),
            None => sync(&mut reconciler, &mut first),
        }
    }
    sync(&mut reconciler, &mut first);
    let incremental = reconciler.writer().maps().clone();

    // A fresh agent on empty maps, given only the final objects.
    let mut fresh = agent(CheckedMaps::default());
    for ((kind, _), value) in &world {
        fresh.apply(apply(*kind, value.clone()));
    }
    fresh.sync(SyncKind::Full, Instant::now()).unwrap();
    check_synced(&fresh);
    assert_eq!(
        canonical(&incremental.0),
        canonical(&fresh.writer().maps().0),
        "incremental = from scratch"
    );

    // A fresh agent adopting the incremental maps writes nothing.
    let before = incremental.0.operations;
    let mut adopter = agent(incremental);
    for ((kind, _), value) in &world {
        adopter.apply(apply(*kind, value.clone()));
    }
    adopter.sync(SyncKind::Full, Instant::now()).unwrap();
    check_synced(&adopter);
    assert_eq!(
        adopter.writer().maps().0.operations,
        before,
        "an agent adopting the maps writes nothing"
    );
}

fn cases() -> u32 {
    ["LB_PROPTEST_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn incremental_reconcile_keeps_the_maps_consistent(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}
