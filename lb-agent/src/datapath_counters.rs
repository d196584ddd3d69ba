//! `/metrics`: the datapath's per-CPU counters (`LB_COUNTERS`, summed over the CPUs), read
//! from the pinned map at scrape time as `lb_datapath_events_total{event}`.
use std::path::PathBuf;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

/// Encodes the counters of the maps pinned under `pin_dir` (none while they are unreadable).
#[derive(Debug)]
pub struct DatapathCountersCollector {
    pub pin_dir: PathBuf,
}

impl Collector for DatapathCountersCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = match crate::summary::counters(&self.pin_dir) {
            Ok(counters) => counters,
            Err(e) => {
                tracing::debug!(error = %e, "datapath counters unread");
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            "lb_datapath_events",
            "What the datapath did, by event (lb_common::Counter): sock_translated, \
             tc_flows_started, tc_flows_established, no_endpoints, conntrack_full, \
             snat_ports_exhausted, tcp_out_of_flow_dropped, icmp_rate_limited, firewalled, \
             rewrite_failed, affinity_hits",
            None,
            MetricType::Counter,
        )?;
        for (counter, n) in counters {
            let label = EventLabel {
                event: counter.name(),
            };
            ConstCounter::new(n).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}
