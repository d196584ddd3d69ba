//! `sessionAffinity: ClientIP`, the upstream cases "should have session affinity work for
//! service with type clusterIP / NodePort", "should be able to switch session affinity for
//! service with type clusterIP / NodePort", "should have session affinity timeout work for
//! service with type clusterIP / NodePort", on each path: the socket hooks (a pod is its
//! network namespace), tc for clients outside the node and tc for pods served per packet
//! (both by source address).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lb_tests::manifests::{ServiceBuilder, pod, service};
use lb_tests::{Agent, EXT_DEVICE, NODE_EXT_IP, Pod, Server, TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";
const NODE_PORT: u16 = 30080;
const BACKENDS: [&str; 3] = ["webapp1", "webapp2", "webapp3"];

/// Three ready backend pods with HTTP servers on 8080, as Pod manifests.
fn backends(env: &TestEnv) -> Vec<(Pod, Server)> {
    BACKENDS
        .iter()
        .map(|name| {
            let p = env.topo.add_pod(name);
            let server = p.spawn_server(name, 8080);
            env.manifests.write(
                &format!("pod-{name}.yaml"),
                &pod(name, p.ip()).label("app", "webapp").yaml(),
            );
            (p, server)
        })
        .collect()
}

/// The `webapp` Service (NodePort 30080), with the given affinity timeout when `Some`.
fn webapp(affinity: Option<Option<i32>>) -> ServiceBuilder {
    let svc = service("webapp", "10.96.0.10")
        .type_("NodePort")
        .selector("app", "webapp")
        .node_port(80, 8080, i32::from(NODE_PORT), "TCP");
    match affinity {
        Some(timeout) => svc.session_affinity(timeout),
        None => svc,
    }
}

/// Waits until the ClusterIP frontend has `count` backends and the affinity `timeout`.
#[track_caller]
fn wait_for_affinity(agent: &mut Agent, count: u16, timeout: Option<u32>) {
    agent.wait_until(
        &format!("{VIP} with {count} backends and affinity {timeout:?}"),
        APPLY,
        |frontends| {
            frontends
                .iter()
                .find(|f| f.addr() == VIP && f.count == count && f.affinity_timeout == timeout)
                .map(|_| ())
        },
    );
}

/// The backends that answered, as a set.
fn hosts(summary: &lb_tests::ClientSummary) -> BTreeSet<String> {
    summary
        .host_names()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[test]
fn cluster_ip_affinity_keeps_every_connection_of_a_pod_on_one_backend() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _backends = backends(&env);
    let (client1, client2) = (env.topo.add_pod("client1"), env.topo.add_pod("client2"));
    env.manifests.write("svc.yaml", &webapp(Some(None)).yaml());
    let mut agent = env.agent();
    wait_for_affinity(&mut agent, 3, Some(10_800));

    for client in [&client1, &client2] {
        let summary = client.client(&env.cgroup, VIP, 30);
        assert_eq!(summary.ok, 30, "{summary:?}");
        assert_eq!(
            hosts(&summary).len(),
            1,
            "every connection of one pod goes to one backend: {summary:?}"
        );
    }
}

#[test]
fn switching_affinity_on_and_off_takes_effect_on_the_next_connection() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _backends = backends(&env);
    let client = env.topo.add_pod("client");
    env.manifests.write("svc.yaml", &webapp(None).yaml());
    let mut agent = env.agent();
    wait_for_affinity(&mut agent, 3, None);
    let spread = client.client(&env.cgroup, VIP, 30);
    assert!(
        hosts(&spread).len() > 1,
        "without affinity 30 connections reach more than one of 3 backends: {spread:?}"
    );

    env.manifests.write("svc.yaml", &webapp(Some(None)).yaml());
    wait_for_affinity(&mut agent, 3, Some(10_800));
    let kept = client.client(&env.cgroup, VIP, 30);
    assert_eq!(kept.ok, 30, "{kept:?}");
    assert_eq!(hosts(&kept).len(), 1, "affinity switched on: {kept:?}");

    env.manifests.write("svc.yaml", &webapp(None).yaml());
    wait_for_affinity(&mut agent, 3, None);
    let spread = client.client(&env.cgroup, VIP, 30);
    assert!(
        hosts(&spread).len() > 1,
        "affinity switched off: {spread:?}"
    );
}

