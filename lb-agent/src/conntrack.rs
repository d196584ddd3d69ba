//! `lb-agent conntrack`: the flows the tc datapath tracks, read from its three pinned
//! conntrack tables (established TCP, half-open TCP, other; both families). One row per flow (its original-direction entry): the client, the frontend it
//! dialled, the backend, the SNAT address and port if any, age, idle time and TCP state.
use std::{fmt::Write as _, net::SocketAddr, path::Path, time::Duration};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    CT_DIR_ORIG, CT_F_SNAT, CT_HALF_OPEN_MAP, CT_OTHER_MAP, CT_TCP_ESTABLISHED, CT_TCP_FIN_ORIG,
    CT_TCP_FIN_REPLY, CT_TCP_MAP, CT_TCP_RST, CT_TCP_SEEN_REPLY, CtKey, CtTable, CtValue,
    LEGACY_CT_MAP, PROTO_TCP, v4_mapped,
};
use serde::Serialize;

use crate::{inspect::OutputFormat, maps::codec, model::Protocol};

/// One tracked flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    pub backend_id: u32,
    /// The address and port the backend sees as its client, when SNATed.
    pub snat: Option<String>,
    pub age_s: u64,
    pub idle_s: u64,
    /// `SYN_SENT`, `SYN_RECV` (half-open: the backend answered, the client has not
    /// acknowledged yet), `ESTABLISHED`, `CLOSING` (TCP), or empty.
    pub state: String,
}

/// The flows of `entries` as of `now_ns` (`CLOCK_MONOTONIC`; the datapath's clock is at
/// most two ticks behind it, `lb_common::Clock`), sorted by client.
#[must_use]
pub fn flows(entries: &[(CtKey, CtValue)], now_ns: u64) -> Vec<Flow> {
    let addr = |ip: [u32; 4], port: u16| {
        let ip: std::net::IpAddr = match v4_mapped(&ip) {
            Some(ip4) => codec::from_ip4(ip4).into(),
            None => codec::from_ip6(ip).into(),
        };
        SocketAddr::new(ip, u16::from_be(port)).to_string()
    };
    let mut flows: Vec<Flow> = entries
        .iter()
        .filter(|(key, _)| key.dir == CT_DIR_ORIG)
        .map(|(key, value)| {
            let protocol = crate::maps::codec::protocol(key.proto)
                .map_or_else(|| key.proto.to_string(), |p| p.to_string());
            let state = if crate::maps::codec::protocol(key.proto) != Some(Protocol::Tcp) {
                String::new()
            } else if value.tcp_state & CT_TCP_RST != 0
                || value.tcp_state & (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY) != 0
            {
                "CLOSING".to_string()
            } else if value.tcp_state & CT_TCP_ESTABLISHED != 0 {
                "ESTABLISHED".to_string()
            } else if value.tcp_state & CT_TCP_SEEN_REPLY != 0 {
                "SYN_RECV".to_string()
            } else {
                "SYN_SENT".to_string()
            };
            Flow {
                protocol,
                client: addr(key.saddr, key.sport),
                frontend: addr(key.daddr, key.dport),
                backend: addr(value.nat_addr, value.nat_port),
                backend_id: value.backend_id,
                snat: (value.flags & CT_F_SNAT != 0)
                    .then(|| addr(value.snat_addr, value.snat_port)),
                age_s: Duration::from_nanos(now_ns.saturating_sub(value.created_ns)).as_secs(),
                idle_s: Duration::from_nanos(now_ns.saturating_sub(value.last_seen_ns)).as_secs(),
                state,
            }
        })
        .collect();
    flows.sort_by(|a, b| (&a.client, &a.frontend).cmp(&(&b.client, &b.frontend)));
    flows
}

/// Reads the pinned conntrack map and renders its flows.
///
/// # Errors
/// When the map is not pinned under `pin_dir` or cannot be read.
pub fn list(pin_dir: &Path, format: OutputFormat) -> anyhow::Result<String> {
    let now = monotonic_now_ns()?;
    let mut entries = Vec::new();
    for table in [CtTable::Established, CtTable::HalfOpen, CtTable::Other] {
        let read = read_table(pin_dir, table.map_name())?;
        entries.extend(read.into_iter().filter(|(_, v)| !expired(table, v, now)));
    }
    let flows = flows(&entries, now);
    Ok(match format {
        OutputFormat::Json => serde_json::to_string_pretty(&flows)? + "\n",
        OutputFormat::Table => table(&flows),
    })
}

/// Now in `CLOCK_MONOTONIC`, the clock the entries carry (read by the datapath as of its last
/// tick, from `jiffies` or `bpf_ktime_get_coarse_ns`: `lb_common::Clock`).
pub(crate) fn monotonic_now_ns() -> std::io::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(
        u64::try_from(now.tv_sec()).unwrap_or_default() * 1_000_000_000
            + u64::try_from(now.tv_nsec()).unwrap_or_default(),
    )
}

