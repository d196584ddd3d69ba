//! UDP through a ClusterIP, as a DNS client does it: unconnected `sendto`/`recvfrom`, where the
//! answer must appear to come from the ClusterIP, and connected sockets.

use std::collections::BTreeSet;
use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use lb_tests::clock::monotonic_ns;
use lb_tests::manifests::{pod, service};
use lb_tests::testkit::enter_netns;
use lb_tests::{EXT_DEVICE, NODE_EXT_IP, Pod, Server, TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const DNS_VIP: &str = "10.96.0.10:53";

/// Two pods `dns1`, `dns2` (`app: dns`) answering UDP on 5353 (container port `dns`), a client
/// pod, and Service `dns` 10.96.0.10:53/UDP → `dns`.
fn dns_setup(env: &TestEnv) -> (Vec<(Pod, Server)>, Pod) {
    let mut backends = Vec::new();
    for name in ["dns1", "dns2"] {
        let pod_ns = env.topo.add_pod(name);
        let server = pod_ns.spawn_udp_server(name, 5353);
        env.manifests.write(
            &TestEnv::pod_file(name),
            &pod(name, pod_ns.ip())
                .label("app", "dns")
                .container_port_full("dns", 5353, "UDP")
                .yaml(),
        );
        backends.push((pod_ns, server));
    }
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-dns.yaml",
        &service("dns", "10.96.0.10")
            .selector("app", "dns")
            .port_full(Some("dns"), 53, "dns", "UDP")
            .yaml(),
    );
    (backends, client)
}

#[test]
fn unconnected_udp_answers_come_from_the_cluster_ip() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, client) = dns_setup(&env);
    let mut agent = env.agent();
    agent.wait_for_frontend_proto(DNS_VIP, "UDP", 2, APPLY);

    // 30 resolvers, each sending 4 queries from its own unconnected socket.
    let summary = client
        .client_with()
        .cgroup(&env.cgroup)
        .udp()
        .count(30)
        .sends(4)
        .run(DNS_VIP);

    assert_eq!(summary.ok, 120, "every query answered: {summary:?}");
    assert_eq!(
        summary.peers(),
        BTreeSet::from([DNS_VIP]),
        "recvfrom() must report the ClusterIP:port as the answer's source, never a backend: {:?}",
        summary.peer_addrs
    );
    assert_eq!(
        summary.host_names(),
        ["dns1", "dns2"],
        "across sockets both backends answer: {:?}",
        summary.hosts
    );
    // By design an unconnected socket keeps one backend per Service (as a conntrack entry would
    // under kube-proxy), so a resolver's queries and answers stay together.
    for (socket, hosts) in summary.hosts_by_socket() {
        assert_eq!(
            hosts.len(),
            1,
            "socket {socket} was answered by {hosts:?}: {summary:?}"
        );
    }
    assert_eq!(
        summary.remote_ips(),
        BTreeSet::from([IpAddr::from(client.ip())]),
        "no SNAT: the backends saw the client pod's address"
    );
}

#[test]
fn connected_udp_reaches_a_backend_and_getpeername_is_the_cluster_ip() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, client) = dns_setup(&env);
    let mut agent = env.agent();
    agent.wait_for_frontend_proto(DNS_VIP, "UDP", 2, APPLY);

    let summary = client
        .client_with()
        .cgroup(&env.cgroup)
        .connected()
        .count(30)
        .sends(2)
        .run(DNS_VIP);

    assert_eq!(summary.ok, 60, "every query answered: {summary:?}");
    assert_eq!(
        summary.peers(),
        BTreeSet::from([DNS_VIP]),
        "getpeername() of a connected UDP socket is the ClusterIP:port: {:?}",
        summary.peer_addrs
    );
    assert_eq!(
        summary.host_names(),
        ["dns1", "dns2"],
        "{:?}",
        summary.hosts
    );
    for (socket, hosts) in summary.hosts_by_socket() {
        assert_eq!(hosts.len(), 1, "a connected socket has one peer: {socket}");
    }
    assert_eq!(
        summary.remote_ips(),
        BTreeSet::from([IpAddr::from(client.ip())])
    );
}

