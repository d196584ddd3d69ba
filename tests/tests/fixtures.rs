//! The fixtures on their own, without the agent: the topology, the testkit and the guards.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lb_tests::{
    PinDir, TestCgroup, TestEnv, Topology, cgroup::cgroup2_root, cleanup_leftovers,
    require_privileges, testkit,
};

#[test]
fn pods_reach_each_other_by_pod_ip() {
    if !require_privileges() {
        return;
    }
    let topo = Topology::new();
    let web = topo.add_pod("web");
    let client = topo.add_pod("client");
    let _server = web.spawn_server("web", 8080);

    let summary = client
        .client_with()
        .count(5)
        .run(&format!("{}:8080", web.ip()));

    assert_eq!(summary.ok, 5, "{summary:?}");
    assert_eq!(summary.count("web"), 5, "{summary:?}");
    for addr in &summary.remote_addrs {
        let ip = addr.rsplit_once(':').unwrap().0;
        assert_eq!(ip, client.ip().to_string(), "{summary:?}");
    }
    assert_eq!(summary.attempts.len(), 5);
}

#[test]
fn client_reports_econnrefused_for_a_closed_port() {
    if !require_privileges() {
        return;
    }
    let topo = Topology::new();
    let web = topo.add_pod("web");
    let client = topo.add_pod("client");

    let summary = client
        .client_with()
        .count(3)
        .run(&format!("{}:8080", web.ip()));

    assert_eq!(summary.ok, 0, "{summary:?}");
    assert_eq!(summary.errors_of("ECONNREFUSED"), 3, "{summary:?}");
    assert_eq!(summary.connect_ms.len(), 3);
}

#[test]
fn an_untranslated_cluster_ip_goes_nowhere() {
    if !require_privileges() {
        return;
    }
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let client = topo.add_pod("client");

    // No agent: the pod's default route leads to the node namespace, which neither forwards nor
    // has a route for 10.96.0.0/12.
    let summary = client
        .client_with()
        .cgroup(&cgroup)
        .count(2)
        .timeout_ms(300)
        .run("10.96.0.10:80");

    assert_eq!(summary.ok, 0, "{summary:?}");
    assert_eq!(summary.errors_of("ECONNREFUSED"), 0, "{summary:?}");
}

#[test]
fn pods_reach_each_other_over_ipv6() {
    if !require_privileges() {
        return;
    }
    let topo = Topology::new();
    let web = topo.add_pod("web");
    let client = topo.add_pod("client");
    let _server = web.spawn_server6("web-v6", 8080);
    let target = format!("[{}]:8080", web.ip6());

    let summary = client.client_with().count(3).run(&target);

    assert_eq!(summary.ok, 3, "{summary:?}");
    assert_eq!(summary.count("web-v6"), 3, "{summary:?}");
    assert_eq!(
        summary.peers(),
        std::collections::BTreeSet::from([target.as_str()]),
        "getpeername() without the agent is the address dialled"
    );
    assert_eq!(
        summary.remote_ips(),
        std::collections::BTreeSet::from([std::net::IpAddr::from(client.ip6())])
    );
}

#[test]
fn udp_client_reports_the_answer_source_and_the_server_name() {
    if !require_privileges() {
        return;
    }
    let topo = Topology::new();
    let dns = topo.add_pod("dns");
    let client = topo.add_pod("client");
    let _s4 = dns.spawn_udp_server("dns", 5353);
    let _s6 = dns.spawn_udp_server6("dns-v6", 5353);
    let v4 = format!("{}:5353", dns.ip());
    let v6 = format!("[{}]:5353", dns.ip6());
    let mapped = format!("[::ffff:{}]:5353", dns.ip());

    let unconnected = client.client_with().udp().count(2).sends(3).run(&v4);
    let connected = client.client_with().connected().count(2).run(&v6);
    let from_v6_socket = client.client_with().udp().count(1).run(&mapped);

    assert_eq!(unconnected.ok, 6, "{unconnected:?}");
    assert_eq!(unconnected.host_names(), ["dns"]);
    assert_eq!(
        unconnected.peers(),
        std::collections::BTreeSet::from([v4.as_str()])
    );
    assert_eq!(unconnected.hosts_by_socket().len(), 2, "{unconnected:?}");
    assert_eq!(connected.ok, 2, "{connected:?}");
    assert_eq!(connected.host_names(), ["dns-v6"]);
    assert_eq!(
        connected.peers(),
        std::collections::BTreeSet::from([v6.as_str()])
    );
    assert_eq!(from_v6_socket.host_names(), ["dns"], "{from_v6_socket:?}");
    assert_eq!(
        from_v6_socket.peers(),
        std::collections::BTreeSet::from([mapped.as_str()])
    );
    // A closed UDP port answers with ICMP port unreachable: the answer never comes.
    let closed = client
        .client_with()
        .udp()
        .timeout_ms(300)
        .run(&format!("{}:5354", dns.ip()));
    assert_eq!(closed.ok, 0, "{closed:?}");
    assert_eq!(closed.total(), 1, "{closed:?}");
}

