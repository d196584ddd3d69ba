//! Which Services and ports become frontends: headless, ExternalName and other proxies' Services
//! are left alone; each port and protocol is its own frontend (SCTP skipped); external IPs and
//! LoadBalancer ingress IPs are translated at the socket like ClusterIPs.

use std::collections::BTreeSet;
use std::time::Duration;

use lb_tests::manifests::{pod, service};
use lb_tests::{ClientSummary, Pod, TestCgroup, TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";
const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// A short client run to an address the agent must not translate.
fn untranslated(client: &Pod, cgroup: &TestCgroup, target: &str) -> ClientSummary {
    client
        .client_with()
        .cgroup(cgroup)
        .count(2)
        .timeout_ms(300)
        .run(target)
}

/// Asserts `summary` reached nothing and was not refused by the agent: the address went out
/// untranslated and nothing answers it.
#[track_caller]
fn assert_untranslated(summary: &ClientSummary, what: &str) {
    assert_eq!(summary.ok, 0, "{what}: answered: {summary:?}");
    let unexpected: Vec<&String> = summary
        .errors
        .keys()
        .filter(|e| !matches!(e.as_str(), "ETIMEDOUT" | "ENETUNREACH" | "EHOSTUNREACH"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{what}: must not be translated (ECONNREFUSED would mean a frontend without endpoints): \
         {summary:?}"
    );
}

#[test]
fn headless_external_name_and_other_proxies_services_are_left_alone() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    // All select the same ready pod; only "webapp" is ours to program.
    let base = |name: &str, ip: &str| {
        service(name, ip)
            .selector("app", "webapp")
            .port_full(Some("http"), 80, 8080, "TCP")
    };
    env.manifests
        .write("svc-webapp.yaml", &base("webapp", "10.96.0.10").yaml());
    env.manifests
        .write("svc-headless.yaml", &base("webapp-headless", "None").yaml());
    env.manifests.write(
        "svc-other-proxy.yaml",
        &base("webapp-other-proxy", "10.96.0.11")
            .label(PROXY_NAME_LABEL, "other-proxy")
            .yaml(),
    );
    // An ExternalName Service that still carries a ClusterIP (as a hand-edited manifest may).
    env.manifests.write(
        "svc-external-name.yaml",
        &base("webapp-external-name", "10.96.0.12")
            .external_name("webapp.example.com")
            .yaml(),
    );
    let mut agent = env.agent_with_api();
    agent.wait_for_frontend(VIP, 1, APPLY);

    let listed = agent.services().expect("lb-agent services");
    let addrs: Vec<String> = listed.iter().map(|f| f.addr()).collect();
    assert_eq!(addrs, [VIP], "only the ClusterIP Service: {listed:#?}");
    let services: BTreeSet<Option<&str>> = listed.iter().map(|f| f.service.as_deref()).collect();
    assert_eq!(services, BTreeSet::from([Some("default/webapp")]));

    assert_eq!(client.client(&env.cgroup, VIP, 5).ok, 5);
    assert_untranslated(
        &untranslated(&client, &env.cgroup, "10.96.0.11:80"),
        "a Service labelled service-proxy-name",
    );
    assert_untranslated(
        &untranslated(&client, &env.cgroup, "10.96.0.12:80"),
        "an ExternalName Service",
    );
}

#[test]
fn labelling_a_service_for_another_proxy_unprograms_it() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    let svc = service("webapp", "10.96.0.10")
        .selector("app", "webapp")
        .port(80, 8080);
    env.manifests.write("svc-webapp.yaml", &svc.yaml());
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 5).ok, 5);

    env.manifests.write(
        "svc-webapp.yaml",
        &svc.clone().label(PROXY_NAME_LABEL, "other-proxy").yaml(),
    );
    agent.wait_for_no_frontend(VIP, APPLY);
    assert_untranslated(
        &untranslated(&client, &env.cgroup, VIP),
        "a Service handed to another proxy",
    );

    // And back.
    env.manifests.write("svc-webapp.yaml", &svc.yaml());
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 5).ok, 5);
}

