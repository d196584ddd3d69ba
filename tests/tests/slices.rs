//! A Service with several EndpointSlices (label `kubernetes.io/service-name`): their endpoints
//! are merged without duplicates, and a named target port is resolved in each slice on its own.

use std::collections::BTreeSet;
use std::time::Duration;

use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";

#[test]
fn named_port_maps_to_a_different_number_in_each_slice() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // Mid-rollout: the old pods serve "http" on 8080, the new ones on 9090.
    let old = env.topo.add_pod("webapp-old");
    let new = env.topo.add_pod("webapp-new");
    let _old_server = old.spawn_server("webapp-old", 8080);
    let _new_server = new.spawn_server("webapp-new", 9090);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port_full(Some("http"), 80, "http", "TCP")
            .yaml(),
    );
    env.manifests.write(
        "slice-webapp-old.yaml",
        &endpoint_slice("webapp-old", "webapp")
            .endpoint(old.ip(), true)
            .port(Some("http"), 8080, "TCP")
            .yaml(),
    );
    env.manifests.write(
        "slice-webapp-new.yaml",
        &endpoint_slice("webapp-new", "webapp")
            .endpoint(new.ip(), true)
            .port(Some("http"), 9090, "TCP")
            .yaml(),
    );
    let mut agent = env.agent();
    let frontend = agent.wait_for_frontend(VIP, 2, APPLY);
    assert_eq!(
        frontend.backend_addrs(),
        [format!("{}:8080", old.ip()), format!("{}:9090", new.ip())],
        "each slice's own number for port \"http\""
    );

    let summary = client.client(&env.cgroup, VIP, 40);

    assert_eq!(summary.ok, 40, "{summary:?}");
    assert_eq!(
        summary.host_names(),
        ["webapp-new", "webapp-old"],
        "{summary:?}"
    );
}

#[test]
fn endpoints_of_several_slices_are_merged_without_duplicates() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods: Vec<_> = ["webapp1", "webapp2", "webapp3"]
        .into_iter()
        .map(|name| {
            let p = env.topo.add_pod(name);
            let server = p.spawn_server(name, 8080);
            (p, server)
        })
        .collect();
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    // webapp2 is in both slices (as while the controller moves an endpoint between slices).
    env.manifests.write(
        "slice-webapp-a.yaml",
        &endpoint_slice("webapp-aaaaa", "webapp")
            .endpoint(pods[0].0.ip(), true)
            .endpoint(pods[1].0.ip(), true)
            .port(None, 8080, "TCP")
            .yaml(),
    );
    env.manifests.write(
        "slice-webapp-b.yaml",
        &endpoint_slice("webapp-bbbbb", "webapp")
            .endpoint(pods[1].0.ip(), true)
            .endpoint(pods[2].0.ip(), true)
            .port(None, 8080, "TCP")
            .yaml(),
    );
    // A slice of another Service in the same namespace does not count.
    env.manifests.write(
        "slice-other.yaml",
        &endpoint_slice("other-ccccc", "other")
            .endpoint(client.ip(), true)
            .port(None, 8080, "TCP")
            .yaml(),
    );
    let mut agent = env.agent();
    let frontend = agent.wait_for_frontend(VIP, 3, APPLY);
    let expected: Vec<String> = pods
        .iter()
        .map(|(p, _)| format!("{}:8080", p.ip()))
        .collect();
    assert_eq!(frontend.backend_addrs(), expected, "{frontend:?}");
    assert_eq!(frontend.count, 3, "webapp2 counted once: {frontend:?}");
    let ids: BTreeSet<u32> = frontend.backends.iter().map(|b| b.backend_id).collect();
    assert_eq!(ids.len(), 3, "one backend id each: {frontend:?}");

    let summary = client.client(&env.cgroup, VIP, 60);

    assert_eq!(summary.ok, 60, "{summary:?}");
    assert_eq!(
        summary.host_names(),
        ["webapp1", "webapp2", "webapp3"],
        "{summary:?}"
    );

    // Dropping one slice leaves the other's endpoints, webapp2 included.
    env.manifests.remove("slice-webapp-a.yaml");
    let frontend = agent.wait_for_frontend(VIP, 2, APPLY);
    assert_eq!(frontend.backend_addrs(), expected[1..].to_vec());
    let after = client.client(&env.cgroup, VIP, 40);
    assert_eq!(after.host_names(), ["webapp2", "webapp3"], "{after:?}");
}
