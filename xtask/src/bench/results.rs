//! What the bench measures, kept as plain data (saved as JSON next to the report), and the
//! statistics the report draws from it: medians with their min–max spread, and ratios to the
//! direct path taken round by round.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::agent::{MapMemory, ProgStats};

/// How the client reaches the measured Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Variant {
    /// Straight to a backend pod's address: no balancer.
    Direct,
    /// The ClusterIP, translated by lb-agent's connect/sendmsg hooks.
    Socket,
    /// The ClusterIP, translated per packet by a second lb-agent's tc programs on the client
    /// pod's veth (`--socket-lb off`), replies translated back on the way into the pod.
    Tc,
    /// The ClusterIP, DNATed by kube-proxy's iptables layout (iptables-legacy).
    IptablesLegacy,
    /// The same rules through iptables-nft.
    IptablesNft,
    /// The ClusterIP, DNATed by kube-proxy's nftables layout.
    Nftables,
}

impl Variant {
    pub const ALL: [Self; 6] = [
        Self::Direct,
        Self::Socket,
        Self::Tc,
        Self::IptablesLegacy,
        Self::IptablesNft,
        Self::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Socket => "socket LB (lb-agent)",
            Self::Tc => "tc LB",
            Self::IptablesLegacy => "iptables-legacy",
            Self::IptablesNft => "iptables-nft",
            Self::Nftables => "nftables",
        }
    }

    /// The client pod of the variant (each has its own, so one variant's rules and conntrack
    /// entries never touch another's traffic).
    pub fn netns(self) -> &'static str {
        match self {
            Self::Direct => "lbbench-direct",
            Self::Socket => "lbbench-sock",
            Self::Tc => "lbbench-tc",
            Self::IptablesLegacy => "lbbench-iptl",
            Self::IptablesNft => "lbbench-iptn",
            Self::Nftables => "lbbench-nft",
        }
    }

    /// Whether the variant programs Services before its runs.
    pub fn programs(self) -> bool {
        self != Self::Direct
    }

    /// Whether the report times its programming and endpoint changes. Not the tc LB's: its
    /// agent is the socket LB's, with the same maps written the same way.
    pub fn control_plane_timed(self) -> bool {
        self.programs() && self != Self::Tc
    }
}

/// What one operation is (`lb-loadgen run --workload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Workload {
    TcpCrr,
    TcpRr,
    UdpUnconnected,
    UdpConnected,
}

impl Workload {
    pub const ALL: [Self; 4] = [
        Self::TcpCrr,
        Self::TcpRr,
        Self::UdpUnconnected,
        Self::UdpConnected,
    ];

    pub fn arg(self) -> &'static str {
        match self {
            Self::TcpCrr => "tcp-crr",
            Self::TcpRr => "tcp-rr",
            Self::UdpUnconnected => "udp-unconnected",
            Self::UdpConnected => "udp-connected",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::TcpCrr => "new TCP connections/s (connect, 32-byte request and answer, close)",
            Self::TcpRr => "TCP requests/s on kept connections",
            Self::UdpUnconnected => "UDP requests/s, unconnected socket (sendto/recvfrom)",
            Self::UdpConnected => "UDP requests/s, connected socket (send/recv)",
        }
    }

    pub fn is_udp(self) -> bool {
        matches!(self, Self::UdpUnconnected | Self::UdpConnected)
    }
}

/// `lb-loadgen run`'s summary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub ops: u64,
    pub errors: u64,
    pub rate: f64,
    pub p50_us: u32,
    pub p99_us: u32,
    #[serde(default)]
    pub foreign_replies: u64,
    #[serde(default)]
    pub first_error: Option<String>,
}

/// One measured run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub round: usize,
    pub workload: Workload,
    pub summary: Summary,
    /// The variant's own programs during this run (agent variants only): what one
    /// workload costs them, apart from the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf: Option<ProgStats>,
}

/// A variant at one size.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VariantResult {
    /// Why the variant was not measured at this size (over the time cap, over the map
    /// capacity, not built, failed).
    pub skipped: Option<String>,
    /// Programming all Services from nothing, in seconds (lb-agent: start to `ready`).
    pub program_s: Option<f64>,
    /// lb-agent only: the map write of that first sync, as its log reports it.
    pub program_write_s: Option<f64>,
    /// One endpoint change of one Service, each try (lb-agent: from the rename of the
    /// rewritten file to the timestamp of its `maps updated` log line, which it writes once
    /// the maps hold the change).
    pub change_s: Vec<f64>,
    /// lb-agent only: read, translate and write of each change, from its log.
    pub change_write_s: Vec<f64>,
    pub runs: Vec<Run>,
}

