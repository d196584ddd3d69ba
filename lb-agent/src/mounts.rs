//! Finding the cgroup2 and bpf filesystems from `/proc/self/mountinfo`, and mounting bpffs
//! where it is missing. Hosts differ (`/sys/fs/cgroup` on unified hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones), so nothing here assumes a path.
use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

/// Mount points of every filesystem of type `fstype`, in mount order.
///
/// # Errors
/// When `/proc/self/mountinfo` cannot be read.
pub fn mount_points(fstype: &str) -> io::Result<Vec<PathBuf>> {
    Ok(parse_mountinfo(
        &fs::read_to_string("/proc/self/mountinfo")?,
        fstype,
    ))
}

fn parse_mountinfo(text: &str, fstype: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split_whitespace().next()? == fstype)
                .then(|| before.split_whitespace().nth(4).map(unescape))
                .flatten()
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The root of the cgroup v2 hierarchy.
///
/// # Errors
/// When no cgroup2 filesystem is mounted.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    mount_points("cgroup2")?.into_iter().next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo)",
        )
    })
}

/// Makes sure `dir` lies on a bpf filesystem, mounting one at `/sys/fs/bpf` when `dir` is
/// below it and nothing is mounted there yet, and creates `dir`.
///
/// # Errors
/// When `dir` is not on bpffs and cannot be put on it.
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let default = Path::new("/sys/fs/bpf");
    let mounts = mount_points("bpf")?;
    let on_bpffs = |d: &Path| mounts.iter().any(|m| d.starts_with(m));
    if !on_bpffs(dir) {
        if !dir.starts_with(default) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not on a bpf filesystem", dir.display()),
            ));
        }
        mount_bpffs(default)?;
    }
    create_private_dirs(dir)?;
    check_pin_dir(dir)
}

/// Creates `dir` and its missing parents with mode 0700.
fn create_private_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Refuses a pin directory that another user owns or that others may write to: whoever
/// can replace a pinned map there chooses where every Service's traffic goes.
///
/// # Errors
/// When `dir` cannot be read, or its owner or mode are unsafe (the message says which).
pub fn check_pin_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by the agent's uid {euid}: another user could replace its pins (chown it, or remove it and let the agent create it)",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} has mode {:o}: writable by group or others, who could replace its pins (chmod go-w it)",
                dir.display(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            // Only root may look into it (the default is 0755 on older kernels).
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
40 25 0:35 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:14 - bpf bpf rw,mode=700
41 30 0:36 / /mnt/with\\040space rw - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        assert_eq!(
            parse_mountinfo(MOUNTINFO, "cgroup2"),
            [
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/mnt/with space")
            ]
        );
        assert_eq!(
            parse_mountinfo(MOUNTINFO, "bpf"),
            [PathBuf::from("/sys/fs/bpf")]
        );
        assert!(parse_mountinfo(MOUNTINFO, "ext4").is_empty());
    }

    /// A pin directory others may write to is refused with what to do; the agent's own
    /// (created 0700) passes.
    #[test]
    fn a_pin_dir_writable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("lb-pin-check-{}", std::process::id()));
        create_private_dirs(&dir.join("lb")).unwrap();
        let pins = dir.join("lb");
        let mode = fs::metadata(&pins).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "created private: {mode:o}");
        check_pin_dir(&pins).unwrap();
        fs::set_permissions(&pins, fs::Permissions::from_mode(0o777)).unwrap();
        let error = check_pin_dir(&pins).unwrap_err().to_string();
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            error.contains("has mode 777: writable by group or others")
                && error.contains("chmod go-w"),
            "{error}"
        );
    }
}
