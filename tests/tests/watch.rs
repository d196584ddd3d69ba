//! The agent on the Kubernetes API: Services and EndpointSlices from a protocol-faithful
//! fake API server (kube-rs's real client talks to it), in the test's node namespace.

use std::net::IpAddr;
use std::thread;
use std::time::{Duration, Instant};

use fake_apiserver::ResourceKind;
use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::{TestEnv, require_privileges};

const APPLY: Duration = Duration::from_secs(15);
const VIP: &str = "10.96.0.10:80";

fn web_service() -> k8s_openapi::api::core::v1::Service {
    service("web", "10.96.0.10")
        .port_full(Some("http"), 80, 8080, "TCP")
        .build()
}

fn web_slice(name: &str, ips: &[IpAddr]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    ips.iter()
        .fold(endpoint_slice(name, "web"), |slice, ip| {
            slice.endpoint(*ip, true)
        })
        .port(Some("http"), 8080, "TCP")
        .build()
}

#[test]
fn creates_updates_and_deletes_reach_the_maps() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.add_backend("web1", "web", 8080);
    let web2 = env.add_backend("web2", "web", 8080);
    let client = env.topo.add_pod("client");
    let (api, mut agent) = env.agent_on_api_server();
    api.apply(web_service());
    api.apply(web_slice("web-a", &[web1.pod.ip().into()]));
    agent.start();
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 10).host_names(), ["web1"]);

    // A second endpoint in the slice.
    api.apply(web_slice(
        "web-a",
        &[web1.pod.ip().into(), web2.pod.ip().into()],
    ));
    agent.wait_for_frontend(VIP, 2, APPLY);
    assert_eq!(
        client.client(&env.cgroup, VIP, 30).host_names(),
        ["web1", "web2"]
    );

    // The Service's port changes: the old frontend goes, the new one comes.
    api.apply(
        service("web", "10.96.0.10")
            .port_full(Some("http"), 8000, 8080, "TCP")
            .build(),
    );
    agent.wait_for_frontend("10.96.0.10:8000", 2, APPLY);
    agent.wait_for_no_frontend(VIP, APPLY);

    // The slice is deleted: the Service has no endpoints and refuses.
    api.delete(ResourceKind::EndpointSlice, "default", "web-a");
    agent.wait_for_frontend("10.96.0.10:8000", 0, APPLY);
    let refused = client.client(&env.cgroup, "10.96.0.10:8000", 1);
    assert_eq!(refused.errors.get("ECONNREFUSED"), Some(&1), "{refused:?}");

    // The Service is deleted: nothing is translated any more.
    api.delete(ResourceKind::Service, "default", "web");
    agent.wait_for_no_frontend("10.96.0.10:8000", APPLY);
}

#[test]
fn a_relist_after_410_gone_does_not_disturb_a_connection_loop() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.add_backend("web1", "web", 8080);
    let web2 = env.add_backend("web2", "web", 8080);
    let client = env.topo.add_pod("client");
    let (api, mut agent) = env.agent_on_api_server();
    api.apply(web_service());
    api.apply(web_slice(
        "web-a",
        &[web1.pod.ip().into(), web2.pod.ip().into()],
    ));
    agent.start();
    let before = agent.wait_for_frontend(VIP, 2, APPLY);
    let lists = api.api().list_count(ResourceKind::Service);

    // A connection loop long enough to span the 410 and the relist that follows it (the
    // watcher relists after its backoff, not at once).
    let (summary, relisted) = thread::scope(|scope| {
        let loop_ = scope.spawn(|| {
            client
                .client_with()
                .cgroup(&env.cgroup)
                .count(200)
                .interval_ms(25)
                .run(VIP)
        });
        thread::sleep(Duration::from_millis(300));
        api.api().expire_watches();
        let deadline = Instant::now() + Duration::from_secs(4);
        while api.api().list_count(ResourceKind::Service) == lists && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let relisted = api.api().list_count(ResourceKind::Service) > lists;
        (loop_.join().expect("client loop"), relisted)
    });

    assert!(relisted, "the 410 made the agent relist within 4 s");
    assert_eq!(
        summary.ok, 200,
        "no connection failed across the relist: {summary:?}"
    );
    let after = agent.wait_for_frontend(VIP, 2, APPLY);
    assert_eq!(
        (after.rev_nat_id, after.backend_addrs()),
        (before.rev_nat_id, before.backend_addrs()),
        "the frontend kept its id and backends"
    );
    let writes_after_relist = agent
        .log()
        .lines()
        .filter(|l| l.contains("maps updated"))
        .count();
    assert_eq!(
        writes_after_relist,
        1,
        "only the initial sync wrote the maps:\n{}",
        agent.log()
    );
}

