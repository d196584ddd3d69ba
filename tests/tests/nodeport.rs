//! NodePort, external IPs and LoadBalancer IPs from outside the node, through the tc
//! datapath: an external client namespace joined to the node's external device `ext0`
//! (192.168.50.1) dials the node; the agent runs with `--devices ext0`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use lb_tests::manifests::{Conditions, endpoint_slice, pod, service};
use lb_tests::testkit::enter_netns;
use lb_tests::{
    EXT_DEVICE, EXTERNAL_CLIENT_IP, EXTERNAL_CLIENT_IP6, Listen, NODE_EXT_IP, NODE_EXT_IP6,
    PEER_DEVICE, Pod, TestEnv, require_privileges,
};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const NODE_PORT: u16 = 30080;
/// How `lb-agent services` lists the NodePort frontend.
const NODE_PORT_FRONTEND: &str = "0.0.0.0:30080";

fn node_port_target() -> String {
    format!("{NODE_EXT_IP}:{NODE_PORT}")
}

fn webapp_node_port() -> String {
    service("webapp", "10.96.0.10")
        .type_("NodePort")
        .selector("app", "webapp")
        .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
        .yaml()
}

/// [`webapp_node_port`] as an IPv6 single-stack Service (fd00:96::10).
fn webapp_node_port6() -> String {
    service("webapp", "fd00:96::10")
        .type_("NodePort")
        .ip_families(&["IPv6"])
        .ip_family_policy("SingleStack")
        .selector("app", "webapp")
        .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
        .yaml()
}

/// Starts the agent with `--devices ext0` and `args`, and waits until its tc programs are
/// attached (their links pinned: the maps are written before the programs are attached).
fn start_agent(env: &TestEnv, args: &[&str]) -> lb_tests::Agent {
    let mut all = vec!["--devices", EXT_DEVICE];
    all.extend_from_slice(args);
    start_agent_with(env, &all)
}

/// [`start_agent`] with every argument given.
fn start_agent_with(env: &TestEnv, all: &[&str]) -> lb_tests::Agent {
    let mut agent = env.agent_with(all);
    let pin = env
        .pins
        .path()
        .join("links")
        .join(format!("tc-egress-{EXT_DEVICE}"));
    let deadline = std::time::Instant::now() + APPLY;
    while !pin.exists() {
        agent.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "{} not pinned within {APPLY:?}",
            pin.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent
}

/// Runs `f` on a thread inside the namespace of `pod` (setns affects only that thread).
fn in_netns<T: Send + 'static>(pod: &Pod, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = pod.netns().to_owned();
    std::thread::spawn(move || {
        enter_netns(&netns).expect("entering the client namespace");
        f()
    })
    .join()
    .expect("client thread")
}

/// The name in an answer of `lb-testkit serve`.
fn host_of(answer: &str) -> Option<String> {
    let (_, rest) = answer.split_once("processed by host: ")?;
    Some(rest.split_once("</h1>")?.0.to_owned())
}

/// One HTTP GET on an open connection, returning the raw answer.
fn get(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// TCP flows from a client namespace to the NodePort, opened and then held idle until
/// [`OpenFlows::answers`] makes one GET on each.
struct OpenFlows {
    go: std::sync::mpsc::Sender<()>,
    flows: std::thread::JoinHandle<Vec<std::io::Result<Option<String>>>>,
}

impl OpenFlows {
    /// Opens `count` flows from `netns`; returns once all are established.
    fn open(netns: &str, count: usize) -> Self {
        let target: SocketAddr = node_port_target().parse().unwrap();
        let netns = netns.to_owned();
        let (open_tx, open_rx) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let flows = std::thread::spawn(move || {
            enter_netns(&netns).unwrap();
            let mut streams: Vec<TcpStream> = (0..count)
                .map(|_| {
                    let s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    s
                })
                .collect();
            open_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            streams
                .iter_mut()
                .map(|s| get(s).map(|a| host_of(&a)))
                .collect()
        });
        open_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("flows open");
        Self { go, flows }
    }

    /// The host that answered each flow's GET, or the error it got.
    fn answers(self) -> Vec<std::io::Result<Option<String>>> {
        self.go.send(()).unwrap();
        self.flows.join().unwrap()
    }
}

#[test]
fn node_port_from_outside_reaches_local_backends_with_the_client_address() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 2, APPLY);

    // A TCP handshake only completes when the replies come from the address and port the
    // client dialled: every answered request shows the reverse translation worked.
    let summary = client.client_with().count(30).run(&node_port_target());

    assert_eq!(summary.ok, 30, "every connection answered: {summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    let prefix = format!("{EXTERNAL_CLIENT_IP}:");
    assert!(
        summary.remote_addrs.iter().all(|a| a.starts_with(&prefix)),
        "local backends see the client's own address (no SNAT): {:?}",
        summary.remote_addrs
    );
}

#[test]
fn a_cluster_ip_routed_to_the_node_from_outside_is_served() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);

    // The client's default route points at the node, so it reaches the Service CIDR
    // through it, as a router with a route to the Service CIDR would send it.
    let summary = client.client_with().count(10).run("10.96.0.10:80");

    assert_eq!(
        summary.ok, 10,
        "served as kube-proxy serves it: {summary:?}"
    );
    assert_eq!(summary.peers(), ["10.96.0.10:80"].into(), "{summary:?}");
    let prefix = format!("{EXTERNAL_CLIENT_IP}:");
    assert!(
        summary.remote_addrs.iter().all(|a| a.starts_with(&prefix)),
        "a local backend sees the client's address: {:?}",
        summary.remote_addrs
    );
}

