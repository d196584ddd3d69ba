//! Cluster DNS (`--dns-addr`), asked by real resolver clients: `dig` (bind9-dnsutils) for
//! every record kind of the Kubernetes DNS specification, glibc (`getent`, `curl`) through a
//! pod's resolv.conf search path; names follow Services and readiness as the maps do.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::agent::{Agent, AgentConfig};
use lb_tests::manifests::{pod, service};
use lb_tests::{API_ADDR, TestEnv, cmd, require_privileges};

/// The bridge address of the node namespace: reachable from every pod.
const DNS_IP: &str = "10.244.0.1";
const APPLY: Duration = Duration::from_secs(10);

/// An agent serving DNS on the bridge (and the API, for `lb-agent env`), refusing names
/// outside the cluster domain.
fn dns_agent(env: &TestEnv, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--dns-addr".to_owned(),
        format!("{DNS_IP}:53"),
        "--dns-ttl".to_owned(),
        "1".to_owned(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let mut agent = Agent::new(AgentConfig {
        api_addr: Some(API_ADDR),
        extra_args: args,
        ..env.agent_config()
    });
    agent.start();
    agent
}

/// What dig printed: the status and the answer section's data.
#[derive(Debug, PartialEq, Eq)]
struct Dig {
    status: String,
    answers: Vec<String>,
    /// dig saw a truncated UDP answer and asked again over TCP.
    retried_over_tcp: bool,
}

/// `dig @DNS_IP ARGS` in `netns`.
#[track_caller]
fn dig(netns: &str, args: &[&str]) -> Dig {
    try_dig(netns, args).unwrap_or_else(|e| panic!("{e}"))
}

/// [`dig`], or why dig got no answer (the server is not listening yet).
fn try_dig(netns: &str, args: &[&str]) -> Result<Dig, String> {
    let out = cmd::run(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("dig")
            .arg(format!("@{DNS_IP}"))
            .args(["+tries=1", "+time=2", "+noall", "+comments", "+answer"])
            .args(args),
        Duration::from_secs(10),
    )?;
    let status = out
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or_default().to_owned())
        .ok_or_else(|| format!("no status in dig's output:\n{out}"))?;
    let mut answers: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().skip(4).collect::<Vec<_>>().join(" "))
        .collect();
    answers.sort();
    Ok(Dig {
        status,
        answers,
        retried_over_tcp: out.contains("Truncated, retrying in TCP mode"),
    })
}

fn answer(status: &str, answers: &[&str]) -> Dig {
    let mut answers: Vec<String> = answers.iter().map(|a| (*a).to_owned()).collect();
    answers.sort();
    Dig {
        status: status.to_owned(),
        answers,
        retried_over_tcp: false,
    }
}

