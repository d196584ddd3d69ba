//! The agent can die: translation goes on, and a restarted agent catches up.

use std::time::Duration;

use lb_tests::manifests::service;
use lb_tests::{TestEnv, require_privileges};

/// How long the agent may take to start and apply the manifests.
const APPLY: Duration = Duration::from_secs(10);
const VIP: &str = "10.96.0.10:80";

#[test]
fn killed_agent_leaves_cluster_ips_answering_and_a_restart_catches_up() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    // webapp2 runs from the start but gets its manifest only while the agent is down.
    let web2_pod = env.topo.add_pod("webapp2");
    let _web2_server = web2_pod.spawn_server("webapp2", 8080);
    let client = env.topo.add_pod("client");
    write_webapp(&env);
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    let attached_before = env.cgroup.attached_programs();
    assert!(!attached_before.is_empty(), "agent attached nothing");

    agent.kill();

    let during = client.client(&env.cgroup, VIP, 20);
    assert_eq!(
        during.ok, 20,
        "ClusterIP answers with the agent dead: {during:?}"
    );
    assert_eq!(during.host_names(), ["webapp1"], "{during:?}");
    let pinned = agent
        .frontend(VIP)
        .expect("lb-agent services reads the pins while the agent is down")
        .expect("frontend still pinned");
    assert_eq!(pinned.backends.len(), 1, "{pinned:?}");

    // Scale 1 → 2 while nobody watches.
    env.manifests.write(
        &TestEnv::pod_file("webapp2"),
        &lb_tests::manifests::pod("webapp2", web2_pod.ip())
            .label("app", "webapp")
            .container_port("http", 8080)
            .yaml(),
    );
    agent.start();
    agent.wait_for_frontend(VIP, 2, APPLY);

    let after = client.client(&env.cgroup, VIP, 40);
    assert_eq!(after.ok, 40, "{after:?}");
    assert_eq!(after.host_names(), ["webapp1", "webapp2"], "{after:?}");
    // The restarted agent adopted the attachment instead of stacking another one.
    let attached_after = env.cgroup.attached_programs();
    assert_eq!(
        attached_after.len(),
        attached_before.len(),
        "programs on the cgroup before the kill: {attached_before:?}, after the restart: \
         {attached_after:?}"
    );
}

/// What a client saw while it connected in a loop: connections made, failures by error,
/// and the slowest connect.
#[derive(Debug, Default)]
struct Load {
    ok: u32,
    errors: std::collections::BTreeMap<String, u32>,
    slowest_ms: f64,
}

/// Connects from `client` to `target` in batches of 100 until `stop` is set.
fn connect_until(
    client: &lb_tests::Pod,
    cgroup: &lb_tests::TestCgroup,
    target: &str,
    stop: &std::sync::atomic::AtomicBool,
) -> Load {
    let mut load = Load::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let batch = client.client(cgroup, target, 100);
        load.ok += batch.ok;
        for (error, n) in batch.errors {
            *load.errors.entry(error).or_default() += n;
        }
        load.slowest_ms = batch
            .connect_ms
            .iter()
            .copied()
            .fold(load.slowest_ms, f64::max);
    }
    load
}

/// The id of the link pinned at `path` (`bpftool link show pinned`).
fn link_id(path: &std::path::Path) -> u64 {
    let out = lb_tests::cmd::run(
        std::process::Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(path),
        lb_tests::cmd::PLUMBING_TIMEOUT,
    )
    .expect("bpftool link show");
    let link: serde_json::Value = serde_json::from_str(out.trim()).expect("bpftool json");
    link["id"].as_u64().expect("link id")
}

/// SIGKILL the agent under a steady connection load and start it again: no connection
/// fails, and the restarted agent swaps its programs into the links the first one pinned
/// (the same links, so the hooks never ran without a program or with two).
#[test]
fn killing_and_restarting_the_agent_under_load_fails_no_connection() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let _web2 = env.add_backend("webapp2", "webapp", 8080);
    let client = env.topo.add_pod("client");
    write_webapp(&env);
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 2, APPLY);
    let connect4 = agent.config().pin_path.join("links").join("connect4");
    let link_before = link_id(&connect4);
    let program_before = env.cgroup.attached_programs();

    let stop = std::sync::atomic::AtomicBool::new(false);
    let load = std::thread::scope(|scope| {
        let load = scope.spawn(|| connect_until(&client, &env.cgroup, VIP, &stop));
        std::thread::sleep(Duration::from_secs(1));
        agent.kill();
        std::thread::sleep(Duration::from_millis(500));
        agent.start();
        agent.wait_for_frontend(VIP, 2, APPLY);
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().expect("load thread")
    });

    assert!(load.errors.is_empty(), "{load:?}");
    assert!(load.ok > 500, "{load:?}");
    assert_eq!(
        link_id(&connect4),
        link_before,
        "the restarted agent kept the link and swapped its program"
    );
    let program_after = env.cgroup.attached_programs();
    assert_eq!(program_after.len(), program_before.len());
    assert_ne!(
        program_after, program_before,
        "the programs on the cgroup are the restarted agent's"
    );
    eprintln!(
        "kill and restart under load: {} connections, none failed, slowest connect {:.1} ms",
        load.ok, load.slowest_ms
    );
}

