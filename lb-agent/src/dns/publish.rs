//! Cluster DNS as pods reach it in a cluster: the Service `kube-system/kube-dns`
//! (`--dns-service-ip`, port 53 over UDP and TCP) whose one endpoint is lb's own listener,
//! so the socket programs translate a pod's `nameserver 10.96.0.10` to it like any Service.
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::source::change::Object;

/// Where the objects say they come from, in reports.
pub const ORIGIN: &str = "lb-agent --dns-service-ip";

/// The Service and its EndpointSlice.
///
/// # Errors
/// When `listener` has no address a pod could reach (unspecified or loopback).
pub fn kube_dns(service_ip: IpAddr, listener: SocketAddr) -> Result<[Object; 2], String> {
    let ip = listener.ip();
    if ip.is_unspecified() || ip.is_loopback() {
        return Err(format!(
            "--dns-service-ip needs --dns-addr on an address pods reach (not {ip})"
        ));
    }
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let labels = serde_json::json!({"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"});
    let service: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
        "spec": {
            "clusterIP": service_ip.to_string(),
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": listener.port()},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": listener.port()},
            ],
        },
    }))
    .map_err(|e| e.to_string())?;
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kube-dns-lb",
            "namespace": "kube-system",
            "labels": {"kubernetes.io/service-name": "kube-dns"},
        },
        "addressType": family,
        "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
        "ports": [
            {"name": "dns", "port": listener.port(), "protocol": "UDP"},
            {"name": "dns-tcp", "port": listener.port(), "protocol": "TCP"},
        ],
    }))
    .map_err(|e| e.to_string())?;
    Ok([
        Object::Service(Box::new(service)),
        Object::EndpointSlice(Box::new(slice)),
    ])
}