#[test]
fn affinity_lasts_while_connections_keep_coming_and_ends_after_the_timeout() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _backends = backends(&env);
    let client = env.topo.add_pod("client");
    env.manifests
        .write("svc.yaml", &webapp(Some(Some(1))).yaml());
    let mut agent = env.agent();
    wait_for_affinity(&mut agent, 3, Some(1));

    // Ten connections 300 ms apart span three timeouts: each refreshes the entry, as each
    // new connection refreshes kube-proxy's `recent` list.
    let kept = client
        .client_with()
        .cgroup(&env.cgroup)
        .count(10)
        .interval_ms(300)
        .run(VIP);
    assert_eq!(kept.ok, 10, "{kept:?}");
    let first = hosts(&kept);
    assert_eq!(first.len(), 1, "{kept:?}");

    // After a pause longer than the timeout the next connection picks afresh.
    assert_picks_afresh_after_the_timeout(&first, || client.client(&env.cgroup, VIP, 1));
}

#[test]
fn a_kept_backend_that_goes_away_is_never_used_again() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _backends = backends(&env);
    let client = env.topo.add_pod("client");
    env.manifests.write("svc.yaml", &webapp(Some(None)).yaml());
    let mut agent = env.agent();
    wait_for_affinity(&mut agent, 3, Some(10_800));
    let before = client.client(&env.cgroup, VIP, 5);
    let kept = hosts(&before);
    assert_eq!(kept.len(), 1, "{before:?}");
    let gone = kept.first().unwrap().clone();

    // The kept backend's pod goes (its server still answers, so a stale choice would show).
    env.manifests.remove(&format!("pod-{gone}.yaml"));
    wait_for_affinity(&mut agent, 2, Some(10_800));
    let after = client.client(&env.cgroup, VIP, 20);
    assert_eq!(after.ok, 20, "{after:?}");
    assert_eq!(after.count(&gone), 0, "the removed backend: {after:?}");
    assert_eq!(hosts(&after).len(), 1, "a new backend is kept: {after:?}");
}

/// The NodePort on the node's external address.
fn node_port_target() -> String {
    format!("{NODE_EXT_IP}:{NODE_PORT}")
}

/// The tc programs attach after the maps are written: waits until `target` answers `client`.
#[track_caller]
fn wait_until_answered(client: &Pod, target: &str) {
    let deadline = Instant::now() + APPLY;
    while client.client_with().count(1).timeout_ms(300).run(target).ok == 0 {
        assert!(Instant::now() < deadline, "{target} never answered");
    }
}

/// The tc programs attach after the maps are written: waits until the NodePort answers.
#[track_caller]
fn wait_for_node_port(outside: &Pod) {
    wait_until_answered(outside, &node_port_target());
}

/// Three backends, a client outside the node and the agent on `ext0`, the NodePort of `webapp`
/// with affinity (`timeout` seconds, else the default) programmed and answering.
fn outside_client_on_node_port(
    env: &TestEnv,
    timeout: Option<i32>,
) -> (Vec<(Pod, Server)>, Pod, Agent) {
    let backends = backends(env);
    let outside = env.topo.add_external_client("outside");
    env.manifests
        .write("svc.yaml", &webapp(Some(timeout)).yaml());
    let mut agent = env.agent_with(&["--devices", EXT_DEVICE]);
    let programmed = timeout.map_or(10_800, |t| u32::try_from(t).expect("a positive timeout"));
    wait_for_affinity(&mut agent, 3, Some(programmed));
    wait_for_node_port(&outside);
    (backends, outside, agent)
}

