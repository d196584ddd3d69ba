//! `cargo xtask watch-bench`: the agent's control-plane figures on the Kubernetes API —
//! time to program N Services from the initial list, watch event to map write (p50/p99),
//! memory — measured by `lb-watch-bench` (tests crate) against a release build of the agent.
use anyhow::Result;

use crate::{cmd, install};

#[derive(clap::Args)]
pub struct Args {
    /// Passed on to lb-watch-bench (`--services`, `--endpoints`, `--events`; see its --help).
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    install::ensure_build_prereqs()?;
    install::ensure_apt(&["iproute2", "bpftool"])?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "lb-agent"]))?;
    cmd::run(cmd::cargo().args(["build", "-p", "lb-tests", "--bin", "lb-watch-bench"]))?;
    let root = crate::repo_root();
    cmd::run(
        std::process::Command::new(root.join("target/debug/lb-watch-bench"))
            .args(&args.args)
            .env("LB_AGENT_BIN", root.join("target/release/lb-agent"))
            .env("RUST_LOG", "info"),
    )
}
