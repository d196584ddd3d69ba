//! Chaos: the agent is SIGKILLed at random points of a 10,000-Service bulk apply, again and
//! again (some kills land in the restarted agent's own first sync over half-written maps).
//! Throughout, clients connect in a loop to Services that existed before the bulk apply:
//! none may ever fail. After the last restart the maps must be consistent, equal to the
//! desired state, and equal to what a fresh agent on empty maps writes (same entry counts:
//! no slot or backend leaked).
//!
//! `LB_CHAOS_KILLS` sets the number of kills (default 5; `LB_CHAOS_KILLS=50` for a longer run),
//! `LB_CHAOS_SEED` the seed of the kill times (printed, for a replay).

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_tests::bpffs::agent_cleanup;
use lb_tests::manifests::service;
use lb_tests::{Agent, TestEnv, require_privileges};

/// Services in the bulk apply, in files of [`PER_FILE`].
const SERVICES: usize = 10_000;
const PER_FILE: usize = 1_000;
/// The Services that exist before the bulk apply, with real backends.
const KEPT: [(&str, &str, &str); 2] = [
    ("keep-a", "10.96.0.10", "web-a"),
    ("keep-b", "10.96.0.11", "web-b"),
];
/// How long one agent may take to program the whole bulk (a debug build, 2 CPUs shared).
const SETTLE: Duration = Duration::from_secs(240);

/// The ClusterIP of bulk Service `i` (10.97.0.1 … 10.97.39.250).
fn bulk_ip(i: usize) -> String {
    format!("10.97.{}.{}", i / 250, i % 250 + 1)
}

/// Whether bulk Service `i` exists in `round` (each round drops another seventh).
fn exists(i: usize, round: usize) -> bool {
    round == 0 || i % 7 != round % 7
}

/// The endpoint addresses of bulk Service `i` in `round`: 1 to 3, changing every round.
fn endpoints(i: usize, round: usize) -> Vec<String> {
    (0..1 + (i + round) % 3)
        .map(|e| format!("10.{}.{}.{}", 100 + e, i / 250, i % 250 + 1))
        .collect()
}

/// One bulk file: Services `range` of `round`, each with an EndpointSlice (flow-style
/// YAML, written directly: 20,000 objects through a serializer would dominate the test).
fn bulk_file(range: std::ops::Range<usize>, round: usize) -> String {
    let mut out = String::new();
    for i in range.filter(|&i| exists(i, round)) {
        let endpoints: Vec<String> = endpoints(i, round)
            .iter()
            .map(|ip| format!("{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}"))
            .collect();
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bulk-{i}, namespace: default}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n\
             ---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: bulk-{i}-x, namespace: default, \
             labels: {{kubernetes.io/service-name: bulk-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\n\
             endpoints: [{}]\n---\n",
            endpoints.join(", "),
            ip = bulk_ip(i),
        ));
    }
    out
}

/// Writes every bulk file of `round` (each replaced atomically).
fn write_bulk(env: &TestEnv, round: usize) {
    for (file, start) in (0..SERVICES).step_by(PER_FILE).enumerate() {
        env.manifests.write(
            &format!("bulk-{file}.yaml"),
            &bulk_file(start..start + PER_FILE, round),
        );
    }
}

/// Frontend `ip:port` → its backends `ip:port`, sorted; as the desired state has them.
type Table = BTreeMap<String, Vec<String>>;

fn desired(round: usize, kept: &BTreeMap<String, String>) -> Table {
    let mut table: Table = (0..SERVICES)
        .filter(|&i| exists(i, round))
        .map(|i| {
            let mut backends: Vec<String> = endpoints(i, round)
                .into_iter()
                .map(|ip| format!("{ip}:8080"))
                .collect();
            backends.sort();
            (format!("{}:80", bulk_ip(i)), backends)
        })
        .collect();
    for (vip, backend) in kept {
        table.insert(vip.clone(), vec![backend.clone()]);
    }
    table
}

/// The maps as `lb-agent services` reads them, checked for consistency on the way: every
/// master's count is its number of slots, and every slot names a backend the map holds
/// (a slot naming a missing backend has no address and fails to parse).
fn programmed(agent: &Agent) -> Result<Table, String> {
    let frontends = agent.services()?;
    let mut table = Table::new();
    for f in frontends {
        if usize::from(f.count) != f.backends.len() {
            return Err(format!(
                "{}: master count {} but {} slots",
                f.addr(),
                f.count,
                f.backends.len()
            ));
        }
        table.insert(f.addr(), f.backend_addrs());
    }
    Ok(table)
}

/// Waits until the maps hold `want`; returns how long it took.
#[track_caller]
fn settle(agent: &mut Agent, want: &Table, what: &str) -> Duration {
    let started = Instant::now();
    // Not `wait_attached`: an agent attaches after its first sync, which at 10,000
    // Services takes longer than that waits.
    loop {
        agent.assert_running();
        let last = match programmed(agent) {
            Ok(table) if &table == want => return started.elapsed(),
            Ok(table) => {
                let missing = want
                    .iter()
                    .filter(|(k, v)| table.get(*k) != Some(v))
                    .count();
                let extra = table.keys().filter(|k| !want.contains_key(*k)).count();
                format!("{missing} frontends missing or different, {extra} not wanted")
            }
            Err(e) => e,
        };
        assert!(
            started.elapsed() < SETTLE,
            "{what}: the maps did not reach the desired state within {SETTLE:?}: {last}\n{}",
            agent.log_tail(30)
        );
        thread::sleep(Duration::from_secs(2));
    }
}

