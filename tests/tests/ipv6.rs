//! IPv6 and dual-stack Services: ClusterIPs from fd00:96::/112, pods with both families in
//! `status.podIPs`, IPv6 EndpointSlices, and IPv4 Services dialled from IPv6 sockets through
//! IPv4-mapped addresses.
//!
//! Backends listen on one family only and name it (`webapp1` on IPv4, `webapp1-v6` on IPv6), so
//! the name that answers tells which of a pod's addresses a connection went to.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use lb_tests::manifests::{endpoint_slice, pod, service};
use lb_tests::{DualStackBackend, Frontend, Listen, Pod, Server, TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP4: &str = "10.96.0.10:80";
const VIP6: &str = "[fd00:96::10]:80";
/// The IPv4 ClusterIP as an IPv6 socket dials it.
const VIP4_MAPPED: &str = "[::ffff:10.96.0.10]:80";

/// Asserts every backend of `frontend` is of `family` and of the frontend's own family.
#[track_caller]
fn assert_family(frontend: &Frontend, family: &str) {
    assert_eq!(frontend.family.as_deref(), Some(family), "{frontend:?}");
    for backend in &frontend.backends {
        assert_eq!(backend.family.as_deref(), Some(family), "{frontend:?}");
    }
}

#[test]
fn ipv6_only_service_is_reached_over_ipv6() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // The pods are dual-stack but serve on IPv6 only: an IPv4 backend would refuse.
    let backends: Vec<DualStackBackend> = ["webapp1", "webapp2"]
        .into_iter()
        .map(|name| env.add_dual_stack_backend(name, "webapp", 8080, Listen::Ipv6Only))
        .collect();
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "fd00:96::10")
            .ip_families(&["IPv6"])
            .ip_family_policy("SingleStack")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    let frontend = agent.wait_for_frontend(VIP6, 2, APPLY);
    assert_family(&frontend, "IPv6");
    assert_eq!(
        frontend.backend_addrs(),
        backends
            .iter()
            .map(|b| format!("[{}]:8080", b.pod.ip6()))
            .collect::<Vec<_>>(),
        "the pods' IPv6 addresses only"
    );
    let listed = agent.services().expect("lb-agent services");
    assert_eq!(listed.len(), 1, "no IPv4 frontend: {listed:?}");

    let summary = client.client(&env.cgroup, VIP6, 30);

    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    assert_eq!(summary.peers(), BTreeSet::from([VIP6]), "getpeername()");
    assert_eq!(
        summary.remote_ips(),
        BTreeSet::from([IpAddr::from(client.ip6())]),
        "the backends see the client's IPv6 address"
    );
}

#[test]
fn dual_stack_service_from_pods_answers_on_both_families() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // Kept whole: dropping a backend stops its servers.
    let backend1 = env.add_dual_stack_backend("webapp1", "webapp", 8080, Listen::Both);
    let backend2 = env.add_dual_stack_backend("webapp2", "webapp", 8080, Listen::Both);
    let (web1, web2) = (&backend1.pod, &backend2.pod);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .cluster_ips(&["10.96.0.10", "fd00:96::10"])
            .ip_families(&["IPv4", "IPv6"])
            .ip_family_policy("RequireDualStack")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    let v4 = agent.wait_for_frontend(VIP4, 2, APPLY);
    let v6 = agent.wait_for_frontend(VIP6, 2, APPLY);
    assert_family(&v4, "IPv4");
    assert_family(&v6, "IPv6");
    assert_eq!(
        v4.backend_addrs(),
        [format!("{}:8080", web1.ip()), format!("{}:8080", web2.ip())]
    );
    assert_eq!(
        v6.backend_addrs(),
        [
            format!("[{}]:8080", web1.ip6()),
            format!("[{}]:8080", web2.ip6())
        ]
    );

    let over_v4 = client.client(&env.cgroup, VIP4, 30);
    let over_v6 = client.client(&env.cgroup, VIP6, 30);

    assert_eq!(over_v4.ok, 30, "{over_v4:?}");
    assert_eq!(over_v4.host_names(), ["webapp1", "webapp2"], "{over_v4:?}");
    assert_eq!(over_v4.peers(), BTreeSet::from([VIP4]));
    assert_eq!(
        over_v4.remote_ips(),
        BTreeSet::from([IpAddr::from(client.ip())])
    );
    assert_eq!(over_v6.ok, 30, "{over_v6:?}");
    assert_eq!(
        over_v6.host_names(),
        ["webapp1-v6", "webapp2-v6"],
        "over IPv6 the pods' IPv6 addresses answer: {over_v6:?}"
    );
    assert_eq!(over_v6.peers(), BTreeSet::from([VIP6]));
    assert_eq!(
        over_v6.remote_ips(),
        BTreeSet::from([IpAddr::from(client.ip6())])
    );
}

