//! kube-proxy's `topology_test.go` cases as a table: endpoints and policies in, the cluster
//! and local endpoint lists and `has_any` out.
use super::*;
use crate::model::Protocol;

/// An endpoint: `conditions` holds `R` (ready), `S` (serving), `T` (terminating); `node`
/// is its `nodeName` ("" for none); hints as comma lists ("" for none).
fn ep(ip: &str, conditions: &str, node: &str, zones: &str, nodes: &str) -> Candidate {
    let set = |list: &str| -> BTreeSet<String> {
        list.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    Candidate {
        addr: L4Addr::new(ip.parse::<std::net::IpAddr>().unwrap(), 80, Protocol::Tcp),
        ready: conditions.contains('R'),
        serving: conditions.contains('S'),
        terminating: conditions.contains('T'),
        info: std::sync::Arc::new(EndpointInfo {
            source: crate::model::EndpointSource::default(),
            node_name: (!node.is_empty()).then(|| node.into()),
            zone: None,
        }),
        hints: Hints {
            zones: set(zones),
            nodes: set(nodes),
        },
    }
}

const CLUSTER: Policies = Policies {
    internal_local: false,
    external_local: false,
    externally_accessible: false,
};
const INTERNAL_LOCAL: Policies = Policies {
    internal_local: true,
    external_local: false,
    externally_accessible: false,
};
const EXTERNAL_LOCAL: Policies = Policies {
    internal_local: false,
    external_local: true,
    externally_accessible: true,
};
const BOTH_LOCAL: Policies = Policies {
    internal_local: true,
    external_local: true,
    externally_accessible: true,
};

fn list(endpoints: &[&Candidate]) -> String {
    let ips: Vec<String> = endpoints
        .iter()
        .map(|e| e.addr.address.to_string())
        .collect();
    ips.join(",")
}

/// (name, policies, endpoints, cluster, local, has_any).
type Case = (
    &'static str,
    Policies,
    Vec<Candidate>,
    &'static str,
    &'static str,
    bool,
);

#[test]
fn categorize_endpoints_table() {
    // (name, policies, endpoints, cluster, local, has_any); this node is "n1" in zone "z1".
    let cases: Vec<Case> = vec![
        ("no endpoints", CLUSTER, vec![], "", "", false),
        (
            "cluster: every ready endpoint, not-ready ones never",
            CLUSTER,
            vec![
                ep("10.0.0.1", "RS", "n1", "", ""),
                ep("10.0.0.2", "RS", "n2", "", ""),
                ep("10.0.0.3", "", "n2", "", ""),
            ],
            "10.0.0.1,10.0.0.2",
            "",
            true,
        ),
        (
            "cluster: ready beats serving terminating",
            CLUSTER,
            vec![
                ep("10.0.0.1", "RS", "n2", "", ""),
                ep("10.0.0.2", "ST", "n1", "", ""),
            ],
            "10.0.0.1",
            "",
            true,
        ),
        (
            "cluster: falls back to serving terminating when nothing is ready",
            CLUSTER,
            vec![
                ep("10.0.0.1", "ST", "n2", "", ""),
                ep("10.0.0.2", "T", "n1", "", ""),
                ep("10.0.0.3", "", "n1", "", ""),
            ],
            "10.0.0.1",
            "",
            true,
        ),
        (
            "cluster: terminating and not serving is nothing",
            CLUSTER,
            vec![ep("10.0.0.1", "T", "n1", "", "")],
            "",
            "",
            false,
        ),
        (
            "zone hints for this zone narrow the cluster endpoints",
            CLUSTER,
            vec![
                ep("10.0.0.1", "RS", "n1", "z1", ""),
                ep("10.0.0.2", "RS", "n2", "z2", ""),
                ep("10.0.0.3", "RS", "n3", "z1", ""),
            ],
            "10.0.0.1,10.0.0.3",
            "",
            true,
        ),
        (
            "zone hints ignored when one ready endpoint has none",
            CLUSTER,
            vec![
                ep("10.0.0.1", "RS", "n1", "z1", ""),
                ep("10.0.0.2", "RS", "n2", "", ""),
            ],
            "10.0.0.1,10.0.0.2",
            "",
            true,
        ),
        (
            "zone hints ignored when none is for this zone",
            CLUSTER,
            vec![
                ep("10.0.0.1", "RS", "n1", "z2", ""),
                ep("10.0.0.2", "RS", "n2", "z3", ""),
            ],
            "10.0.0.1,10.0.0.2",
            "",
            true,
        ),
        (
            "hints of not-ready endpoints do not count",
            CLUSTER,
            vec![
                ep("10.0.0.1", "RS", "n1", "z1", ""),
                ep("10.0.0.2", "RS", "n2", "z2", ""),
                ep("10.0.0.3", "", "n3", "", ""),
            ],
            "10.0.0.1",
            "",
            true,
        ),
        (
            "node hints for this node win over zone hints",
            CLUSTER,
            vec![
                ep("10.0.0.1", "RS", "n1", "z1", "n1"),
                ep("10.0.0.2", "RS", "n2", "z1", "n2"),
            ],
            "10.0.0.1",
            "",
            true,
        ),
        (
            "node hints for other nodes fall back to zone hints",
            CLUSTER,
            vec![
                ep("10.0.0.1", "RS", "n2", "z1", "n2"),
                ep("10.0.0.2", "RS", "n3", "z2", "n3"),
            ],
            "10.0.0.1",
            "",
            true,
        ),
        (
            "topology is not used for the terminating fallback",
            CLUSTER,
            vec![
                ep("10.0.0.1", "ST", "n2", "z2", ""),
                ep("10.0.0.2", "ST", "n1", "z1", ""),
            ],
            "10.0.0.1,10.0.0.2",
            "",
            true,
        ),
        (
            "internal Local: only this node's ready endpoints, no cluster list",
            INTERNAL_LOCAL,
            vec![
                ep("10.0.0.1", "RS", "n1", "", ""),
                ep("10.0.0.2", "RS", "n2", "", ""),
                ep("10.0.0.3", "ST", "n1", "", ""),
            ],
            "",
            "10.0.0.1",
            true,
        ),
        (
            "internal Local: this node's serving terminating ones when none here is ready",
            INTERNAL_LOCAL,
            vec![
                ep("10.0.0.1", "ST", "n1", "", ""),
                ep("10.0.0.2", "RS", "n2", "", ""),
            ],
            "",
            "10.0.0.1",
            true,
        ),
        (
            "internal Local: none on this node, some elsewhere",
            INTERNAL_LOCAL,
            vec![ep("10.0.0.2", "RS", "n2", "", "")],
            "",
            "",
            true,
        ),
        (
            "internal Local: only serving terminating elsewhere still counts as some",
            INTERNAL_LOCAL,
            vec![ep("10.0.0.2", "ST", "n2", "", "")],
            "",
            "",
            true,
        ),
        (
            "internal Local: none anywhere",
            INTERNAL_LOCAL,
            vec![
                ep("10.0.0.2", "T", "n2", "", ""),
                ep("10.0.0.1", "", "n1", "", ""),
            ],
            "",
            "",
            false,
        ),
        (
            "external Local: cluster list for in-cluster clients, local list for outside",
            EXTERNAL_LOCAL,
            vec![
                ep("10.0.0.1", "RS", "n1", "", ""),
                ep("10.0.0.2", "RS", "n2", "", ""),
            ],
            "10.0.0.1,10.0.0.2",
            "10.0.0.1",
            true,
        ),
        (
            "external Local: ready elsewhere, only terminating here",
            EXTERNAL_LOCAL,
            vec![
                ep("10.0.0.1", "ST", "n1", "", ""),
                ep("10.0.0.2", "RS", "n2", "", ""),
            ],
            "10.0.0.2",
            "10.0.0.1",
            true,
        ),
        (
            "both Local on an external Service: cluster endpoints still for the short-circuit",
            BOTH_LOCAL,
            vec![
                ep("10.0.0.1", "RS", "n2", "", ""),
                ep("10.0.0.2", "RS", "n3", "", ""),
            ],
            "10.0.0.1,10.0.0.2",
            "",
            true,
        ),
        (
            "an endpoint without a nodeName is never local",
            INTERNAL_LOCAL,
            vec![ep("10.0.0.1", "RS", "", "", "")],
            "",
            "",
            true,
        ),
    ];
    let node = NodeTopology {
        name: Some("n1"),
        zone: Some("z1"),
    };
    for (name, policies, endpoints, cluster, local, has_any) in &cases {
        let got = categorize(endpoints, *policies, node);
        assert_eq!(list(&got.cluster), *cluster, "{name}: cluster");
        assert_eq!(list(&got.local), *local, "{name}: local");
        assert_eq!(got.has_any, *has_any, "{name}: has_any");
    }
}

#[test]
fn without_a_zone_or_node_name_topology_is_off() {
    let endpoints = vec![
        ep("10.0.0.1", "RS", "n1", "z1", "n1"),
        ep("10.0.0.2", "RS", "n2", "z2", "n2"),
    ];
    let got = categorize(&endpoints, CLUSTER, NodeTopology::default());
    assert_eq!(got.topology, TopologyMode::None);
    assert_eq!(list(&got.cluster), "10.0.0.1,10.0.0.2");
    let zone_only = NodeTopology {
        name: None,
        zone: Some("z2"),
    };
    let got = categorize(&endpoints, CLUSTER, zone_only);
    assert_eq!(got.topology, TopologyMode::PreferSameZone);
    assert_eq!(list(&got.cluster), "10.0.0.2");
}
