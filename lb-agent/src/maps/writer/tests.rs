//! The writer's order and adoption, each against a defect it once had: the fake maps check
//! after every single operation that a connect could not read a half-written frontend.
use std::{net::IpAddr, sync::Arc};

use lb_common::ServiceValue;

use super::MapWriter;
use crate::maps::{dump, fake::FakeMaps};
use crate::model::{
    Backend, DesiredState, EndpointState, Frontend, FrontendKind, L4Addr, ObjectRef, Protocol,
};

const NODE_PORT: u16 = 30080;

fn backend(ip: &str, remote: bool) -> Backend {
    Backend {
        addr: L4Addr::new(ip.parse::<IpAddr>().unwrap(), 8080, Protocol::Tcp),
        state: EndpointState::Ready,
        remote,
    }
}

fn frontend(address: L4Addr, kind: FrontendKind, backends: Vec<Backend>) -> Frontend {
    Frontend {
        address,
        kind,
        local_only: false,
        no_local_endpoints: false,
        affinity_timeout: None,
        source_ranges: Box::default(),
        service: ObjectRef::new("default", "web"),
        port_name: Arc::from("http"),
        backends: backends.into(),
        backend_info: Box::default(),
    }
}

fn desired(frontends: impl IntoIterator<Item = Frontend>) -> DesiredState {
    frontends
        .into_iter()
        .map(|f| (f.address, Arc::new(f)))
        .collect()
}

/// The NodePort frontend (every node address).
fn node_port() -> L4Addr {
    L4Addr::new(IpAddr::from([0, 0, 0, 0]), NODE_PORT, Protocol::Tcp)
}

/// One local and one remote endpoint.
fn endpoints() -> Vec<Backend> {
    vec![backend("10.244.0.2", false), backend("10.244.1.2", true)]
}

/// `externalTrafficPolicy: Cluster`: one entry with every endpoint.
fn cluster_policy() -> DesiredState {
    desired([frontend(node_port(), FrontendKind::NodePort, endpoints())])
}

/// `externalTrafficPolicy: Local`: the external entry with the local endpoint, and the
/// in-cluster twin with every endpoint.
fn local_policy() -> DesiredState {
    let mut external = frontend(node_port(), FrontendKind::NodePort, vec![endpoints()[0]]);
    external.local_only = true;
    let internal = frontend(node_port().internal(), FrontendKind::NodePort, endpoints());
    desired([external, internal])
}

/// The number of backends an in-cluster client chooses from, as the datapath's `in_scope`
/// resolves it (the external master, or its in-cluster twin when the flag says so and
/// the twin is there).
fn in_cluster_choice(maps: &FakeMaps) -> Option<u16> {
    let external = maps.services.get(&node_port())?;
    if external.flags & lb_common::SVC_F_TWO_SCOPES != 0
        && let Some(internal) = maps.services.get(&node_port().internal())
    {
        return Some(internal.count);
    }
    Some(external.count)
}

/// In-cluster clients always choose among both endpoints once the Service is there.
fn in_cluster_sees_every_endpoint(maps: &FakeMaps) {
    if let Some(count) = in_cluster_choice(maps) {
        assert_eq!(
            count, 2,
            "an in-cluster client would choose among {count} endpoint(s), not both"
        );
    }
}

#[test]
fn switching_the_external_traffic_policy_never_narrows_in_cluster_clients() {
    let maps = FakeMaps {
        check: Some(in_cluster_sees_every_endpoint),
        ..FakeMaps::default()
    };
    let mut writer = MapWriter::adopt(maps).unwrap();
    writer.apply(&cluster_policy()).unwrap();
    // Cluster -> Local -> Cluster -> Local -> Cluster, checked after every single
    // operation: each is also what an agent killed there leaves until it restarts.
    for policy in [
        local_policy(),
        cluster_policy(),
        local_policy(),
        cluster_policy(),
    ] {
        writer.apply(&policy).unwrap();
        let adopted = MapWriter::adopt(writer.maps().clone()).unwrap();
        assert_eq!(
            dump::lines(&dump::read(adopted.maps()).unwrap()),
            dump::lines(&dump::read(writer.maps()).unwrap())
        );
    }
    assert_eq!(in_cluster_choice(writer.maps()), Some(2));
}

/// `maps` after a writer programmed the ClusterIP `web` with [`endpoints`].
fn with_web(maps: FakeMaps, web: L4Addr) -> FakeMaps {
    let mut writer = MapWriter::adopt(maps).unwrap();
    writer
        .apply(&desired([frontend(
            web,
            FrontendKind::ClusterIp,
            endpoints(),
        )]))
        .unwrap();
    writer.maps().clone()
}