#[test]
fn dual_stack_service_takes_each_familys_endpoint_slices() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // IPv4 endpoints: webapp1 and webapp2; IPv6 endpoints: webapp3 only. Only the slices say so
    // (no Pod manifests).
    let pods: Vec<Pod> = ["webapp1", "webapp2", "webapp3"]
        .into_iter()
        .map(|name| env.topo.add_pod(name))
        .collect();
    let _servers: Vec<Server> = pods
        .iter()
        .flat_map(|p| {
            [
                p.spawn_server(p.name(), 8080),
                p.spawn_server6(&format!("{}-v6", p.name()), 8080),
            ]
        })
        .collect();
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .cluster_ips(&["10.96.0.10", "fd00:96::10"])
            .ip_family_policy("PreferDualStack")
            .selector("app", "webapp")
            .port_full(Some("http"), 80, "http", "TCP")
            .yaml(),
    );
    env.manifests.write(
        "slice-webapp-v4.yaml",
        &endpoint_slice("webapp-ipv4", "webapp")
            .address_type("IPv4")
            .endpoint(pods[0].ip(), true)
            .endpoint(pods[1].ip(), true)
            .port(Some("http"), 8080, "TCP")
            .yaml(),
    );
    env.manifests.write(
        "slice-webapp-v6.yaml",
        &endpoint_slice("webapp-ipv6", "webapp")
            .address_type("IPv6")
            .endpoint(pods[2].ip6(), true)
            .port(Some("http"), 8080, "TCP")
            .yaml(),
    );
    let mut agent = env.agent();
    let v4 = agent.wait_for_frontend(VIP4, 2, APPLY);
    let v6 = agent.wait_for_frontend(VIP6, 1, APPLY);
    assert_family(&v4, "IPv4");
    assert_family(&v6, "IPv6");
    assert_eq!(v6.backend_addrs(), [format!("[{}]:8080", pods[2].ip6())]);

    let over_v4 = client.client(&env.cgroup, VIP4, 30);
    let over_v6 = client.client(&env.cgroup, VIP6, 10);

    assert_eq!(over_v4.ok, 30, "{over_v4:?}");
    assert_eq!(over_v4.host_names(), ["webapp1", "webapp2"], "{over_v4:?}");
    assert_eq!(over_v6.ok, 10, "{over_v6:?}");
    assert_eq!(over_v6.host_names(), ["webapp3-v6"], "{over_v6:?}");
    assert_eq!(over_v6.peers(), BTreeSet::from([VIP6]));
}

#[test]
fn ipv4_service_is_reached_from_an_ipv6_socket_through_a_v4_mapped_address() {
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
    agent.wait_for_frontend(VIP4, 2, APPLY);

    // `--target [::ffff:10.96.0.10]:80`: an AF_INET6 socket (IPV6_V6ONLY off, the default).
    let summary = client.client(&env.cgroup, VIP4_MAPPED, 30);

    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    assert_eq!(
        summary.peers(),
        BTreeSet::from([VIP4_MAPPED]),
        "getpeername() of the IPv6 socket is the mapped ClusterIP:port: {:?}",
        summary.peer_addrs
    );
    assert_eq!(
        summary.remote_ips(),
        BTreeSet::from([IpAddr::from(client.ip())]),
        "the backends see the client's IPv4 address"
    );
}