/// Entries of the established table expire (six hours idle, or seconds once the flow
/// closed) without a packet to find them: `lb-agent conntrack` no longer lists them, an
/// agent sweeps them when it starts (and every hour after), and live flows stay. The expired
/// entry here is one of a flow reset a minute ago, as a machine up for less than six hours
/// cannot date an entry six hours back on `CLOCK_MONOTONIC`.
#[test]
fn expired_established_entries_are_not_listed_and_a_starting_agent_sweeps_them() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    write_webapp(&env);
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    agent.kill();

    let minute_ago = lb_tests::clock::monotonic_ns()
        .checked_sub(60_000_000_000)
        .expect("up for a minute");
    let established = lb_common::CT_TCP_SEEN_REPLY | lb_common::CT_TCP_ESTABLISHED;
    let reset = established | lb_common::CT_TCP_RST;
    let expired = established_key(41000);
    let live = established_key(41001);
    let map = lb_common::CT_TCP_MAP;
    let value = |tcp_state| bytes_of(&flow_value(tcp_state, minute_ago));
    update(&agent, map, &bytes_of(&expired), &value(reset));
    update(&agent, map, &bytes_of(&live), &value(established));
    assert!(holds(&agent, map, &expired) && holds(&agent, map, &live));
    let clients: Vec<String> = agent
        .conntrack()
        .iter()
        .map(|flow| flow["client"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        clients,
        ["10.0.0.9:41001"],
        "lb-agent conntrack lists the live flow, not the expired one the datapath would drop"
    );

    agent.start();
    wait_for(&mut agent, "the expired entry swept", |agent| {
        !holds(agent, map, &expired)
    });
    assert!(holds(&agent, map, &live), "the live flow's entry stays");
}

/// The original-direction key of a TCP flow from a client pod's `sport` to [`VIP`].
fn established_key(sport: u16) -> lb_common::CtKey {
    lb_common::CtKey {
        saddr: lb_common::to_v4_mapped(u32::from_ne_bytes([10, 0, 0, 9])),
        daddr: lb_common::to_v4_mapped(u32::from_ne_bytes([10, 96, 0, 10])),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        proto: lb_common::PROTO_TCP,
        dir: lb_common::CT_DIR_ORIG,
        pad: [0; 2],
    }
}

/// A flow's entry (to a backend at 10.0.0.2:8080) in TCP state `tcp_state`, last seen at
/// `last_seen_ns`.
fn flow_value(tcp_state: u8, last_seen_ns: u64) -> lb_common::CtValue {
    lb_common::CtValue {
        nat_addr: lb_common::to_v4_mapped(u32::from_ne_bytes([10, 0, 0, 2])),
        snat_addr: [0; 4],
        nat_port: 8080u16.to_be(),
        snat_port: 0,
        rev_nat_id: 1,
        backend_id: 1,
        flags: 0,
        tcp_state,
        pad: [0; 2],
        created_ns: last_seen_ns,
        last_seen_ns,
    }
}

/// The bytes of a map key or value (`lb_common`'s types have no implicit padding).
fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: `T` is one of lb_common's `repr(C)` map types, every byte initialised.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

/// Whether the pinned map `map` holds an entry at `key`.
fn holds<T: Copy>(agent: &lb_tests::Agent, map: &str, key: &T) -> bool {
    lookup_command(agent, map, &bytes_of(key))
        .output()
        .expect("bpftool map lookup")
        .status
        .success()
}

/// Sets the layout version recorded with the pinned maps (as another version of lb would).
fn set_layout(agent: &lb_tests::Agent, version: u32) {
    update(
        agent,
        lb_common::LAYOUT_MAP,
        &0u32.to_le_bytes(),
        &version.to_le_bytes(),
    );
}

/// Writes `value` at `key` of the pinned map `map`.
fn update(agent: &lb_tests::Agent, map: &str, key: &[u8], value: &[u8]) {
    let mut command = std::process::Command::new("bpftool");
    command
        .args(["map", "update", "pinned"])
        .arg(agent.config().pin_path.join(map))
        .arg("key")
        .args(key.iter().map(u8::to_string))
        .arg("value")
        .args(value.iter().map(u8::to_string));
    lb_tests::cmd::run(&mut command, lb_tests::cmd::PLUMBING_TIMEOUT).expect("bpftool map update");
}