#[test]
fn established_flows_keep_their_backend_when_a_backend_is_added() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);

    let flows = OpenFlows::open(client.netns(), 8);
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 2, APPLY);
    let answers = flows.answers();

    for answer in &answers {
        assert_eq!(
            answer.as_ref().ok().cloned().flatten().as_deref(),
            Some("webapp1"),
            "a flow opened before the change stays on its backend: {answers:?}"
        );
    }
    let summary = client.client_with().count(30).run(&node_port_target());
    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(
        summary.host_names(),
        ["webapp1", "webapp2"],
        "new flows use the new backend too: {summary:?}"
    );
}

/// The tc datapath checks a tracked flow's backend only on the first packet after the
/// agent deleted a backend (`backend_may_be_gone`): the agent must say it did, or a flow
/// would go on to a pod that no longer backs the Service.
#[test]
fn a_flow_whose_backend_is_removed_is_reset_instead_of_going_on_to_it() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);

    let flows = OpenFlows::open(client.netns(), 4);
    // webapp2's server keeps running: only the Service loses it.
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 2, APPLY);
    env.manifests.remove(&TestEnv::pod_file("webapp2"));
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let answers = flows.answers();

    for answer in &answers {
        assert_eq!(
            answer.as_ref().map(|_| ()).map_err(std::io::Error::kind),
            Err(std::io::ErrorKind::ConnectionReset),
            "a flow of the removed backend is reset by the one left: {answers:?}"
        );
    }
    let summary = client.client_with().count(10).run(&node_port_target());
    assert_eq!(summary.ok, 10, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1"], "{summary:?}");
}

#[test]
fn a_removed_backend_gets_no_new_flows() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 2, APPLY);
    let before = client.client_with().count(20).run(&node_port_target());
    assert_eq!(before.host_names(), ["webapp1", "webapp2"], "{before:?}");

    env.manifests.remove(&TestEnv::pod_file("webapp2"));
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let after = client.client_with().count(30).run(&node_port_target());

    assert_eq!(after.ok, 30, "{after:?}");
    assert_eq!(
        after.count("webapp1"),
        30,
        "only the remaining backend: {after:?}"
    );
}

#[test]
fn udp_node_port_answers_from_the_node_port() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let dns = env.topo.add_pod("dns1");
    let _server = dns.spawn_udp_server("dns1", 5353);
    env.manifests.write(
        "pod.yaml",
        &pod("dns1", dns.ip()).label("app", "dns").yaml(),
    );
    env.manifests.write(
        "svc.yaml",
        &service("dns", "10.96.0.53")
            .type_("NodePort")
            .selector("app", "dns")
            .node_port(53, 5353, 30053, "UDP")
            .yaml(),
    );
    let client = env.topo.add_external_client("outside");
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend_proto("0.0.0.0:30053", "UDP", 1, APPLY);

    let (answer, from, local_port) = in_netns(&client, || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let target = format!("{NODE_EXT_IP}:30053");
        socket.send_to(b"hi", &target).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = socket.recv_from(&mut buf).expect("an answer");
        (
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            from,
            socket.local_addr().unwrap().port(),
        )
    });

    assert_eq!(
        from.to_string(),
        format!("{NODE_EXT_IP}:30053"),
        "the answer comes from the NodePort"
    );
    assert_eq!(answer, format!("dns1 {EXTERNAL_CLIENT_IP}:{local_port}"));
}

#[test]
fn external_ip_and_load_balancer_ip_from_outside() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write(
        "svc.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .node_port(80, 8080, 30080, "TCP")
            .external_ip("192.168.60.10")
            .load_balancer_ingress("192.168.60.20", None)
            .yaml(),
    );
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend("192.168.60.20:80", 1, APPLY);

    for target in ["192.168.60.10:80", "192.168.60.20:80"] {
        let summary = client.client_with().count(5).run(target);
        assert_eq!(summary.ok, 5, "{target}: {summary:?}");
        assert_eq!(summary.count("webapp1"), 5, "{target}: {summary:?}");
    }
}

/// The LoadBalancer `webapp` (192.168.60.20) with these `loadBalancerSourceRanges`.
fn guarded_load_balancer(ranges: &[&str]) -> String {
    let mut svc = service("webapp", "10.96.0.10")
        .selector("app", "webapp")
        .node_port(80, 8080, 30080, "TCP")
        .load_balancer_ingress("192.168.60.20", None)
        .build();
    let spec = svc.spec.as_mut().unwrap();
    spec.load_balancer_source_ranges = Some(ranges.iter().map(|r| (*r).to_owned()).collect());
    lb_tests::manifests::to_yaml(&svc)
}

/// Upstream `should only allow access from service loadbalancer source ranges`, its in-cluster
/// part: pods served per packet (`--socket-lb off`, as with `host-only`) are held to the ranges
/// by their own address, as kube-proxy's firewall chain holds them. (The socket path cannot:
/// at `connect()` the socket has no source address yet; see docs/architecture.md.)
#[test]
fn load_balancer_source_ranges_hold_pods_served_per_packet_to_their_address() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let accepted = env.topo.add_pod("accepted");
    let refused = env.topo.add_pod("refused");
    env.manifests.write(
        "svc.yaml",
        &guarded_load_balancer(&[&format!("{}/32", accepted.ip())]),
    );
    let mut agent = env.agent_with(&["--socket-lb", "off"]);
    agent.wait_for_frontend("192.168.60.20:80", 1, APPLY);
    let deadline = Instant::now() + APPLY;
    while accepted
        .client_with()
        .count(1)
        .timeout_ms(300)
        .run("192.168.60.20:80")
        .ok
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the accepted pod never got through"
        );
    }

    let ok = accepted.client_with().count(5).run("192.168.60.20:80");
    assert_eq!(ok.count("webapp1"), 5, "inside the range: {ok:?}");
    let dropped = refused
        .client_with()
        .count(3)
        .timeout_ms(300)
        .run("192.168.60.20:80");
    assert_eq!(
        dropped.errors_of("ETIMEDOUT"),
        3,
        "outside the range: dropped, {dropped:?}"
    );
    // The ClusterIP of the same Service is not guarded.
    let cluster_ip = refused.client_with().count(3).run("10.96.0.10:80");
    assert_eq!(cluster_ip.count("webapp1"), 3, "{cluster_ip:?}");
}