#[test]
fn tcp_and_udp_on_the_same_port_are_separate_frontends() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // DNS pods: HTTP (standing in for DNS over TCP) on 8053 answering "dnsN", UDP on 5353
    // answering "dnsN-udp".
    let mut pods = Vec::new();
    let mut servers = Vec::new();
    for name in ["dns1", "dns2"] {
        let p = env.topo.add_pod(name);
        servers.push(p.spawn_server(name, 8053));
        servers.push(p.spawn_udp_server(&format!("{name}-udp"), 5353));
        env.manifests.write(
            &TestEnv::pod_file(name),
            &pod(name, p.ip())
                .label("app", "dns")
                .container_port_full("dns-tcp", 8053, "TCP")
                .container_port_full("dns", 5353, "UDP")
                .yaml(),
        );
        pods.push(p);
    }
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-dns.yaml",
        &service("dns", "10.96.0.10")
            .selector("app", "dns")
            .port_full(Some("dns-tcp"), 53, "dns-tcp", "TCP")
            .port_full(Some("dns"), 53, "dns", "UDP")
            .port_full(Some("sctp"), 9999, 9999, "SCTP")
            .yaml(),
    );
    let mut agent = env.agent();
    let tcp = agent.wait_for_frontend_proto("10.96.0.10:53", "TCP", 2, APPLY);
    let udp = agent.wait_for_frontend_proto("10.96.0.10:53", "UDP", 2, APPLY);
    let ports = |f: &lb_tests::Frontend| -> BTreeSet<(u16, String)> {
        f.backends
            .iter()
            .map(|b| (b.port, b.protocol.clone()))
            .collect()
    };
    assert_eq!(ports(&tcp), BTreeSet::from([(8053, "TCP".to_owned())]));
    assert_eq!(ports(&udp), BTreeSet::from([(5353, "UDP".to_owned())]));
    assert_ne!(
        tcp.rev_nat_id, udp.rev_nat_id,
        "two frontends: {tcp:?} {udp:?}"
    );
    let listed = agent.services().expect("lb-agent services");
    assert_eq!(
        listed.len(),
        2,
        "the SCTP port is skipped, the Service's other ports are not: {listed:#?}"
    );

    let over_tcp = client.client(&env.cgroup, "10.96.0.10:53", 20);
    let over_udp = client.udp_client(&env.cgroup, "10.96.0.10:53", 20);

    assert_eq!(over_tcp.ok, 20, "{over_tcp:?}");
    assert_eq!(over_tcp.host_names(), ["dns1", "dns2"], "{over_tcp:?}");
    assert_eq!(over_tcp.peers(), BTreeSet::from(["10.96.0.10:53"]));
    assert_eq!(over_udp.ok, 20, "{over_udp:?}");
    assert_eq!(
        over_udp.host_names(),
        ["dns1-udp", "dns2-udp"],
        "{over_udp:?}"
    );
    assert_eq!(over_udp.peers(), BTreeSet::from(["10.96.0.10:53"]));
}

#[test]
fn external_ip_is_translated_at_the_socket() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    let client = env.topo.add_pod("client");
    // 192.168.77.10 is on no interface; no namespace has a route for it.
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .external_ip("192.168.77.10")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    let cluster = agent.wait_for_frontend(VIP, 2, APPLY);
    let external = agent.wait_for_frontend("192.168.77.10:80", 2, APPLY);
    assert_eq!(cluster.kind.as_deref(), Some("ClusterIp"), "{cluster:?}");
    assert_eq!(external.kind.as_deref(), Some("ExternalIp"), "{external:?}");
    assert_eq!(external.backend_addrs(), cluster.backend_addrs());

    let summary = client.client(&env.cgroup, "192.168.77.10:80", 30);

    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    assert_eq!(summary.peers(), BTreeSet::from(["192.168.77.10:80"]));
    // Outside the agent's cgroup the external IP goes out as it is, to nowhere.
    let outside = client
        .client_with()
        .count(2)
        .timeout_ms(300)
        .run("192.168.77.10:80");
    assert_untranslated(&outside, "outside the cgroup");
}

#[test]
fn load_balancer_ingress_ip_is_translated_unless_proxied() {
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
            .load_balancer_ingress("192.168.77.20", None)
            // ipMode Proxy: the load balancer must see the traffic (KEP-1860), no shortcut.
            .load_balancer_ingress("192.168.77.21", Some("Proxy"))
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 2, APPLY);
    let lb = agent.wait_for_frontend("192.168.77.20:80", 2, APPLY);
    assert_eq!(lb.kind.as_deref(), Some("LoadBalancer"), "{lb:?}");
    let listed = agent.services().expect("lb-agent services");
    assert!(
        listed.iter().all(|f| f.address != "192.168.77.21"),
        "an ingress IP with ipMode Proxy is not programmed: {listed:#?}"
    );

    let summary = client.client(&env.cgroup, "192.168.77.20:80", 30);

    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    assert_eq!(summary.peers(), BTreeSet::from(["192.168.77.20:80"]));
    assert_untranslated(
        &untranslated(&client, &env.cgroup, "192.168.77.21:80"),
        "ipMode Proxy",
    );
}

