//! Mounts of this process, from `/proc/self/mountinfo`.

use std::path::PathBuf;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// All mounts of this process; empty when mountinfo cannot be read.
pub fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse_mountinfo(&text))
        .unwrap_or_default()
}

/// Where the first mount of `fstype` is.
pub fn find(fstype: &str) -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|m| m.fstype == fstype)
        .map(|m| m.mount_point)
}

/// Whether a filesystem of `fstype` is mounted at `mount_point`.
pub fn is_mounted(mount_point: &str, fstype: &str) -> bool {
    mounts()
        .iter()
        .any(|m| m.fstype == fstype && m.mount_point.as_os_str() == mount_point)
}

/// Unmounts every mount on or below `dir`, the deepest (the latest) first, detaching busy
/// ones; reports failures.
pub fn unmount_below(dir: &std::path::Path) {
    let mut points: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|point| point.starts_with(dir))
        .collect();
    // mountinfo lists mounts in the order they were made: undo them in reverse.
    points.reverse();
    for point in points {
        if let Err(err) = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("lb-tests: cleanup: umount {}: {err}", point.display());
        }
    }
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional fields...] - fstype source super-options
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let text = "\
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
50 22 0:45 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700
60 22 0:46 / /mnt/a\\040b rw - tmpfs tmpfs rw
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(
            mounts[0].mount_point,
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        assert_eq!(mounts[0].fstype, "cgroup2");
        assert_eq!(mounts[1].fstype, "bpf");
        assert_eq!(mounts[2].mount_point, PathBuf::from("/mnt/a b"));
    }
}
