//! `cargo xtask demo`: the scene of the seed article ("Communication between Microservices in a
//! Kubernetes cluster") played with the agent on network namespaces instead of a cluster:
//! a Pod IP, the ClusterIP, the service environment variables (`lb-agent env`), names through
//! the agent's cluster DNS (a pod resolv.conf naming kube-dns), scaling to three replicas, the
//! agent's own view, the article's `mysqlauth-service` NodePort reached from outside the node,
//! and a Service without endpoints refusing connections at once.
//!
//! Pods are network namespaces `lbdemo-<pod>` on a bridge in `lbdemo-node`; the web servers are
//! `lb-testkit serve`; the client runs `curl` in its namespace and in the cgroup the agent hooks.
//! [`lab::Lab`] owns all of it and removes it on success, error and Ctrl-C.
mod agent;
mod client;
mod lab;
mod manifests;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};

use self::client::{Client, Reply};
use self::lab::{Lab, Paths};
use self::manifests::{PodRow, ReplicaSet};
use crate::{cmd, host, install};

/// The Pods of the Deployment get 10.244.0.10, .11, …
const FIRST_POD_HOST: u8 = 10;
const REPLICAS: usize = 3;
const REQUESTS: usize = 30;
/// A refused connect must come back faster than this (a timeout or ARP failure takes seconds).
const REFUSAL_LIMIT: Duration = Duration::from_secs(1);

pub fn run() -> Result<()> {
    host::require_root("`cargo xtask demo` (network namespaces, a cgroup, eBPF programs)")?;
    install::ensure_build_prereqs()?;
    build_binaries()?;
    let debug = crate::target_dir().join("debug");
    let paths = Paths {
        cgroup: host::cgroup2_root()?.join(lab::PREFIX),
        agent_bin: debug.join("lb-agent"),
        testkit_bin: debug.join("lb-testkit"),
    };
    let lab = Lab::start(paths)?;
    let result = Scene::set_up(&lab).and_then(|mut scene| scene.play());
    if result.is_err() {
        lab.defer_to_signal_handler();
        show_logs();
    }
    drop(lab);
    result?;
    println!("\ndemo finished");
    Ok(())
}

fn build_binaries() -> Result<()> {
    let mut build = cmd::cargo();
    build.args(["build", "-p", "lb-agent", "-p", "lb-tests", "--bins"]);
    println!("==> {}", cmd::describe(&build));
    cmd::run(&mut build)
}

/// A replica the demo runs: its manifest file and its server.
struct Replica {
    name: String,
    ip: Ipv4Addr,
    file: PathBuf,
    created: Instant,
}

struct Scene<'a> {
    lab: &'a Lab,
    deployment: Deployment,
    service: Service,
    service_created: Instant,
    /// The Service's ClusterIP and port.
    frontend: (Ipv4Addr, u16),
    /// The Pods' port behind it.
    target_port: u16,
    replica_set: ReplicaSet,
    replicas: Vec<Replica>,
    next_host: u8,
    client: Client,
    client_label: String,
}

