//! `cargo xtask test`: what CI runs. Stops at the first failing step.
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{cmd, host, install};

/// Every host crate: `--workspace` alone would also compile `lb-ebpf` for the host, which fails
/// (`default-members` leave it out, but `--workspace` overrides them). `lb-agent`'s build
/// script still builds it for the BPF target.
const HOST_CRATES: &[&str] = &["--workspace", "--exclude", "lb-ebpf"];

/// What the end-to-end tests run besides the build prerequisites: the container tests run
/// the agent's image with rootful podman and runc (`tests/tests/container.rs`);
/// `bind9-dnsutils` is `dig`, the resolver client of the cluster DNS tests.
const TEST_APT_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "bpftool",
    "podman",
    "runc",
    "bind9-dnsutils",
    // The node's own resolver in the DNS tests (names outside the cluster domain go to it).
    "dnsmasq-base",
    // per_packet.rs loads a netfilter ruleset with nft.
    "nftables",
];

/// How long `test` runs each fuzz target.
const FUZZ_SECONDS: u64 = 15;

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and `cargo clippy` (for quick iterations).
    #[arg(long)]
    no_lint: bool,
    /// Passed on to `cargo nextest run` (for example a filter): `cargo xtask test -- FILTER`.
    #[arg(last = true, value_name = "NEXTEST_ARGS")]
    nextest_args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    install::ensure_build_prereqs()?;
    install::ensure_apt(TEST_APT_PACKAGES)?;
    install::ensure_apt(crate::image::IMAGE_APT_PACKAGES)?;
    if !args.no_lint {
        step(
            cmd::cargo().args(["fmt", "--all", "--check"]),
            "formatting differs: run `cargo fmt --all`",
        )?;
        step(
            cmd::cargo().arg("clippy").args(HOST_CRATES).args([
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            "clippy found problems (warnings are errors)",
        )?;
        // The eBPF crate, linted for the target it is built for.
        step(
            nightly_cargo().args([
                "clippy",
                "--package",
                "lb-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
            "clippy found problems in lb-ebpf (warnings are errors)",
        )?;
    }
    step(
        cmd::cargo()
            .arg("build")
            .args(HOST_CRATES)
            .arg("--all-targets"),
        "the workspace does not build",
    )?;
    prepare_privileged_tests()?;
    // The image the container tests run: `cargo xtask image`'s layout and archive, around
    // the debug agent just built (a release build would add minutes for the same layout).
    let image = crate::target_dir()
        .join("image")
        .join("lb-agent-debug.oci.tar");
    println!("==> cargo xtask image --agent target/debug/lb-agent");
    crate::image::write_archive(&crate::target_dir().join("debug").join("lb-agent"), &image)
        .context("building the agent's image for the container tests")?;
    step(
        nextest(&args.nextest_args).env("LB_IMAGE_ARCHIVE", &image),
        "tests failed",
    )?;
    if args.nextest_args.is_empty() {
        // Each fuzz target briefly: a regression in input handling shows at once (the
        // longer runs are `cargo xtask fuzz`).
        crate::fuzz::run_targets(crate::fuzz::TARGETS, FUZZ_SECONDS)
            .context("cargo xtask fuzz found a crash")?;
        // The benchmark is no timed test, but it must keep working: one quick run, in this
        // process (the build above may just have replaced this very executable).
        #[derive(clap::Parser)]
        struct Quick {
            #[command(flatten)]
            args: crate::bench::Args,
        }
        println!("==> cargo xtask bench --quick");
        let quick = <Quick as clap::Parser>::parse_from(["bench", "--quick"]);
        crate::bench::run(&quick.args).context("cargo xtask bench --quick failed")?;
        // The churn soak, briefly (20 s); `cargo xtask bench --soak` is the 10-minute run.
        println!("==> cargo xtask bench --soak --quick");
        let soak = <Quick as clap::Parser>::parse_from(["bench", "--soak", "--quick"]);
        crate::bench::run(&soak.args).context("cargo xtask bench --soak --quick failed")?;
        // The NodePort bench (direct, tc, XDP) briefly, so the XDP path's bench keeps
        // working too (about a minute).
        println!("==> cargo xtask bench --nodeport --quick");
        let nodeport = <Quick as clap::Parser>::parse_from(["bench", "--nodeport", "--quick"]);
        crate::bench::run(&nodeport.args).context("cargo xtask bench --nodeport --quick failed")?;
        // The SYN flood bench with small tables (about half a minute).
        println!("==> cargo xtask bench --flood --quick");
        let flood = <Quick as clap::Parser>::parse_from(["bench", "--flood", "--quick"]);
        crate::bench::run(&flood.args).context("cargo xtask bench --flood --quick failed")?;
    }
    println!("all steps passed");
    Ok(())
}

/// `cargo` of the nightly toolchain (the eBPF target needs `-Z build-std`), without the
/// variables the stable cargo running xtask set for itself.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(crate::repo_root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO");
    cmd
}

/// Prints the command, runs it, and turns a failure into `why` plus the command's status.
fn step(command: &mut Command, why: &str) -> Result<()> {
    println!("==> {}", cmd::describe(command));
    cmd::run(command).context(why.to_owned())
}

/// Mounts bpffs, the only machine change the privileged tests need from outside.
fn prepare_privileged_tests() -> Result<()> {
    if !host::is_root() {
        println!(
            "not root: bpffs left as it is; the privileged tests will say why they cannot run"
        );
        return Ok(());
    }
    host::ensure_bpffs()
}

fn nextest(extra: &[String]) -> Command {
    let debug = crate::target_dir().join("debug");
    let agent = binary(&debug, "lb-agent");
    let testkit = binary(&debug, "lb-testkit");
    let mut command = cmd::cargo();
    command
        .args(["nextest", "run"])
        .args(HOST_CRATES)
        .arg("--no-fail-fast")
        .args(extra)
        .env("LB_AGENT_BIN", agent)
        .env("LB_TESTKIT_BIN", testkit);
    command
}

/// `dir/name`, with a note when the build did not produce it.
fn binary(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    if !path.is_file() {
        println!(
            "note: {} does not exist; tests that need it will fail",
            path.display()
        );
    }
    path
}