#[test]
fn load_balancer_source_ranges_drop_other_sources_and_leave_node_ports_open() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    // The client (192.168.50.2) is outside the only range.
    env.manifests
        .write("svc.yaml", &guarded_load_balancer(&["203.0.113.0/24"]));
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend("192.168.60.20:80", 1, APPLY);

    let dropped = client
        .client_with()
        .count(3)
        .timeout_ms(300)
        .run("192.168.60.20:80");
    assert_eq!(
        dropped.errors_of("ETIMEDOUT"),
        3,
        "dropped silently, as kube-proxy's firewall chain: {dropped:?}"
    );
    // The NodePort of the same Service is not guarded (kube-proxy guards the LB IPs).
    let node_port = client.client_with().count(3).run(&node_port_target());
    assert_eq!(node_port.ok, 3, "{node_port:?}");

    // A range holding the client lets it in, on the next connection.
    env.manifests.write(
        "svc.yaml",
        &guarded_load_balancer(&["203.0.113.0/24", "192.168.50.0/24"]),
    );
    let deadline = Instant::now() + APPLY;
    while client
        .client_with()
        .count(1)
        .timeout_ms(300)
        .run("192.168.60.20:80")
        .ok
        == 0
    {
        assert!(Instant::now() < deadline, "the new range never took effect");
    }
    let allowed = client.client_with().count(5).run("192.168.60.20:80");
    assert_eq!(allowed.count("webapp1"), 5, "{allowed:?}");
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_only_local_endpoints() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let local = env.topo.add_pod("local1");
    let _local = local.spawn_server("local1", 8080);
    // Runs on this machine's bridge too, but is declared to be on another node: if the
    // policy let it be chosen, its answers would show.
    let remote = env.topo.add_pod("remote1");
    let _remote = remote.spawn_server("remote1", 8080);
    env.manifests.write(
        "pods.yaml",
        &lb_tests::manifests::documents(&[
            pod("local1", local.ip())
                .label("app", "webapp")
                .node_name("node-a")
                .yaml(),
            pod("remote1", remote.ip())
                .label("app", "webapp")
                .node_name("node-b")
                .yaml(),
        ]),
    );
    env.manifests.write(
        "svc.yaml",
        &service("webapp", "10.96.0.10")
            .type_("NodePort")
            .selector("app", "webapp")
            .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
            .external_traffic_policy("Local")
            .yaml(),
    );
    let client = env.topo.add_external_client("outside");
    let mut agent = start_agent(&env, &["--node-name", "node-a"]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);

    let summary = client.client_with().count(20).run(&node_port_target());

    assert_eq!(summary.ok, 20, "{summary:?}");
    assert_eq!(
        summary.count("local1"),
        20,
        "only the local endpoint: {summary:?}"
    );
    let prefix = format!("{EXTERNAL_CLIENT_IP}:");
    assert!(
        summary.remote_addrs.iter().all(|a| a.starts_with(&prefix)),
        "the client address is preserved: {:?}",
        summary.remote_addrs
    );
    // The ClusterIP still has both (the policy is for traffic from outside).
    agent.wait_for_frontend("10.96.0.10:80", 2, APPLY);
}

/// `GET /` on `target` from `pod`: (status code, body).
fn http_get(pod: &Pod, target: &str) -> (u16, String) {
    let target: SocketAddr = target.parse().unwrap();
    in_netns(pod, move || {
        let answer =
            TcpStream::connect_timeout(&target, Duration::from_secs(2)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                get(&mut s)
            });
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => return (0, e.to_string()),
        };
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
}

#[test]
fn health_check_node_port_answers_200_with_local_endpoints_and_503_without() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let local = env.topo.add_pod("local1");
    let _server = local.spawn_server("local1", 8080);
    let pod_yaml = |node: &str| {
        pod("local1", local.ip())
            .label("app", "webapp")
            .node_name(node)
            .yaml()
    };
    env.manifests.write("pod.yaml", &pod_yaml("node-a"));
    env.manifests.write(
        "svc.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
            .load_balancer_ingress("192.168.60.20", None)
            .external_traffic_policy("Local")
            .health_check_node_port(32100)
            .yaml(),
    );
    let client = env.topo.add_external_client("outside");
    let mut agent = start_agent(&env, &["--node-name", "node-a"]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let health = format!("{NODE_EXT_IP}:32100");

    let (status, body) = wait_for_status(&client, &health, 200);
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let expected = serde_json::json!({
        "service": {"namespace": "default", "name": "webapp"},
        "localEndpoints": 1,
        "serviceProxyHealthy": true,
    });
    assert_eq!(body, expected);
    // The same server answers over IPv6 (kube-proxy listens on every node address).
    let health6 = format!("[{NODE_EXT_IP6}]:32100");
    let (status, body) = wait_for_status(&client, &health6, 200);
    assert_eq!(status, 200, "over IPv6: {body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        expected
    );

    // The endpoint moves to another node: nothing local is left.
    env.manifests.write("pod.yaml", &pod_yaml("node-b"));
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 0, APPLY);
    let (status, body) = wait_for_status(&client, &health, 503);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
}

