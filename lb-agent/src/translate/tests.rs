//! The translation rules as a table of cases, kube-proxy style: manifests in, frontends out.
use std::net::IpAddr;

use super::*;
use crate::source::{change::Object, manifests::parse_manifest};
use crate::state::{
    ClusterObjects, ClusterState, Translation, translate, translate_for_node, translate_on,
};

/// Applies every object to `state`, as a source's changes would.
fn load(state: &mut ClusterState, objects: ClusterObjects) {
    objects
        .services
        .into_iter()
        .for_each(|o| state.apply_service(o));
    objects
        .endpoint_slices
        .into_iter()
        .for_each(|o| state.apply_slice(o));
    objects.pods.into_iter().for_each(|o| state.apply_pod(o));
}

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
            // The node's zone is the state's input, not the translation's.
            Object::Node(_) => {}
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
            let backends: Vec<String> = f.backends.iter().map(|b| b.to_string()).collect();
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
        pod("d", "default", APP_WEB, "10.244.0.5", true, HTTP_8080)
            .replace("status:\n", "status:\n  phase: Failed\n"),
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

#[test]
fn terminating_pods_serve_only_when_no_pod_is_ready() {
    let terminating = |name: &str, ip: &str| {
        pod(name, "default", APP_WEB, ip, true, HTTP_8080).replace(
            "namespace: default,",
            "namespace: default, deletionTimestamp: \"2026-01-01T00:00:00Z\",",
        )
    };
    let only_terminating = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        terminating("a", "10.244.0.2"),
    ]
    .concat();
    assert_eq!(
        frontends(&only_terminating),
        ["10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP (terminating)"]
    );
    let with_ready = [
        only_terminating.clone(),
        pod("b", "default", APP_WEB, "10.244.0.3", true, HTTP_8080),
    ]
    .concat();
    assert_eq!(
        frontends(&with_ready),
        ["10.96.0.10:80/TCP -> 10.244.0.3:8080/TCP"]
    );
    // publishNotReadyAddresses: every matching pod is published as ready.
    let publish = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB)
            .replace("spec:\n", "spec:\n  publishNotReadyAddresses: true\n"),
        pod("c", "default", APP_WEB, "10.244.0.4", false, HTTP_8080),
    ]
    .concat();
    assert_eq!(
        frontends(&publish),
        ["10.96.0.10:80/TCP -> 10.244.0.4:8080/TCP"]
    );
}

#[test]
fn dual_stack_services_get_a_frontend_per_family_with_backends_of_that_family() {
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n".to_string(),
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: web}}\nspec: {containers: [{name: c, image: x}]}\nstatus:\n  podIP: 10.244.0.2\n  podIPs: [{ip: 10.244.0.2}, {ip: \"fd00:244::2\"}]\n  conditions: [{type: Ready, status: \"True\"}]\n".to_string(),
    ]
    .concat();
    assert_eq!(
        frontends(&yaml),
        [
            "10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP",
            "[fd00:96::10]:80/TCP -> [fd00:244::2]:8080/TCP"
        ]
    );
}

#[test]
fn ipv6_endpoint_slices() {
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: \"fd00:96::10\", ipFamilies: [IPv6], ports: [{name: http, port: 80}]}\n".to_string(),
        slice("web-v6", "default", "web", "[{addresses: [\"fd00:244::5\"]}]", "[{name: http, port: 8080}]")
            .replace("addressType: IPv4", "addressType: IPv6"),
        slice("web-v4", "default", "web", "[{addresses: [10.244.0.5]}]", "[{name: http, port: 8080}]"),
    ]
    .concat();
    assert_eq!(
        frontends(&yaml),
        ["[fd00:96::10]:80/TCP -> [fd00:244::5]:8080/TCP"]
    );
}

#[test]
fn external_and_load_balancer_addresses_are_frontends_too() {
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalIPs: [192.168.50.10]\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 192.168.60.1}, {ip: 192.168.60.2, ipMode: Proxy}, {hostname: lb.example.com}]\n".to_string(),
        pod("a", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
    ]
    .concat();
    let translation = translate(&objects(&yaml));
    assert!(
        translation.problems.is_empty(),
        "{:?}",
        translation.problems
    );
    let kinds: Vec<String> = translation
        .frontends
        .values()
        .map(|f| format!("{} {:?}", f.address, f.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            "10.96.0.10:80/TCP ClusterIp",
            "192.168.50.10:80/TCP ExternalIp",
            "192.168.60.1:80/TCP LoadBalancer"
        ]
    );
}

#[test]
fn cluster_ips_are_validated() {
    let svc = |spec: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {{{spec}, ports: [{{port: 80}}]}}\n"
        )
    };
    let cases = [
        (
            "clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2]",
            "spec.clusterIPs[0]: 10.96.0.2 differs from spec.clusterIP 10.96.0.1",
        ),
        (
            "clusterIPs: [10.96.0.1, 10.96.0.2]",
            "spec.clusterIPs: at most one IPv4 and one IPv6 address",
        ),
        (
            "clusterIPs: [10.96.0.1, \"fd00::1\"], ipFamilyPolicy: SingleStack",
            "spec.ipFamilyPolicy: SingleStack with two clusterIPs",
        ),
        (
            "clusterIP: 10.96.0.1, ipFamilies: [IPv6]",
            "spec.ipFamilies[0]: \"IPv6\" does not match spec.clusterIPs[0]",
        ),
        (
            "clusterIP: 10.96.0.1, externalIPs: [not-an-ip]",
            "spec.externalIPs[0]: \"not-an-ip\" is not an IP address",
        ),
    ];
    for (spec, expected) in cases {
        let problems = problems(&svc(spec));
        assert_eq!(
            problems,
            [format!("test.yaml: Service default/s: {expected}")],
            "{spec}"
        );
    }
}

