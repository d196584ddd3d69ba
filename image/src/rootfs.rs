//! What the image holds: the agent, the shared libraries it links (as `ldd` resolves them on
//! this Debian host), busybox for the init container's script and `kubectl exec`, and the
//! copyright files of the Debian packages those come from.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Where the agent is in the image (the image's entrypoint is `lb-agent`, found on `PATH`).
pub const AGENT_PATH: &str = "usr/local/bin/lb-agent";
/// The image's `PATH`.
pub const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// busybox as Debian's `busybox-static` installs it: no shared library of its own.
const BUSYBOX: &str = "/bin/busybox";
/// The Debian package that must provide [`BUSYBOX`] (the dynamic `busybox` needs libc too, and
/// lists a different set of applets).
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// The Debian packages the image needs on the building host besides glibc and libgcc.
pub const APT_PACKAGES: &[&str] = &[BUSYBOX_PACKAGE, "ca-certificates"];
/// The certificates of Debian's `ca-certificates` package, one PEM file each.
const CA_CERTIFICATES: &str = "/usr/share/ca-certificates/mozilla";
/// Where the bundle goes: Debian's path, which rustls-native-certs (kube's TLS) reads.
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
/// Applets of `busybox --list-full` left out: `linuxrc` is for an initrd.
const SKIPPED_APPLETS: &[&str] = &["linuxrc"];

/// One entry of the root filesystem, by its path without the leading `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    /// The bytes of `source` on this host.
    File {
        source: PathBuf,
        mode: u32,
    },
    /// Bytes written here (`/etc/passwd`).
    Text {
        text: String,
        mode: u32,
    },
    Symlink {
        target: String,
    },
}

/// The root filesystem: every path, parents before children (a `BTreeMap` sorts `a` before
/// `a/b`), and the Debian packages its files come from.
#[derive(Debug, Default)]
pub struct Rootfs {
    pub entries: BTreeMap<String, Entry>,
    /// Package name → version, as `dpkg-query` reports them.
    pub packages: BTreeMap<String, String>,
}

impl Rootfs {
    /// The agent at [`AGENT_PATH`], what it links, busybox with every applet, `/etc/passwd`
    /// and `/etc/group` for root, `/tmp`, and the packages' copyright files.
    pub fn for_agent(agent: &Path) -> Result<Self> {
        let mut rootfs = Self::default();
        for dir in ["proc", "sys", "dev", "run", "etc", "root"] {
            rootfs.dir(dir, 0o755);
        }
        rootfs.dir("tmp", 0o1777);
        rootfs.file(AGENT_PATH, agent, 0o755)?;
        for library in shared_libraries(agent)? {
            rootfs.host_file(&library)?;
        }
        rootfs.busybox()?;
        rootfs.text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
        rootfs.text("etc/group", "root:x:0:\n");
        rootfs.ca_bundle()?;
        rootfs.copyrights()?;
        Ok(rootfs)
    }