/// Polls the health check until it answers `want` (bounded: 5 s).
fn wait_for_status(client: &Pod, target: &str, want: u16) -> (u16, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = http_get(client, target);
        if status == want || std::time::Instant::now() >= deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Service of the two-node tests: its only endpoint runs on node-b, behind the second
/// node; this agent is node-a's, with both of its devices.
fn remote_endpoint_setup(policy: &str) -> (TestEnv, Pod, Pod, lb_tests::Server) {
    let env = TestEnv::new();
    let remote = env.topo.add_remote_node_with_pod("remote1");
    let server = remote.spawn_server("remote1", 8080);
    env.manifests.write(
        "pod.yaml",
        &pod("remote1", remote.ip())
            .label("app", "webapp")
            .node_name("node-b")
            .yaml(),
    );
    env.manifests.write(
        "svc.yaml",
        &service("webapp", "10.96.0.10")
            .type_("NodePort")
            .selector("app", "webapp")
            .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
            .external_traffic_policy(policy)
            .yaml(),
    );
    let client = env.topo.add_external_client("outside");
    (env, client, remote, server)
}

#[test]
fn cluster_policy_snats_to_a_backend_on_another_node_and_replies_return_through_this_node() {
    if !require_privileges() {
        return;
    }
    let (env, client, _remote, _server) = remote_endpoint_setup("Cluster");
    let devices = format!("{EXT_DEVICE},{PEER_DEVICE}");
    let mut agent = start_agent_with(&env, &["--devices", &devices, "--node-name", "node-a"]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);

    let summary = client.client_with().count(20).run(&node_port_target());

    assert_eq!(summary.ok, 20, "every connection answered: {summary:?}");
    assert_eq!(summary.count("remote1"), 20, "{summary:?}");
    // The backend sees the node address with an SNAT port, so its replies come back here.
    for addr in &summary.remote_addrs {
        let addr: SocketAddr = addr.parse().unwrap();
        assert_eq!(
            addr.ip().to_string(),
            NODE_EXT_IP.to_string(),
            "{summary:?}"
        );
        assert!(
            (32_768..=60_999).contains(&addr.port()),
            "SNAT port from the range: {summary:?}"
        );
    }
    // `lb-agent conntrack` lists the flows with the SNAT port the backend saw.
    let flows = agent.conntrack();
    let snats: Vec<&str> = flows.iter().filter_map(|f| f["snat"].as_str()).collect();
    for addr in &summary.remote_addrs {
        assert!(snats.contains(&addr.as_str()), "{addr} in {flows:#?}");
    }
    assert!(
        flows
            .iter()
            .all(|f| f["backend"] == "10.245.0.2:8080" && f["frontend"] == "192.168.50.1:30080"),
        "{flows:#?}"
    );
}

#[test]
fn ipv6_cluster_policy_snats_to_a_backend_on_another_node() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let remote = env.topo.add_remote_node_with_pod("remote1");
    let _server = remote.spawn_server6("remote1", 8080);
    env.manifests.write(
        "pod.yaml",
        &pod("remote1", remote.ip())
            .also_ip(remote.ip6())
            .label("app", "webapp")
            .node_name("node-b")
            .yaml(),
    );
    env.manifests.write("svc.yaml", &webapp_node_port6());
    let client = env.topo.add_external_client("outside");
    let devices = format!("{EXT_DEVICE},{PEER_DEVICE}");
    let mut agent = start_agent_with(&env, &["--devices", &devices, "--node-name", "node-a"]);
    agent.wait_for_frontend("[::]:30080", 1, APPLY);

    let target = format!("[{NODE_EXT_IP6}]:{NODE_PORT}");
    let summary = client.client_with().count(10).run(&target);

    assert_eq!(summary.ok, 10, "every connection answered: {summary:?}");
    assert_eq!(summary.count("remote1"), 10, "{summary:?}");
    // The backend sees the node's IPv6 address with an SNAT port.
    for addr in &summary.remote_addrs {
        let addr: SocketAddr = addr.parse().unwrap();
        assert_eq!(
            addr.ip().to_string(),
            NODE_EXT_IP6.to_string(),
            "{summary:?}"
        );
        assert!((32_768..=60_999).contains(&addr.port()), "{summary:?}");
    }
}

#[test]
fn tracked_flows_survive_an_agent_restart_and_cleanup_detaches_the_tc_programs() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let target: SocketAddr = node_port_target().parse().unwrap();
    let netns = client.netns().to_owned();
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let flow = std::thread::spawn(move || {
        enter_netns(&netns).unwrap();
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        open_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        get(&mut stream)
            .map(|a| host_of(&a))
            .map_err(|e| e.to_string())
    });
    open_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("flow open");
    let flows = agent.conntrack();
    assert_eq!(flows.len(), 1, "{flows:#?}");
    assert_eq!(flows[0]["state"], "ESTABLISHED", "{flows:#?}");

    // A new agent replaces the tc links; the pinned conntrack map keeps the flow.
    agent.kill();
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    go_tx.send(()).unwrap();
    assert_eq!(
        flow.join().unwrap(),
        Ok(Some("webapp1".to_owned())),
        "the flow opened before the restart is answered"
    );

    agent.stop(Duration::from_secs(3));
    // The programs stay attached after the agent exits (bpftool 7.1 does not list TCX
    // links, so this is checked by what they do).
    let summary = client.client_with().count(3).run(&node_port_target());
    assert_eq!(
        summary.ok, 3,
        "NodePort without a running agent: {summary:?}"
    );
    lb_tests::bpffs::agent_cleanup(env.pins.path()).unwrap_or_else(|e| panic!("{e}"));
    let summary = client
        .client_with()
        .count(1)
        .timeout_ms(300)
        .run(&node_port_target());
    assert_eq!(summary.ok, 0, "no NodePort after cleanup: {summary:?}");
}