#[test]
fn external_addresses_of_a_family_the_service_lacks_are_ignored() {
    let yaml = [
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalIPs: [192.168.77.10, \"fd00:77::10\"]\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: \"fd00:77::20\"}]\n".to_string(),
        pod("a", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
    ]
    .concat();
    let translation = translate(&objects(&yaml));
    assert!(
        translation.problems.is_empty(),
        "{:?}",
        translation.problems
    );
    assert_eq!(
        render(&translation),
        [
            "10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP",
            "192.168.77.10:80/TCP -> 10.244.0.2:8080/TCP"
        ]
    );
    assert_eq!(translation.skipped.len(), 2, "{:?}", translation.skipped);
}

fn node_port_service(name: &str, extra_spec: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  selector: {{app: web}}\n{extra_spec}  ports: {ports}\n"
    )
}

fn pod_on(name: &str, ip: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: x}}]\nstatus:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
    )
}

/// `address kind flags -> backends` lines for node `node`.
fn frontends_on(yaml: &str, node: Option<&str>) -> Vec<String> {
    let translation = translate_for_node(&objects(yaml), node);
    assert!(
        translation.problems.is_empty(),
        "{:?}",
        translation.problems
    );
    translation
        .frontends
        .values()
        .map(|f| {
            let backends: Vec<String> = f.backends.iter().map(|b| b.to_string()).collect();
            format!(
                "{} {:?} {:#x} -> {}",
                f.address,
                f.kind,
                crate::maps::codec::frontend_flags(f),
                backends.join(",")
            )
        })
        .collect()
}

#[test]
fn node_ports_are_frontends_on_every_node_address() {
    let yaml = [
        node_port_service(
            "web",
            "",
            "[{name: http, port: 80, targetPort: 8080, nodePort: 30080}, {name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}]",
        ),
        pod_on("a", "10.244.0.2", "node-a"),
    ]
    .concat();
    assert_eq!(
        frontends_on(&yaml, Some("node-a")),
        [
            "0.0.0.0:30053/UDP NodePort 0x8 -> 10.244.0.2:5353/UDP",
            "0.0.0.0:30080/TCP NodePort 0x8 -> 10.244.0.2:8080/TCP",
            "10.96.0.10:53/UDP ClusterIp 0x1 -> 10.244.0.2:5353/UDP",
            "10.96.0.10:80/TCP ClusterIp 0x1 -> 10.244.0.2:8080/TCP",
        ]
    );
    // A ClusterIP Service opens no node port, whatever its ports say.
    let cluster_ip = yaml.replace("type: NodePort", "type: ClusterIP");
    assert_eq!(frontends_on(&cluster_ip, Some("node-a")).len(), 2);
}

#[test]
fn node_port_values_are_validated() {
    let cases = [
        (
            "nodePort: 0",
            "spec.ports[0].nodePort: 0 is out of range 1-65535",
        ),
        (
            "nodePort: 70000",
            "spec.ports[0].nodePort: 70000 is out of range 1-65535",
        ),
    ];
    for (field, want) in cases {
        let yaml = node_port_service("web", "", &format!("[{{port: 80, {field}}}]"));
        let problems = problems(&yaml);
        assert!(
            problems.len() == 1 && problems[0].contains(want),
            "{field}: {problems:?}"
        );
    }
    let yaml = node_port_service(
        "web",
        "  externalTrafficPolicy: Nearest\n",
        "[{port: 80, nodePort: 30080}]",
    );
    let problems = problems(&yaml);
    assert!(
        problems.len() == 1
            && problems[0]
                .contains("spec.externalTrafficPolicy: \"Nearest\" is not Cluster or Local"),
        "{problems:?}"
    );
}

#[test]
fn two_services_on_one_node_port_first_by_name_wins() {
    let yaml = [
        node_port_service("b", "", "[{port: 80, nodePort: 30080}]")
            .replace("10.96.0.10", "10.96.0.11"),
        node_port_service("a", "", "[{port: 81, nodePort: 30080}]"),
        // Same number, other protocol: no clash.
        node_port_service("c", "", "[{port: 82, nodePort: 30080, protocol: UDP}]")
            .replace("10.96.0.10", "10.96.0.12"),
    ]
    .concat();
    let translation = translate(&objects(&yaml));
    let problems: Vec<String> = translation
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        problems,
        [
            "test.yaml: Service default/b: spec.ports[0].nodePort: nodePort 30080/TCP is already taken by Service default/a"
        ]
    );
    let owner = &translation.frontends
        [&L4Addr::new("0.0.0.0".parse::<IpAddr>().unwrap(), 30080, Protocol::Tcp)];
    assert_eq!(owner.service.name(), "a");
    assert_eq!(owner.address.port, 30080);
}