#[test]
fn udp_to_a_cluster_ip_without_endpoints_is_refused() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-dns.yaml",
        &service("dns", "10.96.0.10")
            .selector("app", "nothing-matches")
            .port_full(Some("dns"), 53, 5353, "UDP")
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend_proto(DNS_VIP, "UDP", 0, APPLY);

    let unconnected = client
        .client_with()
        .cgroup(&env.cgroup)
        .udp()
        .count(3)
        .run(DNS_VIP);
    let connected = client
        .client_with()
        .cgroup(&env.cgroup)
        .connected()
        .count(3)
        .run(DNS_VIP);

    assert_eq!(
        unconnected.errors_of("ECONNREFUSED"),
        3,
        "sendto() to a Service without endpoints fails with ECONNREFUSED: {unconnected:?}"
    );
    assert_eq!(
        connected.errors_of("ECONNREFUSED"),
        3,
        "connect() likewise: {connected:?}"
    );
    for summary in [&unconnected, &connected] {
        assert!(
            summary.connect_ms.iter().all(|ms| *ms < 100.0),
            "refused at once: {:?}",
            summary.connect_ms
        );
    }
}

#[test]
fn a_resolver_socket_keeps_seeing_the_cluster_ip_across_scaling_and_an_agent_restart() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (_backends, client) = dns_setup(&env);
    // dns3 runs from the start; its Pod manifest comes while the socket is in use.
    let dns3 = env.topo.add_pod("dns3");
    let _dns3_server = dns3.spawn_udp_server("dns3", 5353);
    let mut agent = env.agent();
    agent.wait_for_frontend_proto(DNS_VIP, "UDP", 2, APPLY);

    // One unconnected socket, a query every 100 ms for 6 s.
    let (summary, changes_done_ns) = std::thread::scope(|scope| {
        let resolver = scope.spawn(|| {
            client
                .client_with()
                .cgroup(&env.cgroup)
                .udp()
                .sends(60)
                .interval_ms(100)
                .run(DNS_VIP)
        });
        std::thread::sleep(Duration::from_millis(500));
        env.manifests.write(
            &TestEnv::pod_file("dns3"),
            &pod("dns3", dns3.ip())
                .label("app", "dns")
                .container_port_full("dns", 5353, "UDP")
                .yaml(),
        );
        agent.wait_for_frontend_proto(DNS_VIP, "UDP", 3, APPLY);
        agent.kill();
        std::thread::sleep(Duration::from_millis(300));
        agent.start();
        agent.wait_for_frontend_proto(DNS_VIP, "UDP", 3, APPLY);
        let done = monotonic_ns();
        (resolver.join().expect("resolver thread"), done)
    });

    assert_eq!(summary.ok, 60, "every query answered: {summary:?}");
    assert_eq!(
        summary.peers(),
        BTreeSet::from([DNS_VIP]),
        "the answers come from the ClusterIP throughout (the reverse translation survives a \
         scale-up and an agent restart): {:?}",
        summary.attempts
    );
    let after = summary
        .attempts
        .iter()
        .filter(|a| a.start_ns > changes_done_ns)
        .count();
    assert!(
        after >= 5,
        "the socket outlived the changes by only {after} queries; the test proved nothing"
    );
}

