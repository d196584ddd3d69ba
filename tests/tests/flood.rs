//! The tc datapath's conntrack under a spoofed SYN flood (issue 13): a flow counts as
//! established only once its client completes the handshake, so a flood of SYNs from made-up
//! sources fills only the half-open table; an established flow survives a flood of ten
//! times the tables' size, new real connections still get through, and once the flood
//! stops the junk is gone. Closed flows leave the established table, so a churn of short
//! connections cannot evict an idle one either.
//!
//! The node's external device `ext0` (192.168.50.1) carries a NodePort; the external client
//! namespace (192.168.50.2) opens a connection, then floods the NodePort with SYNs from
//! 10.200.0.0/16, an address range nothing answers for, with `lb-loadgen syn-flood`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::testkit::enter_netns;
use lb_tests::{Agent, EXT_DEVICE, NODE_EXT_IP, TestEnv, bins, cmd, require_privileges};

const APPLY: Duration = Duration::from_secs(10);
const NODE_PORT: u16 = 30080;
/// The tables, small so that ten times their size is a quick flood.
const TABLE: u32 = 512;
const HALF_OPEN_TABLE: u32 = 256;

/// Echoes one line on a connection: what an established flow still does after the flood.
fn echo(stream: &mut TcpStream, line: &str) -> std::io::Result<String> {
    stream.write_all(line.as_bytes())?;
    let mut buf = vec![0u8; line.len()];
    stream.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Waits until the agent's tc programs are attached to the external device (their link
/// pinned: the maps are written before the programs are attached).
fn wait_for_tc_programs(env: &TestEnv) {
    let link = env
        .pins
        .path()
        .join("links")
        .join(format!("tc-ingress-{EXT_DEVICE}"));
    let deadline = Instant::now() + APPLY;
    while !link.exists() {
        assert!(
            Instant::now() < deadline,
            "tc programs attached within {APPLY:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `count` SYNs from `client`'s namespace to `target`, from 10.200.0.0/16 (an address
/// range nothing answers for): `lb-loadgen syn-flood`'s summary.
fn syn_flood(client: &lb_tests::Pod, target: &str, count: u64) -> serde_json::Value {
    let out = cmd::run(
        Command::new(bins::loadgen()).args([
            "--netns",
            client.netns(),
            "syn-flood",
            "--target",
            target,
            "--sources",
            "10.200.0.0/16",
            "--count",
            &count.to_string(),
            "--duration-ms",
            "20000",
        ]),
        Duration::from_secs(30),
    )
    .expect("lb-loadgen syn-flood");
    serde_json::from_str(&out).expect("flood summary")
}

fn entries(agent: &lb_tests::Agent, map: &str) -> u64 {
    agent.map_entries(map).expect("services --summary")
}

/// An echo server behind NodePort 30080 (it keeps idle connections open, unlike the HTTP
/// one), a client outside the node, and the agent with conntrack tables of `table`
/// (established) and `half_open` entries, its tc programs attached.
fn echo_node_port(env: &TestEnv, table: u32, half_open: u32) -> (Child, lb_tests::Pod, Agent) {
    let web = env.topo.add_pod("web");
    let echo_server = Command::new(bins::loadgen())
        .args(["--netns", web.netns(), "serve", "--tcp", "8080"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("lb-loadgen serve");
    let client = env.topo.add_external_client("outside");
    env.manifests.write(
        "svc.yaml",
        &service("echo", "10.96.0.10")
            .type_("NodePort")
            .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
            .yaml(),
    );
    env.manifests.write(
        "slice.yaml",
        &endpoint_slice("echo-1", "echo")
            .port(None, 8080, "TCP")
            .endpoint(web.ip(), true)
            .yaml(),
    );
    let table = table.to_string();
    let half_open = half_open.to_string();
    let mut agent = env.agent_with(&[
        "--devices",
        EXT_DEVICE,
        "--max-conntrack",
        &table,
        "--max-conntrack-half-open",
        &half_open,
    ]);
    agent.wait_for_frontend("0.0.0.0:30080", 1, APPLY);
    wait_for_tc_programs(env);
    (echo_server, client, agent)
}

/// Opens a connection to `target` from `client`'s namespace that echoes a line, then,
/// once told, echoes another: an established flow kept idle in between. Returns the
/// channel that tells it and the thread, which yields the second echo.
fn idle_connection(
    client: &lb_tests::Pod,
    target: &str,
) -> (
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<std::io::Result<String>>,
) {
    let netns = client.netns().to_owned();
    let (wake, woken) = std::sync::mpsc::channel::<()>();
    let (established_tx, established) = std::sync::mpsc::channel::<()>();
    let target = target.to_owned();
    let kept = std::thread::spawn(move || {
        enter_netns(&netns).expect("entering the client namespace");
        let mut stream =
            TcpStream::connect_timeout(&target.parse().unwrap(), Duration::from_secs(2))
                .expect("connecting to the NodePort");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(echo(&mut stream, "before\n").unwrap(), "before\n");
        established_tx.send(()).unwrap();
        woken.recv().unwrap();
        echo(&mut stream, "after\n")
    });
    established
        .recv()
        .expect("the kept connection's first echo");
    (wake, kept)
}

#[test]
fn established_flows_and_new_ones_survive_a_syn_flood_of_ten_times_the_table() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (mut echo_server, client, mut agent) = echo_node_port(&env, TABLE, HALF_OPEN_TABLE);

    // An established flow from outside, idle through the flood.
    let target = format!("{NODE_EXT_IP}:{NODE_PORT}");
    let (to_flood, kept) = idle_connection(&client, &target);
    let flows = agent.conntrack();
    assert!(
        flows.iter().any(|f| f["state"] == "ESTABLISHED"),
        "the kept connection is established once its handshake completed: {flows:?}"
    );

    // Ten times the established table's size (twenty times the half-open one's).
    let summary = syn_flood(&client, &target, 10 * u64::from(TABLE));
    assert_eq!(summary["sent"], 10 * u64::from(TABLE), "{summary}");

    // The established flow survived, idle through the flood.
    to_flood.send(()).unwrap();
    let after = kept.join().expect("kept connection thread");
    assert_eq!(
        after.expect("the kept connection after the flood"),
        "after\n"
    );
    // A new connection gets through while the half-open table is full of junk.
    let netns = client.netns().to_owned();
    let target_in = target.clone();
    let fresh = std::thread::spawn(move || {
        enter_netns(&netns).expect("entering the client namespace");
        let mut stream =
            TcpStream::connect_timeout(&target_in.parse().unwrap(), Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        echo(&mut stream, "fresh\n")
    })
    .join()
    .expect("new connection thread");
    assert_eq!(fresh.expect("a new connection after the flood"), "fresh\n");

    // Only real flows ever entered the established table: the kept one and the new one,
    // two entries each (none once they closed: closed flows move to the half-open table).
    let established_entries = entries(&agent, "LB_CT_TCP");
    assert!(
        established_entries <= 4,
        "LB_CT_TCP holds {established_entries} entries: only the two real flows'"
    );
    let counters = agent.counters().expect("counters");
    assert!(
        counters["tc_flows_started"] >= 10 * u64::from(TABLE),
        "every SYN started a half-open flow: {counters:?}"
    );
    assert_eq!(counters["tc_flows_established"], 2, "{counters:?}");

    // Once the flood stops, the junk expires (10 s idle) and the agent's sweep (every
    // 5 s) removes it.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let junk = entries(&agent, "LB_CT_HALF_OPEN");
        if junk == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "LB_CT_HALF_OPEN still holds {junk} entries 25 s after the flood"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    agent.assert_running();
    let _ = echo_server.kill();
    let _ = echo_server.wait();
}

#[test]
fn a_flood_to_a_service_without_endpoints_gets_icmp_replies_at_the_kernels_rate() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_external_client("outside");
    env.manifests.write(
        "svc.yaml",
        &service("empty", "10.96.0.11")
            .type_("NodePort")
            .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
            .yaml(),
    );
    let mut agent = env.agent_with(&["--devices", EXT_DEVICE]);
    agent.wait_for_frontend("0.0.0.0:30080", 0, APPLY);
    wait_for_tc_programs(&env);
    let target = format!("{NODE_EXT_IP}:{NODE_PORT}");
    let sent: u64 = 20_000;
    let summary = syn_flood(&client, &target, sent);
    let elapsed = summary["elapsed_s"].as_f64().expect("elapsed_s");
    let counters = agent.counters().expect("counters");
    assert_eq!(counters["no_endpoints"], sent, "{counters:?}");
    // Each CPU answers a burst of 50, then 1,000 per second.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let most =
        cpus * (lb_common::ICMP_BURST + (lb_common::ICMP_PER_SEC as f64 * elapsed) as u64 + 1);
    let answered = sent - counters["icmp_rate_limited"];
    assert!(
        answered <= most,
        "{answered} ICMP replies to {sent} SYNs in {elapsed:.2} s: at most {most} expected ({counters:?})"
    );
    assert!(
        answered >= lb_common::ICMP_BURST,
        "the burst is answered: {counters:?}"
    );
}

#[test]
fn an_idle_connection_outlives_a_churn_of_closed_ones_larger_than_the_established_table() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (mut echo_server, client, mut agent) = echo_node_port(&env, TABLE, HALF_OPEN_TABLE);
    let target = format!("{NODE_EXT_IP}:{NODE_PORT}");
    let (wake, kept) = idle_connection(&client, &target);

    // Ten times as many short connections as the established table has flows: each
    // closed one leaves its entries for 10 s, in the half-open table.
    let churn = 10 * TABLE / 2;
    let out = cmd::run(
        Command::new(bins::loadgen()).args([
            "--netns",
            client.netns(),
            "run",
            "--workload",
            "tcp-crr",
            "--target",
            &target,
            "--count",
            &churn.to_string(),
            "--duration-ms",
            "30000",
        ]),
        Duration::from_secs(40),
    )
    .expect("lb-loadgen run");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("run summary");
    assert_eq!(summary["ops"], u64::from(churn), "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");

    wake.send(()).unwrap();
    assert_eq!(
        kept.join()
            .expect("kept connection thread")
            .expect("the idle connection after the churn"),
        "after\n"
    );
    let counters = agent.counters().expect("counters");
    assert!(
        counters["tc_flows_established"] > u64::from(churn),
        "{counters:?}"
    );
    agent.assert_running();
    let _ = echo_server.kill();
    let _ = echo_server.wait();
}