#[test]
fn external_traffic_policy_local_keeps_only_this_nodes_endpoints_outside() {
    let yaml = [
        node_port_service(
            "web",
            "  externalTrafficPolicy: Local\n  externalIPs: [192.168.60.10]\n",
            "[{port: 80, targetPort: 8080, nodePort: 30080}]",
        ),
        pod_on("a", "10.244.0.2", "node-a"),
        pod_on("b", "10.244.1.2", "node-b"),
    ]
    .concat();
    assert_eq!(
        frontends_on(&yaml, Some("node-a")),
        [
            "0.0.0.0:30080/TCP NodePort 0x38 -> 10.244.0.2:8080/TCP",
            // Clients inside the cluster get every endpoint, as kube-proxy short-circuits
            // their traffic to the cluster-wide chain; the ClusterIP is not restricted.
            "0.0.0.0:30080/TCP (in-cluster) NodePort 0x8 -> 10.244.0.2:8080/TCP,10.244.1.2:8080/TCP (remote)",
            "10.96.0.10:80/TCP ClusterIp 0x1 -> 10.244.0.2:8080/TCP,10.244.1.2:8080/TCP (remote)",
            "192.168.60.10:80/TCP ExternalIp 0x32 -> 10.244.0.2:8080/TCP",
            "192.168.60.10:80/TCP (in-cluster) ExternalIp 0x2 -> 10.244.0.2:8080/TCP,10.244.1.2:8080/TCP (remote)",
        ]
    );
    // On node-b the other endpoint is the local one.
    assert_eq!(
        frontends_on(&yaml, Some("node-b"))[0],
        "0.0.0.0:30080/TCP NodePort 0x38 -> 10.244.1.2:8080/TCP"
    );
    // Under Cluster every endpoint serves, the remote one flagged for SNAT.
    let cluster = yaml.replace(
        "externalTrafficPolicy: Local",
        "externalTrafficPolicy: Cluster",
    );
    assert_eq!(
        frontends_on(&cluster, Some("node-a"))[0],
        "0.0.0.0:30080/TCP NodePort 0x8 -> 10.244.0.2:8080/TCP,10.244.1.2:8080/TCP (remote)"
    );
    // Without a node name nothing is known to be remote, and nothing is local.
    assert_eq!(
        frontends_on(&cluster, None)[0],
        "0.0.0.0:30080/TCP NodePort 0x8 -> 10.244.0.2:8080/TCP,10.244.1.2:8080/TCP"
    );
}

#[test]
fn endpoint_locality_comes_from_the_slice_node_name() {
    let yaml = [
        node_port_service(
            "web",
            "  externalTrafficPolicy: Local\n",
            "[{port: 80, targetPort: 8080, nodePort: 30080}]",
        ),
        slice(
            "web-1",
            "default",
            "web",
            "[{addresses: [10.244.0.2], nodeName: node-a}, {addresses: [10.244.1.2], nodeName: node-b}]",
            "[{port: 8080}]",
        ),
    ]
    .concat();
    assert_eq!(
        frontends_on(&yaml, Some("node-b"))[0],
        "0.0.0.0:30080/TCP NodePort 0x38 -> 10.244.1.2:8080/TCP"
    );
}

#[test]
fn health_check_node_port_counts_local_endpoints() {
    let lb = |policy: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: {policy}\n  healthCheckNodePort: 32100\n  selector: {{app: web}}\n  ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}, {{name: b, port: 81, targetPort: 8080, nodePort: 30081}}]\n"
        )
    };
    let pods = [
        pod_on("a", "10.244.0.2", "node-a"),
        pod_on("b", "10.244.0.3", "node-a"),
        pod_on("c", "10.244.1.2", "node-b"),
    ]
    .concat();
    let mut state = ClusterState::new(Some("node-a".into()));
    let objects = objects(&[lb("Local"), pods.clone()].concat());
    load(&mut state, objects);
    state.recompute();
    let checks = state.health_checks();
    let check = &checks[&32100];
    assert_eq!(
        (check.service.to_string(), check.local_endpoints),
        ("default/web".to_string(), 2),
        "two local pods, counted once across the Service's ports"
    );
    // Only LoadBalancer Services with externalTrafficPolicy: Local have one.
    let mut state = ClusterState::new(Some("node-a".into()));
    let objects = super::tests::objects(&[lb("Cluster"), pods].concat());
    load(&mut state, objects);
    state.recompute();
    assert!(state.health_checks().is_empty());
}

#[test]
fn internal_traffic_policy_local_serves_cluster_ips_from_this_node_only() {
    let yaml = [
        node_port_service(
            "web",
            "  internalTrafficPolicy: Local\n",
            "[{port: 80, targetPort: 8080, nodePort: 30080}]",
        ),
        pod_on("a", "10.244.0.2", "node-a"),
        pod_on("b", "10.244.1.2", "node-b"),
    ]
    .concat();
    assert_eq!(
        frontends_on(&yaml, Some("node-a")),
        [
            // External traffic is not restricted by the internal policy.
            "0.0.0.0:30080/TCP NodePort 0x8 -> 10.244.0.2:8080/TCP,10.244.1.2:8080/TCP (remote)",
            "10.96.0.10:80/TCP ClusterIp 0x1 -> 10.244.0.2:8080/TCP",
        ]
    );
    // On a node without a local endpoint the ClusterIP has none, flagged "drop" (0x80):
    // the Service has endpoints elsewhere.
    assert_eq!(
        frontends_on(&yaml, Some("node-c"))[1],
        "10.96.0.10:80/TCP ClusterIp 0x81 -> "
    );
}

#[test]
fn no_endpoints_anywhere_is_refused_not_dropped_under_local_policies() {
    // Only a not-ready pod: the Service has no usable endpoint anywhere, so both the Local
    // external entry and the ClusterIP are refused (no 0x80), as kube-proxy REJECTs.
    let not_ready = pod_on("a", "10.244.1.2", "node-b").replace("\"True\"", "\"False\"");
    let yaml = [
        node_port_service(
            "web",
            "  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n",
            "[{port: 80, targetPort: 8080, nodePort: 30080}]",
        ),
        not_ready,
    ]
    .concat();
    assert_eq!(
        frontends_on(&yaml, Some("node-a")),
        [
            "0.0.0.0:30080/TCP NodePort 0x38 -> ",
            "0.0.0.0:30080/TCP (in-cluster) NodePort 0x8 -> ",
            "10.96.0.10:80/TCP ClusterIp 0x1 -> ",
        ]
    );
    // The same pod ready on another node: dropped here.
    let ready = yaml.replace("\"False\"", "\"True\"");
    assert_eq!(
        frontends_on(&ready, Some("node-a")),
        [
            "0.0.0.0:30080/TCP NodePort 0xb8 -> ",
            "0.0.0.0:30080/TCP (in-cluster) NodePort 0x8 -> 10.244.1.2:8080/TCP (remote)",
            "10.96.0.10:80/TCP ClusterIp 0x81 -> ",
        ]
    );
}

