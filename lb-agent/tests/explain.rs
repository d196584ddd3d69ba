//! `lb-agent explain`: what the datapath does for a frontend and why, with the objects
//! that produced each entry — for a ClusterIP, a NodePort with
//! `externalTrafficPolicy: Local`, and a Service without endpoints.
use std::{sync::Arc, time::Instant};

use lb_agent::{
    explain::{Target, explain, render},
    maps::fake::FakeMaps,
    reconcile::{Reconciler, SyncKind},
    source::change::{Change, Object},
};

fn apply(reconciler: &mut Reconciler<FakeMaps>, json: serde_json::Value) {
    let object = match json["kind"].as_str() {
        Some("Service") => Object::Service(Box::new(serde_json::from_value(json).unwrap())),
        _ => Object::EndpointSlice(Box::new(serde_json::from_value(json).unwrap())),
    };
    reconciler.apply(Change::Apply {
        origin: Arc::from("api"),
        object,
    });
}

fn slice(name: &str, service: &str, rv: &str, endpoints: &[(&str, &str)]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(ip, node)| {
            serde_json::json!({
                "addresses": [ip], "conditions": {"ready": true}, "nodeName": node, "zone": "z1",
            })
        })
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "default", "resourceVersion": rv,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn cluster() -> Reconciler<FakeMaps> {
    let mut reconciler = Reconciler::on_fake_maps(Some("node-a".into()));
    apply(
        &mut reconciler,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "resourceVersion": "101"},
            "spec": {
                "clusterIP": "10.96.0.10", "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        }),
    );
    apply(
        &mut reconciler,
        slice(
            "web-abc",
            "web",
            "102",
            &[("10.244.0.2", "node-a"), ("10.244.1.2", "node-b")],
        ),
    );
    apply(
        &mut reconciler,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "shop", "namespace": "default", "resourceVersion": "201"},
            "spec": {
                "type": "NodePort", "clusterIP": "10.96.0.20", "externalTrafficPolicy": "Local",
                "selector": {"app": "shop"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
            },
        }),
    );
    apply(
        &mut reconciler,
        slice(
            "shop-xyz",
            "shop",
            "205",
            &[("10.244.0.7", "node-a"), ("10.244.1.7", "node-b")],
        ),
    );
    apply(
        &mut reconciler,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "empty", "namespace": "default", "resourceVersion": "301"},
            "spec": {
                "clusterIP": "10.96.0.30", "selector": {"app": "none"},
                "ports": [{"port": 80}],
            },
        }),
    );
    reconciler.sync(SyncKind::Full, Instant::now()).unwrap();
    reconciler
}

fn text(reconciler: &Reconciler<FakeMaps>, target: &str, from: Option<&str>) -> String {
    let target: Target = target.parse().unwrap();
    let from = from.map(|f| f.parse().unwrap());
    let explanation = explain(reconciler.state(), target, from);
    render(&explanation, &|_| None)
}

#[track_caller]
fn assert_lines(text: &str, want: &[&str]) {
    for line in want {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(line)),
            "no line starting with {line:?} in:\n{text}"
        );
    }
}

#[test]
fn a_cluster_ip_names_its_backends_policies_and_objects() {
    let reconciler = cluster();
    let out = text(&reconciler, "10.96.0.10:80", Some("10.244.0.9"));
    assert_lines(
        &out,
        &[
            "10.96.0.10:80/TCP (ClusterIp, Service default/web port http)",
            "for:      every client",
            "outcome:  one of 2 backend(s), slot k of 2 chosen at random per connection from 10.244.0.9",
            "policy:   internalTrafficPolicy: Cluster: endpoints on every node",
            "policy:   sessionAffinity: None",
            "backend:  slot 1 10.244.0.2:8080/TCP Ready [node node-a, zone z1] from web-abc",
            "backend:  slot 2 10.244.1.2:8080/TCP Ready [node node-b, zone z1, another node: SNAT when reached from outside] from web-abc",
            "made by:  Service default/web (resourceVersion 101)",
            "EndpointSlice default/web-abc (resourceVersion 102)",
            "written:  20",
        ],
    );
    // The next update of the slice is what the next explanation names.
    let mut reconciler = reconciler;
    apply(
        &mut reconciler,
        slice("web-abc", "web", "103", &[("10.244.0.2", "node-a")]),
    );
    reconciler.sync(SyncKind::Changes, Instant::now()).unwrap();
    let out = text(&reconciler, "10.96.0.10:80/tcp", None);
    assert_lines(
        &out,
        &[
            "EndpointSlice default/web-abc (resourceVersion 103)",
            "outcome:  one of 1 backend(s)",
        ],
    );
}

#[test]
fn a_node_port_with_external_traffic_policy_local_has_two_entries() {
    let reconciler = cluster();
    // Any node address: the NodePort's entries (outside clients: local endpoints only).
    let out = text(&reconciler, "192.168.1.10:30080/TCP", Some("203.0.113.5"));
    assert_lines(
        &out,
        &[
            "0.0.0.0:30080/TCP (NodePort, Service default/shop port http)",
            "for:      clients outside the cluster (tc on the external devices)",
            "policy:   externalTrafficPolicy: Local: only this node's endpoints, the client's address kept (no SNAT)",
            "outcome:  one of 1 backend(s)",
            "backend:  slot 1 10.244.0.7:8080/TCP Ready [node node-a, zone z1] from shop-xyz",
            "0.0.0.0:30080/TCP (in-cluster) (NodePort, Service default/shop port http)",
            "for:      clients inside the cluster",
            "policy:   externalTrafficPolicy: Local applies to clients outside the cluster only",
            "backend:  slot 2 10.244.1.7:8080/TCP Ready [node node-b, zone z1, another node: SNAT when reached from outside] from shop-xyz",
            "made by:  Service default/shop (resourceVersion 201)",
            "EndpointSlice default/shop-xyz (resourceVersion 205)",
        ],
    );
    let outside = out.split("(in-cluster)").next().unwrap();
    assert!(
        !outside.contains("10.244.1.7"),
        "the remote endpoint is not used from outside:\n{out}"
    );
}

#[test]
fn a_service_without_endpoints_is_refused() {
    let reconciler = cluster();
    let out = text(&reconciler, "10.96.0.30:80/TCP", None);
    assert_lines(
        &out,
        &[
            "10.96.0.30:80/TCP (ClusterIp, Service default/empty)",
            "outcome:  refused: no endpoints (ECONNREFUSED at connect(), ICMP port unreachable from tc)",
            "made by:  Service default/empty (resourceVersion 301)",
        ],
    );
    assert!(!out.contains("backend:"), "{out}");
    let none = text(&reconciler, "10.96.0.99:80/TCP", None);
    assert!(none.contains("no Service frontend"), "{none}");
}
