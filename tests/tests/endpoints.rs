//! Where a Service's endpoints come from: Ready pods of its namespace, or its EndpointSlices.

use std::time::{Duration, Instant};

use lb_tests::manifests::{endpoint_slice, pod, service};
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";

#[test]
fn service_without_endpoints_refuses_at_once() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-empty.yaml",
        &service("empty", "10.96.0.10")
            .selector("app", "nothing-matches")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.assert_running();

    // Wait until the agent answers for the Service (it may still be loading).
    let deadline = Instant::now() + APPLY;
    loop {
        let probe = client
            .client_with()
            .cgroup(&env.cgroup)
            .timeout_ms(300)
            .run(VIP);
        if probe.errors_of("ECONNREFUSED") == 1 {
            break;
        }
        agent.assert_running();
        assert!(
            Instant::now() < deadline,
            "no ECONNREFUSED within {APPLY:?}; last: {probe:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let summary = client.client(&env.cgroup, VIP, 5);

    assert_eq!(summary.errors_of("ECONNREFUSED"), 5, "{summary:?}");
    assert!(
        summary.connect_ms.iter().all(|ms| *ms < 100.0),
        "refused at once, not after a timeout: connect_ms {:?}",
        summary.connect_ms
    );
}

#[test]
fn pods_of_another_namespace_are_not_selected() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web = env.add_backend("webapp1", "webapp", 8080);
    // Same labels and port, namespace "other".
    let intruder = env.topo.add_pod("intruder");
    let _intruder_server = intruder.spawn_server("intruder", 8080);
    env.manifests.write(
        "pod-intruder.yaml",
        &pod("intruder", intruder.ip())
            .namespace("other")
            .label("app", "webapp")
            .container_port("http", 8080)
            .yaml(),
    );
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    // The same Service in "other" selects the intruder: the agent did read that pod.
    env.manifests.write(
        "svc-webapp-other.yaml",
        &service("webapp", "10.96.0.11")
            .namespace("other")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    let default_fe = agent.wait_for_frontend(VIP, 1, APPLY);
    let other_fe = agent.wait_for_frontend("10.96.0.11:80", 1, APPLY);
    assert_eq!(
        default_fe.backend_addrs(),
        [format!("{}:8080", web.pod.ip())]
    );
    assert_eq!(
        other_fe.backend_addrs(),
        [format!("{}:8080", intruder.ip())]
    );

    let summary = client.client(&env.cgroup, VIP, 20);
    let other = client.client(&env.cgroup, "10.96.0.11:80", 5);

    assert_eq!(summary.ok, 20, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1"], "{summary:?}");
    assert_eq!(other.host_names(), ["intruder"], "{other:?}");
}

#[test]
fn endpoint_slices_take_precedence_over_pods() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // Two Ready pods the selector matches...
    let web1 = env.add_backend("webapp1", "webapp", 8080);
    let web2 = env.add_backend("webapp2", "webapp", 8080);
    // ...and an endpoint known only from the slice (no Pod manifest, other labels).
    let sliced = env.topo.add_pod("sliced");
    let _sliced_server = sliced.spawn_server("sliced", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    env.manifests.write(
        "slice-webapp.yaml",
        &endpoint_slice("webapp-abcde", "webapp")
            .endpoint(sliced.ip(), true)
            .port(None, 8080, "TCP")
            .yaml(),
    );
    let mut agent = env.agent();
    let frontend = agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(
        frontend.backend_addrs(),
        [format!("{}:8080", sliced.ip())],
        "the slice's endpoints, not the selected pods"
    );

    let summary = client.client(&env.cgroup, VIP, 20);
    assert_eq!(summary.ok, 20, "{summary:?}");
    assert_eq!(summary.host_names(), ["sliced"], "{summary:?}");

    // Without slices the selector's Ready pods are the endpoints again.
    env.manifests.remove("slice-webapp.yaml");
    let frontend = agent.wait_for_frontend(VIP, 2, APPLY);
    assert_eq!(
        frontend.backend_addrs(),
        [
            format!("{}:8080", web1.pod.ip()),
            format!("{}:8080", web2.pod.ip())
        ]
    );
    let summary = client.client(&env.cgroup, VIP, 40);
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
}

/// Upstream `should be rejected for evicted pods (no endpoints exist)`: the only pod of a
/// Service with `publishNotReadyAddresses: true` is evicted (phase `Failed`, not ready); it
/// is no endpoint at all, and connections are refused at once.
#[test]
fn an_evicted_pod_is_no_endpoint_and_its_service_refuses() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    let mut svc = service("webapp", "10.96.0.10")
        .selector("app", "webapp")
        .port(80, 8080)
        .build();
    svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
    env.manifests
        .write("svc-webapp.yaml", &lb_tests::manifests::to_yaml(&svc));
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 3).count("webapp1"), 3);

    // Evicted: the kubelet sets phase Failed; the server process still answers, so a
    // connection that reached it would show.
    let mut evicted = pod("webapp1", web.pod.ip())
        .label("app", "webapp")
        .container_port("http", 8080)
        .ready(false)
        .build();
    let status = evicted.status.as_mut().unwrap();
    status.phase = Some("Failed".to_owned());
    status.reason = Some("Evicted".to_owned());
    env.manifests.write(
        &TestEnv::pod_file("webapp1"),
        &lb_tests::manifests::to_yaml(&evicted),
    );
    agent.wait_for_frontend(VIP, 0, APPLY);
    let summary = client.client(&env.cgroup, VIP, 5);

    assert_eq!(summary.errors_of("ECONNREFUSED"), 5, "{summary:?}");
    assert!(
        summary.connect_ms.iter().all(|ms| *ms < 100.0),
        "refused at once: {:?}",
        summary.connect_ms
    );
}