/// Each pinned map's entry count, by name.
fn entries(agent: &Agent) -> BTreeMap<String, u64> {
    agent
        .map_summary()
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["entries"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// A small xorshift: the kill times, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn sigkill_during_a_10k_service_bulk_apply_loses_nothing() {
    if !require_privileges() {
        return;
    }
    let kills = env_number("LB_CHAOS_KILLS", 5);
    let seed = env_number(
        "LB_CHAOS_SEED",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1,
    );
    eprintln!("chaos: {kills} kills, LB_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let env = TestEnv::new();
    let mut kept = BTreeMap::new();
    let mut backends = Vec::new();
    for (name, vip, pod) in KEPT {
        let backend = env.add_backend(pod, name, 8080);
        env.manifests.write(
            &format!("svc-{name}.yaml"),
            &service(name, vip)
                .selector("app", name)
                .port(80, 8080)
                .yaml(),
        );
        kept.insert(format!("{vip}:80"), format!("{}:8080", backend.pod.ip()));
        backends.push(backend);
    }
    let client = env.topo.add_pod("client");
    let mut agent = env.agent();
    let kept_only: Table = kept
        .iter()
        .map(|(v, b)| (v.clone(), vec![b.clone()]))
        .collect();
    settle(&mut agent, &kept_only, "the kept Services");

    // Clients connect to the kept Services for the whole test, in batches.
    let stop = AtomicBool::new(false);
    let (connections, failures) = thread::scope(|scope| {
        let clients = scope.spawn(|| {
            let (mut ok, mut failed) = (0u64, BTreeMap::<String, u64>::new());
            let mut vips = KEPT.iter().map(|(_, vip, _)| format!("{vip}:80")).cycle();
            while !stop.load(Ordering::Relaxed) {
                let vip = vips.next().unwrap_or_default();
                let summary = client
                    .client_with()
                    .cgroup(&env.cgroup)
                    .count(25)
                    .interval_ms(10)
                    .timeout_ms(2000)
                    .run(&vip);
                ok += u64::from(summary.ok);
                for (error, n) in summary.errors {
                    *failed.entry(format!("{vip}: {error}")).or_default() += u64::from(n);
                }
            }
            (ok, failed)
        });

        // Round 0, uninterrupted: how long a bulk apply takes, to aim the kills within it.
        write_bulk(&env, 0);
        let full = settle(&mut agent, &desired(0, &kept), "round 0");
        eprintln!("chaos: round 0 (10,000 Services) programmed in {full:?}");
        // Kills within the first 60 % of that: nearly all land in a write (the rounds after
        // a restart are slower still, the restarted agent reading every file again).
        let window = u64::try_from(full.as_millis() * 3 / 5).unwrap_or(u64::MAX);
        let mut mid_write = 0;
        for round in 1..=usize::try_from(kills).unwrap_or(usize::MAX) {
            let log_before = agent.log().len();
            write_bulk(&env, round);
            let delay = Duration::from_millis(rng.below(window));
            thread::sleep(delay);
            agent.kill();
            // Killed before the write of this round was done: no "maps updated" with the
            // round's count of frontends since the files were written.
            let log = agent.log();
            let finished = log[log_before..].lines().any(|l| {
                l.contains("maps updated")
                    && l.contains(&format!("frontends={}", desired(round, &kept).len()))
            });
            if !finished {
                mid_write += 1;
            }
            eprintln!(
                "chaos: round {round}: killed {delay:?} after the bulk write ({})",
                if finished {
                    "after its sync"
                } else {
                    "mid-write"
                }
            );
            agent.start();
        }
        let last = usize::try_from(kills).unwrap_or(0);
        let took = settle(&mut agent, &desired(last, &kept), "after the last restart");
        eprintln!(
            "chaos: converged {took:?} after the last restart; {mid_write} of {kills} kills mid-write"
        );
        stop.store(true, Ordering::Relaxed);
        let (ok, failed) = clients.join().expect("client thread");
        assert!(
            mid_write * 2 >= kills,
            "only {mid_write} of {kills} kills landed during a write: the test proves little"
        );
        (ok, failed)
    });
    eprintln!("chaos: {connections} connections to the kept Services, failures {failures:?}");
    assert!(connections > 0, "no client connection was made");
    assert!(
        failures.is_empty(),
        "connections to Services that existed before the bulk apply failed: {failures:?}"
    );

    // What a fresh agent writes on empty maps for the same files: the same frontends and
    // backends, and the same number of entries in every map (nothing leaked).
    let last = usize::try_from(kills).unwrap_or(0);
    let survived = programmed(&agent).unwrap_or_else(|e| panic!("{e}"));
    let survived_entries = entries(&agent);
    agent.stop(Duration::from_secs(10));
    agent_cleanup(env.pins.path()).unwrap_or_else(|e| panic!("lb-agent cleanup: {e}"));
    agent.start();
    settle(&mut agent, &desired(last, &kept), "a fresh agent");
    assert_eq!(
        programmed(&agent).unwrap_or_else(|e| panic!("{e}")),
        survived
    );
    let fresh_entries = entries(&agent);
    for map in [
        "LB4_SERVICES",
        "LB4_BACKENDS",
        "LB6_SERVICES",
        "LB6_BACKENDS",
        "LB_SLOTS",
    ] {
        assert_eq!(
            survived_entries.get(map),
            fresh_entries.get(map),
            "{map}: entries after the kills vs a fresh agent's"
        );
    }
}