#[test]
fn local_policy_never_sends_to_an_endpoint_on_another_node() {
    if !require_privileges() {
        return;
    }
    let (env, client, _remote, _server) = remote_endpoint_setup("Local");
    let devices = format!("{EXT_DEVICE},{PEER_DEVICE}");
    let mut agent = start_agent_with(&env, &["--devices", &devices, "--node-name", "node-a"]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 0, APPLY);

    let summary = client
        .client_with()
        .count(3)
        .timeout_ms(300)
        .run(&node_port_target());

    assert_eq!(summary.ok, 0, "no local endpoint: dropped, {summary:?}");
    // Dropped, not rejected: kube-proxy's KUBE-EXT chain drops traffic to a Service with
    // endpoints, none of them local.
    assert_eq!(
        summary.errors_of("ETIMEDOUT"),
        3,
        "dropped, not refused: {summary:?}"
    );
    assert_eq!(summary.count("remote1"), 0, "{summary:?}");
}

/// Runs `f` on a thread inside the node namespace.
fn in_node<T: Send + 'static>(env: &TestEnv, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = env.topo.node().name().to_owned();
    std::thread::spawn(move || {
        enter_netns(&netns).expect("entering the node namespace");
        f()
    })
    .join()
    .expect("node thread")
}

#[test]
fn a_node_port_without_endpoints_refuses_tcp_connections_at_once() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_external_client("outside");
    // The selector matches no pod.
    env.manifests.write("svc.yaml", &webapp_node_port());
    // The node's own stack listens on the NodePort: had the datapath passed the SYN on, the
    // connection would succeed; had it dropped it, the connect would time out. Only the
    // datapath's ICMP port unreachable makes it fail with ECONNREFUSED.
    let _stack = in_node(&env, || {
        TcpListener::bind((NODE_EXT_IP, NODE_PORT)).expect("listening on the node")
    });
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 0, APPLY);

    let summary = client
        .client_with()
        .count(5)
        .timeout_ms(3000)
        .run(&node_port_target());

    assert_eq!(summary.errors_of("ECONNREFUSED"), 5, "{summary:?}");
    assert!(
        summary.connect_ms.iter().all(|ms| *ms < 500.0),
        "refused at once, not after a timeout: {:?}",
        summary.connect_ms
    );
}

#[test]
fn an_ipv6_node_port_without_endpoints_refuses_tcp_connections() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port6());
    // As for IPv4: only the datapath's ICMPv6 port unreachable gives ECONNREFUSED here.
    let _stack = in_node(&env, || {
        TcpListener::bind((NODE_EXT_IP6, NODE_PORT)).expect("listening on the node")
    });
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend("[::]:30080", 0, APPLY);

    let target = format!("[{NODE_EXT_IP6}]:{NODE_PORT}");
    let summary = client.client_with().count(3).timeout_ms(3000).run(&target);

    assert_eq!(summary.errors_of("ECONNREFUSED"), 3, "{summary:?}");
    // Over a veth on one machine the ICMPv6 error reaches the client's socket within the
    // very connect() that sent the SYN, while the socket is locked, and the kernel drops
    // it (TcpExtLockDroppedIcmps); the SYN's retransmission after a second gets the one
    // that counts. A client on another machine gets the first. Either way: refused, not
    // timed out.
    assert!(
        summary.connect_ms.iter().all(|ms| *ms < 2000.0),
        "refused by the first SYN or its retransmission, not after the timeout: {:?}",
        summary.connect_ms
    );
}

#[test]
fn a_udp_node_port_without_endpoints_refuses_connected_sockets() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_external_client("outside");
    env.manifests.write(
        "svc.yaml",
        &service("dns", "10.96.0.53")
            .type_("NodePort")
            .selector("app", "dns")
            .node_port(53, 5353, 30053, "UDP")
            .yaml(),
    );
    // A socket of the node's own stack on the NodePort: a datagram passed on would be
    // queued there silently (no ICMP from the stack), and the client would time out.
    let _stack = in_node(&env, || {
        UdpSocket::bind((NODE_EXT_IP, 30053)).expect("bound on the node")
    });
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend_proto("0.0.0.0:30053", "UDP", 0, APPLY);

    let started = Instant::now();
    let summary = client
        .client_with()
        .connected()
        .count(3)
        .timeout_ms(2000)
        .run(&format!("{NODE_EXT_IP}:30053"));
    let took = started.elapsed();

    // The ICMP error is queued on the connected socket; its recv() reports it.
    assert_eq!(summary.errors_of("request:ECONNREFUSED"), 3, "{summary:?}");
    assert!(
        took < Duration::from_secs(2),
        "refused at once, not after an answer timeout: {took:?}"
    );
}

/// Under `externalTrafficPolicy: Local` only clients outside the cluster are kept to this
/// node's endpoints: a pod dialling the NodePort reaches the endpoint on the other node
/// (kube-proxy short-circuits in-cluster traffic to the cluster-wide chain), whether its
/// connect is translated by the socket hooks or its packets by tc (`extra`).
fn pods_reach_every_endpoint_of_a_local_policy_service(extra: &[&str]) {
    let (env, _outside, remote, _server) = remote_endpoint_setup("Local");
    let pod_client = env.topo.add_pod("client");
    let devices = format!("{EXT_DEVICE},{PEER_DEVICE}");
    let mut args = vec!["--devices", devices.as_str(), "--node-name", "node-a"];
    args.extend_from_slice(extra);
    let mut agent = start_agent_with(&env, &args);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 0, APPLY);

    let summary = pod_client.client(&env.cgroup, &node_port_target(), 5);

    assert_eq!(summary.ok, 5, "{summary:?}");
    assert_eq!(summary.count("remote1"), 5, "{summary:?}");
    assert!(
        summary
            .remote_addrs
            .iter()
            .all(|a| a.starts_with(&format!("{}:", pod_client.ip()))),
        "the remote pod sees the client pod, {summary:?} (remote {})",
        remote.ip()
    );
}

