//! What each end of a translated TCP connection sees: the client's `getpeername()` is the
//! ClusterIP:port it dialled, the backend sees the client pod. A TCP connection through a
//! Service writes no per-socket record: the first one to each backend claims it for its
//! frontend (`LB_PEERS`), and only a second frontend of the same backend, or a socket that
//! dials the pod directly, writes one.

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

#[test]
fn tcp_connections_write_no_record_while_their_backend_is_claimed() {
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

    assert_eq!(summary.peers(), BTreeSet::from([VIP]), "{summary:?}");
    assert_eq!(
        agent.map_entries("LB_PEERS").unwrap(),
        2,
        "one claim per backend"
    );
    assert_eq!(
        agent.map_entries("LB4_REVNAT").unwrap(),
        0,
        "40 connections, no per-socket record"
    );
}

/// Two Services select the same pods on the same port: the backends are claimed by one
/// frontend, and the other's sockets keep records, so each client sees what it dialled.
#[test]
fn two_services_sharing_a_backend_each_see_their_own_address() {
    if !require_privileges() {
        return;
    }
    const OTHER: &str = "10.96.0.20:80";
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    for (name, ip) in [("webapp", "10.96.0.10"), ("webapp-alias", "10.96.0.20")] {
        env.manifests.write(
            &format!("svc-{name}.yaml"),
            &service(name, ip)
                .selector("app", "webapp")
                .port(80, 8080)
                .yaml(),
        );
    }
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    agent.wait_for_frontend(OTHER, 1, APPLY);

    let first = client.client(&env.cgroup, VIP, 10);
    let second = client.client(&env.cgroup, OTHER, 10);
    let first_again = client.client(&env.cgroup, VIP, 10);

    assert_eq!(first.peers(), BTreeSet::from([VIP]), "{first:?}");
    assert_eq!(second.peers(), BTreeSet::from([OTHER]), "{second:?}");
    assert_eq!(
        first_again.peers(),
        BTreeSet::from([VIP]),
        "{first_again:?}"
    );
    assert_eq!(
        agent.map_entries("LB4_REVNAT").unwrap(),
        10,
        "only the connections through the frontend without the claim have records"
    );
}

/// When the claimed backend leaves its Service, the agent removes the claim: a pod that
/// later serves another Service on the same address and port is claimed by that one.
#[test]
fn a_backend_that_leaves_its_service_loses_the_claim() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    let write = |selector: &str| {
        env.manifests.write(
            "svc-webapp.yaml",
            &service("webapp", "10.96.0.10")
                .selector("app", selector)
                .port(80, 8080)
                .yaml(),
        );
    };
    write("webapp");
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 3).ok, 3);
    assert_eq!(agent.map_entries("LB_PEERS").unwrap(), 1);

    write("nothing");
    agent.wait_for_frontend(VIP, 0, APPLY);

    assert_eq!(
        agent.map_entries("LB_PEERS").unwrap(),
        0,
        "the claim went with the backend"
    );
}

/// The datapath marks a backend slot once its backend's claim names the slot's frontend,
/// and later connections through the slot skip the claim. A backend that leaves its
/// Service, is claimed by another one meanwhile and comes back must not be taken for the
/// first one's: its sockets keep records again, and each client sees what it dialled.
#[test]
fn a_backend_claimed_elsewhere_while_it_was_away_is_not_taken_for_its_own() {
    if !require_privileges() {
        return;
    }
    const OTHER: &str = "10.96.0.20:80";
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    let write = |name: &str, ip: &str, selector: &str| {
        env.manifests.write(
            &format!("svc-{name}.yaml"),
            &service(name, ip)
                .selector("app", selector)
                .port(80, 8080)
                .yaml(),
        );
    };
    write("webapp", "10.96.0.10", "webapp");
    write("other", "10.96.0.20", "nothing");
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    let claimed = client.client(&env.cgroup, VIP, 5);
    assert_eq!(claimed.peers(), BTreeSet::from([VIP]), "{claimed:?}");

    // The backend leaves, the other Service claims it, then it comes back.
    write("webapp", "10.96.0.10", "nothing");
    write("other", "10.96.0.20", "webapp");
    agent.wait_for_frontend(VIP, 0, APPLY);
    agent.wait_for_frontend(OTHER, 1, APPLY);
    let other = client.client(&env.cgroup, OTHER, 5);
    write("webapp", "10.96.0.10", "webapp");
    agent.wait_for_frontend(VIP, 1, APPLY);
    let back = client.client(&env.cgroup, VIP, 5);
    let other_again = client.client(&env.cgroup, OTHER, 5);

    assert_eq!(other.peers(), BTreeSet::from([OTHER]), "{other:?}");
    assert_eq!(back.ok, 5, "{back:?}");
    assert_eq!(
        back.peers(),
        BTreeSet::from([VIP]),
        "the claim names the other Service now: {back:?}"
    );
    assert_eq!(
        other_again.peers(),
        BTreeSet::from([OTHER]),
        "{other_again:?}"
    );
    assert_eq!(
        agent.map_entries("LB4_REVNAT").unwrap(),
        5,
        "only the connections through the frontend without the claim have records"
    );
}
