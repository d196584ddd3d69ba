//! Running commands with messages that name the command that failed.
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, Result, bail};

/// `cargo`, the same one that runs xtask when there is one (`$CARGO`).
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(crate::repo_root());
    cmd
}

/// The command line as a person would type it (`cargo` for `$CARGO`).
pub fn describe(cmd: &Command) -> String {
    let program = cmd.get_program();
    let is_cargo = std::env::var_os("CARGO").is_some_and(|cargo| cargo == program);
    let program = if is_cargo { "cargo".as_ref() } else { program };
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with the terminal as its stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails with its stderr unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = capture(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with no stdin and returns what it printed, whatever its exit status.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Runs a clean-up command in its own process group, so that a second Ctrl-C in the terminal
/// does not interrupt it; returns why it failed, if it did.
pub fn cleanup(cmd: &mut Command) -> Result<()> {
    cmd.process_group(0);
    output(cmd).map(drop)
}