/// After pauses longer than the affinity timeout, a new connection (`connect`) lands on
/// another backend than `first` within a few tries (a fresh pick among three backends is the
/// same one a third of the time).
#[track_caller]
fn assert_picks_afresh_after_the_timeout(
    first: &BTreeSet<String>,
    mut connect: impl FnMut() -> lb_tests::ClientSummary,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(1_300));
        let next = connect();
        assert_eq!(next.ok, 1, "{next:?}");
        if hosts(&next) != *first {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still on {first:?} after the timeout passed again and again"
        );
    }
}

#[test]
fn node_port_affinity_keeps_a_client_outside_the_node_on_one_backend() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, outside, _agent) = outside_client_on_node_port(&env, None);
    let target = node_port_target();

    let summary = outside.client_with().count(30).run(&target);
    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(
        hosts(&summary).len(),
        1,
        "a client outside keeps its backend by its address: {summary:?}"
    );
}

/// Upstream `should be able to switch session affinity for NodePort service [LinuxOnly]`
/// (conformance): ClientIP → None → ClientIP, measured through nodeIP:NodePort from outside.
#[test]
fn switching_node_port_affinity_on_and_off_takes_effect_for_a_client_outside() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, outside, mut agent) = outside_client_on_node_port(&env, None);
    let kept = outside.client_with().count(30).run(&node_port_target());
    assert_eq!(kept.ok, 30, "{kept:?}");
    assert_eq!(hosts(&kept).len(), 1, "ClientIP: {kept:?}");

    env.manifests.write("svc.yaml", &webapp(None).yaml());
    wait_for_affinity(&mut agent, 3, None);
    let spread = outside.client_with().count(30).run(&node_port_target());
    assert_eq!(spread.ok, 30, "{spread:?}");
    assert!(
        hosts(&spread).len() > 1,
        "affinity switched off: 30 connections reach more than one of 3 backends: {spread:?}"
    );

    env.manifests.write("svc.yaml", &webapp(Some(None)).yaml());
    wait_for_affinity(&mut agent, 3, Some(10_800));
    let kept = outside.client_with().count(30).run(&node_port_target());
    assert_eq!(kept.ok, 30, "{kept:?}");
    assert_eq!(
        hosts(&kept).len(),
        1,
        "affinity switched on again: {kept:?}"
    );
}

/// Upstream `should have session affinity timeout work for NodePort service [LinuxOnly]`
/// (with a 1 s timeout instead of 125 s): connections from outside keep their backend while
/// they keep coming, and pick afresh after a pause longer than the timeout.
#[test]
fn node_port_affinity_ends_after_the_timeout_for_a_client_outside() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, outside, _agent) = outside_client_on_node_port(&env, Some(1));
    // The entry the probe made may still be there: let it expire first.
    std::thread::sleep(Duration::from_millis(1_300));

    let kept = outside
        .client_with()
        .count(10)
        .interval_ms(300)
        .run(&node_port_target());
    assert_eq!(kept.ok, 10, "{kept:?}");
    let first = hosts(&kept);
    assert_eq!(first.len(), 1, "kept within the timeout: {kept:?}");

    assert_picks_afresh_after_the_timeout(&first, || {
        outside.client_with().count(1).run(&node_port_target())
    });
}

#[test]
fn per_packet_pods_keep_their_backend_by_address() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _backends = backends(&env);
    let client = env.topo.add_pod("client");
    env.manifests.write("svc.yaml", &webapp(Some(None)).yaml());
    let mut agent = env.agent_with(&["--socket-lb", "off"]);
    wait_for_affinity(&mut agent, 3, Some(10_800));
    wait_until_answered(&client, VIP);

    let summary = client.client_with().count(30).run(VIP);
    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(hosts(&summary).len(), 1, "{summary:?}");
}

