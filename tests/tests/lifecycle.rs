//! Manifest changes while the agent runs: pods leave, Services go, broken files stay contained,
//! a second definition of a running Service changes nothing.

use std::time::{Duration, Instant};

use lb_tests::clock::monotonic_ns;
use lb_tests::manifests::service;
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";
/// The agent applies changes within a second; this much more is allowed for the file watcher.
const FOLLOW_LIMIT: Duration = Duration::from_millis(1500);
/// Consecutive connections that must avoid the removed pod.
const STREAK: u32 = 20;

#[test]
fn removed_pod_gets_no_new_connections_within_a_second() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    // Its server keeps running: only the manifest goes, as when the API server drops the pod.
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
    agent.wait_for_frontend(VIP, 2, APPLY);
    let before = client.client(&env.cgroup, VIP, 40);
    assert_eq!(before.host_names(), ["webapp1", "webapp2"], "{before:?}");

    let removed_at = monotonic_ns();
    env.manifests.remove(&TestEnv::pod_file("webapp2"));

    // Poll until STREAK consecutive connections all reached webapp1; the time of the first of
    // them is when new connections followed the change.
    let give_up = Instant::now() + FOLLOW_LIMIT + Duration::from_secs(2);
    let mut streak = 0;
    let mut streak_start = 0;
    let mut seen_after = Vec::new();
    while streak < STREAK {
        assert!(
            Instant::now() < give_up,
            "still reaching webapp2 {:?} after removing its manifest; recent: {seen_after:?}",
            FOLLOW_LIMIT + Duration::from_secs(2),
        );
        let batch = client
            .client_with()
            .cgroup(&env.cgroup)
            .count(10)
            .timeout_ms(500)
            .run(VIP);
        for attempt in &batch.attempts {
            if attempt.host.as_deref() == Some("webapp1") {
                if streak == 0 {
                    streak_start = attempt.start_ns;
                }
                streak += 1;
                if streak == STREAK {
                    break;
                }
            } else {
                streak = 0;
            }
            seen_after.push(
                attempt
                    .host
                    .clone()
                    .or_else(|| attempt.error.clone())
                    .unwrap_or_default(),
            );
        }
        if seen_after.len() > 40 {
            seen_after.drain(..seen_after.len() - 40);
        }
    }
    let followed = Duration::from_nanos(streak_start.saturating_sub(removed_at));
    eprintln!(
        "new connections avoided the removed pod {followed:?} after its manifest was removed"
    );

    assert!(
        followed <= FOLLOW_LIMIT,
        "new connections followed the removal only after {followed:?} (limit {FOLLOW_LIMIT:?})"
    );
    let frontend = agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(frontend.backends[0].port, 8080);
}

#[test]
fn deleted_service_is_no_longer_translated() {
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
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    let before = client.client(&env.cgroup, VIP, 5);
    assert_eq!(before.ok, 5, "{before:?}");

    env.manifests.remove("svc-webapp.yaml");
    agent.wait_for_no_frontend(VIP, Duration::from_secs(3));

    // Untranslated, the ClusterIP is routed nowhere: the node namespace drops the packets.
    let after = client
        .client_with()
        .cgroup(&env.cgroup)
        .count(3)
        .timeout_ms(300)
        .run(VIP);
    assert_eq!(after.ok, 0, "the deleted Service still answers: {after:?}");
    let unexpected: Vec<_> = after
        .errors
        .keys()
        .filter(|e| !matches!(e.as_str(), "ETIMEDOUT" | "ENETUNREACH" | "EHOSTUNREACH"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "a deleted Service must not be rejected by the agent (ECONNREFUSED means its frontend is \
         still there): {after:?}"
    );
}

#[test]
fn malformed_manifests_leave_other_services_working() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let _api1 = env.add_backend("api1", "api", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n spec: [unclosed\n",
    );
    env.manifests.write(
        "svc-bad-port.yaml",
        &service("bad-port", "10.96.0.20")
            .selector("app", "webapp")
            .port(70000, 8080)
            .yaml(),
    );
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    let summary = client.client(&env.cgroup, VIP, 10);
    assert_eq!(summary.host_names(), ["webapp1"], "{summary:?}");
    assert_eq!(summary.ok, 10, "{summary:?}");

    // The agent keeps applying changes with the broken files still there.
    env.manifests.write(
        "svc-api.yaml",
        &service("api", "10.96.0.11")
            .selector("app", "api")
            .port(80, 8080)
            .yaml(),
    );
    agent.wait_for_frontend("10.96.0.11:80", 1, APPLY);
    let api = client.client(&env.cgroup, "10.96.0.11:80", 10);
    let webapp = client.client(&env.cgroup, VIP, 10);

    assert_eq!(api.ok, 10, "{api:?}");
    assert_eq!(api.host_names(), ["api1"], "{api:?}");
    assert_eq!(webapp.ok, 10, "{webapp:?}");
    let listed = agent.services().expect("lb-agent services");
    assert!(
        listed.iter().all(|f| f.address != "10.96.0.20"),
        "the Service with port 70000 must not be programmed: {listed:?}"
    );
}

/// Asserts `summary` (to a ClusterIP without a Service) went out untranslated.
#[track_caller]
fn assert_gone(summary: &lb_tests::ClientSummary, what: &str) {
    assert_eq!(summary.ok, 0, "{what}: answered: {summary:?}");
    assert!(
        summary
            .errors
            .keys()
            .all(|e| matches!(e.as_str(), "ETIMEDOUT" | "ENETUNREACH" | "EHOSTUNREACH")),
        "{what}: still translated: {summary:?}"
    );
}

/// Upstream `should be able to up and down services`: three Services over their own pods;
/// deleting the first takes its ClusterIP down while the second keeps reaching all of its
/// backends, and a third created afterwards comes up on its new ClusterIP.
#[test]
fn services_come_up_and_go_down_independently() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let mut backends = Vec::new();
    for svc in ["up-down-1", "up-down-2", "up-down-3"] {
        for n in 1..=2 {
            backends.push(env.add_backend(&format!("{svc}-{n}"), svc, 8080));
        }
    }
    let client = env.topo.add_pod("client");
    let svc_yaml = |name: &str, ip: &str| {
        service(name, ip)
            .selector("app", name)
            .port(80, 8080)
            .yaml()
    };
    env.manifests
        .write("svc-1.yaml", &svc_yaml("up-down-1", "10.96.0.11"));
    env.manifests
        .write("svc-2.yaml", &svc_yaml("up-down-2", "10.96.0.12"));
    let mut agent = env.agent();
    agent.wait_for_frontend("10.96.0.11:80", 2, APPLY);
    agent.wait_for_frontend("10.96.0.12:80", 2, APPLY);
    let one = client.client(&env.cgroup, "10.96.0.11:80", 20);
    assert_eq!(one.host_names(), ["up-down-1-1", "up-down-1-2"], "{one:?}");

    env.manifests.remove("svc-1.yaml");
    agent.wait_for_no_frontend("10.96.0.11:80", APPLY);
    let gone = client
        .client_with()
        .cgroup(&env.cgroup)
        .count(2)
        .timeout_ms(300)
        .run("10.96.0.11:80");
    let two = client.client(&env.cgroup, "10.96.0.12:80", 20);
    assert_gone(&gone, "the deleted up-down-1");
    assert_eq!(two.ok, 20, "{two:?}");
    assert_eq!(two.host_names(), ["up-down-2-1", "up-down-2-2"], "{two:?}");

    env.manifests
        .write("svc-3.yaml", &svc_yaml("up-down-3", "10.96.0.13"));
    agent.wait_for_frontend("10.96.0.13:80", 2, APPLY);
    let three = client.client(&env.cgroup, "10.96.0.13:80", 20);
    assert_eq!(three.ok, 20, "{three:?}");
    assert_eq!(
        three.host_names(),
        ["up-down-3-1", "up-down-3-2"],
        "{three:?}"
    );
}

