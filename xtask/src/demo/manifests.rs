//! The Kubernetes side of the demo: the example manifests, the Pods the "Deployment" gets, the
//! environment the kubelet would give a Pod, and `kubectl get`-like tables.
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodIP, PodStatus, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

pub const DEPLOYMENT_FILE: &str = "web-server.yaml";
pub const SERVICE_FILE: &str = "web-app-service.yaml";
pub const CLIENT_FILE: &str = "client.yaml";

/// The alphabet of the Kubernetes name generator (no vowels, no look-alike digits).
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The NodePort Service of the seed article, shown from outside the node.
pub const NODE_PORT_SERVICE: &str = "mysqlauth/mysql-service.yml";

pub fn examples_dir() -> PathBuf {
    crate::repo_root().join("examples").join("webapp")
}

/// Copies `examples/webapp/*.yaml` into the directory the agent watches.
pub fn copy_examples(to: &Path) -> Result<()> {
    let from = examples_dir();
    let entries =
        std::fs::read_dir(&from).with_context(|| format!("cannot list {}", from.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            let dest = to.join(path.file_name().context("file without a name")?);
            std::fs::copy(&path, &dest)
                .with_context(|| format!("cannot copy {} to {}", path.display(), dest.display()))?;
        }
    }
    Ok(())
}

/// Reads one Kubernetes object from a YAML file.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
}

/// Writes a Pod as `<dir>/<name>.yaml`, the way the agent's manifest source reads it.
pub fn write_pod(dir: &Path, pod: &Pod) -> Result<PathBuf> {
    let name = pod.metadata.name.as_deref().context("pod without a name")?;
    let path = dir.join(format!("{name}.yaml"));
    let yaml = serde_saphyr::to_string(pod).context("cannot serialize the pod")?;
    let text = format!("# Written by `cargo xtask demo`: a replica of Deployment webapp1.\n{yaml}");
    // Write then rename, so the agent never reads half a file.
    let partial = dir.join(format!(".{name}.yaml.partial"));
    std::fs::write(&partial, text)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Names Pods as a ReplicaSet does: `<deployment>-<template hash>-<5 random characters>`.
pub struct ReplicaSet {
    prefix: String,
}

impl ReplicaSet {
    pub fn new(deployment: &str) -> Result<Self> {
        let hash: String = random_bytes(5)?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            prefix: format!("{deployment}-{hash}"),
        })
    }

    pub fn template_hash(&self) -> &str {
        self.prefix.rsplit('-').next().unwrap_or_default()
    }

    pub fn pod_name(&self) -> Result<String> {
        Ok(format!(
            "{}-{}",
            self.prefix,
            name_suffix(&random_bytes(5)?)
        ))
    }
}

/// Five characters from the Kubernetes name alphabet.
fn name_suffix(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| char::from(NAME_ALPHABET[usize::from(b) % NAME_ALPHABET.len()]))
        .collect()
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes)
}

/// A running, ready replica of `deployment` at `ip`: the template's labels and spec, plus the
/// status the kubelet would report.
pub fn replica(deployment: &Deployment, rs: &ReplicaSet, name: &str, ip: Ipv4Addr) -> Pod {
    let template = &deployment.spec.template;
    let mut labels = template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default();
    labels.insert("pod-template-hash".into(), rs.template_hash().into());
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace(&deployment.metadata).into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: template.spec.clone(),
        status: Some(ready_status(ip)),
    }
}

pub fn ready_status(ip: Ipv4Addr) -> PodStatus {
    PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.to_string()),
        pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..PodCondition::default()
        }]),
        ..PodStatus::default()
    }
}

pub fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

pub fn pod_ip(pod: &Pod) -> Result<Ipv4Addr> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|status| status.pod_ip.as_deref());
    ip.context("pod without status.podIP")?
        .parse()
        .context("status.podIP is not an IPv4 address")
}

