//! The agent can die: translation goes on, and a restarted agent catches up.

use std::time::Duration;

use lb_tests::manifests::service;
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";

#[test]
fn killed_agent_leaves_cluster_ips_answering_and_a_restart_catches_up() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    // webapp2 runs from the start but gets its manifest only while the agent is down.
    let web2_pod = env.topo.add_pod("webapp2");
    let _web2_server = web2_pod.spawn_server("webapp2", 8080);
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
    let attached_before = env.cgroup.attached_programs();
    assert!(!attached_before.is_empty(), "agent attached nothing");

    agent.kill();

    let during = client.client(&env.cgroup, VIP, 20);
    assert_eq!(
        during.ok, 20,
        "ClusterIP answers with the agent dead: {during:?}"
    );
    assert_eq!(during.host_names(), ["webapp1"], "{during:?}");
    let pinned = agent
        .frontend(VIP)
        .expect("lb-agent services reads the pins while the agent is down")
        .expect("frontend still pinned");
    assert_eq!(pinned.backends.len(), 1, "{pinned:?}");

    // Scale 1 → 2 while nobody watches.
    env.manifests.write(
        &TestEnv::pod_file("webapp2"),
        &lb_tests::manifests::pod("webapp2", web2_pod.ip())
            .label("app", "webapp")
            .container_port("http", 8080)
            .yaml(),
    );
    agent.start();
    agent.wait_for_frontend(VIP, 2, APPLY);

    let after = client.client(&env.cgroup, VIP, 40);
    assert_eq!(after.ok, 40, "{after:?}");
    assert_eq!(after.host_names(), ["webapp1", "webapp2"], "{after:?}");
    // The restarted agent adopted the attachment instead of stacking another one.
    let attached_after = env.cgroup.attached_programs();
    assert_eq!(
        attached_after.len(),
        attached_before.len(),
        "programs on the cgroup before the kill: {attached_before:?}, after the restart: \
         {attached_after:?}"
    );
}
