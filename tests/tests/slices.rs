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

/// Upstream `should support a Service with multiple ports specified in multiple
/// EndpointSlices` (conformance): a Service without selector, ports 80 and 81, and one slice
/// per port for the same pod address (8090 and 9090).
#[test]
fn each_port_of_a_service_takes_its_own_slice_for_the_same_pod() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web = env.topo.add_pod("webapp1");
    let _on_8090 = web.spawn_server("webapp1-8090", 8090);
    let _on_9090 = web.spawn_server("webapp1-9090", 9090);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-example.yaml",
        &service("example-custom-endpoints", "10.96.0.10")
            .port_full(Some("example-port-80"), 80, 8090, "TCP")
            .port_full(Some("example-port-81"), 81, 9090, "TCP")
            .yaml(),
    );
    for (slice, port_name, port) in [
        ("e2e-custom-slice-1", "example-port-80", 8090),
        ("e2e-custom-slice-2", "example-port-81", 9090),
    ] {
        env.manifests.write(
            &format!("{slice}.yaml"),
            &endpoint_slice(slice, "example-custom-endpoints")
                .endpoint(web.ip(), true)
                .port(Some(port_name), port, "TCP")
                .yaml(),
        );
    }
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    agent.wait_for_frontend("10.96.0.10:81", 1, APPLY);

    let on_80 = client.client(&env.cgroup, VIP, 10);
    let on_81 = client.client(&env.cgroup, "10.96.0.10:81", 10);

    assert_eq!(on_80.count("webapp1-8090"), 10, "{on_80:?}");
    assert_eq!(on_81.count("webapp1-9090"), 10, "{on_81:?}");
}

/// Upstream `should support a Service with multiple endpoint IPs specified in multiple
/// EndpointSlices` (conformance): two slices with different pod addresses, both on port 8090
/// under different port names; port 80 reaches only the first pod, port 81 only the second.
#[test]
fn each_port_of_a_service_reaches_only_the_addresses_of_its_own_slice() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pod1 = env.topo.add_pod("pod1");
    let pod2 = env.topo.add_pod("pod2");
    let _server1 = pod1.spawn_server("pod1", 8090);
    let _server2 = pod2.spawn_server("pod2", 8090);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-example.yaml",
        &service("example-custom-endpoints", "10.96.0.10")
            .port_full(Some("example-port-80"), 80, 8090, "TCP")
            .port_full(Some("example-port-81"), 81, 8090, "TCP")
            .yaml(),
    );
    for (slice, p, port_name) in [
        ("e2e-custom-slice-1", &pod1, "example-port-80"),
        ("e2e-custom-slice-2", &pod2, "example-port-81"),
    ] {
        env.manifests.write(
            &format!("{slice}.yaml"),
            &endpoint_slice(slice, "example-custom-endpoints")
                .endpoint(p.ip(), true)
                .port(Some(port_name), 8090, "TCP")
                .yaml(),
        );
    }
    let mut agent = env.agent();
    let port80 = agent.wait_for_frontend(VIP, 1, APPLY);
    let port81 = agent.wait_for_frontend("10.96.0.10:81", 1, APPLY);
    assert_eq!(port80.backend_addrs(), [format!("{}:8090", pod1.ip())]);
    assert_eq!(port81.backend_addrs(), [format!("{}:8090", pod2.ip())]);

    let on_80 = client.client(&env.cgroup, VIP, 10);
    let on_81 = client.client(&env.cgroup, "10.96.0.10:81", 10);

    assert_eq!(on_80.count("pod1"), 10, "{on_80:?}");
    assert_eq!(on_81.count("pod2"), 10, "{on_81:?}");
}
