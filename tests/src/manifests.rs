//! The manifests directory the agent watches, and builders for the objects in it.
//!
//! The builders fill `k8s-openapi` types and serialise them as YAML (with `serde-saphyr`), so the
//! files look like what `kubectl get -o yaml` prints.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Container, ContainerPort, LoadBalancerIngress, LoadBalancerStatus, Pod,
    PodCondition, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec, ServiceStatus,
    SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::names;

/// A directory of manifests under `/tmp/lbt<pid>-<n>/manifests`, removed on drop.
///
/// Writes are atomic (written beside the directory, then renamed into it), so the agent never
/// reads half a file.
#[derive(Debug)]
pub struct Manifests {
    base: PathBuf,
    dir: PathBuf,
    staging: PathBuf,
}

impl Manifests {
    #[track_caller]
    pub fn new() -> Self {
        let base = std::env::temp_dir().join(names::unique());
        let dir = base.join("manifests");
        let staging = base.join("staging");
        for d in [&dir, &staging] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        Self { base, dir, staging }
    }

    /// The directory to hand to `lb-agent run --manifests`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A directory for the test's other files (logs), removed with the manifests.
    pub fn work_dir(&self) -> &Path {
        &self.base
    }

    /// Creates or replaces `file` in the manifests directory.
    #[track_caller]
    pub fn write(&self, file: &str, yaml: &str) {
        let staged = self.staging.join(file);
        fs::write(&staged, yaml).unwrap_or_else(|e| panic!("write {}: {e}", staged.display()));
        let target = self.dir.join(file);
        fs::rename(&staged, &target)
            .unwrap_or_else(|e| panic!("rename to {}: {e}", target.display()));
    }

    /// Removes `file` from the manifests directory.
    #[track_caller]
    pub fn remove(&self, file: &str) {
        let target = self.dir.join(file);
        fs::remove_file(&target).unwrap_or_else(|e| panic!("rm {}: {e}", target.display()));
    }
}

impl Default for Manifests {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.base) {
            eprintln!("lb-tests: cleanup: rm -r {}: {err}", self.base.display());
        }
    }
}

/// YAML of any Kubernetes object (or anything serialisable).
#[track_caller]
pub fn to_yaml<T: Serialize>(object: &T) -> String {
    serde_saphyr::to_string(object).unwrap_or_else(|e| panic!("serialising to YAML: {e}"))
}

/// Several objects in one file, separated by `---`.
pub fn documents(yamls: &[String]) -> String {
    yamls.join("---\n")
}

fn meta(name: &str, namespace: &str, labels: &BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: (!labels.is_empty()).then(|| labels.clone()),
        ..ObjectMeta::default()
    }
}

/// A `targetPort`: a number or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(i32),
    Name(String),
}

impl From<i32> for TargetPort {
    fn from(port: i32) -> Self {
        Self::Number(port)
    }
}

