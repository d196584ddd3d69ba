//! Facts about this machine: who we are and what is mounted where.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Where bpffs belongs; not mounted on a fresh machine.
pub const BPFFS: &str = "/sys/fs/bpf";

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fails with `why` unless this process runs as root.
pub fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("{why} needs root (effective uid 0); run it with sudo or as root");
    }
    Ok(())
}

/// Mount points of the filesystems of type `fstype` in a `/proc/self/mountinfo` text.
pub fn mount_points(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split(' ').nth(4)?;
            (fs.split(' ').next()? == fstype).then(|| PathBuf::from(unescape(point)))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|oct| u8::from_str_radix(oct, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn own_mounts(fstype: &str) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(mount_points(&text, fstype))
}

/// The cgroup v2 mount (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on others).
pub fn cgroup2_root() -> Result<PathBuf> {
    own_mounts("cgroup2")?
        .into_iter()
        .next()
        .context("no cgroup2 filesystem is mounted (none in /proc/self/mountinfo)")
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is there already.
pub fn ensure_bpffs() -> Result<()> {
    if own_mounts("bpf")?
        .iter()
        .any(|point| point == Path::new(BPFFS))
    {
        println!("found bpffs at {BPFFS}");
        return Ok(());
    }
    cmd::output(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    println!("mounted bpffs at {BPFFS}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 22 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
52 22 0:45 / /sys/fs/bpf rw,relatime shared:9 - bpf bpf rw,mode=700
53 22 0:46 / /mnt/with\\040space rw - bpf bpf rw
";

    #[test]
    fn finds_cgroup2_where_it_is_mounted() {
        assert_eq!(
            mount_points(MOUNTINFO, "cgroup2"),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
    }

    #[test]
    fn finds_every_bpffs_and_unescapes_spaces() {
        assert_eq!(
            mount_points(MOUNTINFO, "bpf"),
            [
                PathBuf::from("/sys/fs/bpf"),
                PathBuf::from("/mnt/with space")
            ]
        );
    }

    #[test]
    fn optional_fields_do_not_shift_the_filesystem_type() {
        assert!(mount_points(MOUNTINFO, "shared:1").is_empty());
        assert_eq!(mount_points(MOUNTINFO, "ext4"), [PathBuf::from("/")]);
    }
}