/// kube-proxy programs a Service for a family only when it has a ClusterIP of that family, and
/// then only the external and LoadBalancer IPs of that family ("Service change tracker ignored
/// the following external IPs for given service as they don't match IP Family",
/// pkg/proxy/serviceport.go). An IPv6 external IP of an IPv4-only Service is not the proxy's:
/// connections to it must go out untouched, not be refused.
#[test]
fn external_ips_of_a_family_the_service_lacks_are_left_alone() {
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
            .external_ip("192.168.77.10")
            .external_ip("fd00:77::10")
            .load_balancer_ingress("fd00:77::20", None)
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend("192.168.77.10:80", 1, APPLY);

    let listed = agent.services().expect("lb-agent services");
    let v6: Vec<&lb_tests::Frontend> = listed.iter().filter(|f| f.address.contains(':')).collect();
    let external = untranslated(&client, &env.cgroup, "[fd00:77::10]:80");
    let ingress = untranslated(&client, &env.cgroup, "[fd00:77::20]:80");

    assert!(
        v6.is_empty(),
        "an IPv4-only Service gets no IPv6 frontend: {v6:#?}"
    );
    assert_untranslated(&external, "an IPv6 external IP of an IPv4-only Service");
    assert_untranslated(&ingress, "an IPv6 ingress IP of an IPv4-only Service");
}

/// Upstream `should serve endpoints on same port and different protocols` (conformance):
/// TCP and UDP on port 80 are both forwarded; removing the UDP port stops UDP and leaves TCP,
/// removing the TCP port then stops TCP and brings UDP back.
#[test]
fn removing_one_protocol_of_a_port_stops_only_that_protocol() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let p = env.topo.add_pod("echo1");
    let _tcp = p.spawn_server("echo1", 8080);
    let _udp = p.spawn_udp_server("echo1-udp", 8080);
    env.manifests.write(
        &TestEnv::pod_file("echo1"),
        &pod("echo1", p.ip()).label("app", "echo").yaml(),
    );
    let client = env.topo.add_pod("client");
    let svc = |tcp: bool, udp: bool| {
        let mut s = service("echo", "10.96.0.10").selector("app", "echo");
        if tcp {
            s = s.port_full(Some("tcp-port"), 80, 8080, "TCP");
        }
        if udp {
            s = s.port_full(Some("udp-port"), 80, 8080, "UDP");
        }
        s.yaml()
    };
    env.manifests.write("svc-echo.yaml", &svc(true, true));
    let mut agent = env.agent();
    agent.wait_for_frontend_proto(VIP, "TCP", 1, APPLY);
    agent.wait_for_frontend_proto(VIP, "UDP", 1, APPLY);
    let udp_run = || {
        client
            .client_with()
            .cgroup(&env.cgroup)
            .udp()
            .count(2)
            .timeout_ms(300)
            .run(VIP)
    };
    let tcp_run = || {
        client
            .client_with()
            .cgroup(&env.cgroup)
            .count(2)
            .timeout_ms(300)
            .run(VIP)
    };
    assert_eq!(tcp_run().count("echo1"), 2);
    assert_eq!(udp_run().count("echo1-udp"), 2);

    env.manifests.write("svc-echo.yaml", &svc(true, false));
    agent.wait_for_no_frontend_proto(VIP, "UDP", APPLY);
    let udp = udp_run();
    let tcp = tcp_run();
    assert_eq!(udp.ok, 0, "UDP removed: {udp:?}");
    assert_eq!(udp.count("echo1-udp"), 0, "{udp:?}");
    assert_eq!(tcp.count("echo1"), 2, "TCP stays: {tcp:?}");

    env.manifests.write("svc-echo.yaml", &svc(false, true));
    agent.wait_for_no_frontend_proto(VIP, "TCP", APPLY);
    agent.wait_for_frontend_proto(VIP, "UDP", 1, APPLY);
    let tcp = tcp_run();
    let udp = udp_run();
    assert_untranslated(&tcp, "the removed TCP port");
    assert_eq!(udp.count("echo1-udp"), 2, "UDP back: {udp:?}");
}

