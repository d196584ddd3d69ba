//! `lb-agent services`: the frontends and backends in the pinned maps, read without the
//! agent (like `cilium-dbg bpf lb list`).
use std::{fmt::Write as _, path::Path};

use crate::maps::{
    self,
    dump::{FrontendEntry, MapContents},
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
    let mut rows = vec![[
        "FRONTEND".to_string(),
        "ID".to_string(),
        "SLOT".to_string(),
        "BACKEND".to_string(),
    ]];
    for frontend in &contents.frontends {
        rows.extend(frontend_rows(frontend));
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line = format!(
            "{:w0$}  {:>w1$}  {:>w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if !contents.stray_services.is_empty() || !contents.stray_backends.is_empty() {
        let _ = writeln!(
            out,
            "\n{} stray service entries, {} undecodable backends (the next agent sync removes them)",
            contents.stray_services.len(),
            contents.stray_backends.len()
        );
    }
    out
}

fn frontend_rows(frontend: &FrontendEntry) -> Vec<[String; 4]> {
    let name = frontend.address.to_string();
    let id = frontend.rev_nat_id.to_string();
    if frontend.count == 0 {
        return vec![[
            name,
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
                |b| format!("{b} (backend {})", slot.backend_id),
            );
            let first = i == 0;
            [
                if first { name.clone() } else { String::new() },
                if first { id.clone() } else { String::new() },
                slot.slot.to_string(),
                backend,
            ]
        })
        .collect()
}
