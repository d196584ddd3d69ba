//! `cargo xtask bench --soak`: the churn soak, run by `lb-soak` (tests crate) in network
//! namespaces of its own against the agent (release; debug with `--quick`), holding the
//! bench's lock so no bench measures beside it. Its table goes to stdout and to
//! `target/bench/soak.md` (`soak-quick.md`).
use std::io::Read as _;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::{cmd, host, install};

pub struct Settings {
    pub quick: bool,
    pub services: usize,
    pub rate: u64,
    pub duration_s: u64,
}

pub fn run(settings: &Settings) -> Result<()> {
    host::require_root("`cargo xtask bench --soak` (network namespaces, cgroups, eBPF)")?;
    let _lock = super::lab::lock()?;
    install::ensure_build_prereqs()?;
    install::ensure_apt(&["iproute2", "bpftool"])?;
    let mut agent = cmd::cargo();
    agent.args(["build", "-p", "lb-agent"]);
    if !settings.quick {
        agent.arg("--release");
    }
    println!("==> {}", cmd::describe(&agent));
    cmd::run(&mut agent)?;
    // Its own build: together, cargo would unify features and rebuild the agent.
    let mut soak = cmd::cargo();
    soak.args(["build", "-p", "lb-tests", "--bin", "lb-soak"]);
    println!("==> {}", cmd::describe(&soak));
    cmd::run(&mut soak)?;
    let target = crate::target_dir();
    let profile = if settings.quick { "debug" } else { "release" };
    let mut command = Command::new(target.join("debug").join("lb-soak"));
    command
        .args(["--services", &settings.services.to_string()])
        .args(["--rate", &settings.rate.to_string()])
        .args(["--duration", &settings.duration_s.to_string()])
        .env("LB_AGENT_BIN", target.join(profile).join("lb-agent"))
        .env("NO_COLOR", "1");
    println!(
        "==> soak: {} Services, {} API writes/s, {} s ({profile} agent)",
        settings.services, settings.rate, settings.duration_s
    );
    // The changes, the initial and the fresh agent's syncs (5 min each at most), slack.
    let limit = Duration::from_secs(settings.duration_s + 900);
    let line = cmd::describe(&command);
    let (stdout, status) = bounded(command, limit).with_context(|| format!("running `{line}`"))?;
    print!("{stdout}");
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(if settings.quick {
        "soak-quick.md"
    } else {
        "soak.md"
    });
    std::fs::write(&file, &stdout).with_context(|| format!("writing {}", file.display()))?;
    if !status.success() || !stdout.contains("| result | passed |") {
        bail!("the soak failed (table above; {})", file.display());
    }
    println!("soak passed; table in {}", file.display());
    Ok(())
}

/// Runs `command` with its stderr shown (the soak's progress), killed after `limit`;
/// returns its stdout and exit status (a failed soak still prints its table).
fn bounded(mut command: Command, limit: Duration) -> Result<(String, ExitStatus)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    super::lab::die_with_parent(&mut command);
    let mut child = command.spawn()?;
    let mut out = child.stdout.take().context("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(limit) {
        Ok(status) => status?,
        Err(_) => {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            bail!("did not finish within {limit:?}");
        }
    };
    Ok((reader.join().unwrap_or_default(), status))
}
