//! `lb-agent`: command-line wiring only; the work is in the library modules.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_agent::{
    agent, capabilities, conntrack, inspect, loader, mounts, ownership, summary, telemetry,
};

/// Node agent of an eBPF Kubernetes service load balancer (a kube-proxy replacement).
///
/// It attaches socket programs that translate a Service's virtual address to a ready
/// backend at connect() time, and keeps their BPF maps in step with the cluster's
/// Services, EndpointSlices and Pods.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Log format on stderr (the level comes from RUST_LOG, default info).
    #[arg(
        long,
        global = true,
        env = "LB_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing `run`'s flags would only obscure the clap derive"
)]
enum Command {
    /// Load and attach the datapath, then program it from the manifests until stopped.
    ///
    /// On exit the programs stay attached and the maps pinned, so Services keep working;
    /// the next `run` adopts them and applies what changed meanwhile.
    Run {
        /// Directory of Kubernetes YAML (*.yaml, *.yml; multi-document; v1 Services, Pods
        /// and Nodes, discovery.k8s.io/v1 EndpointSlices; other kinds are ignored), watched
        /// for changes. Without it, the agent watches the API server.
        #[arg(
            long,
            env = "LB_MANIFESTS",
            value_name = "DIR",
            conflicts_with = "kubeconfig"
        )]
        manifests: Option<PathBuf>,
        /// Largest manifest file read, in bytes: a larger file is reported (naming it) and
        /// not read, its last readable version staying in effect.
        #[arg(
            long,
            env = "LB_MANIFEST_MAX_FILE_SIZE",
            value_name = "BYTES",
            default_value_t = lb_agent::source::manifests::DEFAULT_MAX_FILE_SIZE,
            requires = "manifests"
        )]
        manifest_max_file_size: u64,
        /// kubeconfig for the API server [default: KUBECONFIG, ~/.kube/config, then the
        /// in-cluster service account].
        #[arg(long, value_name = "PATH")]
        kubeconfig: Option<PathBuf>,
        /// Name of this node (the DaemonSet passes it from the downward API), for the
        /// node-local traffic policies; its Node object (watched by name, or in --manifests)
        /// gives the node's zone and whether /healthz drains it.
        #[arg(long, env = "NODE_NAME", value_name = "NAME")]
        node_name: Option<String>,
        /// cgroup v2 directory whose processes get Service translation
        /// [default: the root of the cgroup2 mount, from /proc/self/mountinfo].
        #[arg(long, env = "LB_CGROUP", value_name = "PATH")]
        cgroup: Option<PathBuf>,
        /// External devices (comma-separated) whose ingress and egress get the tc datapath
        /// for NodePorts, external and LoadBalancer IPs from outside the node, and whose
        /// addresses (IPv4 and IPv6), followed as they change, are the node addresses a NodePort answers on
        /// [default: the devices of the default route and those holding a global address,
        /// except bridges].
        #[arg(
            long,
            env = "LB_DEVICES",
            value_name = "DEV,...",
            value_delimiter = ','
        )]
        devices: Vec<String>,
        /// Where connect-time translation runs: `all` sockets in --cgroup; `host-only`
        /// sockets of the host's network namespace, pods getting per-packet translation at
        /// tc on their devices (so a service mesh's sidecar sees the ClusterIP); `off` no
        /// socket translation, pods per packet, the node's own processes none.
        #[arg(long, env = "LB_SOCKET_LB", value_enum, default_value_t)]
        socket_lb: loader::SocketLb,
        /// Translate NodePort, external-IP and LoadBalancer-IP packets from outside at XDP
        /// on the --devices, before the kernel builds a socket buffer for them (same
        /// conntrack, SNAT and policies as tc; SNATed packets and rejects are finished at
        /// tc): `native` driver-mode XDP on every device, failing on a device that cannot
        /// take it; `best-effort` native where supported, tc only elsewhere (logged);
        /// `off` tc only.
        #[arg(
            long,
            env = "LB_NODEPORT_ACCELERATION",
            value_enum,
            default_value_t,
            value_name = "MODE"
        )]
        nodeport_acceleration: loader::NodePortAcceleration,
        /// Send the packets tc translates (pods' per-packet path, NodePorts and external IPs
        /// from outside) straight to their next hop with a FIB lookup, skipping the node's
        /// input and forward paths (Cilium's eBPF host routing). Faster, but netfilter's
        /// FORWARD chain, and so a CNI's iptables NetworkPolicy there, no longer sees them.
        #[arg(long, env = "LB_BPF_HOST_ROUTING")]
        bpf_host_routing: bool,
        /// Pod-facing devices (comma-separated) that get the per-packet path when
        /// --socket-lb is `host-only` or `off` [default: every veth without a global address
        /// that is not one of the --devices, followed as pods come and go].
        #[arg(
            long,
            env = "LB_POD_DEVICES",
            value_name = "DEV,...",
            value_delimiter = ','
        )]
        pod_devices: Vec<String>,
        /// Node addresses NodePorts answer on (comma-separated): `primary`, the addresses
        /// of the --devices (kube-proxy's `primary` is the Node's primary IPs; the devices
        /// are how this node is reached from outside), or CIDRs: every address of the node
        /// inside them, loopback excepted (a family without a CIDR: all of that family).
        #[arg(
            long,
            env = "LB_NODEPORT_ADDRESSES",
            value_name = "primary|CIDR,...",
            value_delimiter = ',',
            default_value = "primary"
        )]
        nodeport_addresses: Vec<ownership::NodePortAddress>,
        /// CIDRs (comma-separated) a Service's spec.externalIPs must be inside to be
        /// taken; the others are reported on their Service and not programmed
        /// [default: all].
        #[arg(
            long,
            env = "LB_EXTERNAL_IP_CIDRS",
            value_name = "CIDR,...",
            value_delimiter = ','
        )]
        external_ip_cidrs: Vec<ownership::Cidr>,
        /// Address of kube-proxy's node health server: /healthz (503 when a change has
        /// waited unsynced for over 60 s, or when this node's Node is being deleted or
        /// tainted ToBeDeletedByClusterAutoscaler) and /livez (the same without the
        /// node's eligibility). An unspecified IP (0.0.0.0 or [::]) listens on both
        /// IPv4 and IPv6; empty disables it.
        #[arg(
            long,
            env = "LB_HEALTHZ_BIND_ADDRESS",
            value_name = "IP:PORT",
            default_value = "0.0.0.0:10256"
        )]
        healthz_bind_address: BindAddress,
        /// Address of the Prometheus metrics server (`/metrics`), kube-proxy's default:
        /// kube-proxy's `kubeproxy_sync_proxy_rules_*` and
        /// `kubeproxy_network_programming_duration_seconds`, and lb's `lb_*` (map fill,
        /// rejected objects, watch restarts and relists). An unspecified IP listens on IPv4
        /// and IPv6; empty disables it.
        #[arg(
            long,
            env = "LB_METRICS_BIND_ADDRESS",
            value_name = "IP:PORT",
            default_value = "127.0.0.1:10249"
        )]
        metrics_bind_address: BindAddress,
        /// Seconds the API watch may keep failing before /readyz (on --api-addr) answers
        /// 503: the maps may then miss changes. Ready again once the watch works.
        /// Failing map writes make it 503 at once.
        #[arg(
            long,
            env = "LB_READYZ_STALE_AFTER",
            value_name = "SECONDS",
            default_value_t = lb_agent::readiness::DEFAULT_STALE_AFTER.as_secs()
        )]
        readyz_stale_after: u64,
        #[command(flatten)]
        pins: PinArgs,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        dns: DnsArgs,
        #[command(flatten)]
        sizes: MapSizeArgs,
    },
    /// Print the environment variables the kubelet gives a pod of a namespace about its
    /// Services ({SVC}_SERVICE_HOST, _SERVICE_PORT, _SERVICE_PORT_<NAME> and the
    /// Docker-link _PORT_… set), as `export` lines, from a running agent's state.
    Env {
        /// The pod's namespace.
        #[arg(long, short, default_value = "default")]
        namespace: String,
        /// The running agent's --api-addr.
        #[arg(long, env = "LB_API_ADDR", value_name = "IP:PORT")]
        api_addr: std::net::SocketAddr,
    },
    /// List every frontend and its backends, read from the pinned maps (no agent needed).
    Services {
        #[command(flatten)]
        pins: PinArgs,
        /// Show each map's entries, capacity and kernel memory instead of the frontends.
        #[arg(long)]
        summary: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: inspect::OutputFormat,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the flows the tc datapath tracks (client, frontend,
    /// backend, SNAT, age, idle time, TCP state), read from the pinned conntrack maps;
    /// entries past their lifetime, which the datapath would drop, are left out.
    Conntrack {
        #[command(flatten)]
        pins: PinArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: inspect::OutputFormat,
    },
    /// Explain what the datapath does for a frontend and a client, and why.
    ///
    /// Each entry for ADDR:PORT/PROTO (a NodePort on a node address too): the clients it
    /// serves, the outcome (a backend at random, affinity, refused without endpoints,
    /// dropped by a Local policy or source ranges), the entry as the pinned maps hold it,
    /// the policies that applied, each backend with state, node and zone, and the objects
    /// that produced it (Service and EndpointSlices with resourceVersions) with when it
    /// was written. Needs the agent's --api-addr.
    Explain {
        /// The frontend: ADDR:PORT[/TCP|/UDP] ([ADDR]:PORT for IPv6; TCP by default).
        #[arg(value_name = "ADDR:PORT[/PROTO]")]
        target: lb_agent::explain::Target,
        /// The client's address (for loadBalancerSourceRanges).
        #[arg(long, value_name = "CLIENT")]
        from: Option<std::net::IpAddr>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: inspect::OutputFormat,
        #[command(flatten)]
        pins: PinArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stream the datapath's translation decisions as they happen, until interrupted.
    ///
    /// One line per decision: when, the client (at a socket hook its network namespace —
    /// its addresses, or `node` — cgroup id, process id and name; at tc the packet's
    /// source), the frontend it dialled and its Service, and the outcome: the backend
    /// chosen and why (slot k of n at random, by the socket's hash for unconnected UDP,
    /// kept by session affinity; local endpoints only under a Local traffic policy), or
    /// refused (no endpoints), dropped (no endpoint on this node) or firewalled. Covers
    /// connect() and sendmsg() at the socket hooks and the first packet of each flow at tc.
    ///
    /// The datapath describes decisions only while a monitor runs: it turns the switch on
    /// and renews it every second; on exit (also on Ctrl-C or SIGTERM) it turns it off, and
    /// if killed, the switch goes off by itself within 3 s. Off, it costs the datapath one
    /// array lookup per decision. One monitor at a time. Reads the pinned maps; Service
    /// names need --api-addr.
    Monitor {
        #[command(flatten)]
        pins: PinArgs,
        /// Only decisions for this Service's frontends: NAMESPACE/NAME (NAME alone: in
        /// `default`); repeatable. Needs --api-addr.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        service: Vec<String>,
        /// Only decisions for clients with an address in this range: an IP or a CIDR;
        /// repeatable. At tc the packet's source; at a socket hook an address of the
        /// client's network namespace.
        #[arg(long, value_name = "IP|CIDR")]
        client: Vec<String>,
        /// Stop after this many decisions.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Output format (json: one object per line).
        #[arg(long, short, value_enum, default_value_t)]
        output: inspect::OutputFormat,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print the seccomp profile the DaemonSet gives the agent: the container runtimes'
    /// default profile (containers-common's) with bpf(2) allowed without CAP_SYS_ADMIN.
    ///
    /// The DaemonSet's init container writes it where the kubelet looks for `Localhost`
    /// profiles (/var/lib/kubelet/seccomp/lb-agent.json); docs/deploy.md.
    SeccompProfile,
    /// Detach the programs and remove the maps the agent pinned under --bpf-pin-path.
    ///
    /// Only the names the agent pins are removed (anything else there is left, and
    /// listed); the directory goes when that empties it. Stop the agent first: Services
    /// are no longer translated afterwards.
    Cleanup {
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// Address of the agent's HTTP API: `run` serves /healthz, /readyz, /v1/frontends and
    /// /v1/explain there; `services` asks it for Service and port names and endpoint
    /// sources, `explain` for its explanation. Unset: no API (and `services` shows only
    /// what the maps hold).
    #[arg(long, env = "LB_API_ADDR", value_name = "IP:PORT")]
    api_addr: Option<std::net::SocketAddr>,
}

/// Cluster DNS, answered from the same state as the maps.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Cluster DNS")]
struct DnsArgs {
    /// Where to serve cluster DNS (UDP and TCP), following the Kubernetes DNS
    /// specification for the Services lb knows; `off` (or empty) for none
    /// [default: 127.0.0.1:53 with --manifests (skipped with a warning when taken), off
    /// when watching the API server, where CoreDNS serves it].
    #[arg(long, env = "LB_DNS_ADDR", value_name = "IP:PORT|off")]
    dns_addr: Option<DnsAddr>,
    /// The cluster domain: Services are `<svc>.<ns>.svc.<domain>`.
    #[arg(
        long,
        env = "LB_CLUSTER_DOMAIN",
        value_name = "DOMAIN",
        default_value = "cluster.local"
    )]
    cluster_domain: String,
    /// TTL of cluster DNS records, in seconds (short: a Service's name follows its
    /// changes within it).
    #[arg(long, env = "LB_DNS_TTL", value_name = "SECONDS", default_value_t = 5)]
    dns_ttl: u32,
    /// Resolvers for names outside the cluster domain: their `nameserver` lines; with
    /// --dns-no-forward such names are refused.
    #[arg(
        long,
        env = "LB_DNS_RESOLV_CONF",
        value_name = "PATH",
        default_value = "/etc/resolv.conf"
    )]
    dns_resolv_conf: PathBuf,
    /// Refuse names outside the cluster domain instead of forwarding them.
    #[arg(long, env = "LB_DNS_NO_FORWARD")]
    dns_no_forward: bool,
    /// Publish cluster DNS as the Service kube-system/kube-dns with this ClusterIP (port
    /// 53, UDP and TCP), its endpoint the --dns-addr listener (which must be an address
    /// pods reach), so a pod's `nameserver 10.96.0.10` is translated to it like any
    /// Service.
    #[arg(long, env = "LB_DNS_SERVICE_IP", value_name = "IP")]
    dns_service_ip: Option<std::net::IpAddr>,
}

