//! One simulated node: a node namespace with a bridge, and pods as namespaces on it.
//!
//! ```text
//!   pod netns "…-webapp1"        node netns "…-node"            pod netns "…-client"
//!   eth0 10.244.0.2/16  ── veth0 ─┐                   ┌─ veth1 ── eth0 10.244.0.3/16
//!        fd00:244::2/64           br0 10.244.0.1/16                 fd00:244::3/64
//!   default via 10.244.0.1            fd00:244::1/64            default via 10.244.0.1
//!   default via fd00:244::1                                     default via fd00:244::1
//! ```
//! Every pod is dual-stack (IPv6 addresses with `nodad`, usable at once). The node namespace has
//! no interface that leaves the machine and forwards neither family, and no namespace has a route
//! for the ClusterIP ranges (10.96.0.0/12, fd00:96::/112) or any other address: an untranslated
//! connect to a ClusterIP, external IP or LoadBalancer IP fails.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::set_die_with_parent;
use crate::testkit::ClientSummary;
use crate::{TestCgroup, bins, cmd, names, netns::Netns};

/// The bridge address in the node namespace, every pod's default gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The bridge's IPv6 address, every pod's IPv6 default gateway.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
/// How long a server may take to bind.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A node namespace with bridge `br0` (10.244.0.1/16, fd00:244::1/64) and the pods added to it.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    // Dropped after the pods (fields drop in order): pods first, then the node with the bridge.
    pods: Mutex<Vec<Netns>>,
    node: Netns,
}

impl Topology {
    #[track_caller]
    pub fn new() -> Self {
        let prefix = names::unique();
        let node = Netns::create(&format!("{prefix}-node"));
        // Without multicast snooping: a fresh bridge would hold back the node's IPv6
        // neighbour solicitations to a pod until it has seen the pod's MLD reports.
        node.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        node.ip(&["addr", "add", &format!("{GATEWAY}/16"), "dev", "br0"]);
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{GATEWAY6}/64"),
            "dev",
            "br0",
            "nodad",
        ]);
        node.ip(&["link", "set", "br0", "up"]);
        // A Kubernetes node routes between its pods (and, with the per-packet path, a pod's
        // packets to a ClusterIP are routed to the backend after translation).
        sysctl(node.name(), "net.ipv4.ip_forward=1");
        sysctl(node.name(), "net.ipv6.conf.all.forwarding=1");
        Self {
            prefix,
            pods: Mutex::new(Vec::new()),
            node,
        }
    }

    /// The node namespace (the agent runs here).
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// A pod namespace `<prefix>-<name>` on the bridge with the next free 10.244.0.x/16 address
    /// (from .2) and fd00:244::x/64 (the same x), default routes via the bridge's addresses.
    #[track_caller]
    pub fn add_pod(&self, name: &str) -> Pod {
        let mut pods = self.pods.lock().expect("pods lock");
        let index = pods.len();
        let host = u8::try_from(index + 2)
            .ok()
            .filter(|h| *h < 255)
            .expect("at most 253 pods");
        let ip = Ipv4Addr::new(10, 244, 0, host);
        let ip6 = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, u16::from(host));
        let netns = Netns::create(&format!("{}-{name}", self.prefix));
        // Inside the namespaces the names need no prefix: nothing lands in the host namespace.
        let veth = format!("veth{index}");
        self.node.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ]);
        self.node.ip(&["link", "set", &veth, "master", "br0", "up"]);
        netns.ip(&["addr", "add", &format!("{ip}/16"), "dev", "eth0"]);
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&["route", "add", "default", "via", &GATEWAY.to_string()]);
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &GATEWAY6.to_string(),
        ]);
        let pod = Pod {
            name: name.to_owned(),
            netns: netns.name().to_owned(),
            ip,
            ip6,
        };
        pods.push(netns);
        pod
    }
}

/// The node's address on its external device, where NodePorts answer.
pub const NODE_EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
/// The external client's address.
pub const EXTERNAL_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
/// The node's IPv6 address on its external device.
pub const NODE_EXT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1);
/// The external client's IPv6 address.
pub const EXTERNAL_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 2);
/// The node's external device (inside the node namespace).
pub const EXT_DEVICE: &str = "ext0";

