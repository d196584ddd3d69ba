//! The pure translation from Kubernetes objects to the desired state: which virtual
//! addresses exist and which backends take new connections for each, with kube-proxy's
//! semantics. No I/O here: both sources feed it, and the tests drive it directly.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::model::{DesiredState, Frontend, L4Addr, ObjectRef, Protocol};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label that hands a Service to another proxy (kube-proxy skips these too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// An object and where it came from (a file path, or `api`), for error messages.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub origin: Arc<str>,
    pub object: T,
}

/// Everything the translation looks at.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: Vec<Sourced<Service>>,
    pub endpoint_slices: Vec<Sourced<EndpointSlice>>,
    pub pods: Vec<Sourced<Pod>>,
}

/// An object, or part of one, that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// File (or `api`) the object came from.
    pub origin: String,
    /// `Kind namespace/name`.
    pub object: String,
    /// Path of the offending field, e.g. `spec.ports[0].port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}: {}",
            self.origin, self.object, self.field, self.message
        )
    }
}

/// A Service, or one of its ports, that is deliberately not programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub object: String,
    pub reason: String,
}

/// The result of a translation.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub frontends: DesiredState,
    /// Invalid objects (reported as errors; the rest is still programmed).
    pub problems: Vec<Problem>,
    /// Objects left alone on purpose (headless, ExternalName, another proxy's, SCTP ports).
    pub skipped: Vec<Skipped>,
}

/// Translates the objects into the frontends this node serves.
#[must_use]
pub fn translate(objects: &ClusterObjects) -> Translation {
    let mut out = Translation::default();
    let pods = index_pods(&objects.pods, &mut out.problems);
    let slices = index_slices(&objects.endpoint_slices, &mut out.problems);

    let mut services: Vec<&Sourced<Service>> = objects.services.iter().collect();
    services.sort_by_key(|s| object_ref(&s.object.metadata));
    for sourced in services {
        let Some(service) = validate_service(sourced, &mut out) else {
            continue;
        };
        let service_slices = slices.get(&service.id);
        for port in &service.ports {
            let backends = match service_slices {
                Some(slices) => backends_from_slices(port, slices),
                None => backends_from_pods(&service, port, pods.get(&service.id.namespace)),
            };
            let address = L4Addr::new(service.cluster_ip, port.port, port.protocol);
            if let Some(existing) = out.frontends.get(&address) {
                out.problems.push(Problem {
                    origin: sourced.origin.to_string(),
                    object: format!("Service {}", service.id),
                    field: format!("spec.ports[{}]", port.index),
                    message: format!("{address} is already taken by Service {}", existing.service),
                });
                continue;
            }
            out.frontends.insert(
                address,
                Frontend {
                    address,
                    service: service.id.clone(),
                    port_name: port.name.clone(),
                    backends: backends.into_iter().collect(),
                },
            );
        }
    }
    out
}

/// A Service that passed validation.
struct ValidService {
    id: ObjectRef,
    cluster_ip: Ipv4Addr,
    ports: Vec<ValidPort>,
    selector: Option<BTreeMap<String, String>>,
}

struct ValidPort {
    index: usize,
    name: String,
    port: u16,
    protocol: Protocol,
    target: TargetPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TargetPort {
    Number(u16),
    Name(String),
}

/// Collects the problems of one object, and reports them all at once.
struct Checker<'a> {
    origin: &'a str,
    object: String,
    problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    fn new(origin: &'a str, kind: &str, meta: &ObjectMeta) -> Self {
        Self {
            origin,
            object: format!("{kind} {}", object_ref(meta)),
            problems: Vec::new(),
        }
    }

    fn fail(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            origin: self.origin.to_string(),
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    /// Hands the problems over; true when there were none.
    fn finish(self, sink: &mut Vec<Problem>) -> bool {
        let ok = self.problems.is_empty();
        sink.extend(self.problems);
        ok
    }
}

fn validate_service(sourced: &Sourced<Service>, out: &mut Translation) -> Option<ValidService> {
    let svc = &sourced.object;
    let id = object_ref(&svc.metadata);
    let skip = |out: &mut Translation, reason: &str| {
        out.skipped.push(Skipped {
            object: format!("Service {id}"),
            reason: reason.to_string(),
        });
    };
    if let Some(proxy) = label(&svc.metadata, SERVICE_PROXY_NAME_LABEL) {
        skip(
            out,
            &format!("{SERVICE_PROXY_NAME_LABEL}={proxy}: left to that proxy"),
        );
        return None;
    }
    let mut check = Checker::new(&sourced.origin, "Service", &svc.metadata);
    if svc.metadata.name.as_deref().unwrap_or_default().is_empty() {
        check.fail("metadata.name", "missing");
    }
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        skip(out, "type ExternalName: answered by DNS, not proxied");
        return None;
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => {
            skip(out, "headless (clusterIP: None): no virtual address");
            return None;
        }
        None | Some("") => {
            check.fail(
                "spec.clusterIP",
                "missing: no ClusterIP is allocated without an API server; set one from the service CIDR",
            );
            None
        }
        Some(text) => match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => Some(ip),
            Ok(IpAddr::V6(_)) => {
                check.fail(
                    "spec.clusterIP",
                    format!("{text}: IPv6 is not supported yet"),
                );
                None
            }
            Err(_) => {
                check.fail("spec.clusterIP", format!("{text:?} is not an IP address"));
                None
            }
        },
    };
    let mut ports = Vec::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        if let Some(valid) = validate_service_port(index, port, &mut check, out, &id) {
            ports.push(valid);
        }
    }
    if !check.finish(&mut out.problems) {
        return None;
    }
    Some(ValidService {
        id,
        cluster_ip: cluster_ip?,
        ports,
        selector: spec.selector,
    })
}

