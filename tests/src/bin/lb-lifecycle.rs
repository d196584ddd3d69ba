//! The agent's lifecycle under load (issue: zero-disruption restarts and upgrades): a client
//! opens TCP connections to a ClusterIP as fast as it can (`lb-loadgen run --workload
//! tcp-crr`) while the agent is killed with SIGKILL and started again, `--cycles` times;
//! with `--upgrade-to BIN` every other start runs that build instead (an upgrade and a
//! downgrade in turn). Each start swaps its programs into the links the previous agent
//! pinned. Prints a Markdown table: connections, their rate, how many failed, and the
//! longest a connection took; exits non-zero when one failed.
//!
//! Run it as root: `cargo xtask bench --lifecycle`.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use lb_tests::manifests::{pod, service};
use lb_tests::{Agent, TestEnv, bins, require_privileges};

const VIP: &str = "10.96.0.10:80";
const PORT: u16 = 8080;
const APPLY: Duration = Duration::from_secs(30);

/// Kills and restarts the agent under a connection load; counts what clients lost.
#[derive(Debug, Parser)]
struct Args {
    /// Kill-and-start cycles.
    #[arg(long, default_value_t = 4)]
    cycles: u32,
    /// Client threads opening connections.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Another build of lb-agent, started on every other cycle (an upgrade, then a
    /// downgrade, …).
    #[arg(long, value_name = "BIN")]
    upgrade_to: Option<PathBuf>,
}

/// `lb-loadgen serve --tcp PORT` in a pod; killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !require_privileges() {
        anyhow::bail!("lb-lifecycle needs root");
    }
    let env = TestEnv::new();
    let mut servers = Vec::new();
    for name in ["web1", "web2"] {
        let backend = env.topo.add_pod(name);
        servers.push(Server(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", backend.netns()))
                .arg(bins::loadgen())
                .args(["serve", "--tcp", &PORT.to_string()])
                .stdout(Stdio::null())
                .spawn()?,
        ));
        env.manifests.write(
            &TestEnv::pod_file(name),
            &pod(name, backend.ip())
                .label("app", "web")
                .container_port("tcp", i32::from(PORT))
                .yaml(),
        );
    }
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc-web.yaml",
        &service("web", "10.96.0.10")
            .selector("app", "web")
            .port(80, i32::from(PORT))
            .yaml(),
    );
    let mut agents = vec![Agent::new(env.agent_config())];
    if let Some(bin) = &args.upgrade_to {
        // SAFETY: single-threaded here; the variable is read by `Agent::new` only.
        unsafe { std::env::set_var("LB_AGENT_BIN", bin) };
        agents.push(Agent::new(env.agent_config()));
    }
    agents[0].set_log_filter("info");
    agents[0].start();
    agents[0].wait_for_frontend(VIP, 2, APPLY);
    while readies(&agents[0]) == 0 {
        agents[0].assert_running();
        std::thread::sleep(Duration::from_millis(10));
    }

    let cycle = Duration::from_secs(3);
    let load_for = cycle * (args.cycles + 1);
    let mut restarts = Vec::new();
    let summary = std::thread::scope(|scope| {
        let load = scope.spawn(|| load(&client, &env, load_for, args.workers));
        let mut running = 0;
        for n in 0..args.cycles as usize {
            std::thread::sleep(cycle / 2);
            agents[running].kill();
            let next = (n + 1) % agents.len();
            let ready_before = readies(&agents[next]);
            let started = Instant::now();
            agents[next].set_log_filter("info");
            agents[next].start();
            while readies(&agents[next]) == ready_before {
                assert!(
                    started.elapsed() < APPLY,
                    "the agent was not ready within {APPLY:?}"
                );
                agents[next].assert_running();
                std::thread::sleep(Duration::from_millis(10));
            }
            restarts.push(started.elapsed());
            running = next;
            std::thread::sleep(cycle / 2);
        }
        load.join().expect("load thread")
    })?;
    let field = |name: &str| summary[name].as_f64().unwrap_or(0.0);
    let slowest = restarts.iter().max().copied().unwrap_or_default();
    println!(
        "| cycles | builds | connections | per second | failed | p99 | longest | restart → attached (slowest) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {:.0} | {} | {} µs | {} µs | {} ms |",
        args.cycles,
        agents.len(),
        field("ops"),
        field("rate"),
        field("errors"),
        field("p99_us"),
        field("max_us"),
        slowest.as_millis()
    );
    if field("errors") > 0.0 {
        anyhow::bail!("connections failed: {summary}");
    }
    Ok(())
}

/// How many times the agents (one log) said they were ready: programs attached and the
/// first sync written.
fn readies(agent: &Agent) -> usize {
    agent.log().matches("lb_agent::agent: ready").count()
}

/// `lb-loadgen run --workload tcp-crr` from `client` to the ClusterIP for `duration`.
fn load(
    client: &lb_tests::Pod,
    env: &TestEnv,
    duration: Duration,
    workers: usize,
) -> anyhow::Result<serde_json::Value> {
    let out = lb_tests::cmd::run(
        Command::new(bins::loadgen())
            .arg("--cgroup")
            .arg(env.cgroup.path())
            .args(["--netns", client.netns(), "run", "--workload", "tcp-crr"])
            .args(["--target", VIP, "--count", "100000000"])
            .args(["--workers", &workers.to_string(), "--duration-ms"])
            .arg(duration.as_millis().to_string()),
        duration + Duration::from_secs(30),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(serde_json::from_str(&out)?)
}
