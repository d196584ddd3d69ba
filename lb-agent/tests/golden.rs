//! Golden tests of the control plane: a script of manifest changes is applied through the
//! real manifests reader, the incremental model and the map writer to in-memory maps, as
//! the agent does (a full apply at start and after a restart, changes only otherwise), and
//! the maps are compared, as sorted one-line entries, with the expected contents after
//! each step.
//!
//! Script format (`tests/golden/*.txt`), Cilium-txtar style:
//! `-- write NAME --` (file body follows), `-- remove NAME --`, `-- restart --` (a new
//! writer adopts the maps, as a restarted agent does), and `-- expect --` followed by the
//! map lines and `OPS n`, the number of map operations since the previous expect, and a
//! `REFUSED` line for each frontend the writer could not program (as the agent reports it).
//! `-- capacity MAP n --` lets the fake map `MAP` (`LB4_SERVICES`, …) hold `n` entries at
//! most; `-- frontend-ids n --` lets the writer hand out frontend ids `1..=n` only.
//! `UPDATE_GOLDEN=1 cargo test -p lb-agent --test golden` rewrites the expectations.
use std::{fs, path::Path};

use lb_agent::{
    maps::{dump, writer::MapWriter},
    reconcile::{Reconciler, SyncKind},
    source::manifests::ManifestDir,
};

enum Step {
    Write(String, String),
    Remove(String),
    Restart,
    Capacity(String, usize),
    FrontendIds(lb_common::FrontendId),
    Expect(Vec<String>),
}

fn parse_script(text: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(header) = line.strip_prefix("-- ").and_then(|l| l.strip_suffix(" --")) else {
            continue; // comments before the first header
        };
        let mut body = Vec::new();
        while let Some(next) = lines.peek() {
            if next.starts_with("-- ") && next.ends_with(" --") {
                break;
            }
            body.push(lines.next().unwrap_or_default().to_string());
        }
        let mut words = header.split_whitespace();
        steps.push(match (words.next(), words.next()) {
            (Some("write"), Some(name)) => Step::Write(name.to_string(), body.join("\n") + "\n"),
            (Some("remove"), Some(name)) => Step::Remove(name.to_string()),
            (Some("restart"), None) => Step::Restart,
            (Some("capacity"), Some(map)) => Step::Capacity(
                map.to_string(),
                words
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("capacity MAP n"),
            ),
            (Some("frontend-ids"), Some(n)) => {
                Step::FrontendIds(n.parse().expect("frontend-ids n"))
            }
            (Some("expect"), None) => {
                Step::Expect(body.into_iter().filter(|l| !l.trim().is_empty()).collect())
            }
            _ => panic!("unknown step header {line:?}"),
        });
    }
    steps
}

/// The expected and the actual lines of one expect block.
type Comparison = (Vec<String>, Vec<String>);

/// Runs a script; returns the script with the actual map contents in every expect block.
fn run(script: &Path) -> (String, Vec<Comparison>) {
    let text = fs::read_to_string(script).unwrap();
    let name = script.file_stem().unwrap().to_string_lossy();
    let dir = std::env::temp_dir().join(format!("lb-golden-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let mut manifests = ManifestDir::new(&dir);
    // The agent of node `node-a`: a new one, on empty maps, at the start and after each
    // restart.
    let agent = || Reconciler::on_fake_maps(Some("node-a".to_string()));
    let mut reconciler = agent();
    let mut full = true;
    let mut frontend_ids = lb_common::FrontendId::MAX;
    let mut ops_before = 0;
    let mut comparisons = Vec::new();
    let mut actual_blocks = Vec::new();
    for step in parse_script(&text) {
        match step {
            Step::Write(file, body) => fs::write(dir.join(file), body).unwrap(),
            Step::Remove(file) => fs::remove_file(dir.join(file)).unwrap(),
            Step::Restart => {
                let maps = reconciler.writer().maps().clone();
                ops_before -= maps.operations;
                // A new agent starts from an empty model, adopts the maps and reads every
                // file.
                reconciler = agent();
                let writer = reconciler.writer_mut();
                *writer = MapWriter::adopt(maps).unwrap();
                writer.set_id_limits(frontend_ids, u32::MAX);
                ops_before += writer.maps().operations;
                manifests = ManifestDir::new(&dir);
                full = true;
            }
            Step::Capacity(map, entries) => {
                // The fake is reached through a restart-like copy: the writer owns it.
                let writer = reconciler.writer_mut();
                let mut maps = writer.maps().clone();
                maps.set_capacity(&map, entries);
                let ops = maps.operations;
                *writer = MapWriter::adopt(maps).unwrap();
                writer.set_id_limits(frontend_ids, u32::MAX);
                ops_before += writer.maps().operations - ops;
            }
            Step::FrontendIds(n) => {
                frontend_ids = n;
                reconciler
                    .writer_mut()
                    .set_id_limits(frontend_ids, u32::MAX);
            }
            Step::Expect(expected) => {
                for change in manifests.refresh().unwrap().unwrap_or_default() {
                    reconciler.apply(change);
                }
                let kind = if full {
                    SyncKind::Full
                } else {
                    SyncKind::Changes
                };
                full = false;
                reconciler.sync(kind, std::time::Instant::now()).unwrap();
                let writer = reconciler.writer();
                let maps = writer.maps();
                let mut actual = dump::lines(&dump::read(maps).unwrap());
                for refused in writer.refused().values() {
                    let message = format!("not programmed: {}", refused.reason);
                    let problem = reconciler.state().port_problem(
                        &refused.service,
                        &refused.port_name,
                        message,
                    );
                    let problem = problem
                        .to_string()
                        .replace(&format!("{}/", dir.display()), "");
                    actual.push(format!("REFUSED {problem}"));
                }
                actual.push(format!("OPS {}", maps.operations - ops_before));
                ops_before = maps.operations;
                actual_blocks.push(actual.clone());
                comparisons.push((expected, actual));
            }
        }
    }
    fs::remove_dir_all(&dir).unwrap();
    (rewrite_expectations(&text, &actual_blocks), comparisons)
}

fn rewrite_expectations(text: &str, blocks: &[Vec<String>]) -> String {
    let mut out = String::new();
    let mut blocks = blocks.iter();
    let mut skipping = false;
    for line in text.lines() {
        let is_header = line.starts_with("-- ") && line.ends_with(" --");
        if is_header {
            skipping = false;
        }
        if skipping {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line == "-- expect --" {
            for l in blocks.next().into_iter().flatten() {
                out.push_str(l);
                out.push('\n');
            }
            skipping = true;
        }
    }
    out
}

#[test]
fn golden_scripts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut scripts: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    scripts.sort();
    assert!(!scripts.is_empty(), "no scripts in {}", dir.display());
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    // Scripts run as the agent of node `node-a` (for the node-local policies).
    let mut failures = Vec::new();
    for script in &scripts {
        let (rewritten, comparisons) = run(script);
        if update {
            fs::write(script, rewritten).unwrap();
            continue;
        }
        for (i, (expected, actual)) in comparisons.iter().enumerate() {
            if expected != actual {
                failures.push(format!(
                    "{} expect block {}:\n--- expected\n{}\n--- actual\n{}",
                    script.display(),
                    i + 1,
                    expected.join("\n"),
                    actual.join("\n")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