#[test]
fn pods_reach_every_endpoint_of_a_local_policy_service_through_the_socket_hooks() {
    if !require_privileges() {
        return;
    }
    pods_reach_every_endpoint_of_a_local_policy_service(&[]);
}

#[test]
fn pods_reach_every_endpoint_of_a_local_policy_service_per_packet() {
    if !require_privileges() {
        return;
    }
    pods_reach_every_endpoint_of_a_local_policy_service(&["--socket-lb", "off"]);
}

#[test]
fn pods_reach_a_node_port_on_a_node_address_through_the_socket_hooks() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let pod_client = env.topo.add_pod("client");
    let _outside = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);

    let summary = pod_client.client(&env.cgroup, &node_port_target(), 10);

    assert_eq!(summary.ok, 10, "{summary:?}");
    assert_eq!(summary.count("webapp1"), 10, "{summary:?}");
    assert!(
        summary
            .remote_addrs
            .iter()
            .all(|a| a.starts_with(&format!("{}:", pod_client.ip()))),
        "translated at connect(): no NAT, {summary:?}"
    );
}

#[test]
fn devices_default_to_the_nodes_addressed_interfaces_except_bridges() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    // No --devices: ext0 holds a global address; br0 does too, but is a bridge.
    let mut agent = start_agent_with(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let links = env.pins.path().join("links");
    assert!(
        !links.join("tc-ingress-br0").exists(),
        "no tc program on the pod bridge"
    );

    let summary = client.client_with().count(5).run(&node_port_target());

    assert_eq!(summary.ok, 5, "{summary:?}");
}

#[test]
fn ipv6_node_port_from_outside_answers_from_the_node_ipv6_address() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _backends = ["webapp1", "webapp2"]
        .map(|name| env.add_dual_stack_backend(name, "webapp", 8080, Listen::Ipv6Only));
    env.manifests.write("svc.yaml", &webapp_node_port6());
    let client = env.topo.add_external_client("outside");
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend("[::]:30080", 2, APPLY);

    // The handshake completes only if the replies come from [nodeIP]:nodePort.
    let target = format!("[{NODE_EXT_IP6}]:{NODE_PORT}");
    let summary = client.client_with().count(20).run(&target);

    assert_eq!(summary.ok, 20, "every connection answered: {summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    let prefix = format!("[{EXTERNAL_CLIENT_IP6}]:");
    assert!(
        summary.remote_addrs.iter().all(|a| a.starts_with(&prefix)),
        "local backends see the client's own IPv6 address: {:?}",
        summary.remote_addrs
    );
    let flows = agent.conntrack();
    assert!(
        flows
            .iter()
            .any(|f| f["frontend"] == format!("[{NODE_EXT_IP6}]:{NODE_PORT}")),
        "the flow is tracked with its IPv6 frontend: {flows:?}"
    );
}

/// A second address on the node's `ext0`, added and removed while the agent runs.
const ADDED_NODE_IP: &str = "192.168.50.10";

