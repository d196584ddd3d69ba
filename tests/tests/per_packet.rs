//! The per-packet ClusterIP path: with `--socket-lb off` (no socket programs at all) or
//! `host-only` (socket programs for the host's network namespace only), a pod's packets to
//! a Service are translated by tc on the pod's own device, and the replies translated back
//! on their way into the pod — what a service mesh needs, since its sidecar must see the
//! ClusterIP the application dialled.

use std::time::Duration;

use lb_tests::manifests::{pod, service};
use lb_tests::{DualStackBackend, Listen, Pod, TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";
const VIP6: &str = "[fd00:96::10]:80";

/// Two dual-stack pods `webapp1`, `webapp2` with HTTP servers on both addresses (`webappN`
/// on IPv4, `webappN-v6` on IPv6), a client pod, and a dual-stack Service `webapp`
/// (10.96.0.10, fd00:96::10) port 80 → 8080. Every pod exists before the agent starts, so
/// its device is there to be found.
fn webapp_setup(env: &TestEnv) -> (Vec<DualStackBackend>, Pod) {
    let backends = ["webapp1", "webapp2"]
        .into_iter()
        .map(|name| env.add_dual_stack_backend(name, "webapp", 8080, Listen::Both))
        .collect();
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
    (backends, client)
}

/// The clients `lb-agent conntrack` lists flows of.
fn tracked_clients(agent: &lb_tests::Agent) -> Vec<String> {
    agent
        .conntrack()
        .iter()
        .filter_map(|f| f["client"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn socket_lb_off_still_serves_cluster_ips_from_pods_through_tc() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, client) = webapp_setup(&env);
    let mut agent = env.agent_with(&["--socket-lb", "off"]);
    agent.wait_for_frontend(VIP, 2, APPLY);

    // The client is in the test's cgroup: with socket programs it would be translated there.
    let summary = client.client_with().cgroup(&env.cgroup).count(20).run(VIP);

    assert!(
        lb_tests::cgroup::attach_types(env.cgroup.path()).is_empty(),
        "--socket-lb off attaches no socket program"
    );
    assert_eq!(summary.ok, 20, "every request answered: {summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    assert!(
        summary.peer_addrs.iter().all(|a| a == VIP),
        "replies come back from the ClusterIP: {:?}",
        summary.peer_addrs
    );
    let prefix = format!("{}:", client.ip());
    assert!(
        summary.remote_addrs.iter().all(|a| a.starts_with(&prefix)),
        "backends see the client pod's own address: {:?}",
        summary.remote_addrs
    );
    let clients = tracked_clients(&agent);
    assert!(
        clients.iter().any(|c| c.starts_with(&prefix)),
        "the flows went through the tc conntrack: {clients:?}"
    );
}

#[test]
fn socket_lb_off_serves_ipv6_and_udp_cluster_ips_per_packet() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, client) = webapp_setup(&env);
    let dns = env.topo.add_pod("dns1");
    let _dns = dns.spawn_udp_server("dns1", 5353);
    env.manifests.write(
        "pod-dns1.yaml",
        &pod("dns1", dns.ip()).label("app", "dns").yaml(),
    );
    env.manifests.write(
        "svc-dns.yaml",
        &service("dns", "10.96.0.53")
            .selector("app", "dns")
            .port_full(Some("dns"), 53, 5353, "UDP")
            .yaml(),
    );
    let mut agent = env.agent_with(&["--socket-lb", "off"]);
    agent.wait_for_frontend(VIP6, 2, APPLY);
    agent.wait_for_frontend_proto("10.96.0.53:53", "UDP", 1, APPLY);

    let v6 = client.client_with().count(10).run(VIP6);
    assert_eq!(v6.ok, 10, "{v6:?}");
    assert_eq!(v6.host_names(), ["webapp1-v6", "webapp2-v6"], "{v6:?}");
    assert!(
        v6.peer_addrs.iter().all(|a| a == VIP6),
        "{:?}",
        v6.peer_addrs
    );

    // Unconnected sendto/recvfrom: the answer must come from the ClusterIP, or a resolver
    // would drop it.
    let udp = client
        .client_with()
        .udp()
        .count(3)
        .sends(2)
        .run("10.96.0.53:53");
    assert_eq!(udp.ok, 6, "{udp:?}");
    assert!(
        udp.peer_addrs.iter().all(|a| a == "10.96.0.53:53"),
        "answers come from the ClusterIP: {:?}",
        udp.peer_addrs
    );
}

