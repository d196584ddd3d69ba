//! `--nodeport-acceleration`: NodePorts from outside the node translated at XDP on the
//! external devices, with tc's conntrack, SNAT and policies. Same topology as `nodeport.rs`:
//! an external client namespace joined to the node's `ext0` (192.168.50.1), the agent in
//! the node namespace with `--devices ext0`.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::manifests::{pod, service};
use lb_tests::testkit::enter_netns;
use lb_tests::{
    EXT_DEVICE, EXTERNAL_CLIENT_IP, EXTERNAL_CLIENT_IP6, Listen, NODE_EXT_IP, NODE_EXT_IP6,
    PEER_DEVICE, TestEnv, require_privileges,
};

const APPLY: Duration = Duration::from_secs(10);
const SHOW: Duration = Duration::from_secs(5);
const NODE_PORT: u16 = 30080;
const NODE_PORT_FRONTEND: &str = "0.0.0.0:30080";

fn node_port_target() -> String {
    format!("{NODE_EXT_IP}:{NODE_PORT}")
}

fn node_port_service(policy: &str) -> String {
    service("webapp", "10.96.0.10")
        .type_("NodePort")
        .selector("app", "webapp")
        .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
        .external_traffic_policy(policy)
        .yaml()
}

/// Starts the agent with `args` and waits until its link `pin` (under `links/`) is pinned
/// (the programs are attached after the maps are written).
fn start_agent(env: &TestEnv, args: &[&str], pin: &str) -> lb_tests::Agent {
    let mut agent = env.agent_with(args);
    let path = env.pins.path().join("links").join(pin);
    let deadline = Instant::now() + APPLY;
    while !path.exists() {
        agent.assert_running();
        assert!(
            Instant::now() < deadline,
            "{} not pinned within {APPLY:?}\n{}",
            path.display(),
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent
}

/// `ip -details link show dev DEV` in the node namespace.
fn ip_link(env: &TestEnv, device: &str) -> String {
    let out = Command::new("ip")
        .args([
            "-netns",
            env.topo.node().name(),
            "-details",
            "link",
            "show",
            "dev",
        ])
        .arg(device)
        .output()
        .expect("running ip");
    assert!(out.status.success(), "ip link show {device}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `ip link` shows an XDP program in driver (native) mode on `device`: `xdp` in the
/// flags line (`xdpgeneric` would be the skb mode) and `prog/xdp id N` in the details.
fn native_xdp_on(env: &TestEnv, device: &str) -> bool {
    let link = ip_link(env, device);
    link.split_whitespace().any(|w| w == "xdp") && link.contains("prog/xdp")
}

/// `ip` in the node namespace, which must succeed.
fn ip_in_node(env: &TestEnv, args: &[&str]) {
    let status = Command::new("ip")
        .args(["-netns", env.topo.node().name()])
        .args(args)
        .status()
        .expect("running ip");
    assert!(status.success(), "ip {args:?}");
}

/// Makes `pod`'s `eth0` send complete TCP/UDP checksums, as packets arrive from a wire
/// (over veth they would otherwise carry only the pseudo-header's part, which the receiver
/// never checks): a checksum XDP fixed wrongly then makes the backend drop the packet.
fn full_checksums(pod: &lb_tests::Pod) {
    let status = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", pod.netns()))
        .args(["ethtool", "-K", "eth0", "tx", "off"])
        .status()
        .expect("running ethtool (apt-get install ethtool)");
    assert!(
        status.success(),
        "ethtool -K eth0 tx off in {}",
        pod.netns()
    );
}

fn text<'a>(d: &'a serde_json::Value, field: &str) -> &'a str {
    d[field].as_str().unwrap_or_default()
}

#[test]
fn native_xdp_translates_node_ports_survives_a_restart_and_cleanup_detaches_it() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.add_backend("webapp1", "webapp", 8080);
    let web2 = env.add_backend("webapp2", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests
        .write("svc.yaml", &node_port_service("Cluster"));
    let xdp_pin = format!("xdp-{EXT_DEVICE}");
    let args = ["--devices", EXT_DEVICE, "--nodeport-acceleration", "native"];
    let mut agent = start_agent(&env, &args, &xdp_pin);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 2, APPLY);
    assert!(
        native_xdp_on(&env, EXT_DEVICE),
        "XDP in driver mode on {EXT_DEVICE}: {}",
        ip_link(&env, EXT_DEVICE)
    );
    let links = agent.links().unwrap();
    assert!(
        links.contains(&xdp_pin),
        "services --summary shows it: {links:?}"
    );

    let mut monitor = agent.monitor(&[]);
    full_checksums(&client);
    let summary = client.client_with().count(30).run(&node_port_target());
    assert_eq!(summary.ok, 30, "every connection answered: {summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    let prefix = format!("{EXTERNAL_CLIENT_IP}:");
    assert!(
        summary.remote_addrs.iter().all(|a| a.starts_with(&prefix)),
        "local backends see the client's own address: {:?}",
        summary.remote_addrs
    );
    // The decision was taken at XDP, not at tc ingress (which saw the packets translated).
    let target = node_port_target();
    let d = monitor.wait_for("for the NodePort", SHOW, |d| {
        text(d, "frontend") == format!("{target}/TCP")
    });
    assert_eq!(text(&d, "hook"), "xdp", "{d:#}");
    let backends = [
        format!("{}:8080", web1.pod.ip()),
        format!("{}:8080", web2.pod.ip()),
    ];
    assert!(backends.contains(&text(&d, "backend").to_owned()), "{d:#}");
    let tc_decisions = monitor
        .decisions()
        .into_iter()
        .filter(|d| text(d, "hook") != "xdp")
        .count();
    assert_eq!(
        tc_decisions,
        0,
        "no packet decided twice: {:#?}",
        monitor.decisions()
    );
    assert!(monitor.interrupt(), "stderr: {}", monitor.stderr());

    // A new agent swaps its program into the pinned link: XDP stays on, traffic goes on.
    agent.kill();
    let mut agent = start_agent(&env, &args, &xdp_pin);
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 2, APPLY);
    let summary = client.client_with().count(10).run(&node_port_target());
    assert_eq!(summary.ok, 10, "after a restart: {summary:?}");
    assert!(
        native_xdp_on(&env, EXT_DEVICE),
        "{}",
        ip_link(&env, EXT_DEVICE)
    );

    // The link outlives the agent, as the tc ones do; `lb-agent cleanup` takes it away.
    agent.stop(Duration::from_secs(3));
    assert!(
        native_xdp_on(&env, EXT_DEVICE),
        "{}",
        ip_link(&env, EXT_DEVICE)
    );
    lb_tests::bpffs::agent_cleanup(env.pins.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !native_xdp_on(&env, EXT_DEVICE),
        "no XDP after cleanup: {}",
        ip_link(&env, EXT_DEVICE)
    );
}

#[test]
fn acceleration_off_detaches_the_xdp_program_of_a_previous_agent() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests
        .write("svc.yaml", &node_port_service("Cluster"));
    let xdp_pin = format!("xdp-{EXT_DEVICE}");
    let mut agent = start_agent(
        &env,
        &["--devices", EXT_DEVICE, "--nodeport-acceleration", "native"],
        &xdp_pin,
    );
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    assert!(
        native_xdp_on(&env, EXT_DEVICE),
        "{}",
        ip_link(&env, EXT_DEVICE)
    );
    agent.kill();

    let mut agent = start_agent(
        &env,
        &["--devices", EXT_DEVICE],
        &format!("tc-ingress-{EXT_DEVICE}"),
    );
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let xdp_path = env.pins.path().join("links").join(&xdp_pin);
    let deadline = Instant::now() + APPLY;
    while xdp_path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!xdp_path.exists(), "the XDP link is unpinned");
    assert!(
        !native_xdp_on(&env, EXT_DEVICE),
        "off (the default) detaches XDP: {}",
        ip_link(&env, EXT_DEVICE)
    );
    let summary = client.client_with().count(5).run(&node_port_target());
    assert_eq!(summary.ok, 5, "tc serves the NodePort alone: {summary:?}");
}