impl Topology {
    /// An external client: a namespace `<prefix>-<name>` joined by a veth to the node's
    /// external device `ext0` (192.168.50.1/24 and fd00:50::1/64 in the node, .2 and ::2 in
    /// the client, default routes via the node, so external and LoadBalancer IPs are routed
    /// to it too). The node forwards both families, as a Kubernetes node does.
    #[track_caller]
    pub fn add_external_client(&self, name: &str) -> Pod {
        let mut pods = self.pods.lock().expect("pods lock");
        let netns = Netns::create(&format!("{}-{name}", self.prefix));
        self.node.ip(&[
            "link",
            "add",
            EXT_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ]);
        self.node.ip(&[
            "addr",
            "add",
            &format!("{NODE_EXT_IP}/24"),
            "dev",
            EXT_DEVICE,
        ]);
        // No duplicate address detection: the addresses are usable at once.
        self.node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE_EXT_IP6}/64"),
            "dev",
            EXT_DEVICE,
            "nodad",
        ]);
        self.node.ip(&["link", "set", EXT_DEVICE, "up"]);
        netns.ip(&[
            "addr",
            "add",
            &format!("{EXTERNAL_CLIENT_IP}/24"),
            "dev",
            "eth0",
        ]);
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{EXTERNAL_CLIENT_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&["route", "add", "default", "via", &NODE_EXT_IP.to_string()]);
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &NODE_EXT_IP6.to_string(),
        ]);
        sysctl(self.node.name(), "net.ipv4.ip_forward=1");
        sysctl(self.node.name(), "net.ipv6.conf.all.forwarding=1");
        let pod = Pod {
            name: name.to_owned(),
            netns: netns.name().to_owned(),
            ip: EXTERNAL_CLIENT_IP,
            ip6: EXTERNAL_CLIENT_IP6,
        };
        pods.push(netns);
        pod
    }
}

/// The second node's pod network (not inside this node's 10.244.0.0/16).
pub const REMOTE_POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 245, 0, 1);
/// This node's address on the link to the second node.
pub const NODE_PEER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 51, 1);
/// The second node's address.
pub const REMOTE_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 51, 2);
/// This node's device towards the second node.
pub const PEER_DEVICE: &str = "ext1";
/// This node's IPv6 address towards the second node.
pub const NODE_PEER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x51, 0, 0, 0, 0, 0, 1);
/// The second node's IPv6 address.
pub const REMOTE_NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x51, 0, 0, 0, 0, 0, 2);

impl Topology {
    /// A second node (no agent runs there) with one pod `name` at 10.245.0.2/24 and
    /// fd00:245::2/64 behind its own bridge, joined to this node by `ext1` (192.168.51.1/24
    /// and fd00:51::1/64 here, .2 and ::2 there); each node routes the other's networks
    /// through that link and forwards.
    #[track_caller]
    pub fn add_remote_node_with_pod(&self, name: &str) -> Pod {
        let mut pods = self.pods.lock().expect("pods lock");
        let node2 = Netns::create(&format!("{}-node2", self.prefix));
        let pod = Netns::create(&format!("{}-{name}", self.prefix));
        self.node.ip(&[
            "link",
            "add",
            PEER_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            node2.name(),
        ]);
        self.node.ip(&[
            "addr",
            "add",
            &format!("{NODE_PEER_IP}/24"),
            "dev",
            PEER_DEVICE,
        ]);
        self.node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE_PEER_IP6}/64"),
            "dev",
            PEER_DEVICE,
        ]);
        self.node.ip(&["link", "set", PEER_DEVICE, "up"]);
        self.node.ip(&[
            "route",
            "add",
            "10.245.0.0/24",
            "via",
            &REMOTE_NODE_IP.to_string(),
        ]);
        self.node.ip(&[
            "-6",
            "route",
            "add",
            "fd00:245::/64",
            "via",
            &REMOTE_NODE_IP6.to_string(),
        ]);
        sysctl(self.node.name(), "net.ipv4.ip_forward=1");
        node2.ip(&[
            "addr",
            "add",
            &format!("{REMOTE_NODE_IP}/24"),
            "dev",
            "eth0",
        ]);
        node2.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{REMOTE_NODE_IP6}/64"),
            "dev",
            "eth0",
        ]);
        node2.ip(&["link", "set", "eth0", "up"]);
        node2.ip(&["route", "add", "default", "via", &NODE_PEER_IP.to_string()]);
        node2.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &NODE_PEER_IP6.to_string(),
        ]);
        node2.ip(&["link", "add", "br0", "type", "bridge"]);
        node2.ip(&[
            "addr",
            "add",
            &format!("{REMOTE_POD_GATEWAY}/24"),
            "dev",
            "br0",
        ]);
        node2.ip(&["-6", "addr", "add", "fd00:245::1/64", "dev", "br0"]);
        node2.ip(&["link", "set", "br0", "up"]);
        sysctl(node2.name(), "net.ipv4.ip_forward=1");
        sysctl(node2.name(), "net.ipv6.conf.all.forwarding=1");
        node2.ip(&[
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ]);
        node2.ip(&["link", "set", "veth0", "master", "br0", "up"]);
        let ip = Ipv4Addr::new(10, 245, 0, 2);
        pod.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        let ip6 = Ipv6Addr::new(0xfd00, 0x245, 0, 0, 0, 0, 0, 2);
        pod.ip(&["-6", "addr", "add", &format!("{ip6}/64"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&[
            "route",
            "add",
            "default",
            "via",
            &REMOTE_POD_GATEWAY.to_string(),
        ]);
        pod.ip(&["-6", "route", "add", "default", "via", "fd00:245::1"]);
        let remote = Pod {
            name: name.to_owned(),
            netns: pod.name().to_owned(),
            ip,
            ip6,
        };
        pods.push(pod);
        pods.push(node2);
        remote
    }
}

