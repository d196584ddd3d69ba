//! `/metrics` after known changes: a scrape over HTTP, parsed by a Prometheus text parser,
//! shows kube-proxy's metrics and lb's with the values those changes make.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use lb_agent::{
    metrics::Metrics,
    reconcile::{Reconciler, SyncKind},
    source::change::{Change, Object},
    summary::MapFill,
};
use prometheus_parse::{Scrape, Value};

fn apply(reconciler: &mut Reconciler<lb_agent::maps::fake::FakeMaps>, json: serde_json::Value) {
    let object = match json["kind"].as_str() {
        Some("Service") => Object::Service(Box::new(serde_json::from_value(json).unwrap())),
        Some("EndpointSlice") => {
            Object::EndpointSlice(Box::new(serde_json::from_value(json).unwrap()))
        }
        other => panic!("unexpected kind {other:?}"),
    };
    reconciler.apply(Change::Apply {
        origin: Arc::from("api"),
        object,
    });
}

fn service(name: &str, cluster_ip: &str, external_ips: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": cluster_ip,
            "externalIPs": external_ips,
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80}],
        },
    })
}

fn slice(name: &str, service: &str, address: &str, triggered: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": triggered},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

/// `GET /metrics` from a server on the loopback, parsed.
fn scrape(metrics: &Arc<Metrics>) -> (String, Scrape) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let router = lb_agent::metrics::router(Arc::clone(metrics));
    let server = runtime.spawn(async move { axum::serve(listener, router).await });
    let response = runtime.block_on(async {
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        })
        .await
        .unwrap()
    });
    server.abort();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    (body.to_owned(), Scrape::parse(lines).unwrap())
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v))
        })
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
}

/// The histogram `name`'s buckets (upper bound → cumulative count).
fn buckets(scrape: &Scrape, name: &str) -> BTreeMap<String, f64> {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .unwrap_or_else(|| panic!("no {name}"));
    let Value::Histogram(buckets) = &sample.value else {
        panic!("{name} is not a histogram: {:?}", sample.value);
    };
    buckets
        .iter()
        .map(|b| (b.less_than.to_string(), b.count))
        .collect()
}

#[test]
fn a_scrape_shows_kube_proxys_metrics_and_lbs_after_known_changes() {
    let metrics = &Arc::new(Metrics::new());
    metrics.set_fill_reader(Arc::new(|| {
        vec![
            MapFill {
                name: "LB4_SERVICES",
                entries: 3,
                capacity: 1024,
                memory_bytes: 0,
            },
            MapFill {
                name: "LB_CT_TCP",
                entries: 4,
                capacity: 2048,
                memory_bytes: 0,
            },
        ]
    }));
    let mut reconciler = Reconciler::on_fake_maps(None);
    reconciler.set_metrics(Arc::clone(metrics));
    let triggered = SystemTime::now();
    let triggered_text = k8s_openapi::jiff::Timestamp::try_from(triggered)
        .unwrap()
        .to_string();
    // Two Services (the second wants the first's ClusterIP as an external IP: refused),
    // a slice for the first, and an invalid slice.
    apply(&mut reconciler, service("web", "10.96.0.10", &[]));
    apply(
        &mut reconciler,
        service("thief", "10.96.0.11", &["10.96.0.10"]),
    );
    apply(
        &mut reconciler,
        slice("web-1", "web", "10.244.0.2", &triggered_text),
    );
    apply(
        &mut reconciler,
        slice("web-bad", "web", "not-an-address", &triggered_text),
    );

    let (_, before) = scrape(metrics);
    let pending = |s: &Scrape, what: &str| {
        value(
            s,
            &format!("kubeproxy_sync_proxy_rules_{what}_changes_pending"),
            &[],
        )
    };
    assert_eq!(pending(&before, "service"), Some(2.0));
    assert_eq!(pending(&before, "endpoint"), Some(2.0));
    assert_eq!(
        value(
            &before,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            &[]
        ),
        Some(0.0),
        "no sync yet"
    );

    std::thread::sleep(Duration::from_millis(20));
    reconciler.sync(SyncKind::Full, Instant::now()).unwrap();
    let (text, after) = scrape(metrics);
    assert_eq!(pending(&after, "service"), Some(0.0), "{text}");
    assert_eq!(pending(&after, "endpoint"), Some(0.0));
    let total = |what: &str| {
        value(
            &after,
            &format!("kubeproxy_sync_proxy_rules_{what}_changes_total"),
            &[],
        )
    };
    assert_eq!(total("service"), Some(2.0));
    assert_eq!(total("endpoint"), Some(2.0));
    let last = value(
        &after,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        &[],
    )
    .unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - last).abs() < 10.0, "last sync {last}, now {now}");

    // One sync, in the first buckets (from 100 µs).
    let sync = buckets(&after, "kubeproxy_sync_proxy_rules_duration_seconds");
    assert_eq!(
        sync.keys().next().map(String::as_str),
        Some("0.0001"),
        "{sync:?}"
    );
    assert_eq!(sync.get("inf").copied(), Some(1.0), "{sync:?}");
    // Both slices were triggered at least 20 ms before the sync wrote them.
    let programming = buckets(&after, "kubeproxy_network_programming_duration_seconds");
    assert_eq!(
        programming.get("inf").copied(),
        Some(2.0),
        "{programming:?}"
    );
    assert_eq!(
        programming.get("0.0128").copied(),
        Some(0.0),
        "{programming:?}"
    );

    let rejected = |kind: &str, reason: &str| {
        value(
            &after,
            "lb_rejected_objects",
            &[("kind", kind), ("reason", reason)],
        )
    };
    assert_eq!(rejected("EndpointSlice", "invalid"), Some(1.0), "{text}");
    assert_eq!(rejected("Service", "address_conflict"), Some(1.0), "{text}");
    let map = |name: &str, map: &str| value(&after, name, &[("map", map)]);
    assert_eq!(map("lb_map_entries", "LB4_SERVICES"), Some(3.0));
    assert_eq!(map("lb_map_capacity", "LB4_SERVICES"), Some(1024.0));
    assert_eq!(value(&after, "lb_conntrack_entries", &[]), Some(4.0));
    assert_eq!(value(&after, "lb_map_write_failures_total", &[]), Some(0.0));
}
