//! The pure translation from Kubernetes objects to the desired state: which virtual
//! addresses exist and which backends take new connections for each, with kube-proxy's
//! semantics. Objects are validated once, when they arrive, into compact forms
//! ([`CheckedService`], [`ValidSlice`], [`ValidPod`]) that keep only what the translation
//! reads; [`translate_service`] then works on those alone. No state and no I/O here.
use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::categorize::{Candidate, Hints, NodeTopology, Policies, categorize};
use crate::model::{
    Backend, DEFAULT_NAMESPACE, EndpointInfo, EndpointSource, EndpointState, Frontend,
    FrontendKind, HealthCheck, L4Addr, ObjectRef, Protocol, intern,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label that hands a Service to another proxy (kube-proxy skips these too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on the slices of a headless Service (the
/// API's `v1.IsHeadlessService`); kube-proxy's informers exclude Services and
/// EndpointSlices carrying it, whatever its value.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// An object and where it came from (a file path, or `api`), for error messages.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub origin: Arc<str>,
    pub object: T,
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

/// What one Service translates to, before frontends are checked against other Services.
/// (Its problems and skipped parts are its [`CheckedService`]'s.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTranslation {
    pub frontends: Vec<Arc<Frontend>>,
    /// The Service's `healthCheckNodePort`, when it has one.
    pub health_check: Option<HealthCheck>,
}

/// The problems and skipped parts validation finds in one Service.
#[derive(Default)]
struct Findings {
    problems: Vec<Problem>,
    skipped: Vec<Skipped>,
}

/// Translates one Service. `slices` is `Some` when the Service has EndpointSlices (then
/// they alone give its endpoints, even when empty); otherwise its endpoints come from
/// `pods` of its namespace, as the EndpointSlice controller would derive them. `node` is
/// this node: endpoints on it are local, those on other nodes remote, and its zone decides
/// which topology hints apply.
#[must_use]
pub fn translate_service(
    checked: &CheckedService,
    slices: Option<&[&ValidSlice]>,
    pods: &[&ValidPod],
    node: NodeTopology<'_>,
) -> ServiceTranslation {
    let mut out = ServiceTranslation::default();
    let Some(service) = &checked.valid else {
        return out;
    };
    let id = &checked.id;
    let mut local_ready = std::collections::BTreeSet::new();
    for port in &service.ports {
        let candidates = match slices {
            Some(slices) => candidates_from_slices(port, slices),
            None => candidates_from_pods(checked.id.namespace(), service, port, pods, node),
        };
        let mut addresses: Vec<(IpAddr, u16, FrontendKind)> = service
            .frontend_ips
            .iter()
            .map(|ip| (ip.ip, port.port, ip.kind))
            .collect();
        if let Some(node_port) = port.node_port {
            // One NodePort frontend per family the Service has: any address of the node.
            let mut families: Vec<IpAddr> = service
                .frontend_ips
                .iter()
                .filter(|ip| ip.kind == FrontendKind::ClusterIp)
                .map(|ip| unspecified(ip.ip))
                .collect();
            families.dedup();
            for any in families {
                addresses.push((any, node_port, FrontendKind::NodePort));
            }
        }
        let policies = Policies {
            internal_local: service.internal_local,
            external_local: service.external_local,
            externally_accessible: addresses
                .iter()
                .any(|(_, _, kind)| *kind != FrontendKind::ClusterIp),
        };
        // Endpoints of each family, sorted into kube-proxy's categories once per family.
        let (v4, v6): (Vec<Candidate>, Vec<Candidate>) = candidates
            .into_iter()
            .partition(|c| c.addr.address.is_ipv4());
        let categories = [
            categorize(&v4, policies, node),
            categorize(&v6, policies, node),
        ];
        for cats in &categories {
            local_ready.extend(
                cats.local
                    .iter()
                    .filter(|c| c.ready)
                    .map(|c| c.addr.address),
            );
            if !policies.uses_local() {
                // Only the Local policies compute local endpoints; the health check still
                // counts this node's ready ones.
                local_ready.extend(
                    cats.cluster
                        .iter()
                        .filter(|c| c.ready && is_local(&c.info, node.name))
                        .map(|c| c.addr.address),
                );
            }
        }
        for (ip, number, kind) in addresses {
            let address = L4Addr::new(ip, number, port.protocol);
            let cats = &categories[usize::from(ip.is_ipv6())];
            let frontend = |address, local_only: bool, endpoints: &[&Candidate]| {
                let (backends, backend_info) = backends_of(endpoints, node.name);
                Arc::new(Frontend {
                    address,
                    kind,
                    local_only,
                    no_local_endpoints: backends.is_empty() && cats.has_any,
                    affinity_timeout: service.affinity_timeout.and_then(std::num::NonZeroU32::new),
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        service.source_ranges.clone()
                    } else {
                        Box::default()
                    },
                    service: id.clone(),
                    port_name: port.name.clone(),
                    backends: backends.into(),
                    backend_info: backend_info.into_boxed_slice(),
                })
            };
            if kind == FrontendKind::ClusterIp {
                let endpoints = if service.internal_local {
                    &cats.local
                } else {
                    &cats.cluster
                };
                out.frontends.push(frontend(address, false, endpoints));
            } else if service.external_local {
                // Clients inside the cluster (pods, the node's own processes) reaching an
                // external address are subject to neither policy: kube-proxy short-circuits
                // them to the cluster endpoints. They look up an in-cluster entry of the
                // frontend with those.
                let internal = address.internal();
                out.frontends.push(frontend(internal, false, &cats.cluster));
                out.frontends.push(frontend(address, true, &cats.local));
            } else {
                out.frontends.push(frontend(address, false, &cats.cluster));
            }
        }
    }
    if let Some(port) = service.health_check_node_port {
        out.health_check = Some(HealthCheck {
            port,
            service: id.clone(),
            local_endpoints: local_ready.len(),
        });
    }
    out
}

/// The backends (and what is known of them) of the chosen endpoints: sorted by address,
/// without duplicates (one endpoint may be listed by two slices).
fn backends_of(
    endpoints: &[&Candidate],
    node: Option<&str>,
) -> (Vec<Backend>, Vec<Arc<EndpointInfo>>) {
    let mut chosen: BTreeMap<L4Addr, &Candidate> = BTreeMap::new();
    for c in endpoints {
        chosen.entry(c.addr).or_insert(c);
    }
    chosen
        .into_values()
        .map(|c| {
            let state = if c.ready {
                EndpointState::Ready
            } else {
                EndpointState::Terminating
            };
            let mut backend = Backend::new(c.addr, state);
            backend.remote = is_remote(&c.info, node);
            (backend, Arc::clone(&c.info))
        })
        .unzip()
}

/// The unspecified address of `ip`'s family.
fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// Whether an endpoint runs on this node (its `nodeName`, or its Pod's, is `node`).
#[must_use]
pub fn is_local(info: &EndpointInfo, node: Option<&str>) -> bool {
    node.is_some() && info.node_name.as_deref() == node
}

/// Whether an endpoint is known to run on another node. An endpoint without a node name,
/// or an agent without one, counts as local: nothing tells it to SNAT.
#[must_use]
pub fn is_remote(info: &EndpointInfo, node: Option<&str>) -> bool {
    matches!((info.node_name.as_deref(), node), (Some(a), Some(b)) if a != b)
}

/// A Service as validated when it arrives: what the translation needs of it and its
/// problems; the object itself is not kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedService {
    /// File (or `api`) it came from.
    pub origin: Arc<str>,
    pub id: ObjectRef,
    /// `None` when the Service is skipped or invalid. Shared with cluster DNS's index.
    pub valid: Option<Arc<ValidService>>,
    pub problems: Box<[Problem]>,
    pub skipped: Box<[Skipped]>,
    /// What cluster DNS answers for a Service the proxy skips (headless, ExternalName,
    /// another proxy's); DNS reads `valid` for the others.
    pub dns: Option<Arc<crate::dns::records::DnsService>>,
    /// Where this version came from and when its frontends were written, for `explain`.
    pub stamp: Stamp,
}