/// Asks until `want` or `timeout` (also while the server does not answer yet); the last
/// answer.
#[track_caller]
fn dig_until(netns: &str, args: &[&str], want: &Dig, timeout: Duration) -> Dig {
    let deadline = Instant::now() + timeout;
    loop {
        match try_dig(netns, args) {
            Ok(got) if got == *want || Instant::now() > deadline => return got,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn headless_slice_yaml() -> String {
    r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-abc
  namespace: prod
  labels:
    kubernetes.io/service-name: db
    service.kubernetes.io/headless: ""
addressType: IPv4
ports:
  - name: sql
    port: 3306
    protocol: TCP
endpoints:
  - addresses: ["10.244.9.50"]
    hostname: db-0
    conditions: {ready: true}
  - addresses: ["10.244.9.51"]
    conditions: {ready: true}
  - addresses: ["10.244.9.52"]
    hostname: db-2
    conditions: {ready: false}
"#
    .to_owned()
}

fn headless_service_yaml(name: &str, namespace: &str, selector: Option<&str>) -> String {
    let selector = selector.map_or(String::new(), |app| {
        format!("  selector:\n    app: {app}\n")
    });
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: None\n{selector}  ports:\n    - name: sql\n      port: 3306\n      targetPort: 3306\n"
    )
}

#[test]
fn dig_gets_every_record_kind_of_the_specification() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "web.yaml",
        &service("web", "10.96.0.10")
            .port_full(Some("http"), 80, 8080, "TCP")
            .port_full(Some("dns"), 53, 53, "UDP")
            .yaml(),
    );
    env.manifests
        .write("db.yaml", &headless_service_yaml("db", "prod", None));
    env.manifests.write("db-slice.yaml", &headless_slice_yaml());
    env.manifests.write(
        "ext.yaml",
        &service("ext", "")
            .type_("ExternalName")
            .external_name("web.default.svc.cluster.local")
            .yaml(),
    );
    let _agent = dns_agent(&env, &["--dns-no-forward"]);
    let ns = client.netns();
    let web = "web.default.svc.cluster.local";
    // A: the ClusterIP.
    assert_eq!(
        dig_until(ns, &[web, "A"], &answer("NOERROR", &["10.96.0.10"]), APPLY),
        answer("NOERROR", &["10.96.0.10"])
    );
    // The name exists without AAAA: NODATA. A name that does not exist: NXDOMAIN.
    assert_eq!(dig(ns, &[web, "AAAA"]), answer("NOERROR", &[]));
    assert_eq!(
        dig(ns, &["nope.default.svc.cluster.local", "A"]),
        answer("NXDOMAIN", &[])
    );
    // SRV of each named port, by protocol.
    assert_eq!(
        dig(ns, &["_http._tcp.web.default.svc.cluster.local", "SRV"]),
        answer("NOERROR", &["0 100 80 web.default.svc.cluster.local."])
    );
    assert_eq!(
        dig(ns, &["_dns._udp.web.default.svc.cluster.local", "SRV"]),
        answer("NOERROR", &["0 100 53 web.default.svc.cluster.local."])
    );
    assert_eq!(
        dig(ns, &["_http._udp.web.default.svc.cluster.local", "SRV"]).status,
        "NXDOMAIN"
    );
    // PTR of the ClusterIP.
    assert_eq!(
        dig(ns, &["-x", "10.96.0.10"]),
        answer("NOERROR", &["web.default.svc.cluster.local."])
    );
    // Headless: the ready endpoints, by hostname too (an endpoint without one gets its
    // address with dashes), SRV per ready endpoint, PTR to the hostname.
    assert_eq!(
        dig(ns, &["db.prod.svc.cluster.local", "A"]),
        answer("NOERROR", &["10.244.9.50", "10.244.9.51"])
    );
    assert_eq!(
        dig(ns, &["db-0.db.prod.svc.cluster.local", "A"]),
        answer("NOERROR", &["10.244.9.50"])
    );
    assert_eq!(
        dig(ns, &["db-2.db.prod.svc.cluster.local", "A"]).status,
        "NXDOMAIN",
        "a not-ready endpoint has no name"
    );
    assert_eq!(
        dig(ns, &["_sql._tcp.db.prod.svc.cluster.local", "SRV"]),
        answer(
            "NOERROR",
            &[
                "0 100 3306 db-0.db.prod.svc.cluster.local.",
                "0 100 3306 10-244-9-51.db.prod.svc.cluster.local."
            ]
        )
    );
    assert_eq!(
        dig(ns, &["-x", "10.244.9.50"]),
        answer("NOERROR", &["db-0.db.prod.svc.cluster.local."])
    );
    // ExternalName: a CNAME (its in-cluster target answered along).
    assert_eq!(
        dig(ns, &["ext.default.svc.cluster.local", "A"]),
        answer("NOERROR", &["10.96.0.10", "web.default.svc.cluster.local."])
    );
    // The schema version; a namespace (exists: NODATA; does not: NXDOMAIN).
    assert_eq!(
        dig(ns, &["dns-version.cluster.local", "TXT"]),
        answer("NOERROR", &["\"1.1.0\""])
    );
    assert_eq!(
        dig(ns, &["prod.svc.cluster.local", "A"]),
        answer("NOERROR", &[])
    );
    assert_eq!(
        dig(ns, &["nons.svc.cluster.local", "A"]),
        answer("NXDOMAIN", &[])
    );
    // The deprecated pod record the specification still requires.
    assert_eq!(
        dig(ns, &["10-244-0-7.prod.pod.cluster.local", "A"]),
        answer("NOERROR", &["10.244.0.7"])
    );
    // Outside the cluster domain, with --dns-no-forward: refused.
    assert_eq!(dig(ns, &["example.com", "A"]).status, "REFUSED");
}

