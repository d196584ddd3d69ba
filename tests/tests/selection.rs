//! Which endpoints get new connections, as kube-proxy chooses them: the ready ones; when none is
//! ready, the serving ones that are terminating; when none of those either, connects are refused.

use std::collections::BTreeMap;
use std::time::Duration;

use lb_tests::manifests::{Conditions, endpoint_slice, pod, service};
use lb_tests::{Agent, EXT_DEVICE, NODE_EXT_IP, Pod, Server, TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";

/// Pods `names` with HTTP servers on 8080 answering with their names (no Pod manifests).
fn servers(env: &TestEnv, names: &[&str]) -> Vec<(Pod, Server)> {
    names
        .iter()
        .map(|name| {
            let p = env.topo.add_pod(name);
            let server = p.spawn_server(name, 8080);
            (p, server)
        })
        .collect()
}

/// Waits until the TCP frontend `VIP` lists exactly `want` (`ip:port` → state).
#[track_caller]
fn wait_for_states(agent: &mut Agent, want: &[(String, &str)]) {
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(addr, state)| (addr.clone(), (*state).to_owned()))
        .collect();
    agent.wait_until(&format!("{VIP} backends {want:?}"), APPLY, |frontends| {
        frontends
            .iter()
            .find(|f| f.addr() == VIP && f.protocol == "TCP")
            .filter(|f| f.backend_states() == want && usize::from(f.count) == want.len())
            .map(|_| ())
    });
}

fn webapp_service(env: &TestEnv) {
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port_full(Some("http"), 80, 8080, "TCP")
            .yaml(),
    );
}

#[test]
fn terminating_endpoints_serve_until_a_ready_one_appears() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let backends = servers(&env, &["webapp1", "webapp2"]);
    let (web1, web2) = (&backends[0].0, &backends[1].0);
    let client = env.topo.add_pod("client");
    webapp_service(&env);
    // A rolling update: webapp1 is being deleted but still serves, webapp2 is not ready yet.
    let slice = |web2_conditions| {
        endpoint_slice("webapp-abcde", "webapp")
            .endpoint_full(web1.ip(), Conditions::TERMINATING, None, None)
            .endpoint_full(web2.ip(), web2_conditions, None, None)
            .port(Some("http"), 8080, "TCP")
            .yaml()
    };
    env.manifests
        .write("slice-webapp.yaml", &slice(Conditions::NOT_READY));
    let mut agent = env.agent();
    wait_for_states(
        &mut agent,
        &[(format!("{}:8080", web1.ip()), "Terminating")],
    );

    let draining = client.client(&env.cgroup, VIP, 20);
    assert_eq!(
        draining.ok, 20,
        "with no ready endpoint the terminating one still answers: {draining:?}"
    );
    assert_eq!(draining.host_names(), ["webapp1"], "{draining:?}");

    // webapp2 becomes ready: it alone gets new connections.
    env.manifests
        .write("slice-webapp.yaml", &slice(Conditions::READY));
    wait_for_states(&mut agent, &[(format!("{}:8080", web2.ip()), "Ready")]);

    let after = client.client(&env.cgroup, VIP, 20);
    assert_eq!(after.ok, 20, "{after:?}");
    assert_eq!(
        after.host_names(),
        ["webapp2"],
        "a terminating endpoint gets no new connections once one is ready: {after:?}"
    );
}

