//! Rootful podman with its own storage in the test's directory, so nothing of it is left on
//! the machine: images and containers live in `<dir>/podman`, and every container is
//! removed on drop (also while panicking) and by [`crate::cleanup_leftovers`] after a crash.
//!
//! The flags are those this machine kind needs (`toolchain.md`): the vfs storage driver,
//! runc (crun refuses the hybrid cgroup layout), cgroupfs (no systemd), and ulimits within
//! the hard limits.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cmd;
use crate::pod_spec::ContainerRun;

/// How long a podman command may take (`load` copies the image into vfs storage).
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);

/// A podman whose storage is below one directory.
#[derive(Debug)]
pub struct Podman {
    dir: PathBuf,
}

/// How a container of the pod is run besides its own settings.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `--network ns:PATH`: the test's node namespace stands for the host network.
    pub netns: Option<PathBuf>,
    /// Extra `-e` variables (what a real cluster adds: the API server's address).
    pub env: Vec<(String, String)>,
    /// Extra read-only files, host path → container path (the API server's credentials).
    pub files: Vec<(PathBuf, String)>,
    /// Capabilities left out of the container's `add` list (least-privilege runs).
    pub without_caps: Vec<String>,
    /// `--detach` (the agent) or run to the end (init containers).
    pub detach: bool,
}

impl Podman {
    /// Podman with its storage in `<dir>/podman` (created). Panics when podman or runc is
    /// missing.
    #[track_caller]
    pub fn new(dir: &Path) -> Self {
        for tool in ["podman", "runc"] {
            if let Err(e) = cmd::run(Command::new(tool).arg("--version"), PODMAN_TIMEOUT) {
                panic!(
                    "{e}: apt-get install podman runc (cargo xtask test does), or set \
                     LB_SKIP_CONTAINER_TESTS=1 to skip the container tests"
                );
            }
        }
        let podman = Self {
            dir: dir.join("podman"),
        };
        for sub in ["root", "runroot", "tmp"] {
            let path = podman.dir.join(sub);
            std::fs::create_dir_all(&path)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        }
        podman
    }

    /// `podman` with this storage and this machine's runtime settings.
    pub fn command(&self) -> Command {
        command_for(&self.dir)
    }

    /// Runs `podman ARGS`, returning stdout or an error with stderr.
    pub fn run_args(&self, args: &[&str]) -> Result<String, String> {
        cmd::run(self.command().args(args), PODMAN_TIMEOUT)
    }

    /// `podman load -i ARCHIVE`; returns the name it loaded the image as.
    #[track_caller]
    pub fn load(&self, archive: &Path) -> String {
        let out = cmd::run(
            self.command().arg("load").arg("-i").arg(archive),
            PODMAN_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        out.lines()
            .find_map(|line| line.strip_prefix("Loaded image:"))
            .or_else(|| out.lines().find_map(|l| l.strip_prefix("Loaded image(s):")))
            .map(|name| name.trim().to_owned())
            .unwrap_or_else(|| panic!("podman load printed no image name: {out}"))
    }

    /// Runs `container` of the rendered pod with `options`; returns podman's output (the
    /// container id when detached, its output otherwise) or the error with its stderr.
    pub fn run(&self, container: &ContainerRun, options: &RunOptions) -> Result<String, String> {
        let mut command = self.command();
        command.args(run_args(container, options));
        cmd::run(&mut command, PODMAN_TIMEOUT)
    }

    /// `podman exec NAME ARGS`.
    pub fn exec(&self, name: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["exec", name];
        all.extend_from_slice(args);
        self.run_args(&all)
    }

    /// `podman logs NAME` (stdout and stderr).
    pub fn logs(&self, name: &str) -> String {
        match cmd::output(self.command().args(["logs", name]), PODMAN_TIMEOUT) {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => e,
        }
    }

    /// `{{.State.Status}} {{.State.ExitCode}}` of `podman inspect`.
    pub fn state(&self, name: &str) -> Result<(String, i64), String> {
        let out = self.run_args(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            name,
        ])?;
        let mut parts = out.split_whitespace();
        let status = parts.next().unwrap_or_default().to_owned();
        let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(-1);
        Ok((status, code))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        remove_containers(&self.dir);
    }
}

fn command_for(dir: &Path) -> Command {
    let mut command = Command::new("podman");
    command
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("runroot"))
        .arg("--tmpdir")
        .arg(dir.join("tmp"))
        .args([
            "--storage-driver",
            "vfs",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]);
    command
}

/// Removes every container of the podman storage at `dir` (`<work>/podman`), running or not.
pub(crate) fn remove_containers(dir: &Path) {
    if !dir.join("root").exists() {
        return;
    }
    if let Err(err) = cmd::run(
        command_for(dir).args(["rm", "--all", "--force", "--time", "0"]),
        PODMAN_TIMEOUT,
    ) {
        eprintln!("lb-tests: cleanup: {err}");
    }
}

