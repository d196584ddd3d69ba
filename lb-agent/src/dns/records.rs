//! What cluster DNS needs of a Service, taken when the Service arrives (the Kubernetes
//! object is not kept), and the records a Service has once its endpoints are known: the
//! compact per-Service value the [`DnsIndex`](super::index::DnsIndex) holds.
use std::{net::IpAddr, sync::Arc};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::util::intstr::IntOrString};

use smallvec::SmallVec;

use crate::{
    model::Protocol,
    translate::{CheckedService, ValidPod, ValidService, ValidSlice},
};

/// The DNS shape of a Service, from its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsService {
    pub kind: ServiceKind,
    /// `spec.ports` (TCP and UDP), in order: the first is `{SVC}_SERVICE_PORT`.
    pub ports: Box<[DnsPort]>,
}

/// A label selector: (key, value) pairs.
pub type Selector = Box<[(Box<str>, Box<str>)]>;

/// How a Service's name resolves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// `spec.clusterIPs`: A/AAAA records of the Service name.
    ClusterIps(Box<[IpAddr]>),
    /// `clusterIP: None`: the ready endpoints' addresses.
    Headless {
        publish_not_ready: bool,
        /// `spec.selector` (pairs), for endpoints derived from Pods.
        selector: Option<Selector>,
    },
    /// `type: ExternalName`: a CNAME.
    ExternalName(Box<str>),
}

/// A Service port as DNS and the kubelet's variables show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPort {
    /// `spec.ports[].name` (empty for a single unnamed port: no SRV record).
    pub name: Arc<str>,
    pub port: u16,
    pub protocol: Protocol,
    /// `targetPort`: a number, or a container port's name (`None`: the port itself).
    pub target: Option<Target>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Number(u16),
    Name(Box<str>),
}

/// The DNS shape of a Service; `None` when it has no name to answer (no ClusterIP yet, an
/// ExternalName without a name).
#[must_use]
pub fn of_service(service: &Service) -> Option<DnsService> {
    let spec = service.spec.as_ref()?;
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        let name = spec.external_name.as_deref()?.trim_end_matches('.');
        if name.is_empty() {
            return None;
        }
        ServiceKind::ExternalName(Box::from(name))
    } else {
        let texts: Vec<&str> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            _ => spec.cluster_ip.as_deref().into_iter().collect(),
        };
        if texts.first() == Some(&"None") {
            ServiceKind::Headless {
                publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
                selector: spec.selector.as_ref().map(|s| {
                    s.iter()
                        .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.as_str())))
                        .collect()
                }),
            }
        } else {
            let ips: Box<[IpAddr]> = texts.iter().filter_map(|t| t.parse().ok()).collect();
            if ips.is_empty() {
                return None;
            }
            ServiceKind::ClusterIps(ips)
        }
    };
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => return None,
            };
            let target = match &p.target_port {
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok().map(Target::Number),
                Some(IntOrString::String(s)) => Some(match s.parse::<u16>() {
                    Ok(n) => Target::Number(n),
                    Err(_) => Target::Name(Box::from(s.as_str())),
                }),
                None => None,
            };
            Some(DnsPort {
                name: Arc::from(p.name.as_deref().unwrap_or_default()),
                port: u16::try_from(p.port).ok().filter(|&n| n != 0)?,
                protocol,
                target,
            })
        })
        .collect();
    Some(DnsService { kind, ports })
}

/// A Service's records as the index holds them: its validated form, shared with the
/// state (no copy), and a headless Service's ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecords {
    pub facts: Facts,
    /// A headless Service's ready endpoints (published not-ready ones too, when the
    /// Service asks); empty otherwise.
    pub endpoints: Box<[Endpoint]>,
}

/// Where a Service's names come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Facts {
    /// A Service the proxy programs: its ClusterIPs and ports.
    Proxied(Arc<ValidService>),
    /// Any other (headless, ExternalName, another proxy's).
    Own(Arc<DnsService>),
}

/// What a Service's name answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    ClusterIps,
    Headless(&'a [Endpoint]),
    ExternalName(&'a str),
}

/// A ready endpoint of a headless Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The endpoint's `hostname`, or one made of its address (`10-244-0-5`).
    pub hostname: Box<str>,
    /// The endpoint's ports: (name, number, protocol), shared by a slice's endpoints.
    pub ports: Arc<[(Arc<str>, u16, Protocol)]>,
}

/// The hostname of an endpoint without one: its address with dashes, unique in the
/// Service (as CoreDNS makes it).
#[must_use]
pub fn address_hostname(ip: IpAddr) -> Box<str> {
    let text = ip.to_string();
    Box::from(text.replace(['.', ':'], "-").as_str())
}