#[test]
fn an_api_outage_changes_nothing_until_the_api_returns() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.add_backend("web1", "web", 8080);
    let web2 = env.add_backend("web2", "web", 8080);
    let client = env.topo.add_pod("client");
    let (api, mut agent) = env.agent_on_api_server();
    api.apply(web_service());
    api.apply(web_slice("web-a", &[web1.pod.ip().into()]));
    agent.start();
    let before = agent.wait_for_frontend(VIP, 1, APPLY);

    api.api().set_unavailable(true);
    // Wait until the agent's watches are cut, so the change below cannot reach it.
    let cut = Instant::now();
    while api.api().open_watches() > 0 {
        assert!(
            cut.elapsed() < Duration::from_secs(5),
            "watches still open during the outage"
        );
        thread::sleep(Duration::from_millis(10));
    }
    // A change the agent cannot see while the API is away.
    api.apply(web_slice(
        "web-a",
        &[web1.pod.ip().into(), web2.pod.ip().into()],
    ));
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        client.client(&env.cgroup, VIP, 10).ok,
        10,
        "Services keep working"
    );
    let during = agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(
        during.backend_addrs(),
        before.backend_addrs(),
        "maps untouched"
    );
    agent.assert_running();

    api.api().set_unavailable(false);
    let started = Instant::now();
    agent.wait_for_frontend(VIP, 2, Duration::from_secs(30));
    eprintln!("converged {:?} after the API came back", started.elapsed());
    assert_eq!(
        client.client(&env.cgroup, VIP, 30).host_names(),
        ["web1", "web2"]
    );
}

#[test]
fn start_up_with_10k_services_reaches_a_fully_programmed_state() {
    if !require_privileges() {
        return;
    }
    const SERVICES: u32 = 10_000;
    let env = TestEnv::new();
    let web = env.add_backend("web", "web", 8080);
    let client = env.topo.add_pod("client");
    let (api, mut agent) = env.agent_on_api_server();
    let mut objects: Vec<serde_json::Value> = Vec::new();
    for i in 0..SERVICES {
        let name = format!("svc-{i}");
        let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
        let svc = service(&name, &ip)
            .port_full(Some("http"), 80, 8080, "TCP")
            .build();
        // Each Service has its own endpoint address; the last one's is the real pod.
        let endpoint: IpAddr = if i == SERVICES - 1 {
            web.pod.ip().into()
        } else {
            format!("10.244.{}.{}", 100 + i / 250, i % 250 + 1)
                .parse()
                .expect("ip")
        };
        let slice = endpoint_slice(&format!("{name}-x"), &name)
            .endpoint(endpoint, true)
            .port(Some("http"), 8080, "TCP")
            .build();
        objects.push(serde_json::to_value(svc).expect("json"));
        objects.push(serde_json::to_value(slice).expect("json"));
    }
    api.api().bulk_apply(objects).expect("bulk apply");

    let started = Instant::now();
    agent.start();
    let frontends = agent.wait_until("10k frontends", Duration::from_secs(120), |f| {
        (f.len() == SERVICES as usize && f.iter().all(|f| f.backends.len() == 1)).then_some(f.len())
    });
    eprintln!(
        "{frontends} frontends programmed {:?} after start",
        started.elapsed()
    );
    // Nothing was written before both initial lists were complete: one full sync.
    let first_write = agent
        .log()
        .lines()
        .find(|l| l.contains("maps updated"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        first_write.contains("frontends=10000"),
        "first write: {first_write}"
    );
    let summary = client.client(&env.cgroup, "10.97.39.250:80", 4);
    assert_eq!(
        summary.host_names(),
        ["web"],
        "the last Service answers: {summary:?}"
    );
    assert_eq!(summary.ok, 4, "{summary:?}");
}

/// Upstream `should implement service.kubernetes.io/headless`, against the API server: a
/// Service that gets the label is no longer proxied (the agent's watch selects Services
/// without it, and the API server reports the labelled Service as gone from the watch), and
/// one that loses it is proxied again.
#[test]
fn the_headless_label_takes_a_watched_service_away_from_the_proxy_and_back() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.add_backend("web1", "web", 8080);
    let client = env.topo.add_pod("client");
    let (api, mut agent) = env.agent_on_api_server();
    api.apply(web_service());
    api.apply(web_slice("web-a", &[web1.pod.ip().into()]));
    agent.start();
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 5).count("web1"), 5);

    api.apply(
        service("web", "10.96.0.10")
            .label("service.kubernetes.io/headless", "")
            .port_full(Some("http"), 80, 8080, "TCP")
            .build(),
    );
    agent.wait_for_no_frontend(VIP, APPLY);
    let labelled = client
        .client_with()
        .cgroup(&env.cgroup)
        .count(2)
        .timeout_ms(300)
        .run(VIP);
    assert_eq!(labelled.ok, 0, "{labelled:?}");
    assert!(
        labelled
            .errors
            .keys()
            .all(|e| matches!(e.as_str(), "ETIMEDOUT" | "ENETUNREACH" | "EHOSTUNREACH")),
        "not translated at all while labelled: {labelled:?}"
    );

    api.apply(web_service());
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(client.client(&env.cgroup, VIP, 5).count("web1"), 5);
}