/// `podman run` arguments for `container`: exactly its settings, with `options`.
pub fn run_args(container: &ContainerRun, options: &RunOptions) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--name".into(),
        container.name.clone(),
        "--pull".into(),
        "never".into(),
        // Within this machine's hard limits (podman's defaults are not).
        "--ulimit".into(),
        "nofile=1024:1024".into(),
        "--ulimit".into(),
        "nproc=1024:1024".into(),
        // As Kubernetes: no tmpfs on /run and /tmp that a pod would not have.
        "--read-only-tmpfs=false".into(),
    ];
    if options.detach {
        args.push("--detach".into());
    } else {
        args.push("--rm".into());
    }
    if let Some(netns) = &options.netns {
        args.push(format!("--network=ns:{}", netns.display()));
    }
    if container.privileged {
        args.push("--privileged".into());
    }
    if let Some(user) = container.user {
        args.push(format!("--user={user}"));
    }
    if container.read_only_root {
        args.push("--read-only".into());
    }
    if container.no_new_privileges {
        args.push("--security-opt=no-new-privileges".into());
    }
    for cap in &container.caps_drop {
        args.push(format!("--cap-drop={cap}"));
    }
    for cap in &container.caps_add {
        if !options.without_caps.contains(cap) {
            args.push(format!("--cap-add={cap}"));
        }
    }
    if container.apparmor_unconfined {
        args.push("--security-opt=apparmor=unconfined".into());
    }
    match &container.seccomp {
        crate::pod_spec::Seccomp::RuntimeDefault => {}
        crate::pod_spec::Seccomp::Unconfined => {
            args.push("--security-opt=seccomp=unconfined".into());
        }
        crate::pod_spec::Seccomp::Localhost(profile) => {
            args.push(format!("--security-opt=seccomp={}", profile.display()));
        }
    }
    for label in &container.selinux {
        args.push(format!("--security-opt=label={label}"));
    }
    if let Some(bytes) = container.memory_limit {
        args.push(format!("--memory={bytes}b"));
    }
    for mount in &container.mounts {
        let mut flags = vec![if mount.read_only { "ro" } else { "rw" }];
        match mount.propagation.as_str() {
            "Bidirectional" => flags.push("rshared"),
            "HostToContainer" => flags.push("rslave"),
            _ => flags.push("rprivate"),
        }
        args.push(format!(
            "--volume={}:{}:{}",
            mount.host.display(),
            mount.container,
            flags.join(",")
        ));
    }
    for (host, path) in &options.files {
        args.push(format!("--volume={}:{path}:ro", host.display()));
    }
    for (key, value) in container.env.iter().chain(&options.env) {
        args.push(format!("--env={key}={value}"));
    }
    if let Some(command) = &container.command {
        args.push(format!(
            "--entrypoint={}",
            serde_json::to_string(command).expect("a list of strings")
        ));
    }
    args.push(container.image.clone());
    args.extend(container.args.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod_spec::MountRun;

    #[test]
    fn a_container_runs_with_its_own_settings() {
        let container = ContainerRun {
            name: "lb-agent".into(),
            image: "ghcr.io/example/lb-agent:0.1.0".into(),
            command: None,
            args: vec!["run".into()],
            env: vec![("NODE_NAME".into(), "node-a".into())],
            privileged: false,
            user: Some(0),
            read_only_root: true,
            no_new_privileges: true,
            caps_drop: vec!["ALL".into()],
            caps_add: vec!["BPF".into(), "PERFMON".into()],
            apparmor_unconfined: true,
            seccomp: crate::pod_spec::Seccomp::Unconfined,
            selinux: vec!["type:spc_t".into()],
            memory_limit: Some(1 << 20),
            mounts: vec![MountRun {
                volume: "bpffs".into(),
                host: "/tmp/x".into(),
                container: "/sys/fs/bpf".into(),
                read_only: false,
                propagation: "HostToContainer".into(),
            }],
            readiness: None,
            liveness: None,
        };
        let options = RunOptions {
            without_caps: vec!["PERFMON".into()],
            detach: true,
            ..RunOptions::default()
        };
        let args = run_args(&container, &options);
        for want in [
            "--user=0",
            "--read-only",
            "--security-opt=no-new-privileges",
            "--cap-drop=ALL",
            "--cap-add=BPF",
            "--security-opt=seccomp=unconfined",
            "--volume=/tmp/x:/sys/fs/bpf:rw,rslave",
            "--env=NODE_NAME=node-a",
            "--memory=1048576b",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
        }
        assert!(!args.iter().any(|a| a == "--cap-add=PERFMON"));
        assert_eq!(
            &args[args.len() - 2..],
            ["ghcr.io/example/lb-agent:0.1.0", "run"]
        );
    }
}
