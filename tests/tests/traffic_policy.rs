//! `internalTrafficPolicy: Local` and topology, as kube-proxy applies them to in-cluster
//! clients: upstream's "should respect internalTrafficPolicy=Local Pod to Pod", "... Pod
//! (hostNetwork: true) to Pod", "... Pod and Node, to Pod (hostNetwork: true)" and
//! "should fallback to local terminating endpoints when there are no ready endpoints with
//! internalTrafficPolicy=Local", and the traffic-distribution cases. This node is
//! `node-a`; endpoints that the slice places on `node-b` are real servers on this machine,
//! so a connection that should not reach them would show.

use std::time::Duration;

use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode};
use lb_tests::manifests::{Conditions, endpoint_slice, service, to_yaml};
use lb_tests::{Agent, Pod, Server, TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";
const NODE: &str = "node-a";

/// Pods with HTTP servers on 8080 answering with their names.
fn servers(env: &TestEnv, names: &[&str]) -> Vec<(Pod, Server)> {
    names
        .iter()
        .map(|name| {
            let p = env.topo.add_pod(name);
            let server = p.spawn_server(name, 8080);
            (p, server)
        })
        .collect()
}

fn webapp(env: &TestEnv, internal: &str, distribution: Option<&str>) {
    let mut svc = service("webapp", "10.96.0.10")
        .selector("app", "webapp")
        .internal_traffic_policy(internal)
        .port_full(Some("http"), 80, 8080, "TCP");
    if let Some(d) = distribution {
        svc = svc.traffic_distribution(d);
    }
    env.manifests.write("svc.yaml", &svc.yaml());
}

/// One endpoint: (pod, conditions, node, zone hint).
type Ep<'a> = (&'a Pod, Conditions, &'a str, Option<&'a str>);

fn slice(env: &TestEnv, endpoints: &[Ep<'_>]) {
    let mut s = endpoint_slice("webapp-1", "webapp");
    for (p, conditions, node, hint) in endpoints {
        s = s.endpoint_hinted(p.ip(), *conditions, Some(node), *hint);
    }
    env.manifests
        .write("slice.yaml", &s.port(Some("http"), 8080, "TCP").yaml());
}

fn agent(env: &TestEnv, count: usize) -> Agent {
    let mut agent = env.agent_with(&["--node-name", NODE]);
    agent.wait_for_frontend(VIP, count, APPLY);
    agent
}

#[test]
fn internal_local_pod_to_pod_reaches_only_this_nodes_endpoints() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods = servers(&env, &["local1", "remote1", "remote2"]);
    let client = env.topo.add_pod("client");
    webapp(&env, "Local", None);
    slice(
        &env,
        &[
            (&pods[0].0, Conditions::READY, NODE, None),
            (&pods[1].0, Conditions::READY, "node-b", None),
            (&pods[2].0, Conditions::READY, "node-b", None),
        ],
    );
    let _agent = agent(&env, 1);
    let summary = client.client(&env.cgroup, VIP, 20);
    assert_eq!(summary.ok, 20, "{summary:?}");
    assert_eq!(summary.host_names(), ["local1"], "{summary:?}");
}

#[test]
fn internal_local_without_a_local_endpoint_drops_and_without_any_refuses() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods = servers(&env, &["remote1"]);
    let client = env.topo.add_pod("client");
    webapp(&env, "Local", None);
    slice(&env, &[(&pods[0].0, Conditions::READY, "node-b", None)]);
    let mut agent = agent(&env, 0);
    // kube-proxy drops: the socket path fails the connect at once with EHOSTUNREACH rather
    // than leaving it to time out.
    let dropped = client.client(&env.cgroup, VIP, 3);
    assert_eq!(dropped.errors_of("EHOSTUNREACH"), 3, "{dropped:?}");
    assert_eq!(dropped.count("remote1"), 0, "{dropped:?}");

    // With no usable endpoint anywhere, the Service is refused as any Service without
    // endpoints is.
    slice(&env, &[(&pods[0].0, Conditions::NOT_READY, "node-b", None)]);
    agent.wait_until("the slice's endpoint not ready", APPLY, |_| {
        let refused = client.client(&env.cgroup, VIP, 1);
        (refused.errors_of("ECONNREFUSED") == 1).then_some(())
    });
}

#[test]
fn internal_local_falls_back_to_local_terminating_endpoints() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods = servers(&env, &["local1", "remote1"]);
    let client = env.topo.add_pod("client");
    webapp(&env, "Local", None);
    // The local endpoint is terminating but still serving; a ready one exists elsewhere.
    slice(
        &env,
        &[
            (&pods[0].0, Conditions::TERMINATING, NODE, None),
            (&pods[1].0, Conditions::READY, "node-b", None),
        ],
    );
    let _agent = agent(&env, 1);
    let summary = client.client(&env.cgroup, VIP, 10);
    assert_eq!(summary.ok, 10, "{summary:?}");
    assert_eq!(summary.host_names(), ["local1"], "{summary:?}");
}

