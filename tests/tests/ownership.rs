//! Address ownership (the CVE-2020-8554 class): a Service whose external IP is another
//! Service's ClusterIP does not take that ClusterIP's traffic, and the agent says so;
//! `--external-ip-cidrs` limits the external IPs that are taken.

use std::time::Duration;

use lb_tests::manifests::service;
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);

#[test]
fn an_external_ip_equal_to_another_services_cluster_ip_does_not_hijack_it() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _victim = env.add_backend("victim1", "victim", 8080);
    let _hijacker = env.add_backend("hijacker1", "hijacker", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-victim.yaml",
        &service("victim", "10.96.0.10")
            .selector("app", "victim")
            .port(80, 8080)
            .yaml(),
    );
    // Sorts before "victim": the first-by-name rule alone would have given it 10.96.0.10:80.
    env.manifests.write(
        "svc-a-hijack.yaml",
        &service("a-hijack", "10.96.0.20")
            .selector("app", "hijacker")
            .external_ip("10.96.0.10")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent_with_api();
    agent.wait_for_frontend("10.96.0.20:80", 1, APPLY);
    let owner = agent.wait_for_frontend("10.96.0.10:80", 1, APPLY);
    agent.wait_for_log(
        "Service default/a-hijack: spec.externalIPs[0]: 10.96.0.10 is the ClusterIP of Service default/victim; not taken",
        APPLY,
    );

    let to_victim = client.client(&env.cgroup, "10.96.0.10:80", 20);
    let to_hijacker = client.client(&env.cgroup, "10.96.0.20:80", 5);

    assert_eq!(
        (owner.service.as_deref(), owner.kind.as_deref()),
        (Some("default/victim"), Some("ClusterIp")),
        "{owner:?}"
    );
    assert_eq!(to_victim.ok, 20, "{to_victim:?}");
    assert_eq!(to_victim.host_names(), ["victim1"], "{to_victim:?}");
    assert_eq!(to_hijacker.host_names(), ["hijacker1"], "{to_hijacker:?}");
}

#[test]
fn external_ips_outside_the_allowed_cidrs_are_not_translated() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .external_ip("192.168.77.10")
            .external_ip("192.168.88.10")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent_with(&["--external-ip-cidrs", "192.168.77.0/24"]);
    agent.wait_for_frontend("192.168.77.10:80", 1, APPLY);
    agent.wait_for_log(
        "spec.externalIPs[1]: 192.168.88.10 is outside --external-ip-cidrs (192.168.77.0/24); not taken",
        APPLY,
    );

    let allowed = client.client(&env.cgroup, "192.168.77.10:80", 5);
    let refused = client
        .client_with()
        .cgroup(&env.cgroup)
        .count(2)
        .timeout_ms(300)
        .run("192.168.88.10:80");
    let listed = agent.services().expect("lb-agent services");

    assert_eq!(allowed.host_names(), ["webapp1"], "{allowed:?}");
    assert_eq!(
        refused.ok, 0,
        "not translated, so nothing answers: {refused:?}"
    );
    assert!(
        !listed.iter().any(|f| f.address == "192.168.88.10"),
        "{listed:#?}"
    );
}