fn validate_service_port(
    index: usize,
    port: &ServicePort,
    check: &mut Checker<'_>,
    out: &mut Translation,
    id: &ObjectRef,
) -> Option<ValidPort> {
    let field = |name: &str| format!("spec.ports[{index}].{name}");
    let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => {
            out.skipped.push(Skipped {
                object: format!("Service {id} port {}", port.port),
                reason: "SCTP is not load-balanced".to_string(),
            });
            return None;
        }
        other => {
            check.fail(
                field("protocol"),
                format!("{other:?} is not TCP, UDP or SCTP"),
            );
            return None;
        }
    };
    let number = port_number(port.port);
    if number.is_none() {
        check.fail(
            field("port"),
            format!("{} is out of range 1-65535", port.port),
        );
    }
    let target = match &port.target_port {
        None => number.map(TargetPort::Number),
        Some(IntOrString::Int(n)) => {
            let target = port_number(*n);
            if target.is_none() {
                check.fail(field("targetPort"), format!("{n} is out of range 1-65535"));
            }
            target.map(TargetPort::Number)
        }
        Some(IntOrString::String(name)) if is_port_name(name) => {
            Some(TargetPort::Name(name.clone()))
        }
        Some(IntOrString::String(name)) => {
            check.fail(
                field("targetPort"),
                format!("{name:?} is neither a port number nor a port name"),
            );
            None
        }
    };
    Some(ValidPort {
        index,
        name: port.name.clone().unwrap_or_default(),
        port: number?,
        protocol,
        target: target?,
    })
}

/// A Pod that passed validation.
struct ValidPod {
    ip: Ipv4Addr,
    labels: BTreeMap<String, String>,
    ready: bool,
    /// Container ports: (name, number, protocol).
    ports: Vec<(String, u16, Protocol)>,
}

fn index_pods(
    pods: &[Sourced<Pod>],
    problems: &mut Vec<Problem>,
) -> HashMap<String, Vec<ValidPod>> {
    let mut by_namespace: HashMap<String, Vec<ValidPod>> = HashMap::new();
    for sourced in pods {
        let pod = &sourced.object;
        let mut check = Checker::new(&sourced.origin, "Pod", &pod.metadata);
        let status = pod.status.clone().unwrap_or_default();
        let ip_text = status
            .pod_ips
            .iter()
            .flatten()
            .map(|ip| ip.ip.as_str())
            .chain(status.pod_ip.as_deref())
            .find(|ip| ip.parse::<Ipv4Addr>().is_ok())
            .or(status.pod_ip.as_deref());
        let ip = match ip_text.map(str::parse::<IpAddr>) {
            // A pod that has no address yet (Pending) is simply no endpoint.
            None => continue,
            Some(Ok(IpAddr::V4(ip))) => Some(ip),
            Some(Ok(IpAddr::V6(_))) => continue,
            Some(Err(_)) => {
                check.fail(
                    "status.podIP",
                    format!("{:?} is not an IP address", ip_text.unwrap_or_default()),
                );
                None
            }
        };
        let mut ports = Vec::new();
        let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
        for (c, container) in containers.enumerate() {
            for (p, port) in container.ports.iter().flatten().enumerate() {
                let field = format!("spec.containers[{c}].ports[{p}]");
                let Some(number) = port_number(port.container_port) else {
                    check.fail(
                        format!("{field}.containerPort"),
                        format!("{} is out of range 1-65535", port.container_port),
                    );
                    continue;
                };
                let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    _ => continue,
                };
                ports.push((port.name.clone().unwrap_or_default(), number, protocol));
            }
        }
        let ready = pod_is_ready(pod);
        if check.finish(problems) {
            let Some(ip) = ip else { continue };
            by_namespace
                .entry(namespace(&pod.metadata))
                .or_default()
                .push(ValidPod {
                    ip,
                    labels: pod.metadata.labels.clone().unwrap_or_default(),
                    ready,
                    ports,
                });
        }
    }
    by_namespace
}

