//! The translation rules as a table of cases, kube-proxy style: manifests in, frontends out.
use super::*;
use crate::source::manifests::{Object, parse_manifest};

/// Parses YAML documents into the translation's input.
fn objects(yaml: &str) -> ClusterObjects {
    let parsed = parse_manifest("test.yaml", yaml);
    assert!(
        parsed.problems.is_empty(),
        "fixture does not parse: {:?}",
        parsed.problems
    );
    let origin: Arc<str> = Arc::from("test.yaml");
    let mut objects = ClusterObjects::default();
    for object in parsed.objects {
        let origin = origin.clone();
        match object {
            Object::Service(o) => objects.services.push(Sourced { origin, object: *o }),
            Object::EndpointSlice(o) => {
                objects.endpoint_slices.push(Sourced { origin, object: *o })
            }
            Object::Pod(o) => objects.pods.push(Sourced { origin, object: *o }),
        }
    }
    objects
}

/// The frontends as `frontend -> backend,backend` lines.
fn frontends(yaml: &str) -> Vec<String> {
    let translation = translate(&objects(yaml));
    assert!(
        translation.problems.is_empty(),
        "unexpected problems: {:?}",
        translation.problems
    );
    render(&translation)
}

fn render(translation: &Translation) -> Vec<String> {
    translation
        .frontends
        .values()
        .map(|f| {
            let backends: Vec<String> = f.backends.iter().map(ToString::to_string).collect();
            format!("{} -> {}", f.address, backends.join(","))
        })
        .collect()
}

fn problems(yaml: &str) -> Vec<String> {
    translate(&objects(yaml))
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn service(name: &str, ns: &str, ip: &str, ports: &str, selector: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {ip}\n  selector: {selector}\n  ports: {ports}\n"
    )
}

fn pod(name: &str, ns: &str, labels: &str, ip: &str, ready: bool, ports: &str) -> String {
    let status = if ready { "True" } else { "False" };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\nspec:\n  containers: [{{name: c, image: x, ports: {ports}}}]\nstatus:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"{status}\"}}]\n"
    )
}

fn slice(name: &str, ns: &str, service: &str, endpoints: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: {endpoints}\nports: {ports}\n"
    )
}

const WEB_PORTS: &str = "[{port: 80, targetPort: 8080}]";
const APP_WEB: &str = "{app: web}";
const HTTP_8080: &str = "[{name: http, containerPort: 8080}]";

#[test]
fn selector_matches_ready_pods_of_the_services_namespace_only() {
    let yaml = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        pod("a", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
        pod(
            "b",
            "default",
            "{app: web, tier: x}",
            "10.244.0.3",
            true,
            HTTP_8080,
        ),
        pod(
            "not-ready",
            "default",
            APP_WEB,
            "10.244.0.4",
            false,
            HTTP_8080,
        ),
        pod(
            "other-labels",
            "default",
            "{app: db}",
            "10.244.0.5",
            true,
            HTTP_8080,
        ),
        pod(
            "other-namespace",
            "other",
            APP_WEB,
            "10.244.0.6",
            true,
            HTTP_8080,
        ),
    ]
    .concat();
    assert_eq!(
        frontends(&yaml),
        ["10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP,10.244.0.3:8080/TCP"]
    );
}