impl From<&str> for TargetPort {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

impl From<TargetPort> for IntOrString {
    fn from(target: TargetPort) -> Self {
        match target {
            TargetPort::Number(n) => IntOrString::Int(n),
            TargetPort::Name(s) => IntOrString::String(s),
        }
    }
}

/// Builds a v1 Service, by default of type ClusterIP: `service("webapp", "10.96.0.10")
/// .selector("app", "webapp").port(80, 8080)`.
///
/// `ipFamilies` and `ipFamilyPolicy` are filled in from the ClusterIPs as the API server would
/// (`SingleStack` for one address, `RequireDualStack` for two) unless set explicitly.
#[derive(Debug, Clone)]
pub struct ServiceBuilder {
    name: String,
    namespace: String,
    type_: String,
    cluster_ips: Vec<String>,
    ip_families: Option<Vec<String>>,
    ip_family_policy: Option<String>,
    ports: Vec<ServicePort>,
    selector: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    external_ips: Vec<String>,
    external_name: Option<String>,
    ingress: Vec<LoadBalancerIngress>,
    external_traffic_policy: Option<String>,
    internal_traffic_policy: Option<String>,
    health_check_node_port: Option<i32>,
    session_affinity: Option<String>,
    affinity_timeout: Option<i32>,
    traffic_distribution: Option<String>,
}

/// A Service named `name` in namespace `default` with this `spec.clusterIP` (`"None"`: headless).
pub fn service(name: &str, cluster_ip: &str) -> ServiceBuilder {
    ServiceBuilder {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        type_: "ClusterIP".to_owned(),
        cluster_ips: vec![cluster_ip.to_owned()],
        ip_families: None,
        ip_family_policy: None,
        ports: Vec::new(),
        selector: BTreeMap::new(),
        labels: BTreeMap::new(),
        external_ips: Vec::new(),
        external_name: None,
        ingress: Vec::new(),
        external_traffic_policy: None,
        internal_traffic_policy: None,
        health_check_node_port: None,
        session_affinity: None,
        affinity_timeout: None,
        traffic_distribution: None,
    }
}

impl ServiceBuilder {
    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    pub fn selector(mut self, key: &str, value: &str) -> Self {
        self.selector.insert(key.to_owned(), value.to_owned());
        self
    }

    /// A label on the Service itself (`metadata.labels`).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// `spec.clusterIPs` (and `spec.clusterIP`, the first): one address, or one per family.
    pub fn cluster_ips(mut self, ips: &[&str]) -> Self {
        self.cluster_ips = ips.iter().map(|ip| (*ip).to_owned()).collect();
        self
    }

    /// `spec.ipFamilies` as given (instead of the one derived from the ClusterIPs).
    pub fn ip_families(mut self, families: &[&str]) -> Self {
        self.ip_families = Some(families.iter().map(|f| (*f).to_owned()).collect());
        self
    }

    /// `spec.ipFamilyPolicy`: `SingleStack`, `PreferDualStack` or `RequireDualStack`.
    pub fn ip_family_policy(mut self, policy: &str) -> Self {
        self.ip_family_policy = Some(policy.to_owned());
        self
    }

    /// `spec.type`.
    pub fn type_(mut self, type_: &str) -> Self {
        type_.clone_into(&mut self.type_);
        self
    }

    /// Type ExternalName with this `spec.externalName` (the ClusterIP given to [`service`] stays,
    /// as in a manifest that was changed from type ClusterIP by hand).
    pub fn external_name(mut self, name: &str) -> Self {
        self.type_ = "ExternalName".to_owned();
        self.external_name = Some(name.to_owned());
        self
    }

    /// An entry of `spec.externalIPs`.
    pub fn external_ip(mut self, ip: &str) -> Self {
        self.external_ips.push(ip.to_owned());
        self
    }

    /// Type LoadBalancer with this `status.loadBalancer.ingress[].ip` (and `ipMode`, `VIP` or
    /// `Proxy`, when given).
    pub fn load_balancer_ingress(mut self, ip: &str, ip_mode: Option<&str>) -> Self {
        self.type_ = "LoadBalancer".to_owned();
        self.ingress.push(LoadBalancerIngress {
            ip: Some(ip.to_owned()),
            ip_mode: ip_mode.map(str::to_owned),
            ..LoadBalancerIngress::default()
        });
        self
    }

    /// A port with a `nodePort` (for NodePort and LoadBalancer Services).
    pub fn node_port(
        mut self,
        port: i32,
        target: impl Into<TargetPort>,
        node_port: i32,
        protocol: &str,
    ) -> Self {
        self.ports.push(ServicePort {
            port,
            target_port: Some(target.into().into()),
            node_port: Some(node_port),
            protocol: Some(protocol.to_owned()),
            ..ServicePort::default()
        });
        self
    }

    /// `spec.externalTrafficPolicy`.
    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.external_traffic_policy = Some(policy.to_owned());
        self
    }

    /// `spec.internalTrafficPolicy`.
    pub fn internal_traffic_policy(mut self, policy: &str) -> Self {
        self.internal_traffic_policy = Some(policy.to_owned());
        self
    }