/// `IP:PORT`, or `off`/empty for none.
#[derive(Clone, Copy, Debug)]
struct DnsAddr(Option<std::net::SocketAddr>);

impl std::str::FromStr for DnsAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "off" => Ok(Self(None)),
            addr => addr.parse().map(|addr| Self(Some(addr))),
        }
    }
}

impl DnsArgs {
    /// What `run` serves: `manifests` says which source's default applies.
    fn run_config(&self, manifests: bool) -> anyhow::Result<Option<agent::DnsRun>> {
        let (addr, explicit) = match self.dns_addr {
            Some(DnsAddr(None)) => return Ok(None),
            Some(DnsAddr(Some(addr))) => (addr, true),
            None if manifests => ((std::net::Ipv4Addr::LOCALHOST, 53).into(), false),
            None => return Ok(None),
        };
        let domain = self.cluster_domain.trim_matches('.').to_ascii_lowercase();
        anyhow::ensure!(
            !domain.is_empty() && hickory_proto::rr::Name::from_ascii(format!("{domain}.")).is_ok(),
            "--cluster-domain {:?} is not a domain name",
            self.cluster_domain
        );
        let upstreams = if self.dns_no_forward {
            Vec::new()
        } else {
            match lb_agent::dns::forward::upstreams(&self.dns_resolv_conf, Some(addr)) {
                Ok(upstreams) => upstreams,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        path = %self.dns_resolv_conf.display(),
                        "no resolvers for names outside the cluster domain: they are refused"
                    );
                    Vec::new()
                }
            }
        };
        Ok(Some(agent::DnsRun {
            config: lb_agent::dns::server::DnsConfig {
                addr,
                zone: lb_agent::dns::answer::Zone {
                    domain,
                    ttl: self.dns_ttl,
                },
                upstreams,
            },
            explicit,
            service_ip: self.dns_service_ip,
        }))
    }
}

