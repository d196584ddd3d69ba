//! The maps, as BTF maps so `bpftool map dump` prints typed entries. Their layout is
//! defined in `lb-common`; only the declarations live here.
use aya_ebpf::{btf_maps::HashMap, macros::btf_map};
use lb_common::{
    BACKENDS4_MAX_ENTRIES, Backend4, SERVICES4_MAX_ENTRIES, Service4Key, Service4Value,
};

/// Frontends and their backend slots (see `lb_common::maps`).
#[btf_map]
pub static LB4_SERVICES: HashMap<Service4Key, Service4Value, SERVICES4_MAX_ENTRIES> =
    HashMap::new();

/// Backend id to backend address and port.
#[btf_map]
pub static LB4_BACKENDS: HashMap<u32, Backend4, BACKENDS4_MAX_ENTRIES> = HashMap::new();