    /// `spec.sessionAffinity: ClientIP`, with `timeoutSeconds` when given.
    pub fn session_affinity(mut self, timeout_seconds: Option<i32>) -> Self {
        self.session_affinity = Some("ClientIP".to_owned());
        self.affinity_timeout = timeout_seconds;
        self
    }

    /// `spec.trafficDistribution`.
    pub fn traffic_distribution(mut self, distribution: &str) -> Self {
        self.traffic_distribution = Some(distribution.to_owned());
        self
    }

    /// `spec.healthCheckNodePort`.
    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    /// An unnamed TCP port.
    pub fn port(self, port: i32, target: impl Into<TargetPort>) -> Self {
        self.port_full(None, port, target, "TCP")
    }

    /// A port with every field chosen.
    pub fn port_full(
        mut self,
        name: Option<&str>,
        port: i32,
        target: impl Into<TargetPort>,
        protocol: &str,
    ) -> Self {
        self.ports.push(ServicePort {
            name: name.map(str::to_owned),
            port,
            target_port: Some(target.into().into()),
            protocol: Some(protocol.to_owned()),
            ..ServicePort::default()
        });
        self
    }

    pub fn build(&self) -> Service {
        let families: Vec<String> = self
            .cluster_ips
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" }.to_owned())
            .collect();
        let ip_families = self
            .ip_families
            .clone()
            .or_else(|| (!families.is_empty()).then(|| families.clone()));
        let ip_family_policy = self.ip_family_policy.clone().or_else(|| {
            let policy = if families.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            };
            (!families.is_empty()).then(|| policy.to_owned())
        });
        let status = (!self.ingress.is_empty()).then(|| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(self.ingress.clone()),
            }),
            ..ServiceStatus::default()
        });
        Service {
            metadata: meta(&self.name, &self.namespace, &self.labels),
            spec: Some(ServiceSpec {
                type_: Some(self.type_.clone()),
                cluster_ip: self.cluster_ips.first().cloned(),
                cluster_ips: (!self.cluster_ips.is_empty()).then(|| self.cluster_ips.clone()),
                ip_families,
                ip_family_policy,
                ports: Some(self.ports.clone()),
                selector: (!self.selector.is_empty()).then(|| self.selector.clone()),
                external_ips: (!self.external_ips.is_empty()).then(|| self.external_ips.clone()),
                external_name: self.external_name.clone(),
                external_traffic_policy: self.external_traffic_policy.clone(),
                health_check_node_port: self.health_check_node_port,
                internal_traffic_policy: self.internal_traffic_policy.clone(),
                session_affinity: self.session_affinity.clone(),
                session_affinity_config: self.affinity_timeout.map(|t| SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(t),
                    }),
                }),
                traffic_distribution: self.traffic_distribution.clone(),
                ..ServiceSpec::default()
            }),
            status,
        }
    }

    pub fn yaml(&self) -> String {
        to_yaml(&self.build())
    }
}

/// Builds a v1 Pod as the API server would report it once running:
/// `pod("webapp1", ip).label("app", "webapp").container_port("http", 8080)`.
#[derive(Debug, Clone)]
pub struct PodBuilder {
    name: String,
    namespace: String,
    ips: Vec<IpAddr>,
    labels: BTreeMap<String, String>,
    ready: bool,
    terminating: bool,
    node_name: Option<String>,
    ports: Vec<ContainerPort>,
}

/// A ready Pod named `name` in namespace `default` with `status.podIP` `ip`.
pub fn pod(name: &str, ip: impl Into<IpAddr>) -> PodBuilder {
    PodBuilder {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        ips: vec![ip.into()],
        labels: BTreeMap::new(),
        ready: true,
        terminating: false,
        node_name: None,
        ports: Vec::new(),
    }
}

impl PodBuilder {
    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Another address in `status.podIPs` (the other family of a dual-stack pod).
    pub fn also_ip(mut self, ip: impl Into<IpAddr>) -> Self {
        self.ips.push(ip.into());
        self
    }

