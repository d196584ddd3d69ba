//! The Services of one size of the sweep: their addresses and endpoints, and the manifests the
//! agent reads. The same description feeds the kube-proxy layouts (`kubeproxy.rs`), so every
//! variant programs exactly the same Services.
//!
//! - Service `i` is `bench/svc-<i>` with ClusterIP 10.96.0.10 + i, port 80/TCP → 8080.
//! - The measured Service is the last one (for iptables, the last rule of KUBE-SERVICES); it
//!   also has 53/UDP → 5353, and its endpoints are the real backend pods (10.244.1.1, …).
//! - Every other endpoint is a distinct fake address in the cluster's pod CIDR
//!   (10.224.0.0 – 10.243.255.255 in 10.224.0.0/11: 1.3 million, so 100,000 × 10 needs no
//!   address twice) that no traffic is ever sent to.
//! - The endpoint change replaces the first endpoint of Service 0 by a new address.
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

pub const NAMESPACE: &str = "bench";
pub const TCP_PORT: u16 = 80;
pub const TCP_TARGET_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 53;
pub const UDP_TARGET_PORT: u16 = 5353;
/// The cluster's pod CIDR; the node's own pods are 10.244.0.0/16 inside it.
pub const CLUSTER_CIDR: &str = "10.224.0.0/11";
/// The Service CIDR (no interface has an address in it).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const FIRST_FAKE_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 0);
/// 10.224.0.0 – 10.243.255.255, below the node's pods (10.244.0.0/16): more than the
/// 999,990 fake endpoints of 100,000 × 10, so every backend is distinct, as in a cluster.
const FAKE_ENDPOINTS: u32 = 20 << 16;
/// Replacement endpoints of the change: addresses of pods that would just have started.
const CHANGED_ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(10, 244, 250, 10);
/// Services per manifest file: a Service and its slice are two YAML documents, and the
/// agent's parser (serde-saphyr's default budget) refuses files of more than 1,024 documents.
pub const SERVICES_PER_FILE: usize = 500;
/// The file holding Service 0 and its slice, rewritten by the endpoint change.
pub const CHANGE_FILE: &str = "change.yaml";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    pub fn upper(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// One port of a Service.
#[derive(Clone, Copy, Debug)]
pub struct Port {
    pub name: &'static str,
    pub proto: Proto,
    pub port: u16,
    pub target: u16,
}

const TCP: Port = Port {
    name: "http",
    proto: Proto::Tcp,
    port: TCP_PORT,
    target: TCP_TARGET_PORT,
};
const UDP: Port = Port {
    name: "dns",
    proto: Proto::Udp,
    port: UDP_PORT,
    target: UDP_TARGET_PORT,
};

/// `services` Services with `endpoints` endpoints each.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub services: usize,
    pub endpoints: usize,
    backends: Vec<Ipv4Addr>,
}

impl Scenario {
    /// `backends` are the real pods; the measured Service uses the first `endpoints` of them.
    pub fn new(services: usize, endpoints: usize, backends: &[Ipv4Addr]) -> Self {
        assert!(services > 0 && endpoints > 0 && backends.len() >= endpoints);
        Self {
            services,
            endpoints,
            backends: backends[..endpoints].to_vec(),
        }
    }

    /// The Service the data path is measured on: the last one.
    pub fn measured(&self) -> usize {
        self.services - 1
    }

    /// The Service whose endpoints change: the first one.
    pub fn changed(&self) -> usize {
        0
    }

    pub fn name(index: usize) -> String {
        format!("svc-{index:06}")
    }

    pub fn cluster_ip(index: usize) -> Ipv4Addr {
        let offset = u32::try_from(index).expect("fewer than 2^32 Services");
        Ipv4Addr::from(u32::from(FIRST_CLUSTER_IP) + offset)
    }

