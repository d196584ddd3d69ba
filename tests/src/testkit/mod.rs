//! The `lb-testkit` command: global placement flags (`--cgroup`, `--netns`), then `serve` or `client`.

mod client;
mod serve;
mod summary;
mod udp_client;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use nix::sched::{CloneFlags, setns};

pub use summary::{Attempt, ClientSummary, errno_name};

/// Backend server and client for the load balancer's end-to-end tests.
#[derive(Debug, Parser)]
#[command(name = "lb-testkit", version)]
pub struct Cli {
    /// Join this cgroup v2 directory first (writes our pid to `PATH/cgroup.procs`).
    #[arg(long, global = true, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Then enter the network namespace `/run/netns/NAME` (only the network namespace: nothing is
    /// remounted, so bpffs and cgroup2 stay visible).
    #[arg(long, global = true, value_name = "NAME")]
    pub netns: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Answer HTTP/1.1 (or UDP with `--udp`) with this backend's name until killed.
    Serve(ServeArgs),
    /// Make N sequential HTTP GETs, each on a new connection (or N UDP sockets with `--udp`),
    /// and print a JSON summary.
    Client(ClientArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to bind, for example 10.244.0.2:8080.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Name reported in every answer.
    #[arg(long)]
    pub name: String,
    /// Serve UDP instead of HTTP over TCP: each datagram is answered with `NAME <peer ip:port>`.
    #[arg(long)]
    pub udp: bool,
}

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Address to connect to, for example `10.96.0.10:80`, `[fd00:96::10]:80`, or
    /// `[::ffff:10.96.0.10]:80` (an IPv6 socket to an IPv4-mapped address). The socket's family
    /// is the target's.
    #[arg(long)]
    pub target: SocketAddr,
    /// Number of connections (UDP: sockets), made one after the other.
    #[arg(long)]
    pub count: u32,
    /// UDP instead of HTTP over TCP: each socket sends `--sends` datagrams, each answered by
    /// `lb-testkit serve --udp`. Unconnected (`sendto`, then `recvfrom`, whose source address is
    /// reported) unless `--connected`.
    #[arg(long)]
    pub udp: bool,
    /// With `--udp`: `connect()` the socket to the target, then `send`/`recv`; the reported peer
    /// is `getpeername()`.
    #[arg(long, requires = "udp")]
    pub connected: bool,
    /// With `--udp`: datagrams exchanged per socket, one after the other.
    #[arg(long, default_value_t = 1, requires = "udp")]
    pub sends: u32,
    /// Connect timeout, and read/write timeout of each request.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Pause between two connections (UDP: between two datagrams, of one socket or not).
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
}

/// Entry point of the `lb-testkit` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lb-testkit: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // Placement comes before anything else (and before any thread exists): cgroup first, so the
    // process is already inside it when it starts using the network namespace.
    if let Some(cgroup) = &cli.cgroup {
        join_cgroup(cgroup)?;
    }
    if let Some(netns) = &cli.netns {
        enter_netns(netns)?;
    }
    match cli.command {
        Command::Serve(args) if args.udp => serve::udp(args.listen, &args.name),
        Command::Serve(args) => serve::http(args.listen, &args.name),
        Command::Client(args) => {
            let summary = if args.udp {
                udp_client::run(&args)
            } else {
                client::run(&args)
            };
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
    }
}

/// Moves the calling process into the cgroup v2 directory `dir`.
pub fn join_cgroup(dir: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("joining cgroup: writing our pid to {}", procs.display()))
}

/// Moves the calling thread into the named network namespace (`/run/netns/NAME`). Threads spawned
/// afterwards inherit it.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns(CLONE_NEWNET) into {}", path.display()))
}