    /// The `Ready` condition.
    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }

    /// Being deleted: `metadata.deletionTimestamp` set (still `Running`, its `Ready` condition as
    /// set with [`PodBuilder::ready`]).
    pub fn terminating(mut self) -> Self {
        self.terminating = true;
        self
    }

    /// `spec.nodeName`.
    pub fn node_name(mut self, node: &str) -> Self {
        self.node_name = Some(node.to_owned());
        self
    }

    /// A named TCP container port.
    pub fn container_port(self, name: &str, port: i32) -> Self {
        self.container_port_full(name, port, "TCP")
    }

    /// A named container port of any protocol.
    pub fn container_port_full(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.ports.push(ContainerPort {
            name: Some(name.to_owned()),
            container_port: port,
            protocol: Some(protocol.to_owned()),
            ..ContainerPort::default()
        });
        self
    }

    pub fn build(&self) -> Pod {
        let ready = if self.ready { "True" } else { "False" };
        let mut metadata = meta(&self.name, &self.namespace, &self.labels);
        if self.terminating {
            metadata.deletion_timestamp = Some(Time(DELETION_TIME));
            metadata.deletion_grace_period_seconds = Some(30);
        }
        Pod {
            metadata,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".to_owned(),
                    image: Some("lb-testkit".to_owned()),
                    ports: (!self.ports.is_empty()).then(|| self.ports.clone()),
                    ..Container::default()
                }],
                node_name: self.node_name.clone(),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".to_owned()),
                pod_ip: self.ips.first().map(ToString::to_string),
                pod_ips: Some(
                    self.ips
                        .iter()
                        .map(|ip| PodIP { ip: ip.to_string() })
                        .collect(),
                ),
                conditions: Some(
                    ["Ready", "ContainersReady"]
                        .into_iter()
                        .map(|type_| PodCondition {
                            type_: type_.to_owned(),
                            status: ready.to_owned(),
                            ..PodCondition::default()
                        })
                        .collect(),
                ),
                ..PodStatus::default()
            }),
        }
    }

    pub fn yaml(&self) -> String {
        to_yaml(&self.build())
    }
}

/// The `deletionTimestamp` of terminating pods (any time will do).
const DELETION_TIME: Timestamp = Timestamp::constant(1_767_225_600, 0);

/// The `conditions` of an EndpointSlice endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Conditions {
    /// Ready (and serving).
    pub const READY: Self = Self {
        ready: true,
        serving: true,
        terminating: false,
    };
    /// Still serving while being deleted: `ready: false, serving: true, terminating: true`.
    pub const TERMINATING: Self = Self {
        ready: false,
        serving: true,
        terminating: true,
    };
    /// Being deleted and no longer serving.
    pub const TERMINATED: Self = Self {
        ready: false,
        serving: false,
        terminating: true,
    };
    /// Not ready (failing its readiness probe), not terminating.
    pub const NOT_READY: Self = Self {
        ready: false,
        serving: false,
        terminating: false,
    };
}

/// Builds a discovery.k8s.io/v1 EndpointSlice for a Service:
/// `endpoint_slice("webapp-abc", "webapp").endpoint(ip, true).port(None, 8080, "TCP")`.
///
/// `addressType` is IPv6 when the first endpoint's address is, IPv4 otherwise, unless set with
/// [`EndpointSliceBuilder::address_type`].
#[derive(Debug, Clone)]
pub struct EndpointSliceBuilder {
    name: String,
    namespace: String,
    service: String,
    address_type: Option<String>,
    endpoints: Vec<Endpoint>,
    ports: Vec<EndpointPort>,
}

/// A slice named `name` in namespace `default`, labelled `kubernetes.io/service-name: service`.
pub fn endpoint_slice(name: &str, service: &str) -> EndpointSliceBuilder {
    EndpointSliceBuilder {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        service: service.to_owned(),
        address_type: None,
        endpoints: Vec::new(),
        ports: Vec::new(),
    }
}