#[test]
fn node_ports_follow_an_address_added_to_and_removed_from_a_device() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    let mut agent = start_agent(&env, &[]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    // The client sends to ext0 whether the node holds the address or not (a permanent
    // neighbour entry, as a cached one would for a while): only the datapath decides.
    let node_mac = mac_of(&env, EXT_DEVICE);
    lb_tests::cmd::ip(&[
        "-n",
        client.netns(),
        "neigh",
        "replace",
        ADDED_NODE_IP,
        "lladdr",
        &node_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let target = format!("{ADDED_NODE_IP}:{NODE_PORT}");
    let once = || client.client_with().count(1).timeout_ms(300).run(&target);
    assert_eq!(once().ok, 0, "not a node address yet");

    let added = std::time::Instant::now();
    env.topo.node().ip(&[
        "addr",
        "add",
        &format!("{ADDED_NODE_IP}/24"),
        "dev",
        EXT_DEVICE,
    ]);
    let summary = poll(FOLLOW, once, |s| s.ok == 1);
    assert_eq!(
        summary.ok, 1,
        "the NodePort answers on the new address within {FOLLOW:?}: {summary:?}"
    );
    eprintln!("served on the added address after {:?}", added.elapsed());
    let summary = client.client_with().count(5).run(&target);
    assert_eq!(summary.count("webapp1"), 5, "{summary:?}");

    let removed = std::time::Instant::now();
    env.topo.node().ip(&[
        "addr",
        "del",
        &format!("{ADDED_NODE_IP}/24"),
        "dev",
        EXT_DEVICE,
    ]);
    let summary = poll(FOLLOW, once, |s| s.ok == 0);
    assert_eq!(
        summary.ok, 0,
        "no longer served within {FOLLOW:?}: {summary:?}"
    );
    eprintln!("no longer served after {:?}", removed.elapsed());
    let summary = client.client_with().count(3).timeout_ms(300).run(&target);
    assert_eq!(
        summary.ok, 0,
        "the removed address stays unserved: {summary:?}"
    );
    let summary = client.client_with().count(3).run(&node_port_target());
    assert_eq!(
        summary.ok, 3,
        "the other node address still is: {summary:?}"
    );
    let log = agent.log();
    let logged = log
        .lines()
        .filter(|l| l.contains("node addresses changed") && l.contains("192.168.50.10 (ext0)"))
        .count();
    assert_eq!(logged, 2, "the addition and the removal are logged: {log}");
}

/// How long the agent may take to follow an address change.
const FOLLOW: Duration = Duration::from_secs(3);

/// Runs `attempt` until `done` holds of its result or `within` has passed; the last result.
fn poll<T>(within: Duration, attempt: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        let result = attempt();
        if done(&result) || std::time::Instant::now() >= deadline {
            return result;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The MAC address of `device` in the node namespace.
fn mac_of(env: &TestEnv, device: &str) -> String {
    let out = env.topo.node().ip(&["-j", "link", "show", "dev", device]);
    let links: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    links[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {out}"))
        .to_owned()
}

#[test]
fn nodeport_addresses_limit_the_node_addresses_a_node_port_answers_on() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests.write("svc.yaml", &webapp_node_port());
    env.topo.node().ip(&[
        "addr",
        "add",
        &format!("{ADDED_NODE_IP}/24"),
        "dev",
        EXT_DEVICE,
    ]);
    let only = format!("{ADDED_NODE_IP}/32");
    let mut agent = start_agent(&env, &["--nodeport-addresses", &only]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);

    let inside = client
        .client_with()
        .count(5)
        .run(&format!("{ADDED_NODE_IP}:{NODE_PORT}"));
    let outside = client
        .client_with()
        .count(3)
        .timeout_ms(300)
        .run(&node_port_target());

    assert_eq!(inside.count("webapp1"), 5, "{inside:?}");
    assert_eq!(
        outside.ok, 0,
        "{NODE_EXT_IP} is outside --nodeport-addresses {only}: {outside:?}"
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("node addresses for NodePorts")
                && l.contains("192.168.50.10 (ext0)")
                && !l.contains(&format!("\"{NODE_EXT_IP} (ext0)\""))),
        "only the selected address is a NodePort address: {log}"
    );
}

/// `webapp` (NodePort 30080, port 80 → 8080, without selector) with this
/// `externalTrafficPolicy`, as a LoadBalancer with healthCheckNodePort 32100 under `Local`.
fn webapp_without_selector(policy: &str) -> String {
    let svc = service("webapp", "10.96.0.10")
        .type_("NodePort")
        .port_full(Some("http"), 80, 8080, "TCP")
        .external_traffic_policy(policy);
    let mut svc = svc.build();
    let spec = svc.spec.as_mut().unwrap();
    spec.ports.as_mut().unwrap()[0].node_port = Some(i32::from(NODE_PORT));
    if policy == "Local" {
        spec.type_ = Some("LoadBalancer".to_owned());
        spec.health_check_node_port = Some(32100);
    }
    lb_tests::manifests::to_yaml(&svc)
}

/// The one slice of `webapp`: `pod` on `node` with `conditions`.
fn webapp_slice(pod: &Pod, conditions: Conditions, node: &str) -> String {
    endpoint_slice("webapp-1", "webapp")
        .endpoint_full(pod.ip(), conditions, Some(node), None)
        .port(Some("http"), 8080, "TCP")
        .yaml()
}

/// Upstream `should fallback to terminating endpoints when there are no ready endpoints with
/// externallTrafficPolicy=Cluster`: the only endpoint is terminating (and still serving); a
/// client outside still reaches it through the NodePort.
#[test]
fn node_port_with_cluster_policy_falls_back_to_a_terminating_endpoint() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web = env.topo.add_pod("webapp1");
    let _server = web.spawn_server("webapp1", 8080);
    env.manifests
        .write("svc.yaml", &webapp_without_selector("Cluster"));
    env.manifests.write(
        "slice.yaml",
        &webapp_slice(&web, Conditions::TERMINATING, "node-a"),
    );
    let client = env.topo.add_external_client("outside");
    let mut agent = start_agent(&env, &["--node-name", "node-a"]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);

    let summary = client.client_with().count(10).run(&node_port_target());

    assert_eq!(summary.count("webapp1"), 10, "{summary:?}");
}

/// Upstream `should fallback to local terminating endpoints when there are no ready
/// endpoints with externalTrafficPolicy=Local`: this node's NodePort serves its own
/// terminating endpoint; once that endpoint is on another node, this node's NodePort drops
/// (the client times out) although the endpoint still answers.
#[test]
fn node_port_with_local_policy_falls_back_only_to_a_local_terminating_endpoint() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web = env.topo.add_pod("webapp1");
    let _server = web.spawn_server("webapp1", 8080);
    env.manifests
        .write("svc.yaml", &webapp_without_selector("Local"));
    env.manifests.write(
        "slice.yaml",
        &webapp_slice(&web, Conditions::TERMINATING, "node-a"),
    );
    let client = env.topo.add_external_client("outside");
    let mut agent = start_agent(&env, &["--node-name", "node-a"]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let local = client.client_with().count(10).run(&node_port_target());
    assert_eq!(local.count("webapp1"), 10, "{local:?}");

    env.manifests.write(
        "slice.yaml",
        &webapp_slice(&web, Conditions::TERMINATING, "node-b"),
    );
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 0, APPLY);
    let elsewhere = client
        .client_with()
        .count(3)
        .timeout_ms(300)
        .run(&node_port_target());

    assert_eq!(elsewhere.count("webapp1"), 0, "{elsewhere:?}");
    assert_eq!(
        elsewhere.errors_of("ETIMEDOUT"),
        3,
        "dropped, not refused (an endpoint exists elsewhere): {elsewhere:?}"
    );
}

/// Upstream `should fail health check node port if there are only terminating endpoints`:
/// with a ready local endpoint the health check answers 200; once the only endpoint is
/// terminating it answers 503 while the NodePort still serves traffic to it.
#[test]
fn health_check_node_port_fails_with_only_terminating_endpoints_while_traffic_is_served() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web = env.topo.add_pod("webapp1");
    let _server = web.spawn_server("webapp1", 8080);
    env.manifests
        .write("svc.yaml", &webapp_without_selector("Local"));
    env.manifests.write(
        "slice.yaml",
        &webapp_slice(&web, Conditions::READY, "node-a"),
    );
    let client = env.topo.add_external_client("outside");
    let mut agent = start_agent(&env, &["--node-name", "node-a"]);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let health = format!("{NODE_EXT_IP}:32100");
    let (status, body) = wait_for_status(&client, &health, 200);
    assert_eq!(status, 200, "{body}");

    env.manifests.write(
        "slice.yaml",
        &webapp_slice(&web, Conditions::TERMINATING, "node-a"),
    );
    agent.wait_until("the endpoint terminating", APPLY, |frontends| {
        frontends
            .iter()
            .find(|f| f.addr() == NODE_PORT_FRONTEND)
            .filter(|f| f.backend_states().values().all(|s| s == "Terminating"))
            .filter(|f| f.count == 1)
            .map(|_| ())
    });
    let (status, body) = wait_for_status(&client, &health, 503);
    let served = client.client_with().count(5).run(&node_port_target());

    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    assert_eq!(served.count("webapp1"), 5, "still served: {served:?}");
}