/// The three backends as Pods on this node (`node-a`), for `externalTrafficPolicy: Local`.
fn backends_on_this_node(env: &TestEnv) -> Vec<(Pod, Server)> {
    BACKENDS
        .iter()
        .map(|name| {
            let p = env.topo.add_pod(name);
            let server = p.spawn_server(name, 8080);
            env.manifests.write(
                &format!("pod-{name}.yaml"),
                &pod(name, p.ip())
                    .label("app", "webapp")
                    .node_name("node-a")
                    .yaml(),
            );
            (p, server)
        })
        .collect()
}

/// `webapp` as a LoadBalancer (ingress 192.168.60.20, routed to the node by the client's
/// default route) with this `externalTrafficPolicy` and affinity.
fn load_balancer(policy: &str, affinity: bool) -> String {
    let svc = service("webapp", "10.96.0.10")
        .selector("app", "webapp")
        .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
        .load_balancer_ingress("192.168.60.20", None)
        .external_traffic_policy(policy);
    if affinity {
        svc.session_affinity(None).yaml()
    } else {
        svc.yaml()
    }
}

/// Upstream `should have session affinity work for LoadBalancer service with <policy>
/// traffic policy` and `should be able to switch session affinity for LoadBalancer service
/// with <policy> traffic policy`, through the LoadBalancer IP from outside (the provider's
/// part, bringing the traffic to a node, is the client's route here): kept, spread once
/// switched off, kept again once switched on.
fn load_balancer_affinity_keeps_and_switches(policy: &str) {
    let env = TestEnv::new();
    let _backends = backends_on_this_node(&env);
    let outside = env.topo.add_external_client("outside");
    env.manifests
        .write("svc.yaml", &load_balancer(policy, true));
    let mut agent = env.agent_with(&["--devices", EXT_DEVICE, "--node-name", "node-a"]);
    let target = "192.168.60.20:80";
    agent.wait_until("the LoadBalancer IP with 3 backends", APPLY, |frontends| {
        frontends
            .iter()
            .find(|f| f.addr() == target && f.count == 3 && f.affinity_timeout.is_some())
            .map(|_| ())
    });
    wait_until_answered(&outside, target);

    let kept = outside.client_with().count(15).run(target);
    assert_eq!(kept.ok, 15, "{kept:?}");
    assert_eq!(hosts(&kept).len(), 1, "{policy}: ClientIP: {kept:?}");

    env.manifests
        .write("svc.yaml", &load_balancer(policy, false));
    agent.wait_until("affinity off", APPLY, |frontends| {
        frontends
            .iter()
            .find(|f| f.addr() == target && f.affinity_timeout.is_none())
            .map(|_| ())
    });
    let spread = outside.client_with().count(30).run(target);
    assert_eq!(spread.ok, 30, "{spread:?}");
    assert!(
        hosts(&spread).len() > 1,
        "{policy}: switched off: {spread:?}"
    );

    env.manifests
        .write("svc.yaml", &load_balancer(policy, true));
    agent.wait_until("affinity on", APPLY, |frontends| {
        frontends
            .iter()
            .find(|f| f.addr() == target && f.affinity_timeout.is_some())
            .map(|_| ())
    });
    let kept = outside.client_with().count(15).run(target);
    assert_eq!(kept.ok, 15, "{kept:?}");
    assert_eq!(
        hosts(&kept).len(),
        1,
        "{policy}: switched on again: {kept:?}"
    );
}

#[test]
fn load_balancer_affinity_with_local_policy_keeps_and_switches_for_a_client_outside() {
    if !require_privileges() {
        return;
    }
    load_balancer_affinity_keeps_and_switches("Local");
}

#[test]
fn load_balancer_affinity_with_cluster_policy_keeps_and_switches_for_a_client_outside() {
    if !require_privileges() {
        return;
    }
    load_balancer_affinity_keeps_and_switches("Cluster");
}