impl<'a> Scene<'a> {
    /// The manifests in the watched directory, the client pod, one replica and the agent.
    fn set_up(lab: &'a Lab) -> Result<Self> {
        let dir = Paths::manifests();
        manifests::copy_examples(&dir)?;
        println!(
            "copied {}/*.yaml to {}",
            manifests::examples_dir().display(),
            dir.display()
        );
        let deployment: Deployment = manifests::load(&dir.join(manifests::DEPLOYMENT_FILE))?;
        let service: Service = manifests::load(&dir.join(manifests::SERVICE_FILE))?;
        let client_pod: Pod = manifests::load(&dir.join(manifests::CLIENT_FILE))?;
        let client_name = client_pod
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| "client".into());
        let client_netns = lab::pod_netns(&client_name);
        lab.add_pod_netns(&client_netns, manifests::pod_ip(&client_pod)?)?;
        let deployment_name = deployment
            .metadata
            .name
            .clone()
            .context("unnamed Deployment")?;
        let mut scene = Self {
            lab,
            frontend: manifests::frontend(&service)?,
            target_port: manifests::target_port(&service, &deployment)?,
            replica_set: ReplicaSet::new(&deployment_name)?,
            deployment,
            service,
            service_created: Instant::now(),
            replicas: Vec::new(),
            next_host: FIRST_POD_HOST,
            client: Client::with_cluster_dns(
                lab,
                &client_netns,
                manifests::namespace(&client_pod.metadata),
                agent::DNS_SERVICE_IP,
            )?,
            client_label: format!(
                "pod {client_name} in namespace {}",
                manifests::namespace(&client_pod.metadata)
            ),
        };
        scene.scale_to(1)?;
        lab.add_outside()?;
        agent::start(lab)?;
        let (ip, port) = scene.frontend;
        let what = format!("frontend {ip}:{port} in `lb-agent services`");
        agent::wait_for_frontend(
            lab,
            scene.frontend,
            &what,
            Duration::from_secs(20),
            |found| found.is_some(),
        )?;
        println!("the agent serves {ip}:{port}");
        Ok(scene)
    }

    fn play(&mut self) -> Result<()> {
        self.pod_ip()?;
        self.cluster_ip()?;
        self.environment()?;
        self.names()?;
        self.scale_out()?;
        self.inspect()?;
        self.node_port()?;
        self.no_endpoints()
    }

    /// Part 1 of the article: the Pod IP, used directly.
    fn pod_ip(&self) -> Result<()> {
        let pod = &self.replicas[0];
        heading(
            1,
            &format!("kubectl get pods -o wide; curl http://{}", pod.ip),
        );
        println!("{}", self.pods_table());
        let reply = self.curl_shown(&format!("http://{}", pod.ip))?;
        expect_host(&reply, &pod.name)
    }

    /// Part 2: the Service's ClusterIP, which only the agent's connect hook makes reachable.
    fn cluster_ip(&self) -> Result<()> {
        let url = self.service_url();
        heading(2, &format!("kubectl get svc; curl {url}"));
        self.wait_for_backends()?;
        println!(
            "{}",
            manifests::services_table(&self.service, self.service_created.elapsed())
        );
        for _ in 0..3 {
            let reply = self.curl_shown(&url)?;
            expect_host(&reply, &self.replicas[0].name)?;
        }
        Ok(())
    }

    /// Part 2, "Using Environment variables": what the kubelet injects, then the Job's command.
    fn environment(&self) -> Result<()> {
        let script =
            "curl -s http://${WEB_APP_SERVICE_SERVICE_HOST}:${WEB_APP_SERVICE_SERVICE_PORT}";
        heading(3, &format!(r#"command: ["/bin/sh", "-c", "{script}"]"#));
        let namespace = manifests::namespace(&self.service.metadata);
        println!("$ lb-agent env --namespace {namespace}    # what the kubelet gives its pods");
        let env = agent::env(self.lab, namespace)?;
        ensure!(
            env.iter().any(|(k, _)| k == "WEB_APP_SERVICE_SERVICE_HOST"),
            "lb-agent env printed no WEB_APP_SERVICE_SERVICE_HOST: {env:?}"
        );
        for (key, value) in &env {
            println!("  {key}={value}");
        }
        println!("(our client lives in another namespace, where the kubelet would not set them;");
        println!(" the demo hands them over, and the ClusterIP works from any namespace)");
        println!("$ /bin/sh -c '{script}'    # in the {}", self.client_label);
        let reply = self.client.run(&["/bin/sh", "-c", script], &env)?;
        println!("{}", reply.stdout.trim_end());
        expect_host(&reply, &self.replicas[0].name)
    }

    /// Part 3 of the article: names. The agent answers cluster DNS from its own state, as the
    /// kube-dns Service: a pod of the Service's namespace asks for `web-app-service`, one of
    /// another namespace for the fully qualified name.
    fn names(&self) -> Result<()> {
        let namespace = manifests::namespace(&self.service.metadata).to_owned();
        heading(4, r#"command: ["curl", "-s", "http://web-app-service"]"#);
        let netns = lab::pod_netns("curl");
        self.lab
            .add_pod_netns(&netns, Ipv4Addr::new(10, 244, 0, 101))?;
        let local = Client::with_cluster_dns(self.lab, &netns, &namespace, agent::DNS_SERVICE_IP)?;
        let conf = std::fs::read_to_string(lab::resolv_conf_dir(&netns).join("resolv.conf"))?;
        println!("/etc/resolv.conf of a pod in namespace {namespace}:");
        for line in conf.lines() {
            println!("  {line}");
        }
        println!("$ curl -s http://web-app-service    # in a pod of namespace {namespace}");
        let reply = local.curl("http://web-app-service")?;
        println!("{}", reply.stdout.trim_end());
        expect_host(&reply, &self.replicas[0].name)?;
        let fqdn = format!("http://web-app-service.{namespace}.svc.cluster.local");
        println!("$ curl -s {fqdn}    # in the {}", self.client_label);
        let reply = self.client.curl(&fqdn)?;
        println!("{}", reply.stdout.trim_end());
        expect_host(&reply, &self.replicas[0].name)
    }

    /// The Deployment scaled to three: every new connection picks one of the ready Pods.
    fn scale_out(&mut self) -> Result<()> {
        heading(
            5,
            &format!("kubectl scale deployment webapp1 --replicas={REPLICAS}"),
        );
        self.scale_to(REPLICAS)?;
        self.wait_for_backends()?;
        println!("{}", self.pods_table());
        let url = self.service_url();
        println!(
            "$ for i in $(seq {REQUESTS}); do curl -s {url}; done    # in the {}",
            self.client_label
        );
        let mut hits: BTreeMap<String, usize> =
            self.replicas.iter().map(|r| (r.name.clone(), 0)).collect();
        for _ in 0..REQUESTS {
            let reply = self.client.curl(&url)?;
            let host = reply.host().filter(|_| reply.ok());
            let host = host.with_context(|| format!("a request failed: {}", describe(&reply)))?;
            *hits.entry(host.to_owned()).or_default() += 1;
        }
        for (host, count) in &hits {
            println!("  {host}  {count:>2}  {}", "#".repeat(*count));
        }
        ensure!(
            hits.len() == REPLICAS,
            "answers came from unknown hosts: {hits:?}"
        );
        ensure!(
            hits.values().all(|&n| n > 0),
            "a replica got no request: {hits:?}"
        );
        Ok(())
    }

    /// The agent's own view of what it programmed.
    fn inspect(&self) -> Result<()> {
        heading(6, "lb-agent services");
        println!(
            "{}",
            agent::services_table(&self.lab.paths().agent_bin)?.trim_end()
        );
        Ok(())
    }

    /// The article's `mysqlauth-service`, type NodePort 32001, reached from a machine outside
    /// the node: the tc programs on `ext0` translate nodeIP:32001 to the pod and back. (The
    /// "MySQL" pod is `lb-testkit serve` on 3306, answering HTTP with its name.)
    fn node_port(&mut self) -> Result<()> {
        let url = format!("http://{}:32001", lab::NODE_EXT_IP);
        heading(
            7,
            &format!("kubectl apply -f mysql-service.yml; curl {url}"),
        );
        let example = crate::repo_root()
            .join("examples")
            .join(manifests::NODE_PORT_SERVICE);
        std::fs::copy(&example, Paths::manifests().join("mysql-service.yml"))
            .with_context(|| format!("cannot copy {}", example.display()))?;
        let name = "mysqlauth-deployment-7d9c4";
        let ip = Ipv4Addr::new(10, 244, 0, 50);
        let netns = lab::pod_netns(name);
        self.lab.add_pod_netns(&netns, ip)?;
        let mut server = Command::new(&self.lab.paths().testkit_bin);
        server.args([
            "--netns",
            &netns,
            "serve",
            "--listen",
            "0.0.0.0:3306",
            "--name",
            name,
        ]);
        self.lab.spawn(name, server)?;
        let pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("production-cloud".into()),
                labels: Some([("name".to_owned(), "mysqlauth-selector".to_owned())].into()),
                ..Default::default()
            },
            spec: None,
            status: Some(manifests::ready_status(ip)),
        };
        let file = manifests::write_pod(&Paths::manifests(), &pod)?;
        println!("pod/{name} created ({ip}:3306, {})", file.display());
        agent::wait_for_backends(self.lab, (Ipv4Addr::UNSPECIFIED, 32001), &[ip], 3306)?;
        println!(
            "$ curl -s {url}    # on a machine outside the node ({})",
            lab::OUTSIDE_NETNS
        );
        let outside = format!("--net={}", lab::netns_path(lab::OUTSIDE_NETNS).display());
        let body = cmd::output(Command::new("nsenter").args([
            outside.as_str(),
            "curl",
            "-s",
            "--max-time",
            "3",
            &url,
        ]))?;
        println!("{}", body.trim_end());
        ensure!(
            body.contains(name),
            "expected an answer from {name} through the NodePort, got {body:?}"
        );
        // The seed's DB_HOST, from a pod of another namespace, by name.
        let by_name = "http://mysqlauth-service.production-cloud.svc.cluster.local:3306";
        println!("$ curl -s {by_name}    # in the {}", self.client_label);
        let reply = self.client.curl(by_name)?;
        println!("{}", reply.stdout.trim_end());
        expect_host(&reply, name)?;
        println!("$ lb-agent conntrack");
        let flows = cmd::output(Command::new(&self.lab.paths().agent_bin).args([
            "conntrack",
            "--bpf-pin-path",
            lab::PIN_DIR,
        ]))?;
        println!("{}", flows.trim_end());
        Ok(())
    }

    /// No ready Pod: the ClusterIP refuses at once, as kube-proxy's REJECT rule does.
    fn no_endpoints(&mut self) -> Result<()> {
        let url = self.service_url();
        heading(
            8,
            &format!("kubectl scale deployment webapp1 --replicas=0; curl -sS {url}"),
        );
        self.scale_to(0)?;
        self.wait_for_backends()?;
        println!("$ curl -sS -v {url}    # in the {}", self.client_label);
        let reply = self
            .client
            .run(&["curl", "-sS", "-v", "--max-time", "3", &url], &[])?;
        print!("{}", reply.stderr);
        println!(
            "exit code {}, after {} ms",
            reply
                .code
                .map_or_else(|| "none".into(), |code| code.to_string()),
            reply.elapsed.as_millis()
        );
        ensure!(
            reply.code == Some(7) && reply.stderr.contains("Connection refused"),
            "expected curl to exit 7 with `Connection refused` (ECONNREFUSED from the connect \
             hook for a Service without endpoints), got: {}",
            describe(&reply)
        );
        ensure!(
            reply.elapsed < REFUSAL_LIMIT,
            "the refusal took {:?}, more than {REFUSAL_LIMIT:?}",
            reply.elapsed
        );
        println!("refused at once: a Service without endpoints rejects new connections");
        Ok(())
    }

    /// Waits until the agent's backends are exactly the current replicas.
    fn wait_for_backends(&self) -> Result<()> {
        let ips: Vec<Ipv4Addr> = self.replicas.iter().map(|replica| replica.ip).collect();
        agent::wait_for_backends(self.lab, self.frontend, &ips, self.target_port)
    }

    fn service_url(&self) -> String {
        match self.frontend {
            (ip, 80) => format!("http://{ip}"),
            (ip, port) => format!("http://{ip}:{port}"),
        }
    }

    /// `curl -s URL` from the client pod, printed as a shell session would show it.
    fn curl_shown(&self, url: &str) -> Result<Reply> {
        println!("$ curl -s {url}    # in the {}", self.client_label);
        let reply = self.client.curl(url)?;
        println!("{}", reply.stdout.trim_end());
        Ok(reply)
    }

    fn pods_table(&self) -> String {
        let rows: Vec<PodRow<'_>> = self
            .replicas
            .iter()
            .map(|replica| PodRow {
                name: &replica.name,
                ip: replica.ip,
                age: replica.created.elapsed(),
                node: lab::NODE_NETNS,
            })
            .collect();
        manifests::pods_table(&rows)
    }

    /// Adds or removes replicas until there are `count`.
    fn scale_to(&mut self, count: usize) -> Result<()> {
        while self.replicas.len() < count {
            self.add_replica()?;
        }
        while self.replicas.len() > count {
            self.remove_replica()?;
        }
        Ok(())
    }

    /// Namespace, server, and once it answers, the ready Pod's manifest (as the kubelet reports
    /// readiness only after the container is up).
    fn add_replica(&mut self) -> Result<()> {
        let name = self.replica_set.pod_name()?;
        let ip = Ipv4Addr::new(10, 244, 0, self.next_host);
        self.next_host += 1;
        let netns = lab::pod_netns(&name);
        self.lab.add_pod_netns(&netns, ip)?;
        let mut server = Command::new(&self.lab.paths().testkit_bin);
        server
            .args([
                "--netns",
                &netns,
                "serve",
                "--listen",
                "0.0.0.0:80",
                "--name",
            ])
            .arg(&name);
        self.lab.spawn(&name, server)?;
        self.wait_until_serving(&name, ip)?;
        let pod = manifests::replica(&self.deployment, &self.replica_set, &name, ip);
        let file = manifests::write_pod(&Paths::manifests(), &pod)?;
        println!("pod/{name} created ({ip}, {})", file.display());
        self.replicas.push(Replica {
            name,
            ip,
            file,
            created: Instant::now(),
        });
        Ok(())
    }

    /// The Pod's manifest goes first (the endpoint disappears), then its server and namespace.
    fn remove_replica(&mut self) -> Result<()> {
        let replica = self.replicas.pop().context("no replica left")?;
        std::fs::remove_file(&replica.file)
            .with_context(|| format!("cannot remove {}", replica.file.display()))?;
        self.lab.stop(&replica.name)?;
        self.lab.del_pod_netns(&lab::pod_netns(&replica.name))?;
        println!("pod/{} deleted", replica.name);
        Ok(())
    }

    /// Polls the server from the node namespace (outside the hooked cgroup) for up to 10 s.
    fn wait_until_serving(&self, name: &str, ip: Ipv4Addr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let node = format!("--net={}", lab::netns_path(lab::NODE_NETNS).display());
        loop {
            if let Some(status) = self.lab.exited(name) {
                bail!(
                    "the server of {name} exited ({status}); see {}",
                    Paths::log(name).display()
                );
            }
            let answer = cmd::output(Command::new("nsenter").args([
                node.as_str(),
                "curl",
                "-s",
                "--max-time",
                "1",
                &format!("http://{ip}"),
            ]));
            if answer.is_ok_and(|body| body.contains(name)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the server of {name} did not answer on {ip}:80 within 10 s");
            }
            sleep(Duration::from_millis(100));
        }
    }
}

fn heading(step: usize, command: &str) {
    println!("\n== {step}/8  {command}");
}

fn expect_host(reply: &Reply, pod: &str) -> Result<()> {
    ensure!(
        reply.ok() && reply.host() == Some(pod),
        "expected an answer from {pod}, got: {}",
        describe(reply)
    );
    Ok(())
}

fn describe(reply: &Reply) -> String {
    format!(
        "exit code {:?}, stdout {:?}, stderr {:?}",
        reply.code,
        reply.stdout.trim(),
        reply.stderr.trim()
    )
}

/// The end of the agent's log and where the others are, for a failed run.
fn show_logs() {
    let log = Paths::log(agent::AGENT);
    if let Ok(text) = std::fs::read_to_string(&log) {
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        eprintln!("--- last {} lines of {} ---", tail.len(), log.display());
        for line in tail {
            eprintln!("{line}");
        }
        eprintln!("--- end of agent log ---");
    }
    eprintln!("logs stay in {}", Paths::run_dir().display());
}