/// The Service's ClusterIP and first port: the frontend the agent should program.
pub fn frontend(service: &Service) -> Result<(Ipv4Addr, u16)> {
    let spec = service.spec.as_ref().context("Service without spec")?;
    let ip = spec
        .cluster_ip
        .as_deref()
        .context("Service without spec.clusterIP")?;
    let port = spec.ports.as_ref().and_then(|ports| ports.first());
    let port = port.context("Service without ports")?.port;
    Ok((
        ip.parse()
            .context("spec.clusterIP is not an IPv4 address")?,
        u16::try_from(port).context("port out of range")?,
    ))
}

/// The Pods' port behind the Service's first port: `targetPort` as a number, or the container
/// port of that name in the Deployment's template, or `port` itself when unset.
pub fn target_port(service: &Service, deployment: &Deployment) -> Result<u16> {
    let ports = service.spec.as_ref().and_then(|spec| spec.ports.as_ref());
    let port = ports
        .and_then(|ports| ports.first())
        .context("Service without ports")?;
    let number = match &port.target_port {
        None => port.port,
        Some(IntOrString::Int(number)) => *number,
        Some(IntOrString::String(name)) => named_container_port(deployment, name)
            .with_context(|| format!("no container port named {name} in the Deployment"))?,
    };
    u16::try_from(number).context("target port out of range")
}

fn named_container_port(deployment: &Deployment, name: &str) -> Option<i32> {
    let spec = deployment.spec.template.spec.as_ref()?;
    let mut ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten());
    ports
        .find(|port| port.name.as_deref() == Some(name))
        .map(|port| port.container_port)
}

/// A Pod as `kubectl get pods -o wide` shows it.
pub struct PodRow<'a> {
    pub name: &'a str,
    pub ip: Ipv4Addr,
    pub age: Duration,
    pub node: &'a str,
}

pub fn pods_table(rows: &[PodRow<'_>]) -> String {
    let header = [
        "NAME",
        "READY",
        "STATUS",
        "RESTARTS",
        "AGE",
        "IP",
        "NODE",
        "NOMINATED NODE",
        "READINESS GATES",
    ];
    let body = rows.iter().map(|row| {
        [
            row.name.to_owned(),
            "1/1".into(),
            "Running".into(),
            "0".into(),
            age(row.age),
            row.ip.to_string(),
            row.node.to_owned(),
            "<none>".into(),
            "<none>".into(),
        ]
    });
    table(header, body)
}

/// The Service as `kubectl get svc` shows it.
pub fn services_table(service: &Service, age_of: Duration) -> String {
    let spec = service.spec.clone().unwrap_or_default();
    let ports = spec.ports.unwrap_or_default().into_iter().map(|port| {
        format!(
            "{}/{}",
            port.port,
            port.protocol.as_deref().unwrap_or("TCP")
        )
    });
    let row = [
        service.metadata.name.clone().unwrap_or_default(),
        spec.type_.unwrap_or_else(|| "ClusterIP".into()),
        spec.cluster_ip.unwrap_or_else(|| "<none>".into()),
        "<none>".into(),
        ports.collect::<Vec<_>>().join(","),
        age(age_of),
    ];
    let header = [
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
    ];
    table(header, [row])
}

/// kubectl's short ages: `45s`, `2m3s`, `17m`.
fn age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..120 => format!("{secs}s"),
        120..600 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}m", secs / 60),
    }
}