/// An object's `metadata.resourceVersion` and when the entries it produced were last
/// written: 12 bytes, kept beside the compact form. Not part of what the object means:
/// two versions that translate alike are equal whatever their stamps.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stamp {
    /// `metadata.resourceVersion` when it is a number (the API server's are); 0 for none
    /// (manifests, whose origin is the file).
    pub resource_version: u64,
    /// Seconds since the epoch of the last write of its frontends; 0 for none by this agent.
    pub written_at: u32,
}

impl PartialEq for Stamp {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Stamp {}

impl Stamp {
    /// The stamp of an object as it arrives (not written yet).
    #[must_use]
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            resource_version: meta
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            written_at: 0,
        }
    }
}

impl CheckedService {
    /// The field a refused `frontend` comes from: `spec.externalIPs[i]` or
    /// `status.loadBalancer.ingress[i].ip` (the first entry with its address), `None` for
    /// the other kinds.
    #[must_use]
    pub fn address_field(&self, frontend: &Frontend) -> Option<String> {
        let ip = self
            .valid
            .as_ref()?
            .frontend_ips
            .iter()
            .find(|ip| ip.ip == frontend.address.address && ip.kind == frontend.kind)?;
        match ip.kind {
            FrontendKind::ExternalIp => Some(format!("spec.externalIPs[{}]", ip.index)),
            FrontendKind::LoadBalancer => {
                Some(format!("status.loadBalancer.ingress[{}].ip", ip.index))
            }
            FrontendKind::ClusterIp | FrontendKind::NodePort => None,
        }
    }

    /// The field a `frontend` of this Service comes from: `spec.ports[i]`, or
    /// `spec.ports[i].nodePort` for a NodePort.
    #[must_use]
    pub fn frontend_field(&self, frontend: &Frontend) -> String {
        let port = self.port_field(&frontend.port_name);
        match frontend.kind {
            FrontendKind::NodePort => port + ".nodePort",
            _ => port,
        }
    }

    /// The field of the port `port_name`: `spec.ports[i]` (`spec.ports` when it has none).
    #[must_use]
    pub fn port_field(&self, port_name: &str) -> String {
        self.valid
            .iter()
            .flat_map(|v| &v.ports)
            .find(|p| &*p.name == port_name)
            .map_or_else(
                || "spec.ports".to_string(),
                |p| format!("spec.ports[{}]", p.index),
            )
    }
}

/// A label selector: (key, value) pairs sorted by key.
/// (key, value) pairs; the keys recur ("app") and are shared ([`intern`]).
type Selector = Box<[(Arc<str>, Box<str>)]>;

/// A virtual address of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrontendIp {
    ip: IpAddr,
    kind: FrontendKind,
    /// Of an external or LoadBalancer IP: the index of the first entry of its list with
    /// this address (for reports).
    index: u16,
}

