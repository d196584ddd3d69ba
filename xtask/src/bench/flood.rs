//! `cargo xtask bench --flood`: the tc datapath's conntrack under a spoofed SYN flood at
//! the agent's default table sizes (issue 13's scenario; `tests/tests/flood.rs` checks the
//! same at small sizes). In the NodePort bench's lab (`nodeport.rs`), the client outside
//! the node opens connections to the NodePort and leaves them idle for a minute, then floods
//! the NodePort with ten times the established table's size in SYNs from 10.200.0.0/16
//! (`lb-loadgen syn-flood`; nothing answers for those addresses) while it keeps opening new
//! connections, a hundred at a time. Then: how many idle connections still answer, what the tables hold, the
//! datapath's counters, and how long the half-open table takes to hold no junk. The report
//! goes to `docs/benchmarks.md` between its `syn-flood` markers (`--quick`: small tables, a
//! short idle time, `target/bench-quick/`).
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use lb_common::{Counter, CtTable};
use serde::Deserialize;

use super::nodeport::Lab;
use super::report::thousands;
use super::results::Summary;
use super::sections::Marked;
use crate::{cmd, host};

/// This bench's section of benchmarks.md.
pub const SECTION: Marked = Marked {
    begin: "<!-- syn-flood:begin (cargo xtask bench --flood) -->",
    end: "<!-- syn-flood:end -->",
};

/// The made-up sources of the flood: nothing in the lab answers for them.
const FLOOD_SOURCES: &str = "10.200.0.0/16";

pub struct Settings {
    pub quick: bool,
    pub out: PathBuf,
}

/// The run's shape: the defaults, or small tables for `--quick`.
struct Shape {
    /// `--max-conntrack`, `--max-conntrack-half-open`: `None` keeps the agent's defaults.
    tables: Option<(u32, u32)>,
    /// Connections kept idle through the flood.
    kept: usize,
    idle: Duration,
    /// How long the flood may take at most.
    flood_limit: Duration,
}

impl Shape {
    fn of(quick: bool) -> Self {
        if quick {
            Self {
                tables: Some((4_096, 1_024)),
                kept: 50,
                idle: Duration::from_secs(3),
                flood_limit: Duration::from_secs(30),
            }
        } else {
            Self {
                tables: None,
                kept: 1_000,
                idle: Duration::from_secs(60),
                flood_limit: Duration::from_secs(300),
            }
        }
    }
}

/// `lb-loadgen syn-flood`'s summary.
#[derive(Debug, Deserialize)]
struct FloodSummary {
    sent: u64,
    errors: u64,
    elapsed_s: f64,
}

/// What the run saw.
struct Outcome {
    established_capacity: u64,
    half_open_capacity: u64,
    kept: usize,
    idle: Duration,
    flood: FloodSummary,
    survived: usize,
    /// Why the first idle connection that did not answer failed.
    first_failure: Option<String>,
    during: Summary,
    after_flood: Tables,
    junk_gone_after: Option<Duration>,
    counters: std::collections::BTreeMap<String, u64>,
}

/// Entries of the TCP tables.
struct Tables {
    established: u64,
    half_open: u64,
}

