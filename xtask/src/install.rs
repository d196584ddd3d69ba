//! Idempotent installers: each checks first and installs only what is missing, printing one line
//! per thing found or installed. Written for a fresh Debian 12 machine with rustup, a nightly
//! toolchain and cargo-nextest.
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context as _, Result};

use crate::{cmd, host};

/// What `lb-agent/build.rs` (aya-build + bpf-linker) and the tests need from apt.
pub const BUILD_APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "bpftool",
    "curl",
    // The XDP tests turn the client's checksum offload off (full checksums on the wire).
    "ethtool",
];

/// bpf-linker links against this LLVM (`--features llvm-22`).
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// `apt-get update` runs at most once per xtask run, and only before an install.
static APT_UPDATED: AtomicBool = AtomicBool::new(false);
/// Packages already reported in this run, so a second `ensure_apt` stays quiet about them.
static APT_KNOWN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Everything `cargo build -p lb-agent` needs to build the eBPF programs.
pub fn ensure_build_prereqs() -> Result<()> {
    ensure_apt(BUILD_APT_PACKAGES)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()
}

/// Installs the Debian packages among `packages` that are not installed yet.
pub fn ensure_apt(packages: &[&str]) -> Result<()> {
    let mut known = APT_KNOWN.lock().unwrap_or_else(PoisonError::into_inner);
    let mut missing = Vec::new();
    for &package in packages {
        if !known.insert(package.to_owned()) {
            continue;
        }
        if apt_installed(package)? {
            println!("found apt package {package}");
        } else {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    host::require_root(&format!("installing {}", missing.join(" ")))?;
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        cmd::run(Command::new("apt-get").arg("update"))?;
    }
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    for package in missing {
        println!("installed apt package {package}");
    }
    Ok(())
}

fn apt_installed(package: &str) -> Result<bool> {
    let out = cmd::capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .context("dpkg-query is missing: the installer expects Debian or Ubuntu")?;
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

/// `-Z build-std=core` needs the standard library's sources for the nightly.
fn ensure_nightly_rust_src() -> Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "cannot list the nightly toolchain's components (is `rustup` there, and the nightly?)",
    )?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        println!("found rust-src for the nightly toolchain");
        return Ok(());
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    println!("installed rust-src for the nightly toolchain");
    Ok(())
}

/// The linker aya-build uses for the bpfel target, built against LLVM 22 from apt.
fn ensure_bpf_linker() -> Result<()> {
    if let Ok(version) = cmd::output(Command::new("bpf-linker").arg("--version")) {
        println!("found {}", version.trim());
        return Ok(());
    }
    println!("installing bpf-linker with cargo (about a minute)");
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env(
                "PATH",
                path_with_first(PathBuf::from(LLVM_PREFIX).join("bin"))?,
            ),
    )
    .context("installing bpf-linker failed (it needs llvm-22-dev, libpolly-22-dev, libzstd-dev)")?;
    let version = cmd::output(Command::new("bpf-linker").arg("--version"))
        .context("bpf-linker was installed but does not run")?;
    println!("installed {}", version.trim());
    Ok(())
}

/// cargo-fuzz, which `cargo xtask fuzz` (and `test`) run on the nightly toolchain.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if let Ok(version) = cmd::output(cmd::cargo().args(["fuzz", "--version"])) {
        println!("found {}", version.trim());
        return Ok(());
    }
    println!("installing cargo-fuzz with cargo (about a minute)");
    cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz failed")?;
    let version = cmd::output(cmd::cargo().args(["fuzz", "--version"]))
        .context("cargo-fuzz was installed but does not run")?;
    println!("installed {}", version.trim());
    Ok(())
}

/// `~/.cargo/bin` (or `$CARGO_HOME/bin`), where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::home_dir().map(|home| home.join(".cargo")))?;
    Some(home.join("bin"))
}

/// `$PATH` with `dir` in front (once).
fn path_with_first(dir: PathBuf) -> Result<OsString> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let rest = std::env::split_paths(&path).filter(|entry| *entry != dir);
    let entries: Vec<PathBuf> = std::iter::once(dir.clone()).chain(rest).collect();
    std::env::join_paths(entries).context("cannot build PATH")
}

/// Puts cargo's bin directory on `PATH` for every subprocess (bpf-linker, cargo-nextest).
pub fn put_cargo_bin_on_path() {
    let Some(bin) = cargo_bin_dir() else { return };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|entry| entry == bin) {
        return;
    }
    let Ok(path) = path_with_first(bin) else {
        return;
    };
    // SAFETY: called first thing in `main`, before any other thread exists.
    unsafe { std::env::set_var("PATH", path) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_packages_include_what_the_demo_and_tests_run() {
        for tool in ["iproute2", "bpftool", "curl", "llvm-22-dev"] {
            assert!(BUILD_APT_PACKAGES.contains(&tool), "{tool} missing");
        }
    }

    #[test]
    fn path_with_first_puts_the_directory_in_front_once() {
        let dir = PathBuf::from("/nonexistent/xtask-test-bin");
        let path = path_with_first(dir.clone()).unwrap();
        let entries: Vec<_> = std::env::split_paths(&path).collect();
        assert_eq!(entries.first(), Some(&dir));
        assert_eq!(entries.iter().filter(|entry| **entry == dir).count(), 1);
    }
}
