//! `lb-agent monitor`: the decisions of connections made after it starts — a ClusterIP from
//! a pod (socket hook), a NodePort from outside (tc), a Service without endpoints (refused)
//! — with client, frontend, Service, backend and why; its Service and client filters; and
//! the datapath's switch, off once the monitor exits and, when it is killed, by itself.

use std::time::Duration;

use lb_tests::agent::AgentConfig;
use lb_tests::manifests::{pod, service};
use lb_tests::monitor::{switch_is_on, switch_until_ns};
use lb_tests::{
    API_ADDR, Agent, BackendPod, EXT_DEVICE, EXTERNAL_CLIENT_IP, NODE_EXT_IP, TestEnv,
    require_privileges,
};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
/// How long a decision may take to show.
const SHOW: Duration = Duration::from_secs(5);
const NODE_PORT: u16 = 30080;

/// The agent with its API, programs attached; with `tc`, also the tc datapath on `ext0`
/// (made by `add_external_client`).
fn start_agent(env: &TestEnv, tc: bool) -> Agent {
    let extra_args = if tc {
        vec!["--devices".into(), EXT_DEVICE.into()]
    } else {
        Vec::new()
    };
    let mut agent = Agent::new(AgentConfig {
        api_addr: Some(API_ADDR),
        extra_args,
        ..env.agent_config()
    });
    agent.start();
    agent.wait_attached();
    if !tc {
        return agent;
    }
    let tc_pin = env
        .pins
        .path()
        .join("links")
        .join(format!("tc-egress-{EXT_DEVICE}"));
    agent.wait_until("the tc programs attached", APPLY, |_| {
        tc_pin.exists().then_some(())
    });
    agent
}

/// `webapp` (NodePort 30080, two backends) and `empty` (no endpoints).
fn write_services(env: &TestEnv) -> (BackendPod, BackendPod) {
    let web1 = env.add_backend("webapp1", "webapp", 8080);
    let web2 = env.add_backend("webapp2", "webapp", 8080);
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .type_("NodePort")
            .selector("app", "webapp")
            .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
            .yaml(),
    );
    env.manifests.write(
        "svc-empty.yaml",
        &service("empty", "10.96.0.20")
            .selector("app", "nothing")
            .port(80, 8080)
            .yaml(),
    );
    (web1, web2)
}

fn text<'a>(d: &'a serde_json::Value, field: &str) -> &'a str {
    d[field].as_str().unwrap_or_default()
}

#[test]
fn monitor_shows_cluster_ip_node_port_and_refused_decisions_then_switches_off() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (web1, web2) = write_services(&env);
    let client = env.topo.add_pod("client");
    let outside = env.topo.add_external_client("outside");
    let mut agent = start_agent(&env, true);
    agent.wait_for_frontend("10.96.0.10:80", 2, APPLY);
    agent.wait_for_frontend("10.96.0.20:80", 0, APPLY);
    assert!(
        !switch_is_on(env.pins.path()),
        "the switch is off before any monitor runs"
    );

    let mut monitor = agent.monitor(&[]);
    assert!(switch_is_on(env.pins.path()), "the monitor turned it on");
    let backends = [
        format!("{}:8080", web1.pod.ip()),
        format!("{}:8080", web2.pod.ip()),
    ];

    // A ClusterIP from a pod: the connect hook, the pod by its network namespace.
    let summary = client.client(&env.cgroup, "10.96.0.10:80", 1);
    assert_eq!(summary.ok, 1, "{summary:?}");
    let d = monitor.wait_for("for the ClusterIP", SHOW, |d| {
        text(d, "frontend") == "10.96.0.10:80/TCP"
    });
    assert_eq!(text(&d, "hook"), "connect", "{d:#}");
    assert_eq!(text(&d, "service"), "default/webapp", "{d:#}");
    assert_eq!(text(&d, "outcome"), "translated", "{d:#}");
    assert!(backends.contains(&text(&d, "backend").to_owned()), "{d:#}");
    assert_eq!(d["count"], 2, "{d:#}");
    let slot = d["slot"].as_u64().unwrap_or_default();
    assert!((1..=2).contains(&slot), "{d:#}");
    assert_eq!(text(&d, "reason"), format!("slot {slot} of 2, at random"));
    let client_ips: Vec<&str> = d["client"]["netns_addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect();
    assert!(
        client_ips.contains(&client.ip().to_string().as_str()),
        "the client's namespace by its address: {d:#}"
    );
    assert!(d["client"]["pid"].as_u64().is_some_and(|p| p > 0), "{d:#}");

    // A NodePort from outside the node: tc, the client by its source address.
    let target = format!("{NODE_EXT_IP}:{NODE_PORT}");
    let summary = outside.client_with().count(1).run(&target);
    assert_eq!(summary.ok, 1, "{summary:?}");
    let d = monitor.wait_for("for the NodePort", SHOW, |d| {
        text(d, "frontend") == format!("{target}/TCP")
    });
    assert_eq!(text(&d, "hook"), "tc-external", "{d:#}");
    assert_eq!(text(&d, "service"), "default/webapp", "{d:#}");
    assert!(
        text(&d["client"], "address").starts_with(&format!("{EXTERNAL_CLIENT_IP}:")),
        "{d:#}"
    );
    assert!(backends.contains(&text(&d, "backend").to_owned()), "{d:#}");

    // A Service without endpoints: refused, and said so.
    let summary = client.client(&env.cgroup, "10.96.0.20:80", 1);
    assert_eq!(summary.errors.get("ECONNREFUSED"), Some(&1), "{summary:?}");
    let d = monitor.wait_for("for the Service without endpoints", SHOW, |d| {
        text(d, "frontend") == "10.96.0.20:80/TCP"
    });
    assert_eq!(text(&d, "outcome"), "refused", "{d:#}");
    assert_eq!(text(&d, "reason"), "no endpoints", "{d:#}");
    assert_eq!(text(&d, "service"), "default/empty", "{d:#}");
    assert!(d["backend"].is_null(), "{d:#}");

    // Ctrl-C: the monitor exits cleanly and turns the switch off.
    assert!(monitor.interrupt(), "stderr: {}", monitor.stderr());
    assert_eq!(switch_until_ns(env.pins.path()), 0, "the switch is off");
}

