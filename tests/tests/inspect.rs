//! `lb-agent services`: what the maps hold (kind, family, count, reverse-NAT id, backend slots and
//! states) and, with `--api-addr` given to both `lb-agent run` and `lb-agent services`, the
//! Service and port names and where each backend came from.

use std::collections::BTreeSet;
use std::time::Duration;

use lb_tests::manifests::{Conditions, endpoint_slice, pod, service};
use lb_tests::{Frontend, TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);

/// The frontend `addr` (TCP) in `listed`.
#[track_caller]
fn find<'a>(listed: &'a [Frontend], addr: &str) -> &'a Frontend {
    listed
        .iter()
        .find(|f| f.addr() == addr && f.protocol == "TCP")
        .unwrap_or_else(|| panic!("{addr} not listed: {listed:#?}"))
}

#[test]
fn services_with_the_api_name_service_port_and_endpoint_sources() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    // "webapp": named port, endpoints from two slices, with nodes and zones.
    let web1 = env.topo.add_pod("webapp1");
    let web2 = env.topo.add_pod("webapp2");
    let _s1 = web1.spawn_server("webapp1", 8080);
    let _s2 = web2.spawn_server("webapp2", 8080);
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port_full(Some("http"), 80, "http", "TCP")
            .yaml(),
    );
    for (slice, ip, node, zone) in [
        ("webapp-abcde", web1.ip(), "node-a", "zone-a"),
        ("webapp-fghij", web2.ip(), "node-b", "zone-b"),
    ] {
        env.manifests.write(
            &format!("slice-{slice}.yaml"),
            &endpoint_slice(slice, "webapp")
                .endpoint_full(ip, Conditions::READY, Some(node), Some(zone))
                .port(Some("http"), 8080, "TCP")
                .yaml(),
        );
    }
    // "api": dual-stack, unnamed port, endpoints from its pod.
    let api1 = env.topo.add_pod("api1");
    let _a4 = api1.spawn_server("api1", 8080);
    let _a6 = api1.spawn_server6("api1-v6", 8080);
    env.manifests.write(
        &TestEnv::pod_file("api1"),
        &pod("api1", api1.ip())
            .also_ip(api1.ip6())
            .label("app", "api")
            .node_name("node-a")
            .yaml(),
    );
    env.manifests.write(
        "svc-api.yaml",
        &service("api", "10.96.0.11")
            .cluster_ips(&["10.96.0.11", "fd00:96::11"])
            .selector("app", "api")
            .port(80, 8080)
            .yaml(),
    );
    let client = env.topo.add_pod("client");
    let mut agent = env.agent_with_api();
    agent.wait_for_frontend("10.96.0.10:80", 2, APPLY);
    agent.wait_for_frontend("10.96.0.11:80", 1, APPLY);
    agent.wait_for_frontend("[fd00:96::11]:80", 1, APPLY);

    let listed = agent.services().expect("lb-agent services --api-addr");

    assert_eq!(listed.len(), 3, "{listed:#?}");
    let webapp = find(&listed, "10.96.0.10:80");
    assert_eq!(webapp.service.as_deref(), Some("default/webapp"));
    assert_eq!(webapp.port_name.as_deref(), Some("http"));
    assert_eq!(webapp.kind.as_deref(), Some("ClusterIp"));
    assert_eq!(webapp.family.as_deref(), Some("IPv4"));
    assert_eq!(webapp.count, 2);
    let slots: Vec<u16> = webapp.backends.iter().map(|b| b.slot).collect();
    assert_eq!(slots, [1, 2], "slots 1..=count: {webapp:#?}");
    for (ip, slice, node, zone) in [
        (web1.ip(), "webapp-abcde", "node-a", "zone-a"),
        (web2.ip(), "webapp-fghij", "node-b", "zone-b"),
    ] {
        let backend = webapp
            .backend(&format!("{ip}:8080"))
            .unwrap_or_else(|| panic!("{ip}:8080 not listed: {webapp:#?}"));
        assert_eq!(backend.source.as_deref(), Some(slice), "{backend:?}");
        assert_eq!(backend.node_name.as_deref(), Some(node), "{backend:?}");
        assert_eq!(backend.zone.as_deref(), Some(zone), "{backend:?}");
        assert_eq!(backend.state.as_deref(), Some("Ready"), "{backend:?}");
        assert_eq!(backend.family.as_deref(), Some("IPv4"), "{backend:?}");
        assert_eq!(backend.protocol, "TCP");
        assert_ne!(backend.backend_id, 0, "{backend:?}");
    }

    let api4 = find(&listed, "10.96.0.11:80");
    let api6 = find(&listed, "[fd00:96::11]:80");
    for (frontend, family, backend) in [
        (api4, "IPv4", format!("{}:8080", api1.ip())),
        (api6, "IPv6", format!("[{}]:8080", api1.ip6())),
    ] {
        assert_eq!(frontend.service.as_deref(), Some("default/api"));
        assert_eq!(frontend.port_name.as_deref(), Some(""), "unnamed port");
        assert_eq!(frontend.family.as_deref(), Some(family));
        assert_eq!(frontend.backend_addrs(), [backend]);
        let b = &frontend.backends[0];
        assert_eq!(b.source.as_deref(), Some("pod/api1"), "{frontend:#?}");
        assert_eq!(b.node_name.as_deref(), Some("node-a"), "{frontend:#?}");
        assert_eq!(b.zone, None, "pods have no zone: {frontend:#?}");
        assert_eq!(b.family.as_deref(), Some(family));
    }
    let ids: BTreeSet<u32> = listed.iter().map(|f| f.rev_nat_id).collect();
    assert_eq!(ids.len(), 3, "a reverse-NAT id per frontend: {listed:#?}");
    assert!(!ids.contains(&0), "{listed:#?}");

    // The table names IPv6 frontends with brackets, and the Services, ports and sources.
    let table = agent.services_table().expect("lb-agent services table");
    for expected in [
        "10.96.0.10:80/TCP (default/webapp:http)",
        "10.96.0.11:80/TCP (default/api)",
        "[fd00:96::11]:80/TCP (default/api)",
        &format!("[{}]:8080/TCP", api1.ip6()),
        "from webapp-abcde",
        "from webapp-fghij",
        "from pod/api1",
    ] {
        assert!(
            table.contains(expected),
            "table lacks {expected:?}:\n{table}"
        );
    }

    // Without --api-addr only what the maps hold: the same frontends, no names.
    let plain: Vec<Frontend> = serde_json::from_str(
        &agent
            .services_output_with("json", false)
            .expect("lb-agent services"),
    )
    .expect("services JSON");
    let addrs = |l: &[Frontend]| l.iter().map(Frontend::addr).collect::<BTreeSet<_>>();
    assert_eq!(addrs(&plain), addrs(&listed));
    for frontend in &plain {
        assert_eq!(frontend.service, None, "{frontend:?}");
        assert_eq!(frontend.port_name, None, "{frontend:?}");
        assert!(frontend.backends.iter().all(|b| b.source.is_none()));
        assert!(frontend.backends.iter().all(|b| b.state.is_some()));
    }

    // What is listed is what answers.
    let web = client.client(&env.cgroup, "10.96.0.10:80", 20);
    let api = client.client(&env.cgroup, "[fd00:96::11]:80", 5);
    assert_eq!(web.host_names(), ["webapp1", "webapp2"], "{web:?}");
    assert_eq!(api.host_names(), ["api1-v6"], "{api:?}");
}