/// Replaces the pin of `map` with an empty `BPF_F_NO_PREALLOC` hash map of `entries`
/// entries, keys and values of the `(key, value)` sizes: the shape an earlier layout gave
/// it.
fn pin_hash_map(agent: &lb_tests::Agent, map: &str, (key, value): (usize, usize), entries: u32) {
    let pin = agent.config().pin_path.join(map);
    std::fs::remove_file(&pin).expect("remove the pin");
    let mut create = std::process::Command::new("bpftool");
    create
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "hash",
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", &entries.to_string(), "name", map, "flags", "1"]);
    lb_tests::cmd::run(&mut create, lb_tests::cmd::PLUMBING_TIMEOUT).expect("bpftool map create");
}

/// Waits for the restarted `agent` to have migrated the pins from layout `from` to this one.
fn wait_for_migration(agent: &mut lb_tests::Agent, from: u32) {
    wait_for(agent, &format!("migrated from layout {from}"), |agent| {
        layout(agent) == lb_common::LAYOUT_VERSION
    });
}

/// Polls `done` while `agent` keeps running; panics with `what` and the agent's log if it
/// does not hold within [`APPLY`].
#[track_caller]
fn wait_for(agent: &mut lb_tests::Agent, what: &str, done: impl Fn(&lb_tests::Agent) -> bool) {
    let deadline = std::time::Instant::now() + APPLY;
    while !done(agent) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {APPLY:?}: {}",
            agent.log()
        );
        agent.assert_running();
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Service of these tests, `webapp` at [`VIP`] (port 80 to 8080), in the manifests.
fn write_webapp(env: &TestEnv) {
    env.manifests.write(
        "svc-webapp.yaml",
        &service("webapp", "10.96.0.10")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
}

fn layout(agent: &lb_tests::Agent) -> u32 {
    let bytes = lookup(agent, lb_common::LAYOUT_MAP, 0);
    u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))
}

/// The value bytes of entry `key` (a `u32`) of the pinned map `map`.
fn lookup(agent: &lb_tests::Agent, map: &str, key: u32) -> Vec<u8> {
    lookup_bytes(agent, map, &key.to_le_bytes())
}

/// The value bytes of entry `key` of the pinned map `map`.
fn lookup_bytes(agent: &lb_tests::Agent, map: &str, key: &[u8]) -> Vec<u8> {
    let mut command = lookup_command(agent, map, key);
    let out = lb_tests::cmd::run(&mut command, lb_tests::cmd::PLUMBING_TIMEOUT).expect("lookup");
    let entry: serde_json::Value = serde_json::from_str(out.trim()).expect("bpftool json");
    entry["value"]
        .as_array()
        .expect("value bytes")
        .iter()
        .map(|b| {
            u8::from_str_radix(b.as_str().unwrap_or("0").trim_start_matches("0x"), 16).unwrap()
        })
        .collect()
}

/// `bpftool -j map lookup` of entry `key` of the pinned map `map`.
fn lookup_command(agent: &lb_tests::Agent, map: &str, key: &[u8]) -> std::process::Command {
    let mut command = std::process::Command::new("bpftool");
    command
        .args(["-j", "map", "lookup", "pinned"])
        .arg(agent.config().pin_path.join(map))
        .arg("key")
        .args(key.iter().map(u8::to_string));
    command
}

/// The kernel's type of the pinned map `map` (`bpftool map show`: "hash", "array").
fn map_type(agent: &lb_tests::Agent, map: &str) -> String {
    let mut command = std::process::Command::new("bpftool");
    command
        .args(["-j", "map", "show", "pinned"])
        .arg(agent.config().pin_path.join(map));
    let out = lb_tests::cmd::run(&mut command, lb_tests::cmd::PLUMBING_TIMEOUT).expect("show");
    let info: serde_json::Value = serde_json::from_str(out.trim()).expect("bpftool json");
    info["type"].as_str().unwrap_or_default().to_string()
}

/// An agent of layout 2 kept the backends in hash maps keyed by id; this one keeps them in
/// arrays indexed by id. Upgrading moves every backend into the array under the id the
/// slots name, so the adopted frontends are complete (not rewritten) and keep serving.
#[test]
fn backends_of_the_hash_map_layout_move_into_the_arrays_under_their_ids() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    write_webapp(&env);
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(map_type(&agent, lb_common::BACKENDS4_MAP), "array");
    // The one backend holds the lowest id.
    let backend = lookup(&agent, lb_common::BACKENDS4_MAP, 1);
    assert_eq!(backend[6], 6, "id 1 holds the TCP backend: {backend:?}");

    // What an agent of layout 2 left: the same backend in a hash map pinned in its place.
    agent.kill();
    pin_hash_map(
        &agent,
        lb_common::BACKENDS4_MAP,
        (4, 8),
        lb_common::MapCapacities::DEFAULT.backends,
    );
    update(
        &agent,
        lb_common::BACKENDS4_MAP,
        &1u32.to_le_bytes(),
        &backend,
    );
    set_layout(&agent, 2);

    agent.start();
    wait_for_migration(&mut agent, 2);
    assert_eq!(map_type(&agent, lb_common::BACKENDS4_MAP), "array");
    assert_eq!(
        lookup(&agent, lb_common::BACKENDS4_MAP, 1),
        backend,
        "the backend keeps its id"
    );
    assert_eq!(client.client(&env.cgroup, VIP, 10).ok, 10);
    let log = agent.log();
    assert!(
        log.contains("migrated the pinned maps' layout") && !log.contains("slots are unusable"),
        "the adopted frontend named a backend the migration kept: {log}"
    );
}

