//! `cargo xtask bench --lifecycle`: the agent SIGKILLed and started again under a steady
//! connection load, run by `lb-lifecycle` (tests crate) in network namespaces of its own
//! against the agent (release; debug with `--quick`), holding the bench's lock. Its table
//! goes to stdout and to `target/bench/lifecycle.md` (`lifecycle-quick.md`).
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cmd, host, install};

pub struct Settings {
    pub quick: bool,
    pub cycles: u32,
    /// Another agent build started on every other cycle.
    pub upgrade_to: Option<std::path::PathBuf>,
}

pub fn run(settings: &Settings) -> Result<()> {
    host::require_root("`cargo xtask bench --lifecycle` (network namespaces, cgroups, eBPF)")?;
    let _lock = super::lab::lock()?;
    install::ensure_build_prereqs()?;
    install::ensure_apt(&["iproute2", "bpftool"])?;
    let bins = super::build_agent_and_loadgen(settings.quick)?;
    let mut bench = cmd::cargo();
    bench.args(["build", "-p", "lb-tests", "--bin", "lb-lifecycle"]);
    println!("==> {}", cmd::describe(&bench));
    cmd::run(&mut bench)?;
    let target = crate::target_dir();
    let profile = if settings.quick { "debug" } else { "release" };
    let mut command = Command::new(target.join("debug").join("lb-lifecycle"));
    command
        .args(["--cycles", &settings.cycles.to_string()])
        .env("LB_AGENT_BIN", bins.join("lb-agent"))
        .env("LB_LOADGEN_BIN", bins.join("lb-loadgen"));
    if let Some(bin) = &settings.upgrade_to {
        command.arg("--upgrade-to").arg(bin);
    }
    println!(
        "==> lifecycle: {} kill-and-start cycles under load ({profile} agent)",
        settings.cycles
    );
    let line = cmd::describe(&command);
    let out = cmd::capture(&mut command).with_context(|| format!("running `{line}`"))?;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{table}");
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(if settings.quick {
        "lifecycle-quick.md"
    } else {
        "lifecycle.md"
    });
    std::fs::write(&file, &table).with_context(|| format!("writing {}", file.display()))?;
    if !out.status.success() {
        bail!(
            "connections failed across restarts: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("table in {}", file.display());
    Ok(())
}
