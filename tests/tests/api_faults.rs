//! A misbehaving API server: truncated streams, invalid JSON, objects of the wrong kind,
//! 500s, 429s with Retry-After and very slow answers. Through each, the agent keeps its
//! last good state (the Service keeps answering from the maps), reports the failure (log,
//! `lb_watch_restarts_total`, `/readyz` once it lasts longer than `--readyz-stale-after`),
//! backs off, and converges once the server behaves again.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fake_apiserver::{Fault, ResourceKind, Verb};
use lb_tests::http::{get_in, wait_for_status};
use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::{
    API_ADDR, Agent, ApiServer, BackendPod, TestEnv, agent::AgentConfig, require_privileges,
};

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

/// One agent on a fake API server, programmed with `web` (one backend, web1) and ready.
struct Setup {
    web1: BackendPod,
    web2: BackendPod,
    api: ApiServer,
    agent: Agent,
    env: TestEnv,
}

impl Setup {
    fn new() -> Self {
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
        let ready = wait_for_status(&node(&env), API_ADDR, "/readyz", 200, APPLY);
        assert_eq!(ready.status, 200, "{ready:?}");
        Self {
            web1,
            web2,
            api,
            agent,
            env,
        }
    }

    /// The Service still answers, from web1 only (the maps as they were).
    fn service_keeps_working(&self) {
        let client = self.env.topo.add_pod("client");
        let summary = client.client(&self.env.cgroup, VIP, 5);
        assert_eq!(summary.host_names(), ["web1"], "{summary:?}");
    }

    /// A change made during the fault (web2 added) reaches the maps once it is over.
    fn converges_after(&mut self, fault_over: impl FnOnce(&ApiServer)) {
        fault_over(&self.api);
        let back = wait_for_status(
            &node(&self.env),
            API_ADDR,
            "/readyz",
            200,
            Duration::from_secs(60),
        );
        assert_eq!(back.status, 200, "{back:?}");
        self.agent
            .wait_for_frontend(VIP, 2, Duration::from_secs(60));
    }

    fn log_says_watch_failed(&self, what: &str) {
        let log = self.agent.log();
        assert!(
            log.contains("watch failed"),
            "{what}: the agent reports the failed watch in its log"
        );
    }
}

fn node(env: &TestEnv) -> String {
    env.topo.node().name().to_owned()
}

/// `lb_watch_restarts_total{resource="Service"}`.
fn watch_restarts(env: &TestEnv) -> f64 {
    let answer = get_in(
        &node(env),
        SocketAddr::from(([127, 0, 0, 1], 10249)),
        "/metrics",
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let scrape = prometheus_parse::Scrape::parse(answer.body.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "lb_watch_restarts_total" && s.labels.get("resource") == Some("Service")
        })
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
        .unwrap_or(0.0)
}

/// A failing API server: kept state, reported (log, metrics, /readyz after the threshold),
/// converged after. Returns how many Service watches it made during the fault.
fn survives_a_failing_api_server(fault: Fault) -> usize {
    let mut s = Setup::new();
    let restarts_before = watch_restarts(&s.env);
    let watches = |api: &ApiServer| {
        api.api()
            .requests_for(ResourceKind::Service, Verb::Watch)
            .len()
    };
    let watches_before = watches(&s.api);
    s.api.api().set_fault(Some(fault));
    let began = Instant::now();
    s.api
        .apply(web_slice(&[s.web1.pod.ip().into(), s.web2.pod.ip().into()]));
    let stale = wait_for_status(
        &node(&s.env),
        API_ADDR,
        "/readyz",
        503,
        Duration::from_secs(20),
    );
    assert_eq!(stale.status, 503, "{fault:?}: {stale:?}");
    assert!(
        began.elapsed() >= Duration::from_secs(STALE_AFTER_SECS - 1),
        "{fault:?}"
    );
    s.service_keeps_working();
    s.log_says_watch_failed(&format!("{fault:?}"));
    assert!(
        watch_restarts(&s.env) > restarts_before,
        "{fault:?}: lb_watch_restarts_total counts the failures"
    );
    let healthz = get_in(&node(&s.env), API_ADDR, "/healthz");
    assert_eq!(
        healthz.status, 200,
        "{fault:?}: the process is fine: {healthz:?}"
    );
    let made = watches(&s.api) - watches_before;
    s.converges_after(|api| api.api().set_fault(None));
    made
}