/// Upstream's "should be able to preserve UDP traffic when server pod cycles for a
/// ClusterIP service" and Cilium's stale connected sockets: a connected UDP socket whose
/// backend goes away is ended (its next call fails) within a second, so the application
/// reconnects through the Service instead of talking to a gone pod for ever; an
/// unconnected socket of the same client is left alone and simply reaches the live backend.
#[test]
fn a_connected_udp_socket_to_a_removed_backend_is_ended_within_a_second() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (backends, client) = dns_setup(&env);
    // Only dns1 at first: the socket is connected to it.
    env.manifests.remove(&TestEnv::pod_file("dns2"));
    let mut agent = env.agent();
    agent.wait_for_frontend_proto(DNS_VIP, "UDP", 1, APPLY);
    let dns2 = backends[1].0.ip();

    let (connected, unconnected, removed_ns) = std::thread::scope(|scope| {
        let connected = scope.spawn(|| {
            client
                .client_with()
                .cgroup(&env.cgroup)
                .udp()
                .connected()
                .sends(30)
                .interval_ms(100)
                .timeout_ms(300)
                .run(DNS_VIP)
        });
        let unconnected = scope.spawn(|| {
            client
                .client_with()
                .cgroup(&env.cgroup)
                .udp()
                .sends(30)
                .interval_ms(100)
                .timeout_ms(300)
                .run(DNS_VIP)
        });
        std::thread::sleep(Duration::from_millis(800));
        // dns1 goes (its server still answers, so a socket left on it would show), dns2
        // comes.
        replace_dns1_by_dns2(&env, &mut agent, DNS_VIP, dns2);
        let removed = monotonic_ns();
        (
            connected.join().expect("client thread"),
            unconnected.join().expect("client thread"),
            removed,
        )
    });

    let late = |s: &lb_tests::ClientSummary| -> Vec<String> {
        s.attempts
            .iter()
            .filter(|a| a.start_ns > removed_ns + 1_000_000_000)
            .map(|a| a.host.clone().or(a.error.clone()).unwrap_or_default())
            .collect()
    };
    let before = connected.count("dns1");
    assert!(before > 0, "the socket reached dns1 first: {connected:?}");
    let after = late(&connected);
    assert!(
        after.len() >= 5 && !after.iter().any(|h| h == "dns1"),
        "a second after dns1 left, the connected socket no longer reaches it: {after:?} {connected:?}"
    );
    assert!(
        !connected.errors.is_empty(),
        "the application was told (its socket was ended): {connected:?}"
    );
    let after = late(&unconnected);
    assert!(
        after.len() >= 5 && after.iter().all(|h| h == "dns2"),
        "the unconnected socket was not ended and reaches dns2: {after:?} {unconnected:?}"
    );
}

/// The fixed source port upstream's conntrack tests send from.
const CLIENT_PORT: u16 = 12345;

/// One datagram exchange of [`fixed_port_client`]: when it was sent, and the answering
/// server's name with the answer's source, or the error.
#[derive(Debug, Clone)]
struct Exchange {
    at_ns: u64,
    answer: Result<(String, String), String>,
}

/// Sends `count` datagrams 100 ms apart to `target` from `CLIENT_PORT` of the namespace
/// `netns`, on one socket (the same 5-tuple every time, as upstream's `nc -u -p 12345` loop
/// makes), outside any cgroup: the tc datapath translates them.
fn fixed_port_client(netns: &str, target: &str, count: u32) -> Vec<Exchange> {
    enter_netns(netns).expect("entering the client namespace");
    let socket = UdpSocket::bind(("0.0.0.0", CLIENT_PORT)).expect("binding the fixed port");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut exchanges = Vec::new();
    for _ in 0..count {
        let at_ns = monotonic_ns();
        let answer = socket
            .send_to(b"hostname", target)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                let mut buf = [0u8; 256];
                let (n, from) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let name = text
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                Ok((name, from.to_string()))
            });
        exchanges.push(Exchange { at_ns, answer });
        std::thread::sleep(Duration::from_millis(100));
    }
    exchanges
}

/// The answering names of the exchanges sent after `after_ns`.
fn names_after(exchanges: &[Exchange], after_ns: u64) -> Vec<String> {
    exchanges
        .iter()
        .filter(|e| e.at_ns > after_ns)
        .map(|e| match &e.answer {
            Ok((name, _)) => name.clone(),
            Err(e) => format!("error: {e}"),
        })
        .collect()
}

/// Waits until `client` gets an answer from `target` itself: the agent attaches its tc
/// programs one by one after writing the maps, and until the egress one is there an answer
/// arrives untranslated, from the backend's own address.
fn wait_until_translated_both_ways(client: &Pod, target: &str) {
    let deadline = std::time::Instant::now() + APPLY;
    loop {
        let summary = client.client_with().udp().timeout_ms(300).run(target);
        if summary.peer_addrs.iter().any(|p| p == target) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{target} never answered from itself: {summary:?}"
        );
    }
}

/// The server pod cycles: `dns2`'s Pod comes and `dns1`'s goes (its server keeps answering,
/// so traffic left on it would show); returns once the agent lists dns2 alone behind the UDP
/// frontend `frontend`.
fn replace_dns1_by_dns2(
    env: &TestEnv,
    agent: &mut lb_tests::Agent,
    frontend: &str,
    dns2: impl Into<IpAddr>,
) {
    let dns2 = dns2.into();
    env.manifests.write(
        &TestEnv::pod_file("dns2"),
        &pod("dns2", dns2)
            .label("app", "dns")
            .container_port_full("dns", 5353, "UDP")
            .yaml(),
    );
    env.manifests.remove(&TestEnv::pod_file("dns1"));
    let only_dns2 = vec![format!("{dns2}:5353")];
    agent.wait_until("dns2 alone behind the Service", APPLY, |frontends| {
        frontends
            .iter()
            .find(|f| f.addr() == frontend && f.protocol == "UDP")
            .filter(|f| f.backend_addrs() == only_dns2)
            .map(|_| ())
    });
}

