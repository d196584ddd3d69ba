//! `cargo xtask build-ebpf`: a thin wrapper. `lb-agent/build.rs` builds `lb-ebpf` with aya-build
//! (nightly, `-Z build-std=core`, bpf-linker) and embeds it; this installs what that needs, runs
//! the build and can copy the object out for `bpftool` or `llvm-objdump`.
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context as _, Result, bail};

use crate::{cmd, install};

#[derive(clap::Args)]
pub struct Args {
    /// Copy the built eBPF object to PATH (a file, or a directory to put `lb-ebpf` in).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Build with the release profile instead of dev.
    #[arg(long)]
    release: bool,
}

pub fn run(args: &Args) -> Result<()> {
    install::ensure_build_prereqs()?;
    build_agent(args.release)?;
    if let Some(out) = &args.out {
        let profile = if args.release { "release" } else { "debug" };
        copy_object(&crate::target_dir().join(profile), out)?;
    }
    Ok(())
}

fn build_agent(release: bool) -> Result<()> {
    let mut build = cmd::cargo();
    build.args(["build", "-p", "lb-agent"]);
    if release {
        build.arg("--release");
    }
    println!("==> {}", cmd::describe(&build));
    cmd::run(&mut build)
}

fn copy_object(profile_dir: &Path, out: &Path) -> Result<()> {
    let object = newest_object(profile_dir)?;
    let dest = if out.is_dir() {
        out.join("lb-ebpf")
    } else {
        out.to_owned()
    };
    let bytes = std::fs::copy(&object, &dest)
        .with_context(|| format!("cannot copy {} to {}", object.display(), dest.display()))?;
    println!(
        "copied {} ({bytes} bytes) to {}",
        object.display(),
        dest.display()
    );
    println!(
        "inspect it with `bpftool btf dump file {0}` or `llvm-objdump-22 -S {0}`",
        dest.display()
    );
    Ok(())
}

/// The object aya-build left in the newest `lb-agent-*/out/` (one per build-script hash).
fn newest_object(profile_dir: &Path) -> Result<PathBuf> {
    let build_dir = profile_dir.join("build");
    let entries = std::fs::read_dir(&build_dir)
        .with_context(|| format!("cannot list {}", build_dir.display()))?;
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("lb-agent-") {
            continue;
        }
        let object = entry.path().join("out").join("lb-ebpf");
        let Ok(modified) = object.metadata().and_then(|meta| meta.modified()) else {
            continue;
        };
        if newest.as_ref().is_none_or(|(time, _)| modified > *time) {
            newest = Some((modified, object));
        }
    }
    match newest {
        Some((_, object)) => Ok(object),
        None => bail!("no lb-agent-*/out/lb-ebpf under {}", build_dir.display()),
    }
}