/// Watch answers that end half-way through an event: kube-client takes the cut body for
/// the end of the watch and kube-runtime watches again at once; the agent's API guard
/// slows those watches down (from 0.5 s, doubling) and reports them.
#[test]
fn truncated_streams_keep_the_last_good_state() {
    if !require_privileges() {
        return;
    }
    let watches = survives_a_failing_api_server(Fault::TruncatedStream);
    // Unguarded, kube-runtime made about 3,800 Service watches in 5 s here.
    assert!(
        watches <= 12,
        "{watches} Service watches while the streams were truncated"
    );
}

#[test]
fn invalid_json_keeps_the_last_good_state() {
    if !require_privileges() {
        return;
    }
    let _watches = survives_a_failing_api_server(Fault::InvalidJson);
}

#[test]
fn objects_of_the_wrong_kind_keep_the_last_good_state() {
    if !require_privileges() {
        return;
    }
    let _watches = survives_a_failing_api_server(Fault::WrongKind);
}

#[test]
fn internal_errors_keep_the_last_good_state() {
    if !require_privileges() {
        return;
    }
    let _watches = survives_a_failing_api_server(Fault::InternalError);
}

/// 429 with `Retry-After: 2`: reported at once (kube-client's own silent retries are off),
/// and the next requests for the resource wait as told.
#[test]
fn too_many_requests_are_retried_after_the_time_the_server_asks() {
    if !require_privileges() {
        return;
    }
    let requests = |api: &ApiServer| {
        api.api()
            .requests_for(ResourceKind::Service, Verb::Watch)
            .len()
            + api
                .api()
                .requests_for(ResourceKind::Service, Verb::List)
                .len()
    };
    let mut s = Setup::new();
    s.api.api().set_fault(Some(Fault::TooManyRequests {
        retry_after_secs: 2,
    }));
    let began = Instant::now();
    let before = requests(&s.api);
    s.api
        .apply(web_slice(&[s.web1.pod.ip().into(), s.web2.pod.ip().into()]));
    let stale = wait_for_status(
        &node(&s.env),
        API_ADDR,
        "/readyz",
        503,
        Duration::from_secs(20),
    );
    assert_eq!(stale.status, 503, "{stale:?}");
    std::thread::sleep(Duration::from_secs(6).saturating_sub(began.elapsed()));
    let tries = requests(&s.api) - before;
    // At most one try per 2 s (plus the first): kube-runtime's own backoff alone starts at
    // 0.8 s, and kube-client's retry layer would start at 5 ms.
    assert!(
        (1..=4).contains(&tries),
        "{tries} Service requests in {:?} under Retry-After: 2",
        began.elapsed()
    );
    s.service_keeps_working();
    s.log_says_watch_failed("429");
    s.converges_after(|api| api.api().set_fault(None));
}

/// Answers 3 s late: the agent waits for them (no stale state, no failure) and applies a
/// change made meanwhile.
#[test]
fn very_slow_answers_are_waited_for() {
    if !require_privileges() {
        return;
    }
    let mut s = Setup::new();
    s.api
        .api()
        .set_fault(Some(Fault::Slow(Duration::from_secs(3))));
    s.api
        .apply(web_slice(&[s.web1.pod.ip().into(), s.web2.pod.ip().into()]));
    s.service_keeps_working();
    s.agent.wait_for_frontend(VIP, 2, Duration::from_secs(30));
    s.converges_after(|api| api.api().set_fault(None));
}
