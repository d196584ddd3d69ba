//! The same Services as kube-proxy would program them, in its two netfilter layouts, as the
//! text its syncs hand to `iptables-restore` and `nft -f` (kubernetes `pkg/proxy/iptables` and
//! `pkg/proxy/nftables`, ClusterIP Services with the Cluster traffic policy):
//!
//! - iptables: `KUBE-SERVICES` (one rule per Service port, jumped to from nat `OUTPUT` and
//!   `PREROUTING`) → `KUBE-SVC-<hash>` (masquerade mark for off-cluster sources, then one
//!   `-m statistic --mode random --probability 1/(n-i)` rule per endpoint) → `KUBE-SEP-<hash>`
//!   (hairpin mark, DNAT); the filter table's `KUBE-*` hooks with `--ctstate NEW`. Above 1000
//!   endpoints kube-proxy's large-cluster mode leaves the per-endpoint comments out. Every
//!   restore uses `--noflush`, as kube-proxy's do; the endpoint change is its partial sync: the
//!   top-level chains in full, the changed Service's chains, `-X` of the stale one.
//! - nftables: table `ip kube-proxy` with the `services` chain's
//!   `ip daddr . meta l4proto . th dport vmap @service-ips`, one `service-*` chain per Service
//!   port with `numgen random mod N vmap`, one `endpoint-*` chain per endpoint with `dnat`, the
//!   `cluster-ips` set and the filter hooks; a full load is one transaction, the endpoint change
//!   one small transaction (new endpoint chain, flushed and refilled service chain, old
//!   endpoint chain flushed and deleted).
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::net::Ipv4Addr;

use super::scenario::{CLUSTER_CIDR, NAMESPACE, Port, SERVICE_CIDR, Scenario};

/// kube-proxy drops the per-endpoint comments above this many endpoints in all.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;
const MASQ_MARK: &str = "0x4000";

/// Which iptables binary writes the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IptablesBackend {
    Legacy,
    Nft,
}

impl IptablesBackend {
    /// `iptables-legacy-restore` or `iptables-nft-restore`.
    pub fn restore_bin(self) -> &'static str {
        match self {
            Self::Legacy => "iptables-legacy-restore",
            Self::Nft => "iptables-nft-restore",
        }
    }
}

/// `ns/name:port`, kube-proxy's `ServicePortName.String()`.
fn port_name(index: usize, port: &Port) -> String {
    format!("{NAMESPACE}/{}:{}", Scenario::name(index), port.name)
}

/// Base32 (RFC 4648 alphabet) of a 128-bit hash of `input`, cut to `len` characters: the shape
/// of kube-proxy's chain name hashes (it uses SHA-256; any stable hash does here).
fn hash_name(input: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bits: u128 = 0;
    for salt in 0u8..2 {
        let mut hasher = DefaultHasher::new();
        salt.hash(&mut hasher);
        input.hash(&mut hasher);
        bits = (bits << 64) | u128::from(hasher.finish());
    }
    (0..len.min(25))
        .map(|i| char::from(ALPHABET[usize::try_from((bits >> (5 * i)) & 31).unwrap_or(0)]))
        .collect()
}

fn svc_chain(index: usize, port: &Port) -> String {
    let name = port_name(index, port);
    format!(
        "KUBE-SVC-{}",
        hash_name(&format!("{name}{}", port.proto.lower()), 16)
    )
}

fn sep_chain(index: usize, port: &Port, endpoint: Ipv4Addr) -> String {
    let name = port_name(index, port);
    let input = format!("{name}{}{endpoint}:{}", port.proto.lower(), port.target);
    format!("KUBE-SEP-{}", hash_name(&input, 16))
}

