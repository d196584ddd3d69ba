//! Running commands with a time limit.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long the plumbing commands (`ip`, `bpftool`) may take.
pub const PLUMBING_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `cmd` to completion, killing it after `timeout`. Errors carry the command line.
pub fn output(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let line = describe(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{line}: cannot start: {e}"))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let result = match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = rx.recv();
            return Err(format!("{line}: still running after {timeout:?}, killed"));
        }
    };
    result.map_err(|e| format!("{line}: {e}"))
}

/// Runs `cmd` and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let line = describe(cmd);
    let out = output(cmd, timeout)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{line}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// Runs `ip ARGS...` and panics on failure.
#[track_caller]
pub fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args), PLUMBING_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_out() {
        let err = output(Command::new("sleep").arg("5"), Duration::from_millis(100)).unwrap_err();
        assert!(err.contains("killed"), "{err}");
    }

    #[test]
    fn reports_failure() {
        let err = run(&mut Command::new("false"), Duration::from_secs(5)).unwrap_err();
        assert!(err.starts_with("false: exit status: 1"), "{err}");
        assert_eq!(
            run(Command::new("echo").arg("hi"), Duration::from_secs(5)).unwrap(),
            "hi\n"
        );
    }
}
