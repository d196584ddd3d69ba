//! The node agent of an eBPF Kubernetes service load balancer.
//!
//! Data flow: a source ([`source`]) emits [`source::change::Change`]s; the
//! [`reconcile::Reconciler`] applies them to the [`state`] (validated on arrival into
//! [`translate`]'s compact forms), which [`translate`] turns into the desired frontends
//! ([`model`]); [`maps::writer`] writes the differences into the BPF maps that the programs
//! loaded by [`loader`] read.
pub mod agent;
pub mod allocator;
pub mod api;
pub mod capabilities;
pub mod categorize;
pub mod clock;
pub mod conntrack;
pub mod datapath_counters;
pub mod devices;
pub mod dns;
pub mod env;
pub mod explain;
pub mod fast_hash;
pub mod health;
pub mod inspect;
pub mod layout;
pub mod links;
pub mod listen;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod mounts;
pub mod netlink;
pub mod node;
pub mod ownership;
pub mod prog_stats;
pub mod proxy_health;
pub mod readiness;
pub mod reconcile;
pub mod small_set;
pub mod source;
pub mod stale;
pub mod state;
pub mod summary;
pub mod telemetry;
pub mod translate;

/// The agent's seccomp profile (`deploy/seccomp/lb-agent.json`, printed by `lb-agent
/// seccomp-profile`): the container runtimes' default with bpf(2) allowed without
/// CAP_SYS_ADMIN, which the default allows it only with.
pub const SECCOMP_PROFILE: &str = include_str!("../../deploy/seccomp/lb-agent.json");