/// Columns padded to their widest cell and three spaces apart, as kubectl prints them.
fn table<const N: usize>(header: [&str; N], rows: impl IntoIterator<Item = [String; N]>) -> String {
    let mut lines = vec![header.map(str::to_owned)];
    lines.extend(rows);
    let mut widths = [0; N];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.len());
        }
    }
    lines
        .iter()
        .map(|line| {
            let cells = line
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:width$}"));
            cells.collect::<Vec<_>>().join("   ").trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example<T: DeserializeOwned>(file: &str) -> T {
        load(&examples_dir().join(file)).unwrap()
    }

    #[test]
    fn the_examples_parse_as_kubernetes_objects() {
        let deployment: Deployment = example(DEPLOYMENT_FILE);
        assert_eq!(deployment.metadata.name.as_deref(), Some("webapp1"));
        let service: Service = example(SERVICE_FILE);
        assert_eq!(
            frontend(&service).unwrap(),
            (Ipv4Addr::new(10, 111, 195, 22), 80)
        );
        let client: Pod = example(CLIENT_FILE);
        assert_eq!(namespace(&client.metadata), "client-ns");
        assert_eq!(pod_ip(&client).unwrap(), Ipv4Addr::new(10, 244, 0, 100));
    }

    #[test]
    fn target_ports_resolve_numbers_names_and_defaults() {
        let deployment: Deployment = example(DEPLOYMENT_FILE);
        let mut service: Service = example(SERVICE_FILE);
        assert_eq!(target_port(&service, &deployment).unwrap(), 80);
        let port = &mut service.spec.as_mut().unwrap().ports.as_mut().unwrap()[0];
        port.target_port = Some(IntOrString::String("http".into()));
        assert_eq!(target_port(&service, &deployment).unwrap(), 80);
        let port = &mut service.spec.as_mut().unwrap().ports.as_mut().unwrap()[0];
        port.target_port = Some(IntOrString::String("grpc".into()));
        assert!(target_port(&service, &deployment).is_err());
        let port = &mut service.spec.as_mut().unwrap().ports.as_mut().unwrap()[0];
        (port.port, port.target_port) = (8080, None);
        assert_eq!(target_port(&service, &deployment).unwrap(), 8080);
    }

    #[test]
    fn replicas_carry_the_template_labels_and_a_ready_status() {
        let deployment: Deployment = example(DEPLOYMENT_FILE);
        let rs = ReplicaSet::new("webapp1").unwrap();
        let name = rs.pod_name().unwrap();
        let pod = replica(&deployment, &rs, &name, Ipv4Addr::new(10, 244, 0, 10));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app"], "webapp1");
        assert_eq!(labels["pod-template-hash"], rs.template_hash());
        assert_eq!(namespace(&pod.metadata), "default");
        assert_eq!(pod_ip(&pod).unwrap(), Ipv4Addr::new(10, 244, 0, 10));
        let ready = &pod.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
    }

    #[test]
    fn pod_names_look_like_a_replica_sets() {
        let name = ReplicaSet::new("webapp1").unwrap().pod_name().unwrap();
        let parts: Vec<_> = name.split('-').collect();
        assert_eq!(parts.len(), 3, "{name}");
        assert_eq!(parts[0], "webapp1");
        assert!(parts[1].len() == 10 && parts[1].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(parts[2].len() == 5 && parts[2].bytes().all(|b| NAME_ALPHABET.contains(&b)));
    }

    #[test]
    fn written_pods_read_back_unchanged() {
        let dir = std::env::temp_dir().join(format!("xtask-pods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let deployment: Deployment = example(DEPLOYMENT_FILE);
        let rs = ReplicaSet::new("webapp1").unwrap();
        let pod = replica(
            &deployment,
            &rs,
            "webapp1-x-y",
            Ipv4Addr::new(10, 244, 0, 11),
        );
        let path = write_pod(&dir, &pod).unwrap();
        let back: Pod = load(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back, pod);
    }

    #[test]
    fn tables_line_up_like_kubectl() {
        let rows = [PodRow {
            name: "webapp1-6b54fb89d9-ct7fk",
            ip: Ipv4Addr::new(10, 46, 0, 30),
            age: Duration::from_secs(17 * 60),
            node: "ip-172-31-56-227",
        }];
        let expected = "\
NAME                       READY   STATUS    RESTARTS   AGE   IP           NODE               NOMINATED NODE   READINESS GATES
webapp1-6b54fb89d9-ct7fk   1/1     Running   0          17m   10.46.0.30   ip-172-31-56-227   <none>           <none>";
        assert_eq!(pods_table(&rows), expected);
    }

    #[test]
    fn ages_read_like_kubectls() {
        assert_eq!(age(Duration::from_secs(45)), "45s");
        assert_eq!(age(Duration::from_secs(123)), "2m3s");
        assert_eq!(age(Duration::from_secs(17 * 60 + 5)), "17m");
    }
}
