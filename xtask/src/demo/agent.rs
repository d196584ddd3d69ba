//! Driving `lb-agent`: start it, read what it programmed (`lb-agent services`), wait for changes.
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use super::lab::{self, Lab, PIN_DIR, Paths};
use crate::cmd;

/// The name the agent's process and log file go by in the lab.
pub const AGENT: &str = "agent";

/// One frontend of `lb-agent services --output json`.
#[derive(Debug, Deserialize)]
pub struct Frontend {
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub backends: Vec<Backend>,
}

/// One backend of a frontend (empty when the slot names no known backend).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Backend {
    pub address: String,
    pub port: u16,
    pub protocol: String,
}

impl Frontend {
    fn is(&self, ip: Ipv4Addr, port: u16) -> bool {
        same_endpoint(&self.address, self.port, &self.protocol, ip, port)
    }

    /// True when the backends are exactly `ips` on `port`/TCP, in any order.
    fn has_backends(&self, ips: &[Ipv4Addr], port: u16) -> bool {
        self.backends.len() == ips.len()
            && ips.iter().all(|&ip| {
                let backend =
                    |b: &Backend| same_endpoint(&b.address, b.port, &b.protocol, ip, port);
                self.backends.iter().any(backend)
            })
    }
}

fn same_endpoint(address: &str, port: u16, protocol: &str, ip: Ipv4Addr, want_port: u16) -> bool {
    address.parse() == Ok(IpAddr::V4(ip)) && port == want_port && protocol == "TCP"
}

/// `lb-agent run` inside the node namespace (`nsenter --net`, which keeps this machine's
/// mounts), so whatever it attaches to devices can only reach the demo's own.
/// The ClusterIP of kube-system/kube-dns, as kubeadm's default.
pub const DNS_SERVICE_IP: &str = "10.96.0.10";
/// The agent's API, on the node namespace's loopback.
const API_ADDR: &str = "127.0.0.1:9902";

/// `lb-agent env --namespace NAMESPACE`: the kubelet's Service variables, as (name, value).
pub fn env(lab: &Lab, namespace: &str) -> Result<Vec<(String, String)>> {
    let node = format!("--net={}", lab::netns_path(lab::NODE_NETNS).display());
    let out = cmd::output(
        Command::new("nsenter")
            .arg(node)
            .arg(&lab.paths().agent_bin)
            .args(["env", "--namespace", namespace, "--api-addr", API_ADDR]),
    )?;
    Ok(out
        .lines()
        .filter_map(|line| {
            let (name, value) = line.strip_prefix("export ")?.split_once('=')?;
            Some((name.to_owned(), value.trim_matches('\'').to_owned()))
        })
        .collect())
}

pub fn start(lab: &Lab) -> Result<()> {
    let paths = lab.paths();
    let mut command = Command::new("nsenter");
    command
        .arg(format!(
            "--net={}",
            lab::netns_path(lab::NODE_NETNS).display()
        ))
        .arg(&paths.agent_bin)
        .arg("run")
        .arg("--manifests")
        .arg(Paths::manifests())
        .arg("--cgroup")
        .arg(&paths.cgroup)
        .args(["--bpf-pin-path", PIN_DIR])
        .args(["--devices", lab::EXT_DEVICE])
        // Cluster DNS on the bridge, published as kube-system/kube-dns (10.96.0.10:53), and
        // the API `lb-agent env` asks.
        .args(["--dns-addr", &format!("{}:53", crate::lab::GATEWAY)])
        .args(["--dns-service-ip", DNS_SERVICE_IP])
        .args(["--api-addr", API_ADDR])
        .env("NO_COLOR", "1"); // its log goes to a file
    println!("$ {}", cmd::describe(&command));
    let pid = lab.spawn(AGENT, command)?;
    Lab::write_agent_pid(pid)
}

fn services(agent_bin: &Path, format: &str) -> Result<String> {
    cmd::output(Command::new(agent_bin).args([
        "services",
        "--bpf-pin-path",
        PIN_DIR,
        "--output",
        format,
    ]))
}

/// The inspection table, as a person would see it.
pub fn services_table(agent_bin: &Path) -> Result<String> {
    services(agent_bin, "table")
}

fn frontends(agent_bin: &Path) -> Result<Vec<Frontend>> {
    let json = services(agent_bin, "json")?;
    serde_json::from_str(&json)
        .with_context(|| format!("unexpected `lb-agent services` output: {json}"))
}

/// Polls `lb-agent services` until the frontend `ip:port/TCP` satisfies `ready`, failing after
/// `timeout` or as soon as the agent exits.
pub fn wait_for_frontend(
    lab: &Lab,
    (ip, port): (Ipv4Addr, u16),
    what: &str,
    timeout: Duration,
    ready: impl Fn(Option<&Frontend>) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = lab.exited(AGENT) {
            bail!("lb-agent exited ({status}) while waiting for {what}");
        }
        let last = match frontends(&lab.paths().agent_bin) {
            Ok(all) => {
                let found = all.iter().find(|frontend| frontend.is(ip, port));
                if ready(found) {
                    return Ok(());
                }
                format!("{found:?}")
            }
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() > deadline {
            bail!("{what} did not happen within {timeout:?}; last `lb-agent services`: {last}");
        }
        sleep(Duration::from_millis(200));
    }
}

/// Waits until the frontend's backends are exactly the pods `ips` on `target_port`.
pub fn wait_for_backends(
    lab: &Lab,
    frontend: (Ipv4Addr, u16),
    ips: &[Ipv4Addr],
    target_port: u16,
) -> Result<()> {
    let what = format!(
        "{}:{} with backends {ips:?} on port {target_port}",
        frontend.0, frontend.1
    );
    wait_for_frontend(lab, frontend, &what, Duration::from_secs(20), |found| {
        found.map_or(ips.is_empty(), |f| f.has_backends(ips, target_port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"[{"address":"10.111.195.22","port":80,"protocol":"TCP","backends":[
        {"address":"10.244.0.11","port":80,"protocol":"TCP"},
        {"address":"10.244.0.10","port":80,"protocol":"TCP"}]},
        {"address":"10.96.0.1","port":443,"protocol":"TCP","backends":[{"slot":1}]}]"#;

    #[test]
    fn reads_the_services_json_and_matches_backends_in_any_order() {
        let all: Vec<Frontend> = serde_json::from_str(JSON).unwrap();
        let frontend = &all[0];
        assert!(frontend.is(Ipv4Addr::new(10, 111, 195, 22), 80));
        assert!(!frontend.is(Ipv4Addr::new(10, 111, 195, 22), 81));
        let pods = [Ipv4Addr::new(10, 244, 0, 10), Ipv4Addr::new(10, 244, 0, 11)];
        assert!(frontend.has_backends(&pods, 80));
        assert!(!frontend.has_backends(&pods[..1], 80));
        assert!(!frontend.has_backends(&pods, 8080));
        assert!(
            all[1].backends[0].address.is_empty(),
            "a slot without backend still parses"
        );
    }
}