#[test]
fn terminating_backends_are_shown_as_such() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.topo.add_pod("webapp1");
    let _s1 = web1.spawn_server("webapp1", 8080);
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    env.manifests.write(
        "slice-webapp.yaml",
        &endpoint_slice("webapp-abcde", "webapp")
            .endpoint_full(web1.ip(), Conditions::TERMINATING, Some("node-a"), None)
            .port(None, 8080, "TCP")
            .yaml(),
    );
    let mut agent = env.agent_with_api();
    let frontend = agent.wait_for_frontend("10.96.0.10:80", 1, APPLY);

    let backend = &frontend.backends[0];
    assert_eq!(
        backend.state.as_deref(),
        Some("Terminating"),
        "{frontend:#?}"
    );
    assert_eq!(backend.source.as_deref(), Some("webapp-abcde"));
    let table = agent.services_table().expect("lb-agent services table");
    assert!(
        table.contains(&format!("{}:8080/TCP (terminating)", web1.ip())),
        "{table}"
    );
}

/// `lb-agent explain` against a running agent: the entry as the maps hold it, the backends
/// a connection gets, the objects that made them; a Service without endpoints is refused,
/// and what a client then sees matches.
#[test]
fn explain_tells_what_a_connection_gets_and_why() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.topo.add_pod("webapp1");
    let _s1 = web1.spawn_server("webapp1", 8080);
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port_full(Some("http"), 80, 8080, "TCP")
            .yaml(),
    );
    env.manifests.write(
        "slice-webapp.yaml",
        &endpoint_slice("webapp-abcde", "webapp")
            .endpoint_full(web1.ip(), Conditions::READY, Some("node-a"), Some("zone-a"))
            .port(Some("http"), 8080, "TCP")
            .yaml(),
    );
    env.manifests.write(
        "svc-empty.yaml",
        &service("empty", "10.96.0.30")
            .selector("app", "none")
            .port_full(None, 80, 8080, "TCP")
            .yaml(),
    );
    let mut agent = env.agent_with_api();
    agent.wait_for_frontend("10.96.0.10:80", 1, APPLY);
    agent.wait_for_frontend("10.96.0.30:80", 0, APPLY);

    let out = agent
        .explain_output(&["10.96.0.10:80/TCP", "--from", "10.244.0.9"])
        .expect("explain");
    for line in [
        "10.96.0.10:80/TCP (ClusterIp, Service default/webapp port http)",
        "outcome:  one of 1 backend(s)",
        "map:      id ",
        &format!(
            "backend:  slot 1 {}:8080/TCP Ready [node node-a, zone zone-a",
            web1.ip()
        ),
        "made by:  Service default/webapp (no resourceVersion, from /",
        "EndpointSlice default/webapp-abcde (no resourceVersion, from /",
        "written:  20",
    ] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(line)),
            "no {line:?} in:\n{out}"
        );
    }
    assert!(
        out.contains("svc-webapp.yaml)") && out.contains("slice-webapp.yaml)"),
        "each object's file: {out}"
    );
    let empty = agent.explain_output(&["10.96.0.30:80"]).expect("explain");
    assert!(
        empty.contains("outcome:  refused: no endpoints") && empty.contains("0 backend slot(s)"),
        "{empty}"
    );
    let client = env.topo.add_pod("client");
    let refused = client.client(&env.cgroup, "10.96.0.30:80", 1);
    assert_eq!(refused.errors.get("ECONNREFUSED"), Some(&1), "{refused:?}");
}