#[test]
fn socket_lb_host_only_leaves_pods_to_the_per_packet_path() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, client) = webapp_setup(&env);
    let mut agent = env.agent_with(&["--socket-lb", "host-only"]);
    agent.wait_for_frontend(VIP, 2, APPLY);

    // The socket programs are attached to the client's cgroup, but the client is in a pod's
    // network namespace: its connects pass untranslated and tc translates its packets.
    let summary = client.client_with().cgroup(&env.cgroup).count(10).run(VIP);

    assert!(
        lb_tests::cgroup::attach_types(env.cgroup.path()).contains("cgroup_inet4_connect"),
        "host-only keeps the socket programs for the host"
    );
    assert_eq!(summary.ok, 10, "{summary:?}");
    assert!(summary.peer_addrs.iter().all(|a| a == VIP), "{summary:?}");
    let prefix = format!("{}:", client.ip());
    let clients = tracked_clients(&agent);
    assert!(
        clients.iter().filter(|c| c.starts_with(&prefix)).count() >= 10,
        "each connection went through the tc conntrack: {clients:?}"
    );
}

#[test]
fn a_pod_created_after_the_agent_started_gets_the_per_packet_path() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, _first_client) = webapp_setup(&env);
    let mut agent = env.agent_with(&["--socket-lb", "off"]);
    agent.wait_for_frontend(VIP, 2, APPLY);

    // A new pod's veth appears: the agent hears of it from netlink and attaches to it.
    let links = env.pins.path().join("links");
    // A device is ready once both of its programs are: the count of devices with each.
    let attached = || {
        let names: Vec<String> = std::fs::read_dir(&links)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let with = |prefix: &str| names.iter().filter(|n| n.starts_with(prefix)).count();
        with("tc-pod-ingress-").min(with("tc-pod-egress-"))
    };
    // Counted before the pod exists: the agent may attach while its veth is set up.
    let before = attached();
    let late = env.topo.add_pod("late");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while attached() == before {
        agent.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "no tc program attached to the new pod's device within 3 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let summary = late.client_with().count(10).run(VIP);

    assert_eq!(summary.ok, 10, "{summary:?}");
    assert!(summary.peer_addrs.iter().all(|a| a == VIP), "{summary:?}");
}

#[test]
fn a_pod_dialling_a_service_without_endpoints_is_refused_per_packet() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-empty.yaml",
        &service("empty", "10.96.0.20")
            .selector("app", "nothing")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent_with(&["--socket-lb", "off"]);
    agent.wait_for_frontend("10.96.0.20:80", 0, APPLY);

    // The ICMP port unreachable the tc path answers with: refused at once, not a timeout.
    let summary = client.client_with().count(3).run("10.96.0.20:80");

    assert_eq!(summary.errors_of("ECONNREFUSED"), 3, "{summary:?}");
    assert!(
        summary.connect_ms.iter().all(|ms| *ms < 500.0),
        "{:?}",
        summary.connect_ms
    );
}

#[test]
fn a_pod_reaches_a_service_it_backs_itself_per_packet() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (backends, _client) = webapp_setup(&env);
    env.manifests.remove(&TestEnv::pod_file("webapp2"));
    let mut agent = env.agent_with(&["--socket-lb", "off"]);
    agent.wait_for_frontend(VIP, 1, APPLY);
    agent.wait_for_frontend(VIP6, 1, APPLY);

    // webapp1 dials its own Service: DNATed to itself, the flow is SNATed to the hairpin
    // address so that webapp1's answer comes back through tc instead of straight to itself.
    let webapp1 = &backends[0].pod;
    for vip in [VIP, VIP6] {
        let summary = webapp1.client_with().count(5).run(vip);
        assert_eq!(summary.ok, 5, "{vip}: {summary:?}");
        assert!(summary.peer_addrs.iter().all(|a| a == vip), "{summary:?}");
    }
}

