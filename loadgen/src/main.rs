//! `lb-loadgen`: the load balancer benchmarks' traffic. `serve` is a TCP and UDP echo server for
//! the backend pods; `run` drives one workload against one or more targets for a bounded time and
//! count and prints a one-line JSON summary.
//!
//! Placement comes first, as with `lb-testkit`: `--cgroup` writes our pid to the cgroup (where
//! the agent's socket programs apply), then `--netns` enters the network namespace only, so
//! bpffs and the cgroup2 mount stay visible.
mod flood;
mod run;
mod serve;
mod summary;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use nix::sched::{CloneFlags, setns};

/// Echo servers and bounded TCP/UDP load for the load balancer's benchmarks.
#[derive(Debug, Parser)]
#[command(name = "lb-loadgen", version)]
struct Cli {
    /// Join this cgroup v2 directory first (writes our pid to `PATH/cgroup.procs`).
    #[arg(long, global = true, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// Then enter the network namespace `/run/netns/NAME` (only the network namespace).
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Echo every TCP stream and UDP datagram back until killed; prints `listening` once bound.
    Serve(ServeArgs),
    /// Run one workload for `--duration-ms` or `--count` operations, whichever ends first, and
    /// print a JSON summary on stdout.
    Run(RunArgs),
    /// Send TCP SYNs from spoofed IPv4 sources (one per SYN, drawn from `--sources`) for
    /// `--duration-ms` or `--count` SYNs, whichever ends first; print a JSON summary. For
    /// test namespaces only: it needs CAP_NET_RAW.
    SynFlood(FloodArgs),
}

#[derive(Debug, clap::Args)]
struct FloodArgs {
    /// Where the SYNs go.
    #[arg(long, value_name = "IPV4:PORT")]
    target: std::net::SocketAddrV4,
    /// The range of made-up source addresses, e.g. 198.18.0.0/15.
    #[arg(long, value_name = "IPV4/PREFIX", value_parser = parse_prefix)]
    sources: (std::net::Ipv4Addr, u8),
    /// Stop after this many SYNs.
    #[arg(long)]
    count: u64,
    /// Stop after this long.
    #[arg(long, default_value_t = 10_000)]
    duration_ms: u64,
}

fn parse_prefix(text: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (addr, len) = text.split_once('/').ok_or("expected IPV4/PREFIX")?;
    Ok((
        addr.parse().map_err(|e| format!("{addr}: {e}"))?,
        len.parse().map_err(|e| format!("{len}: {e}"))?,
    ))
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TCP port to echo on (all addresses of the namespace).
    #[arg(long, value_name = "PORT")]
    tcp: Option<u16>,
    /// UDP port to echo on (all addresses of the namespace).
    #[arg(long, value_name = "PORT")]
    udp: Option<u16>,
    /// Worker threads of the server.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds after which an idle TCP connection is closed.
    #[arg(long, value_name = "S", default_value_t = 30)]
    idle_s: u64,
}

/// What one operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// A new TCP connection per operation: connect, one request and its answer, close.
    TcpCrr,
    /// Request and answer on one kept TCP connection per worker.
    TcpRr,
    /// Request and answer with `sendto`/`recvfrom` on one unconnected UDP socket per worker.
    UdpUnconnected,
    /// Request and answer with `send`/`recv` on one connected UDP socket per worker.
    UdpConnected,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Where to send (repeat for several; each connection, or each worker's socket, picks one
    /// at random).
    #[arg(long = "target", required = true, value_name = "IP:PORT")]
    pub targets: Vec<SocketAddr>,
    /// Concurrent workers (threads), each doing one operation after the other.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Stop after this long.
    #[arg(long, default_value_t = 1000)]
    pub duration_ms: u64,
    /// Stop after this many operations in all.
    #[arg(long, default_value_t = 10_000_000)]
    pub count: u64,
    /// Connect, send and receive timeout of each operation.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Request size in bytes (at least 8: it carries a sequence number).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(8..=1400))]
    pub size: u16,
}

impl RunArgs {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

fn main() -> ExitCode {
    match start(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lb-loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(cli: Cli) -> Result<()> {
    // Before any thread exists: the cgroup move covers the whole process, the namespace is
    // per thread and inherited by the threads started afterwards.
    if let Some(cgroup) = &cli.cgroup {
        join_cgroup(cgroup)?;
    }
    if let Some(netns) = &cli.netns {
        enter_netns(netns)?;
    }
    match cli.command {
        Command::Serve(args) => serve::run(
            args.tcp,
            args.udp,
            args.threads,
            Duration::from_secs(args.idle_s),
        ),
        Command::Run(args) => {
            let summary = run::run(&args)?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::SynFlood(args) => {
            let summary = flood::run(
                args.target,
                args.sources,
                args.count,
                Duration::from_millis(args.duration_ms),
            )?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
    }
}

fn join_cgroup(dir: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("joining cgroup: writing our pid to {}", procs.display()))
}

fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns(CLONE_NEWNET) into {}", path.display()))
}