#[test]
fn cluster_policy_falls_back_to_terminating_endpoints_anywhere() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods = servers(&env, &["remote1"]);
    let client = env.topo.add_pod("client");
    webapp(&env, "Cluster", None);
    slice(
        &env,
        &[(&pods[0].0, Conditions::TERMINATING, "node-b", None)],
    );
    let _agent = agent(&env, 1);
    let summary = client.client(&env.cgroup, VIP, 10);
    assert_eq!(summary.ok, 10, "{summary:?}");
    assert_eq!(summary.host_names(), ["remote1"], "{summary:?}");
}
#[test]
fn zone_hints_for_this_nodes_zone_keep_traffic_in_the_zone() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods = servers(&env, &["zone-a1", "zone-a2", "zone-b1"]);
    let client = env.topo.add_pod("client");
    webapp(&env, "Cluster", Some("PreferClose"));
    // This node's zone comes from its Node object.
    env.manifests.write(
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {topology.kubernetes.io/zone: zone-a}\n",
    );
    slice(
        &env,
        &[
            (&pods[0].0, Conditions::READY, NODE, Some("zone-a")),
            (&pods[1].0, Conditions::READY, "node-b", Some("zone-a")),
            (&pods[2].0, Conditions::READY, "node-c", Some("zone-b")),
        ],
    );
    let _agent = agent(&env, 2);
    let summary = client.client(&env.cgroup, VIP, 30);
    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(summary.count("zone-b1"), 0, "{summary:?}");
    assert!(
        summary.count("zone-a1") > 0 && summary.count("zone-a2") > 0,
        "{summary:?}"
    );
}

/// The slice of `webapp` with each endpoint hinted for its own node (`hints.forNodes`), as
/// the EndpointSlice controller writes it for `trafficDistribution: PreferSameNode`.
fn node_hinted_slice(env: &TestEnv, endpoints: &[(&Pod, &str)]) {
    let mut slice = endpoint_slice("webapp-1", "webapp");
    for (p, node) in endpoints {
        slice = slice.endpoint_full(p.ip(), Conditions::READY, Some(node), None);
    }
    let mut slice = slice.port(Some("http"), 8080, "TCP").build();
    for (endpoint, (_, node)) in slice
        .endpoints
        .as_mut()
        .expect("endpoints")
        .iter_mut()
        .zip(endpoints)
    {
        endpoint.hints = Some(EndpointHints {
            for_nodes: Some(vec![ForNode {
                name: (*node).to_owned(),
            }]),
            for_zones: None,
        });
    }
    env.manifests.write("slice.yaml", &to_yaml(&slice));
}

/// Upstream `should route traffic to an endpoint on the same node when using PreferSameNode
/// and fall back when the endpoint becomes unavailable`: this node's client reaches only
/// this node's server; with that server gone it reaches the other node's; with it back,
/// only its own again.
#[test]
fn prefer_same_node_keeps_traffic_on_this_node_and_falls_back_while_its_endpoint_is_gone() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods = servers(&env, &["local1", "remote1"]);
    let client = env.topo.add_pod("client");
    webapp(&env, "Cluster", Some("PreferSameNode"));
    let both = [(&pods[0].0, NODE), (&pods[1].0, "node-b")];
    node_hinted_slice(&env, &both);
    let mut agent = agent(&env, 1);
    let same_node = client.client(&env.cgroup, VIP, 20);
    assert_eq!(same_node.count("local1"), 20, "{same_node:?}");

    node_hinted_slice(&env, &both[1..]);
    agent.wait_until("remote1 alone", APPLY, |frontends| {
        frontends
            .iter()
            .find(|f| f.addr() == VIP)
            .filter(|f| f.backend_addrs() == [format!("{}:8080", pods[1].0.ip())])
            .map(|_| ())
    });
    let fallback = client.client(&env.cgroup, VIP, 10);
    assert_eq!(fallback.count("remote1"), 10, "{fallback:?}");

    node_hinted_slice(&env, &both);
    agent.wait_until("local1 alone again", APPLY, |frontends| {
        frontends
            .iter()
            .find(|f| f.addr() == VIP)
            .filter(|f| f.backend_addrs() == [format!("{}:8080", pods[0].0.ip())])
            .map(|_| ())
    });
    let back = client.client(&env.cgroup, VIP, 20);
    assert_eq!(back.count("local1"), 20, "{back:?}");
}