#[test]
fn native_xdp_keeps_external_traffic_policy_local_to_local_endpoints_and_the_client_address() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let local = env.topo.add_pod("local1");
    let _local = local.spawn_server("local1", 8080);
    // On this machine's bridge too, but declared on another node: if the policy let it be
    // chosen, its answers would show.
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
    env.manifests.write("svc.yaml", &node_port_service("Local"));
    let client = env.topo.add_external_client("outside");
    let mut agent = start_agent(
        &env,
        &[
            "--devices",
            EXT_DEVICE,
            "--node-name",
            "node-a",
            "--nodeport-acceleration",
            "native",
        ],
        &format!("xdp-{EXT_DEVICE}"),
    );
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let mut monitor = agent.monitor(&[]);

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
    let d = monitor.wait_for("for the NodePort", SHOW, |d| {
        text(d, "frontend") == format!("{}/TCP", node_port_target())
    });
    assert_eq!(text(&d, "hook"), "xdp", "{d:#}");
    assert!(monitor.interrupt(), "stderr: {}", monitor.stderr());
}

#[test]
fn native_xdp_snats_to_a_backend_on_another_node_with_tc_finishing_the_rewrite() {
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
    env.manifests
        .write("svc.yaml", &node_port_service("Cluster"));
    let client = env.topo.add_external_client("outside");
    let devices = format!("{EXT_DEVICE},{PEER_DEVICE}");
    let mut agent = start_agent(
        &env,
        &[
            "--devices",
            &devices,
            "--node-name",
            "node-a",
            "--nodeport-acceleration",
            "native",
        ],
        &format!("xdp-{PEER_DEVICE}"),
    );
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let mut monitor = agent.monitor(&[]);

    let summary = client.client_with().count(20).run(&node_port_target());

    assert_eq!(summary.ok, 20, "every connection answered: {summary:?}");
    assert_eq!(summary.count("remote1"), 20, "{summary:?}");
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
    // XDP chose the backend and the SNAT port; the flows are in the one conntrack table.
    let d = monitor.wait_for("for the NodePort", SHOW, |d| {
        text(d, "frontend") == format!("{}/TCP", node_port_target())
    });
    assert_eq!(text(&d, "hook"), "xdp", "{d:#}");
    assert!(monitor.interrupt(), "stderr: {}", monitor.stderr());
    let flows = agent.conntrack();
    let snats: Vec<&str> = flows.iter().filter_map(|f| f["snat"].as_str()).collect();
    for addr in &summary.remote_addrs {
        assert!(snats.contains(&addr.as_str()), "{addr} in {flows:#?}");
    }
}

