//! What the kernel charges a BPF program that does nothing at the datapath's hooks, measured
//! as the datapath's own programs are (`run_time_ns / run_cnt` with `kernel.bpf_stats_enabled`):
//! the part of every per-program figure that no change to lb's code can remove (the clock
//! reads of the statistics around the call, and the call). Two programs of two instructions
//! (`r0 = 1; exit`), assembled with LLVM's `llvm-mc` (installed with the eBPF toolchain),
//! are loaded with `bpftool`: one at `connect4` on the plain cgroup and one at tc ingress of
//! the direct client's veth, during a short run of direct connections, before the sweep
//! (they are detached before any measured run).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use serde::{Deserialize, Serialize};

use super::agent::{self, ProgStats};
use super::lab;
use crate::cmd;

/// `run_time_ns / run_cnt` of each empty program.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmptyPrograms {
    /// Per `connect()`, at the cgroup `connect4` hook.
    pub connect4_ns: f64,
    /// Per packet, at tc ingress.
    pub tc_ns: f64,
}

/// The program names (at most 15 characters: the kernel keeps no more).
const CONNECT4: &str = "empty_connect4";
const TC: &str = "empty_tc";

const LLVM_MC: &str = "/usr/lib/llvm-22/bin/llvm-mc";

/// The two empty programs, attached; dropping this detaches and removes them.
pub struct Attached {
    cgroup: PathBuf,
    connect4_pin: PathBuf,
    tc_pin: PathBuf,
    node_netns: &'static str,
    device: String,
    ids: std::collections::BTreeSet<u32>,
}

impl Attached {
    /// Assembles and loads both programs into `dir` (a directory of bpffs), then attaches
    /// them to `cgroup` and to the ingress of `device` in `node_netns`.
    pub fn attach(
        dir: &Path,
        cgroup: &Path,
        node_netns: &'static str,
        device: &str,
    ) -> Result<Self> {
        let work = lab::Paths::run_dir().join("empty-programs");
        std::fs::create_dir_all(&work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut attached = Self {
            cgroup: cgroup.to_path_buf(),
            connect4_pin: dir.join(CONNECT4),
            tc_pin: dir.join(TC),
            node_netns,
            device: device.to_string(),
            ids: Default::default(),
        };
        let connect4 = assemble(&work, "cgroup/connect4", CONNECT4)?;
        let tc = assemble(&work, "tc", TC)?;
        load(&connect4, &attached.connect4_pin, "cgroup/connect4")?;
        load(&tc, &attached.tc_pin, "classifier")?;
        // From here on, dropping `attached` undoes whatever was done.
        cmd::output(
            Command::new("bpftool")
                .args(["cgroup", "attach"])
                .arg(cgroup)
                .args(["connect4", "pinned"])
                .arg(&attached.connect4_pin)
                .arg("multi"),
        )?;
        attached.tc(&["qdisc", "add", "dev", device, "clsact"])?;
        let pin = attached.tc_pin.to_string_lossy().into_owned();
        attached.tc(&[
            "filter",
            "add",
            "dev",
            device,
            "ingress",
            "bpf",
            "object-pinned",
            &pin,
            "da",
        ])?;
        attached.ids = [
            agent::pinned_program(&attached.connect4_pin)?,
            agent::pinned_program(&attached.tc_pin)?,
        ]
        .into();
        Ok(attached)
    }

    /// Their cumulative run counts and times.
    pub fn stats(&self) -> Result<ProgStats> {
        agent::prog_stats(&self.ids)
    }

    fn tc(&self, args: &[&str]) -> Result<()> {
        cmd::output(lab::in_netns(self.node_netns, "tc").args(args)).map(drop)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = cmd::output(
            Command::new("bpftool")
                .args(["cgroup", "detach"])
                .arg(&self.cgroup)
                .args(["connect4", "pinned"])
                .arg(&self.connect4_pin),
        );
        let _ = self.tc(&["qdisc", "del", "dev", &self.device, "clsact"]);
        let _ = std::fs::remove_file(&self.connect4_pin);
        let _ = std::fs::remove_file(&self.tc_pin);
        if let Some(dir) = self.tc_pin.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The figures of a run, from the programs' statistics over it.
pub fn per_call(during: &ProgStats) -> Result<EmptyPrograms> {
    let of = |name: &str| -> Result<f64> {
        let &(cnt, ns) = during
            .0
            .get(name)
            .with_context(|| format!("no statistics for the empty program {name}"))?;
        ensure!(cnt > 0, "the empty program {name} never ran");
        Ok(ns as f64 / cnt as f64)
    };
    Ok(EmptyPrograms {
        connect4_ns: of(CONNECT4)?,
        tc_ns: of(TC)?,
    })
}

/// `r0 = 1; exit` as the function `name` in `section`, assembled into an object in `work`.
fn assemble(work: &Path, section: &str, name: &str) -> Result<PathBuf> {
    let source = work.join(format!("{name}.s"));
    let object = work.join(format!("{name}.o"));
    std::fs::write(
        &source,
        format!(
            "\t.section \"{section}\",\"ax\"\n\t.globl {name}\n\t.type {name},@function\n\
             {name}:\n\tr0 = 1\n\texit\n.Lend:\n\t.size {name}, .Lend-{name}\n\
             \t.section \"license\",\"aw\"\n\t.asciz \"GPL\"\n"
        ),
    )
    .with_context(|| format!("cannot write {}", source.display()))?;
    cmd::output(
        Command::new(LLVM_MC)
            .args(["-triple", "bpfel", "-filetype=obj", "-o"])
            .arg(&object)
            .arg(&source),
    )?;
    Ok(object)
}

fn load(object: &Path, pin: &Path, kind: &str) -> Result<()> {
    cmd::output(
        Command::new("bpftool")
            .args(["prog", "load"])
            .arg(object)
            .arg(pin)
            .args(["type", kind]),
    )
    .map(drop)
}
