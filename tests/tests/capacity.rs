//! Map capacities (`--max-frontends`, `--max-backend-slots`, …): a Service that does not fit
//! is reported on its object and left out, while every other Service keeps being programmed
//! and following its endpoints; `lb-agent services --summary` shows each map's fill.

use std::net::Ipv4Addr;
use std::time::Duration;

use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const SMALL: &str = "10.96.0.10:80";
const BIG: &str = "10.96.0.20:80";
/// Each services map holds 2 masters, the slots array 8 slots (one per endpoint).
const CAPACITY_ARGS: [&str; 4] = ["--max-frontends", "2", "--max-backend-slots", "8"];

/// The `big` Service with `n` endpoints (addresses nothing answers on: only the maps matter).
fn write_big(env: &TestEnv, n: u8) {
    env.manifests.write(
        "svc-big.yaml",
        &service("big", "10.96.0.20").port(80, 8080).yaml(),
    );
    let mut slice = endpoint_slice("big-1", "big").port(None, 8080, "TCP");
    for i in 1..=n {
        slice = slice.endpoint(Ipv4Addr::new(10, 244, 9, i), true);
    }
    env.manifests.write("slice-big.yaml", &slice.yaml());
}

/// The `services --summary` row of `map`: (entries, capacity).
fn fill(agent: &lb_tests::Agent, map: &str) -> (u64, u64) {
    let rows = agent.map_summary().expect("services --summary");
    let row = rows
        .iter()
        .find(|r| r["name"] == map)
        .unwrap_or_else(|| panic!("{map} not in the summary: {rows:#?}"));
    assert!(
        row["memory_bytes"].as_u64().unwrap_or(0) > 0,
        "the kernel's memory of {map} is shown: {row}"
    );
    (
        row["entries"].as_u64().expect("entries"),
        row["capacity"].as_u64().expect("capacity"),
    )
}

#[test]
fn a_service_too_large_to_fit_is_reported_while_another_follows_its_endpoints() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-small.yaml",
        &service("small", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    // 12 slots: more than the whole slots array.
    write_big(&env, 12);
    let mut agent = env.agent_with(&CAPACITY_ARGS);
    agent.wait_for_frontend(SMALL, 1, APPLY);

    let log = agent.log();
    assert!(
        log.contains(
            "svc-big.yaml: Service default/big: spec.ports[0]: not programmed: \
             LB_SLOTS is full (8 entries, 1 in use; 12 wanted"
        ),
        "the Service that does not fit is reported on its port:\n{}",
        agent.log_tail(30)
    );
    assert!(
        agent.frontend(BIG).expect("services").is_none(),
        "nothing of it is programmed"
    );
    assert_eq!(fill(&agent, "LB4_SERVICES"), (1, 2));
    assert_eq!(fill(&agent, "LB_SLOTS"), (1, 8));

    // The other Service keeps following its endpoints, and serves them.
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    agent.wait_for_frontend(SMALL, 2, APPLY);
    let summary = client.client(&env.cgroup, SMALL, 20);
    assert_eq!(summary.ok, 20, "{summary:?}");
    assert_eq!(summary.host_names(), ["webapp1", "webapp2"], "{summary:?}");

    // Scaled down, the big Service fits beside it and its problem is resolved.
    write_big(&env, 5);
    agent.wait_for_frontend(BIG, 5, APPLY);
    assert_eq!(fill(&agent, "LB4_SERVICES"), (2, 2));
    assert_eq!(fill(&agent, "LB_SLOTS"), (2 + 5, 8));
    agent.wait_until("the problem resolved in the log", APPLY, |_| {
        agent_log_has_resolved(&env)
    });
}

/// Whether the agent logged the big Service's problem as resolved.
fn agent_log_has_resolved(env: &TestEnv) -> Option<()> {
    let log = std::fs::read_to_string(env.manifests.work_dir().join("agent.log")).ok()?;
    log.lines()
        .any(|l| l.contains("resolved: ") && l.contains("Service default/big"))
        .then_some(())
}