/// The services-map key of `VIP`'s slot `slot` (a layout-3 key: slot 0 is the master).
fn vip_key(slot: u16) -> Vec<u8> {
    let mut key = vec![10, 96, 0, 10];
    key.extend(80u16.to_be_bytes());
    key.extend(slot.to_le_bytes());
    key.extend([lb_common::PROTO_TCP, lb_common::SCOPE_EXTERNAL, 0, 0]);
    key
}

/// An agent of layout 3 kept each frontend's backend slots in the services map beside its
/// master; this one keeps them in the slots array, which the master names. Upgrading moves
/// every whole frontend's slots into the array and its master after them, so the adopted
/// frontend is complete (not rewritten) and keeps serving.
#[test]
fn slots_of_the_services_map_layout_move_into_the_slots_array() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    write_webapp(&env);
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    let backend = lookup(&agent, lb_common::BACKENDS4_MAP, 1);

    // What an agent of layout 3 left: a services map of 16-byte values holding the master
    // (frontend id 7, one slot) and slot 1 (backend id 1, inline).
    agent.kill();
    pin_hash_map(
        &agent,
        lb_common::SERVICES4_MAP,
        (12, 16),
        lb_common::MapCapacities::DEFAULT.frontends,
    );
    let mut master = vec![0; 4];
    master.extend(7u32.to_le_bytes());
    master.extend(lb_common::SVC_F_CLUSTER_IP.to_le_bytes());
    master.extend([1, 0, 0, 0]);
    let mut slot = 1u32.to_le_bytes().to_vec();
    slot.extend([0; 4]);
    slot.extend(&backend);
    update(&agent, lb_common::SERVICES4_MAP, &vip_key(0), &master);
    update(&agent, lb_common::SERVICES4_MAP, &vip_key(1), &slot);
    set_layout(&agent, 3);

    agent.start();
    wait_for_migration(&mut agent, 3);
    let master = lookup_bytes(&agent, lb_common::SERVICES4_MAP, &vip_key(0));
    assert_eq!(master.len(), 20, "the master of this layout: {master:?}");
    assert_eq!(
        master[4..8],
        7u32.to_le_bytes(),
        "the frontend keeps its id"
    );
    let base = u32::from_le_bytes(master[16..20].try_into().expect("4 bytes"));
    let moved = lookup(&agent, lb_common::SLOTS_MAP, base);
    assert_eq!(moved[..4], 1u32.to_le_bytes(), "the slot names backend 1");
    assert_eq!(moved[8..], backend[..], "with the backend inline");
    assert_eq!(client.client(&env.cgroup, VIP, 10).ok, 10);
    let log = agent.log();
    assert!(
        log.contains("migrated the pinned maps' layout") && !log.contains("slots are unusable"),
        "the adopted frontend is whole: {log}"
    );
}

/// Maps pinned by an older layout are adopted and stamped with this one; maps of a newer
/// layout than the agent knows are refused with what to do, and the datapath they drive
/// keeps running.
#[test]
fn pinned_maps_of_an_older_layout_are_migrated_and_a_newer_one_refused() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web1 = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    write_webapp(&env);
    let mut agent = env.agent();
    agent.wait_for_frontend(VIP, 1, APPLY);
    assert_eq!(layout(&agent), lb_common::LAYOUT_VERSION);

    agent.kill();
    set_layout(&agent, 1);
    agent.start();
    // The frontend is in the pins already: wait for the new agent to have loaded.
    wait_for_migration(&mut agent, 1);

    agent.kill();
    set_layout(&agent, 99);
    agent.start();
    let status = agent.wait_exit(APPLY).expect("the agent refuses to start");
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("have layout 99, newer than this agent's")
            && log.contains("lb-agent cleanup --bpf-pin-path"),
        "{log}"
    );
    assert_eq!(layout(&agent), 99, "the refused maps are left as they are");
    assert_eq!(
        client.client(&env.cgroup, VIP, 10).ok,
        10,
        "and keep serving"
    );
}
