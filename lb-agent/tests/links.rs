//! Programs swapped behind the pinned links (`BPF_LINK_UPDATE`), and put back when a start
//! fails half-way. Privileged: a cgroup and a bpffs directory of its own, both removed
//! afterwards; nothing is attached anywhere else. Without root it is skipped, unless
//! `CI=true`, where it fails.
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::Command,
};

use aya::programs::CgroupSockAddr;
use lb_agent::{
    links::{Target, Transaction},
    loader::{self, CGROUP_PROGRAMS, SocketLb},
    mounts,
};
use lb_common::MapCapacities;

/// The test's cgroup and pin directory, removed on drop (programs detached first).
struct Scratch {
    cgroup: PathBuf,
    pins: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Option<Self> {
        // SAFETY: no arguments, no memory.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "privileged test cannot run: not root"
            );
            eprintln!("SKIPPED: not root (set CI=true to fail instead)");
            return None;
        }
        let unique = format!("lb-links-{name}-{}", std::process::id());
        let cgroup = mounts::cgroup2_root().expect("cgroup2").join(&unique);
        std::fs::create_dir_all(&cgroup).expect("test cgroup");
        let pins = Path::new("/sys/fs/bpf").join(unique);
        Some(Self { cgroup, pins })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = loader::cleanup(&self.pins) {
            eprintln!("cleanup of {}: {e}", self.pins.display());
        }
        let _ = std::fs::remove_dir(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// The id of the program the link pinned at `path` runs (`bpftool link show pinned`).
fn prog_id(path: &Path) -> u64 {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool");
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    link["prog_id"].as_u64().expect("prog_id")
}

#[test]
fn a_failed_start_puts_the_previous_programs_back_and_a_good_one_keeps_its_own() {
    let Some(scratch) = Scratch::new("rollback") else {
        return;
    };
    let capacities = MapCapacities {
        conntrack: 1024,
        conntrack_other: 1024,
        conntrack_half_open: 1024,
        ..MapCapacities::DEFAULT
    };
    // The object as an agent loads it, on the scratch pins.
    let load = || {
        loader::load(
            &scratch.pins,
            SocketLb::All,
            false,
            loader::NodePortAcceleration::Off,
            &capacities,
        )
        .expect("load")
    };
    let mut first = load();
    loader::attach_cgroup_programs(&mut first.ebpf, &scratch.cgroup, &scratch.pins)
        .expect("attach");
    let links: Vec<PathBuf> = CGROUP_PROGRAMS
        .iter()
        .map(|(_, pin)| scratch.pins.join("links").join(pin))
        .collect();
    let before: Vec<u64> = links.iter().map(|l| prog_id(l)).collect();

    // A second agent's programs, swapped into the first two links, then the start fails.
    let mut second = load();
    let target = Target::cgroup(&scratch.cgroup).expect("cgroup id");
    let mut failed = Transaction::default();
    swap(&mut second.ebpf, &mut failed, &links[0], target, 0);
    swap(&mut second.ebpf, &mut failed, &links[1], target, 1);
    assert_ne!(prog_id(&links[0]), before[0], "swapped in place");
    assert_ne!(prog_id(&links[1]), before[1]);
    drop(failed);
    let after_failure: Vec<u64> = links.iter().map(|l| prog_id(l)).collect();
    assert_eq!(after_failure, before, "the previous programs are back");

    // A link attached elsewhere is not swapped: the caller attaches anew.
    let fd = program_fd(&mut second.ebpf, 0);
    assert!(
        Transaction::default()
            .replace(&links[0], Target::Cgroup(1), fd.as_fd())
            .is_err()
    );

    let mut good = Transaction::default();
    swap(&mut second.ebpf, &mut good, &links[0], target, 0);
    good.commit();
    assert_ne!(prog_id(&links[0]), before[0], "a committed swap stays");
    drop(first);
}

/// The fd of cgroup program `index` of `ebpf`, loaded.
fn program_fd(ebpf: &mut aya::Ebpf, index: usize) -> std::os::fd::OwnedFd {
    let (name, _) = CGROUP_PROGRAMS[index];
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .expect("in the object")
        .try_into()
        .expect("a sock_addr program");
    if program.fd().is_err() {
        program.load().expect("verifier");
    }
    program
        .fd()
        .expect("loaded")
        .as_fd()
        .try_clone_to_owned()
        .expect("dup")
}

/// Swaps program `index` of `ebpf` into the link at `link`.
fn swap(
    ebpf: &mut aya::Ebpf,
    transaction: &mut Transaction,
    link: &Path,
    target: Target,
    index: usize,
) {
    let fd = program_fd(ebpf, index);
    transaction.replace(link, target, fd.as_fd()).expect("swap");
}