#[test]
fn a_name_follows_its_service_with_the_maps() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    let mut agent = dns_agent(&env, &["--dns-no-forward"]);
    let ns = client.netns();
    let name = "web.default.svc.cluster.local";
    let none = answer("NXDOMAIN", &[]);
    assert_eq!(dig_until(ns, &[name, "A"], &none, APPLY), none);
    let write = |ip: &str| {
        env.manifests
            .write("web.yaml", &service("web", ip).port(80, 8080).yaml());
    };
    for ip in ["10.96.0.20", "10.96.0.21"] {
        write(ip);
        // The name answers the new address once it is in the maps, and only then: DNS is
        // published in the same sync, after the map write.
        let got = dig_until(ns, &[name, "A"], &answer("NOERROR", &[ip]), APPLY);
        assert_eq!(got, answer("NOERROR", &[ip]));
        let frontends = agent.services().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            frontends.iter().any(|f| f.address == ip),
            "{ip} resolves before it is programmed: {frontends:?}"
        );
        assert_eq!(
            dig(ns, &["-x", ip]),
            answer("NOERROR", &["web.default.svc.cluster.local."])
        );
    }
    assert_eq!(
        dig(ns, &["-x", "10.96.0.20"]).status,
        "REFUSED",
        "old PTR gone"
    );
    env.manifests.remove("web.yaml");
    let got = dig_until(ns, &[name, "A"], &answer("NXDOMAIN", &[]), APPLY);
    assert_eq!(got, answer("NXDOMAIN", &[]));
    agent.wait_for_no_frontend("10.96.0.21:80", APPLY);
}

#[test]
fn headless_answers_follow_endpoint_readiness() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    let db = env.topo.add_pod("db-0");
    env.manifests.write(
        "db.yaml",
        &headless_service_yaml("db", "default", Some("db")),
    );
    let pod_yaml = |ready: bool| pod("db-0", db.ip()).label("app", "db").ready(ready).yaml();
    env.manifests.write("pod-db-0.yaml", &pod_yaml(true));
    let _agent = dns_agent(&env, &["--dns-no-forward"]);
    let ns = client.netns();
    let name = "db.default.svc.cluster.local";
    let ready = answer("NOERROR", &[&db.ip().to_string()]);
    assert_eq!(dig_until(ns, &[name, "A"], &ready, APPLY), ready);
    env.manifests.write("pod-db-0.yaml", &pod_yaml(false));
    let none = answer("NXDOMAIN", &[]);
    assert_eq!(dig_until(ns, &[name, "A"], &none, APPLY), none);
    env.manifests.write("pod-db-0.yaml", &pod_yaml(true));
    assert_eq!(dig_until(ns, &[name, "A"], &ready, APPLY), ready);
}