#[test]
fn target_port_cases() {
    // (service ports, pod container ports, expected backends)
    let cases = [
        ("[{port: 80}]", HTTP_8080, "10.244.0.2:80/TCP"),
        (
            "[{port: 80, targetPort: 9000}]",
            HTTP_8080,
            "10.244.0.2:9000/TCP",
        ),
        (
            "[{port: 80, targetPort: http}]",
            HTTP_8080,
            "10.244.0.2:8080/TCP",
        ),
        ("[{port: 80, targetPort: metrics}]", HTTP_8080, ""),
        (
            "[{port: 53, protocol: UDP, targetPort: dns}]",
            "[{name: dns, containerPort: 5353, protocol: UDP}]",
            "10.244.0.2:5353/UDP",
        ),
        (
            "[{port: 53, protocol: UDP, targetPort: dns}]",
            "[{name: dns, containerPort: 5353}]",
            "",
        ),
    ];
    for (ports, container_ports, expected) in cases {
        let yaml = [
            service("web", "default", "10.96.0.10", ports, APP_WEB),
            pod("a", "default", APP_WEB, "10.244.0.2", true, container_ports),
        ]
        .concat();
        let got = frontends(&yaml);
        assert_eq!(got.len(), 1, "{ports}");
        assert_eq!(
            got[0].split(" -> ").nth(1).unwrap(),
            expected,
            "service ports {ports}, pod ports {container_ports}"
        );
    }
}

#[test]
fn named_target_port_may_differ_per_pod() {
    let yaml = [
        service(
            "web",
            "default",
            "10.96.0.10",
            "[{port: 80, targetPort: http}]",
            APP_WEB,
        ),
        pod("a", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
        pod(
            "b",
            "default",
            APP_WEB,
            "10.244.0.3",
            true,
            "[{name: http, containerPort: 9090}]",
        ),
    ]
    .concat();
    assert_eq!(
        frontends(&yaml),
        ["10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP,10.244.0.3:9090/TCP"]
    );
}

#[test]
fn endpoint_slices_take_precedence_over_pods() {
    let yaml = [
        service("web", "default", "10.96.0.10", "[{name: http, port: 80, targetPort: 8080}]", APP_WEB),
        pod("a", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
        slice(
            "web-x1",
            "default",
            "web",
            "[{addresses: [10.244.1.2], conditions: {ready: true}}, {addresses: [10.244.1.3], conditions: {ready: false}}, {addresses: [10.244.1.4]}]",
            "[{name: http, port: 8080, protocol: TCP}]",
        ),
        // Same name, other namespace: not this Service's slice.
        slice("web-y", "other", "web", "[{addresses: [10.244.9.9]}]", "[{name: http, port: 8080}]"),
    ]
    .concat();
    assert_eq!(
        frontends(&yaml),
        ["10.96.0.10:80/TCP -> 10.244.1.2:8080/TCP,10.244.1.4:8080/TCP"]
    );
}

#[test]
fn slices_are_merged_and_deduplicated_and_ports_match_by_name() {
    let yaml = [
        service(
            "web",
            "default",
            "10.96.0.10",
            "[{name: http, port: 80, targetPort: http}, {name: metrics, port: 9100}]",
            APP_WEB,
        ),
        slice(
            "web-1",
            "default",
            "web",
            "[{addresses: [10.244.1.2]}]",
            "[{name: http, port: 8080}, {name: metrics, port: 9100}]",
        ),
        slice(
            "web-2",
            "default",
            "web",
            "[{addresses: [10.244.1.2]}, {addresses: [10.244.1.3]}]",
            "[{name: http, port: 8081}]",
        ),
    ]
    .concat();
    assert_eq!(
        frontends(&yaml),
        [
            "10.96.0.10:80/TCP -> 10.244.1.2:8080/TCP,10.244.1.2:8081/TCP,10.244.1.3:8081/TCP",
            "10.96.0.10:9100/TCP -> 10.244.1.2:9100/TCP",
        ]
    );
}

#[test]
fn services_that_are_not_programmed() {
    let yaml = [
        service("headless", "default", "None", WEB_PORTS, APP_WEB),
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: example.com}\n".to_string(),
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: other-proxy, labels: {service.kubernetes.io/service-proxy-name: foo}}\nspec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}\n".to_string(),
        service("no-selector", "default", "10.96.0.13", WEB_PORTS, "{}"),
        pod("a", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
    ]
    .concat();
    let translation = translate(&objects(&yaml));
    assert!(translation.problems.is_empty());
    // The selector-less Service exists with no endpoints: connects are refused.
    assert_eq!(render(&translation), ["10.96.0.13:80/TCP -> "]);
    assert_eq!(translation.skipped.len(), 3, "{:?}", translation.skipped);
}

