//! The DaemonSet's own pod spec, run for real: the agent's image (the layout `cargo xtask
//! image` builds, around the debug binary unless `LB_IMAGE_ARCHIVE` names an archive) loaded
//! into rootful podman, and `deploy/daemonset.yaml`'s pod template rendered for node `node-a`
//! (`lb_tests::pod_spec`) and run with exactly its capabilities, user, security options,
//! memory limit, mounts, environment and arguments, init container first.
//!
//! What stands in for the real node, and nothing else: the test's node namespace for the host
//! network (`--network ns:`), the test's cgroup for the host's cgroup2 root (the `cgroup2`
//! volume), a shared, empty directory for the host's `/sys/fs/bpf` (the init container mounts
//! bpffs there, as on a host without one), and a kubeconfig for the fake API server (`KUBECONFIG`)
//! in place of the ServiceAccount credentials only a real API server can issue.
//!
//! These tests need podman (`cargo xtask test` installs it). `LB_SKIP_CONTAINER_TESTS=1` skips
//! them on purpose; nothing else does.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lb_tests::bpffs::SharedMountPoint;
use lb_tests::manifests::{endpoint_slice, service};
use lb_tests::pod_spec::{self, HttpProbe, RenderedPod};
use lb_tests::podman::{Podman, RunOptions};
use lb_tests::{ApiServer, Frontend, NODE_EXT_IP, TestEnv, bins, http, require_privileges};

const NODE: &str = "node-a";
const VIP: &str = "10.96.0.10:80";
const NODE_PORT: u16 = 30080;
/// How long the agent may take from `podman run` to ready (a cold vfs container start, the
/// programs' load and the first sync).
const STARTUP: Duration = Duration::from_secs(90);
const APPLY: Duration = Duration::from_secs(20);
/// Where the fake API server's kubeconfig is in the container.
const KUBECONFIG: &str = "/run/lb-test/kubeconfig";

/// Whether the person running the suite opted out of the container tests.
fn skipped_on_purpose() -> bool {
    if std::env::var("LB_SKIP_CONTAINER_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: LB_SKIP_CONTAINER_TESTS=1");
        return true;
    }
    false
}

/// A node running the DaemonSet's pod in podman. Fields drop in order: the containers, the
/// pins and the bpffs stand-in, the API server, then the namespaces and cgroup.
struct ContainerNode {
    podman: Podman,
    bpffs: SharedMountPoint,
    api: ApiServer,
    pod: RenderedPod,
    options: RunOptions,
    env: TestEnv,
}

impl ContainerNode {
    /// The image loaded under the DaemonSet's image name, the pod rendered, the init
    /// containers run (they must mount bpffs on the stand-in for `/sys/fs/bpf`).
    #[track_caller]
    fn new() -> Self {
        let env = TestEnv::new();
        let work = env.manifests.work_dir().to_path_buf();
        let podman = Podman::new(&work);
        // The host's bpffs, mounted as systemd mounts it at boot; the DaemonSet mounts only
        // the agent's pin directory of it, which the kubelet creates (DirectoryOrCreate).
        let bpffs = SharedMountPoint::new(&work.join("host-sys-fs-bpf"));
        bpffs.mount_bpffs();
        let pins = bpffs.path().join("lb");
        std::fs::create_dir(&pins).unwrap_or_else(|e| panic!("mkdir {}: {e}", pins.display()));
        let seccomp = work.join("host-kubelet-seccomp");
        std::fs::create_dir(&seccomp)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", seccomp.display()));
        let host_paths = BTreeMap::from([
            ("/sys/fs/bpf/lb", pins),
            ("/sys/fs/cgroup", env.cgroup.path().to_path_buf()),
            (pod_spec::KUBELET_SECCOMP, seccomp),
        ]);
        let pod = pod_spec::render(&pod_spec::daemonset_path(), NODE, &host_paths);
        assert!(pod.host_network, "the agent runs on the host network");
        let loaded = podman.load(&image_archive(&work));
        podman
            .run_args(&["tag", &loaded, &pod.agent.image])
            .unwrap_or_else(|e| panic!("{e}"));

        let api = ApiServer::start_in(env.topo.node().name());
        let kubeconfig = work.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let options = RunOptions {
            netns: Some(env.topo.node().path()),
            env: vec![("KUBECONFIG".to_owned(), KUBECONFIG.to_owned())],
            files: vec![(kubeconfig, KUBECONFIG.to_owned())],
            ..RunOptions::default()
        };
        let node = Self {
            podman,
            bpffs,
            api,
            pod,
            options,
            env,
        };
        node.run_init_containers();
        node
    }

