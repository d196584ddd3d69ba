//! The maps, as BTF maps so `bpftool map dump` prints typed entries. Their layout is
//! defined in `lb-common`; only the declarations live here.
use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap},
    macros::btf_map,
};
use lb_common::{
    BACKENDS_MAX_ENTRIES, Backend4, Backend6, MAP_F_NO_PREALLOC, REVNAT4_MAX_ENTRIES,
    REVNAT6_MAX_ENTRIES, RevNat4Key, RevNat4Value, RevNat6Key, RevNat6Value, SERVICES_MAX_ENTRIES,
    Service4Key, Service6Key, ServiceValue,
};

/// IPv4 frontends and their backend slots (see `lb_common::maps`).
#[btf_map]
pub static LB4_SERVICES: HashMap<
    Service4Key,
    ServiceValue,
    SERVICES_MAX_ENTRIES,
    MAP_F_NO_PREALLOC,
> = HashMap::new();

/// Backend id to IPv4 backend.
#[btf_map]
pub static LB4_BACKENDS: HashMap<u32, Backend4, BACKENDS_MAX_ENTRIES, MAP_F_NO_PREALLOC> =
    HashMap::new();

/// (socket, IPv4 backend) to the frontend it dialled.
#[btf_map]
pub static LB4_REVNAT: LruHashMap<RevNat4Key, RevNat4Value, REVNAT4_MAX_ENTRIES> =
    LruHashMap::new();

/// IPv6 frontends and their backend slots.
#[btf_map]
pub static LB6_SERVICES: HashMap<
    Service6Key,
    ServiceValue,
    SERVICES_MAX_ENTRIES,
    MAP_F_NO_PREALLOC,
> = HashMap::new();

/// Backend id to IPv6 backend.
#[btf_map]
pub static LB6_BACKENDS: HashMap<u32, Backend6, BACKENDS_MAX_ENTRIES, MAP_F_NO_PREALLOC> =
    HashMap::new();

/// (socket, IPv6 backend) to the frontend it dialled.
#[btf_map]
pub static LB6_REVNAT: LruHashMap<RevNat6Key, RevNat6Value, REVNAT6_MAX_ENTRIES> =
    LruHashMap::new();