/// Upstream `should work after the service has been recreated`: the Service is deleted and
/// created again with the same selector and a new ClusterIP, which reaches every backend
/// while the old one is gone.
#[test]
fn a_recreated_service_reaches_every_backend_on_its_new_cluster_ip() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    let client = env.topo.add_pod("client");
    let svc = |ip: &str| {
        service("webapp", ip)
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml()
    };
    env.manifests.write("svc-webapp.yaml", &svc("10.96.0.10"));
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 2, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 5).ok, 5);

    env.manifests.remove("svc-webapp.yaml");
    agent.wait_for_no_frontend(VIP, APPLY);
    env.manifests.write("svc-webapp.yaml", &svc("10.96.0.20"));
    agent.wait_for_frontend("10.96.0.20:80", 2, APPLY);
    let summary = client.client(&env.cgroup, "10.96.0.20:80", 20);
    let old = client
        .client_with()
        .cgroup(&env.cgroup)
        .count(2)
        .timeout_ms(300)
        .run(VIP);

    assert_eq!(summary.ok, 20, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");
    assert_gone(&old, "the old ClusterIP");
}

/// A second file redefining a running Service (same name, another ClusterIP, a file name
/// that sorts first) changes nothing while clients connect: every connection to the running
/// Service succeeds, the new file is reported naming both files, and only when the first
/// file is removed does the second definition take effect.
#[test]
fn a_second_definition_never_moves_a_running_service() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    let web = |ip: &str| {
        service("webapp", ip)
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml()
    };
    env.manifests.write("z-webapp.yaml", &web("10.96.0.10"));
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);

    const CONNECTIONS: u32 = 600;
    let during = std::thread::scope(|scope| {
        let clients = scope.spawn(|| {
            client
                .client_with()
                .cgroup(&env.cgroup)
                .count(CONNECTIONS)
                .interval_ms(5)
                .timeout_ms(1000)
                .run(VIP)
        });
        std::thread::sleep(Duration::from_millis(300));
        env.manifests.write("a-webapp.yaml", &web("10.96.0.20"));
        std::thread::sleep(Duration::from_millis(800));
        // An edit of the duplicate is still a duplicate.
        env.manifests.write("a-webapp.yaml", &web("10.96.0.21"));
        clients.join().expect("client thread")
    });
    assert_eq!(
        during.ok,
        CONNECTIONS,
        "every connection to the running Service succeeds: {:?}\n{}",
        during.errors,
        agent.log_tail(30)
    );
    assert_eq!(during.host_names(), ["webapp1"]);
    let listed: Vec<String> = agent
        .services()
        .expect("lb-agent services")
        .iter()
        .map(|f| f.addr())
        .collect();
    assert_eq!(listed, [VIP], "the first definition stays in effect");
    let log = agent.log();
    let reported = log.lines().any(|line| {
        line.contains("a-webapp.yaml: Service default/webapp: metadata.name: already defined in")
            && line.contains("z-webapp.yaml")
    });
    assert!(
        reported,
        "the duplicate is reported naming both files\n{}",
        agent.log_tail(30)
    );

    // The first definition goes: the second takes effect.
    env.manifests.remove("z-webapp.yaml");
    agent.wait_for_frontend("10.96.0.21:80", 1, APPLY);
    agent.wait_for_no_frontend(VIP, APPLY);
    let after = client.client(&env.cgroup, "10.96.0.21:80", 5);
    assert_eq!(after.ok, 5, "{after:?}");
}
