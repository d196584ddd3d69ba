//! Readiness that tells the truth: `/readyz` on `--api-addr` turns 503 while the API server
//! is unreachable for longer than `--readyz-stale-after` (the maps may miss changes), and
//! 200 again once the watch works, while `/healthz` stays 200 (the process is fine); the
//! outage shows in `/metrics` as watch restarts, scraped and parsed as Prometheus would.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use lb_tests::http::{get_in, wait_for_status};
use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::{API_ADDR, Agent, TestEnv, agent::AgentConfig, require_privileges};
use prometheus_parse::{Scrape, Value};

const APPLY: Duration = Duration::from_secs(15);
const VIP: &str = "10.96.0.10:80";
const STALE_AFTER_SECS: u64 = 3;

fn web_slice(ips: &[IpAddr]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    ips.iter()
        .fold(endpoint_slice("web-a", "web"), |slice, ip| {
            slice.endpoint(*ip, true)
        })
        .port(Some("http"), 8080, "TCP")
        .build()
}

/// `/metrics` on the default `--metrics-bind-address`, parsed.
fn scrape(netns: &str) -> Scrape {
    let answer = get_in(netns, SocketAddr::from(([127, 0, 0, 1], 10249)), "/metrics");
    assert_eq!(answer.status, 200, "{answer:?}");
    Scrape::parse(answer.body.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text")
}

fn sample(scrape: &Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .and_then(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[test]
fn readyz_is_false_while_the_api_server_is_gone_longer_than_the_threshold() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let web1 = env.add_backend("web1", "web", 8080);
    let web2 = env.add_backend("web2", "web", 8080);
    let (api, agent) = env.agent_on_api_server();
    let mut agent = Agent::new(AgentConfig {
        api_addr: Some(API_ADDR),
        extra_args: vec!["--readyz-stale-after".into(), STALE_AFTER_SECS.to_string()],
        ..agent.config().clone()
    });
    api.apply(
        service("web", "10.96.0.10")
            .port_full(Some("http"), 80, 8080, "TCP")
            .build(),
    );
    api.apply(web_slice(&[web1.pod.ip().into()]));
    agent.start();
    agent.wait_for_frontend(VIP, 1, APPLY);
    let node = env.topo.node().name().to_owned();
    let ready = wait_for_status(&node, API_ADDR, "/readyz", 200, APPLY);
    assert_eq!(ready.status, 200, "{ready:?}");
    let metrics = scrape(&node);
    assert_eq!(
        sample(&metrics, "lb_map_entries", Some(("map", "LB4_SERVICES"))),
        Some(1.0),
        "the ClusterIP's master entry"
    );
    assert_eq!(
        sample(&metrics, "lb_map_entries", Some(("map", "LB_SLOTS"))),
        Some(1.0),
        "its one backend slot"
    );
    assert!(
        sample(
            &metrics,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            None
        )
        .is_some_and(|t| t > 1.0e9),
        "a sync has succeeded"
    );
    // Each attached socket program's counters (zero unless kernel.bpf_stats_enabled is on),
    // and the datapath's own.
    assert!(
        sample(
            &metrics,
            "lb_datapath_events_total",
            Some(("event", "sock_translated"))
        )
        .is_some(),
        "lb_datapath_events_total{{event=\"sock_translated\"}}"
    );
    for program in ["lb_connect4", "lb_recvmsg4", "lb_getpeername6"] {
        let runs = sample(
            &metrics,
            "lb_bpf_program_runs_total",
            Some(("program", program)),
        );
        let time = sample(
            &metrics,
            "lb_bpf_program_run_seconds_total",
            Some(("program", program)),
        );
        assert!(
            runs.is_some() && time.is_some(),
            "{program}'s run counters: {:?}",
            metrics
                .samples
                .iter()
                .map(|s| &s.metric)
                .collect::<Vec<_>>()
        );
    }
    assert!(sample(&metrics, "lb_bpf_stats_enabled", None).is_some());

    // The API server goes away: still ready within the threshold, not ready after it.
    api.api().set_unavailable(true);
    let gone = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let early = get_in(&node, API_ADDR, "/readyz");
    assert_eq!(early.status, 200, "1 s into the outage: {early:?}");
    let stale = wait_for_status(&node, API_ADDR, "/readyz", 503, Duration::from_secs(15));
    assert_eq!(stale.status, 503, "{stale:?}");
    assert!(
        gone.elapsed() >= Duration::from_secs(STALE_AFTER_SECS),
        "503 only after the threshold ({:?})",
        gone.elapsed()
    );
    assert!(
        stale.body.contains("watch has been failing for"),
        "{stale:?}"
    );
    let healthz = get_in(&node, API_ADDR, "/healthz");
    assert_eq!(healthz.status, 200, "the process is fine: {healthz:?}");
    // The maps keep what they had: Services keep working meanwhile.
    assert_eq!(
        env.topo
            .add_pod("client")
            .client(&env.cgroup, VIP, 5)
            .host_names(),
        ["web1"]
    );

    // It comes back: ready again, and changes flow.
    api.api().set_unavailable(false);
    let back = wait_for_status(&node, API_ADDR, "/readyz", 200, Duration::from_secs(60));
    assert_eq!(back.status, 200, "{back:?}");
    api.apply(web_slice(&[web1.pod.ip().into(), web2.pod.ip().into()]));
    agent.wait_for_frontend(VIP, 2, APPLY);

    let metrics = scrape(&node);
    let restarts = sample(
        &metrics,
        "lb_watch_restarts_total",
        Some(("resource", "Service")),
    );
    assert!(
        restarts.is_some_and(|n| n >= 2.0),
        "the failed Service watch was retried: {restarts:?}"
    );
    assert!(
        sample(
            &metrics,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            None
        )
        .is_some_and(|n| n >= 2.0)
    );
}