#[test]
fn multi_port_and_protocols() {
    let yaml = [
        service(
            "dns",
            "default",
            "10.96.0.53",
            "[{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}, {name: s, port: 99, protocol: SCTP}]",
            APP_WEB,
        ),
        pod("a", "default", APP_WEB, "10.244.0.2", true, "[]"),
    ]
    .concat();
    let translation = translate(&objects(&yaml));
    assert_eq!(
        render(&translation),
        [
            "10.96.0.53:53/TCP -> 10.244.0.2:53/TCP",
            "10.96.0.53:53/UDP -> 10.244.0.2:53/UDP"
        ]
    );
    assert_eq!(
        translation.skipped.len(),
        1,
        "SCTP port skipped: {:?}",
        translation.skipped
    );
}

#[test]
fn terminating_and_finished_pods_take_no_new_connections() {
    let yaml = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        pod("a", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
        pod("b", "default", APP_WEB, "10.244.0.3", true, HTTP_8080).replace(
            "namespace: default,",
            "namespace: default, deletionTimestamp: \"2026-01-01T00:00:00Z\",",
        ),
        pod("c", "default", APP_WEB, "10.244.0.4", true, HTTP_8080)
            .replace("status:\n", "status:\n  phase: Succeeded\n"),
    ]
    .concat();
    assert_eq!(
        frontends(&yaml),
        ["10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP"]
    );
}

#[test]
fn invalid_objects_are_reported_with_field_and_the_rest_still_works() {
    let yaml = [
        service("bad-port", "default", "10.96.0.20", "[{port: 70000}]", APP_WEB),
        service("bad-ip", "default", "10.96.0.300", WEB_PORTS, APP_WEB),
        service("bad-target", "default", "10.96.0.21", "[{port: 80, targetPort: Not_A_Name}]", APP_WEB),
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: no-ip}\nspec: {ports: [{port: 80}]}\n".to_string(),
        service("good", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        pod("a", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
        pod("bad-pod-ip", "default", APP_WEB, "10.244.0", true, HTTP_8080),
    ]
    .concat();
    let translation = translate(&objects(&yaml));
    assert_eq!(
        render(&translation),
        ["10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP"]
    );
    let problems: Vec<String> = translation
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    let expected = [
        "test.yaml: Pod default/bad-pod-ip: status.podIP: \"10.244.0\" is not an IP address",
        "test.yaml: Service default/bad-ip: spec.clusterIP: \"10.96.0.300\" is not an IP address",
        "test.yaml: Service default/bad-port: spec.ports[0].port: 70000 is out of range 1-65535",
        "test.yaml: Service default/bad-target: spec.ports[0].targetPort: \"Not_A_Name\" is neither a port number nor a port name",
        "test.yaml: Service default/no-ip: spec.clusterIP: missing: no ClusterIP is allocated without an API server; set one from the service CIDR",
    ];
    assert_eq!(problems, expected);
}

#[test]
fn two_services_on_one_frontend_first_wins() {
    let yaml = [
        service("a", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        service("b", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
    ]
    .concat();
    let problems = problems(&yaml);
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].contains("Service default/b")
            && problems[0].contains("already taken by Service default/a"),
        "{problems:?}"
    );
}

#[test]
fn port_names_follow_kubernetes_validation() {
    for ok in ["http", "h2c", "web-80", "a"] {
        assert!(is_port_name(ok), "{ok}");
    }
    for bad in [
        "",
        "8080",
        "-http",
        "http-",
        "ht--tp",
        "HTTP",
        "sixteen-chars-xx",
        "a_b",
    ] {
        assert!(!is_port_name(bad), "{bad}");
    }
}
