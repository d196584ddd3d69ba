//! The manifests in `deploy/` against the agent they deploy, without a cluster: the RBAC
//! rules grant exactly what the agent reads (`API_ACCESS`), the DaemonSet passes only flags
//! that `lb-agent run --help` lists, mounts what those flags point at, runs unprivileged and
//! probes the API where `--api-addr` puts it.
//!
//! Every `deploy/*.yaml` document is read into its `k8s-openapi` type, and must read back
//! the same: a misspelt field (which Kubernetes would drop or reject) fails here.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, Probe, ServiceAccount, Volume, VolumeMount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_agent::source::kube::API_ACCESS;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The name of the agent's container in the DaemonSet.
const AGENT: &str = "lb-agent";
/// Where the host's bpf filesystem is.
const HOST_BPFFS: &str = "/sys/fs/bpf";
/// Where the host's cgroup2 hierarchy is: unified hosts, then hybrid ones.
const HOST_CGROUP2: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
/// The capabilities the agent gets, each explained in deploy/daemonset.yaml.
const CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

/// Every object of `deploy/`, by kind.
#[derive(Default)]
struct Deploy {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    daemon_sets: Vec<DaemonSet>,
    /// `resources` of `kustomization.yaml`.
    kustomize_resources: Option<Vec<String>>,
    /// The YAML files that hold objects (all but the kustomization).
    object_files: BTreeSet<String>,
}

impl Deploy {
    fn service_account(&self) -> &ServiceAccount {
        only("ServiceAccount", &self.service_accounts)
    }

    fn cluster_role(&self) -> &ClusterRole {
        only("ClusterRole", &self.cluster_roles)
    }

    fn binding(&self) -> &ClusterRoleBinding {
        only("ClusterRoleBinding", &self.cluster_role_bindings)
    }

    fn daemon_set(&self) -> &DaemonSet {
        only("DaemonSet", &self.daemon_sets)
    }
}

fn only<'a, T>(kind: &str, objects: &'a [T]) -> &'a T {
    match objects {
        [object] => object,
        _ => panic!(
            "deploy/ must hold exactly one {kind}, found {}",
            objects.len()
        ),
    }
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Reads every `*.yaml`/`*.yml` of `deploy/` (multi-document).
fn load() -> Deploy {
    let dir = deploy_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("reading deploy/").path())
        .filter(|path| {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    let mut deploy = Deploy::default();
    for path in files {
        let name = path
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {name}: {e}"));
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (index, document) in documents.into_iter().enumerate() {
            if document.is_null() {
                continue;
            }
            let origin = format!("{name}, document {}", index + 1);
            let text_of = |key: &str| document[key].as_str().unwrap_or_default().to_owned();
            let (api_version, kind) = (text_of("apiVersion"), text_of("kind"));
            match (api_version.as_str(), kind.as_str()) {
                ("v1", "ServiceAccount") => {
                    deploy.service_accounts.push(typed(&origin, document));
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    deploy.cluster_roles.push(typed(&origin, document));
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    deploy.cluster_role_bindings.push(typed(&origin, document));
                }
                ("apps/v1", "DaemonSet") => deploy.daemon_sets.push(typed(&origin, document)),
                ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                    let resources = document["resources"]
                        .as_array()
                        .unwrap_or_else(|| panic!("{origin}: no `resources` list"))
                        .iter()
                        .map(|r| {
                            r.as_str()
                                .unwrap_or_else(|| panic!("{origin}: resource {r} is no path"))
                                .to_owned()
                        })
                        .collect();
                    assert!(
                        deploy.kustomize_resources.replace(resources).is_none(),
                        "{origin}: a second Kustomization"
                    );
                    continue;
                }
                _ => panic!(
                    "{origin}: `{api_version}` `{kind}` is not checked by tests/deploy.rs; \
                     teach it (an unchecked Role, binding or container could grant more \
                     than this test allows)"
                ),
            }
            deploy.object_files.insert(name.clone());
        }
    }
    deploy
}

/// `document` as a `T`, which must serialize back to the same fields: anything else was
/// dropped by the type, i.e. is no field of that Kubernetes kind.
fn typed<T: DeserializeOwned + Serialize>(origin: &str, document: Value) -> T {
    let object: T = serde_path_to_error::deserialize(document.clone())
        .unwrap_or_else(|e| panic!("{origin}: {e}"));
    let back = serde_json::to_value(&object).expect("serializing a k8s-openapi object");
    let mut lost = Vec::new();
    lost_fields(&document, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{origin}: not fields of this kind (misspelt or misplaced?): {lost:?}"
    );
    object
}