/// Whether the entry `value` of `table` has expired as of `now_ns`: the datapath deletes it
/// at its next packet instead of using it, and the sweep deletes it.
fn expired(table: CtTable, value: &CtValue, now_ns: u64) -> bool {
    now_ns.saturating_sub(value.last_seen_ns) > table.lifetime_ns(value.tcp_state)
}

/// Deletes the expired entries of `table` (pinned under `pin_dir`), as the datapath would
/// on their next packet, so a table a flood filled holds no junk once the flood stops.
/// Returns how many were deleted.
///
/// # Errors
/// When the table is not pinned there or cannot be read.
pub fn sweep(pin_dir: &Path, table: CtTable) -> anyhow::Result<usize> {
    let data = MapData::from_pin(pin_dir.join(table.map_name()))?;
    let mut map: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(data))?;
    let now = monotonic_now_ns()?;
    let stale: Vec<CtKey> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| expired(table, v, now))
        .map(|(k, _)| k)
        .collect();
    Ok(stale.iter().filter(|k| map.remove(k).is_ok()).count())
}

/// How often the sweeper wakes: the half-open table's entries live 10 s idle.
const SWEEP_TICK: Duration = Duration::from_secs(5);

/// The tables to sweep at wake-up `round` (every [`SWEEP_TICK`], the first at start): the
/// half-open table every time, the other table every minute, and the established table
/// at start and every hour. Its entries live six hours idle, so without a sweep a flow that
/// ended without FIN or RST (its client vanished with its pod, say) would hold its two
/// entries until the LRU evicted them; a restarted agent also clears what expired while
/// none ran.
#[must_use]
pub const fn tables_due(round: u64) -> &'static [CtTable] {
    const MINUTE: u64 = 60 / SWEEP_TICK.as_secs();
    const HOUR: u64 = 60 * MINUTE;
    if round.is_multiple_of(HOUR) {
        &[CtTable::HalfOpen, CtTable::Other, CtTable::Established]
    } else if round.is_multiple_of(MINUTE) {
        &[CtTable::HalfOpen, CtTable::Other]
    } else {
        &[CtTable::HalfOpen]
    }
}

/// Sweeps the conntrack tables for ever, each as often as its entries expire
/// ([`tables_due`]).
pub async fn sweep_forever(pin_dir: std::path::PathBuf) {
    let mut tick = tokio::time::interval(SWEEP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 0u64.. {
        tick.tick().await;
        let tables = tables_due(round);
        for &table in tables {
            let dir = pin_dir.clone();
            match tokio::task::spawn_blocking(move || sweep(&dir, table)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    tracing::debug!(table = table.map_name(), expired = n, "conntrack sweep")
                }
                Ok(Err(e)) => {
                    tracing::warn!(table = table.map_name(), error = %e, "conntrack sweep failed")
                }
                Err(e) => tracing::warn!(error = %e, "conntrack sweep task failed"),
            }
        }
    }
}

/// Every entry of the conntrack table `name` pinned under `pin_dir`.
///
/// # Errors
/// When the map is not pinned there or cannot be read.
pub fn read_table(pin_dir: &Path, name: &str) -> anyhow::Result<Vec<(CtKey, CtValue)>> {
    let data = crate::summary::open_pin(pin_dir, name)?;
    // aya's HashMap reads LRU hash maps too.
    let map: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(data))?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// Moves the flows of the single conntrack map of earlier versions (`LB_CT`) into the three
/// tables, then removes its pin: TCP flows that saw a reply count as established, the other
/// TCP flows as half-open. Returns how many entries moved; 0 without such a map. Flows the
/// old programs track between this copy and the new programs' attachment start afresh.
///
/// # Errors
/// When a map cannot be opened or the old pin removed.
pub fn migrate_legacy_table(pin_dir: &Path) -> anyhow::Result<usize> {
    let legacy = pin_dir.join(LEGACY_CT_MAP);
    if !legacy.exists() {
        return Ok(0);
    }
    let entries = read_table(pin_dir, LEGACY_CT_MAP)?;
    let open = |name: &str| -> anyhow::Result<HashMap<MapData, CtKey, CtValue>> {
        let data = MapData::from_pin(pin_dir.join(name))?;
        Ok(HashMap::try_from(Map::LruHashMap(data))?)
    };
    let mut established = open(CT_TCP_MAP)?;
    let mut half_open = open(CT_HALF_OPEN_MAP)?;
    let mut other = open(CT_OTHER_MAP)?;
    let mut moved = 0;
    for (key, mut value) in entries {
        let table = if key.proto != PROTO_TCP {
            &mut other
        } else if value.tcp_state & CT_TCP_SEEN_REPLY != 0 {
            value.tcp_state |= CT_TCP_ESTABLISHED;
            &mut established
        } else {
            &mut half_open
        };
        if table.insert(key, value, 0).is_ok() {
            moved += 1;
        }
    }
    std::fs::remove_file(&legacy)?;
    Ok(moved)
}

