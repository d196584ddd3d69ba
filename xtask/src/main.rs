//! `cargo xtask`: the project's own automation, so a fresh machine needs nothing but Rust.
//!
//! - `build-ebpf`: install the eBPF toolchain where missing, then `cargo build -p lb-agent`
//!   (its `build.rs` builds and embeds `lb-ebpf`).
//! - `test`: what CI runs (`.ci/run`): fmt, clippy, build, the image around the debug agent,
//!   then nextest with the privileged end-to-end tests (the container tests run that image),
//!   each fuzz target for 15 s, and `bench --quick`.
//! - `demo`: the seed article's web-app scene played on network namespaces.
//! - `image`: the agent's OCI image, built offline, as an archive under `target/image/`.
//! - `fuzz`: each cargo-fuzz target of `lb-agent/fuzz` for a bounded time (`test` runs each
//!   briefly).
//! - `bench`: the socket load balancer against the direct path and kube-proxy's iptables and
//!   nftables layouts over a sweep of Service counts; writes `docs/benchmarks.md`.
mod bench;
mod build;
mod cmd;
mod demo;
mod dns_bench;
mod fuzz;
mod host;
mod image;
mod install;
mod lab;
mod sizing;
mod test;
mod watch_bench;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, test and demo the eBPF service load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the eBPF toolchain where missing, then build lb-agent and its embedded eBPF object.
    BuildEbpf(build::Args),
    /// Install what is missing, then run fmt, clippy, build and nextest, as CI does.
    Test(test::Args),
    /// Play the seed's web-app scene on network namespaces (root; a couple of minutes).
    Demo,
    /// Build the agent's OCI image offline (release binary, its libraries, busybox) as an archive.
    Image(image::Args),
    /// Benchmark against the direct path, iptables and nftables (root; about an hour, --quick a minute).
    Bench(bench::Args),
    /// Control-plane figures on a (fake) Kubernetes API: sync time, event latency, memory (root).
    WatchBench(watch_bench::Args),
    /// Fuzz the manifest parser and the object validation and translation (cargo-fuzz, nightly).
    Fuzz(fuzz::Args),
    /// Cluster DNS against dnsmasq with dnsperf: qps and p99 at 1k and 100k Services (root).
    DnsBench(dns_bench::Args),
}

fn main() -> ExitCode {
    install::put_cargo_bin_on_path();
    let result = match Cli::parse().command {
        Command::BuildEbpf(args) => build::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Demo => demo::run(),
        Command::Image(args) => image::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::WatchBench(args) => watch_bench::run(&args),
        Command::DnsBench(args) => dns_bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report(&error);
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, one per line (no backtrace, even with `RUST_BACKTRACE=1`).
fn report(error: &anyhow::Error) {
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

/// The workspace root (the parent of this crate).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` when set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}
