//! The DaemonSet's pod template (`deploy/daemonset.yaml`), rendered for one node as the
//! kubelet would run it: every container with its command and arguments (`$(VAR)` expanded),
//! environment (the downward API's `spec.nodeName` filled in), user, capabilities, security
//! options, memory limit, volume mounts and probes.
//!
//! Only what a test cannot take from the real host is replaced, each by name: a hostPath
//! volume's path by the stand-in the test gives (a panic names any volume without one), and
//! the host network by the test's node namespace (the caller's choice of `--network`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// `deploy/daemonset.yaml` in this repository.
pub fn daemonset_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml")
}

/// The pod of the DaemonSet on one node.
#[derive(Debug, Clone)]
pub struct RenderedPod {
    /// Init containers, in order.
    pub init: Vec<ContainerRun>,
    /// The agent's container.
    pub agent: ContainerRun,
    /// `spec.hostNetwork`.
    pub host_network: bool,
}

/// One container as the runtime gets it.
#[derive(Debug, Clone)]
pub struct ContainerRun {
    pub name: String,
    pub image: String,
    /// `command` (replaces the image's entrypoint), when set.
    pub command: Option<Vec<String>>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub privileged: bool,
    /// `runAsUser`.
    pub user: Option<i64>,
    pub read_only_root: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privileges: bool,
    pub caps_drop: Vec<String>,
    pub caps_add: Vec<String>,
    pub apparmor_unconfined: bool,
    /// `seccompProfile`; the runtime's default profile when none is named, as a kubelet
    /// with `seccompDefault` gives a container without a profile.
    pub seccomp: Seccomp,
    /// `seLinuxOptions` as `type:spc_t`, `level:s0`.
    pub selinux: Vec<String>,
    /// `resources.limits.memory` in bytes.
    pub memory_limit: Option<u64>,
    pub mounts: Vec<MountRun>,
    pub readiness: Option<HttpProbe>,
    pub liveness: Option<HttpProbe>,
}

/// A container's seccomp profile as the runtime gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seccomp {
    RuntimeDefault,
    Unconfined,
    /// `Localhost`: the profile file in the stand-in for the kubelet's seccomp directory
    /// (`/var/lib/kubelet/seccomp`).
    Localhost(PathBuf),
}

/// Where the kubelet reads `Localhost` seccomp profiles (its default `--root-dir`).
pub const KUBELET_SECCOMP: &str = "/var/lib/kubelet/seccomp";

/// A volume mount with its host side resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRun {
    pub volume: String,
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
    /// `None`, `HostToContainer` or `Bidirectional`.
    pub propagation: String,
}

/// An `httpGet` probe; `host` `None` means the pod's IP (the node's, with hostNetwork).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    pub host: Option<String>,
    pub path: String,
    pub port: u16,
}

/// Renders the DaemonSet at `path` for node `node_name`, with `host_paths` mapping each
/// hostPath volume's path to the directory that stands in for it in this test.
#[track_caller]
pub fn render(path: &Path, node_name: &str, host_paths: &BTreeMap<&str, PathBuf>) -> RenderedPod {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let daemonset: DaemonSet =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = daemonset
        .spec
        .template
        .spec
        .unwrap_or_else(|| panic!("{}: no spec.template.spec", path.display()));
    let volumes = volume_hosts(&spec, host_paths);
    let seccomp_root = host_paths.get(KUBELET_SECCOMP).cloned();
    let render = |container: &Container| {
        render_container(container, node_name, &volumes, seccomp_root.as_deref())
    };
    let mut containers = spec.containers.iter();
    let agent = containers
        .next()
        .unwrap_or_else(|| panic!("{}: no container", path.display()));
    assert!(
        containers.next().is_none(),
        "{}: more than one container",
        path.display()
    );
    RenderedPod {
        init: spec.init_containers.iter().flatten().map(render).collect(),
        agent: render(agent),
        host_network: spec.host_network == Some(true),
    }
}

/// Each volume's host directory: its hostPath's stand-in.
#[track_caller]
fn volume_hosts(spec: &PodSpec, host_paths: &BTreeMap<&str, PathBuf>) -> BTreeMap<String, PathBuf> {
    spec.volumes
        .iter()
        .flatten()
        .map(|volume| {
            let host_path = volume
                .host_path
                .as_ref()
                .unwrap_or_else(|| panic!("volume {}: only hostPath volumes are run", volume.name));
            let stand_in = host_paths.get(host_path.path.as_str()).unwrap_or_else(|| {
                panic!(
                    "volume {}: hostPath {} has no stand-in in this test",
                    volume.name, host_path.path
                )
            });
            (volume.name.clone(), stand_in.clone())
        })
        .collect()
}

