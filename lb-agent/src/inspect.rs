//! `lb-agent services`: the frontends and backends in the pinned maps, read without the
//! agent (like `cilium-dbg bpf lb list`).
use std::{collections::HashMap, fmt::Write as _, net::SocketAddr, path::Path};

use crate::{
    api::{self, BackendView, FrontendView},
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

/// Reads the maps pinned under `pin_dir` and renders them; with `api`, adds what only the
/// agent knows (Service and port names, endpoint sources) from its `/v1/frontends`.
///
/// # Errors
/// When the maps are not pinned there or cannot be read, or the agent cannot be reached.
pub fn services(
    pin_dir: &Path,
    format: OutputFormat,
    api: Option<SocketAddr>,
) -> anyhow::Result<String> {
    let pinned = maps::bpf::BpfMaps::open_pinned(pin_dir).map_err(|e| {
        anyhow::anyhow!(
            "{e} (is an agent running with --bpf-pin-path {}?)",
            pin_dir.display()
        )
    })?;
    let contents = maps::dump::read(&pinned)?;
    let views: HashMap<String, FrontendView> = match api {
        Some(addr) => api::fetch_frontends(addr)
            .map_err(|e| anyhow::anyhow!("asking the agent at {addr}: {e}"))?
            .into_iter()
            .map(|v| (v.frontend.clone(), v))
            .collect(),
        None => HashMap::new(),
    };
    Ok(match format {
        OutputFormat::Json => serde_json::to_string_pretty(&json(&contents, &views)?)? + "\n",
        OutputFormat::Table => table(&contents, &views),
    })
}

/// `lb-agent explain`: the agent's explanation (from `api`), with each entry as the pinned
/// maps hold it.
///
/// # Errors
/// When no agent address is given or it cannot be reached.
pub fn explain(
    pin_dir: &Path,
    api: Option<SocketAddr>,
    target: crate::explain::Target,
    from: Option<std::net::IpAddr>,
    format: OutputFormat,
) -> anyhow::Result<String> {
    let addr = api.ok_or_else(|| {
        anyhow::anyhow!("explain needs the agent's --api-addr (or LB_API_ADDR): the objects and policies are the agent's")
    })?;
    let explanation = api::fetch_explanation(addr, target, from)
        .map_err(|e| anyhow::anyhow!("asking the agent at {addr}: {e}"))?;
    if format == OutputFormat::Json {
        return Ok(serde_json::to_string_pretty(&explanation)? + "\n");
    }
    // The maps, when they can be read (the agent's answer stands without them).
    let contents = maps::bpf::BpfMaps::open_pinned(pin_dir)
        .ok()
        .and_then(|pinned| maps::dump::read(&pinned).ok());
    let map_line = |frontend: &str| -> Option<String> {
        let contents = contents.as_ref()?;
        let entry = contents
            .frontends
            .iter()
            .find(|f| f.address.to_string() == frontend);
        Some(match entry {
            None => "not in the maps (not written yet, or refused: see the agent's log)".into(),
            Some(f) => {
                let backends: Vec<String> = f
                    .slots
                    .iter()
                    .map(|s| match s.backend {
                        Some(b) => format!("{}={}", s.slot, b.addr),
                        None => format!("{}=backend {} (missing)", s.slot, s.backend_id),
                    })
                    .collect();
                format!(
                    "id {}, {} backend slot(s){}{}",
                    f.rev_nat_id,
                    f.count,
                    if backends.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", backends.join(" "))
                    },
                    f.affinity_timeout
                        .map_or_else(String::new, |t| format!(", affinity {t} s"))
                )
            }
        })
    };
    Ok(crate::explain::render(&explanation, &map_line))
}

/// The frontends as JSON: the map entries, plus `service`, `port_name` and each backend's
/// `source`, `node_name`, `zone` where the agent told them.
fn json(
    contents: &MapContents,
    views: &HashMap<String, FrontendView>,
) -> anyhow::Result<serde_json::Value> {
    let mut list = Vec::new();
    for frontend in &contents.frontends {
        let mut value = serde_json::to_value(frontend)?;
        if let Some(view) = views.get(&frontend.address.to_string()) {
            value["service"] = view.service.clone().into();
            value["port_name"] = view.port_name.clone().into();
            let backends = value["backends"].as_array_mut().into_iter().flatten();
            for (slot, backend) in frontend.slots.iter().zip(backends) {
                let Some(known) = slot
                    .backend
                    .and_then(|b| backend_view(view, &b.addr.to_string()))
                else {
                    continue;
                };
                backend["source"] = known.source.clone().into();
                backend["node_name"] = known.node_name.clone().into();
                backend["zone"] = known.zone.clone().into();
            }
        }
        list.push(value);
    }
    Ok(serde_json::Value::Array(list))
}

fn backend_view<'a>(view: &'a FrontendView, backend: &str) -> Option<&'a BackendView> {
    view.backends.iter().find(|b| b.backend == backend)
}

/// The table rendering: one row per backend slot.
#[must_use]
pub fn table(contents: &MapContents, views: &HashMap<String, FrontendView>) -> String {
    let header = ["FRONTEND", "TYPE", "ID", "SLOT", "BACKEND"].map(String::from);
    let mut rows = vec![header];
    for frontend in &contents.frontends {
        rows.extend(frontend_rows(
            frontend,
            views.get(&frontend.address.to_string()),
        ));
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
    if !contents.overlapping.is_empty() {
        let _ = writeln!(
            out,
            "\n{} frontends name backend slots another frontend names too (the next agent \
             sync rewrites them)",
            contents.overlapping.len()
        );
    }
    out
}

fn frontend_rows(frontend: &FrontendEntry, view: Option<&FrontendView>) -> Vec<[String; 5]> {
    let name = match view {
        Some(v) if v.port_name.is_empty() => format!("{} ({})", frontend.address, v.service),
        Some(v) => format!("{} ({}:{})", frontend.address, v.service, v.port_name),
        None => frontend.address.to_string(),
    };
    let kind = match frontend.kind {
        Some(FrontendKind::ClusterIp) => "ClusterIP".to_string(),
        Some(FrontendKind::ExternalIp) => "ExternalIP".to_string(),
        Some(FrontendKind::LoadBalancer) => "LoadBalancer".to_string(),
        Some(FrontendKind::NodePort) => "NodePort".to_string(),
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
            let source = slot
                .backend
                .zip(view)
                .and_then(|(b, v)| backend_view(v, &b.addr.to_string()))
                .map(|b| format!(" from {}", b.source))
                .unwrap_or_default();
            let backend = slot.backend.map_or_else(
                || format!("backend {} (missing)", slot.backend_id),
                |b| format!("{b} [backend {}]{source}", slot.backend_id),
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