/// Upstream `should serve endpoints on same port and different protocol for internal traffic
/// on Type LoadBalancer `: a LoadBalancer Service (no ingress IP yet) with TCP and UDP on port
/// 80 through named target ports; a pod reaches both protocols through the ClusterIP and
/// through their NodePorts on the node's address.
#[test]
fn a_load_balancer_with_tcp_and_udp_on_one_port_serves_both_inside_the_cluster() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let p = env.topo.add_pod("echo1");
    let _tcp = p.spawn_server("echo1", 8080);
    let _udp = p.spawn_udp_server("echo1-udp", 8080);
    env.manifests.write(
        &TestEnv::pod_file("echo1"),
        &pod("echo1", p.ip())
            .label("app", "echo")
            .container_port_full("tcp-port", 8080, "TCP")
            .container_port_full("udp-port", 8080, "UDP")
            .yaml(),
    );
    let client = env.topo.add_pod("client");
    // Creates the node's ext0 (192.168.50.1), the node address NodePorts answer on.
    let _outside = env.topo.add_external_client("outside");
    env.manifests.write(
        "svc-echo.yaml",
        &service("echo", "10.96.0.10")
            .type_("LoadBalancer")
            .selector("app", "echo")
            .node_port(80, "tcp-port", 30080, "TCP")
            .node_port(80, "udp-port", 30081, "UDP")
            .yaml(),
    );
    let mut agent = env.agent_with(&["--devices", lb_tests::EXT_DEVICE]);
    agent.wait_for_frontend_proto(VIP, "TCP", 1, APPLY);
    agent.wait_for_frontend_proto(VIP, "UDP", 1, APPLY);
    agent.wait_for_frontend_proto("0.0.0.0:30080", "TCP", 1, APPLY);
    agent.wait_for_frontend_proto("0.0.0.0:30081", "UDP", 1, APPLY);
    let node = lb_tests::NODE_EXT_IP;

    let tcp = client.client(&env.cgroup, VIP, 5);
    let udp = client.udp_client(&env.cgroup, VIP, 5);
    let tcp_node_port = client.client(&env.cgroup, &format!("{node}:30080"), 5);
    let udp_node_port = client.udp_client(&env.cgroup, &format!("{node}:30081"), 5);

    assert_eq!(tcp.count("echo1"), 5, "{tcp:?}");
    assert_eq!(udp.count("echo1-udp"), 5, "{udp:?}");
    assert_eq!(tcp_node_port.count("echo1"), 5, "{tcp_node_port:?}");
    assert_eq!(udp_node_port.count("echo1-udp"), 5, "{udp_node_port:?}");
}

/// Upstream `should implement service.kubernetes.io/headless`: a Service labelled
/// `service.kubernetes.io/headless` (even with a ClusterIP) is not proxied; removing the label
/// brings its ClusterIP back, adding it again takes it away.
#[test]
fn the_headless_label_takes_a_service_away_from_the_proxy_and_back() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    let svc = service("webapp", "10.96.0.10")
        .selector("app", "webapp")
        .port(80, 8080);
    let labelled = svc
        .clone()
        .label("service.kubernetes.io/headless", "")
        .yaml();
    // A second Service tells when the agent has read the directory.
    env.manifests.write(
        "svc-other.yaml",
        &service("other", "10.96.0.11")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    env.manifests.write("svc-webapp.yaml", &labelled);
    let mut agent = env.agent();
    agent.wait_for_frontend("10.96.0.11:80", 1, APPLY);
    assert!(
        agent.frontend(VIP).expect("services").is_none(),
        "a Service labelled headless is not programmed"
    );
    assert_untranslated(
        &untranslated(&client, &env.cgroup, VIP),
        "labelled headless",
    );

    env.manifests.write("svc-webapp.yaml", &svc.yaml());
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 5).count("webapp1"), 5);

    env.manifests.write("svc-webapp.yaml", &labelled);
    agent.wait_for_no_frontend(VIP, APPLY);
    assert_untranslated(
        &untranslated(&client, &env.cgroup, VIP),
        "labelled headless again",
    );
}
