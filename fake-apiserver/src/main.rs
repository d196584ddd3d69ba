//! `fake-apiserver`: serves the Services, EndpointSlices and Nodes found in a directory of
//! manifests (or an empty store) on a port, printing the URL on stdout, until Ctrl-C.
//!
//! ```text
//! fake-apiserver --port 6443 --dir examples/webapp --kubeconfig /tmp/fake.kubeconfig
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use fake_apiserver::{FakeApiServer, ResourceKind};
use serde_json::Value;

/// A fake Kubernetes API server serving Services, EndpointSlices and Nodes (list/watch/get).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Port to listen on (0: an ephemeral port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    address: std::net::IpAddr,
    /// Directory (searched recursively) or file of YAML/JSON manifests; Services,
    /// EndpointSlices and Nodes are loaded, other kinds skipped.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write a kubeconfig pointing at the server to this path.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Interval between watch bookmarks, in milliseconds (0: none).
    #[arg(long, default_value_t = 1000)]
    bookmark_interval_ms: u64,
    /// Number of events kept for resuming watches.
    #[arg(long, default_value_t = 50_000)]
    history_limit: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let server = FakeApiServer::builder()
        .bind((args.address, args.port).into())
        .bookmark_interval(Duration::from_millis(args.bookmark_interval_ms))
        .history_limit(args.history_limit)
        .start()
        .await
        .context("cannot start the server")?;
    if let Some(dir) = &args.dir {
        let mut objects = Vec::new();
        load(dir, &mut objects)?;
        let count = objects.len();
        server
            .bulk_apply(objects)
            .context("cannot load the manifests")?;
        eprintln!("loaded {count} objects from {}", dir.display());
    }
    if let Some(path) = &args.kubeconfig {
        server
            .write_kubeconfig(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("kubeconfig written to {}", path.display());
    }
    for kind in ResourceKind::ALL {
        eprintln!("{}: {}", kind.plural(), server.object_count(kind));
    }
    println!("{}", server.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Collects the supported objects of every manifest under `path`.
fn load(path: &Path, out: &mut Vec<Value>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            let p = entry.path();
            let is_manifest = p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            if p.is_dir() || is_manifest {
                load(&p, out)?;
            }
        }
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let docs: Vec<Value> = if path.extension().is_some_and(|e| e == "json") {
        vec![serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?]
    } else {
        serde_saphyr::from_multiple(&text).with_context(|| format!("{}", path.display()))?
    };
    for doc in docs {
        collect(doc, path, out);
    }
    Ok(())
}

fn collect(doc: Value, path: &Path, out: &mut Vec<Value>) {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind.ends_with("List") {
        if let Some(Value::Array(items)) = doc.get("items") {
            for item in items {
                collect(item.clone(), path, out);
            }
        }
    } else if ResourceKind::from_kind(kind).is_some() {
        out.push(doc);
    } else if !doc.is_null() {
        eprintln!("{}: skipping kind {kind:?}", path.display());
    }
}