/// The server pod cycles while a client keeps sending from one source port to `target`:
/// `dns1` is replaced by `dns2` (dns1's server keeps answering, so a flow left on it would
/// show). Returns the exchanges and when the agent listed dns2 alone.
fn cycle_the_server_under_a_fixed_port_client(
    env: &TestEnv,
    agent: &mut lb_tests::Agent,
    frontend: &str,
    client_netns: &str,
    target: &str,
    dns2: IpAddr,
) -> (Vec<Exchange>, u64) {
    std::thread::scope(|scope| {
        let netns = client_netns.to_owned();
        let target = target.to_owned();
        let client = scope.spawn(move || fixed_port_client(&netns, &target, 40));
        std::thread::sleep(Duration::from_millis(1_000));
        replace_dns1_by_dns2(env, agent, frontend, dns2);
        let switched = monotonic_ns();
        (client.join().expect("client thread"), switched)
    })
}

/// Asserts the fixed-port client reached dns1 first, and only dns2 from a second after the
/// switch on, with answers from `answer_from`.
#[track_caller]
fn assert_followed_the_cycle(exchanges: &[Exchange], switched_ns: u64, answer_from: &str) {
    let before = names_after(exchanges, 0);
    assert_eq!(
        before.first().map(String::as_str),
        Some("dns1"),
        "{exchanges:#?}"
    );
    let after = names_after(exchanges, switched_ns + 1_000_000_000);
    assert!(
        after.len() >= 5 && after.iter().all(|n| n == "dns2"),
        "from a second after the cycle on, the same source port reaches the new server only: \
         {after:?}"
    );
    assert!(
        exchanges
            .iter()
            .filter_map(|e| e.answer.as_ref().ok())
            .all(|(_, from)| from == answer_from),
        "answers come from {answer_from}: {exchanges:#?}"
    );
}

/// Upstream `should be able to preserve UDP traffic when server pod cycles for a NodePort
/// service`: a client outside sending from fixed source port 12345 to nodeIP:NodePort
/// reaches the new server once the old one is replaced.
#[test]
fn a_fixed_source_port_udp_client_follows_the_server_cycling_behind_a_node_port() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (backends, _client) = dns_setup(&env);
    env.manifests.remove(&TestEnv::pod_file("dns2"));
    env.manifests.write(
        "svc-dns.yaml",
        &service("dns", "10.96.0.10")
            .type_("NodePort")
            .selector("app", "dns")
            .node_port(53, "dns", 30053, "UDP")
            .yaml(),
    );
    let outside = env.topo.add_external_client("outside");
    let mut agent = env.agent_with(&["--devices", EXT_DEVICE]);
    agent.wait_for_frontend_proto("0.0.0.0:30053", "UDP", 1, APPLY);
    let target = format!("{NODE_EXT_IP}:30053");
    wait_until_translated_both_ways(&outside, &target);

    let (exchanges, switched) = cycle_the_server_under_a_fixed_port_client(
        &env,
        &mut agent,
        "0.0.0.0:30053",
        outside.netns(),
        &target,
        backends[1].0.ip().into(),
    );

    assert_followed_the_cycle(&exchanges, switched, &target);
}

/// Upstream `should be able to preserve UDP traffic when server pod cycles for a ClusterIP
/// service`, on the per-packet path (`--socket-lb off`), where a pod's flow from fixed
/// source port 12345 is tracked by tc as a NodePort flow is.
#[test]
fn a_fixed_source_port_udp_client_follows_the_server_cycling_behind_a_cluster_ip() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (backends, client) = dns_setup(&env);
    env.manifests.remove(&TestEnv::pod_file("dns2"));
    let mut agent = env.agent_with(&["--socket-lb", "off"]);
    agent.wait_for_frontend_proto(DNS_VIP, "UDP", 1, APPLY);
    wait_until_translated_both_ways(&client, DNS_VIP);

    let (exchanges, switched) = cycle_the_server_under_a_fixed_port_client(
        &env,
        &mut agent,
        DNS_VIP,
        client.netns(),
        DNS_VIP,
        backends[1].0.ip().into(),
    );

    assert_followed_the_cycle(&exchanges, switched, DNS_VIP);
}

