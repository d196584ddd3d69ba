//! Everything one end-to-end test needs, dropped in the right order.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::agent::{Agent, AgentConfig};
use crate::{Manifests, PinDir, TestCgroup, Topology};

/// Where [`TestEnv::agent_with_api`] serves the agent's API: the loopback of the test's own node
/// namespace, where `lb-agent run` and `lb-agent services` both run. Every test has its own node
/// namespace, so one fixed address cannot clash between parallel tests, nor with anything of the
/// host.
pub const API_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9901));

/// A node topology, a cgroup, a pin directory and a manifests directory.
///
/// Start the agent with [`TestEnv::agent`] and keep it in a local declared after the env, so it
/// stops before the env's guards run. Fields drop in declaration order: the pins (after
/// `lb-agent cleanup`), then the cgroup, the manifests, the namespaces.
#[derive(Debug)]
pub struct TestEnv {
    pub pins: PinDir,
    pub cgroup: TestCgroup,
    pub manifests: Manifests,
    pub topo: Topology,
}

impl TestEnv {
    #[track_caller]
    pub fn new() -> Self {
        Self {
            pins: PinDir::new(),
            cgroup: TestCgroup::new(),
            manifests: Manifests::new(),
            topo: Topology::new(),
        }
    }

    /// How the agent of this test is started: in the node namespace, attached to the test cgroup.
    pub fn agent_config(&self) -> AgentConfig {
        AgentConfig {
            manifests: self.manifests.dir().to_path_buf(),
            kubeconfig: None,
            cgroup: self.cgroup.path().to_path_buf(),
            pin_path: self.pins.path().to_path_buf(),
            netns: Some(self.topo.node().name().to_owned()),
            log: self.manifests.work_dir().join("agent.log"),
            api_addr: None,
            extra_args: Vec::new(),
        }
    }

    /// Starts `lb-agent run` for this test.
    #[track_caller]
    pub fn agent(&self) -> Agent {
        let mut agent = Agent::new(self.agent_config());
        agent.start();
        agent
    }

    /// Starts `lb-agent run` with more arguments (`--devices ext0 --node-name node-a`).
    #[track_caller]
    pub fn agent_with(&self, args: &[&str]) -> Agent {
        let mut agent = Agent::new(AgentConfig {
            extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..self.agent_config()
        });
        agent.start();
        agent
    }

    /// Starts `lb-agent run --api-addr` [`API_ADDR`]; [`Agent::services`] then passes the same
    /// `--api-addr`, so frontends carry Service and port names and backends their sources.
    #[track_caller]
    pub fn agent_with_api(&self) -> Agent {
        let mut agent = Agent::new(AgentConfig {
            api_addr: Some(API_ADDR),
            ..self.agent_config()
        });
        agent.start();
        agent
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    /// A fake API server in this test's node namespace, and an agent (not started yet)
    /// that watches it instead of the manifests directory.
    #[track_caller]
    pub fn agent_on_api_server(&self) -> (crate::ApiServer, Agent) {
        let api = crate::ApiServer::start_in(self.topo.node().name());
        let kubeconfig = self.manifests.work_dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let agent = Agent::new(AgentConfig {
            kubeconfig: Some(kubeconfig),
            ..self.agent_config()
        });
        (api, agent)
    }
}

/// A backend pod: its namespace and its running HTTP server.
#[derive(Debug)]
pub struct BackendPod {
    pub pod: crate::Pod,
    pub server: crate::Server,
}

/// Which addresses of a dual-stack backend its servers listen on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Ipv6Only,
    Both,
}

/// A dual-stack backend pod and its running HTTP servers.
#[derive(Debug)]
pub struct DualStackBackend {
    pub pod: crate::Pod,
    pub servers: Vec<crate::Server>,
}

impl TestEnv {
    /// A pod `name` in namespace `default`, labelled `app: <app>`, with an HTTP server answering
    /// as `name` on `port` (container port `http`), and its Pod manifest in `pod-<name>.yaml`.
    #[track_caller]
    pub fn add_backend(&self, name: &str, app: &str, port: u16) -> BackendPod {
        let pod = self.topo.add_pod(name);
        let server = pod.spawn_server(name, port);
        self.manifests.write(
            &Self::pod_file(name),
            &crate::manifests::pod(name, pod.ip())
                .label("app", app)
                .container_port("http", i32::from(port))
                .yaml(),
        );
        BackendPod { pod, server }
    }

    /// A dual-stack pod `name` (both addresses in `status.podIPs`, labelled `app: <app>`,
    /// container port `http` `port`) with HTTP servers on the addresses `listen` names: with
    /// both, the IPv4 one answers as `name` and the IPv6 one as `name-v6`; with IPv6 only,
    /// it answers as `name`. Its Pod manifest is in `pod-<name>.yaml`.
    #[track_caller]
    pub fn add_dual_stack_backend(
        &self,
        name: &str,
        app: &str,
        port: u16,
        listen: Listen,
    ) -> DualStackBackend {
        let pod = self.topo.add_pod(name);
        let servers = match listen {
            Listen::Ipv6Only => vec![pod.spawn_server6(name, port)],
            Listen::Both => vec![
                pod.spawn_server(name, port),
                pod.spawn_server6(&format!("{name}-v6"), port),
            ],
        };
        self.manifests.write(
            &Self::pod_file(name),
            &crate::manifests::pod(name, pod.ip())
                .also_ip(pod.ip6())
                .label("app", app)
                .container_port("http", i32::from(port))
                .yaml(),
        );
        DualStackBackend { pod, servers }
    }

    /// The file [`TestEnv::add_backend`] writes the Pod manifest of `name` to.
    pub fn pod_file(name: &str) -> String {
        format!("pod-{name}.yaml")
    }
}
