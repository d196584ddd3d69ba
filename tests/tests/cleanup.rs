//! `lb-agent cleanup` takes everything away.

use std::time::Duration;

use lb_tests::bpffs::agent_cleanup;
use lb_tests::manifests::service;
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";

#[test]
fn cleanup_leaves_nothing_behind() {
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
    assert!(
        !env.cgroup.attached_programs().is_empty(),
        "agent attached nothing to {}",
        env.cgroup.path().display()
    );
    assert!(!env.pins.files().is_empty(), "agent pinned nothing");

    // A normal exit leaves the programs attached and the Service working.
    let exit = agent.stop(Duration::from_secs(5));
    assert!(exit.is_some(), "agent did not exit within 5 s of SIGTERM");
    let after_exit = client.client(&env.cgroup, VIP, 5);
    assert_eq!(
        after_exit.ok, 5,
        "translation after the agent exited: {after_exit:?}"
    );

    let output =
        agent_cleanup(env.pins.path()).unwrap_or_else(|e| panic!("lb-agent cleanup failed: {e}"));
    eprintln!("lb-agent cleanup: {output}");

    assert_eq!(
        env.pins.files(),
        Vec::<std::path::PathBuf>::new(),
        "pins left"
    );
    assert_eq!(
        env.cgroup.attached_programs(),
        Vec::<serde_json::Value>::new(),
        "programs still attached to the cgroup (bpftool cgroup show)"
    );
    let after = client
        .client_with()
        .cgroup(&env.cgroup)
        .count(3)
        .timeout_ms(300)
        .run(VIP);
    assert_eq!(after.ok, 0, "still translated after cleanup: {after:?}");
    assert_eq!(
        after.errors_of("ECONNREFUSED"),
        0,
        "still rejected by a program after cleanup: {after:?}"
    );
}