#[test]
fn session_affinity_sets_the_flag_and_timeout_on_every_frontend() {
    let yaml = [
        node_port_service(
            "web",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
            "[{port: 80, targetPort: 8080, nodePort: 30080}]",
        ),
        pod_on("a", "10.244.0.2", "node-a"),
    ]
    .concat();
    let translation = translate_for_node(&objects(&yaml), Some("node-a"));
    assert_eq!(translation.frontends.len(), 2);
    for f in translation.frontends.values() {
        assert_eq!(f.affinity_timeout.map(u32::from), Some(60), "{}", f.address);
        assert_ne!(
            crate::maps::codec::frontend_flags(f) & lb_common::SVC_F_AFFINITY,
            0
        );
    }
    let default = yaml.replace(
        "  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        "",
    );
    let translation = translate_for_node(&objects(&default), Some("node-a"));
    assert!(
        translation
            .frontends
            .values()
            .all(|f| f.affinity_timeout.map(u32::from) == Some(10_800)),
        "kube-proxy's default: 3 hours"
    );
}

#[test]
fn invalid_affinity_and_policies_are_reported_with_their_field() {
    let service = |extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: 10.96.0.10\n{extra}  ports: [{{port: 80}}]\n"
        )
    };
    let cases = [
        (
            "  sessionAffinity: Cookie\n",
            "spec.sessionAffinity: \"Cookie\" is not None or ClientIP",
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is out of range 1-86400",
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is out of range 1-86400",
        ),
        (
            "  internalTrafficPolicy: Nearby\n",
            "spec.internalTrafficPolicy: \"Nearby\" is not Cluster or Local",
        ),
        (
            "  trafficDistribution: Anywhere\n",
            "spec.trafficDistribution: \"Anywhere\" is not PreferClose, PreferSameZone or PreferSameNode",
        ),
    ];
    for (extra, expected) in cases {
        let got = problems(&service(extra));
        assert_eq!(
            got,
            [format!("test.yaml: Service default/web: {expected}")],
            "{extra}"
        );
    }
}

#[test]
fn traffic_distribution_hints_pods_as_the_endpoint_slice_controller_would() {
    // PreferSameNode: pods are hinted for their own node, so this node's pod alone serves
    // in-cluster traffic while it is ready.
    let yaml = [
        node_port_service(
            "web",
            "  trafficDistribution: PreferSameNode\n",
            "[{port: 80, targetPort: 8080, nodePort: 30080}]",
        ),
        pod_on("a", "10.244.0.2", "node-a"),
        pod_on("b", "10.244.1.2", "node-b"),
    ]
    .concat();
    assert_eq!(
        frontends_on(&yaml, Some("node-a"))[1],
        "10.96.0.10:80/TCP ClusterIp 0x1 -> 10.244.0.2:8080/TCP"
    );
    // A node with no pod of its own falls back to every endpoint.
    assert_eq!(
        frontends_on(&yaml, Some("node-c"))[1],
        "10.96.0.10:80/TCP ClusterIp 0x1 -> 10.244.0.2:8080/TCP (remote),10.244.1.2:8080/TCP (remote)"
    );
    // PreferClose needs every endpoint's zone; only this node's is known from its Node, so
    // the hints are incomplete and every endpoint serves (kube-proxy's fallback).
    let close = yaml.replace("PreferSameNode", "PreferClose");
    let translation = translate_on(&objects(&close), Some("node-a"), Some("zone-a"));
    assert_eq!(translation.frontends.len(), 2);
    assert!(
        translation
            .frontends
            .values()
            .all(|f| f.backends.len() == 2)
    );
}

#[test]
fn health_check_node_port_counts_only_ready_local_endpoints() {
    let yaml = [
        node_port_service(
            "web",
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            "[{port: 80, targetPort: 8080, nodePort: 30080}]",
        )
        .replace("type: NodePort", "type: LoadBalancer"),
        pod_on("a", "10.244.0.2", "node-a").replace(
            "metadata: {name: a,",
            "metadata: {deletionTimestamp: \"2026-01-01T00:00:00Z\", name: a,",
        ),
        pod_on("b", "10.244.1.2", "node-b"),
    ]
    .concat();
    let mut state = ClusterState::new(Some("node-a".to_string()));
    let objects = objects(&yaml);
    load(&mut state, objects);
    state.recompute();
    let checks = state.health_checks();
    // node-a holds only a terminating (still serving) endpoint: the load balancer must
    // stop sending new traffic here, so the check counts 0 and answers 503.
    assert_eq!(checks[&32000].local_endpoints, 0, "{checks:?}");
}