/// A bridge has no native XDP (no driver hook): `best-effort` leaves it on tc, `native` refuses to
/// start and names it.
#[test]
fn best_effort_leaves_a_device_without_native_xdp_on_tc_and_native_names_it() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    env.manifests
        .write("svc.yaml", &node_port_service("Cluster"));
    ip_in_node(&env, &["link", "add", "lbdum0", "type", "bridge"]);
    ip_in_node(&env, &["addr", "add", "192.168.70.1/24", "dev", "lbdum0"]);
    ip_in_node(&env, &["link", "set", "lbdum0", "up"]);
    let devices = format!("{EXT_DEVICE},lbdum0");

    let mut agent = start_agent(
        &env,
        &[
            "--devices",
            &devices,
            "--nodeport-acceleration",
            "best-effort",
        ],
        &format!("xdp-{EXT_DEVICE}"),
    );
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    let links = agent.links().unwrap();
    assert!(
        links.contains(&"tc-ingress-lbdum0".to_owned()) && !links.iter().any(|l| l == "xdp-lbdum0"),
        "the dummy keeps tc only: {links:?}"
    );
    assert!(
        native_xdp_on(&env, EXT_DEVICE),
        "{}",
        ip_link(&env, EXT_DEVICE)
    );
    assert!(
        !native_xdp_on(&env, "lbdum0"),
        "{}",
        ip_link(&env, "lbdum0")
    );
    assert!(
        agent.log().contains("lbdum0") && agent.log().contains("no native XDP"),
        "the log says which device stays on tc: {}",
        agent.log_tail(30)
    );
    let summary = client.client_with().count(5).run(&node_port_target());
    assert_eq!(summary.ok, 5, "{summary:?}");
    agent.stop(Duration::from_secs(3));

    let mut agent = env.agent_with(&["--devices", &devices, "--nodeport-acceleration", "native"]);
    let status = agent.wait_exit(APPLY);
    assert!(
        status.is_some_and(|s| !s.success()),
        "native fails on a device without native XDP: {}",
        agent.log_tail(30)
    );
    let log = agent.log();
    assert!(
        log.contains("device lbdum0 cannot take a native (driver) XDP program"),
        "the error names the device: {}",
        agent.log_tail(30)
    );
}

/// `--devices ext0 --nodeport-acceleration native`.
const NATIVE: [&str; 4] = ["--devices", EXT_DEVICE, "--nodeport-acceleration", "native"];