fn table(flows: &[Flow]) -> String {
    let mut out = format!(
        "{:<5} {:<22} {:<22} {:<28} {:<22} {:>7} {:>7} STATE\n",
        "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "AGE", "IDLE"
    );
    for f in flows {
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<22} {:<28} {:<22} {:>6}s {:>6}s {}",
            f.protocol,
            f.client,
            f.frontend,
            format!("{} [{}]", f.backend, f.backend_id),
            f.snat.as_deref().unwrap_or("-"),
            f.age_s,
            f.idle_s,
            f.state
        );
    }
    let _ = writeln!(out, "{} flow(s)", flows.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{CT_DIR_REPLY, PROTO_TCP, PROTO_UDP};

    fn ip(text: &str) -> [u32; 4] {
        match text.parse().unwrap() {
            std::net::IpAddr::V4(ip) => lb_common::to_v4_mapped(codec::ip4(ip)),
            std::net::IpAddr::V6(ip) => codec::ip6(ip),
        }
    }

    #[test]
    fn one_row_per_flow_with_backend_snat_age_and_state() {
        let key = |saddr: &str, sport: u16, daddr: &str, dport: u16, proto, dir| CtKey {
            saddr: ip(saddr),
            daddr: ip(daddr),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            dir,
            pad: [0; 2],
        };
        let value = |backend: &str, port: u16, flags, snat_port: u16, state| CtValue {
            nat_addr: ip(backend),
            snat_addr: if flags == 0 {
                [0; 4]
            } else {
                ip("192.168.50.1")
            },
            nat_port: port.to_be(),
            snat_port: snat_port.to_be(),
            rev_nat_id: 1,
            flags,
            tcp_state: state,
            backend_id: 7,
            pad: [0; 2],
            created_ns: 1_000_000_000,
            last_seen_ns: 9_000_000_000,
        };
        let entries = [
            (
                key(
                    "192.168.50.2",
                    40000,
                    "192.168.50.1",
                    30080,
                    PROTO_TCP,
                    CT_DIR_ORIG,
                ),
                value(
                    "10.245.0.2",
                    8080,
                    CT_F_SNAT,
                    40123,
                    CT_TCP_SEEN_REPLY | CT_TCP_ESTABLISHED,
                ),
            ),
            (
                key(
                    "10.245.0.2",
                    8080,
                    "192.168.50.1",
                    40123,
                    PROTO_TCP,
                    CT_DIR_REPLY,
                ),
                value("192.168.50.1", 30080, CT_F_SNAT, 40000, CT_TCP_SEEN_REPLY),
            ),
            (
                key(
                    "192.168.50.2",
                    5000,
                    "192.168.50.1",
                    30053,
                    PROTO_UDP,
                    CT_DIR_ORIG,
                ),
                value("10.244.0.2", 5353, 0, 0, 0),
            ),
            (
                key(
                    "fd00:50::2",
                    41000,
                    "fd00:50::1",
                    30080,
                    PROTO_TCP,
                    CT_DIR_ORIG,
                ),
                value("fd00:244::2", 8080, 0, 0, CT_TCP_SEEN_REPLY | CT_TCP_RST),
            ),
        ];
        let flows = flows(&entries, 11_000_000_000);
        let rows: Vec<String> = flows
            .iter()
            .map(|f| {
                format!(
                    "{} {} -> {} -> {} snat={:?} age={} idle={} {}",
                    f.protocol, f.client, f.frontend, f.backend, f.snat, f.age_s, f.idle_s, f.state
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                "TCP 192.168.50.2:40000 -> 192.168.50.1:30080 -> 10.245.0.2:8080 snat=Some(\"192.168.50.1:40123\") age=10 idle=2 ESTABLISHED",
                "UDP 192.168.50.2:5000 -> 192.168.50.1:30053 -> 10.244.0.2:5353 snat=None age=10 idle=2 ",
                "TCP [fd00:50::2]:41000 -> [fd00:50::1]:30080 -> [fd00:244::2]:8080 snat=None age=10 idle=2 CLOSING",
            ]
        );
    }

    #[test]
    fn each_table_is_swept_as_often_as_its_entries_expire() {
        let count = |table: CtTable| {
            (0..2 * 720)
                .filter(|&r| tables_due(r).contains(&table))
                .count()
        };
        // Two hours of wake-ups every 5 s.
        assert_eq!(count(CtTable::HalfOpen), 1440, "every 5 s");
        assert_eq!(count(CtTable::Other), 120, "every minute");
        assert_eq!(count(CtTable::Established), 2, "every hour");
        assert!(
            tables_due(0).contains(&CtTable::Established),
            "and at start, for what expired while no agent ran"
        );
    }
}
