//! `lb-agent services`: the frontends and backends in the pinned maps, read without the
//! agent (like `cilium-dbg bpf lb list`).
use std::{fmt::Write as _, path::Path};

use crate::{
    maps::{
        self,
        dump::{FrontendEntry, MapContents},
    },
    model::FrontendKind,
};

/// Output format of the inspection commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One line per backend, aligned columns.
    #[default]
    Table,
    /// A JSON array of frontends, for scripts.
    Json,
}

/// Reads the maps pinned under `pin_dir` and renders them.
///
/// # Errors
/// When the maps are not pinned there or cannot be read.
pub fn services(pin_dir: &Path, format: OutputFormat) -> anyhow::Result<String> {
    let pinned = maps::bpf::BpfMaps::open_pinned(pin_dir).map_err(|e| {
        anyhow::anyhow!(
            "{e} (is an agent running with --bpf-pin-path {}?)",
            pin_dir.display()
        )
    })?;
    let contents = maps::dump::read(&pinned)?;
    Ok(match format {
        OutputFormat::Json => serde_json::to_string_pretty(&contents.frontends)? + "\n",
        OutputFormat::Table => table(&contents),
    })
}

/// The table rendering: one row per backend slot.
#[must_use]
pub fn table(contents: &MapContents) -> String {
    let header = ["FRONTEND", "TYPE", "ID", "SLOT", "BACKEND"].map(String::from);
    let mut rows = vec![header];
    for frontend in &contents.frontends {
        rows.extend(frontend_rows(frontend));
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line = format!(
            "{:w0$}  {:w1$}  {:>w2$}  {:>w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if !contents.stray_slots.is_empty() {
        let _ = writeln!(
            out,
            "\n{} backend slots without a frontend (the next agent sync removes them)",
            contents.stray_slots.len()
        );
    }
    out
}

fn frontend_rows(frontend: &FrontendEntry) -> Vec<[String; 5]> {
    let name = frontend.address.to_string();
    let kind = match frontend.kind {
        Some(FrontendKind::ClusterIp) => "ClusterIP".to_string(),
        Some(FrontendKind::ExternalIp) => "ExternalIP".to_string(),
        Some(FrontendKind::LoadBalancer) => "LoadBalancer".to_string(),
        None => format!("flags {:#x}", frontend.flags),
    };
    let id = frontend.rev_nat_id.to_string();
    if frontend.count == 0 {
        return vec![[
            name,
            kind,
            id,
            "-".into(),
            "(no endpoints: connections are refused)".into(),
        ]];
    }
    frontend
        .slots
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            let backend = slot.backend.map_or_else(
                || format!("backend {} (missing)", slot.backend_id),
                |b| format!("{b} [backend {}]", slot.backend_id),
            );
            let first = i == 0;
            let only_first = |s: &String| if first { s.clone() } else { String::new() };
            [
                only_first(&name),
                only_first(&kind),
                only_first(&id),
                slot.slot.to_string(),
                backend,
            ]
        })
        .collect()
}