impl ServiceRecords {
    /// What the Service's name answers.
    #[must_use]
    pub fn answer(&self) -> Answer<'_> {
        match &self.facts {
            Facts::Own(dns) => match &dns.kind {
                ServiceKind::Headless { .. } => Answer::Headless(&self.endpoints),
                ServiceKind::ExternalName(name) => Answer::ExternalName(name),
                ServiceKind::ClusterIps(_) => Answer::ClusterIps,
            },
            Facts::Proxied(_) => Answer::ClusterIps,
        }
    }

    /// The ClusterIPs, primary first (none for headless and ExternalName Services).
    #[must_use]
    pub fn cluster_ips(&self) -> SmallVec<[IpAddr; 2]> {
        match &self.facts {
            Facts::Proxied(valid) => valid.cluster_ips().collect(),
            Facts::Own(dns) => match &dns.kind {
                ServiceKind::ClusterIps(ips) => ips.iter().copied().collect(),
                _ => SmallVec::new(),
            },
        }
    }

    /// The ports: (name, number, protocol), in `spec.ports` order.
    #[must_use]
    pub fn ports(&self) -> SmallVec<[(&str, u16, Protocol); 4]> {
        match &self.facts {
            Facts::Proxied(valid) => valid.port_numbers().collect(),
            Facts::Own(dns) => dns
                .ports
                .iter()
                .map(|p| (&*p.name, p.port, p.protocol))
                .collect(),
        }
    }

    /// The addresses the Service's name resolves to.
    #[must_use]
    pub fn addresses(&self) -> SmallVec<[IpAddr; 2]> {
        match self.answer() {
            Answer::ClusterIps => self.cluster_ips(),
            Answer::Headless(endpoints) => endpoints.iter().map(|e| e.ip).collect(),
            Answer::ExternalName(_) => SmallVec::new(),
        }
    }
}

/// A Service's records: its ClusterIPs or external name, or, headless, its ready endpoints
/// from its EndpointSlices (`slices`, when it has any) or else from the Pods of its
/// namespace its selector matches (the manifests source), as the EndpointSlice controller
/// would publish them. `None`: the Service has no name.
#[must_use]
pub fn build(
    service: &CheckedService,
    slices: Option<&[&ValidSlice]>,
    pods: &[&ValidPod],
) -> Option<ServiceRecords> {
    if let Some(valid) = &service.valid {
        return Some(ServiceRecords {
            facts: Facts::Proxied(Arc::clone(valid)),
            endpoints: Box::default(),
        });
    }
    let dns = service.dns.as_ref()?;
    let ServiceKind::Headless {
        publish_not_ready,
        selector,
    } = &dns.kind
    else {
        return Some(ServiceRecords {
            facts: Facts::Own(Arc::clone(dns)),
            endpoints: Box::default(),
        });
    };
    let mut endpoints = Vec::new();
    match slices {
        Some(slices) => {
            for slice in slices {
                let ports: Arc<[(Arc<str>, u16, Protocol)]> = Arc::from(slice.ports());
                for (ip, ready, hostname) in slice.dns_endpoints() {
                    if ready || *publish_not_ready {
                        endpoints.push(Endpoint {
                            ip,
                            hostname: hostname.map_or_else(|| address_hostname(ip), Box::from),
                            ports: Arc::clone(&ports),
                        });
                    }
                }
            }
        }
        None => {
            let selector = selector.as_deref().filter(|s| !s.is_empty());
            for pod in pods
                .iter()
                .filter(|p| selector.is_some_and(|s| p.matches(s)))
            {
                if !(*publish_not_ready || pod.is_ready()) {
                    continue;
                }
                let ports: Arc<[(Arc<str>, u16, Protocol)]> = dns
                    .ports
                    .iter()
                    .filter_map(|p| {
                        let number = match &p.target {
                            None => p.port,
                            Some(Target::Number(n)) => *n,
                            Some(Target::Name(name)) => pod.named_port(name, p.protocol)?,
                        };
                        Some((Arc::clone(&p.name), number, p.protocol))
                    })
                    .collect();
                let hostname = pod.hostname_in(service.id.name());
                for &ip in pod.ips() {
                    endpoints.push(Endpoint {
                        ip,
                        hostname: hostname.map_or_else(|| address_hostname(ip), Box::from),
                        ports: Arc::clone(&ports),
                    });
                }
            }
        }
    }
    endpoints.sort_by_key(|e| e.ip);
    endpoints.dedup_by(|a, b| a.ip == b.ip && a.hostname == b.hostname);
    Some(ServiceRecords {
        facts: Facts::Own(Arc::clone(dns)),
        endpoints: endpoints.into_boxed_slice(),
    })
}