#[test]
fn a_large_headless_answer_falls_back_to_tcp() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    env.manifests
        .write("big.yaml", &headless_service_yaml("big", "default", None));
    let mut yaml = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: big-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: big\n    service.kubernetes.io/headless: \"\"\naddressType: IPv4\nports:\n  - {name: sql, port: 3306, protocol: TCP}\nendpoints:\n".to_owned();
    let mut ips = Vec::new();
    for i in 0..200u32 {
        let ip = format!("10.245.{}.{}", i / 250, i % 250 + 1);
        yaml.push_str(&format!(
            "  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}\n"
        ));
        ips.push(ip);
    }
    env.manifests.write("big-slice.yaml", &yaml);
    let _agent = dns_agent(&env, &["--dns-no-forward"]);
    let ns = client.netns();
    let deadline = Instant::now() + APPLY;
    let got = loop {
        let got = try_dig(ns, &["big.default.svc.cluster.local", "A"]);
        match got {
            Ok(got) if got.answers.len() == 200 || Instant::now() > deadline => break got,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut want: Vec<String> = ips;
    want.sort();
    assert_eq!(got.answers, want);
    assert!(
        got.retried_over_tcp,
        "the UDP answer was truncated: {got:?}"
    );
}

/// A pod's `/etc/netns/<netns>/resolv.conf`, as `ip netns exec` shows it to the pod;
/// removed on drop.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn new(netns: &str, namespace: &str) -> Self {
        Self::with_nameserver(netns, namespace, DNS_IP)
    }

    fn with_nameserver(netns: &str, namespace: &str, nameserver: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(netns);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("resolv.conf"),
            format!(
                "nameserver {nameserver}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
            ),
        )
        .unwrap();
        Self(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `ip netns exec NETNS sh -c SCRIPT` from inside `cgroup` (so the socket programs see it).
fn in_pod(env: &TestEnv, netns: &str, script: &str) -> Result<String, String> {
    let procs = env.cgroup.path().join("cgroup.procs");
    cmd::run(
        Command::new("sh").arg("-c").arg(format!(
            "echo $$ > {} && exec ip netns exec {netns} sh -c '{script}'",
            procs.display()
        )),
        Duration::from_secs(20),
    )
}

#[test]
fn glibc_resolves_service_names_through_the_search_path() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    let other = env.topo.add_pod("other");
    env.manifests.write(
        "svc.yaml",
        &service("web-app-service", "10.96.0.30")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = dns_agent(&env, &["--dns-no-forward"]);
    agent.wait_for_frontend("10.96.0.30:80", 1, APPLY);
    let _conf = ResolvConf::new(client.netns(), "default");
    let _conf2 = ResolvConf::new(other.netns(), "elsewhere");
    let hosts = in_pod(&env, client.netns(), "getent hosts web-app-service")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        hosts.starts_with("10.96.0.30")
            && hosts.contains("web-app-service.default.svc.cluster.local"),
        "{hosts}"
    );
    let body = in_pod(&env, client.netns(), "curl -s -m 5 http://web-app-service/")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(body.contains("webapp1"), "{body}");
    // From another namespace: the short name is not found, the qualified names are.
    assert!(in_pod(&env, other.netns(), "getent hosts web-app-service").is_err());
    let body = in_pod(
        &env,
        other.netns(),
        "curl -s -m 5 http://web-app-service.default.svc.cluster.local/",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(body.contains("webapp1"), "{body}");
    let body = in_pod(
        &env,
        other.netns(),
        "curl -s -m 5 http://web-app-service.default/",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(body.contains("webapp1"), "{body}");
}

#[test]
fn env_prints_the_kubelets_service_variables() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    env.manifests.write(
        "svc.yaml",
        &service("web-app-service", "10.96.0.40")
            .port_full(Some("http"), 80, 8080, "TCP")
            .yaml(),
    );
    env.manifests.write(
        "other.yaml",
        &service("elsewhere", "10.96.0.41")
            .namespace("prod")
            .port(81, 81)
            .yaml(),
    );
    let mut agent = dns_agent(&env, &["--dns-no-forward"]);
    agent.wait_for_frontend("10.96.0.40:80", 0, APPLY);
    agent.wait_for_frontend("10.96.0.41:81", 0, APPLY);
    let out = cmd::run(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", env.topo.node().name()))
            .arg(lb_tests::bins::agent())
            .args(["env", "--namespace", "default", "--api-addr"])
            .arg(API_ADDR.to_string()),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let want = "\
export WEB_APP_SERVICE_SERVICE_HOST='10.96.0.40'
export WEB_APP_SERVICE_SERVICE_PORT='80'
export WEB_APP_SERVICE_SERVICE_PORT_HTTP='80'
export WEB_APP_SERVICE_PORT='tcp://10.96.0.40:80'
export WEB_APP_SERVICE_PORT_80_TCP='tcp://10.96.0.40:80'
export WEB_APP_SERVICE_PORT_80_TCP_PROTO='tcp'
export WEB_APP_SERVICE_PORT_80_TCP_PORT='80'
export WEB_APP_SERVICE_PORT_80_TCP_ADDR='10.96.0.40'
";
    assert_eq!(out, want);
}

#[test]
fn bad_queries_never_stop_good_answers() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "web.yaml",
        &service("web", "10.96.0.50").port(80, 80).yaml(),
    );
    let mut agent = dns_agent(&env, &["--dns-no-forward"]);
    let ns = client.netns();
    let good = answer("NOERROR", &["10.96.0.50"]);
    let name = "web.default.svc.cluster.local";
    assert_eq!(dig_until(ns, &[name, "A"], &good, APPLY), good);
    // Garbage, a header promising a question that is not there, a name of 300 bytes
    // (labels past the 255-byte limit), each 200 times, over UDP and TCP.
    let header = r"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00";
    let label = format!("\\x3f{}", "a".repeat(63));
    let huge = format!("{header}{}\\x00\\x00\\x01\\x00\\x01", label.repeat(5));
    let script = format!(
        "for i in $(seq 200); do \
           head -c 64 /dev/urandom > /dev/udp/{DNS_IP}/53; \
           printf '{header}' > /dev/udp/{DNS_IP}/53; \
           printf '{huge}' > /dev/udp/{DNS_IP}/53; \
         done; \
         for i in $(seq 20); do head -c 300 /dev/urandom > /dev/tcp/{DNS_IP}/53; done; true"
    );
    cmd::run(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["bash", "-c", &script]),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // An ANY flood (bounded): answered, and the good name still is.
    let batch = env.manifests.work_dir().join("any.txt");
    fs::write(&batch, format!("{name} ANY\n").repeat(500)).unwrap();
    let any = cmd::run(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("dig")
            .arg(format!("@{DNS_IP}"))
            .args(["+tries=1", "+time=2", "+short", "-f"])
            .arg(&batch),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        any.lines().filter(|l| *l == "10.96.0.50").count(),
        500,
        "ANY answered"
    );
    assert_eq!(dig(ns, &[name, "A"]), good);
    assert_eq!(dig(ns, &[name, "A", "+tcp"]), good);
    agent.assert_running();
}