fn lost_fields(original: &Value, back: &Value, path: &str, lost: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(original), Value::Object(back)) => {
            for (key, value) in original {
                let path = format!("{path}.{key}");
                match back.get(key) {
                    Some(back) => lost_fields(value, back, &path, lost),
                    None if value.is_null() => {}
                    None => lost.push(path),
                }
            }
        }
        (Value::Array(original), Value::Array(back)) if original.len() == back.len() => {
            for (index, (value, back)) in original.iter().zip(back).enumerate() {
                lost_fields(value, back, &format!("{path}[{index}]"), lost);
            }
        }
        (original, back) if original != back => {
            lost.push(format!("{path}: {original} reads back as {back}"));
        }
        _ => {}
    }
}

/// The pod template's spec.
fn pod(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .template
        .spec
        .as_ref()
        .expect("the DaemonSet has a pod template spec")
}

fn agent(daemon_set: &DaemonSet) -> &Container {
    pod(daemon_set)
        .containers
        .iter()
        .find(|c| c.name == AGENT)
        .unwrap_or_else(|| panic!("the DaemonSet has no container named {AGENT}"))
}

/// The agent's `--flag=value` arguments after `run`, by flag.
fn run_flags(container: &Container) -> BTreeMap<String, String> {
    let args = container.args.as_deref().unwrap_or_default();
    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "the agent's args must start with the `run` subcommand: {args:?}"
    );
    assert!(
        container.command.is_none(),
        "the agent must run the image's entrypoint (lb-agent), not {:?}",
        container.command
    );
    let mut flags = BTreeMap::new();
    for arg in &args[1..] {
        let (flag, value) = arg
            .strip_prefix("--")
            .and_then(|a| a.split_once('='))
            .unwrap_or_else(|| panic!("write every argument as --flag=value, not {arg:?}"));
        assert!(
            flags.insert(flag.to_owned(), value.to_owned()).is_none(),
            "--{flag} is given twice"
        );
    }
    flags
}

fn flag<'a>(flags: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    flags
        .get(name)
        .unwrap_or_else(|| panic!("the agent's args lack --{name}"))
}

/// `--api-addr` of the agent.
fn api_addr(daemon_set: &DaemonSet) -> SocketAddr {
    let flags = run_flags(agent(daemon_set));
    let addr = flag(&flags, "api-addr");
    addr.parse()
        .unwrap_or_else(|e| panic!("--api-addr={addr} is no IP:PORT: {e}"))
}

/// `--healthz-bind-address` of the agent (kube-proxy's node health server).
fn healthz_addr(daemon_set: &DaemonSet) -> SocketAddr {
    let flags = run_flags(agent(daemon_set));
    let addr = flag(&flags, "healthz-bind-address");
    addr.parse()
        .unwrap_or_else(|e| panic!("--healthz-bind-address={addr} is no IP:PORT: {e}"))
}

/// `lb-agent run --help`.
fn run_help_text() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args(["run", "--help"])
        .output()
        .expect("running lb-agent run --help");
    assert!(
        output.status.success(),
        "lb-agent run --help failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 help")
}

/// The long flags `lb-agent run --help` lists.
fn run_help_flags() -> BTreeSet<String> {
    let help = run_help_text();
    // Option lines are indented by at most 6 columns; descriptions by 10.
    help.lines()
        .filter(|line| {
            let trimmed = line.trim_start();
            trimmed.starts_with('-') && line.len() - trimmed.len() < 10
        })
        .flat_map(|line| line.split(|c: char| c.is_whitespace() || c == ','))
        .filter_map(|token| token.strip_prefix("--"))
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The volume a container mounts at exactly `mount_path`, with that mount.
fn mounted_at<'a>(
    pod: &'a PodSpec,
    container: &'a Container,
    mount_path: &str,
) -> Option<(&'a VolumeMount, &'a Volume)> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == Path::new(mount_path))?;
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("volume {} is mounted but not defined", mount.name));
    Some((mount, volume))
}

fn host_path(volume: &Volume) -> Option<&str> {
    volume.host_path.as_ref().map(|h| h.path.as_str())
}

fn is_privileged(container: &Container) -> bool {
    container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false)
}

