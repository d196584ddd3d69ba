//! The agent's memory limit in `deploy/daemonset.yaml`, worked out from what `cargo xtask bench`
//! measures (docs/deploy.md, "Memory limit", gives the same formula in words):
//!
//! ```text
//! limit = round_up_to_64_MiB((1 + headroom) × ( empty agent RSS
//!                                             + agent bytes per Service × N
//!                                             + BPF maps at their capacities, empty
//!                                             + map bytes per Service × N ))
//! ```
//!
//! for the largest cluster the DaemonSet is sized for (N Services × E endpoints). The BPF
//! maps count because the kernel charges them to the memory cgroup of the process that
//! creates them: the agent's container, when it is the first agent on the node.
//!
//! The empty maps are the kernel's own accounting (`memlock` of `bpftool map show`) worked
//! out from the maps' shapes and capacities in `lb-common`: a hash map's bucket array is
//! allocated when the map is created (16 bytes × the next power of two of `max_entries`),
//! arrays, preallocated and LRU maps hold every element from the start, a
//! `BPF_F_NO_PREALLOC` hash map and an LPM trie add their elements as they are written (that is the "map bytes per
//! Service"). The bench prints the same figure for the maps it measured, so the model is
//! checked on every run.
//!
//! The per-Service figures here are the ones the bench measured; when a run finds others, it
//! prints the limit they give, and this file and the manifest are changed together (the unit
//! test below fails until both agree).
use lb_common::{MAP_F_NO_PREALLOC, MapCapacities, MapKind, MapSpec};

const MIB: u64 = 1 << 20;

/// The largest cluster the DaemonSet is sized for: the issue's target, which the map
/// capacities' defaults hold.
pub const SIZED_SERVICES: u64 = 100_000;
/// Endpoints per Service of that cluster.
pub const SIZED_ENDPOINTS: u64 = 10;
/// What the headroom covers: allocator slack and fragmentation, bursts of watch events, the
/// kernel's rounding of map allocations (its accounting counts the bytes asked for).
pub const HEADROOM_PERCENT: u64 = 25;
/// The limit is rounded up to this.
const ROUND_TO: u64 = 64 * MIB;
/// CPUs of the largest node counted: each hash map has per-CPU locks, and a preallocated
/// one per-CPU spare elements.
pub const NODE_CPUS: u64 = 128;

/// What the bench measured (`cargo xtask bench`, "DaemonSet memory limit"), on the API
/// server source as the DaemonSet runs it, at 100,000 Services × 10 endpoints (release
/// build, 2026-12-07, main with the slots array (layout 4) and the writer's backend
/// records packed: `cargo xtask watch-bench -- --services 100000 --endpoints 10 --events
/// 20`): RSS 19,252 KiB empty, 257,252 KiB at its peak; maps 244,603 KiB empty, 253,978 KiB
/// holding the Services (only the masters grow: slots and backends are arrays).
pub const MEASURED: Figures = Figures {
    empty_agent_bytes: 20 * MIB,
    agent_bytes_per_service: 2_437,
    map_bytes_per_service: 96,
};

/// The measured inputs of the formula.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Figures {
    /// RSS of the agent holding no Service.
    pub empty_agent_bytes: u64,
    /// The agent's peak RSS (`VmHWM`, the initial list included) minus the empty agent's,
    /// per Service.
    pub agent_bytes_per_service: u64,
    /// The maps' memory minus the empty maps', per Service (its frontend entries, backend
    /// slots and backends).
    pub map_bytes_per_service: u64,
}

/// The terms of the formula, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub agent: u64,
    pub empty_maps: u64,
    pub maps: u64,
    /// `(agent + maps) × (1 + headroom)`, rounded up.
    pub limit: u64,
}

/// The limit for `services` Services with `figures`, the maps as `maps` declares them.
pub fn limit(figures: &Figures, services: u64, maps: &[MapSpec]) -> Limit {
    let agent = figures.empty_agent_bytes + figures.agent_bytes_per_service * services;
    let empty_maps = maps.iter().map(|m| empty_map_bytes(m, NODE_CPUS)).sum();
    let maps = empty_maps + figures.map_bytes_per_service * services;
    let total = (agent + maps) * (100 + HEADROOM_PERCENT) / 100;
    Limit {
        agent,
        empty_maps,
        maps,
        limit: total.div_ceil(ROUND_TO) * ROUND_TO,
    }
}

