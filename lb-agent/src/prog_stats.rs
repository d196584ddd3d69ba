//! Each of the agent's BPF programs' run count and run time, for `/metrics`: read at scrape
//! time from the kernel (`BPF_OBJ_GET_INFO_BY_FD`'s `run_cnt` and `run_time_ns`) for the
//! programs behind the links pinned under the pin directory. The kernel counts only while
//! `kernel.bpf_stats_enabled` is 1 (or a process holds a `BPF_ENABLE_STATS` fd): it costs
//! about 20 ns per run, so it is off by default; `lb_bpf_stats_enabled` says which.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    loaded_programs,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// A program, by its name in the kernel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabel {
    program: String,
}

/// One program's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub runs: u64,
    pub run_time_ns: u64,
}

/// Reads the stats of the programs linked under `pin_dir/links`, by program name (a
/// program attached several times, as tc on several devices, counts once).
#[must_use]
pub fn read(pin_dir: &std::path::Path) -> BTreeMap<String, ProgramStats> {
    let links = pin_dir.join(crate::loader::LINKS_DIR);
    let ids: BTreeSet<u32> = std::fs::read_dir(&links)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let link = PinnedLink::from_pin(entry.ok()?.path()).ok()?;
            FdLink::from(link).info().ok().map(|info| info.program_id())
        })
        .collect();
    let mut stats: BTreeMap<String, ProgramStats> = BTreeMap::new();
    for info in loaded_programs().filter_map(Result::ok) {
        if !ids.contains(&info.id()) {
            continue;
        }
        let name = info.name_as_str().unwrap_or("unnamed").to_owned();
        let entry = stats.entry(name).or_default();
        entry.runs += info.run_count();
        entry.run_time_ns += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
    }
    stats
}

/// Whether `kernel.bpf_stats_enabled` is 1.
fn stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

/// The collector `/metrics` asks at each scrape.
#[derive(Debug)]
pub struct ProgramStatsCollector {
    pub pin_dir: PathBuf,
}

impl Collector for ProgramStatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let enabled = ConstGauge::new(i64::from(stats_enabled()));
        enabled.encode(encoder.encode_descriptor(
            "lb_bpf_stats_enabled",
            "Whether kernel.bpf_stats_enabled is 1 (the program run counters count only then)",
            None,
            enabled.metric_type(),
        )?)?;
        let stats = read(&self.pin_dir);
        let mut runs = encoder.encode_descriptor(
            "lb_bpf_program_runs",
            "Runs of each of lb's BPF programs (while BPF stats are enabled)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (name, s) in &stats {
            let label = ProgramLabel {
                program: name.clone(),
            };
            ConstCounter::new(s.runs).encode(runs.encode_family(&label)?)?;
        }
        let mut time = encoder.encode_descriptor(
            "lb_bpf_program_run_seconds",
            "Time spent in each of lb's BPF programs (while BPF stats are enabled)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (name, s) in &stats {
            let label = ProgramLabel {
                program: name.clone(),
            };
            #[expect(
                clippy::cast_precision_loss,
                reason = "seconds as a float for Prometheus"
            )]
            let seconds = s.run_time_ns as f64 / 1e9;
            ConstCounter::new(seconds).encode(time.encode_family(&label)?)?;
        }
        Ok(())
    }
}