#[test]
fn pods_reach_dns_through_the_published_kube_dns_service() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let _web = env.add_backend("webapp1", "webapp", 8080);
    let client = env.topo.add_pod("client");
    env.manifests.write(
        "svc.yaml",
        &service("web-app-service", "10.96.0.30")
            .selector("app", "webapp")
            .port(80, 8080)
            .yaml(),
    );
    let mut agent = dns_agent(
        &env,
        &["--dns-no-forward", "--dns-service-ip", "10.96.0.100"],
    );
    agent.wait_for_frontend("10.96.0.30:80", 1, APPLY);
    // kube-system/kube-dns, port 53 over UDP and TCP, to the agent's listener.
    for protocol in ["UDP", "TCP"] {
        let frontend = agent.wait_for_frontend_proto("10.96.0.100:53", protocol, 1, APPLY);
        assert_eq!(frontend.backend_addrs(), [format!("{DNS_IP}:53")]);
    }
    let _conf = ResolvConf::with_nameserver(client.netns(), "default", "10.96.0.100");
    let hosts = in_pod(&env, client.netns(), "getent hosts web-app-service")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(hosts.starts_with("10.96.0.30"), "{hosts}");
    let body = in_pod(&env, client.netns(), "curl -s -m 5 http://web-app-service/")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(body.contains("webapp1"), "{body}");
    // The answer comes from the Service address (reverse translation), over TCP too.
    let udp = in_pod(
        &env,
        client.netns(),
        "dig @10.96.0.100 +short kube-dns.kube-system.svc.cluster.local",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(udp.trim(), "10.96.0.100");
    let tcp = in_pod(
        &env,
        client.netns(),
        "dig @10.96.0.100 +tcp +short web-app-service.default.svc.cluster.local",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tcp.trim(), "10.96.0.30");
}

#[test]
fn names_outside_the_domain_go_to_the_nodes_resolvers() {
    if !require_privileges() {
        return;
    }
    let env = TestEnv::new();
    let client = env.topo.add_pod("client");
    let node = env.topo.node().name().to_owned();
    // The node's resolver: dnsmasq on the node namespace's loopback, knowing one name.
    cmd::run(
        Command::new("ip").args(["-n", &node, "link", "set", "lo", "up"]),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let pid_file = env.manifests.work_dir().join("dnsmasq.pid");
    cmd::run(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .args([
                "dnsmasq",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.2",
                "--port=53",
                "--user=root",
                "--address=/upstream.test/10.1.2.3",
                // Names it answers NXDOMAIN for (relayed as such).
                "--address=/nothing.test/",
            ])
            .arg(format!("--pid-file={}", pid_file.display())),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let _dnsmasq = KillOnDrop(pid_file);
    let resolv = env.manifests.work_dir().join("node-resolv.conf");
    fs::write(&resolv, "nameserver 127.0.0.2\n").unwrap();
    env.manifests.write(
        "ext.yaml",
        &service("ext", "")
            .type_("ExternalName")
            .external_name("www.upstream.test")
            .yaml(),
    );
    let resolv = resolv.display().to_string();
    let _agent = dns_agent(&env, &["--dns-resolv-conf", &resolv]);
    let ns = client.netns();
    let want = answer("NOERROR", &["10.1.2.3"]);
    assert_eq!(
        dig_until(ns, &["www.upstream.test", "A"], &want, APPLY),
        want
    );
    assert_eq!(dig(ns, &["www.upstream.test", "A", "+tcp"]), want);
    assert_eq!(dig(ns, &["nothing.test", "A"]).status, "NXDOMAIN");
    // An ExternalName Service's target is resolved upstream too.
    assert_eq!(
        dig_until(
            ns,
            &["ext.default.svc.cluster.local", "A"],
            &answer("NOERROR", &["10.1.2.3", "www.upstream.test."]),
            APPLY
        ),
        answer("NOERROR", &["10.1.2.3", "www.upstream.test."])
    );
}

/// Kills the process whose pid the file holds, on drop.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(&self.0)
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}