pub fn run(settings: &Settings) -> Result<()> {
    host::require_root("`cargo xtask bench --flood` (network namespaces, eBPF, raw sockets)")?;
    let shape = Shape::of(settings.quick);
    let (_lock, mut lab) = Lab::open(settings.quick)?;
    let mut extra = Vec::new();
    if let Some((established, half_open)) = shape.tables {
        extra = vec![
            "--max-conntrack".to_owned(),
            established.to_string(),
            "--max-conntrack-half-open".to_owned(),
            half_open.to_string(),
        ];
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    lab.start_agent(false, &extra)?;
    lab.probe_node_port()?;
    let outcome = flood(&lab, &shape)?;
    drop(lab);
    let table = report(settings, &outcome);
    print!("\n{table}");
    let file = settings.out.join("benchmarks.md");
    SECTION.write(&file, &table)?;
    println!("written to {}", file.display());
    ensure!(
        outcome.survived == outcome.kept,
        "{} of {} idle connections did not survive the flood",
        outcome.kept - outcome.survived,
        outcome.kept
    );
    ensure!(
        outcome.junk_gone_after.is_some(),
        "the half-open table still held entries a minute after the flood"
    );
    Ok(())
}

fn flood(lab: &Lab, shape: &Shape) -> Result<Outcome> {
    let before = agent_summary(lab)?;
    let established_capacity = before.map(CtTable::Established)?.capacity;
    let half_open_capacity = before.map(CtTable::HalfOpen)?.capacity;
    println!(
        "tables: {established_capacity} established, {half_open_capacity} half-open entries; \
         opening {} connections",
        shape.kept
    );
    let mut kept = open_connections(shape.kept)?;
    println!("idle for {:?}", shape.idle);
    std::thread::sleep(shape.idle);

    let count = 10 * established_capacity;
    println!("flooding with {count} SYNs");
    let mut flood = lab
        .loadgen_in_client()
        .args(["syn-flood", "--target", &Lab::node_port()])
        .args(["--sources", FLOOD_SOURCES, "--count", &count.to_string()])
        .args(["--duration-ms", &shape.flood_limit.as_millis().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting lb-loadgen syn-flood")?;
    // New connections while the flood runs, a hundred at a time until it ends: what a
    // client sees, not a second load competing with the flood for the CPUs.
    let mut during = Vec::new();
    let flood_out = loop {
        let mut command = lab.loadgen_in_client();
        command
            .args([
                "run",
                "--workload",
                "tcp-crr",
                "--target",
                &Lab::node_port(),
            ])
            .args(["--count", "100", "--duration-ms", "5000", "--workers", "1"]);
        let out = cmd::output(&mut command)?;
        let summary: Summary = serde_json::from_str(out.trim())
            .with_context(|| format!("lb-loadgen printed {out:?}"))?;
        during.push(summary);
        if flood.try_wait()?.is_some() {
            break flood.wait_with_output()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        flood_out.status.success(),
        "lb-loadgen syn-flood failed: {}",
        String::from_utf8_lossy(&flood_out.stderr)
    );
    let during = total(&during);
    let flood: FloodSummary =
        serde_json::from_slice(&flood_out.stdout).context("lb-loadgen syn-flood's summary")?;
    println!(
        "flood: {} SYNs in {:.1} s; new connections meanwhile: {} ok, {} failed",
        flood.sent, flood.elapsed_s, during.ops, during.errors
    );

    let answers: Vec<Result<()>> = kept
        .iter_mut()
        .map(|stream| echo(stream, b"after\n"))
        .collect();
    let survived = answers.iter().filter(|a| a.is_ok()).count();
    let first_failure = answers
        .into_iter()
        .find_map(|a| a.err().map(|e| format!("{e:#}")));
    let after = agent_summary(lab)?;
    let after_flood = after.tables()?;
    let stopped = Instant::now();
    let junk_gone_after = loop {
        if agent_summary(lab)?.tables()?.half_open == 0 {
            break Some(stopped.elapsed());
        }
        if stopped.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(kept);
    Ok(Outcome {
        established_capacity,
        half_open_capacity,
        kept: shape.kept,
        idle: shape.idle,
        flood,
        survived,
        first_failure,
        during,
        after_flood,
        junk_gone_after,
        counters: after.counters,
    })
}

/// `n` connections from the client's namespace to the NodePort, each having echoed a line.
fn open_connections(n: usize) -> Result<Vec<TcpStream>> {
    let netns = Lab::client_netns();
    std::thread::spawn(move || -> Result<Vec<TcpStream>> {
        let file = std::fs::File::open(&netns)
            .with_context(|| format!("cannot open {}", netns.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the client's network namespace")?;
        let target: SocketAddr = Lab::node_port().parse()?;
        (0..n)
            .map(|i| {
                let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                    .with_context(|| format!("connection {i} to {target}"))?;
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                echo(&mut stream, b"before\n").with_context(|| format!("connection {i}"))?;
                Ok(stream)
            })
            .collect()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread opening connections panicked"))?
}

/// Sends `line` and reads it back.
fn echo(stream: &mut TcpStream, line: &[u8]) -> Result<()> {
    stream.write_all(line)?;
    let mut buf = vec![0u8; line.len()];
    stream.read_exact(&mut buf)?;
    ensure!(buf == line, "the echo came back as {buf:?}");
    Ok(())
}

/// A map of `lb-agent services --summary --output json`.
#[derive(Debug, Deserialize)]
struct MapEntry {
    name: String,
    entries: u64,
    capacity: u64,
}

#[derive(Debug, Deserialize)]
struct AgentSummary {
    maps: Vec<MapEntry>,
    counters: std::collections::BTreeMap<String, u64>,
}

/// One reading of `lb-agent services --summary --output json` (it walks every pinned
/// map: read once for all that is wanted of it).
fn agent_summary(lab: &Lab) -> Result<AgentSummary> {
    let out = cmd::output(&mut lab.agent_command(&["services", "--summary", "--output", "json"]))?;
    serde_json::from_str(out.trim()).context("`lb-agent services --summary --output json`")
}

impl AgentSummary {
    /// The conntrack table `table`'s map.
    fn map(&self, table: CtTable) -> Result<&MapEntry> {
        let name = table.map_name();
        match self.maps.iter().find(|m| m.name == name) {
            Some(map) => Ok(map),
            None => bail!("{name} is not in `lb-agent services --summary`"),
        }
    }

    fn tables(&self) -> Result<Tables> {
        Ok(Tables {
            established: self.map(CtTable::Established)?.entries,
            half_open: self.map(CtTable::HalfOpen)?.entries,
        })
    }
}

/// The runs' operations and failures added up (the runs are paced: no rate).
fn total(runs: &[Summary]) -> Summary {
    Summary {
        ops: runs.iter().map(|s| s.ops).sum(),
        errors: runs.iter().map(|s| s.errors).sum(),
        rate: 0.0,
        p50_us: runs.iter().map(|s| s.p50_us).max().unwrap_or(0),
        p99_us: runs.iter().map(|s| s.p99_us).max().unwrap_or(0),
        foreign_replies: runs.iter().map(|s| s.foreign_replies).sum(),
        first_error: runs.iter().find_map(|s| s.first_error.clone()),
    }
}

fn report(settings: &Settings, o: &Outcome) -> String {
    let mut out = String::new();
    let counter = |c: Counter| o.counters.get(c.name()).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "## Conntrack under a spoofed SYN flood (`cargo xtask bench --flood`)\n\n\
         The NodePort lab above, tc path (`--nodeport-acceleration off`), the agent's {} \
         tables: {} established entries, {} half-open. The client outside the node opens {} \
         connections to the NodePort (each echoes a line), leaves them idle for {} s, then \
         sends {} SYNs from made-up sources in {FLOOD_SOURCES} ({}× the established \
         table, {}× the half-open one) while it keeps opening new connections, a hundred at \
         a time. The backend \
         is on this node, so these flows are not SNATed; an SNATed flow's port is held by its \
         entries, which live in the same tables.\n",
        if settings.quick {
            "reduced (--quick)"
        } else {
            "default"
        },
        thousands(o.established_capacity),
        thousands(o.half_open_capacity),
        o.kept,
        o.idle.as_secs(),
        thousands(o.flood.sent),
        o.flood.sent / o.established_capacity.max(1),
        o.flood.sent / o.half_open_capacity.max(1),
    );
    let _ = writeln!(out, "| what | measured |");
    let _ = writeln!(out, "|---|---|");
    let _ = writeln!(
        out,
        "| flood | {} SYNs in {:.1} s ({:.0}k/s), {} send errors |",
        thousands(o.flood.sent),
        o.flood.elapsed_s,
        o.flood.sent as f64 / o.flood.elapsed_s.max(1e-9) / 1e3,
        o.flood.errors
    );
    let _ = writeln!(
        out,
        "| idle connections answering after the flood | **{} of {}**{} |",
        o.survived,
        o.kept,
        o.first_failure
            .as_deref()
            .map_or(String::new(), |e| format!(" (first failure: {e})"))
    );
    let _ = writeln!(
        out,
        "| new connections during the flood | {} completed, {} failed{} |",
        thousands(o.during.ops),
        o.during.errors,
        o.during
            .first_error
            .as_deref()
            .map_or(String::new(), |e| format!(" (first: {e})"))
    );
    let _ = writeln!(
        out,
        "| entries right after the flood | established {}, half-open {} |",
        thousands(o.after_flood.established),
        thousands(o.after_flood.half_open)
    );
    let _ = writeln!(
        out,
        "| flows started / established (counters) | {} / {} |",
        thousands(counter(Counter::TcFlowsStarted)),
        thousands(counter(Counter::TcFlowsEstablished))
    );
    let _ = writeln!(
        out,
        "| table full / SNAT ports exhausted / out-of-flow drops (counters) | {} / {} / {} |",
        thousands(counter(Counter::ConntrackFull)),
        thousands(counter(Counter::SnatPortsExhausted)),
        thousands(counter(Counter::TcpOutOfFlowDropped))
    );
    let _ = writeln!(
        out,
        "| half-open table empty after the flood | {} |",
        o.junk_gone_after.map_or_else(
            || "not within 60 s".to_owned(),
            |d| format!("{:.1} s", d.as_secs_f64())
        )
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_how_many_idle_connections_survived() {
        let outcome = Outcome {
            established_capacity: 524_288,
            half_open_capacity: 65_536,
            kept: 1_000,
            idle: Duration::from_secs(60),
            flood: FloodSummary {
                sent: 5_242_880,
                errors: 0,
                elapsed_s: 20.0,
            },
            survived: 1_000,
            first_failure: None,
            during: total(&[]),
            after_flood: Tables {
                established: 2_000,
                half_open: 65_536,
            },
            junk_gone_after: Some(Duration::from_millis(12_500)),
            counters: [("tc_flows_started".to_owned(), 5_243_000)].into(),
        };
        let settings = Settings {
            quick: false,
            out: PathBuf::new(),
        };
        let text = report(&settings, &outcome);
        assert!(
            text.contains("(10× the established table, 80× the half-open one)"),
            "{text}"
        );
        assert!(text.contains("| idle connections answering after the flood | **1000 of 1000** |"));
        assert!(text.contains("| flood | 5,242,880 SYNs in 20.0 s (262k/s), 0 send errors |"));
        assert!(text.contains("| half-open table empty after the flood | 12.5 s |"));
        assert!(text.contains("| flows started / established (counters) | 5,243,000 / 0 |"));
    }
}