#[test]
fn terminating_pod_serves_only_while_no_pod_is_ready() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let backends = servers(&env, &["webapp1", "webapp2"]);
    let (web1, web2) = (&backends[0].0, &backends[1].0);
    let client = env.topo.add_pod("client");
    webapp_service(&env);
    // webapp1: deletionTimestamp set, Ready=True (serving and terminating); webapp2: not Ready.
    env.manifests.write(
        &TestEnv::pod_file("webapp1"),
        &pod("webapp1", web1.ip())
            .label("app", "webapp")
            .terminating()
            .yaml(),
    );
    let web2_pod = |ready| {
        pod("webapp2", web2.ip())
            .label("app", "webapp")
            .ready(ready)
            .yaml()
    };
    env.manifests
        .write(&TestEnv::pod_file("webapp2"), &web2_pod(false));
    let mut agent = env.agent();
    wait_for_states(
        &mut agent,
        &[(format!("{}:8080", web1.ip()), "Terminating")],
    );

    let draining = client.client(&env.cgroup, VIP, 20);
    assert_eq!(draining.ok, 20, "{draining:?}");
    assert_eq!(draining.host_names(), ["webapp1"], "{draining:?}");

    env.manifests
        .write(&TestEnv::pod_file("webapp2"), &web2_pod(true));
    wait_for_states(&mut agent, &[(format!("{}:8080", web2.ip()), "Ready")]);

    let after = client.client(&env.cgroup, VIP, 20);
    assert_eq!(after.ok, 20, "{after:?}");
    assert_eq!(after.host_names(), ["webapp2"], "{after:?}");
}

#[test]
fn endpoints_neither_ready_nor_serving_refuse_connections() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let backends = servers(&env, &["webapp1", "webapp2", "webapp3"]);
    let client = env.topo.add_pod("client");
    webapp_service(&env);
    // Terminating and no longer serving; not ready; and a terminating pod whose Ready is False.
    env.manifests.write(
        "slice-webapp.yaml",
        &endpoint_slice("webapp-abcde", "webapp")
            .endpoint_full(backends[0].0.ip(), Conditions::TERMINATED, None, None)
            .endpoint_full(backends[1].0.ip(), Conditions::NOT_READY, None, None)
            .port(Some("http"), 8080, "TCP")
            .yaml(),
    );
    env.manifests.write(
        "svc-other.yaml",
        &service("other", "10.96.0.11")
            .selector("app", "other")
            .port(80, 8080)
            .yaml(),
    );
    env.manifests.write(
        &TestEnv::pod_file("webapp3"),
        &pod("webapp3", backends[2].0.ip())
            .label("app", "other")
            .ready(false)
            .terminating()
            .yaml(),
    );
    let mut agent = env.agent();
    let frontend = agent.wait_for_frontend(VIP, 0, APPLY);
    assert_eq!(frontend.count, 0, "{frontend:?}");
    let other = agent.wait_for_frontend("10.96.0.11:80", 0, APPLY);
    assert_eq!(other.count, 0, "{other:?}");

    for target in [VIP, "10.96.0.11:80"] {
        let summary = client.client(&env.cgroup, target, 5);
        assert_eq!(
            summary.errors_of("ECONNREFUSED"),
            5,
            "{target}: no endpoint may take connections: {summary:?}"
        );
        assert!(
            summary.connect_ms.iter().all(|ms| *ms < 100.0),
            "refused at once: {:?}",
            summary.connect_ms
        );
    }
}

/// `webapp` as NodePort 30080 with `publishNotReadyAddresses`.
fn publishing_service(publish: bool) -> String {
    let mut svc = service("webapp", "10.96.0.10")
        .type_("NodePort")
        .selector("app", "webapp")
        .node_port(80, 8080, 30080, "TCP")
        .build();
    svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(publish);
    lb_tests::manifests::to_yaml(&svc)
}

/// Upstream `should create endpoints for unready pods`: a never-ready pod is reached while
/// the Service publishes not-ready addresses, refused once it stops, and reached again,
/// now terminating, when it publishes them again.
#[test]
fn unready_pods_serve_while_the_service_publishes_not_ready_addresses() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods = servers(&env, &["webapp1"]);
    let client = env.topo.add_pod("client");
    let unready = pod("webapp1", pods[0].0.ip())
        .label("app", "webapp")
        .ready(false);
    env.manifests.write("pod.yaml", &unready.yaml());
    env.manifests.write("svc.yaml", &publishing_service(true));
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    let published = client.client(&env.cgroup, VIP, 5);
    assert_eq!(published.count("webapp1"), 5, "{published:?}");

    env.manifests.write("svc.yaml", &publishing_service(false));
    agent.wait_for_frontend(VIP, 0, APPLY);
    let unpublished = client.client(&env.cgroup, VIP, 3);
    assert_eq!(unpublished.errors_of("ECONNREFUSED"), 3, "{unpublished:?}");

    env.manifests
        .write("pod.yaml", &unready.clone().terminating().yaml());
    env.manifests.write("svc.yaml", &publishing_service(true));
    agent.wait_for_frontend(VIP, 1, APPLY);
    let again = client.client(&env.cgroup, VIP, 5);
    assert_eq!(again.count("webapp1"), 5, "{again:?}");
}