/// `sysctl -w` inside a namespace (`/proc/sys/net` is per network namespace).
#[track_caller]
pub fn sysctl(netns: &str, setting: &str) {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns, "sysctl", "-qw", setting]);
    cmd::run(&mut command, cmd::PLUMBING_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// A pod: a network namespace with an IPv4 and an IPv6 address. Processes are started in it with
/// `lb-testkit`.
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace name (`/run/netns/NAME`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's IPv6 address, fd00:244::x.
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// An HTTP backend on `<pod ip>:port` answering as `name`; killed on drop.
    #[track_caller]
    pub fn spawn_server(&self, name: &str, port: u16) -> Server {
        Server::spawn(self, name, (self.ip, port).into(), false)
    }

    /// A UDP backend on `<pod ip>:port` answering `name <peer>`; killed on drop.
    #[track_caller]
    pub fn spawn_udp_server(&self, name: &str, port: u16) -> Server {
        Server::spawn(self, name, (self.ip, port).into(), true)
    }

    /// An HTTP backend on `[<pod ipv6>]:port` (IPv6 only) answering as `name`; killed on drop.
    #[track_caller]
    pub fn spawn_server6(&self, name: &str, port: u16) -> Server {
        Server::spawn(self, name, (self.ip6, port).into(), false)
    }

    /// A UDP backend on `[<pod ipv6>]:port` (IPv6 only) answering `name <peer>`; killed on drop.
    #[track_caller]
    pub fn spawn_udp_server6(&self, name: &str, port: u16) -> Server {
        Server::spawn(self, name, (self.ip6, port).into(), true)
    }

    /// Whether `ip` is one of the pod's addresses (an IPv4-mapped IPv6 address counts as its
    /// IPv4 address).
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => v4 == self.ip,
            IpAddr::V6(v6) => v6 == self.ip6,
        }
    }

    /// `count` exchanges over unconnected UDP sockets (`sendto`/`recvfrom`), one each, from
    /// inside `cgroup`.
    #[track_caller]
    pub fn udp_client(&self, cgroup: &TestCgroup, target: &str, count: u32) -> ClientSummary {
        Client::new(self)
            .cgroup(cgroup)
            .udp()
            .count(count)
            .run(target)
    }

    /// `count` HTTP requests to `target` from this pod, from inside `cgroup` (as every process of
    /// a real node is inside the cgroup the agent attached to).
    #[track_caller]
    pub fn client(&self, cgroup: &TestCgroup, target: &str, count: u32) -> ClientSummary {
        Client::new(self).cgroup(cgroup).count(count).run(target)
    }

    /// A client with more options (timeouts, no cgroup).
    pub fn client_with(&self) -> Client<'_> {
        Client::new(self)
    }
}

/// Options of one `lb-testkit client` run in a pod.
#[derive(Debug, Clone)]
pub struct Client<'a> {
    pod: &'a Pod,
    cgroup: Option<&'a Path>,
    count: u32,
    timeout_ms: u64,
    interval_ms: u64,
    udp: bool,
    connected: bool,
    sends: u32,
}

impl<'a> Client<'a> {
    fn new(pod: &'a Pod) -> Self {
        Self {
            pod,
            cgroup: None,
            count: 1,
            timeout_ms: 1000,
            interval_ms: 0,
            udp: false,
            connected: false,
            sends: 1,
        }
    }

    /// UDP (`lb-testkit client --udp`): `count` sockets, unconnected unless
    /// [`Client::connected`].
    pub fn udp(mut self) -> Self {
        self.udp = true;
        self
    }

