//! What each end of a translated TCP connection sees: the client's `getpeername()` is the
//! ClusterIP:port it dialled, the backend sees the client pod.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use lb_tests::manifests::service;
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";

#[test]
fn getpeername_is_the_cluster_ip_while_the_backend_sees_the_client() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.add_backend("webapp1", "webapp", 8080);
    let web2 = env.add_backend("webapp2", "webapp", 8080);
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

    let summary = client.client(&env.cgroup, VIP, 30);

    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    assert_eq!(
        summary.peers(),
        BTreeSet::from([VIP]),
        "getpeername() must be the ClusterIP:port dialled, never {} or {}: {:?}",
        web1.server.addr(),
        web2.server.addr(),
        summary.peer_addrs
    );
    assert_eq!(
        summary.peer_addrs.len(),
        30,
        "one getpeername() per connection"
    );
    assert_eq!(
        summary.remote_ips(),
        BTreeSet::from([IpAddr::from(client.ip())]),
        "X-Remote-Addr: the backend sees the client pod"
    );
}

#[test]
fn getpeername_of_a_plain_pod_connection_is_left_alone() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.add_backend("webapp1", "webapp", 8080);
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
    // The reverse translation is per socket: dialling the pod directly, from inside the cgroup,
    // after the same socket layer translated connections to it, must show the pod.
    let via_service = client.client(&env.cgroup, VIP, 5);
    let direct = client.client(&env.cgroup, web1.server.addr(), 5);

    assert_eq!(
        via_service.peers(),
        BTreeSet::from([VIP]),
        "{via_service:?}"
    );
    assert_eq!(direct.ok, 5, "{direct:?}");
    assert_eq!(
        direct.peers(),
        BTreeSet::from([web1.server.addr()]),
        "a connection made to the pod address reports the pod address: {direct:?}"
    );
}