/// The only pod of NodePort `webapp` is terminating and no longer ready; returns what a
/// pod gets from the ClusterIP and a client outside from the NodePort.
fn terminating_unready_pod(publish: bool) -> (lb_tests::ClientSummary, lb_tests::ClientSummary) {
    let env = TestEnv::new();
    let pods = servers(&env, &["webapp1"]);
    let client = env.topo.add_pod("client");
    let outside = env.topo.add_external_client("outside");
    let webapp1 = pod("webapp1", pods[0].0.ip()).label("app", "webapp");
    // The pod shares its file with a marker Service whose port changes in the same write:
    // once the marker's new port is listed, the agent has applied the pod's change too
    // (with published not-ready addresses the frontend itself does not change).
    let pod_file = |pod: lb_tests::manifests::PodBuilder, marker_port: i32| {
        lb_tests::manifests::documents(&[
            pod.yaml(),
            service("marker", "10.96.0.99")
                .selector("app", "marker")
                .port(marker_port, 8080)
                .yaml(),
        ])
    };
    env.manifests
        .write("pod.yaml", &pod_file(webapp1.clone(), 80));
    env.manifests
        .write("svc.yaml", &publishing_service(publish));
    let mut agent = env.agent_with(&["--devices", EXT_DEVICE]);
    agent.wait_for_frontend(VIP, 1, APPLY);
    agent.wait_for_frontend("10.96.0.99:80", 0, APPLY);
    let node_port = format!("{NODE_EXT_IP}:30080");
    let deadline = std::time::Instant::now() + APPLY;
    while outside.client_with().timeout_ms(300).run(&node_port).ok == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "NodePort never answered"
        );
    }

    env.manifests.write(
        "pod.yaml",
        &pod_file(webapp1.ready(false).terminating(), 81),
    );
    agent.wait_for_frontend("10.96.0.99:81", 0, APPLY);
    agent.wait_for_frontend(VIP, usize::from(publish), APPLY);
    (
        client
            .client_with()
            .cgroup(&env.cgroup)
            .count(5)
            .timeout_ms(500)
            .run(VIP),
        outside
            .client_with()
            .count(5)
            .timeout_ms(500)
            .run(&node_port),
    )
}

/// Upstream `should be able to connect to terminating and unready endpoints if
/// PublishNotReadyAddresses is true`.
#[test]
fn terminating_unready_pod_is_reached_when_not_ready_addresses_are_published() {
    if !require_privileges() {
        return;
    }
    let (cluster_ip, node_port) = terminating_unready_pod(true);
    assert_eq!(cluster_ip.count("webapp1"), 5, "{cluster_ip:?}");
    assert_eq!(node_port.count("webapp1"), 5, "{node_port:?}");
}

/// Upstream `should not be able to connect to terminating and unready endpoints if
/// PublishNotReadyAddresses is false`.
#[test]
fn terminating_unready_pod_is_not_reached_when_not_ready_addresses_are_not_published() {
    if !require_privileges() {
        return;
    }
    let (cluster_ip, node_port) = terminating_unready_pod(false);
    assert_eq!(cluster_ip.count("webapp1"), 0, "{cluster_ip:?}");
    assert_eq!(cluster_ip.errors_of("ECONNREFUSED"), 5, "{cluster_ip:?}");
    assert_eq!(node_port.count("webapp1"), 0, "{node_port:?}");
    assert_eq!(node_port.errors_of("ECONNREFUSED"), 5, "{node_port:?}");
}