/// The programs of one agent with the decision monitor off and on (one run each).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MonitorCost {
    pub off: ProgStats,
    pub on: ProgStats,
    /// Decisions the monitor printed during its run.
    pub decisions: u64,
}

/// One size of the sweep.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigResult {
    pub services: usize,
    pub endpoints: usize,
    pub variants: BTreeMap<Variant, VariantResult>,
    /// The agent's programs during the socket-LB runs: (run count, run time in ns).
    pub bpf: ProgStats,
    /// The tc agent's programs during the tc-LB runs.
    #[serde(default)]
    pub bpf_tc: ProgStats,
    /// The decision monitor's cost, per agent variant: its programs during a TCP
    /// connect/request/close run without, then with, `lb-agent monitor` reading.
    #[serde(default)]
    pub monitor: BTreeMap<Variant, MonitorCost>,
    pub agent_rss_kib: Option<u64>,
    /// The agent's peak RSS (`VmHWM`): the parsed manifests pass through its heap once.
    #[serde(default)]
    pub agent_peak_kib: Option<u64>,
    /// CPU the (idle) agent used while the data-path runs went on, and how long they took.
    #[serde(default)]
    pub agent_cpu_s: Option<f64>,
    #[serde(default)]
    pub data_path_s: f64,
    pub maps: Vec<MapMemory>,
    /// The machine's 1-minute load average when the size was done (other work on it).
    #[serde(default)]
    pub load_average: f64,
}

impl ConfigResult {
    pub fn new(services: usize, endpoints: usize) -> Self {
        Self {
            services,
            endpoints,
            variants: BTreeMap::new(),
            bpf: ProgStats::default(),
            bpf_tc: ProgStats::default(),
            monitor: BTreeMap::new(),
            agent_rss_kib: None,
            agent_peak_kib: None,
            agent_cpu_s: None,
            data_path_s: 0.0,
            maps: Vec::new(),
            load_average: 0.0,
        }
    }

    pub fn variant(&mut self, variant: Variant) -> &mut VariantResult {
        self.variants.entry(variant).or_default()
    }

    /// The program statistics of `variant`'s runs (the socket LB's or the tc LB's).
    pub fn bpf_mut(&mut self, variant: Variant) -> &mut ProgStats {
        if variant == Variant::Tc {
            &mut self.bpf_tc
        } else {
            &mut self.bpf
        }
    }

