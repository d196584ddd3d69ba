//! A Service whose `spec.type` changes between ExternalName and ClusterIP or NodePort: the
//! upstream conformance cases "should be able to change the type from ExternalName to
//! ClusterIP / to NodePort" and "... from ClusterIP / NodePort to ExternalName". The Service
//! file of the manifests directory is rewritten as `kubectl apply` would change the object;
//! the VIP and the NodePort must start or stop answering with it.

use std::time::{Duration, Instant};

use lb_tests::manifests::{ServiceBuilder, service, to_yaml};
use lb_tests::{Agent, ClientSummary, EXT_DEVICE, NODE_EXT_IP, Pod, TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";
/// A second Service on the same pods, always ClusterIP: once it is programmed, the agent has
/// read the directory and attached its hooks.
const OTHER_VIP: &str = "10.96.0.11:80";
const NODE_PORT: u16 = 30080;

fn node_port_target() -> String {
    format!("{NODE_EXT_IP}:{NODE_PORT}")
}

/// `webapp` as type ExternalName, as the API server stores it: no ClusterIP, no NodePort.
fn external_name_yaml() -> String {
    let mut svc = service("webapp", "")
        .selector("app", "webapp")
        .port(80, 8080)
        .external_name("webapp.example.com")
        .build();
    let spec = svc.spec.as_mut().expect("spec");
    spec.cluster_ip = None;
    spec.cluster_ips = None;
    spec.ip_families = None;
    spec.ip_family_policy = None;
    to_yaml(&svc)
}

fn cluster_ip() -> ServiceBuilder {
    service("webapp", "10.96.0.10")
        .selector("app", "webapp")
        .port(80, 8080)
}

fn node_port() -> ServiceBuilder {
    service("webapp", "10.96.0.10")
        .type_("NodePort")
        .selector("app", "webapp")
        .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
}

/// Two backends, a client pod, the always-programmed `other` Service and the agent (with the
/// tc datapath on `ext0` when an external client is wanted).
struct Setup {
    env: TestEnv,
    client: Pod,
    outside: Option<Pod>,
    agent: Agent,
    _backends: Vec<lb_tests::BackendPod>,
}

fn setup(first: &str, outside: bool) -> Setup {
    let env = TestEnv::new();
    let backends = vec![
        env.add_backend("webapp1", "webapp", 8080),
        env.add_backend("webapp2", "webapp", 8080),
    ];
    let client = env.topo.add_pod("client");
    let outside = outside.then(|| env.topo.add_external_client("outside"));
    env.manifests.write(
        "svc-other.yaml",
        &service("other", "10.96.0.11")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    env.manifests.write("svc-webapp.yaml", first);
    let mut agent = if outside.is_some() {
        env.agent_with(&["--devices", EXT_DEVICE])
    } else {
        env.agent()
    };
    agent.wait_for_frontend(OTHER_VIP, 2, APPLY);
    Setup {
        env,
        client,
        outside,
        agent,
        _backends: backends,
    }
}

/// A short run to an address nothing should answer.
fn probe(client: &Pod, cgroup: Option<&lb_tests::TestCgroup>, target: &str) -> ClientSummary {
    let run = client.client_with().count(2).timeout_ms(300);
    match cgroup {
        Some(cgroup) => run.cgroup(cgroup).run(target),
        None => run.run(target),
    }
}

/// Asserts the VIP went out untranslated (not refused by a frontend without endpoints).
#[track_caller]
fn assert_vip_unanswered(summary: &ClientSummary, what: &str) {
    assert_eq!(summary.ok, 0, "{what}: answered: {summary:?}");
    assert!(
        summary
            .errors
            .keys()
            .all(|e| matches!(e.as_str(), "ETIMEDOUT" | "ENETUNREACH" | "EHOSTUNREACH")),
        "{what}: not translated at all: {summary:?}"
    );
}

/// Polls `target` from `client` until an answer comes (bounded by [`APPLY`]).
#[track_caller]
fn wait_answering(client: &Pod, cgroup: Option<&lb_tests::TestCgroup>, target: &str) {
    let deadline = Instant::now() + APPLY;
    while probe(client, cgroup, target).ok == 0 {
        assert!(Instant::now() < deadline, "{target} never answered");
    }
}

/// `should be able to change the type from ExternalName to ClusterIP` (conformance).
#[test]
fn external_name_changed_to_cluster_ip_answers_on_its_new_cluster_ip() {
    if !require_privileges() {
        return;
    }
    let mut s = setup(&external_name_yaml(), false);
    assert_vip_unanswered(
        &probe(&s.client, Some(&s.env.cgroup), VIP),
        "while ExternalName",
    );

    s.env
        .manifests
        .write("svc-webapp.yaml", &cluster_ip().yaml());
    s.agent.wait_for_frontend(VIP, 2, APPLY);
    let summary = s.client.client(&s.env.cgroup, VIP, 20);

    assert_eq!(summary.ok, 20, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
}

/// `should be able to change the type from ExternalName to NodePort` (conformance).
#[test]
fn external_name_changed_to_node_port_answers_on_the_cluster_ip_and_the_node_port() {
    if !require_privileges() {
        return;
    }
    let mut s = setup(&external_name_yaml(), true);
    let outside = s.outside.take().expect("external client");
    // The OTHER Service answers from outside once tc is attached (ClusterIPs are served when
    // routed to the node); the NodePort does not exist yet.
    wait_answering(&outside, None, OTHER_VIP);
    let before = probe(&outside, None, &node_port_target());
    assert_eq!(before.ok, 0, "no NodePort while ExternalName: {before:?}");

    s.env
        .manifests
        .write("svc-webapp.yaml", &node_port().yaml());
    s.agent.wait_for_frontend("0.0.0.0:30080", 2, APPLY);
    wait_answering(&outside, None, &node_port_target());
    let by_node_port = outside.client_with().count(20).run(&node_port_target());
    let by_cluster_ip = s.client.client(&s.env.cgroup, VIP, 20);

    assert_eq!(by_node_port.ok, 20, "{by_node_port:?}");
    assert_eq!(
        by_node_port.host_names(),
        ["webapp1", "webapp2"],
        "{by_node_port:?}"
    );
    assert_eq!(by_cluster_ip.ok, 20, "{by_cluster_ip:?}");
    assert_eq!(
        by_cluster_ip.host_names(),
        ["webapp1", "webapp2"],
        "{by_cluster_ip:?}"
    );
}

/// `should be able to change the type from ClusterIP to ExternalName` (conformance; the
/// proxy's part: the old ClusterIP stops being served).
#[test]
fn cluster_ip_changed_to_external_name_stops_answering_on_the_cluster_ip() {
    if !require_privileges() {
        return;
    }
    let mut s = setup(&cluster_ip().yaml(), false);
    s.agent.wait_for_frontend(VIP, 2, APPLY);
    assert_eq!(s.client.client(&s.env.cgroup, VIP, 5).ok, 5);

    s.env
        .manifests
        .write("svc-webapp.yaml", &external_name_yaml());
    s.agent.wait_for_no_frontend(VIP, APPLY);

    assert_vip_unanswered(
        &probe(&s.client, Some(&s.env.cgroup), VIP),
        "after the change to ExternalName",
    );
    assert_eq!(
        s.client.client(&s.env.cgroup, OTHER_VIP, 5).ok,
        5,
        "the other Service is untouched"
    );
}

/// `should be able to change the type from NodePort to ExternalName` (conformance; the
/// proxy's part: the ClusterIP and the NodePort stop being served).
#[test]
fn node_port_changed_to_external_name_stops_answering_on_the_node_port_and_cluster_ip() {
    if !require_privileges() {
        return;
    }
    let mut s = setup(&node_port().yaml(), true);
    let outside = s.outside.take().expect("external client");
    s.agent.wait_for_frontend("0.0.0.0:30080", 2, APPLY);
    wait_answering(&outside, None, &node_port_target());

    s.env
        .manifests
        .write("svc-webapp.yaml", &external_name_yaml());
    s.agent.wait_for_no_frontend("0.0.0.0:30080", APPLY);
    s.agent.wait_for_no_frontend(VIP, APPLY);
    let by_node_port = probe(&outside, None, &node_port_target());
    let by_cluster_ip = probe(&s.client, Some(&s.env.cgroup), VIP);

    // Passed on to the node's own stack, where nothing listens on the port: refused by the
    // node, never answered by a backend.
    assert_eq!(by_node_port.ok, 0, "{by_node_port:?}");
    assert_vip_unanswered(&by_cluster_ip, "after the change to ExternalName");
    assert_eq!(outside.client_with().count(3).run(OTHER_VIP).ok, 3);
}

/// Upstream `should be able to update service type to NodePort listening on same port number
/// but different protocols`: ClusterIP → NodePort (TCP), then UDP added on the same port 80
/// with its own NodePort; TCP and UDP answer through the ClusterIP and their NodePorts.
#[test]
fn cluster_ip_changed_to_node_port_then_given_udp_on_the_same_port_serves_both() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let p = env.topo.add_pod("echo1");
    let _tcp = p.spawn_server("echo1", 8080);
    let _udp = p.spawn_udp_server("echo1-udp", 8080);
    env.manifests.write(
        &TestEnv::pod_file("echo1"),
        &lb_tests::manifests::pod("echo1", p.ip())
            .label("app", "echo")
            .yaml(),
    );
    let client = env.topo.add_pod("client");
    let outside = env.topo.add_external_client("outside");
    env.manifests.write(
        "svc-echo.yaml",
        &service("echo", "10.96.0.10")
            .selector("app", "echo")
            .port_full(Some("tcp-port"), 80, 8080, "TCP")
            .yaml(),
    );
    let mut agent = env.agent_with(&["--devices", EXT_DEVICE]);
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 3).count("echo1"), 3);

    let node_port = service("echo", "10.96.0.10")
        .type_("NodePort")
        .selector("app", "echo")
        .node_port(80, 8080, 30080, "TCP");
    env.manifests.write("svc-echo.yaml", &node_port.yaml());
    agent.wait_for_frontend("0.0.0.0:30080", 1, APPLY);
    wait_answering(&outside, None, &node_port_target());
    assert_eq!(
        outside
            .client_with()
            .count(3)
            .run(&node_port_target())
            .count("echo1"),
        3
    );

    env.manifests.write(
        "svc-echo.yaml",
        &node_port.node_port(80, 8080, 30081, "UDP").yaml(),
    );
    agent.wait_for_frontend_proto("0.0.0.0:30081", "UDP", 1, APPLY);
    let udp_node_port = format!("{NODE_EXT_IP}:30081");
    let tcp_by_node_port = outside.client_with().count(5).run(&node_port_target());
    let udp_by_node_port = outside.client_with().udp().count(5).run(&udp_node_port);
    let tcp_by_cluster_ip = client.client(&env.cgroup, VIP, 5);
    let udp_by_cluster_ip = client.udp_client(&env.cgroup, VIP, 5);

    assert_eq!(tcp_by_node_port.count("echo1"), 5, "{tcp_by_node_port:?}");
    assert_eq!(
        udp_by_node_port.count("echo1-udp"),
        5,
        "{udp_by_node_port:?}"
    );
    assert_eq!(tcp_by_cluster_ip.count("echo1"), 5, "{tcp_by_cluster_ip:?}");
    assert_eq!(
        udp_by_cluster_ip.count("echo1-udp"),
        5,
        "{udp_by_cluster_ip:?}"
    );
}