/// `--bpf-host-routing`: the packets tc translates go straight to their next hop, so the
/// node's forward path never sees them. A FORWARD rule that drops everything to the
/// backends' port cuts the ClusterIP off without it, and not with it (the trade the flag's
/// help states: a CNI's iptables NetworkPolicy there no longer applies).
#[test]
fn bpf_host_routing_sends_translated_packets_past_the_nodes_forward_path() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, client) = webapp_setup(&env);
    let node = env.topo.node().name().to_owned();
    let nft = |script: &str| {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &node, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(script.as_bytes())?;
                child.wait()
            })
            .expect("running nft in the node's namespace");
        assert!(status.success(), "nft -f failed: {script}");
    };
    nft(
        "table inet lbtest {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n  tcp dport 8080 drop\n }\n}\n",
    );

    let mut routed = env.agent_with(&["--socket-lb", "off"]);
    routed.wait_for_frontend(VIP, 2, APPLY);
    let dropped = client.client_with().count(2).timeout_ms(500).run(VIP);
    drop(routed);
    let mut agent = env.agent_with(&["--socket-lb", "off", "--bpf-host-routing"]);
    agent.wait_for_frontend(VIP, 2, APPLY);
    let summary = client.client_with().count(20).run(VIP);

    assert_eq!(
        dropped.ok, 0,
        "routed by the node, the FORWARD rule drops them: {dropped:?}"
    );
    assert_eq!(summary.ok, 20, "every request answered: {summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    assert!(
        summary.peer_addrs.iter().all(|a| a == VIP),
        "replies come back from the ClusterIP: {:?}",
        summary.peer_addrs
    );
    let prefix = format!("{}:", client.ip());
    assert!(
        summary.remote_addrs.iter().all(|a| a.starts_with(&prefix)),
        "backends see the client pod's own address: {:?}",
        summary.remote_addrs
    );
}

#[test]
fn flow_ages_follow_the_node_clock_once_the_datapath_reads_jiffies() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, client) = webapp_setup(&env);
    let mut agent = env.agent_with(&["--socket-lb", "off"]);
    agent.wait_for_frontend(VIP, 2, APPLY);
    // The agent calibrates the datapath's clock a quarter of a second after loading it.
    agent.wait_for_log(
        "the datapath reads its clock from jiffies",
        Duration::from_secs(10),
    );

    let started = std::time::Instant::now();
    let summary = client.client_with().cgroup(&env.cgroup).count(1).run(VIP);
    assert_eq!(summary.ok, 1, "{summary:?}");
    let prefix = format!("{}:", client.ip());
    let flow = |agent: &lb_tests::Agent| {
        agent
            .conntrack()
            .into_iter()
            .find(|f| f["client"].as_str().is_some_and(|c| c.starts_with(&prefix)))
            .unwrap_or_else(|| panic!("no flow of {prefix} in the conntrack"))
    };
    // The entries' times come from the datapath's clock, the ages from the agent's
    // CLOCK_MONOTONIC: they agree, and advance together. (Whole seconds, rounded down:
    // bounded by what the test's own clock saw pass.)
    let seconds = |value: &serde_json::Value| value.as_u64().expect("a number of seconds");
    let fresh = flow(&agent);
    let most = started.elapsed().as_secs_f64().ceil() as u64;
    for field in ["age_s", "idle_s"] {
        assert!(seconds(&fresh[field]) <= most, "a flow made now: {fresh}");
    }
    std::thread::sleep(Duration::from_millis(2_200));
    let later = flow(&agent);
    let most = started.elapsed().as_secs_f64().ceil() as u64;
    for field in ["age_s", "idle_s"] {
        let s = seconds(&later[field]);
        assert!((2..=most).contains(&s), "2.2 s later, {field} {s}: {later}");
    }
}