#[test]
fn cluster_role_grants_exactly_api_access() {
    let deploy = load();
    let role = deploy.cluster_role();
    assert!(
        role.aggregation_rule.is_none(),
        "an aggregated ClusterRole gets rules from elsewhere"
    );
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.non_resource_urls.is_none(),
            "the agent reads no non-resource URLs: {rule:?}"
        );
        assert!(
            rule.resource_names.is_none(),
            "the agent lists and watches whole collections: no resourceNames ({rule:?})"
        );
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        for value in groups.iter().chain(resources).chain(&rule.verbs) {
            assert!(!value.contains('*'), "no wildcards in RBAC rules: {rule:?}");
        }
        for group in groups {
            for resource in resources {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let needed: BTreeSet<_> = API_ACCESS
        .iter()
        .flat_map(|access| {
            access.verbs.iter().map(|verb| {
                (
                    access.group.to_owned(),
                    access.resource.to_owned(),
                    (*verb).to_owned(),
                )
            })
        })
        .collect();
    assert_eq!(
        granted, needed,
        "the ClusterRole must grant exactly lb_agent::source::kube::API_ACCESS \
         as (group, resource, verb)"
    );
}

#[test]
fn binding_binds_the_role_to_the_service_account() {
    let deploy = load();
    let (account, role, binding) = (
        deploy.service_account(),
        deploy.cluster_role(),
        deploy.binding(),
    );
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(
        subjects.len(),
        1,
        "bind the role to the agent's ServiceAccount only: {subjects:?}"
    );
    let subject = &subjects[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, account.metadata.namespace);
    assert_eq!(account.metadata.namespace.as_deref(), Some("kube-system"));
}

#[test]
fn daemon_set_runs_as_the_service_account_on_every_node_host_network() {
    let deploy = load();
    let (account, daemon_set) = (deploy.service_account(), deploy.daemon_set());
    assert_eq!(daemon_set.metadata.namespace, account.metadata.namespace);
    let pod = pod(daemon_set);
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_ne!(pod.automount_service_account_token, Some(false));
    assert_ne!(account.automount_service_account_token, Some(false));
    assert_eq!(
        pod.host_network,
        Some(true),
        "the programs and the API belong to the node's network namespace"
    );
    assert_eq!(
        pod.dns_policy.as_deref(),
        Some("Default"),
        "the node's resolver: cluster DNS sits behind a ClusterIP that only the agent \
         makes reachable"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        }),
        "tolerate every taint, so that every node gets the agent"
    );
    assert_ne!(pod.host_pid, Some(true));
    assert_ne!(pod.host_ipc, Some(true));

    let spec = &daemon_set.spec;
    let strategy = spec.update_strategy.as_ref().expect("an update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref()),
        Some(&IntOrString::Int(1))
    );
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.and_then(|l| l.get(key)),
            Some(value),
            "the selector must match the pod template's labels"
        );
    }

    // The init container runs a shell script from the agent's image (Dockerfile: Debian).
    let image = agent(daemon_set).image.as_deref().expect("an image");
    for container in pod.init_containers.iter().flatten() {
        assert_eq!(
            container.image.as_deref(),
            Some(image),
            "init container {} must use the agent's image",
            container.name
        );
    }
}

#[test]
fn daemon_set_passes_only_flags_of_lb_agent_run() {
    let deploy = load();
    let container = agent(deploy.daemon_set());
    let flags = run_flags(container);
    let known = run_help_flags();
    let unknown: Vec<_> = flags.keys().filter(|f| !known.contains(*f)).collect();
    assert!(
        unknown.is_empty(),
        "flags that `lb-agent run --help` does not list: {unknown:?} (it lists {known:?})"
    );
    for name in ["node-name", "cgroup", "api-addr"] {
        flag(&flags, name);
    }
    // --bpf-pin-path comes from its environment variable (which `kubectl exec`'d commands
    // see too); `lb-agent run --help` must name it.
    let env_vars = container.env.as_deref().unwrap_or_default();
    assert!(
        flags.contains_key("bpf-pin-path") || env_vars.iter().any(|e| e.name == "LB_BPF_PIN_PATH"),
        "the agent must be given its pin directory"
    );
    assert!(
        run_help_text().contains("LB_BPF_PIN_PATH"),
        "lb-agent run --help does not name LB_BPF_PIN_PATH"
    );
    // The API server is the source: no manifests directory, in-cluster config.
    for name in ["manifests", "kubeconfig"] {
        assert!(!flags.contains_key(name), "--{name} must not be set");
    }
    let env = container.env.as_deref().unwrap_or_default();
    for name in ["LB_MANIFESTS", "KUBECONFIG"] {
        assert!(env.iter().all(|e| e.name != name), "{name} must not be set");
    }
    // $(VAR) in args is expanded only for variables the container defines.
    for value in flags.values() {
        for reference in value.split("$(").skip(1) {
            let name = reference
                .split_once(')')
                .unwrap_or_else(|| panic!("unterminated $( in {value}"))
                .0;
            assert!(
                env.iter().any(|e| e.name == name),
                "{value} refers to ${name}, which the container's env does not define"
            );
        }
    }
}

