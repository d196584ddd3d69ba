//! The `lb-agent` container image, built offline on a Debian host: no base image, no
//! registry, no container engine. One layer holds
//!
//! - `/usr/local/bin/lb-agent` (the image's entrypoint),
//! - the shared libraries it links, at the paths `ldd` resolves them to (glibc and libgcc_s
//!   from Debian's `libc6` and `libgcc-s1`),
//! - `/bin/busybox` from `busybox-static` with a symlink per applet: `sh`, `grep` and `mount`
//!   for the DaemonSet's init container, a shell for `kubectl exec`,
//! - `/etc/ssl/certs/ca-certificates.crt` from `ca-certificates` (kube's TLS client needs
//!   system roots to start),
//! - `/etc/passwd` and `/etc/group` for root, `/tmp`, and each package's copyright file.
//!
//! `cargo xtask image` writes it as an OCI archive; the tests build the same image around
//! the debug binary; the Dockerfile copies [`write_rootfs`]'s directory into `FROM scratch`.
mod layer;
mod oci;
mod rootfs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;

pub use oci::Written;
pub use rootfs::{AGENT_PATH, APT_PACKAGES, BUSYBOX_PACKAGE, Rootfs};

/// Which image to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The `lb-agent` binary to put in.
    pub agent: PathBuf,
    /// `org.opencontainers.image.version`.
    pub version: String,
    /// The image's name in the archive (`org.opencontainers.image.ref.name`), what `podman
    /// load` calls it: `lb-agent:0.1.0` loads as `localhost/lb-agent:0.1.0`.
    pub name: String,
    /// `org.opencontainers.image.revision`: the commit (`-dirty` when the tree had changes).
    pub revision: String,
    /// RFC 3339: when the commit was made, so the same commit gives the same image.
    pub created: String,
    /// The same time in seconds since the epoch (the files' mtimes).
    pub created_epoch: u64,
    /// gzip the layer (for a registry); an uncompressed layer loads faster in tests.
    pub compress: bool,
}

/// What [`build`] wrote.
#[derive(Debug, Clone)]
pub struct Built {
    pub written: Written,
    /// Bytes of the root filesystem's files (the layer's tar, uncompressed).
    pub rootfs_size: u64,
    /// `name=version` of the Debian packages the image's files come from.
    pub packages: String,
}

/// Writes the image of `spec` as an OCI archive to `out`.
pub fn build(spec: &ImageSpec, out: &Path) -> Result<Built> {
    let rootfs = Rootfs::for_agent(&spec.agent)?;
    let tar = layer::tar(&rootfs, spec.created_epoch)?;
    let layer = oci::Layer::new(&tar, spec.compress)?;
    let config = oci::ImageConfig {
        created: spec.created.clone(),
        entrypoint: vec!["lb-agent".to_owned()],
        cmd: vec!["--help".to_owned()],
        user: "0".to_owned(),
        labels: labels(spec, &rootfs),
        ref_name: spec.name.clone(),
    };
    let written = oci::write_archive(out, &config, &layer)?;
    Ok(Built {
        written,
        rootfs_size: tar.len() as u64,
        packages: rootfs.package_list(),
    })
}

/// Writes the image's root filesystem to `dir` (for the Dockerfile's `COPY`).
pub fn write_rootfs(agent: &Path, dir: &Path) -> Result<Rootfs> {
    let rootfs = Rootfs::for_agent(agent)?;
    layer::write_dir(&rootfs, dir)?;
    Ok(rootfs)
}

/// The image's labels (the Dockerfile's `LABEL`s, plus version, revision, created and the
/// Debian packages).
fn labels(spec: &ImageSpec, rootfs: &Rootfs) -> BTreeMap<String, String> {
    let oci = |key: &str| format!("org.opencontainers.image.{key}");
    BTreeMap::from([
        (oci("title"), "lb-agent".to_owned()),
        (
            oci("description"),
            "Node agent of the eBPF Kubernetes service load balancer".to_owned(),
        ),
        (oci("licenses"), "MIT OR Apache-2.0".to_owned()),
        (oci("version"), spec.version.clone()),
        (oci("revision"), spec.revision.clone()),
        (oci("created"), spec.created.clone()),
        ("dev.lb.debian-packages".to_owned(), rootfs.package_list()),
    ])
}
