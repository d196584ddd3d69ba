//! `cargo xtask image`: the agent's OCI image, built offline (no registry, no container
//! engine): the release binary, the shared libraries it links and busybox, from this Debian
//! host's packages, written as an OCI archive under `target/image/`. The layout is
//! `lb_image`'s; the Dockerfile produces the same one with `--rootfs`.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cmd, install};

/// Debian packages the image's files come from, besides glibc and libgcc (always there).
pub const IMAGE_APT_PACKAGES: &[&str] = lb_image::APT_PACKAGES;

#[derive(clap::Args)]
pub struct Args {
    /// Put in the debug build instead of the release build (quicker to build, ~3x larger).
    #[arg(long)]
    debug: bool,
    /// Put in this lb-agent binary instead of building one.
    #[arg(long, value_name = "PATH", conflicts_with = "debug")]
    agent: Option<PathBuf>,
    /// Where to write the OCI archive [default: target/image/lb-agent-VERSION.oci.tar].
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Write the image's root filesystem to DIR instead of an archive (the Dockerfile copies
    /// it into `FROM scratch`).
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    rootfs: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    install::ensure_apt(IMAGE_APT_PACKAGES)?;
    let agent = match &args.agent {
        Some(agent) => agent.clone(),
        None => build_agent(args.debug)?,
    };
    if let Some(dir) = &args.rootfs {
        let rootfs = lb_image::write_rootfs(&agent, dir)?;
        println!(
            "wrote the image's root filesystem to {} ({} entries; {})",
            dir.display(),
            rootfs.entries.len(),
            rootfs.package_list()
        );
        return Ok(());
    }
    let out = match &args.out {
        Some(out) => out.clone(),
        None => crate::target_dir()
            .join("image")
            .join(format!("lb-agent-{}.oci.tar", agent_version(&agent)?)),
    };
    write_archive(&agent, &out)
}

/// Writes the image around `agent` as an OCI archive (gzipped layer) at `out`.
pub fn write_archive(agent: &Path, out: &Path) -> Result<()> {
    let version = agent_version(agent)?;
    let commit = Commit::of_head();
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    let spec = lb_image::ImageSpec {
        agent: agent.to_owned(),
        name: format!("lb-agent:{version}"),
        version: version.clone(),
        revision: commit.revision,
        created: commit.time,
        created_epoch: commit.epoch,
        compress: true,
    };
    let built = lb_image::build(&spec, out)?;
    report(out, &spec, &built);
    Ok(())
}

fn report(out: &Path, spec: &lb_image::ImageSpec, built: &lb_image::Built) {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!("wrote {}", out.display());
    println!(
        "  lb-agent {} ({}), {}",
        spec.version, spec.revision, built.written.manifest_digest
    );
    println!(
        "  size: {:.1} MiB of files, {:.1} MiB compressed (what a node pulls)",
        mib(built.rootfs_size),
        mib(built.written.layer_size)
    );
    println!("  from Debian packages: {}", built.packages);
    println!(
        "load it:  podman load -i {}   (as localhost/{})",
        out.display(),
        spec.name
    );
    println!(
        "push it:  skopeo copy oci-archive:{} docker://REGISTRY/{}",
        out.display(),
        spec.name
    );
}

/// `cargo build [--release] -p lb-agent`; returns the binary.
fn build_agent(debug: bool) -> Result<PathBuf> {
    install::ensure_build_prereqs()?;
    let mut build = cmd::cargo();
    build.args(["build", "--locked", "-p", "lb-agent"]);
    if !debug {
        build.arg("--release");
    }
    println!("==> {}", cmd::describe(&build));
    cmd::run(&mut build)?;
    let profile = if debug { "debug" } else { "release" };
    Ok(crate::target_dir().join(profile).join("lb-agent"))
}

/// `0.1.0` from `lb-agent --version` (`lb-agent 0.1.0`).
fn agent_version(agent: &Path) -> Result<String> {
    let out = cmd::output(Command::new(agent).arg("--version"))?;
    match out.split_whitespace().collect::<Vec<_>>()[..] {
        ["lb-agent", version] => Ok(version.to_owned()),
        _ => bail!("{} --version printed {out:?}", agent.display()),
    }
}

/// The commit the image is built from.
struct Commit {
    /// The commit id, with `-dirty` when the work tree differs from it.
    revision: String,
    /// Its commit time, RFC 3339 and in seconds: the same commit gives the same image.
    time: String,
    epoch: u64,
}

impl Commit {
    fn of_head() -> Self {
        let git = |args: &[&str]| {
            cmd::output(
                Command::new("git")
                    .args(args)
                    .current_dir(crate::repo_root()),
            )
            .ok()
            .map(|out| out.trim().to_owned())
        };
        let Some(id) = git(&["rev-parse", "HEAD"]) else {
            println!("note: no git repository: revision \"unknown\", created at the epoch");
            return Self {
                revision: "unknown".to_owned(),
                time: "1970-01-01T00:00:00Z".to_owned(),
                epoch: 0,
            };
        };
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
            .is_some_and(|status| !status.is_empty());
        let when = git(&["log", "-1", "--format=%ct %cI"]).unwrap_or_default();
        let (epoch, time) = when
            .split_once(' ')
            .unwrap_or(("0", "1970-01-01T00:00:00Z"));
        Self {
            revision: if dirty { format!("{id}-dirty") } else { id },
            time: time.to_owned(),
            epoch: epoch.parse().unwrap_or(0),
        }
    }
}