/// The limit for [`MEASURED`] at [`SIZED_SERVICES`], the maps at `capacities` (the
/// DaemonSet's: lb-common's defaults unless its arguments set `--max-*`).
pub fn daemonset_limit(capacities: &MapCapacities) -> Limit {
    limit(&MEASURED, SIZED_SERVICES, &capacities.pinned_maps())
}

/// What the kernel accounts to a map of this shape before anything is written to it
/// (`htab_map_mem_usage`, `trie_mem_usage` in Linux 6.x; the few hundred bytes of the map's
/// own struct left out).
pub fn empty_map_bytes(spec: &MapSpec, cpus: u64) -> u64 {
    let max_entries = spec.max_entries as u64;
    match spec.kind {
        // Nodes only, allocated as written.
        MapKind::LpmTrie => return 0,
        // Every element, the value rounded to 8 bytes (`array_map_mem_usage`).
        MapKind::Array => return round8(spec.value_size as u64) * max_entries,
        MapKind::PerCpuArray => return round8(spec.value_size as u64) * max_entries * cpus,
        MapKind::RingBuf => return max_entries,
        MapKind::Hash | MapKind::LruHash => {}
    }
    let buckets = 16 * max_entries.next_power_of_two();
    let locks = 4 * 8 * cpus;
    if spec.flags & MAP_F_NO_PREALLOC != 0 {
        return buckets + locks;
    }
    // Preallocated (a plain hash map also keeps a spare element per CPU; counted for the
    // LRU maps too, an upper bound).
    let element = 48 + round8(spec.key_size as u64) + round8(spec.value_size as u64);
    buckets + locks + element * (max_entries + cpus) + 8 * cpus
}

fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// `1344Mi`: how the manifest writes a limit.
pub fn quantity(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 30) {
        format!("{}Gi", bytes >> 30)
    } else {
        format!("{}Mi", bytes.div_ceil(MIB))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::Container;

    use super::*;

    /// A memory quantity of a manifest (`256Mi`, `1Gi`, `1500M`, `1073741824`) in bytes.
    fn parse_quantity(text: &str) -> Option<u64> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().ok()?;
        let factor = match unit {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            _ => return None,
        };
        number.checked_mul(factor)
    }

    /// The map capacities `lb-agent run` gets from these arguments and environment variables
    /// (`--max-frontends=N` or `--max-frontends N`, `LB_MAX_FRONTENDS`): the defaults of
    /// lb-common where none is set.
    fn capacities<'a>(
        args: &[String],
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> MapCapacities {
        let mut capacities = MapCapacities::DEFAULT;
        let mut set = |name: &str, value: &str| {
            let Ok(value) = value.parse::<u32>() else {
                return;
            };
            match name {
                "max-frontends" => capacities.frontends = value,
                "max-backend-slots" => capacities.backend_slots = value,
                "max-backends" => capacities.backends = value,
                "max-conntrack" => capacities.conntrack = value,
                _ => {}
            }
        };
        for (name, value) in env {
            if let Some(flag) = name.strip_prefix("LB_") {
                set(&flag.to_lowercase().replace('_', "-"), value);
            }
        }
        // Flags win over the environment, as clap has it.
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                continue;
            };
            match flag.split_once('=') {
                Some((name, value)) => set(name, value),
                None => {
                    if let Some(value) = args.clone().next() {
                        set(flag, value);
                    }
                }
            }
        }
        capacities
    }

    /// The `lb-agent` container of `deploy/daemonset.yaml`.
    fn agent_container() -> Container {
        let path = crate::repo_root().join("deploy/daemonset.yaml");
        let text = std::fs::read_to_string(&path).expect("deploy/daemonset.yaml");
        let daemonset: DaemonSet = serde_saphyr::from_str(&text).expect("a DaemonSet");
        let spec = daemonset.spec.template.spec.expect("pod spec");
        spec.containers
            .into_iter()
            .find(|c| c.name == "lb-agent")
            .expect("the lb-agent container")
    }

    /// The capacities the DaemonSet's agent runs with.
    fn manifest_capacities(agent: &Container) -> MapCapacities {
        let env: Vec<(&str, &str)> = agent
            .env
            .iter()
            .flatten()
            .filter_map(|v| Some((v.name.as_str(), v.value.as_deref()?)))
            .collect();
        capacities(agent.args.as_deref().unwrap_or_default(), env)
    }

    #[test]
    fn the_daemonset_memory_limit_is_the_formulas() {
        let agent = agent_container();
        let want = daemonset_limit(&manifest_capacities(&agent));
        let have = agent
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|limits| limits.get("memory"))
            .expect("a memory limit on the lb-agent container")
            .0
            .clone();
        assert_eq!(
            parse_quantity(&have),
            Some(want.limit),
            "deploy/daemonset.yaml limits lb-agent to {have}, the formula of xtask/src/sizing.rs \
             gives {} for {SIZED_SERVICES} Services ({want:?}): change the manifest (and \
             docs/deploy.md), or the figures if the bench measured others",
            quantity(want.limit)
        );
    }

    #[test]
    fn docs_state_the_same_limit() {
        let docs = std::fs::read_to_string(crate::repo_root().join("docs/deploy.md")).unwrap();
        let limit = quantity(daemonset_limit(&manifest_capacities(&agent_container())).limit);
        assert!(
            docs.contains(&format!("`{limit}`")),
            "docs/deploy.md should give the DaemonSet's limit, `{limit}`"
        );
    }

    #[test]
    fn empty_maps_as_the_kernel_accounts_them() {
        let spec = |max_entries, flags| MapSpec {
            kind: MapKind::Hash,
            name: "M",
            key_size: 12,
            value_size: 12,
            max_entries,
            flags,
        };
        // NO_PREALLOC: the bucket array of the next power of two, and the locks.
        assert_eq!(
            empty_map_bytes(&spec(1_000_000, MAP_F_NO_PREALLOC), 2),
            16 * 1_048_576 + 64
        );
        // Preallocated: every element (48 bytes of header, key and value rounded to 8).
        assert_eq!(
            empty_map_bytes(&spec(1024, 0), 1),
            16 * 1024 + 32 + 80 * 1025 + 8
        );
        let trie = MapSpec {
            kind: MapKind::LpmTrie,
            ..spec(16_384, MAP_F_NO_PREALLOC)
        };
        assert_eq!(empty_map_bytes(&trie, 2), 0);
        // An array: every value, rounded to 8 bytes (20-byte IPv6 backends take 24).
        let array = MapSpec {
            kind: MapKind::Array,
            value_size: 20,
            ..spec(1_048_576, 0)
        };
        assert_eq!(empty_map_bytes(&array, 2), 24 * 1_048_576);
    }

    #[test]
    fn capacities_from_flags_and_environment() {
        let args: Vec<String> = ["run", "--max-frontends=1000", "--max-backends", "5000"]
            .map(str::to_owned)
            .to_vec();
        let caps = capacities(
            &args,
            [("LB_MAX_CONNTRACK", "2048"), ("LB_MAX_FRONTENDS", "7")],
        );
        assert_eq!(caps.frontends, 1000, "the flag wins over the environment");
        assert_eq!(caps.backends, 5000);
        assert_eq!(caps.conntrack, 2048);
        assert_eq!(
            caps.backend_slots,
            MapCapacities::DEFAULT.backend_slots,
            "the default where nothing is set"
        );
    }

    #[test]
    fn the_defaults_take_what_the_agent_states() {
        // lb-agent's --help: 239 MiB for an empty node at the defaults, measured (238.9).
        let empty: u64 = MapCapacities::DEFAULT
            .pinned_maps()
            .iter()
            .map(|m| empty_map_bytes(m, 2))
            .sum();
        assert!(
            (237 * MIB..241 * MIB).contains(&empty),
            "{} MiB",
            empty / MIB
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("256Mi"), Some(256 << 20));
        assert_eq!(parse_quantity("2Gi"), Some(2 << 30));
        assert_eq!(parse_quantity("1500M"), Some(1_500_000_000));
        assert_eq!(parse_quantity("12x"), None);
        assert_eq!(quantity(1344 << 20), "1344Mi");
        assert_eq!(quantity(2 << 30), "2Gi");
    }
}