#[test]
fn an_untranslated_ipv6_cluster_ip_goes_nowhere() {
    if !require_privileges() {
        return;
    }
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let client = topo.add_pod("client");

    let tcp = client
        .client_with()
        .cgroup(&cgroup)
        .count(2)
        .timeout_ms(300)
        .run("[fd00:96::10]:80");
    let udp = client
        .client_with()
        .cgroup(&cgroup)
        .udp()
        .count(2)
        .timeout_ms(300)
        .run("[fd00:96::10]:53");

    for summary in [&tcp, &udp] {
        assert_eq!(summary.ok, 0, "{summary:?}");
        assert_eq!(summary.errors_of("ECONNREFUSED"), 0, "{summary:?}");
    }
}

#[test]
fn client_runs_inside_the_test_cgroup() {
    if !require_privileges() {
        return;
    }
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let web = topo.add_pod("web");
    let _server = web.spawn_server("web", 80);

    // A client that lives a little while: `count` connections with a pause.
    let mut child = Command::new(lb_tests::bins::testkit())
        .arg("--cgroup")
        .arg(cgroup.path())
        .args(["--netns", web.netns(), "client", "--target"])
        .arg(format!("{}:80", web.ip()))
        .args(["--count", "20", "--interval-ms", "50"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut seen = false;
    for _ in 0..50 {
        if cgroup.pids().contains(&pid) {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait().unwrap();
    assert!(
        seen,
        "pid {pid} never showed up in {}",
        cgroup.path().display()
    );
}

#[test]
fn udp_server_answers_with_its_name_and_the_peer() {
    if !require_privileges() {
        return;
    }
    let topo = Topology::new();
    let dns = topo.add_pod("dns");
    let client = topo.add_pod("client");
    let _server = dns.spawn_udp_server("dns", 5353);

    let netns = client.netns().to_owned();
    let target = format!("{}:5353", dns.ip());
    let answer = std::thread::spawn(move || {
        // setns affects only this thread.
        testkit::enter_netns(&netns).unwrap();
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.send_to(b"hi", &target).unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        (
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            socket.local_addr().unwrap().port(),
        )
    })
    .join()
    .unwrap();

    assert_eq!(
        answer.0,
        format!("dns {}:{}", client.ip(), answer.1),
        "UDP answer"
    );
}

#[test]
fn guards_remove_everything_on_drop() {
    if !require_privileges() {
        return;
    }
    let (netns, cgroup, pins, work): (Vec<PathBuf>, PathBuf, PathBuf, PathBuf);
    {
        let env = TestEnv::new();
        let pod = env.topo.add_pod("web");
        let _server = pod.spawn_server("web", 80);
        env.manifests.write("a.yaml", "kind: Nothing\n");
        netns = vec![
            env.topo.node().path(),
            PathBuf::from("/run/netns").join(pod.netns()),
        ];
        cgroup = env.cgroup.path().to_path_buf();
        pins = env.pins.path().to_path_buf();
        work = env.manifests.work_dir().to_path_buf();
        for path in netns.iter().chain([&cgroup, &pins, &work]) {
            assert!(path.exists(), "{} was not created", path.display());
        }
    }
    for path in netns.iter().chain([&cgroup, &pins, &work]) {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    if !require_privileges() {
        return;
    }
    let made = std::panic::catch_unwind(|| {
        let env = TestEnv::new();
        let _pod = env.topo.add_pod("web");
        let paths = vec![
            env.topo.node().path(),
            env.cgroup.path().to_path_buf(),
            env.pins.path().to_path_buf(),
            env.manifests.work_dir().to_path_buf(),
        ];
        std::panic::panic_any(paths);
    })
    .unwrap_err();
    let paths = made.downcast::<Vec<PathBuf>>().unwrap();
    for path in paths.iter() {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

#[test]
fn leftovers_of_dead_processes_are_removed() {
    if !require_privileges() {
        return;
    }
    // A pid that was alive a moment ago and is not any more.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let name = format!("lbt{dead}-0");

    let cgroup = cgroup2_root().unwrap().join(&name);
    let pins = Path::new(lb_tests::bpffs::BPFFS).join(&name);
    let tmp = std::env::temp_dir().join(&name);
    {
        // A test starting in parallel sweeps leftovers too: under the lock it cannot find
        // these half made (it removed the netns between `ip netns add`'s steps once).
        let _lock = lb_tests::names::global_lock();
        lb_tests::cmd::ip(&["netns", "add", &name]);
        std::fs::create_dir(&cgroup).unwrap();
        std::fs::create_dir(&pins).unwrap();
        std::fs::create_dir_all(tmp.join("manifests")).unwrap();
    }
    // Our own objects must survive: our pid is alive.
    let own_cgroup = TestCgroup::new();
    let own_pins = PinDir::new();

    cleanup_leftovers();

    assert!(!Path::new("/run/netns").join(&name).exists());
    assert!(!cgroup.exists());
    assert!(!pins.exists());
    assert!(!tmp.exists());
    assert!(own_cgroup.path().exists());
    assert!(own_pins.path().exists());
}