#[test]
fn load_balancer_source_ranges_guard_only_the_load_balancer_ips() {
    let lb = |ranges: &str, annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web{annotations}}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n{ranges}  ports: [{{port: 80, nodePort: 30080}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 192.168.60.20}}]}}}}\n"
        )
    };
    let ranges_of = |yaml: &str| -> Vec<String> {
        translate(&objects(yaml))
            .frontends
            .values()
            .map(|f| {
                let ranges: Vec<String> = f.source_ranges.iter().map(ToString::to_string).collect();
                format!("{:?} {}", f.kind, ranges.join(","))
            })
            .collect()
    };
    assert_eq!(
        ranges_of(&lb(
            "  loadBalancerSourceRanges: [\" 10.1.2.3/8\", 192.168.50.0/24]\n",
            ""
        )),
        [
            "NodePort ",
            "ClusterIp ",
            "LoadBalancer 10.0.0.0/8,192.168.50.0/24"
        ]
    );
    // The annotation counts only when the field is empty.
    let annotation = ", annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: \"172.16.0.0/12, 10.0.0.0/8\"}";
    assert_eq!(
        ranges_of(&lb("", annotation)),
        [
            "NodePort ",
            "ClusterIp ",
            "LoadBalancer 10.0.0.0/8,172.16.0.0/12"
        ]
    );
    assert_eq!(
        problems(&lb("  loadBalancerSourceRanges: [10.0.0.0/33]\n", "")),
        [
            "test.yaml: Service default/web: spec.loadBalancerSourceRanges[0]: \"10.0.0.0/33\" is not a CIDR"
        ]
    );
}

/// A Service with `extra` spec lines (external IPs, a type) and `status`.
fn service_with(name: &str, ip: &str, extra: &str, ports: &str, status: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  selector: {{app: web}}\n{extra}  ports: {ports}\n{status}"
    )
}

/// A state holding the objects of `yaml`, recomputed.
fn state_of(yaml: &str, setup: impl FnOnce(&mut ClusterState)) -> ClusterState {
    let objects = objects(yaml);
    let mut state = ClusterState::new(None);
    setup(&mut state);
    load(&mut state, objects);
    state.recompute();
    state
}

/// `address service` for every frontend.
fn owners(state: &ClusterState) -> Vec<String> {
    state
        .desired()
        .values()
        .map(|f| format!("{} {}", f.address, f.service.name()))
        .collect()
}

fn problem_lines(state: &ClusterState) -> Vec<String> {
    state.problems().iter().map(ToString::to_string).collect()
}

#[test]
fn an_external_or_load_balancer_ip_equal_to_another_services_cluster_ip_is_not_taken() {
    // "a-hijack" sorts first: the old first-by-name rule would have given it 10.96.0.10:53.
    let yaml = [
        service_with("dns", "10.96.0.10", "", "[{name: dns, port: 53, protocol: UDP}]", ""),
        service_with(
            "a-hijack",
            "10.96.0.20",
            "  type: LoadBalancer\n  externalIPs: [192.168.60.1, 10.96.0.10]\n",
            "[{name: dns, port: 53, protocol: UDP, nodePort: 30053}, {name: web, port: 80, nodePort: 30080}]",
            "status:\n  loadBalancer:\n    ingress: [{ip: 10.96.0.10}]\n",
        ),
    ]
    .concat();
    let state = state_of(&yaml, |_| {});
    assert_eq!(
        owners(&state),
        [
            "0.0.0.0:30053/UDP a-hijack",
            "0.0.0.0:30080/TCP a-hijack",
            // Refused on every port, not only the ClusterIP's own port 53.
            "10.96.0.10:53/UDP dns",
            "10.96.0.20:53/UDP a-hijack",
            "10.96.0.20:80/TCP a-hijack",
            "192.168.60.1:53/UDP a-hijack",
            "192.168.60.1:80/TCP a-hijack",
        ]
    );
    assert_eq!(
        problem_lines(&state),
        [
            "test.yaml: Service default/a-hijack: spec.externalIPs[1]: 10.96.0.10 is the ClusterIP of Service default/dns; not taken",
            "test.yaml: Service default/a-hijack: status.loadBalancer.ingress[0].ip: 10.96.0.10 is the ClusterIP of Service default/dns; not taken",
        ]
    );
}

#[test]
fn a_cluster_ip_arriving_later_takes_its_address_back_and_leaving_releases_it() {
    let hijack = service_with(
        "a-hijack",
        "10.96.0.20",
        "  externalIPs: [10.96.0.10]\n",
        "[{port: 53, protocol: UDP}, {name: web, port: 80}]",
        "",
    );
    let dns = service_with("dns", "10.96.0.10", "", "[{port: 53, protocol: UDP}]", "");
    let mut state = state_of(&hijack, |_| {});
    assert!(owners(&state).contains(&"10.96.0.10:53/UDP a-hijack".to_string()));
    let version = state.problems_version();
    for object in objects(&dns).services {
        state.apply_service(object);
    }
    let changed: Vec<String> = state.recompute().iter().map(ToString::to_string).collect();
    // Port 80 changed too, though the new Service has no port 80.
    assert_eq!(changed, ["10.96.0.10:53/UDP", "10.96.0.10:80/TCP"]);
    assert!(owners(&state).contains(&"10.96.0.10:53/UDP dns".to_string()));
    assert!(
        !owners(&state)
            .iter()
            .any(|o| o.starts_with("10.96.0.10:80"))
    );
    assert_ne!(state.problems_version(), version);
    assert_eq!(
        problem_lines(&state).len(),
        1,
        "{:?}",
        problem_lines(&state)
    );
    state.delete_service(&ObjectRef::new("default", "dns"));
    state.recompute();
    assert!(problem_lines(&state).is_empty());
    assert!(owners(&state).contains(&"10.96.0.10:80/TCP a-hijack".to_string()));
}