#[test]
fn udp_over_ipv6_and_through_a_v4_mapped_address() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let mut servers = Vec::new();
    for name in ["dns1", "dns2"] {
        let p = env.topo.add_pod(name);
        servers.push(p.spawn_udp_server(name, 5353));
        servers.push(p.spawn_udp_server6(&format!("{name}-v6"), 5353));
        env.manifests.write(
            &TestEnv::pod_file(name),
            &pod(name, p.ip())
                .also_ip(p.ip6())
                .label("app", "dns")
                .container_port_full("dns", 5353, "UDP")
                .yaml(),
        );
    }
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-dns.yaml",
        &service("dns", "10.96.0.10")
            .cluster_ips(&["10.96.0.10", "fd00:96::10"])
            .selector("app", "dns")
            .port_full(Some("dns"), 53, "dns", "UDP")
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend_proto("10.96.0.10:53", "UDP", 2, APPLY);
    agent.wait_for_frontend_proto("[fd00:96::10]:53", "UDP", 2, APPLY);

    let run = |target: &str, connected: bool| {
        let c = client.client_with().cgroup(&env.cgroup).count(20).sends(2);
        if connected { c.connected() } else { c }.run(target)
    };
    let v6 = run("[fd00:96::10]:53", false);
    let v6_connected = run("[fd00:96::10]:53", true);
    let mapped = run("[::ffff:10.96.0.10]:53", false);
    let mapped_connected = run("[::ffff:10.96.0.10]:53", true);

    for (summary, peer, hosts, what) in [
        (
            &v6,
            "[fd00:96::10]:53",
            ["dns1-v6", "dns2-v6"],
            "unconnected IPv6",
        ),
        (
            &v6_connected,
            "[fd00:96::10]:53",
            ["dns1-v6", "dns2-v6"],
            "connected IPv6",
        ),
        (
            &mapped,
            "[::ffff:10.96.0.10]:53",
            ["dns1", "dns2"],
            "unconnected v4-mapped",
        ),
        (
            &mapped_connected,
            "[::ffff:10.96.0.10]:53",
            ["dns1", "dns2"],
            "connected v4-mapped",
        ),
    ] {
        assert_eq!(summary.ok, 40, "{what}: every query answered: {summary:?}");
        assert_eq!(
            summary.peers(),
            BTreeSet::from([peer]),
            "{what}: the answers come from the ClusterIP: {:?}",
            summary.peer_addrs
        );
        assert_eq!(summary.host_names(), hosts, "{what}: {summary:?}");
    }
    assert_eq!(
        v6.remote_ips(),
        BTreeSet::from([IpAddr::from(client.ip6())])
    );
    assert_eq!(
        mapped.remote_ips(),
        BTreeSet::from([IpAddr::from(client.ip())])
    );
}

#[test]
fn dual_stack_service_refuses_on_the_family_without_endpoints() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // IPv4-only pods behind a dual-stack Service.
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .cluster_ips(&["10.96.0.10", "fd00:96::10"])
            .ip_family_policy("PreferDualStack")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP4, 1, APPLY);
    let v6 = agent.wait_for_frontend(VIP6, 0, APPLY);
    assert_eq!(v6.count, 0, "{v6:?}");

    let over_v4 = client.client(&env.cgroup, VIP4, 5);
    let over_v6 = client.client(&env.cgroup, VIP6, 5);

    assert_eq!(over_v4.host_names(), ["webapp1"], "{over_v4:?}");
    assert_eq!(
        over_v6.errors_of("ECONNREFUSED"),
        5,
        "no IPv6 endpoint: refused, never sent to an IPv4 backend: {over_v6:?}"
    );
}
