//! The client pod: commands run as a container of it would, in its network namespace and in
//! the demo's cgroup, where the agent's connect hook sits.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::lab;
use crate::cmd;

/// Joins the cgroup first (`$1`), then enters the network namespace (`$2`) and runs the rest.
/// Only the network namespace changes: `ip netns exec` would remount /sys and hide the cgroup.
const ENTER: &str = r#"echo $$ > "$1" && ns="$2" && shift 2 && exec nsenter --net="$ns" "$@""#;

/// The same with `ip netns exec`, which shows the pod its `/etc/netns/<netns>/resolv.conf`
/// (it remounts /sys too, harmless once the cgroup is joined).
const ENTER_WITH_RESOLV_CONF: &str =
    r#"echo $$ > "$1" && ns="$2" && shift 2 && exec ip netns exec "$ns" "$@""#;

pub struct Client {
    cgroup_procs: PathBuf,
    netns: PathBuf,
    /// The namespace's name, when the pod has a resolv.conf of its own.
    resolv_conf: Option<String>,
}

/// What a command printed, how it exited and how long it took.
pub struct Reply {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// `host: NAME` of the web servers' answer.
    pub fn host(&self) -> Option<&str> {
        let (_, rest) = self.stdout.split_once("processed by host: ")?;
        rest.split('<').next().map(str::trim)
    }
}

impl Client {
    pub fn new(lab: &lab::Lab, netns: &str) -> Self {
        Self {
            cgroup_procs: lab.paths().cgroup.join("cgroup.procs"),
            netns: lab::netns_path(netns),
            resolv_conf: None,
        }
    }

    /// A pod in `namespace` whose resolv.conf is the kubelet's (`nameserver` the kube-dns
    /// Service, the namespace's search path, `ndots:5`), written to
    /// `/etc/netns/<netns>/resolv.conf`.
    pub fn with_cluster_dns(
        lab: &lab::Lab,
        netns: &str,
        namespace: &str,
        nameserver: &str,
    ) -> Result<Self> {
        let dir = lab::resolv_conf_dir(netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "nameserver {nameserver}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
            ),
        )?;
        Ok(Self {
            resolv_conf: Some(netns.to_owned()),
            ..Self::new(lab, netns)
        })
    }

    /// `argv` inside the pod; the environment is only what `env` gives, as in a container.
    pub fn run(&self, argv: &[&str], env: &[(String, String)]) -> Result<Reply> {
        let mut command = Command::new("sh");
        match &self.resolv_conf {
            Some(name) => command
                .args(["-c", ENTER_WITH_RESOLV_CONF, "sh"])
                .arg(&self.cgroup_procs)
                .arg(name),
            None => command
                .args(["-c", ENTER, "sh"])
                .arg(&self.cgroup_procs)
                .arg(&self.netns),
        };
        command
            .args(argv)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(env.iter().map(|(key, value)| (key, value)));
        let start = Instant::now();
        let out = cmd::capture(&mut command)?;
        Ok(Reply {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
        })
    }

    /// `curl -s --max-time 3 URL`, as the article's client Job runs it.
    pub fn curl(&self, url: &str) -> Result<Reply> {
        self.run(&["curl", "-s", "--max-time", "3", url], &[])
    }
}