/// Upstream `should be able to preserve UDP traffic when initial unready endpoints get
/// ready`: a client outside sends from fixed source port 12345 to a UDP NodePort whose only
/// pod is not ready yet (nothing answers); once the pod is ready the same flow reaches it.
#[test]
fn a_fixed_source_port_udp_client_reaches_an_endpoint_that_becomes_ready() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let dns = env.topo.add_pod("dns1");
    let _server = dns.spawn_udp_server("dns1", 5353);
    let dns_pod = |ready: bool| {
        pod("dns1", dns.ip())
            .label("app", "dns")
            .container_port_full("dns", 5353, "UDP")
            .ready(ready)
            .yaml()
    };
    env.manifests
        .write(&TestEnv::pod_file("dns1"), &dns_pod(false));
    env.manifests.write(
        "svc-dns.yaml",
        &service("dns", "10.96.0.10")
            .type_("NodePort")
            .selector("app", "dns")
            .node_port(53, "dns", 30053, "UDP")
            .yaml(),
    );
    let outside = env.topo.add_external_client("outside");
    let mut agent = env.agent_with(&["--devices", EXT_DEVICE]);
    agent.wait_for_frontend_proto("0.0.0.0:30053", "UDP", 0, APPLY);
    let target = format!("{NODE_EXT_IP}:30053");

    let (exchanges, ready_ns) = std::thread::scope(|scope| {
        let netns = outside.netns().to_owned();
        let target = target.clone();
        let client = scope.spawn(move || fixed_port_client(&netns, &target, 40));
        std::thread::sleep(Duration::from_millis(1_000));
        env.manifests
            .write(&TestEnv::pod_file("dns1"), &dns_pod(true));
        agent.wait_for_frontend_proto("0.0.0.0:30053", "UDP", 1, APPLY);
        let ready = monotonic_ns();
        (client.join().expect("client thread"), ready)
    });

    let early: Vec<&Exchange> = exchanges
        .iter()
        .filter(|e| e.at_ns + 200_000_000 < exchanges[0].at_ns + 1_000_000_000)
        .collect();
    assert!(
        early.iter().all(|e| e.answer.is_err()),
        "nothing answers while the pod is not ready: {early:#?}"
    );
    let after = names_after(&exchanges, ready_ns + 1_000_000_000);
    assert!(
        after.len() >= 5 && after.iter().all(|n| n == "dns1"),
        "from a second after the pod got ready on, the same flow reaches it: {after:?}"
    );
}

