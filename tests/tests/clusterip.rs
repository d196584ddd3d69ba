//! A ClusterIP Service reaches its pods, from inside the agent's cgroup only, without SNAT.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerPort};
use lb_tests::manifests::{pod, service, to_yaml};
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

/// Upstream `should serve multiport endpoints from pods` (conformance): two named Service
/// ports whose named target ports only one pod each exposes.
#[test]
fn each_named_port_of_a_multiport_service_reaches_the_pod_exposing_it() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pod1 = env.topo.add_pod("pod1");
    let pod2 = env.topo.add_pod("pod2");
    let _server1 = pod1.spawn_server("pod1", 100);
    let _server2 = pod2.spawn_server("pod2", 101);
    for (p, name, port) in [(&pod1, "svc1", 100), (&pod2, "svc2", 101)] {
        env.manifests.write(
            &format!("pod-{}.yaml", p.name()),
            &pod(p.name(), p.ip())
                .label("app", "multi")
                .container_port(name, port)
                .yaml(),
        );
    }
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-multi.yaml",
        &service("multi-endpoint-test", "10.96.0.10")
            .selector("app", "multi")
            .port_full(Some("portname1"), 80, "svc1", "TCP")
            .port_full(Some("portname2"), 81, "svc2", "TCP")
            .yaml(),
    );
    let mut agent = env.agent();
    let port1 = agent.wait_for_frontend(VIP, 1, APPLY);
    let port2 = agent.wait_for_frontend("10.96.0.10:81", 1, APPLY);
    assert_eq!(port1.backend_addrs(), [format!("{}:100", pod1.ip())]);
    assert_eq!(port2.backend_addrs(), [format!("{}:101", pod2.ip())]);

    let on_80 = client.client(&env.cgroup, VIP, 10);
    let on_81 = client.client(&env.cgroup, "10.96.0.10:81", 10);

    assert_eq!(on_80.count("pod1"), 10, "{on_80:?}");
    assert_eq!(on_81.count("pod2"), 10, "{on_81:?}");
}

/// Upstream `should be updated after adding or deleting ports `: a port added to a Service
/// answers, and a port removed from it is no longer translated while the other stays.
#[test]
fn ports_added_to_and_removed_from_a_service_follow_the_service() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web = env.topo.add_pod("webapp1");
    let _http = web.spawn_server("webapp1", 8080);
    let _metrics = web.spawn_server("webapp1-metrics", 9090);
    env.manifests.write(
        "pod-webapp1.yaml",
        &pod("webapp1", web.ip())
            .label("app", "webapp")
            .container_port("http", 8080)
            .container_port("metrics", 9090)
            .yaml(),
    );
    let client = env.topo.add_pod("client");
    let one_port = service("webapp", "10.96.0.10")
        .selector("app", "webapp")
        .port_full(Some("http"), 80, "http", "TCP");
    env.manifests.write("svc-webapp.yaml", &one_port.yaml());
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 3).count("webapp1"), 3);

    let two_ports = one_port.port_full(Some("metrics"), 81, "metrics", "TCP");
    env.manifests.write("svc-webapp.yaml", &two_ports.yaml());
    agent.wait_for_frontend("10.96.0.10:81", 1, APPLY);
    let added = client.client(&env.cgroup, "10.96.0.10:81", 5);
    assert_eq!(added.count("webapp1-metrics"), 5, "{added:?}");

    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port_full(Some("metrics"), 81, "metrics", "TCP")
            .yaml(),
    );
    agent.wait_for_no_frontend(VIP, APPLY);
    let removed = client
        .client_with()
        .cgroup(&env.cgroup)
        .count(2)
        .timeout_ms(300)
        .run(VIP);
    let kept = client.client(&env.cgroup, "10.96.0.10:81", 5);

    assert_eq!(removed.ok, 0, "the removed port answers: {removed:?}");
    assert!(
        removed
            .errors
            .keys()
            .all(|e| matches!(e.as_str(), "ETIMEDOUT" | "ENETUNREACH" | "EHOSTUNREACH")),
        "the removed port is not translated any more: {removed:?}"
    );
    assert_eq!(kept.count("webapp1-metrics"), 5, "{kept:?}");
}

/// Upstream `should allow pods to hairpin back to themselves through services`: the only
/// backend of a Service dials the Service's ClusterIP and reaches itself.
#[test]
fn a_pod_reaches_itself_through_its_own_service() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.add_backend("webapp1", "webapp", 8080);
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);

    let summary = web1.pod.client(&env.cgroup, VIP, 5);

    assert_eq!(summary.count("webapp1"), 5, "{summary:?}");
    assert_eq!(summary.peers(), BTreeSet::from([VIP]), "{summary:?}");
}

/// Upstream `should connect to the ports exposed by restartable init containers`: the server
/// runs in a sidecar (an init container with `restartPolicy: Always`, the pod's only port)
/// and the Service's numeric targetPort reaches it.
#[test]
fn a_numeric_target_port_reaches_a_server_in_a_restartable_init_container() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web = env.topo.add_pod("webapp1");
    let _server = web.spawn_server("webapp1", 8080);
    let client = env.topo.add_pod("client");
    let mut p = pod("webapp1", web.ip()).label("app", "webapp").build();
    p.spec.as_mut().unwrap().init_containers = Some(vec![k8s_openapi::api::core::v1::Container {
        name: "sidecar".to_owned(),
        image: Some("lb-testkit".to_owned()),
        restart_policy: Some("Always".to_owned()),
        ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            name: Some("http".to_owned()),
            container_port: 8080,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        ..Default::default()
    }]);
    env.manifests
        .write("pod-webapp1.yaml", &lb_tests::manifests::to_yaml(&p));
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);

    let summary = client.client(&env.cgroup, VIP, 5);

    assert_eq!(summary.count("webapp1"), 5, "{summary:?}");
}

/// Upstream `should connect to the named ports exposed by restartable init containers`.
#[test]
fn a_named_port_of_a_restartable_init_container_is_resolved() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web = env.topo.add_pod("webapp1");
    let _server = web.spawn_server("webapp1", 8080);
    let client = env.topo.add_pod("client");
    let mut p = pod("webapp1", web.ip()).label("app", "webapp").build();
    p.spec.as_mut().unwrap().init_containers = Some(vec![Container {
        name: "sidecar".to_owned(),
        image: Some("lb-testkit".to_owned()),
        restart_policy: Some("Always".to_owned()),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: 8080,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        ..Container::default()
    }]);
    env.manifests.write("pod.yaml", &to_yaml(&p));
    env.manifests.write(
        "svc.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port_full(Some("http"), 80, "http", "TCP")
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    let summary = client.client(&env.cgroup, VIP, 5);
    assert_eq!(summary.count("webapp1"), 5, "{summary:?}");
}