/// `IP:PORT`, or empty for none.
#[derive(Clone, Copy, Debug)]
struct BindAddress(Option<std::net::SocketAddr>);

impl std::str::FromStr for BindAddress {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" => Ok(Self(None)),
            addr => addr.parse().map(|addr| Self(Some(addr))),
        }
    }
}

/// The capacities of the maps that grow with the cluster. The defaults fit 100,000 Services
/// × 10 endpoints in one family. Memory is the kernel's, charged to the agent's memory
/// cgroup: each hash map takes 16 B per entry of capacity (rounded up to a power of two) up
/// front, and about 90 B more per entry written; arrays and conntrack are allocated whole.
/// At the defaults, empty: 2 × 4 MiB (services maps), 28 MiB (slots), 2 × 16 MiB
/// (backends), 137 MiB (conntrack), 34 MiB (the fixed reverse-NAT, peers, affinity and
/// other maps): 239 MiB in all; `lb-agent services --summary` shows each map's fill and
/// memory. Changing a capacity needs `lb-agent cleanup`
/// first (pinned maps keep the size they were created with).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Map capacities")]
struct MapSizeArgs {
    /// Frontends per family (a Service's address, port and protocol; two for an
    /// externalTrafficPolicy: Local frontend): one master entry each in the services map of
    /// its family. Its memory, charged to the agent's cgroup: 16 B per entry of capacity,
    /// rounded up to a power of two, up front (4 MiB at the default), and about 90 B per
    /// entry written. All maps at the defaults take 239 MiB empty; `lb-agent services
    /// --summary` shows each map's fill and memory.
    #[arg(long, env = "LB_MAX_FRONTENDS", value_name = "N",
          default_value_t = lb_common::MapCapacities::DEFAULT.frontends,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_frontends: u32,
    /// Backend slots, both families together: one per endpoint of each frontend (a Service
    /// with a ClusterIP and a NodePort and 10 endpoints takes 20), each frontend's in one
    /// range of the slots array. A change of a frontend's endpoints writes a new range
    /// before the old one is freed (after the sync), so keep room for the endpoints that
    /// change in one sync, at least the largest Service's. 16 B per slot, allocated up
    /// front (28 MiB at the default).
    #[arg(long, env = "LB_MAX_BACKEND_SLOTS", value_name = "N",
          default_value_t = lb_common::MapCapacities::DEFAULT.backend_slots,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_backend_slots: u32,
    /// Backend ids, both families together: each distinct backend (endpoint address, port
    /// and protocol) takes one, and id 0 none, so N-1 backends fit. Each family's backends
    /// map is an array indexed by id, allocated up front: 8 B per id for IPv4 and 24 B for
    /// IPv6 (32 MiB together at the default).
    #[arg(long, env = "LB_MAX_BACKENDS", value_name = "N",
          default_value_t = lb_common::MapCapacities::DEFAULT.backends,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_backends: u32,
    /// Conntrack entries of established TCP flows of the tc datapath, two per flow (a flow
    /// is established once its client completed the handshake, so a SYN flood never
    /// evicts one); the least recently used go first when it is full. About 170 B each,
    /// allocated up front: 85 MiB at the default (Cilium's bpf-ct-global-tcp-max).
    #[arg(long, env = "LB_MAX_CONNTRACK", value_name = "N",
          default_value_t = lb_common::MapCapacities::DEFAULT.conntrack,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_conntrack: u32,
    /// Conntrack entries of UDP flows, two per flow; 43 MiB at the default (Cilium's
    /// bpf-ct-global-any-max).
    #[arg(long, env = "LB_MAX_CONNTRACK_OTHER", value_name = "N",
          default_value_t = lb_common::MapCapacities::DEFAULT.conntrack_other,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_conntrack_other: u32,
    /// Conntrack entries of TCP flows in their handshake (half-open) or closed (for their
    /// last 10 s), two per flow: what a SYN flood fills; each lives 10 s idle. 11 MiB at the
    /// default.
    #[arg(long, env = "LB_MAX_CONNTRACK_HALF_OPEN", value_name = "N",
          default_value_t = lb_common::MapCapacities::DEFAULT.conntrack_half_open,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_conntrack_half_open: u32,
}