/// Ready as the EndpointSlice controller sees it: running, not being deleted, and its
/// `Ready` condition true.
fn pod_is_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = &pod.status else {
        return false;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return false;
    }
    status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// An EndpointSlice that passed validation.
struct ValidSlice {
    endpoints: Vec<ValidEndpoint>,
    /// (name, number, protocol); ports without a number are left out.
    ports: Vec<(String, u16, Protocol)>,
}

struct ValidEndpoint {
    addresses: Vec<Ipv4Addr>,
    ready: bool,
}

fn index_slices(
    slices: &[Sourced<EndpointSlice>],
    problems: &mut Vec<Problem>,
) -> HashMap<ObjectRef, Vec<ValidSlice>> {
    let mut by_service: HashMap<ObjectRef, Vec<ValidSlice>> = HashMap::new();
    for sourced in slices {
        let slice = &sourced.object;
        let Some(service) = label(&slice.metadata, SERVICE_NAME_LABEL) else {
            continue;
        };
        let service = ObjectRef {
            namespace: namespace(&slice.metadata),
            name: service.to_string(),
        };
        let mut check = Checker::new(&sourced.origin, "EndpointSlice", &slice.metadata);
        let mut valid = ValidSlice {
            endpoints: Vec::new(),
            ports: Vec::new(),
        };
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" | "FQDN" => {
                // Counts as "the Service has slices", with no IPv4 endpoints in it.
                by_service.entry(service).or_default().push(valid);
                continue;
            }
            other => check.fail(
                "addressType",
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            ),
        }
        for (e, endpoint) in slice.endpoints.iter().flatten().enumerate() {
            let mut addresses = Vec::new();
            for (a, text) in endpoint.addresses.iter().enumerate() {
                match text.parse::<Ipv4Addr>() {
                    Ok(ip) => addresses.push(ip),
                    Err(_) => check.fail(
                        format!("endpoints[{e}].addresses[{a}]"),
                        format!("{text:?} is not an IPv4 address"),
                    ),
                }
            }
            // An unknown readiness is to be read as ready (EndpointConditions API doc).
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            valid.endpoints.push(ValidEndpoint { addresses, ready });
        }
        for (p, port) in slice.ports.iter().flatten().enumerate() {
            let Some(number) = port.port else { continue };
            let Some(number) = port_number(number) else {
                check.fail(
                    format!("ports[{p}].port"),
                    format!("{number} is out of range 1-65535"),
                );
                continue;
            };
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => continue,
            };
            valid
                .ports
                .push((port.name.clone().unwrap_or_default(), number, protocol));
        }
        if check.finish(problems) {
            by_service.entry(service).or_default().push(valid);
        }
    }
    by_service
}

/// The ready endpoints of the slices, on the slice port with the Service port's name.
fn backends_from_slices(port: &ValidPort, slices: &[ValidSlice]) -> BTreeSet<L4Addr> {
    let mut backends = BTreeSet::new();
    for slice in slices {
        let Some(&(_, number, _)) = slice
            .ports
            .iter()
            .find(|(name, _, protocol)| *name == port.name && *protocol == port.protocol)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().filter(|e| e.ready) {
            for &ip in &endpoint.addresses {
                backends.insert(L4Addr::new(ip, number, port.protocol));
            }
        }
    }
    backends
}

/// What the EndpointSlice controller would publish: the ready pods of the Service's own
/// namespace that its selector matches, on the resolved target port.
fn backends_from_pods(
    service: &ValidService,
    port: &ValidPort,
    pods: Option<&Vec<ValidPod>>,
) -> BTreeSet<L4Addr> {
    let mut backends = BTreeSet::new();
    // A Service without a selector gets no endpoints from pods (they are managed by hand).
    let Some(selector) = service.selector.as_ref().filter(|s| !s.is_empty()) else {
        return backends;
    };
    for pod in pods.into_iter().flatten() {
        if !pod.ready || !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)) {
            continue;
        }
        let number = match &port.target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => pod
                .ports
                .iter()
                .find(|(n, _, protocol)| n == name && *protocol == port.protocol)
                .map(|&(_, number, _)| number),
        };
        if let Some(number) = number {
            backends.insert(L4Addr::new(pod.ip, number, port.protocol));
        }
    }
    backends
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// An IANA service name as Kubernetes validates port names: 1-15 characters of lower-case
/// letters, digits and '-', at least one letter, no leading, trailing or double '-'.
fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

fn namespace(meta: &ObjectMeta) -> String {
    meta.namespace
        .clone()
        .unwrap_or_else(|| "default".to_string())
}

fn object_ref(meta: &ObjectMeta) -> ObjectRef {
    ObjectRef {
        namespace: namespace(meta),
        name: meta.name.clone().unwrap_or_default(),
    }
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

#[cfg(test)]
mod tests;