/// Upstream `should route traffic to an endpoint on the same node or fall back to same zone
/// when using PreferSameNode`, its node part: with hints for this node and for another, this
/// node's client reaches only its own server; a client of a node without an endpoint (this
/// agent as `node-c`) reaches all servers.
#[test]
fn prefer_same_node_without_an_endpoint_on_this_node_uses_every_endpoint() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods = servers(&env, &["remote1", "remote2"]);
    let client = env.topo.add_pod("client");
    webapp(&env, "Cluster", Some("PreferSameNode"));
    node_hinted_slice(&env, &[(&pods[0].0, "node-b"), (&pods[1].0, "node-c")]);
    let _agent = agent(&env, 2);

    let summary = client.client(&env.cgroup, VIP, 30);

    assert_eq!(summary.ok, 30, "{summary:?}");
    assert_eq!(summary.host_names(), ["remote1", "remote2"], "{summary:?}");
}

/// `count` HTTP requests to `target` from a process of the node itself (hostNetwork: the
/// node's network namespace), inside the agent's cgroup as every process of the node is.
fn node_client(env: &TestEnv, target: &str, count: u32) -> lb_tests::ClientSummary {
    let mut command = std::process::Command::new(lb_tests::bins::testkit());
    command
        .arg("--cgroup")
        .arg(env.cgroup.path())
        .args([
            "--netns",
            env.topo.node().name(),
            "client",
            "--target",
            target,
        ])
        .args(["--count", &count.to_string(), "--timeout-ms", "1000"]);
    let out =
        lb_tests::cmd::run(&mut command, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Upstream `should respect internalTrafficPolicy=Local Pod (hostNetwork: true) to Pod`: a
/// process of the node reaches only this node's endpoint; with none here (the endpoint
/// moved to another node) its connections fail.
#[test]
fn internal_local_from_the_node_itself_reaches_only_this_nodes_endpoints() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let pods = servers(&env, &["local1", "remote1"]);
    webapp(&env, "Local", None);
    slice(
        &env,
        &[
            (&pods[0].0, Conditions::READY, NODE, None),
            (&pods[1].0, Conditions::READY, "node-b", None),
        ],
    );
    let mut agent = agent(&env, 1);
    let local = node_client(&env, VIP, 20);
    assert_eq!(local.count("local1"), 20, "{local:?}");

    slice(
        &env,
        &[
            (&pods[0].0, Conditions::READY, "node-b", None),
            (&pods[1].0, Conditions::READY, "node-b", None),
        ],
    );
    agent.wait_for_frontend(VIP, 0, APPLY);
    let elsewhere = node_client(&env, VIP, 3);
    assert_eq!(elsewhere.ok, 0, "{elsewhere:?}");
    assert_eq!(elsewhere.errors_of("EHOSTUNREACH"), 3, "{elsewhere:?}");
}

/// Upstream `should respect internalTrafficPolicy=Local Pod and Node, to Pod (hostNetwork:
/// true)`: the endpoint is a hostNetwork server of this node (the node's own address, port
/// 10180); a pod and a process of the node both reach it; as another node's, neither does.
#[test]
fn internal_local_to_a_host_network_endpoint_from_a_pod_and_from_the_node() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    let node_ip = "10.244.0.1";
    let _server = HostServer::start(&env, &format!("{node_ip}:10180"), "node-a-host");
    env.manifests.write(
        "svc.yaml",
        &service("webapp", "10.96.0.10")
            .internal_traffic_policy("Local")
            .port_full(Some("http"), 80, 10180, "TCP")
            .yaml(),
    );
    let host_slice = |node: &str| {
        endpoint_slice("webapp-1", "webapp")
            .endpoint_full(
                node_ip.parse::<std::net::IpAddr>().unwrap(),
                Conditions::READY,
                Some(node),
                None,
            )
            .port(Some("http"), 10180, "TCP")
            .yaml()
    };
    env.manifests.write("slice.yaml", &host_slice(NODE));
    let mut agent = agent(&env, 1);

    let from_pod = client.client(&env.cgroup, VIP, 10);
    let from_node = node_client(&env, VIP, 10);
    assert_eq!(from_pod.count("node-a-host"), 10, "{from_pod:?}");
    assert_eq!(from_node.count("node-a-host"), 10, "{from_node:?}");

    env.manifests.write("slice.yaml", &host_slice("node-b"));
    agent.wait_for_frontend(VIP, 0, APPLY);
    let from_pod = client.client(&env.cgroup, VIP, 3);
    let from_node = node_client(&env, VIP, 3);
    assert_eq!(from_pod.ok, 0, "{from_pod:?}");
    assert_eq!(from_node.ok, 0, "{from_node:?}");
}

/// An `lb-testkit serve` in the node's own network namespace (a hostNetwork pod's server);
/// killed on drop.
struct HostServer(std::process::Child);

impl HostServer {
    fn start(env: &TestEnv, listen: &str, name: &str) -> Self {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(lb_tests::bins::testkit())
            .args([
                "--netns",
                env.topo.node().name(),
                "serve",
                "--listen",
                listen,
            ])
            .args(["--name", name])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting lb-testkit serve");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("reading the server's first line");
        let server = Self(child);
        assert_eq!(line.trim(), "listening", "lb-testkit serve on {listen}");
        server
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
