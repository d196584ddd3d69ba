//! What a run prints: counts, rate and latency percentiles, as one JSON object.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{RunArgs, Workload};

/// One worker's counts and latency samples.
#[derive(Debug, Default)]
pub struct WorkerResult {
    pub ops: u64,
    pub errors: u64,
    pub foreign_replies: u64,
    pub first_error: Option<String>,
    pub latencies_us: Vec<u32>,
}

impl WorkerResult {
    pub fn panicked() -> Self {
        Self {
            errors: 1,
            first_error: Some("a worker panicked".into()),
            ..Self::default()
        }
    }

    pub fn record(&mut self, took: Duration, max_samples: usize) {
        self.ops += 1;
        if self.latencies_us.len() < max_samples {
            self.latencies_us
                .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        }
    }

    pub fn error(&mut self, error: &std::io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error.to_string());
        }
    }
}

/// The run's result (`lb-loadgen run` prints it as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub workload: String,
    pub targets: usize,
    pub workers: usize,
    pub elapsed_s: f64,
    /// Operations that completed (answer received and equal to the request).
    pub ops: u64,
    pub errors: u64,
    /// Completed operations per second.
    pub rate: f64,
    pub p50_us: u32,
    pub p99_us: u32,
    /// The slowest operation: the longest stall a client saw.
    #[serde(default)]
    pub max_us: u32,
    /// UDP: answers whose source was not the address the request went to.
    pub foreign_replies: u64,
    pub first_error: Option<String>,
}

impl Summary {
    pub fn new(args: &RunArgs, elapsed: Duration, results: Vec<WorkerResult>) -> Self {
        let mut latencies = Vec::new();
        let (mut ops, mut errors, mut foreign) = (0, 0, 0);
        let mut first_error = None;
        for result in results {
            ops += result.ops;
            errors += result.errors;
            foreign += result.foreign_replies;
            first_error = first_error.or(result.first_error);
            latencies.extend(result.latencies_us);
        }
        latencies.sort_unstable();
        let secs = elapsed.as_secs_f64();
        Self {
            workload: name(args.workload).to_owned(),
            targets: args.targets.len(),
            workers: args.workers,
            elapsed_s: secs,
            ops,
            errors,
            rate: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
            p50_us: percentile(&latencies, 50),
            p99_us: percentile(&latencies, 99),
            max_us: latencies.last().copied().unwrap_or(0),
            foreign_replies: foreign,
            first_error,
        }
    }
}

fn name(workload: Workload) -> &'static str {
    match workload {
        Workload::TcpCrr => "tcp-crr",
        Workload::TcpRr => "tcp-rr",
        Workload::UdpUnconnected => "udp-unconnected",
        Workload::UdpConnected => "udp-connected",
    }
}

/// The `pct`-th percentile of sorted samples (nearest rank); 0 without samples.
fn percentile(sorted: &[u32], pct: usize) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50), 50);
        assert_eq!(percentile(&samples, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
    }
}