#[test]
fn external_ips_outside_the_allowed_cidrs_are_not_taken() {
    let yaml = service_with(
        "web",
        "10.96.0.10",
        "  type: LoadBalancer\n  externalIPs: [192.168.60.1, 203.0.113.7]\n",
        "[{port: 80, nodePort: 30080}]",
        "status:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.1}]\n",
    );
    let cidrs = crate::ownership::ExternalIpCidrs(vec!["192.168.0.0/16".parse().unwrap()]);
    let state = state_of(&yaml, |s| s.set_external_ip_cidrs(cidrs));
    assert_eq!(
        owners(&state),
        [
            "0.0.0.0:30080/TCP web",
            "10.96.0.10:80/TCP web",
            "192.168.60.1:80/TCP web",
            // A LoadBalancer IP is the provider's, not the Service author's: not filtered.
            "198.51.100.1:80/TCP web",
        ]
    );
    assert_eq!(
        problem_lines(&state),
        [
            "test.yaml: Service default/web: spec.externalIPs[1]: 203.0.113.7 is outside --external-ip-cidrs (192.168.0.0/16); not taken"
        ]
    );
    // No CIDRs given: every external IP is honoured.
    assert_eq!(owners(&state_of(&yaml, |_| {})).len(), 5);
}

#[test]
fn a_node_port_wins_over_an_external_ip_on_a_node_address() {
    let yaml = [
        service_with(
            "np",
            "10.96.0.10",
            "  type: NodePort\n",
            "[{port: 80, nodePort: 30080}]",
            "",
        ),
        service_with(
            "a-ext",
            "10.96.0.20",
            "  externalIPs: [192.168.50.1]\n",
            "[{name: a, port: 30080}, {name: b, port: 80}]",
            "",
        ),
    ]
    .concat();
    let node = std::collections::BTreeSet::from(["192.168.50.1".parse::<IpAddr>().unwrap()]);
    let mut state = state_of(&yaml, |s| s.set_node_addresses(node));
    assert_eq!(
        owners(&state),
        [
            "0.0.0.0:30080/TCP np",
            "10.96.0.10:80/TCP np",
            "10.96.0.20:80/TCP a-ext",
            "10.96.0.20:30080/TCP a-ext",
            // A node address as external IP is served (as kube-proxy does)...
            "192.168.50.1:80/TCP a-ext",
        ]
    );
    // ...but not on the port of another Service's NodePort.
    assert_eq!(
        problem_lines(&state),
        [
            "test.yaml: Service default/a-ext: spec.externalIPs[0]: 192.168.50.1 is a node address, where nodePort 30080/TCP of Service default/np answers; not taken"
        ]
    );
    // The address stops being a node address: the external IP takes its port.
    state.set_node_addresses(std::collections::BTreeSet::new());
    let changed: Vec<String> = state.recompute().iter().map(ToString::to_string).collect();
    assert_eq!(changed, ["192.168.50.1:30080/TCP"]);
    assert!(problem_lines(&state).is_empty());
    // The NodePort goes: same.
    let mut state = state_of(&yaml, |s| {
        s.set_node_addresses(std::collections::BTreeSet::from(["192.168.50.1"
            .parse::<IpAddr>()
            .unwrap()]));
    });
    state.delete_service(&ObjectRef::new("default", "np"));
    state.recompute();
    assert!(owners(&state).contains(&"192.168.50.1:30080/TCP a-ext".to_string()));
    assert!(problem_lines(&state).is_empty());
}

#[test]
fn special_addresses_are_never_external_ips() {
    // 0.0.0.0 is how the maps spell a NodePort on every node address.
    let yaml = [
        service_with(
            "np",
            "10.96.0.10",
            "  type: NodePort\n",
            "[{port: 80, nodePort: 30080}]",
            "",
        ),
        service_with(
            "a-any",
            "10.96.0.20",
            "  externalIPs: [0.0.0.0, 127.0.0.1, 169.254.1.1]\n",
            "[{port: 30080}]",
            "",
        ),
    ]
    .concat();
    let state = state_of(&yaml, |_| {});
    assert_eq!(
        owners(&state),
        [
            "0.0.0.0:30080/TCP np",
            "10.96.0.10:80/TCP np",
            "10.96.0.20:30080/TCP a-any"
        ]
    );
    let problems = problem_lines(&state);
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems[0].contains("spec.externalIPs[0]: 0.0.0.0 is not a unicast address"),
        "{problems:?}"
    );
}

#[test]
fn the_headless_label_leaves_services_and_slices_alone_as_kube_proxy() {
    let labelled = |yaml: String| {
        yaml.replacen(
            "metadata: {",
            "metadata: {labels: {service.kubernetes.io/headless: \"\"}, ",
            1,
        )
    };
    let yaml = [
        labelled(service(
            "marked",
            "default",
            "10.96.0.11",
            WEB_PORTS,
            APP_WEB,
        )),
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        slice(
            "web-1",
            "default",
            "web",
            "[{addresses: [10.244.0.2]}]",
            "[{port: 8080}]",
        ),
        // Ignored altogether: neither its endpoint nor "the Service has slices".
        slice(
            "web-headless",
            "default",
            "web",
            "[{addresses: [10.244.0.9]}]",
            "[{port: 8080}]",
        )
        .replace(
            "labels: {",
            "labels: {service.kubernetes.io/headless: \"\", ",
        ),
    ]
    .concat();
    let translation = translate(&objects(&yaml));
    assert_eq!(
        render(&translation),
        ["10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP"]
    );
    assert_eq!(
        translation.skipped,
        [Skipped {
            object: "Service default/marked".into(),
            reason: "service.kubernetes.io/headless label: not proxied".into()
        }]
    );
    assert!(
        translation.problems.is_empty(),
        "{:?}",
        translation.problems
    );
}

#[test]
fn only_the_first_address_of_an_endpoint_is_used() {
    let yaml = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        // The second and third addresses are ignored, even when they are not addresses.
        slice(
            "web-1",
            "default",
            "web",
            "[{addresses: [10.244.0.2, 10.244.0.3, not-an-ip]}, {addresses: []}]",
            "[{port: 8080}]",
        ),
    ]
    .concat();
    assert_eq!(
        frontends(&yaml),
        ["10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP"]
    );
}