    /// UDP sockets `connect()` to the target (implies [`Client::udp`]).
    pub fn connected(mut self) -> Self {
        self.udp = true;
        self.connected = true;
        self
    }

    /// Datagrams exchanged per UDP socket (implies [`Client::udp`]).
    pub fn sends(mut self, sends: u32) -> Self {
        self.udp = true;
        self.sends = sends;
        self
    }

    /// Run inside this cgroup (without it, the client stays in the test's own cgroup).
    pub fn cgroup(mut self, cgroup: &'a TestCgroup) -> Self {
        self.cgroup = Some(cgroup.path());
        self
    }

    pub fn count(mut self, count: u32) -> Self {
        self.count = count;
        self
    }

    /// Connect and request timeout of each connection.
    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = timeout_ms;
        self
    }

    /// Pause between two connections (UDP: between two datagrams, of one socket or not).
    pub fn interval_ms(mut self, interval_ms: u64) -> Self {
        self.interval_ms = interval_ms;
        self
    }

    /// Runs the client against `target` (`ip:port`, `[ipv6]:port`) and parses its summary.
    #[track_caller]
    pub fn run(&self, target: &str) -> ClientSummary {
        let mut command = Command::new(bins::testkit());
        if let Some(cgroup) = self.cgroup {
            command.arg("--cgroup").arg(cgroup);
        }
        command
            .args(["--netns", &self.pod.netns, "client", "--target", target])
            .args(["--count", &self.count.to_string()])
            .args(["--timeout-ms", &self.timeout_ms.to_string()])
            .args(["--interval-ms", &self.interval_ms.to_string()]);
        if self.udp {
            command.args(["--udp", "--sends", &self.sends.to_string()]);
        }
        if self.connected {
            command.arg("--connected");
        }
        set_die_with_parent(&mut command);
        // Each exchange may take its connect (or send) timeout plus its answer timeout.
        let bound = Duration::from_millis(
            u64::from(self.count)
                * u64::from(self.sends.max(1))
                * (2 * self.timeout_ms + self.interval_ms)
                + 10_000,
        );
        let line = cmd::describe(&command);
        let stdout = cmd::run(&mut command, bound).unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{line}: cannot parse summary ({e}): {stdout}"))
    }
}

/// A backend process in a pod; killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    name: String,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    #[track_caller]
    fn spawn(pod: &Pod, name: &str, listen: SocketAddr, udp: bool) -> Self {
        Self::spawn_in(&pod.netns, name, listen, udp)
    }

    /// An HTTP backend on `listen` in the namespace `netns` (a node's, for a host-network
    /// pod) answering as `name`; killed on drop.
    #[track_caller]
    pub fn spawn_in(netns: &str, name: &str, listen: SocketAddr, udp: bool) -> Self {
        let addr = listen.to_string();
        let bin = bins::testkit();
        bins::require(&bin, "cargo build -p lb-tests, or set LB_TESTKIT_BIN");
        let mut command = Command::new(&bin);
        command
            .args(["--netns", netns, "serve", "--listen", &addr, "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if udp {
            command.arg("--udp");
        }
        set_die_with_parent(&mut command);
        let line = cmd::describe(&command);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{line}: cannot start: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        drain(
            child.stderr.take().expect("piped stderr"),
            Arc::clone(&stderr),
        );
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let ready = lines.next().and_then(Result::ok);
            let _ = tx.send(ready);
            // Keep reading so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let mut server = Self {
            child,
            name: name.to_owned(),
            addr,
            stderr,
        };
        match rx.recv_timeout(SERVER_READY_TIMEOUT) {
            Ok(Some(line)) if line.trim() == "listening" => server,
            other => {
                server.kill();
                // Give the stderr reader a moment to collect the reason.
                let deadline = Instant::now() + Duration::from_millis(200);
                while Instant::now() < deadline
                    && server.stderr.lock().map(|s| s.is_empty()).unwrap_or(false)
                {
                    thread::sleep(Duration::from_millis(10));
                }
                panic!(
                    "{line}: did not report listening ({other:?}); stderr: {}",
                    server.stderr.lock().map(|s| s.clone()).unwrap_or_default()
                );
            }
        }
    }

    /// The name the server answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip:port` (`[ipv6]:port`) it listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops the server now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Collects a pipe into `buf` (bounded) on a thread.
fn drain(mut pipe: impl Read + Send + 'static, buf: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut buf) = buf.lock()
                && buf.len() < 64 * 1024
            {
                buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        }
    });
}