#[test]
fn monitor_filters_by_service_and_client() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _backends = write_services(&env);
    let alice = env.topo.add_pod("alice");
    let bob = env.topo.add_pod("bob");
    let mut agent = start_agent(&env, false);
    agent.wait_for_frontend("10.96.0.10:80", 2, APPLY);
    agent.wait_for_frontend("10.96.0.20:80", 0, APPLY);

    let bob_ip = bob.ip().to_string();
    let monitor = agent.monitor(&["--service", "default/webapp", "--client", &bob_ip]);
    // Filtered out: alice to webapp (client), bob to empty (Service).
    assert_eq!(alice.client(&env.cgroup, "10.96.0.10:80", 1).ok, 1);
    let refused = bob.client(&env.cgroup, "10.96.0.20:80", 1);
    assert_eq!(refused.errors.get("ECONNREFUSED"), Some(&1), "{refused:?}");
    // Shown: bob to webapp, made last, so every earlier decision was read before it.
    assert_eq!(bob.client(&env.cgroup, "10.96.0.10:80", 1).ok, 1);

    let d = monitor.wait_for("from bob to webapp", SHOW, |d| {
        text(d, "frontend") == "10.96.0.10:80/TCP"
    });
    let decisions = monitor.decisions();
    assert_eq!(
        decisions.len(),
        1,
        "only bob's decision for webapp: {decisions:#?}"
    );
    assert!(
        d["client"]["netns_addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|ip| ip.as_str() == Some(bob_ip.as_str()))),
        "{d:#}"
    );
}

#[test]
fn a_killed_monitor_leaves_the_switch_to_turn_off_by_itself() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _backends = write_services(&env);
    let client = env.topo.add_pod("client");
    let mut agent = start_agent(&env, false);
    agent.wait_for_frontend("10.96.0.10:80", 2, APPLY);

    let mut monitor = agent.monitor(&[]);
    monitor.kill();
    assert!(
        switch_is_on(env.pins.path()),
        "a killed monitor could not turn the switch off"
    );
    // Its lease runs out (3 s) without anyone renewing it.
    agent.wait_until(
        "the switch's lease to run out",
        Duration::from_secs(5),
        |_| (!switch_is_on(env.pins.path())).then_some(()),
    );
    // Translation goes on; a new monitor can take the switch (the killed one's lock died
    // with it) and stops after --count decisions, turning it off.
    let mut next = agent.monitor(&["--count", "1"]);
    assert_eq!(client.client(&env.cgroup, "10.96.0.10:80", 1).ok, 1);
    assert!(next.wait(SHOW), "stderr: {}", next.stderr());
    assert_eq!(next.decisions().len(), 1, "{:#?}", next.decisions());
    assert_eq!(switch_until_ns(env.pins.path()), 0, "the switch is off");
}

#[test]
fn unconnected_udp_decisions_come_from_sendmsg_by_the_sockets_hash() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let dns = env.topo.add_pod("dns1");
    let _server = dns.spawn_udp_server("dns1", 5353);
    env.manifests.write(
        &TestEnv::pod_file("dns1"),
        &pod("dns1", dns.ip())
            .label("app", "dns")
            .container_port_full("dns", 5353, "UDP")
            .yaml(),
    );
    env.manifests.write(
        "svc-dns.yaml",
        &service("dns", "10.96.0.53")
            .selector("app", "dns")
            .port_full(Some("dns"), 53, "dns", "UDP")
            .yaml(),
    );
    let client = env.topo.add_pod("client");
    let mut agent = start_agent(&env, false);
    agent.wait_for_frontend_proto("10.96.0.53:53", "UDP", 1, APPLY);

    let monitor = agent.monitor(&[]);
    let summary = client
        .client_with()
        .cgroup(&env.cgroup)
        .udp()
        .count(1)
        .sends(2)
        .run("10.96.0.53:53");
    assert_eq!(summary.ok, 2, "{summary:?}");
    let d = monitor.wait_for("for the unconnected UDP send", SHOW, |d| {
        text(d, "frontend") == "10.96.0.53:53/UDP"
    });
    assert_eq!(text(&d, "hook"), "sendmsg", "{d:#}");
    assert_eq!(text(&d, "service"), "default/dns", "{d:#}");
    assert_eq!(text(&d, "backend"), format!("{}:5353", dns.ip()), "{d:#}");
    assert_eq!(
        text(&d, "reason"),
        "slot 1 of 1, by the socket's hash (unconnected UDP)",
        "{d:#}"
    );
}