impl MapSizeArgs {
    const fn capacities(&self) -> lb_common::MapCapacities {
        lb_common::MapCapacities {
            frontends: self.max_frontends,
            backend_slots: self.max_backend_slots,
            backends: self.max_backends,
            conntrack: self.max_conntrack,
            conntrack_other: self.max_conntrack_other,
            conntrack_half_open: self.max_conntrack_half_open,
        }
    }
}

#[derive(Debug, clap::Args)]
struct PinArgs {
    /// Directory in a bpf filesystem for the pinned maps and links (bpffs is mounted at
    /// /sys/fs/bpf if needed).
    #[arg(
        long,
        env = "LB_BPF_PIN_PATH",
        value_name = "DIR",
        default_value = "/sys/fs/bpf/lb"
    )]
    bpf_pin_path: PathBuf,
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The allocator's options set before its own start-up reads them (an ELF constructor with a
/// priority runs before the unprioritised one mimalloc starts from, and before `main`, whose
/// runtime has already allocated by then).
#[used]
#[unsafe(link_section = ".init_array.00100")]
static CONFIGURE_ALLOCATOR: extern "C" fn() = {
    extern "C" fn configure() {
        lb_agent::allocator::configure();
    }
    configure
};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    // Built with `--features failpoints`: the map writer's failpoints as `FAILPOINTS` sets
    // them (`writer::phase=10%return`), for fault-injection runs.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    match cli.command {
        Command::Run {
            manifests,
            manifest_max_file_size,
            kubeconfig,
            node_name,
            cgroup,
            devices,
            socket_lb,
            nodeport_acceleration,
            bpf_host_routing,
            pod_devices,
            nodeport_addresses,
            external_ip_cidrs,
            healthz_bind_address,
            metrics_bind_address,
            readyz_stale_after,
            sizes,
            pins,
            api,
            dns,
        } => {
            let dns = dns.run_config(manifests.is_some())?;
            let nodeport_addresses =
                ownership::NodePortAddresses::from_elements(&nodeport_addresses)
                    .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?;
            let cgroup = match cgroup {
                Some(path) => path,
                None => mounts::cgroup2_root().context("finding the cgroup2 mount for --cgroup")?,
            };
            let source = match manifests {
                Some(dir) => agent::SourceConfig::Manifests {
                    dir,
                    max_file_size: manifest_max_file_size,
                },
                None => agent::SourceConfig::Kube { kubeconfig },
            };
            let config = agent::RunConfig {
                source,
                node_name,
                cgroup,
                pin_dir: pins.bpf_pin_path,
                api_addr: api.api_addr,
                healthz_addr: healthz_bind_address.0,
                metrics_addr: metrics_bind_address.0,
                readyz_stale_after: std::time::Duration::from_secs(readyz_stale_after),
                devices,
                socket_lb,
                nodeport_acceleration,
                bpf_host_routing,
                pod_devices,
                nodeport_addresses,
                external_ip_cidrs: ownership::ExternalIpCidrs(external_ip_cidrs),
                capacities: sizes.capacities(),
                dns,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .on_thread_park(lb_agent::allocator::on_worker_park)
                .enable_all()
                .build()?;
            // A step the kernel refused for lack of a capability says which one.
            let result = runtime
                .block_on(agent::run(config))
                .map_err(capabilities::explain);
            // Exit promptly on SIGTERM even if a watch or a client connection is mid-flight:
            // everything that matters (pinned maps and links) is already in the kernel.
            runtime.shutdown_timeout(std::time::Duration::from_millis(500));
            result
        }
        Command::Services {
            pins,
            summary: true,
            output,
            ..
        } => {
            print!("{}", summary::summary(&pins.bpf_pin_path, output)?);
            Ok(())
        }
        Command::Services {
            pins, output, api, ..
        } => {
            print!(
                "{}",
                inspect::services(&pins.bpf_pin_path, output, api.api_addr)?
            );
            Ok(())
        }
        Command::Explain {
            target,
            from,
            output,
            pins,
            api,
        } => {
            print!(
                "{}",
                inspect::explain(&pins.bpf_pin_path, api.api_addr, target, from, output)?
            );
            Ok(())
        }
        Command::Env {
            namespace,
            api_addr,
        } => {
            print!("{}", lb_agent::api::fetch_env(api_addr, &namespace)?);
            Ok(())
        }
        Command::Monitor {
            pins,
            service,
            client,
            count,
            output,
            api,
        } => {
            let clients = client
                .iter()
                .map(|c| {
                    c.parse::<ipnet::IpNet>()
                        .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| anyhow::anyhow!("--client {c:?} is not an IP or a CIDR"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let services = service
                .iter()
                .map(|s| {
                    if s.contains('/') {
                        s.clone()
                    } else {
                        format!("default/{s}")
                    }
                })
                .collect();
            let options = lb_agent::monitor::Options {
                pin_dir: pins.bpf_pin_path,
                api: api.api_addr,
                services,
                clients,
                output,
                count,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(lb_agent::monitor::run(
                options,
                &mut std::io::stdout().lock(),
            ))
        }
        Command::Conntrack { pins, output } => {
            print!("{}", conntrack::list(&pins.bpf_pin_path, output)?);
            Ok(())
        }
        Command::SeccompProfile => {
            print!("{}", lb_agent::SECCOMP_PROFILE);
            Ok(())
        }
        Command::Cleanup { pins } => {
            let report = loader::cleanup(&pins.bpf_pin_path)
                .with_context(|| format!("cleaning up {}", pins.bpf_pin_path.display()))?;
            println!(
                "detached {} program link(s), removed {} map(s) from {}",
                report.links_detached.len(),
                report.maps_removed.len(),
                pins.bpf_pin_path.display()
            );
            for path in &report.left {
                println!("left {} (not a name lb-agent pins)", path.display());
            }
            Ok(())
        }
    }
}
