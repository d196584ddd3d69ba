//! `cargo xtask fuzz`: each cargo-fuzz target of `lb-agent/fuzz` for a bounded time, on the
//! nightly toolchain, from the committed seeds (`lb-agent/fuzz/corpus/<target>`) plus what
//! earlier runs on this machine found (`target/fuzz/corpus/<target>`, never committed).
//! A crash fails the run and names the input saved under `target/fuzz/artifacts/<target>/`;
//! each crash found becomes a unit test beside the code it broke.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cmd, install};

/// The fuzz targets (`lb-agent/fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &["manifest_parse", "reconcile"];

#[derive(clap::Args)]
pub struct Args {
    /// How long each target runs.
    #[arg(long, default_value_t = 60, value_name = "N")]
    seconds: u64,
    /// Only this target (manifest_parse, reconcile) [default: each in turn].
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(name) if TARGETS.contains(&name.as_str()) => vec![name.as_str()],
        Some(name) => bail!("no fuzz target {name:?} (there are {})", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    run_targets(&targets, args.seconds)
}

/// Runs `targets` for `seconds` each; prints each one's executions.
pub fn run_targets(targets: &[&str], seconds: u64) -> Result<()> {
    install::ensure_cargo_fuzz()?;
    // Built once, with the build's output shown (a first build takes minutes).
    let mut build = nightly_cargo_fuzz();
    build.arg("build").args(build_flags());
    println!("==> {}", cmd::describe(&build));
    cmd::run(&mut build).context("building the fuzz targets failed")?;
    let mut summary = Vec::new();
    for target in targets {
        let executions = run_target(target, seconds)?;
        summary.push(format!(
            "{target}: {executions} executions in {seconds} s, no crash"
        ));
    }
    for line in summary {
        println!("fuzz {line}");
    }
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    crate::repo_root().join("lb-agent").join("fuzz")
}

fn work_dir() -> PathBuf {
    crate::target_dir().join("fuzz")
}

/// Runs one target; returns how many inputs it executed.
fn run_target(target: &str, seconds: u64) -> Result<u64> {
    let scratch = work_dir().join("corpus").join(target);
    let artifacts = work_dir().join("artifacts").join(target);
    for dir in [&scratch, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = fuzz_dir().join("corpus").join(target);
    let mut command = nightly_cargo_fuzz();
    command
        .args(["run", target])
        .args(build_flags())
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // An input that takes over 10 s or 2 GB is a finding too (a YAML bomb).
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
    println!("==> {}", cmd::describe(&command));
    let out = cmd::capture(&mut command)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({}); the input is under {}:\n{}",
            out.status,
            artifacts.display(),
            tail.join("\n")
        );
    }
    executions(&stderr).with_context(|| {
        format!("fuzz target {target}: no execution count in its output:\n{stderr}")
    })
}

/// How the targets are built, the same for `build` and `run` (or `run` builds again).
fn build_flags() -> Vec<std::ffi::OsString> {
    let mut flags: Vec<std::ffi::OsString> = vec![
        // No sanitizer: the code under test is safe Rust, and ASan would double the build
        // (every dependency instrumented) for nothing; overflow checks and debug assertions
        // stay on (`-a`).
        "--sanitizer".into(),
        "none".into(),
        "--debug-assertions".into(),
        "--fuzz-dir".into(),
    ];
    flags.push(fuzz_dir().into());
    flags.push("--target-dir".into());
    flags.push(work_dir().join("build").into());
    flags
}

/// libFuzzer's `stat::number_of_executed_units` (`-print_final_stats=1`).
fn executions(output: &str) -> Option<u64> {
    output.lines().find_map(|line| {
        line.strip_prefix("stat::number_of_executed_units:")?
            .trim()
            .parse()
            .ok()
    })
}

/// `cargo fuzz` on the nightly toolchain (libFuzzer's instrumentation needs `-Z` flags),
/// without the variables the stable cargo running xtask set for itself.
fn nightly_cargo_fuzz() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(Path::new(&crate::repo_root()).join("lb-agent"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO")
        .env_remove("CARGO_TARGET_DIR");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_execution_count_is_read_from_libfuzzers_final_stats() {
        let output = "#2\tINITED exec/s: 0\nstat::number_of_executed_units: 123456\nstat::average_exec_per_sec:     2057\n";
        assert_eq!(executions(output), Some(123_456));
        assert_eq!(executions("Done"), None);
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        for target in TARGETS {
            let source = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
            assert!(source.is_file(), "{}", source.display());
            let seeds = fuzz_dir().join("corpus").join(target);
            assert!(
                std::fs::read_dir(&seeds).is_ok_and(|mut d| d.next().is_some()),
                "{} has no seeds",
                seeds.display()
            );
        }
    }
}
