//! Programs replaced in place behind their pinned links (`BPF_LINK_UPDATE`): an agent that
//! starts over a previous one's links swaps each link's program atomically, so the hook
//! never runs without a program nor with two, and a start that fails half-way puts the
//! previous programs back (and takes away the links it created).
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::maps::bpf::sys_bpf;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The replacements of one start, undone when it is dropped before [`Self::commit`].
#[derive(Default)]
pub struct Transaction {
    /// Links whose program was swapped: the link and the program it had.
    replaced: Vec<(PathBuf, OwnedFd, OwnedFd)>,
    /// Links this start pinned where there was none.
    created: Vec<PathBuf>,
}

impl Transaction {
    /// Swaps the program behind the link pinned at `path`, if it is attached to `target`,
    /// for `program`.
    ///
    /// # Errors
    /// When the pin is not a link, it is attached elsewhere (another `--cgroup`, a device
    /// since recreated), or the kernel refuses the update (a link whose cgroup or device is
    /// gone): the caller attaches anew.
    pub fn replace(
        &mut self,
        path: &Path,
        target: Target,
        program: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let link = open_pin(path)?;
        let (old, attached_to) = link_info(&link)?;
        if attached_to != target {
            return Err(io::Error::other(format!(
                "attached to {attached_to:?}, not {target:?}"
            )));
        }
        update(&link, program)?;
        self.replaced.push((path.to_path_buf(), link, old));
        Ok(())
    }

    /// Swaps `program` into the link pinned at `path` if there is one on `target` (see
    /// [`Self::replace`]). `false` when there is none or it cannot be swapped (said in the
    /// log): the caller attaches anew.
    pub fn swap_if_pinned(
        &mut self,
        path: &Path,
        target: impl FnOnce() -> io::Result<Target>,
        program: BorrowedFd<'_>,
    ) -> bool {
        if !path.exists() {
            return false;
        }
        match target().and_then(|target| self.replace(path, target, program)) {
            Ok(()) => true,
            Err(e) => {
                warn!(link = %path.display(), error = %e, "cannot swap the program in place; attaching anew");
                false
            }
        }
    }

    /// Records a link pinned at `path` by this start, to be removed if it fails.
    pub fn created(&mut self, path: &Path) {
        self.created.push(path.to_path_buf());
    }

    /// Keeps everything this start did.
    pub fn commit(mut self) {
        self.replaced.clear();
        self.created.clear();
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        for (path, link, old) in self.replaced.drain(..).rev() {
            match update(&link, std::os::fd::AsFd::as_fd(&old)) {
                Ok(()) => info!(link = %path.display(), "put the previous program back"),
                Err(e) => {
                    warn!(link = %path.display(), error = %e, "could not put the previous program back")
                }
            }
        }
        for path in self.created.drain(..).rev() {
            // Removing the pin drops the link's last reference: the program detaches.
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(link = %path.display(), error = %e, "could not remove a link of the failed start");
            }
        }
    }
}

/// What a link is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A cgroup, by its id (the inode number of its cgroup2 directory).
    Cgroup(u64),
    /// A network device's tcx or XDP hook, by its ifindex (the pin's name says which).
    Device(u32),
}

impl Target {
    /// The cgroup at `path`.
    ///
    /// # Errors
    /// When it cannot be read.
    pub fn cgroup(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(Self::Cgroup(std::fs::metadata(path)?.ino()))
    }
}

/// `BPF_OBJ_GET`: an fd of the object pinned at `path`.
fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a pin path"))?;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjGet {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the `obj` member; `name` outlives the call.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An fd of the program the link `link` runs, and what the link is attached to.
fn link_info(link: &OwnedFd) -> io::Result<(OwnedFd, Target)> {
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    /// The head of `struct bpf_link_info`, zero-padded (the kernel checks the tail is zero).
    #[repr(C)]
    struct LinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        rest: [u32; 29],
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = LinkInfo {
        link_type: 0,
        id: 0,
        prog_id: 0,
        rest: [0; 29],
    };
    let mut attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: the `info` member; `info` outlives the call and is `info_len` bytes.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    // The union after `prog_id` starts at byte 16 (`rest[1]`): `cgroup.cgroup_id` (u64),
    // `tcx.ifindex` and `xdp.ifindex` (u32).
    let target = match info.link_type {
        BPF_LINK_TYPE_CGROUP => {
            Target::Cgroup(u64::from(info.rest[1]) | u64::from(info.rest[2]) << 32)
        }
        BPF_LINK_TYPE_TCX | BPF_LINK_TYPE_XDP => Target::Device(info.rest[1]),
        other => {
            return Err(io::Error::other(format!(
                "link type {other}, not a cgroup, tcx or XDP link"
            )));
        }
    };
    #[repr(C)]
    struct GetById {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = GetById {
        prog_id: info.prog_id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: the id member.
    let fd = unsafe { sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }?;
    // SAFETY: a new fd that nothing else owns.
    Ok((unsafe { OwnedFd::from_raw_fd(fd as i32) }, target))
}

/// `BPF_LINK_UPDATE`: the link `link` runs `program` from now on.
fn update(link: &OwnedFd, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: the `link_update` member.
    unsafe { sys_bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}