/// The filter table as every sync writes it (no Service here lacks endpoints, so its
/// `KUBE-SERVICES` stays empty), and with `hooks` the jumps from the built-in chains that
/// kube-proxy ensures before its first restore.
fn iptables_filter(out: &mut String, hooks: bool) {
    out.push_str("*filter\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    if hooks {
        let new = "-m conntrack --ctstate NEW";
        for chain in ["INPUT", "FORWARD", "OUTPUT"] {
            let _ = writeln!(
                out,
                "-A {chain} {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"
            );
        }
        let _ = writeln!(
            out,
            "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS"
        );
        for chain in ["INPUT", "FORWARD"] {
            let _ = writeln!(
                out,
                "-A {chain} {new} -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"
            );
        }
        for chain in ["FORWARD", "OUTPUT"] {
            let _ = writeln!(
                out,
                "-A {chain} {new} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            );
        }
        let _ = writeln!(
            out,
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"
        );
    }
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    out.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    out.push_str("COMMIT\n");
}

/// The nat table's chain and rule lines of one Service port's `KUBE-SVC` and `KUBE-SEP` chains.
fn iptables_service_chains(
    chains: &mut String,
    rules: &mut String,
    index: usize,
    port: &Port,
    endpoints: &[Ipv4Addr],
    large: bool,
) {
    let name = port_name(index, port);
    let proto = port.proto.lower();
    let svc = svc_chain(index, port);
    let ip = Scenario::cluster_ip(index);
    let _ = writeln!(chains, ":{svc} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {ip} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        port.port
    );
    let n = endpoints.len();
    for (i, &endpoint) in endpoints.iter().enumerate() {
        let sep = sep_chain(index, port, endpoint);
        let _ = write!(rules, "-A {svc}");
        if !large {
            let _ = write!(
                rules,
                " -m comment --comment \"{name} -> {endpoint}:{}\"",
                port.target
            );
        }
        if i + 1 < n {
            #[expect(clippy::cast_precision_loss, reason = "a handful of endpoints")]
            let probability = 1.0 / (n - i) as f64;
            let _ = write!(
                rules,
                " -m statistic --mode random --probability {probability:.10}"
            );
        }
        let _ = writeln!(rules, " -j {sep}");
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        let _ = writeln!(
            rules,
            "-A {sep}{comment} -s {endpoint}/32 -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            rules,
            "-A {sep}{comment} -m {proto} -p {proto} -j DNAT --to-destination {endpoint}:{}",
            port.target
        );
    }
}

/// The nat table's top-level chains (declared, hence flushed, in every sync) and rules before
/// the Services.
fn iptables_nat_head(chains: &mut String, rules: &mut String, hooks: bool) {
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    if hooks {
        for chain in ["PREROUTING", "OUTPUT"] {
            let _ = writeln!(
                rules,
                "-A {chain} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            );
        }
        rules.push_str(
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        );
    }
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    rules.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
}

fn kube_services_rule(rules: &mut String, index: usize, port: &Port) {
    let proto = port.proto.lower();
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {proto} -p {proto} -d {} --dport {} -j {}",
        port_name(index, port),
        Scenario::cluster_ip(index),
        port.port,
        svc_chain(index, port)
    );
}

const NODEPORTS_RULE: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

fn large(scenario: &Scenario) -> bool {
    scenario.services * scenario.endpoints > LARGE_CLUSTER_ENDPOINTS
}

/// The first sync: every Service, for `iptables-restore --noflush` into empty tables.
pub fn iptables_full(scenario: &Scenario) -> String {
    let large = large(scenario);
    let mut out = String::with_capacity(scenario.services * (300 + 400 * scenario.endpoints));
    iptables_filter(&mut out, true);
    let mut chains = String::new();
    let mut rules = String::new();
    iptables_nat_head(&mut chains, &mut rules, true);
    let mut service_rules = String::new();
    for index in 0..scenario.services {
        let endpoints = scenario.endpoints(index);
        for port in scenario.ports(index) {
            kube_services_rule(&mut rules, index, port);
            iptables_service_chains(
                &mut chains,
                &mut service_rules,
                index,
                port,
                &endpoints,
                large,
            );
        }
    }
    rules.push_str(NODEPORTS_RULE);
    out.push_str("*nat\n");
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str(&service_rules);
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's partial sync after change number `version` of the changed Service's endpoints
/// (for `iptables-restore --noflush`).
pub fn iptables_change(scenario: &Scenario, version: u32) -> String {
    let large = large(scenario);
    let changed = scenario.changed();
    let mut out = String::with_capacity(scenario.services * 200);
    iptables_filter(&mut out, false);
    let mut chains = String::new();
    let mut rules = String::new();
    iptables_nat_head(&mut chains, &mut rules, false);
    for index in 0..scenario.services {
        for port in scenario.ports(index) {
            kube_services_rule(&mut rules, index, port);
        }
    }
    rules.push_str(NODEPORTS_RULE);
    let before = scenario.changed_endpoints(version.saturating_sub(1));
    let after = scenario.changed_endpoints(version);
    let mut stale = String::new();
    for port in scenario.ports(changed) {
        iptables_service_chains(&mut chains, &mut rules, changed, port, &after, large);
        // A stale chain is declared (so flushed) and then deleted, as kube-proxy does.
        for gone in before.iter().filter(|ip| !after.contains(ip)) {
            let chain = sep_chain(changed, port, *gone);
            let _ = writeln!(chains, ":{chain} - [0:0]");
            let _ = writeln!(stale, "-X {chain}");
        }
    }
    out.push_str("*nat\n");
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str(&stale);
    out.push_str("COMMIT\n");
    out
}

const NFT_TABLE: &str = "ip kube-proxy";

/// `<hash8>-ns/name/proto/port`, kube-proxy's `servicePortChainNameBase`.
fn nft_base(index: usize, port: &Port) -> String {
    let base = format!(
        "{NAMESPACE}/{}/{}/{}",
        Scenario::name(index),
        port.proto.lower(),
        port.name
    );
    format!("{}-{base}", hash_name(&base, 8))
}

fn nft_service_chain(index: usize, port: &Port) -> String {
    format!("service-{}", nft_base(index, port))
}

fn nft_endpoint_chain(index: usize, port: &Port, endpoint: Ipv4Addr) -> String {
    let base = nft_base(index, port);
    format!("endpoint-{base}__{endpoint}/{}", port.target)
}

/// The table, sets, maps, base chains and their rules of every kube-proxy nftables sync.
fn nft_base_rules(out: &mut String) {
    let t = NFT_TABLE;
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    let _ = writeln!(
        out,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    for (map, key, comment) in [
        (
            "firewall-ips",
            "ipv4_addr . inet_proto . inet_service",
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
        (
            "no-endpoint-nodeports",
            "inet_proto . inet_service",
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        (
            "no-endpoint-services",
            "ipv4_addr . inet_proto . inet_service",
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            "service-ips",
            "ipv4_addr . inet_proto . inet_service",
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        (
            "service-nodeports",
            "inet_proto . inet_service",
            "NodePort traffic",
        ),
    ] {
        let _ = writeln!(
            out,
            "add map {t} {map} {{ type {key} : verdict ; comment \"{comment}\" ; }}"
        );
    }
    for chain in [
        "cluster-ips-check",
        "filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }",
        "filter-output-pre-dnat { type filter hook output priority -110 ; }",
        "filter-forward { type filter hook forward priority 0 ; }",
        "filter-input { type filter hook input priority 0 ; }",
        "filter-output { type filter hook output priority 0 ; }",
        "firewall-check",
        "mark-for-masquerade",
        "masquerading",
        "nat-output { type nat hook output priority -100 ; }",
        "nat-postrouting { type nat hook postrouting priority 100 ; }",
        "nat-prerouting { type nat hook prerouting priority -100 ; }",
        "nodeport-endpoints-check",
        "reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
        "services",
        "service-endpoints-check",
    ] {
        let _ = writeln!(out, "add chain {t} {chain}");
    }
    for rule in [
        "cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"".to_owned(),
        format!("cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""),
        "filter-prerouting-pre-dnat ct state new jump firewall-check".to_owned(),
        "filter-forward ct state new jump service-endpoints-check".to_owned(),
        "filter-forward ct state new jump cluster-ips-check".to_owned(),
        "filter-input ct state new jump nodeport-endpoints-check".to_owned(),
        "filter-input ct state new jump service-endpoints-check".to_owned(),
        "filter-output ct state new jump service-endpoints-check".to_owned(),
        "filter-output-pre-dnat ct state new jump firewall-check".to_owned(),
        "filter-output ct state new jump cluster-ips-check".to_owned(),
        "firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips".to_owned(),
        format!("mark-for-masquerade mark set mark or {MASQ_MARK}"),
        format!("masquerading mark and {MASQ_MARK} == 0 return"),
        format!("masquerading mark set mark xor {MASQ_MARK}"),
        "masquerading masquerade fully-random".to_owned(),
        "nat-output jump services".to_owned(),
        "nat-postrouting jump masquerading".to_owned(),
        "nat-prerouting jump services".to_owned(),
        "nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports".to_owned(),
        "reject-chain reject".to_owned(),
        "services ip daddr . meta l4proto . th dport vmap @service-ips".to_owned(),
        "services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".to_owned(),
        "service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services".to_owned(),
    ] {
        let _ = writeln!(out, "add rule {t} {rule}");
    }
}

/// The rules of one Service port's service chain (created with `add chain` unless `flush`,
/// in which case it is flushed first).
fn nft_service_rules(
    out: &mut String,
    index: usize,
    port: &Port,
    endpoints: &[Ipv4Addr],
    flush: bool,
) {
    let t = NFT_TABLE;
    let chain = nft_service_chain(index, port);
    let verb = if flush { "flush" } else { "add" };
    let _ = writeln!(out, "{verb} chain {t} {chain}");
    let _ = writeln!(
        out,
        "add rule {t} {chain} ip daddr {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        Scenario::cluster_ip(index)
    );
    let targets: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, &ep)| format!("{i} : goto {}", nft_endpoint_chain(index, port, ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
        endpoints.len(),
        targets.join(" , ")
    );
}

fn nft_endpoint_rules(out: &mut String, index: usize, port: &Port, endpoint: Ipv4Addr) {
    let t = NFT_TABLE;
    let chain = nft_endpoint_chain(index, port, endpoint);
    let _ = writeln!(out, "add chain {t} {chain}");
    let _ = writeln!(
        out,
        "add rule {t} {chain} ip saddr {endpoint} jump mark-for-masquerade"
    );
    let _ = writeln!(
        out,
        "add rule {t} {chain} meta l4proto {} dnat to {endpoint}:{}",
        port.proto.lower(),
        port.target
    );
}

/// The first sync: every Service, one `nft -f` transaction into an empty namespace.
pub fn nft_full(scenario: &Scenario) -> String {
    let mut out = String::with_capacity(scenario.services * (500 + 300 * scenario.endpoints));
    nft_base_rules(&mut out);
    let t = NFT_TABLE;
    for index in 0..scenario.services {
        let endpoints = scenario.endpoints(index);
        let ip = Scenario::cluster_ip(index);
        for port in scenario.ports(index) {
            // Endpoint chains first: a vmap may only name chains that exist.
            for &endpoint in &endpoints {
                nft_endpoint_rules(&mut out, index, port, endpoint);
            }
            nft_service_rules(&mut out, index, port, &endpoints, false);
            let _ = writeln!(
                out,
                "add element {t} service-ips {{ {ip} . {} . {} : goto {} }}",
                port.proto.lower(),
                port.port,
                nft_service_chain(index, port)
            );
        }
        let _ = writeln!(out, "add element {t} cluster-ips {{ {ip} }}");
    }
    out
}

/// The transaction for change number `version` of the changed Service's endpoints.
pub fn nft_change(scenario: &Scenario, version: u32) -> String {
    let t = NFT_TABLE;
    let index = scenario.changed();
    let before = scenario.changed_endpoints(version.saturating_sub(1));
    let after = scenario.changed_endpoints(version);
    let mut out = String::new();
    for port in scenario.ports(index) {
        for &added in after.iter().filter(|ip| !before.contains(ip)) {
            nft_endpoint_rules(&mut out, index, port, added);
        }
        nft_service_rules(&mut out, index, port, &after, true);
        for &gone in before.iter().filter(|ip| !after.contains(ip)) {
            let chain = nft_endpoint_chain(index, port, gone);
            let _ = writeln!(out, "flush chain {t} {chain}");
            let _ = writeln!(out, "delete chain {t} {chain}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::scenario::Proto;
    use super::*;

    fn has_udp(scenario: &Scenario) -> bool {
        scenario
            .ports(scenario.measured())
            .iter()
            .any(|p| p.proto == Proto::Udp)
    }

    fn scenario(services: usize, endpoints: usize) -> Scenario {
        let backends: Vec<Ipv4Addr> = (1..=10).map(|h| Ipv4Addr::new(10, 244, 1, h)).collect();
        Scenario::new(services, endpoints, &backends)
    }

    #[test]
    fn names_have_kube_proxys_shape_and_differ() {
        let s = scenario(3, 2);
        let port = &s.ports(0)[0];
        let a = svc_chain(0, port);
        assert!(a.starts_with("KUBE-SVC-") && a.len() == 25, "{a}");
        assert_ne!(a, svc_chain(1, port));
        assert_eq!(a, svc_chain(0, port), "stable");
        let ep = nft_endpoint_chain(0, port, Ipv4Addr::new(10, 224, 0, 1));
        assert!(
            ep.starts_with("endpoint-")
                && ep.ends_with("-bench/svc-000000/tcp/http__10.224.0.1/8080"),
            "{ep}"
        );
    }

    #[test]
    fn iptables_walks_services_in_order_with_the_measured_one_last() {
        let s = scenario(3, 3);
        let text = iptables_full(&s);
        let services: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        // Three TCP ports, the measured Service's UDP port, then the NodePort rule.
        assert_eq!(services.len(), 5, "{services:#?}");
        assert!(services[0].contains("-d 10.96.0.10 --dport 80"));
        assert!(services[2].contains("-d 10.96.0.12 --dport 80"));
        assert!(services[3].contains("-p udp -d 10.96.0.12 --dport 53"));
        assert!(services[4].contains("KUBE-NODEPORTS"));
        assert!(text.contains(
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        let svc = svc_chain(2, &s.ports(2)[0]);
        let picks: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc} ")) && l.contains("KUBE-SEP"))
            .collect();
        assert_eq!(picks.len(), 3);
        assert!(picks[0].contains("--probability 0.3333333333"));
        assert!(picks[1].contains("--probability 0.5000000000"));
        assert!(!picks[2].contains("statistic"));
        assert!(text.contains("-j DNAT --to-destination 10.244.1.3:8080"));
        assert!(text.contains("-m udp -p udp -j DNAT --to-destination 10.244.1.1:5353"));
        assert_eq!(text.matches("COMMIT").count(), 2);
    }

    #[test]
    fn large_clusters_lose_the_per_endpoint_comments() {
        let small = iptables_full(&scenario(10, 10));
        let large = iptables_full(&scenario(101, 10));
        assert!(small.contains(" -> 10.224."));
        assert!(!large.contains(" -> 10.224."));
        assert!(
            large.contains("cluster IP\""),
            "KUBE-SERVICES keeps its comments"
        );
    }

    #[test]
    fn the_iptables_change_rewrites_top_level_chains_and_one_service() {
        let s = scenario(50, 2);
        let text = iptables_change(&s, 1);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES"))
                .count(),
            52,
            "50 + UDP + NodePorts"
        );
        let svc0 = svc_chain(0, &s.ports(0)[0]);
        assert!(text.contains(&format!(":{svc0} - [0:0]")));
        let svc1 = svc_chain(1, &s.ports(1)[0]);
        assert!(
            !text.contains(&format!(":{svc1} - [0:0]")),
            "unchanged Services are skipped"
        );
        let old = sep_chain(0, &s.ports(0)[0], s.changed_endpoints(0)[0]);
        let new = sep_chain(0, &s.ports(0)[0], s.changed_endpoints(1)[0]);
        assert!(text.contains(&format!("-X {old}")));
        assert!(text.contains(&format!(":{new} - [0:0]")));
        assert!(!text.contains("-A OUTPUT"), "the hooks stay as they are");
    }

    #[test]
    fn nft_has_one_map_element_and_one_chain_per_service_port() {
        let s = scenario(4, 2);
        assert!(has_udp(&s));
        let text = nft_full(&s);
        assert_eq!(
            text.matches("add element ip kube-proxy service-ips")
                .count(),
            5
        );
        assert_eq!(
            text.matches("add element ip kube-proxy cluster-ips")
                .count(),
            4
        );
        assert!(text.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(text.contains("meta l4proto udp dnat to 10.244.1.2:5353"));
        assert!(text.contains("add rule ip kube-proxy nat-output jump services"));
    }

    #[test]
    fn the_nft_change_swaps_one_endpoint_chain() {
        let s = scenario(4, 2);
        let text = nft_change(&s, 2);
        let old = s.changed_endpoints(1)[0];
        let new = s.changed_endpoints(2)[0];
        assert!(text.contains(&format!(
            "add chain ip kube-proxy {}",
            nft_endpoint_chain(0, &s.ports(0)[0], new)
        )));
        assert!(text.contains(&format!(
            "delete chain ip kube-proxy {}",
            nft_endpoint_chain(0, &s.ports(0)[0], old)
        )));
        assert!(text.contains(&format!(
            "flush chain ip kube-proxy {}",
            nft_service_chain(0, &s.ports(0)[0])
        )));
        assert_eq!(text.matches("numgen").count(), 1);
    }
}