    #[track_caller]
    fn run_init_containers(&self) {
        for init in &self.pod.init {
            let out = self
                .podman
                .run(init, &self.options)
                .unwrap_or_else(|e| panic!("init container {}: {e}", init.name));
            eprintln!("init container {}: {}", init.name, out.trim());
        }
        // The seccomp profile the agent's container names is where the kubelet reads it.
        if let pod_spec::Seccomp::Localhost(profile) = &self.pod.agent.seccomp {
            let installed = std::fs::read_to_string(profile).unwrap_or_else(|e| {
                panic!(
                    "the init containers installed no {}: {e}",
                    profile.display()
                )
            });
            assert_eq!(
                installed,
                lb_agent_profile(),
                "the installed seccomp profile"
            );
        }
    }

    /// Starts the agent's container, leaving out `without_caps`.
    #[track_caller]
    fn start_agent(&self, name: &str, without_caps: &[String]) {
        let mut container = self.pod.agent.clone();
        container.name = name.to_owned();
        let options = RunOptions {
            without_caps: without_caps.to_vec(),
            detach: true,
            ..self.options.clone()
        };
        self.podman
            .run(&container, &options)
            .unwrap_or_else(|e| panic!("starting the agent's container: {e}"));
    }

    /// `GET` of an HTTP probe from the node, as the kubelet does (no host: the pod's IP,
    /// which on the host network is the node's), until it answers 200 while the container
    /// `name` runs; panics with the container's log otherwise.
    #[track_caller]
    fn wait_for_probe(&self, name: &str, probe: &HttpProbe, timeout: Duration) {
        let host = probe
            .host
            .clone()
            .unwrap_or_else(|| NODE_EXT_IP.to_string());
        let target: SocketAddr = format!("{host}:{}", probe.port)
            .parse()
            .expect("probe address");
        let deadline = Instant::now() + timeout;
        loop {
            let answer = http::get_in(self.env.topo.node().name(), target, &probe.path);
            if answer.status == 200 {
                return;
            }
            let state = self.podman.state(name);
            if Instant::now() >= deadline
                || !matches!(&state, Ok((status, _)) if status == "running")
            {
                self.fail(
                    name,
                    &format!("probe {probe:?}: {answer:?}; container {state:?}"),
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `lb-agent services` inside the container (`kubectl exec ds/lb-agent -- lb-agent
    /// services --api-addr 127.0.0.1:10266`, as docs/deploy.md has it), as JSON.
    fn services_in_container(&self, name: &str) -> Result<Vec<Frontend>, String> {
        let out = self.podman.exec(
            name,
            &[
                "lb-agent",
                "services",
                "--api-addr",
                "127.0.0.1:10266",
                "-o",
                "json",
            ],
        )?;
        serde_json::from_str(&out).map_err(|e| format!("lb-agent services: {e}: {out}"))
    }

    /// Panics with the container's log.
    #[track_caller]
    fn fail(&self, name: &str, what: &str) -> ! {
        panic!(
            "{what}\n----- podman logs {name} -----\n{}\n----- end -----",
            self.podman.logs(name)
        )
    }
}

/// The OCI archive to run: `$LB_IMAGE_ARCHIVE` (what `cargo xtask test` built with `cargo
/// xtask image`), else the same layout built here around the agent under test.
#[track_caller]
fn image_archive(work: &std::path::Path) -> PathBuf {
    if let Some(archive) = std::env::var_os("LB_IMAGE_ARCHIVE") {
        return PathBuf::from(archive);
    }
    let agent = bins::agent();
    bins::require(&agent, "cargo build -p lb-agent, or set LB_AGENT_BIN");
    let archive = work.join("lb-agent.oci.tar");
    let spec = lb_image::ImageSpec {
        agent,
        name: "lb-agent:test".to_owned(),
        version: "test".to_owned(),
        revision: "test".to_owned(),
        created: "1970-01-01T00:00:00Z".to_owned(),
        created_epoch: 0,
        compress: false,
    };
    lb_image::build(&spec, &archive).unwrap_or_else(|e| panic!("building the image: {e:#}"));
    archive
}

/// `deploy/seccomp/lb-agent.json`, which `lb-agent seccomp-profile` prints.
fn lb_agent_profile() -> String {
    let path = pod_spec::daemonset_path()
        .parent()
        .expect("deploy/")
        .join("seccomp/lb-agent.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn web_service() -> k8s_openapi::api::core::v1::Service {
    service("web", "10.96.0.10")
        .type_("NodePort")
        .node_port(80, 8080, i32::from(NODE_PORT), "TCP")
        .build()
}

#[test]
fn the_daemonsets_pod_serves_cluster_ip_and_node_port_and_its_pins_outlive_it() {
    if skipped_on_purpose() || !require_privileges() {
        return;
    }
    let node = ContainerNode::new();
    let web1 = node.env.topo.add_pod("web1");
    let _s1 = web1.spawn_server("web1", 8080);
    let web2 = node.env.topo.add_pod("web2");
    let _s2 = web2.spawn_server("web2", 8080);
    let client = node.env.topo.add_pod("client");
    let outside = node.env.topo.add_external_client("outside");
    node.api.apply(web_service());
    node.api.apply(
        endpoint_slice("web-a", "web")
            .endpoint(web1.ip(), true)
            .endpoint(web2.ip(), true)
            .port(None, 8080, "TCP")
            .build(),
    );

    let agent = "lb-agent";
    node.start_agent(agent, &[]);
    let readiness = node.pod.agent.readiness.clone().expect("a readiness probe");
    node.wait_for_probe(agent, &readiness, STARTUP);
    let liveness = node.pod.agent.liveness.clone().expect("a liveness probe");
    node.wait_for_probe(agent, &liveness, APPLY);

    // kubectl exec ... lb-agent services: the Service with both backends, by name.
    let deadline = Instant::now() + APPLY;
    let frontend = loop {
        let listing = node.services_in_container(agent);
        let found = listing.as_ref().ok().and_then(|frontends| {
            frontends
                .iter()
                .find(|f| f.addr() == VIP && f.backends.len() == 2 && f.service.is_some())
                .cloned()
        });
        if let Some(found) = found {
            break found;
        }
        if Instant::now() >= deadline {
            node.fail(
                agent,
                &format!("{VIP} with 2 backends not listed: {listing:?}"),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(frontend.service.as_deref(), Some("default/web"));

    let cluster_ip = client.client(&node.env.cgroup, VIP, 20);
    assert_eq!(cluster_ip.host_names(), ["web1", "web2"], "{cluster_ip:?}");
    let target = format!("{NODE_EXT_IP}:{NODE_PORT}");
    let node_port = outside.client_with().count(10).run(&target);
    assert_eq!(node_port.ok, 10, "NodePort from outside: {node_port:?}");

    // The pod goes (SIGTERM, as the kubelet stops it): Services keep working from the pins.
    node.podman
        .run_args(&["stop", "--time", "30", agent])
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, code) = node.podman.state(agent).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (status.as_str(), code),
        ("exited", 0),
        "the agent's exit on SIGTERM"
    );
    let after = client.client(&node.env.cgroup, VIP, 20);
    assert_eq!(
        after.host_names(),
        ["web1", "web2"],
        "after the agent stopped: {after:?}"
    );
    let node_port = outside.client_with().count(10).run(&target);
    assert_eq!(
        node_port.ok, 10,
        "NodePort after the agent stopped: {node_port:?}"
    );
}

#[test]
fn each_declared_capability_is_needed_and_its_absence_is_named() {
    if skipped_on_purpose() || !require_privileges() {
        return;
    }
    let node = ContainerNode::new();
    node.api.apply(web_service());
    let pins = node.bpffs.path().join("lb");
    for cap in node.pod.agent.caps_add.clone() {
        let name = format!("lb-agent-without-{}", cap.to_lowercase().replace('_', "-"));
        node.start_agent(&name, std::slice::from_ref(&cap));
        let deadline = Instant::now() + STARTUP;
        let code = loop {
            match node.podman.state(&name) {
                Ok((status, code)) if status == "exited" => break code,
                Ok(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => node.fail(
                    &name,
                    &format!("without CAP_{cap} the agent still runs after {STARTUP:?}: {other:?}"),
                ),
            }
        };
        let logs = node.podman.logs(&name);
        assert_ne!(code, 0, "without CAP_{cap}: exit code\n{logs}");
        assert!(
            logs.contains(&format!("lacks CAP_{cap}")),
            "without CAP_{cap} the error does not name it:\n{logs}"
        );
        // What the failed start left (maps created before the refusal) goes before the next.
        if pins.exists() {
            lb_tests::bpffs::agent_cleanup(&pins).unwrap_or_else(|e| panic!("{e}"));
        }
        // Cleanup removed the emptied directory; the kubelet creates it for the next pod.
        if !pins.exists() {
            std::fs::create_dir(&pins).unwrap_or_else(|e| panic!("mkdir {}: {e}", pins.display()));
        }
    }
}