    /// Rates of `variant` for `workload`, one per round.
    fn rates(&self, variant: Variant, workload: Workload) -> BTreeMap<usize, f64> {
        self.variants
            .get(&variant)
            .map(|v| {
                v.runs
                    .iter()
                    .filter(|r| r.workload == workload)
                    .map(|r| (r.round, r.summary.rate))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `variant`'s program statistics summed over its `workload` runs, with the operations
    /// those runs made; `None` without statistics.
    pub fn bpf_of(&self, variant: Variant, workload: Workload) -> Option<(ProgStats, u64)> {
        let mut total = ProgStats::default();
        let mut ops = 0;
        let mut any = false;
        for run in self.variants.get(&variant)?.runs.iter() {
            if let (true, Some(stats)) = (run.workload == workload, &run.bpf) {
                total.add(stats);
                ops += run.summary.ops;
                any = true;
            }
        }
        any.then_some((total, ops))
    }

    /// Median, min and max rate.
    pub fn rate(&self, variant: Variant, workload: Workload) -> Option<Spread> {
        Spread::of(self.rates(variant, workload).into_values().collect())
    }

    /// The ratio to the direct path, round by round (both measured back to back), then the
    /// median and spread of those ratios.
    pub fn ratio(&self, variant: Variant, workload: Workload) -> Option<Spread> {
        let direct = self.rates(Variant::Direct, workload);
        let ratios = self
            .rates(variant, workload)
            .into_iter()
            .filter_map(|(round, rate)| {
                let base = *direct.get(&round)?;
                (base > 0.0).then(|| rate / base)
            })
            .collect();
        Spread::of(ratios)
    }

    /// Median p50 and p99 latency of `variant` for `workload`, in µs.
    pub fn latency(&self, variant: Variant, workload: Workload) -> Option<(f64, f64)> {
        let runs: Vec<&Run> = self
            .variants
            .get(&variant)?
            .runs
            .iter()
            .filter(|r| r.workload == workload)
            .collect();
        let p50 = Spread::of(runs.iter().map(|r| f64::from(r.summary.p50_us)).collect())?;
        let p99 = Spread::of(runs.iter().map(|r| f64::from(r.summary.p99_us)).collect())?;
        Some((p50.median, p99.median))
    }

    /// Failed operations of `variant` over all runs, and the first error.
    pub fn errors(&self, variant: Variant) -> (u64, u64, Option<String>) {
        let Some(v) = self.variants.get(&variant) else {
            return (0, 0, None);
        };
        let errors = v.runs.iter().map(|r| r.summary.errors).sum();
        let foreign = v.runs.iter().map(|r| r.summary.foreign_replies).sum();
        let first = v.runs.iter().find_map(|r| r.summary.first_error.clone());
        (errors, foreign, first)
    }
}

/// The agent with no Service at all (an empty manifests directory), after `ready`: the
/// baseline of the per-Service memory figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmptyAgent {
    pub rss_kib: u64,
    pub maps: Vec<MapMemory>,
}

impl EmptyAgent {
    pub fn map_bytes(&self) -> u64 {
        self.maps.iter().map(|m| m.bytes_memlock).sum()
    }
}

/// The agent on the Kubernetes API at one size, as `lb-watch-bench --json` prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiResult {
    pub services: u32,
    pub endpoints: u32,
    pub frontends: u64,
    /// Agent start → every frontend in the maps.
    pub sync_s: f64,
    /// Of which: start → both lists in the model.
    #[serde(default)]
    pub listed_s: f64,
    /// Of which: lists complete → every frontend written (translation and map writes).
    pub sync_write_s: f64,
    /// The agent's CPU time at that first write, every thread.
    #[serde(default)]
    pub sync_cpu_s: f64,
    pub rss_empty_kib: u64,
    pub rss_sync_kib: u64,
    pub rss_after_kib: u64,
    /// Peak RSS (`VmHWM`), the initial list included.
    #[serde(default)]
    pub rss_peak_kib: u64,
    pub map_empty_bytes: u64,
    pub map_bytes: u64,
    /// API server write of one EndpointSlice → its map write, µs, one per event.
    pub event_us: Vec<u64>,
    pub event_write_us: Vec<u64>,
}

/// `(now - empty) / services`: what one more Service costs.
pub fn per_service(now: u64, empty: u64, services: usize) -> f64 {
    now.saturating_sub(empty) as f64 / services.max(1) as f64
}

/// The `p`-th percentile (nearest rank, 0–100) of `values`.
pub fn percentile(values: &[f64], p: usize) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = (sorted.len() * p.min(100)).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

/// A median with the smallest and largest value it was taken from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            f64::midpoint(values[n / 2 - 1], values[n / 2])
        };
        Some(Self {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, rate: f64) -> Run {
        Run {
            round,
            workload: Workload::TcpCrr,
            summary: Summary {
                ops: 1,
                errors: 0,
                rate,
                p50_us: 10,
                p99_us: 20,
                foreign_replies: 0,
                first_error: None,
            },
            bpf: None,
        }
    }

    #[test]
    fn medians_and_spreads() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(vec![1.0, 2.0]).unwrap().median, 1.5);
        assert!(Spread::of(vec![]).is_none());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50), Some(50.0));
        assert_eq!(percentile(&values, 99), Some(99.0));
        assert_eq!(
            percentile(&values[..10], 99),
            Some(10.0),
            "a few tries: the worst"
        );
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(per_service(3072, 1024, 1000), 2.048);
        assert_eq!(per_service(10, 20, 1), 0.0, "never below the empty agent");
    }

    #[test]
    fn ratios_pair_runs_of_the_same_round() {
        let mut config = ConfigResult::new(1, 1);
        config.variant(Variant::Direct).runs = vec![run(0, 100.0), run(1, 200.0), run(2, 100.0)];
        config.variant(Variant::Socket).runs = vec![run(0, 90.0), run(1, 180.0), run(2, 80.0)];
        let ratio = config.ratio(Variant::Socket, Workload::TcpCrr).unwrap();
        assert!((ratio.median - 0.9).abs() < 1e-9);
        assert!((ratio.min - 0.8).abs() < 1e-9);
        assert!(config.ratio(Variant::Nftables, Workload::TcpCrr).is_none());
        assert_eq!(
            config
                .rate(Variant::Socket, Workload::TcpCrr)
                .unwrap()
                .median,
            90.0
        );
    }
}