#[test]
fn address_fields_name_the_first_entry_with_the_address() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.1\n  externalIPs: [192.168.60.1, 10.96.0.10, 10.96.0.10]\n  ports: [{port: 80, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{hostname: x}, {ip: 10.96.0.10}]}}\n";
    let checked = validate_service(&objects(yaml).services[0]);
    let translation = translate_service(&checked, None, &[], NodeTopology::default());
    let field = |kind: FrontendKind, ip: &str| {
        let ip: IpAddr = ip.parse().unwrap();
        let frontend = translation
            .frontends
            .iter()
            .find(|f| f.kind == kind && f.address.address == ip)
            .unwrap();
        checked.address_field(frontend)
    };
    assert_eq!(
        field(FrontendKind::ExternalIp, "10.96.0.10").as_deref(),
        Some("spec.externalIPs[1]")
    );
    assert_eq!(
        field(FrontendKind::ExternalIp, "192.168.60.1").as_deref(),
        Some("spec.externalIPs[0]")
    );
    assert_eq!(
        field(FrontendKind::LoadBalancer, "10.96.0.10").as_deref(),
        Some("status.loadBalancer.ingress[1].ip")
    );
    assert_eq!(field(FrontendKind::ClusterIp, "10.96.0.1"), None);
}

/// One unusable address drops its endpoint alone: the slice's other endpoints stay, and the
/// dropped one is reported with its field and why.
#[test]
fn an_invalid_or_special_endpoint_address_drops_only_that_endpoint() {
    let endpoints = "[{addresses: [10.244.0.2]}, {addresses: [10.244.0]}, {addresses: [127.0.0.1]}, \
                     {addresses: [169.254.169.254]}, {addresses: [0.0.0.0]}, {addresses: [224.0.0.5]}, \
                     {addresses: [10.244.0.3]}]";
    let yaml = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        slice("web-1", "default", "web", endpoints, "[{port: 8080}]"),
    ]
    .concat();
    let translation = translate(&objects(&yaml));
    assert_eq!(
        render(&translation),
        ["10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP,10.244.0.3:8080/TCP"]
    );
    let problems: Vec<String> = translation
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    let dropped = "; this endpoint is dropped, the others stay";
    let at = "test.yaml: EndpointSlice default/web-1: endpoints";
    assert_eq!(
        problems,
        [
            format!("{at}[1].addresses[0]: \"10.244.0\" is not an IPv4 address{dropped}"),
            format!(
                "{at}[2].addresses[0]: \"127.0.0.1\" may not be in the loopback range (127.0.0.0/8, ::1/128){dropped}"
            ),
            format!(
                "{at}[3].addresses[0]: \"169.254.169.254\" may not be in the link-local range (169.254.0.0/16, fe80::/10){dropped}"
            ),
            format!(
                "{at}[4].addresses[0]: \"0.0.0.0\" may not be unspecified (0.0.0.0, ::){dropped}"
            ),
            format!(
                "{at}[5].addresses[0]: \"224.0.0.5\" may not be multicast (224.0.0.0/4, ff00::/8){dropped}"
            ),
        ]
    );
}

/// The API server's `ValidateNonSpecialIP`, and multicast: what can be no backend.
#[test]
fn special_addresses_are_refused_as_backends() {
    let refused = [
        "0.0.0.0",
        "::",
        "127.0.0.1",
        "127.255.0.9",
        "::1",
        "::ffff:127.0.0.1",
        "169.254.1.1",
        "fe80::1",
        "224.0.0.1",
        "239.1.2.3",
        "ff02::1",
        "ff05::2",
    ];
    for text in refused {
        let ip: IpAddr = text.parse().unwrap();
        assert!(special_ip(ip).is_some(), "{text} must be refused");
    }
    for text in [
        "10.244.0.2",
        "192.168.1.1",
        "fd00::1",
        "2001:db8::1",
        "100.64.0.1",
    ] {
        let ip: IpAddr = text.parse().unwrap();
        assert_eq!(special_ip(ip), None, "{text} is a backend address");
    }
}

/// A Pod's loopback or link-local address is no endpoint, reported; its other address is.
#[test]
fn a_pods_special_address_is_no_endpoint() {
    let yaml = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        pod("lo", "default", APP_WEB, "127.0.0.1", true, HTTP_8080),
        pod("ok", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
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
    assert_eq!(
        problems,
        [
            "test.yaml: Pod default/lo: status.podIP: \"127.0.0.1\" may not be in the loopback range (127.0.0.0/8, ::1/128); not used as an endpoint"
        ]
    );
}

/// An FQDN slice is reported and skipped, as kube-proxy ignores it: the Service's endpoints
/// still come from its pods (it does not count as a Service with slices).
#[test]
fn fqdn_slices_are_reported_and_skipped() {
    let fqdn = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-fqdn, labels: {kubernetes.io/service-name: web}}\naddressType: FQDN\nendpoints: [{addresses: [web.example.com]}]\nports: [{port: 8080}]\n";
    let yaml = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        pod("a", "default", APP_WEB, "10.244.0.2", true, HTTP_8080),
        fqdn.to_string(),
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
    assert_eq!(
        problems,
        [
            "test.yaml: EndpointSlice default/web-fqdn: addressType: FQDN slices are not proxied (as kube-proxy, which ignores them); skipped"
        ]
    );
}