#[test]
fn node_name_comes_from_the_downward_api() {
    let deploy = load();
    let container = agent(deploy.daemon_set());
    assert_eq!(flag(&run_flags(container), "node-name"), "$(NODE_NAME)");
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("a NODE_NAME env variable");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    assert!(matches!(field.api_version.as_deref(), None | Some("v1")));
}

#[test]
fn daemon_set_mounts_the_host_bpffs_and_cgroup2_where_the_flags_point() {
    let deploy = load();
    let daemon_set = deploy.daemon_set();
    let (pod, container) = (pod(daemon_set), agent(daemon_set));
    let flags = run_flags(container);

    // --bpf-pin-path is a directory of the host's bpffs, and only that directory of it is
    // mounted, so that the pins survive the pod.
    let pin_path = flags.get("bpf-pin-path").map_or_else(
        || {
            container
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "LB_BPF_PIN_PATH")
                .and_then(|e| e.value.as_deref())
                .expect("--bpf-pin-path or LB_BPF_PIN_PATH")
        },
        String::as_str,
    );
    let (mount, volume) = mounted_at(pod, container, pin_path)
        .unwrap_or_else(|| panic!("--bpf-pin-path={pin_path} must be a volume mount"));
    let host = host_path(volume).unwrap_or_else(|| panic!("{pin_path} must be a hostPath"));
    assert!(
        Path::new(host).starts_with(HOST_BPFFS) && host != HOST_BPFFS,
        "the pins must be a directory below the host's {HOST_BPFFS}, not {host}"
    );
    assert_ne!(mount.read_only, Some(true), "the agent pins into the bpffs");
    assert_eq!(
        mount.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "Bidirectional is for privileged containers only"
    );
    for other in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let whole_bpffs = other.volume_mounts.iter().flatten().any(|m| {
            pod.volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .and_then(host_path)
                == Some(HOST_BPFFS)
        });
        assert!(
            !whole_bpffs,
            "{}: the whole of the host's {HOST_BPFFS} is mounted (only deploy/mount-bpffs, \
             for hosts without bpffs, may)",
            other.name
        );
    }

    // --cgroup is the host's cgroup2 root (without it the agent would attach to the root of
    // the container's own cgroup namespace).
    let cgroup = flag(&flags, "cgroup");
    let (mount, volume) = mounted_at(pod, container, cgroup)
        .unwrap_or_else(|| panic!("--cgroup={cgroup} must be a volume mount"));
    let host = host_path(volume).unwrap_or_else(|| panic!("{cgroup} must be a hostPath"));
    assert!(
        HOST_CGROUP2.contains(&host),
        "--cgroup must be the host's cgroup2 root ({HOST_CGROUP2:?}), not {host}"
    );
    assert!(
        mount.mount_propagation.is_none() || mount.mount_propagation.as_deref() == Some("None"),
        "the cgroup mount needs no propagation"
    );
}

#[test]
fn agent_is_not_privileged() {
    let deploy = load();
    let daemon_set = deploy.daemon_set();
    let pod = pod(daemon_set);
    // Not even an init container: the privileged one that mounts bpffs is only for hosts
    // without it (deploy/mount-bpffs/).
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert!(
            !is_privileged(container),
            "container {} must not be privileged",
            container.name
        );
    }
    // Kubernetes accepts Bidirectional propagation only in privileged containers; only init
    // containers (which exit before the agent starts) may be.
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        for mount in container.volume_mounts.iter().flatten() {
            if mount.mount_propagation.as_deref() == Some("Bidirectional") {
                assert!(
                    is_privileged(container),
                    "{}: Bidirectional mount {} in an unprivileged container is rejected",
                    container.name,
                    mount.mount_path
                );
            }
        }
    }

    let security = agent(daemon_set)
        .security_context
        .as_ref()
        .expect("the agent's securityContext");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security
        .capabilities
        .as_ref()
        .expect("the agent's capabilities");
    assert_eq!(
        capabilities.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "drop every capability not added back"
    );
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(CAPABILITIES),
        "the capabilities the agent needs, each explained in deploy/daemonset.yaml"
    );
    // RuntimeDefault (containers-common) allows bpf(2) only with CAP_SYS_ADMIN: the agent's
    // own profile, which an init container installs where the kubelet reads it.
    let profile = security.seccomp_profile.as_ref().expect("a seccompProfile");
    assert_eq!(profile.type_, "Localhost");
    let name = profile
        .localhost_profile
        .as_deref()
        .expect("localhostProfile");
    let installer = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| {
            c.command
                .iter()
                .flatten()
                .any(|line| line.contains("lb-agent seccomp-profile") && line.contains(name))
        })
        .unwrap_or_else(|| panic!("no init container installs the seccomp profile {name}"));
    let (_, volume) = mounted_at(pod, installer, "/host/seccomp").expect("the kubelet's dir");
    assert_eq!(host_path(volume), Some("/var/lib/kubelet/seccomp"));
    assert!(!is_privileged(installer));
}

