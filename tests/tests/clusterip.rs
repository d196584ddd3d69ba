//! A ClusterIP Service reaches its pods, from inside the agent's cgroup only, without SNAT.

use std::collections::BTreeSet;
use std::time::Duration;

use lb_tests::manifests::{pod, service};
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";

#[test]
fn cluster_ip_reaches_both_backend_pods() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 2, APPLY);

    let summary = client.client(&env.cgroup, VIP, 40);

    assert_eq!(summary.ok, 40, "every connection answered: {summary:?}");
    assert_eq!(
        summary.host_names(),
        ["webapp1", "webapp2"],
        "both pods reached: {:?}",
        summary.hosts
    );
}

#[test]
fn service_port_is_translated_to_a_numeric_target_port() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // The pod listens on 8080 only; the Service is on port 80.
    let web = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    let frontend = agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(
        frontend.backend_addrs(),
        [format!("{}:8080", web.pod.ip())],
        "services output"
    );

    let summary = client.client(&env.cgroup, VIP, 10);

    assert_eq!(summary.ok, 10, "{summary:?}");
    assert_eq!(summary.count("webapp1"), 10, "{summary:?}");
}

#[test]
fn named_target_port_is_resolved_per_pod_from_its_container_port() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // Two pods whose container port named "web" has different numbers.
    let pod_a = env.topo.add_pod("web-a");
    let pod_b = env.topo.add_pod("web-b");
    let _server_a = pod_a.spawn_server("web-a", 8080);
    let _server_b = pod_b.spawn_server("web-b", 9090);
    for (p, port) in [(&pod_a, 8080), (&pod_b, 9090)] {
        env.manifests.write(
            &format!("pod-{}.yaml", p.name()),
            &pod(p.name(), p.ip())
                .label("app", "web")
                .container_port("metrics", 9100)
                .container_port("web", port)
                .yaml(),
        );
    }
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-web.yaml",
        &service("web", "10.96.0.10")
            .selector("app", "web")
            .port_full(Some("http"), 80, "web", "TCP")
            .yaml(),
    );
    let mut agent = env.agent();
    let frontend = agent.wait_for_frontend(VIP, 2, APPLY);
    assert_eq!(
        frontend.backend_addrs(),
        [
            format!("{}:8080", pod_a.ip()),
            format!("{}:9090", pod_b.ip())
        ],
        "services output: targetPort \"web\" resolved per pod"
    );

    let summary = client.client(&env.cgroup, VIP, 40);

    assert_eq!(summary.ok, 40, "{summary:?}");
    assert_eq!(summary.host_names(), ["web-a", "web-b"], "{summary:?}");
}

#[test]
fn backend_sees_the_client_pod_address() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 2, APPLY);

    let summary = client.client(&env.cgroup, VIP, 20);

    assert_eq!(summary.ok, 20, "{summary:?}");
    let seen: BTreeSet<&str> = summary
        .remote_addrs
        .iter()
        .map(|a| a.rsplit_once(':').map_or(a.as_str(), |(ip, _)| ip))
        .collect();
    assert_eq!(
        seen,
        BTreeSet::from([client.ip().to_string().as_str()]),
        "no SNAT: X-Remote-Addr is the client pod's own address"
    );
}

#[test]
fn process_outside_the_cgroup_is_not_translated() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);

    // Same pod namespace; one client inside the agent's cgroup, one outside it.
    let inside = client.client(&env.cgroup, VIP, 5);
    let outside = client.client_with().count(3).timeout_ms(300).run(VIP);

    assert_eq!(inside.ok, 5, "inside the cgroup: {inside:?}");
    assert_eq!(
        outside.ok, 0,
        "outside the cgroup the ClusterIP must stay untranslated: {outside:?}"
    );
    assert!(outside.hosts.is_empty(), "{outside:?}");
    assert_eq!(
        outside.errors_of("ECONNREFUSED"),
        0,
        "nothing of the agent's answers outside its cgroup: {outside:?}"
    );
}