/// An edit of a Service, a slice or a Pod that fails validation changes nothing: the last
/// valid version stays in effect, and the problem says so. A valid edit then applies.
#[test]
fn an_invalid_edit_keeps_the_last_valid_version() {
    let mut state = ClusterState::new(None);
    let first = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        service(
            "api",
            "default",
            "10.96.0.11",
            "[{port: 81, targetPort: 8080}]",
            "{app: api}",
        ),
        slice(
            "web-1",
            "default",
            "web",
            "[{addresses: [10.244.0.2]}]",
            "[{port: 8080}]",
        ),
        pod("p", "default", "{app: api}", "10.244.0.5", true, HTTP_8080),
    ]
    .concat();
    load(&mut state, objects(&first));
    state.recompute();
    let before = frontend_lines(&state);
    assert_eq!(
        before,
        [
            "10.96.0.10:80/TCP -> 10.244.0.2:8080/TCP",
            "10.96.0.11:81/TCP -> 10.244.0.5:8080/TCP"
        ]
    );
    let broken = [
        service("web", "default", "10.96.0.20", "[{port: 70000}]", APP_WEB),
        slice(
            "web-1",
            "default",
            "web",
            "[{addresses: [10.244.0.3]}]",
            "[{port: 0}]",
        ),
        pod("p", "default", "{app: api}", "10.244.0", true, HTTP_8080),
    ]
    .concat();
    load(&mut state, objects(&broken));
    state.recompute();
    assert_eq!(frontend_lines(&state), before, "nothing changed");
    let problems: Vec<String> = state.problems().iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems
            .iter()
            .all(|p| p.ends_with("; the last valid version stays in effect")),
        "{problems:#?}"
    );
    // A valid edit takes effect and clears the problems.
    let fixed = [
        service("web", "default", "10.96.0.20", WEB_PORTS, APP_WEB),
        slice(
            "web-1",
            "default",
            "web",
            "[{addresses: [10.244.0.3]}]",
            "[{port: 8080}]",
        ),
        pod("p", "default", "{app: api}", "10.244.0.6", true, HTTP_8080),
    ]
    .concat();
    load(&mut state, objects(&fixed));
    state.recompute();
    assert_eq!(
        frontend_lines(&state),
        [
            "10.96.0.11:81/TCP -> 10.244.0.6:8080/TCP",
            "10.96.0.20:80/TCP -> 10.244.0.3:8080/TCP"
        ]
    );
    assert!(state.problems().is_empty(), "{:?}", state.problems());
}

fn frontend_lines(state: &ClusterState) -> Vec<String> {
    state
        .desired()
        .values()
        .map(|f| {
            let backends: Vec<String> = f.backends.iter().map(|b| b.to_string()).collect();
            format!("{} -> {}", f.address, backends.join(","))
        })
        .collect()
}

/// Two pods with one address (found by the property tests): the endpoint is the first pod's
/// by name, whatever order the state's pod table iterates in (each state hashes
/// differently).
#[test]
fn pods_sharing_an_address_give_the_first_by_names_endpoint() {
    let yaml = [
        service("web", "default", "10.96.0.10", WEB_PORTS, APP_WEB),
        pod_on("p-a", "10.244.0.4", "node-b"),
        pod_on("p-b", "10.244.0.4", "node-a"),
    ]
    .concat();
    for _ in 0..16 {
        let mut state = ClusterState::new(Some("node-a".to_string()));
        load(&mut state, objects(&yaml));
        state.recompute();
        let frontend = state.desired().values().next().expect("one frontend");
        assert!(
            frontend.backends.get(0).unwrap().remote,
            "p-a's endpoint, on node-b"
        );
    }
}

/// A slice's endpoints name their node and zone through a shared list: past the first few
/// (found by a scan) an index takes over, and either way an info already listed keeps its
/// place and a new one is added once.
#[test]
fn slice_infos_are_listed_once_each_past_the_scan() {
    let id = ObjectRef::new("default", "web-1");
    let info = |node: usize| EndpointInfo {
        source: EndpointSource::Slice(id.clone()),
        node_name: Some(intern(&format!("node-{node}"))),
        zone: Some(intern("zone-a")),
    };
    let mut infos = SliceInfos::default();
    for round in 0..2 {
        for node in 0..40 {
            let at = infos.index_of(info(node)).unwrap();
            assert_eq!(usize::from(at), node, "round {round}");
        }
    }
    assert_eq!(infos.list.len(), 40);
    assert_eq!(infos.list[33].node_name.as_deref(), Some("node-33"));
}

/// `explain` names the Pods a Service's endpoints were derived from (manifests without
/// slices), each once, in the Service's namespace, and the endpoints' source as `pod/NAME`.
#[test]
fn explain_names_the_pods_the_endpoints_come_from() {
    let yaml = [
        service("web", "shop", "10.96.0.10", WEB_PORTS, APP_WEB),
        pod("web-b", "shop", APP_WEB, "10.244.0.3", true, HTTP_8080),
        pod("web-a", "shop", APP_WEB, "10.244.0.2", true, HTTP_8080),
    ]
    .concat();
    let mut state = ClusterState::new(None);
    load(&mut state, objects(&yaml));
    state.recompute();
    let target = "10.96.0.10:80/TCP".parse().unwrap();
    let explanation = crate::explain::explain(&state, target, None);
    let [entry] = explanation.entries.as_slice() else {
        panic!("one entry: {explanation:#?}");
    };
    let objects: Vec<(&str, &str)> = entry
        .slices
        .iter()
        .map(|o| (o.kind.as_str(), o.name.as_str()))
        .collect();
    assert_eq!(objects, [("Pod", "shop/web-a"), ("Pod", "shop/web-b")]);
    let sources: Vec<&str> = entry.backends.iter().map(|b| b.source.as_str()).collect();
    assert_eq!(sources, ["pod/web-a", "pod/web-b"]);
}