    /// Adds a directory and its missing parents.
    fn dir(&mut self, path: &str, mode: u32) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755);
        }
        self.entries
            .entry(path.to_owned())
            .or_insert(Entry::Dir { mode });
    }

    fn parent_of(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755);
        }
    }

    fn file(&mut self, path: &str, source: &Path, mode: u32) -> Result<()> {
        if !source.is_file() {
            bail!("{} is not a file", source.display());
        }
        self.parent_of(path);
        self.entries.insert(
            path.to_owned(),
            Entry::File {
                source: source.to_owned(),
                mode,
            },
        );
        Ok(())
    }

    fn text(&mut self, path: &str, text: &str) {
        self.parent_of(path);
        self.entries.insert(
            path.to_owned(),
            Entry::Text {
                text: text.to_owned(),
                mode: 0o644,
            },
        );
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parent_of(path);
        self.entries.insert(
            path.to_owned(),
            Entry::Symlink {
                target: target.to_owned(),
            },
        );
    }

    /// A file of this host at the same path in the image (its bytes, not a symlink to them),
    /// recording the Debian package it belongs to.
    fn host_file(&mut self, path: &Path) -> Result<()> {
        let package = owning_package(path)?;
        let version = package_version(&package)?;
        self.packages.insert(package, version);
        let relative = path
            .to_str()
            .and_then(|p| p.strip_prefix('/'))
            .with_context(|| format!("{} is not an absolute UTF-8 path", path.display()))?
            .to_owned();
        self.file(&relative, path, 0o755)
    }

    /// `/bin/busybox` of [`BUSYBOX_PACKAGE`] and a symlink to it for every applet, so
    /// `/bin/sh`, `grep` and `mount` (the init container's script) and a shell for `kubectl
    /// exec` are there.
    fn busybox(&mut self) -> Result<()> {
        let package = owning_package(Path::new(BUSYBOX))?;
        if package != BUSYBOX_PACKAGE {
            bail!(
                "{BUSYBOX} comes from the package {package}, not {BUSYBOX_PACKAGE} \
                 (apt-get install {BUSYBOX_PACKAGE})"
            );
        }
        self.host_file(Path::new(BUSYBOX))?;
        let list = output(Command::new(BUSYBOX).arg("--list-full"))?;
        for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let name = applet.rsplit('/').next().unwrap_or(applet);
            if SKIPPED_APPLETS.contains(&name) || self.entries.contains_key(applet) {
                continue;
            }
            self.symlink(applet, BUSYBOX);
        }
        Ok(())
    }

    /// `/etc/ssl/certs/ca-certificates.crt` as `update-ca-certificates` writes it from
    /// Debian's `ca-certificates` with every certificate enabled. kube's client refuses to
    /// start without system roots ("No CA certificates were loaded from the system"), even
    /// though in a cluster it trusts the ServiceAccount's CA.
    fn ca_bundle(&mut self) -> Result<()> {
        let dir = Path::new(CA_CERTIFICATES);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| {
                format!(
                    "listing {} (apt-get install ca-certificates)",
                    dir.display()
                )
            })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "crt"))
            .collect();
        files.sort();
        let Some(first) = files.first() else {
            bail!("no certificate in {}", dir.display());
        };
        let package = owning_package(first)?;
        let version = package_version(&package)?;
        self.packages.insert(package, version);
        let mut bundle = String::new();
        for file in &files {
            let pem = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            bundle.push_str(pem.trim_end());
            bundle.push('\n');
        }
        self.text(CA_BUNDLE, &bundle);
        Ok(())
    }

    /// `/usr/share/doc/PACKAGE/copyright` of every package a file came from (their licenses
    /// ask for it to travel with the binaries).
    fn copyrights(&mut self) -> Result<()> {
        let packages: Vec<String> = self.packages.keys().cloned().collect();
        for package in packages {
            let path = format!("usr/share/doc/{package}/copyright");
            let source = Path::new("/").join(&path);
            self.file(&path, &source, 0o644)
                .with_context(|| format!("the copyright file of {package}"))?;
        }
        Ok(())
    }

    /// `name=version` of each Debian package, space-separated (an image label).
    pub fn package_list(&self) -> String {
        self.packages
            .iter()
            .map(|(name, version)| format!("{name}={version}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The shared libraries and the ELF interpreter `binary` loads, as `ldd` resolves them.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(binary))?;
    parse_ldd(&out).with_context(|| format!("ldd {}", binary.display()))
}

/// The absolute paths in `ldd`'s output (`libc.so.6 => /lib/…/libc.so.6 (0x…)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x…)`); `linux-vdso.so.1` is the kernel's.
fn parse_ldd(out: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in out.lines().map(str::trim) {
        if line.contains("not found") {
            bail!("a library is missing: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim().split(' ').next().unwrap_or(""),
            None => line.split(' ').next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    if libraries.is_empty() {
        bail!("no shared library listed (a static binary needs none: is this ldd's output?)");
    }
    Ok(libraries)
}

/// The Debian package that installed `path` (`dpkg -S`), without its architecture.
fn owning_package(path: &Path) -> Result<String> {
    let out = output(Command::new("dpkg").arg("-S").arg(path))
        .with_context(|| format!("which Debian package installed {}", path.display()))?;
    let package = out
        .lines()
        .next()
        .and_then(|line| line.split_once(':'))
        .map(|(package, _)| package.trim().to_owned())
        .with_context(|| format!("dpkg -S {}: unexpected output {out:?}", path.display()))?;
    Ok(package)
}

fn package_version(package: &str) -> Result<String> {
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))?;
    Ok(version.trim().to_owned())
}

/// Runs a command and returns its stdout; fails naming the command and its stderr.
fn output(command: &mut Command) -> Result<String> {
    let line = format!("{command:?}");
    let out = command
        .output()
        .with_context(|| format!("cannot start {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_interpreter() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f60)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f60)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f60)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_missing_library_is_an_error() {
        let out = "\tlibfoo.so.1 => not found\n";
        assert!(parse_ldd(out).is_err());
    }

    #[test]
    fn directories_come_before_what_they_hold() {
        let mut rootfs = Rootfs::default();
        rootfs.text("etc/passwd", "x");
        rootfs.symlink("usr/bin/grep", BUSYBOX);
        let paths: Vec<&str> = rootfs.entries.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            ["etc", "etc/passwd", "usr", "usr/bin", "usr/bin/grep"]
        );
    }
}