/// Upstream `should be able to preserve UDP traffic when server pod cycles for a ClusterIP
/// service with InternalTrafficPolicy set to Local`, on the per-packet path: a pod on this
/// node (`node-a`) sends from fixed source port 12345 while a remote server is added, the
/// local server goes and a new local one comes; from a second after that on, the same flow
/// reaches the new local server only.
#[test]
fn a_fixed_source_port_udp_client_reaches_a_recreated_local_server_under_internal_local() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let names = ["dns1", "dns2", "dns3"];
    let pods: Vec<(Pod, Server)> = names
        .iter()
        .map(|name| {
            let p = env.topo.add_pod(name);
            let server = p.spawn_udp_server(name, 5353);
            (p, server)
        })
        .collect();
    let pod_yaml = |i: usize, node: &str| {
        pod(names[i], pods[i].0.ip())
            .label("app", "dns")
            .node_name(node)
            .container_port_full("dns", 5353, "UDP")
            .yaml()
    };
    env.manifests.write("pod-dns1.yaml", &pod_yaml(0, "node-a"));
    env.manifests.write(
        "svc-dns.yaml",
        &service("dns", "10.96.0.10")
            .selector("app", "dns")
            .internal_traffic_policy("Local")
            .port_full(Some("dns"), 53, "dns", "UDP")
            .yaml(),
    );
    let client = env.topo.add_pod("client");
    let mut agent = env.agent_with(&["--socket-lb", "off", "--node-name", "node-a"]);
    agent.wait_for_frontend_proto(DNS_VIP, "UDP", 1, APPLY);
    wait_until_translated_both_ways(&client, DNS_VIP);
    let only = |i: usize| vec![format!("{}:5353", pods[i].0.ip())];

    let (exchanges, recreated) = std::thread::scope(|scope| {
        let netns = client.netns().to_owned();
        let exchanges = scope.spawn(move || fixed_port_client(&netns, DNS_VIP, 60));
        std::thread::sleep(Duration::from_millis(1_000));
        // A server on another node, then the local one goes: nothing local is left.
        env.manifests.write("pod-dns2.yaml", &pod_yaml(1, "node-b"));
        std::thread::sleep(Duration::from_millis(500));
        env.manifests.remove("pod-dns1.yaml");
        agent.wait_for_frontend_proto(DNS_VIP, "UDP", 0, APPLY);
        std::thread::sleep(Duration::from_millis(500));
        // The local server is recreated (a new pod, a new address).
        env.manifests.write("pod-dns3.yaml", &pod_yaml(2, "node-a"));
        agent.wait_until("dns3 alone behind the Service", APPLY, |frontends| {
            frontends
                .iter()
                .find(|f| f.addr() == DNS_VIP && f.protocol == "UDP")
                .filter(|f| f.backend_addrs() == only(2))
                .map(|_| ())
        });
        let recreated = monotonic_ns();
        (exchanges.join().expect("client thread"), recreated)
    });

    let all = names_after(&exchanges, 0);
    assert_eq!(all.first().map(String::as_str), Some("dns1"), "{all:?}");
    assert!(
        !all.iter().any(|n| n == "dns2"),
        "the other node's server is never reached under Local: {all:?}"
    );
    let after = names_after(&exchanges, recreated + 1_000_000_000);
    assert!(
        after.len() >= 5 && after.iter().all(|n| n == "dns3"),
        "the same flow reaches the recreated local server: {after:?}"
    );
}

/// Upstream `should be able to preserve UDP traffic when server pod cycles for a ClusterIP
/// service and client is hostNetwork`: a process of the node itself (its network namespace,
/// inside the agent's cgroup) keeps one UDP socket, so one source port, sending every
/// 100 ms while dns1 is replaced by dns2; from a second after that on it reaches dns2 only.
#[test]
fn a_node_process_udp_socket_follows_the_server_cycling_behind_a_cluster_ip() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (backends, _client) = dns_setup(&env);
    env.manifests.remove(&TestEnv::pod_file("dns2"));
    let mut agent = env.agent();
    agent.wait_for_frontend_proto(DNS_VIP, "UDP", 1, APPLY);
    let dns2 = backends[1].0.ip();

    let (summary, switched) = std::thread::scope(|scope| {
        let summary = scope.spawn(|| {
            let mut command = std::process::Command::new(lb_tests::bins::testkit());
            command
                .arg("--cgroup")
                .arg(env.cgroup.path())
                .args([
                    "--netns",
                    env.topo.node().name(),
                    "client",
                    "--target",
                    DNS_VIP,
                ])
                .args([
                    "--count",
                    "1",
                    "--udp",
                    "--sends",
                    "40",
                    "--interval-ms",
                    "100",
                ])
                .args(["--timeout-ms", "300"]);
            let out = lb_tests::cmd::run(&mut command, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{e}"));
            serde_json::from_str::<lb_tests::ClientSummary>(out.trim())
                .unwrap_or_else(|e| panic!("{e}: {out}"))
        });
        std::thread::sleep(Duration::from_millis(800));
        replace_dns1_by_dns2(&env, &mut agent, DNS_VIP, dns2);
        let switched = monotonic_ns();
        (summary.join().expect("client thread"), switched)
    });

    let sockets: BTreeSet<u32> = summary.attempts.iter().map(|a| a.socket).collect();
    assert_eq!(sockets.len(), 1, "one socket throughout: {summary:?}");
    assert!(summary.count("dns1") > 0, "dns1 first: {summary:?}");
    let after: Vec<String> = summary
        .attempts
        .iter()
        .filter(|a| a.start_ns > switched + 1_000_000_000)
        .map(|a| a.host.clone().or(a.error.clone()).unwrap_or_default())
        .collect();
    assert!(
        after.len() >= 5 && after.iter().all(|h| h == "dns2"),
        "the node's socket reaches the new server: {after:?}"
    );
    assert!(
        summary.peer_addrs.iter().all(|p| p == DNS_VIP),
        "answers come from the ClusterIP: {summary:?}"
    );
}