/// `SVC_F_LOCAL`: the NodePort's entry for clients outside under `externalTrafficPolicy: Local`.
const SVC_F_LOCAL: u32 = 0x10;

/// Waits until the NodePort is programmed under `policy`: with `count` backends for clients
/// outside, and (under `Cluster`) without the in-cluster twin a `Local` NodePort has. The
/// twin's count alone would say nothing: it serves every endpoint under both policies.
fn wait_for_node_port_policy(agent: &mut lb_tests::Agent, policy: &str, count: u16) {
    let local = policy == "Local";
    agent.wait_until(&format!("NodePort under {policy}"), APPLY, |frontends| {
        let entries: Vec<_> = frontends
            .iter()
            .filter(|f| f.addr() == NODE_PORT_FRONTEND && f.protocol == "TCP")
            .collect();
        let outside: Vec<_> = entries
            .iter()
            .filter(|f| (f.flags & SVC_F_LOCAL != 0) == local)
            .collect();
        let twins = if local { 2 } else { 1 };
        (entries.len() == twins && outside.len() == 1 && outside[0].count == count).then_some(())
    });
}

/// Upstream `should implement NodePort and HealthCheckNodePort correctly when
/// ExternalTrafficPolicy changes`, for a node without the endpoint (the endpoint is the
/// second node's pod): under `Local` this node's NodePort drops and its health check answers
/// 503; under `Cluster` the NodePort serves the remote endpoint at once and the health check
/// port is closed; back under `Local`, both as at first.
#[test]
fn node_port_and_health_check_follow_external_traffic_policy_changes() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let remote = env.topo.add_remote_node_with_pod("remote1");
    let _server = remote.spawn_server("remote1", 8080);
    env.manifests.write(
        "pod.yaml",
        &pod("remote1", remote.ip())
            .label("app", "webapp")
            .node_name("node-b")
            .yaml(),
    );
    let svc = |policy: &str| {
        let mut svc = service("webapp", "10.96.0.10")
            .type_("LoadBalancer")
            .selector("app", "webapp")
            .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
            .external_traffic_policy(policy);
        if policy == "Local" {
            svc = svc.health_check_node_port(32100);
        }
        svc.yaml()
    };
    env.manifests.write("svc.yaml", &svc("Local"));
    let client = env.topo.add_external_client("outside");
    let devices = format!("{EXT_DEVICE},{PEER_DEVICE}");
    let mut agent = start_agent_with(&env, &["--devices", &devices, "--node-name", "node-a"]);
    wait_for_node_port_policy(&mut agent, "Local", 0);
    let health = format!("{NODE_EXT_IP}:32100");
    let short = || {
        client
            .client_with()
            .count(3)
            .timeout_ms(300)
            .run(&node_port_target())
    };

    let (status, body) = wait_for_status(&client, &health, 503);
    assert_eq!(status, 503, "Local, no local endpoint: {body}");
    let dropped = short();
    assert_eq!(dropped.errors_of("ETIMEDOUT"), 3, "{dropped:?}");

    env.manifests.write("svc.yaml", &svc("Cluster"));
    wait_for_node_port_policy(&mut agent, "Cluster", 1);
    let served = client
        .client_with()
        .count(5)
        .timeout_ms(500)
        .run(&node_port_target());
    assert_eq!(served.count("remote1"), 5, "Cluster: {served:?}");
    let (status, body) = wait_for_status(&client, &health, 0);
    assert_eq!(
        status, 0,
        "Cluster: the health check port is closed: {body}"
    );

    env.manifests.write("svc.yaml", &svc("Local"));
    wait_for_node_port_policy(&mut agent, "Local", 0);
    let (status, body) = wait_for_status(&client, &health, 503);
    assert_eq!(status, 503, "Local again: {body}");
    let dropped = short();
    assert_eq!(
        dropped.errors_of("ETIMEDOUT"),
        3,
        "Local again: {dropped:?}"
    );
    assert_eq!(dropped.count("remote1"), 0, "{dropped:?}");
}