#[track_caller]
fn render_container(
    container: &Container,
    node_name: &str,
    volumes: &BTreeMap<String, PathBuf>,
    seccomp_root: Option<&Path>,
) -> ContainerRun {
    let env = environment(container, node_name);
    let expand_all = |items: &Vec<String>| items.iter().map(|s| expand(s, &env)).collect();
    let security = container.security_context.clone().unwrap_or_default();
    let caps = security.capabilities.clone().unwrap_or_default();
    let selinux = security
        .se_linux_options
        .iter()
        .flat_map(|options| {
            [
                options.type_.as_ref().map(|t| format!("type:{t}")),
                options.level.as_ref().map(|l| format!("level:{l}")),
            ]
        })
        .flatten()
        .collect();
    ContainerRun {
        name: container.name.clone(),
        image: container.image.clone().unwrap_or_default(),
        command: container.command.as_ref().map(expand_all),
        args: container.args.as_ref().map(expand_all).unwrap_or_default(),
        privileged: security.privileged == Some(true),
        user: security.run_as_user,
        read_only_root: security.read_only_root_filesystem == Some(true),
        no_new_privileges: security.allow_privilege_escalation == Some(false),
        caps_drop: caps.drop.unwrap_or_default(),
        caps_add: caps.add.unwrap_or_default(),
        apparmor_unconfined: security
            .app_armor_profile
            .is_some_and(|profile| profile.type_ == "Unconfined"),
        seccomp: match security.seccomp_profile {
            None => Seccomp::RuntimeDefault,
            Some(profile) => match profile.type_.as_str() {
                "Unconfined" => Seccomp::Unconfined,
                "RuntimeDefault" => Seccomp::RuntimeDefault,
                "Localhost" => {
                    let root = seccomp_root.unwrap_or_else(|| {
                        panic!("{}: a Localhost seccomp profile, but no stand-in for {KUBELET_SECCOMP}", container.name)
                    });
                    Seccomp::Localhost(root.join(profile.localhost_profile.unwrap_or_default()))
                }
                other => panic!("{}: seccompProfile type {other}", container.name),
            },
        },
        selinux,
        memory_limit: container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|limits| limits.get("memory"))
            .map(|quantity| bytes(&quantity.0)),
        mounts: container
            .volume_mounts
            .iter()
            .flatten()
            .map(|mount| MountRun {
                volume: mount.name.clone(),
                host: volumes
                    .get(&mount.name)
                    .unwrap_or_else(|| panic!("mount of unknown volume {}", mount.name))
                    .clone(),
                container: mount.mount_path.clone(),
                read_only: mount.read_only == Some(true),
                propagation: mount
                    .mount_propagation
                    .clone()
                    .unwrap_or_else(|| "None".to_owned()),
            })
            .collect(),
        readiness: container.readiness_probe.as_ref().map(http_probe),
        liveness: container.liveness_probe.as_ref().map(http_probe),
        env,
    }
}

/// `env` with values and `fieldRef: spec.nodeName` (any other source panics).
#[track_caller]
fn environment(container: &Container, node_name: &str) -> Vec<(String, String)> {
    container
        .env
        .iter()
        .flatten()
        .map(|var| {
            let value = match (&var.value, &var.value_from) {
                (Some(value), None) => value.clone(),
                (None, Some(from)) => {
                    let field = from.field_ref.as_ref().map(|f| f.field_path.as_str());
                    assert_eq!(
                        field,
                        Some("spec.nodeName"),
                        "env {}: only fieldRef spec.nodeName is rendered",
                        var.name
                    );
                    node_name.to_owned()
                }
                _ => String::new(),
            };
            (var.name.clone(), value)
        })
        .collect()
}

/// Kubernetes' `$(VAR)` expansion of command and args from the container's env (`$$` is a
/// literal `$`; an unknown variable stays as written).
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after
            .strip_prefix('(')
            .and_then(|inner| inner.split_once(')'))
            && let Some((_, value)) = env.iter().find(|(key, _)| key == name)
        {
            out.push_str(value);
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A memory quantity (`1088Mi`, `64Mi`, `1Gi`, `512M`, plain bytes) in bytes.
#[track_caller]
fn bytes(quantity: &str) -> u64 {
    let split = quantity
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(quantity.len());
    let (number, unit) = quantity.split_at(split);
    let number: u64 = number
        .parse()
        .unwrap_or_else(|e| panic!("memory quantity {quantity}: {e}"));
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => panic!("memory quantity {quantity}: unit {unit} not rendered"),
    };
    number * factor
}

#[track_caller]
fn http_probe(probe: &Probe) -> HttpProbe {
    let get = probe
        .http_get
        .as_ref()
        .expect("only httpGet probes are rendered");
    let port = match &get.port {
        IntOrString::Int(port) => u16::try_from(*port).expect("probe port"),
        IntOrString::String(name) => panic!("named probe port {name} not rendered"),
    };
    HttpProbe {
        host: get.host.clone(),
        path: get.path.clone().unwrap_or_else(|| "/".to_owned()),
        port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand_as_kubernetes_does() {
        let env = vec![("NODE_NAME".to_owned(), "node-a".to_owned())];
        assert_eq!(
            expand("--node-name=$(NODE_NAME)", &env),
            "--node-name=node-a"
        );
        assert_eq!(
            expand("$$(NODE_NAME) $(OTHER)", &env),
            "$(NODE_NAME) $(OTHER)"
        );
        assert_eq!(expand("a$b", &env), "a$b");
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(bytes("1088Mi"), 1088 << 20);
        assert_eq!(bytes("512M"), 512_000_000);
        assert_eq!(bytes("1024"), 1024);
    }

    #[test]
    fn the_daemonset_renders_with_stand_ins_for_its_host_paths() {
        let host_paths = BTreeMap::from([
            ("/sys/fs/bpf/lb", PathBuf::from("/tmp/bpf/lb")),
            ("/sys/fs/cgroup", PathBuf::from("/tmp/cgroup")),
            (KUBELET_SECCOMP, PathBuf::from("/tmp/seccomp")),
        ]);
        let pod = render(&daemonset_path(), "node-a", &host_paths);
        assert!(pod.host_network);
        assert!(pod.agent.args.contains(&"--node-name=node-a".to_owned()));
        assert!(pod.init.iter().all(|c| !c.privileged));
        assert!(pod.agent.caps_add.contains(&"BPF".to_owned()));
        assert_eq!(
            pod.agent.seccomp,
            Seccomp::Localhost(PathBuf::from("/tmp/seccomp/lb-agent.json"))
        );
        let pins = pod
            .agent
            .mounts
            .iter()
            .find(|m| m.container == "/run/lb/bpf")
            .expect("pin directory mount");
        assert_eq!(pins.host, PathBuf::from("/tmp/bpf/lb"));
    }
}