impl EndpointSliceBuilder {
    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    /// `addressType`: `IPv4`, `IPv6` or `FQDN`.
    pub fn address_type(mut self, address_type: &str) -> Self {
        self.address_type = Some(address_type.to_owned());
        self
    }

    /// One endpoint with one address and only `conditions.ready` set.
    pub fn endpoint(mut self, address: impl Into<IpAddr>, ready: bool) -> Self {
        self.endpoints.push(Endpoint {
            addresses: vec![address.into().to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                ..EndpointConditions::default()
            }),
            ..Endpoint::default()
        });
        self
    }

    /// One endpoint with one address, all three conditions, and optionally `nodeName` and `zone`.
    pub fn endpoint_full(
        mut self,
        address: impl Into<IpAddr>,
        conditions: Conditions,
        node_name: Option<&str>,
        zone: Option<&str>,
    ) -> Self {
        self.endpoints.push(Endpoint {
            addresses: vec![address.into().to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(conditions.ready),
                serving: Some(conditions.serving),
                terminating: Some(conditions.terminating),
            }),
            node_name: node_name.map(str::to_owned),
            zone: zone.map(str::to_owned),
            ..Endpoint::default()
        });
        self
    }

    /// [`Self::endpoint_full`] with a zone hint (`hints.forZones`) instead of a zone.
    pub fn endpoint_hinted(
        mut self,
        address: impl Into<IpAddr>,
        conditions: Conditions,
        node_name: Option<&str>,
        zone_hint: Option<&str>,
    ) -> Self {
        self = self.endpoint_full(address, conditions, node_name, None);
        if let (Some(zone), Some(endpoint)) = (zone_hint, self.endpoints.last_mut()) {
            endpoint.hints = Some(EndpointHints {
                for_zones: Some(vec![ForZone {
                    name: zone.to_owned(),
                }]),
                for_nodes: None,
            });
        }
        self
    }

    /// A port; `name` must match the Service port's name (`None` for an unnamed one).
    pub fn port(mut self, name: Option<&str>, port: i32, protocol: &str) -> Self {
        self.ports.push(EndpointPort {
            name: name.map(str::to_owned),
            port: Some(port),
            protocol: Some(protocol.to_owned()),
            ..EndpointPort::default()
        });
        self
    }

    pub fn build(&self) -> EndpointSlice {
        let labels = BTreeMap::from([(
            "kubernetes.io/service-name".to_owned(),
            self.service.clone(),
        )]);
        let first_is_v6 = self
            .endpoints
            .first()
            .and_then(|e| e.addresses.first())
            .and_then(|a| a.parse::<IpAddr>().ok())
            .is_some_and(|ip| ip.is_ipv6());
        let address_type = self
            .address_type
            .clone()
            .unwrap_or_else(|| if first_is_v6 { "IPv6" } else { "IPv4" }.to_owned());
        EndpointSlice {
            metadata: meta(&self.name, &self.namespace, &labels),
            address_type,
            endpoints: Some(self.endpoints.clone()),
            ports: Some(self.ports.clone()),
        }
    }

    pub fn yaml(&self) -> String {
        to_yaml(&self.build())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn service_yaml() {
        let yaml = service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .port_full(Some("web"), 81, "http", "TCP")
            .yaml();
        assert!(yaml.contains("apiVersion: v1"), "{yaml}");
        assert!(yaml.contains("kind: Service"), "{yaml}");
        assert!(yaml.contains("clusterIP: \"10.96.0.10\""), "{yaml}");
        assert!(yaml.contains("targetPort: 8080"), "{yaml}");
        assert!(yaml.contains("targetPort: http"), "{yaml}");
        let back: Service = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(
            back,
            service("webapp", "10.96.0.10")
                .selector("app", "webapp")
                .port(80, 8080)
                .port_full(Some("web"), 81, "http", "TCP")
                .build()
        );
    }

    #[test]
    fn pod_yaml_round_trips() {
        let builder = pod("webapp1", Ipv4Addr::new(10, 244, 0, 2))
            .label("app", "webapp")
            .container_port("http", 8080);
        let yaml = builder.yaml();
        assert!(yaml.contains("podIP: \"10.244.0.2\""), "{yaml}");
        let back: Pod = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, builder.build());
        let status = back.status.unwrap();
        assert_eq!(status.conditions.unwrap()[0].status, "True");
    }

    #[test]
    fn endpoint_slice_yaml_round_trips() {
        let builder = endpoint_slice("webapp-1", "webapp")
            .endpoint(Ipv4Addr::new(10, 244, 0, 3), true)
            .port(None, 8080, "TCP");
        let yaml = builder.yaml();
        assert!(
            yaml.contains("kubernetes.io/service-name: webapp"),
            "{yaml}"
        );
        assert!(yaml.contains("addressType: IPv4"), "{yaml}");
        let back: EndpointSlice = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, builder.build());
    }

    #[test]
    fn dual_stack_and_other_service_kinds() {
        let svc = service("web", "10.96.0.10")
            .cluster_ips(&["10.96.0.10", "fd00:96::10"])
            .external_ip("192.168.77.10")
            .load_balancer_ingress("192.168.77.20", Some("VIP"))
            .label("service.kubernetes.io/service-proxy-name", "other")
            .build();
        let spec = svc.spec.clone().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(
            spec.ip_families,
            Some(vec!["IPv4".to_owned(), "IPv6".to_owned()])
        );
        assert_eq!(spec.ip_family_policy.as_deref(), Some("RequireDualStack"));
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.external_ips, Some(vec!["192.168.77.10".to_owned()]));
        let ingress = svc.status.unwrap().load_balancer.unwrap().ingress.unwrap();
        assert_eq!(ingress[0].ip.as_deref(), Some("192.168.77.20"));
        assert!(
            svc.metadata
                .labels
                .unwrap()
                .contains_key("service.kubernetes.io/service-proxy-name")
        );

        let headless = service("db", "None").build().spec.unwrap();
        assert_eq!(headless.cluster_ips, Some(vec!["None".to_owned()]));
        assert_eq!(headless.ip_families, None);
        let external = service("ext", "10.96.0.12")
            .external_name("db.example.com")
            .build()
            .spec
            .unwrap();
        assert_eq!(external.type_.as_deref(), Some("ExternalName"));
        let v6 = service("v6", "fd00:96::10").yaml();
        assert!(v6.contains("- IPv6"), "{v6}");
        assert!(v6.contains("SingleStack"), "{v6}");
    }

    #[test]
    fn terminating_dual_stack_pod() {
        let builder = pod("web", Ipv4Addr::new(10, 244, 0, 2))
            .also_ip(Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 2))
            .terminating()
            .node_name("node-a")
            .container_port_full("dns", 5353, "UDP");
        let yaml = builder.yaml();
        assert!(yaml.contains("deletionTimestamp"), "{yaml}");
        let back: Pod = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, builder.build());
        let ips: Vec<String> = back
            .status
            .unwrap()
            .pod_ips
            .unwrap()
            .into_iter()
            .map(|p| p.ip)
            .collect();
        assert_eq!(ips, ["10.244.0.2", "fd00:244::2"]);
    }

    #[test]
    fn ipv6_slice_with_conditions() {
        let builder = endpoint_slice("web-v6", "web")
            .endpoint_full(
                Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 2),
                Conditions::TERMINATING,
                Some("node-a"),
                Some("zone-a"),
            )
            .port(Some("http"), 8080, "TCP");
        let yaml = builder.yaml();
        assert!(yaml.contains("addressType: IPv6"), "{yaml}");
        let back: EndpointSlice = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, builder.build());
        let conditions = back.endpoints.unwrap()[0].conditions.clone().unwrap();
        assert_eq!(
            (conditions.ready, conditions.serving, conditions.terminating),
            (Some(false), Some(true), Some(true))
        );
    }
}
