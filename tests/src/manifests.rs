//! The manifests directory the agent watches, and builders for the objects in it.
//!
//! The builders fill `k8s-openapi` types and serialise them as YAML (with `serde-saphyr`), so the
//! files look like what `kubectl get -o yaml` prints.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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

/// Builds a v1 Service of type ClusterIP: `service("webapp", "10.96.0.10").selector("app",
/// "webapp").port(80, 8080)`.
#[derive(Debug, Clone)]
pub struct ServiceBuilder {
    name: String,
    namespace: String,
    cluster_ip: String,
    ports: Vec<ServicePort>,
    selector: BTreeMap<String, String>,
    type_: String,
    external_ips: Vec<String>,
    load_balancer_ips: Vec<String>,
    external_traffic_policy: Option<String>,
    health_check_node_port: Option<i32>,
}

/// A Service named `name` in namespace `default` with this `spec.clusterIP`.
pub fn service(name: &str, cluster_ip: &str) -> ServiceBuilder {
    ServiceBuilder {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        cluster_ip: cluster_ip.to_owned(),
        ports: Vec::new(),
        selector: BTreeMap::new(),
        type_: "ClusterIP".to_owned(),
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        external_traffic_policy: None,
        health_check_node_port: None,
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

    /// `spec.type` (`NodePort`, `LoadBalancer`); ClusterIP by default.
    pub fn type_(mut self, type_: &str) -> Self {
        type_.clone_into(&mut self.type_);
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

    /// An entry of `spec.externalIPs`.
    pub fn external_ip(mut self, ip: &str) -> Self {
        self.external_ips.push(ip.to_owned());
        self
    }

    /// An entry of `status.loadBalancer.ingress` (the type becomes LoadBalancer).
    pub fn load_balancer_ip(mut self, ip: &str) -> Self {
        self.load_balancer_ips.push(ip.to_owned());
        "LoadBalancer".clone_into(&mut self.type_);
        self
    }

    /// `spec.externalTrafficPolicy`.
    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.external_traffic_policy = Some(policy.to_owned());
        self
    }

    /// `spec.healthCheckNodePort`.
    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    pub fn build(&self) -> Service {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let status = (!self.load_balancer_ips.is_empty()).then(|| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    self.load_balancer_ips
                        .iter()
                        .map(|ip| LoadBalancerIngress {
                            ip: Some(ip.clone()),
                            ..LoadBalancerIngress::default()
                        })
                        .collect(),
                ),
            }),
            ..ServiceStatus::default()
        });
        Service {
            metadata: meta(&self.name, &self.namespace, &BTreeMap::new()),
            spec: Some(ServiceSpec {
                type_: Some(self.type_.clone()),
                cluster_ip: Some(self.cluster_ip.clone()),
                cluster_ips: Some(vec![self.cluster_ip.clone()]),
                ports: Some(self.ports.clone()),
                selector: (!self.selector.is_empty()).then(|| self.selector.clone()),
                external_ips: (!self.external_ips.is_empty()).then(|| self.external_ips.clone()),
                external_traffic_policy: self.external_traffic_policy.clone(),
                health_check_node_port: self.health_check_node_port,
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
    ip: Ipv4Addr,
    labels: BTreeMap<String, String>,
    ready: bool,
    ports: Vec<ContainerPort>,
    node_name: Option<String>,
}

/// A ready Pod named `name` in namespace `default` with `status.podIP` `ip`.
pub fn pod(name: &str, ip: Ipv4Addr) -> PodBuilder {
    PodBuilder {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        ip,
        labels: BTreeMap::new(),
        ready: true,
        ports: Vec::new(),
        node_name: None,
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

    /// The `Ready` condition.
    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }

    /// `spec.nodeName`: the node the pod runs on.
    pub fn node_name(mut self, node: &str) -> Self {
        self.node_name = Some(node.to_owned());
        self
    }

    /// A named TCP container port.
    pub fn container_port(mut self, name: &str, port: i32) -> Self {
        self.ports.push(ContainerPort {
            name: Some(name.to_owned()),
            container_port: port,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        });
        self
    }

    pub fn build(&self) -> Pod {
        let ready = if self.ready { "True" } else { "False" };
        Pod {
            metadata: meta(&self.name, &self.namespace, &self.labels),
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
                pod_ip: Some(self.ip.to_string()),
                pod_ips: Some(vec![k8s_openapi::api::core::v1::PodIP {
                    ip: self.ip.to_string(),
                }]),
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

/// Builds a discovery.k8s.io/v1 EndpointSlice (addressType IPv4) for a Service:
/// `endpoint_slice("webapp-abc", "webapp").endpoint(ip, true).port(None, 8080, "TCP")`.
#[derive(Debug, Clone)]
pub struct EndpointSliceBuilder {
    name: String,
    namespace: String,
    service: String,
    endpoints: Vec<Endpoint>,
    ports: Vec<EndpointPort>,
}

/// A slice named `name` in namespace `default`, labelled `kubernetes.io/service-name: service`.
pub fn endpoint_slice(name: &str, service: &str) -> EndpointSliceBuilder {
    EndpointSliceBuilder {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        service: service.to_owned(),
        endpoints: Vec::new(),
        ports: Vec::new(),
    }
}

impl EndpointSliceBuilder {
    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    /// One endpoint with one address and `conditions.ready`.
    pub fn endpoint(mut self, address: Ipv4Addr, ready: bool) -> Self {
        self.endpoints.push(Endpoint {
            addresses: vec![address.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                ..EndpointConditions::default()
            }),
            ..Endpoint::default()
        });
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
        EndpointSlice {
            metadata: meta(&self.name, &self.namespace, &labels),
            address_type: "IPv4".to_owned(),
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
}