#[test]
fn adoption_rewrites_a_master_whose_slots_are_missing_when_no_backend_is_wanted() {
    // A foreign writer left a master (count 2) whose second slot was never written.
    let web = L4Addr::new(IpAddr::from([10, 96, 0, 10]), 80, Protocol::Tcp);
    let mut maps = with_web(FakeMaps::default(), web);
    let second = maps.services[&web].slot_index(2);
    maps.slots.remove(&second);
    // The Service now has no endpoint: its connects must be refused (count 0), and the
    // master must never name a missing slot meanwhile (the fake checks each operation).
    let mut writer = MapWriter::adopt(maps).unwrap();
    writer
        .apply(&desired([frontend(web, FrontendKind::ClusterIp, vec![])]))
        .unwrap();
    let master = writer.maps().services.get(&web).copied().unwrap();
    assert_eq!(master.count, 0, "the adopted master kept its stale count");
    // And a fresh agent finds nothing to do.
    let mut fresh = MapWriter::adopt(writer.maps().clone()).unwrap();
    let stats = fresh
        .apply(&desired([frontend(web, FrontendKind::ClusterIp, vec![])]))
        .unwrap();
    assert!(stats.is_noop(), "{stats:?}");
}

#[test]
fn an_adopted_range_that_cannot_be_used_stays_reserved_while_its_master_names_it() {
    // A master naming slots 0..2 whose second slot names a backend that is gone (a foreign
    // writer's doing), in a slots array of 3. Its rewrite needs 2 free slots and may be
    // refused; until a new master stops naming 0..2, no other frontend may get them, not
    // even from a full array (which hands out retired ranges before their grace period).
    let web = L4Addr::new(IpAddr::from([10, 96, 0, 10]), 80, Protocol::Tcp);
    let mut maps = FakeMaps::default();
    maps.set_capacity(lb_common::SLOTS_MAP, 3);
    let mut maps = with_web(maps, web);
    let gone = maps.slots[&maps.services[&web].slot_index(2)].backend_id;
    maps.backends.retain(|&(_, id), _| id != gone);
    let mut writer = MapWriter::adopt(maps).unwrap();
    assert_eq!(writer.frontends[&web].owned_len(), 2);
    let later = std::time::Instant::now() + super::slot_ranges::GRACE;
    writer.slot_ranges.end_apply(later);
    assert_eq!(
        writer.slot_ranges.allocate(2, later),
        None,
        "0..2 is still named"
    );
    assert_eq!(writer.slot_ranges.allocate(1, later), Some(2));
}

#[test]
fn a_master_written_without_its_slots_is_never_adopted_as_complete() {
    // The master says 3 but no slot exists: the writer must not leave it so.
    let web = L4Addr::new(IpAddr::from([10, 96, 0, 10]), 80, Protocol::Tcp);
    let mut maps = FakeMaps::default();
    maps.services.insert(
        web,
        ServiceValue::master(3, 1, lb_common::SVC_F_CLUSTER_IP, 0),
    );
    let mut writer = MapWriter::adopt(maps).unwrap();
    writer
        .apply(&desired([frontend(web, FrontendKind::ClusterIp, vec![])]))
        .unwrap();
    assert_eq!(writer.maps().services.get(&web).unwrap().count, 0);
}

/// Twenty ClusterIP frontends behind the `externalTrafficPolicy: Local` NodePort twins;
/// `shift` moves each ClusterIP's local endpoint, and `count` drops the last frontends.
fn many_frontends(shift: u8, count: u8) -> DesiredState {
    let mut state = local_policy();
    for i in 0..count {
        let address = L4Addr::new(IpAddr::from([10, 96, 0, i]), 80, Protocol::Tcp);
        let local = backend(&format!("10.244.0.{}", 10 + i + shift), false);
        let f = frontend(
            address,
            FrontendKind::ClusterIp,
            vec![local, endpoints()[1]],
        );
        state.insert(address, Arc::new(f));
    }
    state
}

#[test]
fn a_large_apply_written_as_it_is_planned_ends_as_one_written_at_once() {
    // A large apply writes its upserts every `flush_every` planned operations. Whatever
    // the chunk size, every single operation leaves the maps consistent (the fake checks
    // masters, slots and backends, and that an in-cluster client of the NodePort always
    // has both endpoints: its twins are never written apart), and the maps end as those
    // of one write at the end.
    let states = [
        many_frontends(0, 20),
        many_frontends(1, 15),
        many_frontends(1, 20),
    ];
    let maps = FakeMaps {
        check: Some(in_cluster_sees_every_endpoint),
        ..FakeMaps::default()
    };
    let mut whole = MapWriter::adopt(maps.clone()).unwrap();
    let written: Vec<_> = states
        .iter()
        .map(|state| {
            whole.apply(state).unwrap();
            dump::lines(&dump::read(whole.maps()).unwrap())
        })
        .collect();
    for flush_every in 1..=12 {
        let mut chunked = MapWriter::adopt(maps.clone()).unwrap();
        chunked.flush_every = flush_every;
        for (state, expected) in states.iter().zip(&written) {
            chunked.apply(state).unwrap();
            assert_eq!(
                &dump::lines(&dump::read(chunked.maps()).unwrap()),
                expected,
                "flush_every = {flush_every}"
            );
        }
        assert_eq!(chunked.maps().operations, whole.maps().operations);
    }
}