    pub fn ports(&self, index: usize) -> &'static [Port] {
        if index == self.measured() {
            &[TCP, UDP]
        } else {
            &[TCP]
        }
    }

    /// The endpoints of Service `index` as first programmed.
    pub fn endpoints(&self, index: usize) -> Vec<Ipv4Addr> {
        if index == self.measured() {
            return self.backends.clone();
        }
        (0..self.endpoints)
            .map(|j| {
                let k = u32::try_from(index * self.endpoints + j).unwrap_or(u32::MAX);
                Ipv4Addr::from(u32::from(FIRST_FAKE_ENDPOINT) + k % FAKE_ENDPOINTS)
            })
            .collect()
    }

    /// The endpoints of the changed Service after change number `version` (1, 2, …): the first
    /// endpoint is replaced by a new pod's address.
    pub fn changed_endpoints(&self, version: u32) -> Vec<Ipv4Addr> {
        let mut endpoints = self.endpoints(self.changed());
        if version > 0 {
            endpoints[0] = Ipv4Addr::from(u32::from(CHANGED_ENDPOINT_BASE) + version);
        }
        endpoints
    }

    /// The ClusterIP targets of the measured Service, for the clients.
    pub fn measured_target(&self, proto: Proto) -> std::net::SocketAddr {
        let port = match proto {
            Proto::Tcp => TCP_PORT,
            Proto::Udp => UDP_PORT,
        };
        (Self::cluster_ip(self.measured()), port).into()
    }

    /// The real backends' addresses on the target port, for the direct variant.
    pub fn direct_targets(&self, proto: Proto) -> Vec<std::net::SocketAddr> {
        let port = match proto {
            Proto::Tcp => TCP_TARGET_PORT,
            Proto::Udp => UDP_TARGET_PORT,
        };
        self.backends.iter().map(|&ip| (ip, port).into()).collect()
    }

    /// Writes every Service with its EndpointSlice into `dir`: Service 0 in [`CHANGE_FILE`],
    /// the others [`SERVICES_PER_FILE`] to a file. Returns the files written.
    pub fn write_manifests(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut files = vec![self.write_change(dir, 0)?];
        let rest: Vec<usize> = (0..self.services)
            .filter(|&i| i != self.changed())
            .collect();
        for (chunk, indices) in rest.chunks(SERVICES_PER_FILE).enumerate() {
            let mut text = String::with_capacity(indices.len() * 700);
            for &index in indices {
                self.append_service(&mut text, index, &self.endpoints(index));
            }
            let file = dir.join(format!("services-{chunk:04}.yaml"));
            std::fs::write(&file, text)
                .with_context(|| format!("cannot write {}", file.display()))?;
            files.push(file);
        }
        Ok(files)
    }

    /// (Re)writes [`CHANGE_FILE`] with the changed Service at `version`, atomically (a hidden
    /// temporary file renamed over it: the agent ignores hidden files and sees one change).
    pub fn write_change(&self, dir: &Path, version: u32) -> Result<PathBuf> {
        let mut text = String::new();
        let index = self.changed();
        self.append_service(&mut text, index, &self.changed_endpoints(version));
        let tmp = dir.join(".change.yaml.tmp");
        let file = dir.join(CHANGE_FILE);
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &file)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), file.display()))?;
        Ok(file)
    }

    fn append_service(&self, out: &mut String, index: usize, endpoints: &[Ipv4Addr]) {
        let name = Self::name(index);
        let ip = Self::cluster_ip(index);
        let ports = self.ports(index);
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
             spec:\n  clusterIP: {ip}\n  ports:\n"
        );
        for p in ports {
            let _ = writeln!(
                out,
                "  - {{name: {}, port: {}, protocol: {}, targetPort: {}}}",
                p.name,
                p.port,
                p.proto.upper(),
                p.target
            );
        }
        let _ = write!(
            out,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: {name}-bench\n  namespace: {NAMESPACE}\n  \
             labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nendpoints:\n"
        );
        for endpoint in endpoints {
            let _ = writeln!(
                out,
                "- {{addresses: [{endpoint}], conditions: {{ready: true}}}}"
            );
        }
        out.push_str("ports:\n");
        for p in ports {
            let _ = writeln!(
                out,
                "- {{name: {}, port: {}, protocol: {}}}",
                p.name,
                p.target,
                p.proto.upper()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;

    fn backends() -> Vec<Ipv4Addr> {
        (1..=10).map(|h| Ipv4Addr::new(10, 244, 1, h)).collect()
    }

    #[test]
    fn the_measured_service_is_the_last_and_uses_the_real_backends() {
        let scenario = Scenario::new(100, 10, &backends());
        assert_eq!(scenario.measured(), 99);
        assert_eq!(scenario.endpoints(99), backends());
        assert_eq!(scenario.ports(99).len(), 2);
        assert_eq!(
            Scenario::cluster_ip(99),
            Ipv4Addr::new(10, 96, 0, 109),
            "10.96.0.10 + 99"
        );
        let fake = scenario.endpoints(0);
        assert_eq!(fake.len(), 10);
        assert!(fake.iter().all(|ip| (224..244).contains(&ip.octets()[1])));
        assert_ne!(scenario.endpoints(1)[0], fake[0], "distinct fake endpoints");
    }

    #[test]
    fn a_million_fake_endpoints_are_distinct_and_never_a_node_pod() {
        let scenario = Scenario::new(100_000, 10, &backends());
        let mut seen = std::collections::HashSet::new();
        for index in 0..scenario.measured() {
            for ip in scenario.endpoints(index) {
                assert_ne!(ip.octets()[..2], [10, 244], "{ip} is a node pod's range");
                assert!(seen.insert(ip), "{ip} twice");
            }
        }
    }

    #[test]
    fn the_change_replaces_only_the_first_endpoint() {
        let scenario = Scenario::new(3, 10, &backends());
        let before = scenario.changed_endpoints(0);
        let after = scenario.changed_endpoints(2);
        assert_eq!(before[1..], after[1..]);
        assert_ne!(before[0], after[0]);
        assert_ne!(
            scenario.changed_endpoints(1)[0],
            after[0],
            "each change is a new one"
        );
    }

    #[test]
    fn every_manifest_file_fits_the_parsers_budget() {
        let dir = std::env::temp_dir().join(format!("lbbench-unit-budget-{}", std::process::id()));
        let scenario = Scenario::new(SERVICES_PER_FILE * 2 + 10, 10, &backends());
        let files = scenario.write_manifests(&dir).unwrap();
        let mut services = 0;
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            // The agent parses with serde-saphyr's default budget, as here.
            let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            services += documents.len() / 2;
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(services, scenario.services);
    }

    #[test]
    fn manifests_are_services_and_slices_kubernetes_accepts() {
        let dir = std::env::temp_dir().join(format!("lbbench-unit-{}", std::process::id()));
        let scenario = Scenario::new(5, 2, &backends());
        let files = scenario.write_manifests(&dir).unwrap();
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
            for document in documents {
                match document["kind"].as_str() {
                    Some("Service") => {
                        services.push(serde_json::from_value::<Service>(document).unwrap());
                    }
                    Some("EndpointSlice") => {
                        slices.push(serde_json::from_value::<EndpointSlice>(document).unwrap());
                    }
                    other => panic!("unexpected kind {other:?}"),
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((services.len(), slices.len()), (5, 5));
        let last = services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("svc-000004"))
            .unwrap();
        let spec = last.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.14"));
        assert_eq!(spec.ports.as_ref().unwrap().len(), 2);
        let slice = slices
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("svc-000004-bench"))
            .unwrap();
        let labels = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kubernetes.io/service-name"], "svc-000004");
        let endpoints = slice.endpoints.as_ref().unwrap();
        assert_eq!(endpoints[1].addresses, ["10.244.1.2"]);
        assert_eq!(endpoints[0].conditions.as_ref().unwrap().ready, Some(true));
    }
}
