//! The environment variables the kubelet gives a pod about the Services of its namespace
//! (`pkg/kubelet/envvars`): `{SVC}_SERVICE_HOST`, `{SVC}_SERVICE_PORT`,
//! `{SVC}_SERVICE_PORT_{NAME}` and the Docker-link set `{SVC}_PORT…`, for every Service with
//! a ClusterIP, from the agent's DNS index (the state that fills the maps).
use std::net::SocketAddr;

use crate::{
    dns::{index::DnsIndex, records::ServiceRecords},
    model::ObjectRef,
};

/// The variables of a pod in `namespace`, sorted by Service name, each as (name, value).
/// The `kubernetes` Service of `default` is added to every namespace, as the kubelet does.
#[must_use]
pub fn variables(index: &DnsIndex, namespace: &str) -> Vec<(String, String)> {
    let mut services: Vec<(&ObjectRef, &ServiceRecords)> = index.in_namespace(namespace).collect();
    if namespace != "default"
        && let Some(master) = index.service("default", "kubernetes")
    {
        services.push(master);
    }
    services.sort_by(|a, b| a.0.name().cmp(b.0.name()));
    services
        .into_iter()
        .flat_map(|(id, records)| service_variables(id, records))
        .collect()
}

fn service_variables(id: &ObjectRef, service: &ServiceRecords) -> Vec<(String, String)> {
    let mut out = Vec::new();
    // The primary ClusterIP (`spec.clusterIP`); headless and ExternalName have none.
    let Some(&ip) = service.cluster_ips().first() else {
        return out;
    };
    let ports = service.ports();
    let prefix = variable_name(id.name());
    out.push((format!("{prefix}_SERVICE_HOST"), ip.to_string()));
    if let Some((_, number, _)) = ports.first() {
        out.push((format!("{prefix}_SERVICE_PORT"), number.to_string()));
    }
    for (name, number, _) in ports.iter().filter(|(name, _, _)| !name.is_empty()) {
        out.push((
            format!("{prefix}_SERVICE_PORT_{}", variable_name(name)),
            number.to_string(),
        ));
    }
    for (i, (_, number, protocol)) in ports.iter().enumerate() {
        let protocol = protocol.to_string();
        let lower = protocol.to_ascii_lowercase();
        let url = format!("{lower}://{}", SocketAddr::new(ip, *number));
        if i == 0 {
            out.push((format!("{prefix}_PORT"), url.clone()));
        }
        let port_prefix = format!("{prefix}_PORT_{number}_{protocol}");
        out.push((port_prefix.clone(), url));
        out.push((format!("{port_prefix}_PROTO"), lower));
        out.push((format!("{port_prefix}_PORT"), number.to_string()));
        out.push((format!("{port_prefix}_ADDR"), ip.to_string()));
    }
    out
}

/// The kubelet's variable name of a Service or port name: upper case, `-` as `_`.
#[must_use]
pub fn variable_name(name: &str) -> String {
    name.replace('-', "_").to_ascii_uppercase()
}

/// The variables as shell `export` lines.
#[must_use]
pub fn exports(variables: &[(String, String)]) -> String {
    variables
        .iter()
        .map(|(name, value)| format!("export {name}='{}'\n", value.replace('\'', r"'\''")))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::dns::records::{DnsPort, DnsService, Facts, ServiceKind};
    use crate::model::Protocol;

    #[test]
    fn kubelet_variables_of_a_service() {
        // What an agent without a DNS server keeps: the names, no reverse index.
        let mut index = DnsIndex::names_only();
        let port = |name: &str, port| DnsPort {
            name: Arc::from(name),
            port,
            protocol: Protocol::Tcp,
            target: None,
        };
        let dns = DnsService {
            kind: ServiceKind::ClusterIps(Box::new(["10.111.195.22".parse().unwrap()])),
            ports: Box::new([port("http", 80), port("", 8080)]),
        };
        index.apply(vec![(
            ObjectRef::new("default", "web-app-service"),
            Some(ServiceRecords {
                facts: Facts::Own(Arc::new(dns)),
                endpoints: Box::default(),
            }),
        )]);
        let vars = variables(&index, "default");
        let get = |n: &str| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("WEB_APP_SERVICE_SERVICE_HOST"), Some("10.111.195.22"));
        assert_eq!(get("WEB_APP_SERVICE_SERVICE_PORT"), Some("80"));
        assert_eq!(get("WEB_APP_SERVICE_SERVICE_PORT_HTTP"), Some("80"));
        assert_eq!(get("WEB_APP_SERVICE_PORT"), Some("tcp://10.111.195.22:80"));
        assert_eq!(
            get("WEB_APP_SERVICE_PORT_8080_TCP"),
            Some("tcp://10.111.195.22:8080")
        );
        assert_eq!(get("WEB_APP_SERVICE_PORT_80_TCP_PROTO"), Some("tcp"));
        assert_eq!(
            get("WEB_APP_SERVICE_PORT_80_TCP_ADDR"),
            Some("10.111.195.22")
        );
        assert!(variables(&index, "other").is_empty());
        assert!(exports(&vars).contains("export WEB_APP_SERVICE_SERVICE_PORT='80'\n"));
    }
}