#[test]
fn native_xdp_leaves_the_reject_of_a_node_port_without_endpoints_to_tc() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_external_client("outside");
    // The selector matches no pod.
    env.manifests
        .write("svc.yaml", &node_port_service("Cluster"));
    // The node's own stack listens on the NodePort: passed on untranslated by both hooks,
    // the connection would succeed; dropped, it would time out. Only tc's ICMP port
    // unreachable makes it fail with ECONNREFUSED.
    let netns = env.topo.node().name().to_owned();
    let _stack = std::thread::spawn(move || {
        enter_netns(&netns).expect("entering the node namespace");
        TcpListener::bind((NODE_EXT_IP, NODE_PORT)).expect("listening on the node")
    })
    .join()
    .unwrap();
    let mut agent = start_agent(&env, &NATIVE, &format!("xdp-{EXT_DEVICE}"));
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
fn native_xdp_translates_an_ipv6_node_port() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _backends = ["webapp1", "webapp2"]
        .map(|name| env.add_dual_stack_backend(name, "webapp", 8080, Listen::Ipv6Only));
    env.manifests.write(
        "svc.yaml",
        &service("webapp", "fd00:96::10")
            .type_("NodePort")
            .ip_families(&["IPv6"])
            .ip_family_policy("SingleStack")
            .selector("app", "webapp")
            .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
            .yaml(),
    );
    let client = env.topo.add_external_client("outside");
    let mut agent = start_agent(&env, &NATIVE, &format!("xdp-{EXT_DEVICE}"));
    agent.wait_for_frontend("[::]:30080", 2, APPLY);
    let mut monitor = agent.monitor(&[]);

    full_checksums(&client);
    let target = format!("[{NODE_EXT_IP6}]:{NODE_PORT}");
    let summary = client.client_with().count(20).run(&target);

    assert_eq!(summary.ok, 20, "every connection answered: {summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    let prefix = format!("[{EXTERNAL_CLIENT_IP6}]:");
    assert!(
        summary.remote_addrs.iter().all(|a| a.starts_with(&prefix)),
        "{summary:?}"
    );
    let d = monitor.wait_for("for the IPv6 NodePort", SHOW, |d| {
        text(d, "frontend") == format!("{target}/TCP")
    });
    assert_eq!(text(&d, "hook"), "xdp", "{d:#}");
    assert!(monitor.interrupt(), "stderr: {}", monitor.stderr());
}

#[test]
fn native_xdp_drops_sources_outside_load_balancer_source_ranges() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_external_client("outside");
    // The client (192.168.50.2) is outside the only range.
    let mut svc = service("webapp", "10.96.0.10")
        .selector("app", "webapp")
        .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
        .load_balancer_ingress("192.168.60.20", None)
        .build();
    svc.spec.as_mut().unwrap().load_balancer_source_ranges =
        Some(vec!["203.0.113.0/24".to_owned()]);
    env.manifests
        .write("svc.yaml", &lb_tests::manifests::to_yaml(&svc));
    let mut agent = start_agent(&env, &NATIVE, &format!("xdp-{EXT_DEVICE}"));
    agent.wait_for_frontend("192.168.60.20:80", 1, APPLY);
    let mut monitor = agent.monitor(&[]);

    let dropped = client
        .client_with()
        .count(3)
        .timeout_ms(300)
        .run("192.168.60.20:80");

    assert_eq!(dropped.errors_of("ETIMEDOUT"), 3, "dropped: {dropped:?}");
    let d = monitor.wait_for("for the LoadBalancer IP", SHOW, |d| {
        text(d, "frontend") == "192.168.60.20:80/TCP"
    });
    assert_eq!(text(&d, "hook"), "xdp", "dropped at XDP: {d:#}");
    assert_eq!(text(&d, "outcome"), "firewalled", "{d:#}");
    assert!(monitor.interrupt(), "stderr: {}", monitor.stderr());
    let node_port = client.client_with().count(3).run(&node_port_target());
    assert_eq!(
        node_port.ok, 3,
        "the NodePort is not guarded: {node_port:?}"
    );
}

#[test]
fn native_xdp_does_not_translate_twice_a_backend_that_is_itself_a_node_port() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_external_client("outside");
    // A host-network pod on the node answers on 30081, which is also another Service's
    // NodePort: XDP's translation to it must reach it, not be translated again at tc to
    // that Service's backend.
    let _host = lb_tests::Server::spawn_in(
        env.topo.node().name(),
        "host-net",
        (NODE_EXT_IP, 30081).into(),
        false,
    );
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    env.manifests.write(
        "svc.yaml",
        &lb_tests::manifests::documents(&[
            service("hostnet", "10.96.0.11")
                .type_("NodePort")
                .node_port(80, 30081, i32::from(NODE_PORT), "TCP")
                .yaml(),
            lb_tests::manifests::endpoint_slice("hostnet-1", "hostnet")
                .endpoint(NODE_EXT_IP, true)
                .port(None, 30081, "TCP")
                .yaml(),
            service("webapp", "10.96.0.10")
                .type_("NodePort")
                .selector("app", "webapp")
                .node_port(80, 8080, 30081, "TCP")
                .yaml(),
        ]),
    );
    let mut agent = start_agent(&env, &NATIVE, &format!("xdp-{EXT_DEVICE}"));
    agent.wait_for_frontend(NODE_PORT_FRONTEND, 1, APPLY);
    agent.wait_for_frontend("0.0.0.0:30081", 1, APPLY);
    full_checksums(&client);

    let summary = client.client_with().count(10).run(&node_port_target());

    assert_eq!(summary.ok, 10, "every connection answered: {summary:?}");
    assert_eq!(
        summary.host_names(),
        ["host-net"],
        "the host-network backend answers, never the other NodePort's: {summary:?}"
    );
}
