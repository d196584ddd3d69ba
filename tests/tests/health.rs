//! kube-proxy's node health server (`--healthz-bind-address`): `/healthz` and `/livez`
//! with kube-proxy's status codes, headers and JSON, on both address families, and
//! `/healthz` turning 503 when this node's Node is being deleted or is about to be removed
//! by the cluster autoscaler, from a manifests directory and from the API server.

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::{
    api::core::v1::{Node, NodeSpec, Taint},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use lb_tests::http::{HttpAnswer, get_in, wait_for_status};
use lb_tests::manifests::service;
use lb_tests::{Agent, TestEnv, agent::AgentConfig, require_privileges};

const APPLY: Duration = Duration::from_secs(15);
const VIP: &str = "10.96.0.10:80";
/// The health server's port; the agent listens on every address of the node namespace.
const PORT: u16 = 10256;
const HEALTHZ_ARGS: [&str; 4] = [
    "--healthz-bind-address",
    "0.0.0.0:10256",
    "--node-name",
    "node-a",
];

fn v4() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

fn v6() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, PORT))
}

/// This node's Node object, optionally tainted `ToBeDeletedByClusterAutoscaler` or being
/// deleted.
fn node(tainted: bool, deleting: bool) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some("node-a".into()),
            labels: Some([("topology.kubernetes.io/zone".into(), "zone-a".into())].into()),
            deletion_timestamp: deleting.then_some(Time(Timestamp::UNIX_EPOCH)),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: tainted.then(|| {
                vec![Taint {
                    key: "ToBeDeletedByClusterAutoscaler".into(),
                    value: Some("1700000000".into()),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]
            }),
            ..NodeSpec::default()
        }),
        ..Node::default()
    }
}

/// kube-proxy's headers and body: `lastUpdated` and `currentTime` in Go's time format,
/// `nodeEligible` on /healthz only.
#[track_caller]
fn assert_kube_proxy_answer(answer: &HttpAnswer, status: u16, eligible: Option<bool>) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{answer:?}"
    );
    assert_eq!(
        answer.header("x-content-type-options"),
        Some("nosniff"),
        "{answer:?}"
    );
    let body = answer.json();
    for field in ["lastUpdated", "currentTime"] {
        let time = body[field].as_str().unwrap_or_default();
        assert!(time.ends_with(" +0000 UTC"), "{field}: {body}");
    }
    assert_eq!(
        body.get("nodeEligible").map(|e| e.as_bool()),
        eligible.map(Some),
        "{body}"
    );
}

#[test]
fn healthz_and_livez_answer_200_with_kube_proxys_json_on_both_families() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    env.manifests.write(
        "svc.yaml",
        &service("web", "10.96.0.10").port(80, 8080).yaml(),
    );
    let mut agent = env.agent_with(&HEALTHZ_ARGS);
    agent.wait_for_frontend(VIP, 0, APPLY);
    let netns = env.topo.node().name();

    for target in [v4(), v6()] {
        let healthz = wait_for_status(netns, target, "/healthz", 200, APPLY);
        assert_kube_proxy_answer(&healthz, 200, Some(true));
        let body = healthz.json();
        assert_eq!(body["lastUpdated"], body["currentTime"], "healthy: now");
        assert_kube_proxy_answer(&get_in(netns, target, "/livez"), 200, None);
    }

    // This node's Node in the directory, tainted by the autoscaler: /healthz drains it,
    // /livez does not restart the agent.
    env.manifests.write(
        "node.yaml",
        &serde_json::to_string(&node(true, false)).unwrap(),
    );
    let healthz = wait_for_status(netns, v4(), "/healthz", 503, APPLY);
    assert_kube_proxy_answer(&healthz, 503, Some(false));
    assert_kube_proxy_answer(&get_in(netns, v6(), "/livez"), 200, None);

    // Untainted: back in service.
    env.manifests.write(
        "node.yaml",
        &serde_json::to_string(&node(false, false)).unwrap(),
    );
    let healthz = wait_for_status(netns, v4(), "/healthz", 200, APPLY);
    assert_kube_proxy_answer(&healthz, 200, Some(true));
}

#[test]
fn on_the_api_server_a_node_being_deleted_or_tainted_turns_healthz_503_but_not_livez() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let (api, agent) = env.agent_on_api_server();
    let mut agent = Agent::new(AgentConfig {
        extra_args: HEALTHZ_ARGS.map(str::to_owned).to_vec(),
        ..agent.config().clone()
    });
    api.apply(node(false, false));
    api.apply(service("web", "10.96.0.10").port(80, 8080).build());
    agent.start();
    agent.wait_for_frontend(VIP, 0, APPLY);
    let netns = env.topo.node().name();
    let healthz = wait_for_status(netns, v4(), "/healthz", 200, APPLY);
    assert_kube_proxy_answer(&healthz, 200, Some(true));

    // Tainted by the autoscaler: drained, not restarted; untainted: back.
    api.apply(node(true, false));
    let healthz = wait_for_status(netns, v4(), "/healthz", 503, APPLY);
    assert_kube_proxy_answer(&healthz, 503, Some(false));
    assert_kube_proxy_answer(&get_in(netns, v4(), "/livez"), 200, None);
    api.apply(node(false, false));
    let healthz = wait_for_status(netns, v4(), "/healthz", 200, APPLY);
    assert_kube_proxy_answer(&healthz, 200, Some(true));

    // Being deleted (a deletionTimestamp, as a graceful deletion sets it).
    api.apply(node(false, true));
    let healthz = wait_for_status(netns, v4(), "/healthz", 503, APPLY);
    assert_kube_proxy_answer(&healthz, 503, Some(false));
    assert_kube_proxy_answer(&get_in(netns, v4(), "/livez"), 200, None);
}