/// The seccomp profile is the runtimes' default plus bpf(2): it still refuses by default,
/// allows bpf(2) without conditions, and still refuses what the default refuses or keeps
/// for capabilities the agent lacks (CAP_SYS_ADMIN, CAP_SYS_MODULE).
#[test]
fn seccomp_profile_adds_only_bpf_to_the_runtime_default() {
    let profile: Value = serde_json::from_str(lb_agent::SECCOMP_PROFILE).expect("JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let unconditional: BTreeSet<&str> = profile["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .filter(|rule| {
            rule["action"] == "SCMP_ACT_ALLOW"
                && rule["args"].as_array().is_none_or(Vec::is_empty)
                && rule["includes"]
                    .as_object()
                    .is_none_or(serde_json::Map::is_empty)
        })
        .flat_map(|rule| rule["names"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    assert!(unconditional.contains("bpf"));
    // What the default refuses, or allows only with a capability the agent lacks.
    for refused in [
        "kexec_load",
        "swapon",
        "init_module",
        "perf_event_open",
        "fanotify_init",
        "quotactl",
        "sethostname",
        "setdomainname",
        "lookup_dcookie",
    ] {
        assert!(
            !unconditional.contains(refused),
            "{refused} is allowed without conditions"
        );
    }
}

fn check_probe(container: &Container, probe: Option<&Probe>, path: &str, addr: SocketAddr) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("an HTTP GET probe of {path}"));
    assert_eq!(get.path.as_deref(), Some(path));
    assert!(matches!(get.scheme.as_deref(), None | Some("HTTP")));
    let port = match &get.port {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_ref() == Some(name))
                .unwrap_or_else(|| panic!("probe of {path}: no container port named {name}"))
                .container_port
        }
    };
    assert_eq!(
        port,
        i32::from(addr.port()),
        "probe of {path} must use the port the agent serves it on ({addr})"
    );
    if !addr.ip().is_unspecified() {
        assert_eq!(
            get.host.as_deref(),
            Some(addr.ip().to_string().as_str()),
            "probe of {path}: the agent listens on {} only, and without `host` the kubelet \
             probes the pod IP (the node's address)",
            addr.ip()
        );
    }
}

#[test]
fn probes_use_the_agents_addresses() {
    let deploy = load();
    let daemon_set = deploy.daemon_set();
    let container = agent(daemon_set);
    // Liveness as kube-proxy's DaemonSet has it: /livez of the node health server (sync
    // health without the node's eligibility, so draining a node restarts nothing).
    check_probe(
        container,
        container.liveness_probe.as_ref(),
        "/livez",
        healthz_addr(daemon_set),
    );
    check_probe(
        container,
        container.readiness_probe.as_ref(),
        "/readyz",
        api_addr(daemon_set),
    );
}

#[test]
fn agent_has_resource_requests_and_a_memory_limit() {
    let deploy = load();
    let resources = agent(deploy.daemon_set())
        .resources
        .as_ref()
        .expect("the agent's resources");
    let requests = resources.requests.as_ref().expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    let limits = resources.limits.as_ref().expect("resource limits");
    assert!(limits.contains_key("memory"));
}

#[test]
fn kustomization_lists_every_manifest() {
    let deploy = load();
    let listed: BTreeSet<String> = deploy
        .kustomize_resources
        .clone()
        .expect("deploy/kustomization.yaml")
        .into_iter()
        .collect();
    assert_eq!(
        listed, deploy.object_files,
        "kustomization.yaml must list every manifest of deploy/"
    );
}