/// A Service that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidService {
    /// Every virtual address: ClusterIPs, external IPs, LoadBalancer ingress IPs.
    frontend_ips: Box<[FrontendIp]>,
    ports: Box<[ValidPort]>,
    /// `spec.selector`, as (key, value) pairs sorted by key.
    selector: Option<Selector>,
    publish_not_ready: bool,
    /// `externalTrafficPolicy: Local`.
    external_local: bool,
    /// `internalTrafficPolicy: Local`.
    internal_local: bool,
    /// `sessionAffinity: ClientIP`: its `timeoutSeconds`.
    affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges` (or its annotation), of a LoadBalancer Service.
    source_ranges: Box<[ipnet::IpNet]>,
    /// The hints the EndpointSlice controller would give endpoints derived from Pods
    /// (`trafficDistribution`, or the `service.kubernetes.io/topology-mode` annotation).
    hinting: Hinting,
    /// `healthCheckNodePort` (LoadBalancer with `externalTrafficPolicy: Local`).
    health_check_node_port: Option<u16>,
}

impl ValidService {
    /// `internalTrafficPolicy: Local`.
    #[must_use]
    pub const fn internal_local(&self) -> bool {
        self.internal_local
    }

    /// `externalTrafficPolicy: Local`.
    #[must_use]
    pub const fn external_local(&self) -> bool {
        self.external_local
    }

    /// The ClusterIPs (`spec.clusterIPs`), primary first.
    pub(crate) fn cluster_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.frontend_ips
            .iter()
            .filter(|f| f.kind == FrontendKind::ClusterIp)
            .map(|f| f.ip)
    }

    /// The ports: (name, number, protocol), in `spec.ports` order.
    pub(crate) fn port_numbers(&self) -> impl Iterator<Item = (&str, u16, Protocol)> + '_ {
        self.ports.iter().map(|p| (&*p.name, p.port, p.protocol))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ValidPort {
    index: u16,
    name: Arc<str>,
    port: u16,
    protocol: Protocol,
    target: TargetPort,
    /// `nodePort` (NodePort and LoadBalancer Services).
    node_port: Option<u16>,
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

    /// Parses an IP address field, reporting it when it is not one.
    fn ip(&mut self, field: impl Into<String>, text: &str) -> Option<IpAddr> {
        let parsed = text.parse::<IpAddr>().ok();
        if parsed.is_none() {
            self.fail(field, format!("{text:?} is not an IP address"));
        }
        parsed
    }

    /// Hands the problems over; true when there were none.
    fn finish(self, sink: &mut Vec<Problem>) -> bool {
        let ok = self.problems.is_empty();
        sink.extend(self.problems);
        ok
    }
}

/// Validates a Service into the compact form the translation works on.
#[must_use]
pub fn validate_service(sourced: &Sourced<Service>) -> CheckedService {
    let mut out = Findings::default();
    let valid = check_service(sourced, &mut out).map(Arc::new);
    let dns = match valid {
        Some(_) => None,
        None => crate::dns::records::of_service(&sourced.object).map(Arc::new),
    };
    CheckedService {
        origin: Arc::clone(&sourced.origin),
        id: object_ref(&sourced.object.metadata),
        valid,
        problems: out.problems.into_boxed_slice(),
        skipped: out.skipped.into_boxed_slice(),
        stamp: Stamp::of(&sourced.object.metadata),
        dns,
    }
}

fn check_service(sourced: &Sourced<Service>, out: &mut Findings) -> Option<ValidService> {
    let svc = &sourced.object;
    let id = object_ref(&svc.metadata);
    let skip = |out: &mut Findings, reason: &str| {
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
    if label(&svc.metadata, HEADLESS_LABEL).is_some() {
        skip(out, &format!("{HEADLESS_LABEL} label: not proxied"));
        return None;
    }
    let mut check = Checker::new(&sourced.origin, "Service", &svc.metadata);
    let no_spec;
    let spec = match &svc.spec {
        Some(spec) => spec,
        None => {
            no_spec = k8s_openapi::api::core::v1::ServiceSpec::default();
            &no_spec
        }
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        skip(out, "type ExternalName: answered by DNS, not proxied");
        return None;
    }
    let Some(cluster_ips) = cluster_ips(spec, &mut check) else {
        skip(out, "headless (clusterIP: None): no virtual address");
        return None;
    };
    let mut frontend_ips: Vec<FrontendIp> = cluster_ips
        .into_iter()
        .map(|ip| FrontendIp {
            ip,
            kind: FrontendKind::ClusterIp,
            index: 0,
        })
        .collect();
    let mut extra = Vec::new();
    let external_ips = || spec.external_ips.iter().flatten().map(|t| Some(t.as_str()));
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        if let Some(ip) = check.ip(format!("spec.externalIPs[{i}]"), text) {
            let index = first_index(external_ips(), ip);
            extra.push((ip, FrontendKind::ExternalIp, index));
        }
    }
    // Like kube-proxy, program external and LoadBalancer IPs only of a family the Service
    // has a ClusterIP of: the Service has no endpoints of the other family.
    let families: Vec<bool> = frontend_ips.iter().map(|f| f.ip.is_ipv4()).collect();
    let of_service_family = |ip: &IpAddr| families.contains(&ip.is_ipv4());
    if spec.type_.as_deref() == Some("LoadBalancer") {
        let ingresses = || {
            svc.status
                .iter()
                .filter_map(|s| s.load_balancer.as_ref())
                .flat_map(|lb| lb.ingress.iter().flatten())
        };
        for (i, ingress) in ingresses().enumerate() {
            // ipMode Proxy: the load balancer proxies and sends to the nodes, so the
            // address must not be short-circuited on the node (KEP-1860).
            if ingress.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(text) = &ingress.ip
                && let Some(ip) = check.ip(format!("status.loadBalancer.ingress[{i}].ip"), text)
            {
                let index = first_index(ingresses().map(|i| i.ip.as_deref()), ip);
                extra.push((ip, FrontendKind::LoadBalancer, index));
            }
        }
    }
    for (ip, kind, index) in extra {
        if of_service_family(&ip) {
            frontend_ips.push(FrontendIp { ip, kind, index });
        } else {
            skip(
                out,
                &format!("{kind:?} {ip}: the Service has no ClusterIP of that family"),
            );
        }
    }
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut ports = Vec::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        if let Some(mut valid) = validate_service_port(index, port, &mut check, out, &id) {
            if !node_ports {
                // Only NodePort and LoadBalancer Services open node ports (the API server
                // clears the field on the others).
                valid.node_port = None;
            }
            ports.push(valid);
        }
    }
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            check.fail(
                "spec.externalTrafficPolicy",
                format!("{other:?} is not Cluster or Local"),
            );
            false
        }
    };
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            check.fail(
                "spec.internalTrafficPolicy",
                format!("{other:?} is not Cluster or Local"),
            );
            false
        }
    };
    let affinity_timeout = session_affinity(spec, &mut check);
    let source_ranges = source_ranges(&svc.metadata, spec, &mut check);
    let hinting = hinting(&svc.metadata, spec, &mut check);
    let health_check_node_port = match spec.health_check_node_port {
        Some(n) if spec.type_.as_deref() == Some("LoadBalancer") && external_local => {
            let port = port_number(n);
            if port.is_none() {
                check.fail(
                    "spec.healthCheckNodePort",
                    format!("{n} is out of range 1-65535"),
                );
            }
            port
        }
        _ => None,
    };
    if !check.finish(&mut out.problems) {
        return None;
    }
    Some(ValidService {
        frontend_ips: frontend_ips.into_boxed_slice(),
        ports: ports.into_boxed_slice(),
        selector: spec.selector.as_ref().map(|selector| {
            selector
                .iter()
                .map(|(k, v)| (intern(k), Box::from(v.as_str())))
                .collect()
        }),
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        external_local,
        internal_local,
        affinity_timeout,
        source_ranges: source_ranges.into_boxed_slice(),
        hinting,
        health_check_node_port,
    })
}

/// The index of the first entry of a list of addresses with the address `ip`.
fn first_index<'a>(mut texts: impl Iterator<Item = Option<&'a str>>, ip: IpAddr) -> u16 {
    let index = texts.position(|t| t.and_then(|t| t.parse::<IpAddr>().ok()) == Some(ip));
    index
        .and_then(|i| u16::try_from(i).ok())
        .unwrap_or_default()
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The largest timeout the API server accepts (a day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// `sessionAffinity` and its timeout: `Some(seconds)` for `ClientIP`.
fn session_affinity(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    check: &mut Checker<'_>,
) -> Option<u32> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT),
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => Some(t),
                    _ => {
                        check.fail(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT}"),
                        );
                        None
                    }
                },
            }
        }
        Some(other) => {
            check.fail(
                "spec.sessionAffinity",
                format!("{other:?} is not None or ClientIP"),
            );
            None
        }
    }
}

/// The annotation kube-proxy reads when `spec.loadBalancerSourceRanges` is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// `spec.loadBalancerSourceRanges`, or else the annotation's comma list, of a LoadBalancer
/// Service (other types have no load-balancer IP to guard). kube-proxy trims spaces.
fn source_ranges(
    meta: &ObjectMeta,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    check: &mut Checker<'_>,
) -> Vec<ipnet::IpNet> {
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return Vec::new();
    }
    let listed: Vec<(String, &str)> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| (format!("spec.loadBalancerSourceRanges[{i}]"), r.as_str()))
        .collect();
    let texts = if listed.is_empty() {
        let field = format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]");
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
            .map(|list| {
                list.split(',')
                    .filter(|r| !r.trim().is_empty())
                    .map(|r| (field.clone(), r))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        listed
    };
    let mut ranges = Vec::new();
    for (field, text) in texts {
        match text.trim().parse::<ipnet::IpNet>() {
            // kube-proxy matches the network the CIDR names (host bits masked).
            Ok(net) => ranges.push(net.trunc()),
            Err(_) => check.fail(field, format!("{text:?} is not a CIDR")),
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

/// Label that turns on topology-aware hints (`Auto`), before `trafficDistribution`.
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// The deprecated form of [`TOPOLOGY_MODE_ANNOTATION`].
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
/// When the EndpointSlice controller saw the change a slice reflects (RFC 3339): the start
/// of the network programming latency.
pub const LAST_CHANGE_TRIGGER_TIME_ANNOTATION: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";
/// Every annotation the agent reads (the translation, and the metrics'
/// [`LAST_CHANGE_TRIGGER_TIME_ANNOTATION`]): a source may drop all others.
pub const READ_ANNOTATIONS: [&str; 4] = [
    SOURCE_RANGES_ANNOTATION,
    TOPOLOGY_MODE_ANNOTATION,
    TOPOLOGY_HINTS_ANNOTATION,
    LAST_CHANGE_TRIGGER_TIME_ANNOTATION,
];

/// Which hints the EndpointSlice controller puts on a Service's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hinting {
    None,
    /// Each endpoint hinted for its own zone (`PreferClose`, `PreferSameZone`, or the
    /// `topology-mode: Auto` annotation).
    SameZone,
    /// Each endpoint hinted for its own node and zone (`PreferSameNode`).
    SameNode,
}

fn hinting(
    meta: &ObjectMeta,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    check: &mut Checker<'_>,
) -> Hinting {
    // The annotation, when set to anything but Disabled, takes precedence (as in the
    // EndpointSlice controller).
    let annotation = meta.annotations.as_ref().and_then(|a| {
        a.get(TOPOLOGY_MODE_ANNOTATION)
            .or_else(|| a.get(TOPOLOGY_HINTS_ANNOTATION))
    });
    match annotation.map(String::as_str) {
        None | Some("" | "Disabled" | "disabled") => {}
        Some("Auto" | "auto") => return Hinting::SameZone,
        Some(other) => check.fail(
            format!("metadata.annotations[{TOPOLOGY_MODE_ANNOTATION}]"),
            format!("{other:?} is not Auto or Disabled"),
        ),
    }
    match spec.traffic_distribution.as_deref() {
        None => Hinting::None,
        Some("PreferClose" | "PreferSameZone") => Hinting::SameZone,
        Some("PreferSameNode") => Hinting::SameNode,
        Some(other) => {
            check.fail(
                "spec.trafficDistribution",
                format!("{other:?} is not PreferClose, PreferSameZone or PreferSameNode"),
            );
            Hinting::None
        }
    }
}

/// The ClusterIPs of a Service (one per family), `None` when it is headless. Problems go to
/// `check`, which then rejects the Service.
fn cluster_ips(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    check: &mut Checker<'_>,
) -> Option<Vec<IpAddr>> {
    let primary = spec.cluster_ip.as_deref().unwrap_or_default();
    let listed: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if primary == "None" || listed.first() == Some(&"None") {
        return None;
    }
    let (field, texts): (&str, Vec<&str>) = if listed.is_empty() {
        (
            "spec.clusterIP",
            if primary.is_empty() {
                vec![]
            } else {
                vec![primary]
            },
        )
    } else {
        if !primary.is_empty() && listed[0] != primary {
            check.fail(
                "spec.clusterIPs[0]",
                format!("{} differs from spec.clusterIP {primary}", listed[0]),
            );
        }
        ("spec.clusterIPs", listed)
    };
    if texts.is_empty() {
        check.fail(
            "spec.clusterIP",
            "missing: no ClusterIP is allocated without an API server; set one from the service CIDR",
        );
    }
    let mut ips = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let field = if field == "spec.clusterIP" {
            field.to_string()
        } else {
            format!("{field}[{i}]")
        };
        if let Some(ip) = check.ip(field, text) {
            ips.push(ip);
        }
    }
    let families = |ip: &&IpAddr| ip.is_ipv4();
    if ips.len() > 2 || (ips.len() == 2 && families(&&ips[0]) == families(&&ips[1])) {
        check.fail("spec.clusterIPs", "at most one IPv4 and one IPv6 address");
    }
    if spec.ip_family_policy.as_deref() == Some("SingleStack") && ips.len() > 1 {
        check.fail("spec.ipFamilyPolicy", "SingleStack with two clusterIPs");
    }
    for (i, family) in spec.ip_families.iter().flatten().enumerate() {
        let matches = ips
            .get(i)
            .is_none_or(|ip| (family == "IPv4") == ip.is_ipv4());
        if !matches || (family != "IPv4" && family != "IPv6") {
            check.fail(
                format!("spec.ipFamilies[{i}]"),
                format!("{family:?} does not match spec.clusterIPs[{i}]"),
            );
        }
    }
    Some(ips)
}

fn validate_service_port(
    index: usize,
    port: &ServicePort,
    check: &mut Checker<'_>,
    out: &mut Findings,
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
    let node_port = match port.node_port {
        None => None,
        Some(n) => {
            let node_port = port_number(n);
            if node_port.is_none() {
                check.fail(field("nodePort"), format!("{n} is out of range 1-65535"));
            }
            node_port
        }
    };
    Some(ValidPort {
        index: u16::try_from(index).unwrap_or(u16::MAX),
        // Port names recur ("http"): shared, as namespaces are.
        name: intern(port.name.as_deref().unwrap_or_default()),
        port: number?,
        protocol,
        target: target?,
        node_port,
    })
}

/// A Pod that passed validation and may be an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidPod {
    pub(crate) name: String,
    ips: Vec<IpAddr>,
    labels: BTreeMap<String, String>,
    /// The `Ready` condition.
    serving: bool,
    /// Being deleted.
    terminating: bool,
    node_name: Option<Arc<str>>,
    /// Container ports: (name, number, protocol).
    ports: Vec<(String, u16, Protocol)>,
    /// `spec.hostname` and `spec.subdomain`, when both are set (the endpoint's hostname
    /// in the headless Service named by the subdomain).
    host: Option<Box<(Box<str>, Box<str>)>>,
}

impl ValidPod {
    /// Whether its labels match `selector`.
    pub(crate) fn matches(&self, selector: &[(Box<str>, Box<str>)]) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.labels.get(&**k).map(String::as_str) == Some(&**v))
    }

    /// Ready and not terminating: what the EndpointSlice controller calls a ready endpoint.
    pub(crate) const fn is_ready(&self) -> bool {
        self.serving && !self.terminating
    }

    /// The number of the container port `name` of `protocol`.
    pub(crate) fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|(n, _, p)| n == name && *p == protocol)
            .map(|&(_, number, _)| number)
    }

    /// Its hostname as an endpoint of the Service `service` (`spec.hostname` when its
    /// `spec.subdomain` names the Service).
    pub(crate) fn hostname_in(&self, service: &str) -> Option<&str> {
        self.host
            .as_deref()
            .filter(|(_, subdomain)| **subdomain == *service)
            .map(|(hostname, _)| &**hostname)
    }

    pub(crate) fn ips(&self) -> &[IpAddr] {
        &self.ips
    }
}

/// Validates a Pod; `None` when it is no endpoint (finished, no address yet) or invalid.
#[must_use]
pub fn validate_pod(sourced: &Sourced<Pod>) -> (Option<ValidPod>, Vec<Problem>) {
    let mut problems = Vec::new();
    {
        let pod = &sourced.object;
        let mut check = Checker::new(&sourced.origin, "Pod", &pod.metadata);
        let status = pod.status.clone().unwrap_or_default();
        // Finished pods are no endpoints (the EndpointSlice controller drops them).
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return (None, problems);
        }
        let mut ips = Vec::new();
        let listed: Vec<(String, &str)> = status
            .pod_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, ip)| (format!("status.podIPs[{i}].ip"), ip.ip.as_str()))
            .collect();
        let texts = if listed.is_empty() {
            status
                .pod_ip
                .iter()
                .map(|ip| ("status.podIP".to_string(), ip.as_str()))
                .collect()
        } else {
            listed
        };
        for (field, text) in texts {
            if let Some(ip) = check.ip(field.clone(), text) {
                match special_ip(ip) {
                    None => ips.push(ip),
                    // As the API server refuses it in an EndpointSlice: this address is
                    // no endpoint (the Pod's others still are).
                    Some(reason) => problems.push(Problem {
                        origin: sourced.origin.to_string(),
                        object: check.object.clone(),
                        field,
                        message: format!("{text:?} {reason}; not used as an endpoint"),
                    }),
                }
            }
        }
        let mut ports = Vec::new();
        // Named ports of the containers, and of the restartable init containers (sidecars,
        // `restartPolicy: Always`), which the EndpointSlice controller resolves too.
        let containers = pod.spec.iter().flat_map(|s| {
            let main = s
                .containers
                .iter()
                .enumerate()
                .map(|(c, k)| ("containers", c, k));
            let sidecars = s
                .init_containers
                .iter()
                .flatten()
                .enumerate()
                .filter(|(_, k)| k.restart_policy.as_deref() == Some("Always"))
                .map(|(c, k)| ("initContainers", c, k));
            main.chain(sidecars)
        });
        for (list, c, container) in containers {
            for (p, port) in container.ports.iter().flatten().enumerate() {
                let field = format!("spec.{list}[{c}].ports[{p}]");
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
        let serving = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        // A pod that has no address yet (Pending) is simply no endpoint.
        if check.finish(&mut problems) && !ips.is_empty() {
            let valid = ValidPod {
                name: pod.metadata.name.clone().unwrap_or_default(),
                ips,
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                serving,
                terminating: pod.metadata.deletion_timestamp.is_some(),
                node_name: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .map(intern),
                ports,
                host: pod.spec.as_ref().and_then(|s| {
                    Some(Box::new((
                        Box::from(s.hostname.as_deref()?),
                        Box::from(s.subdomain.as_deref()?),
                    )))
                }),
            };
            return (Some(valid), problems);
        }
    }
    (None, problems)
}

/// An EndpointSlice that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSlice {
    endpoints: Box<[ValidEndpoint]>,
    /// The slice's name, `nodeName` and `zone` of its endpoints: one shared value for all
    /// endpoints of the slice on the same node.
    infos: Box<[Arc<EndpointInfo>]>,
    /// (name, number, protocol); ports without a number are left out. The names are
    /// interned: every slice of a Service repeats them.
    ports: Box<[(Arc<str>, u16, Protocol)]>,
    /// A headless Service's slice (`service.kubernetes.io/headless`): only DNS reads it.
    pub(crate) headless: bool,
    /// What few slices' endpoints have (`None`: nothing).
    rare: Option<Box<SliceRare>>,
}

/// The parts of a slice's endpoints that most slices lack, kept apart so that an endpoint
/// costs 20 bytes and a slice without them 16 fewer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SliceRare {
    /// The endpoints' `hostname`s, by index in `endpoints`, ascending.
    hostnames: Box<[(u32, Box<str>)]>,
    /// The endpoints' topology hints, by index in `endpoints`, ascending.
    hints: Box<[(u32, Hints)]>,
}

impl ValidSlice {
    /// The slice's ports: (name, number, protocol).
    pub(crate) fn ports(&self) -> &[(Arc<str>, u16, Protocol)] {
        &self.ports
    }

    /// The endpoints' hostnames, by index (ascending).
    fn hostnames(&self) -> &[(u32, Box<str>)] {
        self.rare.as_ref().map_or(&[], |r| &r.hostnames)
    }

    /// The endpoints' topology hints, by index (ascending).
    fn hints(&self) -> &[(u32, Hints)] {
        self.rare.as_ref().map_or(&[], |r| &r.hints)
    }

    /// Each endpoint with an address: (address, ready, hostname).
    pub(crate) fn dns_endpoints(&self) -> impl Iterator<Item = (IpAddr, bool, Option<&str>)> {
        self.endpoints.iter().enumerate().filter_map(|(i, e)| {
            let hostname = by_index(self.hostnames(), i).map(|h| &**h);
            Some((e.address?, e.conditions.ready(), hostname))
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ValidEndpoint {
    /// The first address (the only one the proxy uses); `None` when it is invalid.
    address: Option<IpAddr>,
    conditions: Conditions,
    /// Its entry in the slice's `infos`.
    info: u16,
}

/// An endpoint's `ready`, `serving` and `terminating` conditions, one bit each: with a
/// 16-bit info index, an endpoint takes 20 bytes (a million of them at 100,000 × 10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Conditions(u8);

impl Conditions {
    const READY: u8 = 1;
    const SERVING: u8 = 2;
    const TERMINATING: u8 = 4;

    fn new(ready: bool, serving: bool, terminating: bool) -> Self {
        let bit = |set: bool, bit: u8| if set { bit } else { 0 };
        Self(
            bit(ready, Self::READY)
                | bit(serving, Self::SERVING)
                | bit(terminating, Self::TERMINATING),
        )
    }

    const fn ready(self) -> bool {
        self.0 & Self::READY != 0
    }

    const fn serving(self) -> bool {
        self.0 & Self::SERVING != 0
    }

    const fn terminating(self) -> bool {
        self.0 & Self::TERMINATING != 0
    }
}

/// The distinct (slice, node, zone) infos of a slice's endpoints, each endpoint naming
/// its own by a 16-bit index. Found by a scan while there are few (most slices: one node
/// or a handful), through an index beyond that, so a slice of 1,000 endpoints on as many
/// nodes is not quadratic.
#[derive(Default)]
struct SliceInfos {
    list: Vec<Arc<EndpointInfo>>,
    /// (node, zone) → index, built once the list outgrows [`Self::SCAN`].
    index: Option<crate::fast_hash::HashMap<NodeZone, u16>>,
}

/// An endpoint's `nodeName` and `zone`, interned.
type NodeZone = (Option<Arc<str>>, Option<Arc<str>>);

impl SliceInfos {
    /// Up to this many infos are found by a scan.
    const SCAN: usize = 16;

    /// The index of `info` (of this slice), added when new; `None` when 65,536 are taken.
    fn index_of(&mut self, info: EndpointInfo) -> Option<u16> {
        // Built only with the index (most slices never have one).
        let key = |info: &EndpointInfo| (info.node_name.clone(), info.zone.clone());
        let found = match &self.index {
            Some(index) => index.get(&key(&info)).copied(),
            None => self
                .list
                .iter()
                .position(|i| **i == info)
                .and_then(|at| u16::try_from(at).ok()),
        };
        if found.is_some() {
            return found;
        }
        let at = u16::try_from(self.list.len()).ok()?;
        if let Some(index) = &mut self.index {
            index.insert(key(&info), at);
        }
        self.list.push(Arc::new(info));
        if self.index.is_none() && self.list.len() > Self::SCAN {
            let index = self.list.iter().map(|i| key(i)).zip(0..).collect();
            self.index = Some(index);
        }
        Some(at)
    }
}

/// The entry for the endpoint at `index` of a list sorted by index.
fn by_index<T>(list: &[(u32, T)], index: usize) -> Option<&T> {
    let index = u32::try_from(index).ok()?;
    list.binary_search_by_key(&index, |(at, _)| *at)
        .ok()
        .map(|found| &list[found].1)
}

/// Validates an EndpointSlice (`id`, shared with its endpoints); returns the
/// Service it belongs to with it, `None` when it has no `kubernetes.io/service-name` label
/// or is invalid.
#[must_use]
pub fn validate_slice(
    sourced: &Sourced<EndpointSlice>,
    id: &ObjectRef,
) -> (Option<(ObjectRef, ValidSlice)>, Vec<Problem>) {
    let mut problems = Vec::new();
    {
        let slice = &sourced.object;
        let Some(service) = label(&slice.metadata, SERVICE_NAME_LABEL) else {
            return (None, problems);
        };
        // A headless Service's slice is not the proxy's (kube-proxy never sees one); it is
        // kept for DNS only.
        let headless = label(&slice.metadata, HEADLESS_LABEL).is_some();
        let service = ObjectRef::new(
            slice
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE),
            service,
        );
        let mut check = Checker::new(&sourced.origin, "EndpointSlice", &slice.metadata);
        let mut valid = ValidSlice {
            endpoints: Box::default(),
            infos: Box::default(),
            ports: Box::default(),
            headless,
            rare: None,
        };
        let mut endpoints = Vec::new();
        let mut ports = Vec::new();
        let mut hostnames = Vec::new();
        let mut hints_of = Vec::new();
        let mut infos = SliceInfos::default();
        // Endpoints dropped alone (reported, the slice still valid).
        let mut dropped = Vec::new();
        let want_v4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            "FQDN" => {
                // kube-proxy ignores FQDN slices altogether (it cannot resolve them): the
                // Service does not even count as one with slices.
                check.fail(
                    "addressType",
                    "FQDN slices are not proxied (as kube-proxy, which ignores them); skipped",
                );
                check.finish(&mut problems);
                return (None, problems);
            }
            other => {
                check.fail(
                    "addressType",
                    format!("{other:?} is not IPv4, IPv6 or FQDN"),
                );
                true
            }
        };
        endpoints.reserve_exact(slice.endpoints.as_ref().map_or(0, Vec::len));
        for (e, endpoint) in slice.endpoints.iter().flatten().enumerate() {
            let mut address = None;
            // Only the first address is the endpoint's, as kube-proxy reads it (the API
            // says the others are fungible and consumers use the first); the rest are
            // ignored, not even validated. An endpoint whose address is unusable is
            // dropped alone, and reported: the rest of the slice stays in effect.
            if let Some(text) = endpoint.addresses.first() {
                let field = format!("endpoints[{e}].addresses[0]");
                let refused = match text.parse::<IpAddr>() {
                    Ok(ip) if ip.is_ipv4() == want_v4 => match special_ip(ip) {
                        None => {
                            address = Some(ip);
                            None
                        }
                        Some(reason) => Some(format!("{text:?} {reason}")),
                    },
                    _ => Some(format!("{text:?} is not an {} address", slice.address_type)),
                };
                if let Some(message) = refused {
                    dropped.push(Problem {
                        origin: sourced.origin.to_string(),
                        object: check.object.clone(),
                        field,
                        message: format!("{message}; this endpoint is dropped, the others stay"),
                    });
                    continue;
                }
            }
            // Unknown readiness is to be read as ready; unknown serving as the readiness
            // (EndpointConditions API documentation).
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            let ready = conditions.ready.unwrap_or(true);
            let info = EndpointInfo {
                source: EndpointSource::Slice(id.clone()),
                node_name: endpoint.node_name.as_deref().map(intern),
                zone: endpoint.zone.as_deref().map(intern),
            };
            let Some(info) = infos.index_of(info) else {
                dropped.push(Problem {
                    origin: sourced.origin.to_string(),
                    object: check.object.clone(),
                    field: format!("endpoints[{e}].nodeName"),
                    message: "more than 65,536 distinct nodes and zones in one slice; \
                              this endpoint is dropped, the others stay"
                        .to_owned(),
                });
                continue;
            };
            let hints = Hints {
                zones: endpoint
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|z| z.name.clone())
                    .collect(),
                nodes: endpoint
                    .hints
                    .iter()
                    .flat_map(|h| h.for_nodes.iter().flatten())
                    .map(|n| n.name.clone())
                    .collect(),
            };
            let at = u32::try_from(endpoints.len()).unwrap_or(u32::MAX);
            if let Some(hostname) = endpoint.hostname.as_deref().filter(|h| !h.is_empty()) {
                hostnames.push((at, Box::from(hostname)));
            }
            if hints != Hints::default() {
                hints_of.push((at, hints));
            }
            endpoints.push(ValidEndpoint {
                address,
                conditions: Conditions::new(
                    ready,
                    conditions.serving.unwrap_or(ready),
                    conditions.terminating.unwrap_or(false),
                ),
                info,
            });
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
            ports.push((
                intern(port.name.as_deref().unwrap_or_default()),
                number,
                protocol,
            ));
        }
        valid.infos = infos.list.into_boxed_slice();
        valid.endpoints = endpoints.into_boxed_slice();
        valid.ports = ports.into_boxed_slice();
        valid.rare = (!hostnames.is_empty() || !hints_of.is_empty()).then(|| {
            Box::new(SliceRare {
                hostnames: hostnames.into_boxed_slice(),
                hints: hints_of.into_boxed_slice(),
            })
        });
        if check.finish(&mut problems) {
            problems.extend(dropped);
            return (Some((service, valid)), problems);
        }
    }
    (None, problems)
}

/// The endpoints of the slices on the slice port with the Service port's name and
/// protocol: one Service port may map to different numbers in different slices.
fn candidates_from_slices(port: &ValidPort, slices: &[&ValidSlice]) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    for slice in slices {
        let Some(&(_, number, _)) = slice
            .ports
            .iter()
            .find(|(name, _, protocol)| **name == *port.name && *protocol == port.protocol)
        else {
            continue;
        };
        for (i, endpoint) in slice.endpoints.iter().enumerate() {
            if let Some(ip) = endpoint.address {
                candidates.push(Candidate {
                    addr: L4Addr::new(ip, number, port.protocol),
                    ready: endpoint.conditions.ready(),
                    serving: endpoint.conditions.serving(),
                    terminating: endpoint.conditions.terminating(),
                    info: Arc::clone(&slice.infos[usize::from(endpoint.info)]),
                    hints: by_index(slice.hints(), i).cloned().unwrap_or_default(),
                });
            }
        }
    }
    candidates
}

/// What the EndpointSlice controller would publish: the pods of the Service's own
/// namespace that its selector matches, on the resolved target port, with its conditions.
fn candidates_from_pods(
    namespace: &str,
    service: &ValidService,
    port: &ValidPort,
    pods: &[&ValidPod],
    node: NodeTopology<'_>,
) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    // A Service without a selector gets no endpoints from pods (they are managed by hand).
    let Some(selector) = service.selector.as_ref().filter(|s| !s.is_empty()) else {
        return candidates;
    };
    for pod in pods {
        if !selector
            .iter()
            .all(|(k, v)| pod.labels.get(&**k).map(String::as_str) == Some(&**v))
        {
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
        let Some(number) = number else { continue };
        // The zone of a pod's node is known for this node only (its Node object).
        let zone = node
            .name
            .filter(|n| pod.node_name.as_deref() == Some(*n))
            .and(node.zone);
        for &ip in &pod.ips {
            candidates.push(Candidate {
                addr: L4Addr::new(ip, number, port.protocol),
                // The controller never calls a terminating pod ready, unless the Service
                // publishes not-ready addresses.
                ready: service.publish_not_ready || (pod.serving && !pod.terminating),
                serving: pod.serving,
                terminating: pod.terminating,
                info: Arc::new(EndpointInfo {
                    source: EndpointSource::Pod(ObjectRef::new(namespace, &pod.name)),
                    node_name: pod.node_name.clone(),
                    zone: zone.map(intern),
                }),
                hints: pod_hints(service.hinting, pod.node_name.as_deref(), zone),
            });
        }
    }
    candidates
}

/// The hints the EndpointSlice controller gives an endpoint on `node` in `zone`. Without a
/// known zone there is no zone hint, and kube-proxy's rules then ignore zone hints for the
/// whole Service.
fn pod_hints(hinting: Hinting, node: Option<&str>, zone: Option<&str>) -> Hints {
    let one = |v: Option<&str>| v.map(str::to_string).into_iter().collect();
    match hinting {
        Hinting::None => Hints::default(),
        Hinting::SameZone => Hints {
            zones: one(zone),
            nodes: Default::default(),
        },
        Hinting::SameNode => Hints {
            zones: one(zone),
            nodes: one(node),
        },
    }
}

/// Why `ip` can be no backend, as the API server's `ValidateNonSpecialIP` refuses it in an
/// EndpointSlice (unspecified, loopback, link-local), and any multicast address (no
/// connection can be made to one). An IPv4-mapped IPv6 address is judged as its IPv4.
#[must_use]
pub fn special_ip(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    let reason = match ip {
        _ if ip.is_unspecified() => "may not be unspecified (0.0.0.0, ::)",
        _ if ip.is_loopback() => "may not be in the loopback range (127.0.0.0/8, ::1/128)",
        IpAddr::V4(v4) if v4.is_link_local() => {
            "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
        }
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
        }
        _ if ip.is_multicast() => "may not be multicast (224.0.0.0/4, ff00::/8)",
        _ => return None,
    };
    Some(reason)
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

fn object_ref(meta: &ObjectMeta) -> ObjectRef {
    ObjectRef::of(meta)
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

#[cfg(test)]
mod tests;
