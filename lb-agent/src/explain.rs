//! `lb-agent explain ADDR:PORT[/PROTO] [--from CLIENT]`: what the datapath does for a
//! frontend and a client, and why — each entry for that address, its backends with state
//! and node, the policy that applied, and the objects (Service, EndpointSlices with their
//! resourceVersions) that produced it, with when it was written. The agent answers from
//! its model (`/v1/explain` on `--api-addr`); the CLI adds the entry as the pinned maps
//! hold it.
use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::{
    model::{EndpointSource, EndpointState, Frontend, FrontendKind, L4Addr, ObjectRef, Protocol},
    state::ClusterState,
};

/// `ADDR:PORT[/PROTO]` (TCP when no protocol is given).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, protocol) = match s.rsplit_once('/') {
            Some((addr, proto)) => (addr, proto),
            None => (s, "TCP"),
        };
        let protocol = match protocol.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => return Err(format!("{other:?} is not TCP or UDP")),
        };
        let addr = addr
            .parse()
            .map_err(|e| format!("{addr:?} is not ADDR:PORT ([ADDR]:PORT for IPv6): {e}"))?;
        Ok(Self { addr, protocol })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.protocol)
    }
}

/// The answer for one target.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explanation {
    pub target: String,
    pub from: Option<String>,
    /// The entries that match (two for an `externalTrafficPolicy: Local` frontend).
    pub entries: Vec<Entry>,
}

/// One frontend entry and why it is as it is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// As `lb-agent services` prints it.
    pub frontend: String,
    pub kind: String,
    /// Which clients it serves.
    pub clients: String,
    pub service: String,
    pub port_name: String,
    /// The Service object: `Service ns/name resourceVersion N (origin)`.
    pub service_object: ObjectStamp,
    pub slices: Vec<ObjectStamp>,
    /// When its entries were last written (RFC 3339), if by this agent.
    pub written_at: Option<String>,
    /// Each policy that shaped it, one line each.
    pub policies: Vec<String>,
    pub backends: Vec<BackendLine>,
    /// What a new connection from the client gets.
    pub outcome: String,
}

/// An object that produced an entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectStamp {
    pub kind: String,
    pub name: String,
    /// `None` when the object has none (manifests).
    pub resource_version: Option<u64>,
    pub origin: String,
}

/// One backend of an entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendLine {
    pub slot: usize,
    pub backend: String,
    pub state: String,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// The EndpointSlice (or `pod/NAME`) it came from.
    pub source: String,
    pub remote: bool,
}

/// A question for the reconcile loop, which alone holds the model.
#[derive(Debug)]
pub struct Query {
    pub target: Target,
    pub from: Option<IpAddr>,
    pub reply: tokio::sync::oneshot::Sender<Explanation>,
}

impl Query {
    /// Answers from `state`.
    pub fn answer(self, state: &ClusterState) {
        let _ = self.reply.send(explain(state, self.target, self.from));
    }
}

/// Explains `target` for `from` from the model.
#[must_use]
pub fn explain(state: &ClusterState, target: Target, from: Option<IpAddr>) -> Explanation {
    let ip = target.addr.ip();
    let unspecified: IpAddr = match ip {
        IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let exact = L4Addr::new(ip, target.addr.port(), target.protocol);
    let node_port = L4Addr::new(unspecified, target.addr.port(), target.protocol);
    let mut wanted = vec![exact, exact.internal()];
    // A node address (or any address, when not a frontend itself) may take a NodePort.
    if !state.desired().contains_key(&exact) {
        wanted.extend([node_port, node_port.internal()]);
    }
    let entries = wanted
        .iter()
        .filter_map(|a| state.desired().get(a))
        .map(|f| entry(state, f, from))
        .collect();
    Explanation {
        target: target.to_string(),
        from: from.map(|f| f.to_string()),
        entries,
    }
}

fn entry(state: &ClusterState, f: &Frontend, from: Option<IpAddr>) -> Entry {
    let checked = state.service(&f.service);
    let (internal_local, external_local) = checked
        .and_then(|c| c.valid.as_ref())
        .map_or((false, false), |v| (v.internal_local(), v.external_local()));
    let two_scopes = state.desired().contains_key(&f.address.internal());
    let clients = if f.address.is_internal() {
        "clients inside the cluster (pods and the node's processes, at connect())"
    } else if two_scopes {
        "clients outside the cluster (tc on the external devices)"
    } else if f.kind == FrontendKind::ClusterIp {
        "every client (pods and the node's processes at connect(); per packet at tc where socket translation is off)"
    } else {
        "every client (at connect() on this node, per packet at tc from outside)"
    };
    let mut policies = Vec::new();
    if f.kind == FrontendKind::ClusterIp {
        policies.push(if internal_local {
            "internalTrafficPolicy: Local: only this node's endpoints".to_owned()
        } else {
            "internalTrafficPolicy: Cluster: endpoints on every node".to_owned()
        });
    } else if f.local_only {
        policies.push(
            "externalTrafficPolicy: Local: only this node's endpoints, the client's address kept (no SNAT)"
                .to_owned(),
        );
    } else if f.address.is_internal() && external_local {
        policies.push(
            "externalTrafficPolicy: Local applies to clients outside the cluster only; in-cluster clients use every endpoint"
                .to_owned(),
        );
    } else {
        policies.push(
            "externalTrafficPolicy: Cluster: endpoints on every node; from outside, SNAT to this node for endpoints elsewhere"
                .to_owned(),
        );
    }
    if f.backends
        .iter()
        .any(|b| b.state == EndpointState::Terminating)
    {
        policies.push(
            "no endpoint is ready: serving terminating endpoints take new connections (kube-proxy's fallback)"
                .to_owned(),
        );
    }
    match f.affinity_timeout {
        Some(t) => policies.push(format!(
            "sessionAffinity: ClientIP, {t} s: a client keeps its backend while it connects within that time"
        )),
        None => policies.push("sessionAffinity: None: each connection picks a backend at random".to_owned()),
    }
    let mut dropped_by_range = false;
    if !f.source_ranges.is_empty() {
        let ranges: Vec<String> = f.source_ranges.iter().map(ToString::to_string).collect();
        let mut line = format!("loadBalancerSourceRanges: {}", ranges.join(", "));
        if let Some(client) = from {
            let allowed = f.source_ranges.iter().any(|r| r.contains(&client));
            dropped_by_range = !allowed;
            let _ = write!(
                line,
                ": {client} is {}",
                if allowed {
                    "allowed"
                } else {
                    "not in them: dropped"
                }
            );
        }
        policies.push(line);
    }
    let backends: Vec<BackendLine> = f
        .backends
        .iter()
        .zip(&f.backend_info)
        .enumerate()
        .map(|(i, (b, info))| BackendLine {
            slot: i + 1,
            backend: b.addr.to_string(),
            state: format!("{:?}", b.state),
            node: info.node_name.as_deref().map(str::to_owned),
            zone: info.zone.as_deref().map(str::to_owned),
            source: info.source.to_string(),
            remote: b.remote,
        })
        .collect();
    let n = backends.len();
    let outcome = if dropped_by_range {
        "dropped: the client is outside loadBalancerSourceRanges".to_owned()
    } else if n == 0 && f.no_local_endpoints {
        "dropped: no endpoint on this node (externalTrafficPolicy: Local), though the Service has endpoints elsewhere (as kube-proxy)".to_owned()
    } else if n == 0 {
        "refused: no endpoints (ECONNREFUSED at connect(), ICMP port unreachable from tc)"
            .to_owned()
    } else if f.affinity_timeout.is_some() {
        format!(
            "one of {n} backend(s): the client's previous backend while its affinity lasts, else slot k of {n} at random"
        )
    } else {
        format!("one of {n} backend(s), slot k of {n} chosen at random per connection")
    };
    let stamp = checked.map(|c| c.stamp).unwrap_or_default();
    let origin = checked.map(|c| c.origin.to_string()).unwrap_or_default();
    let service_object = ObjectStamp {
        kind: "Service".into(),
        name: f.service.to_string(),
        resource_version: (stamp.resource_version != 0).then_some(stamp.resource_version),
        origin,
    };
    // The Pods its backends were derived from (manifests without slices).
    let mut pods: Vec<&ObjectRef> = f
        .backend_info
        .iter()
        .filter_map(|i| match &i.source {
            EndpointSource::Pod(pod) => Some(pod),
            EndpointSource::Slice(_) => None,
        })
        .collect();
    pods.sort_unstable();
    pods.dedup();
    let slices = state
        .slices_of(&f.service)
        .into_iter()
        .map(|(id, version, origin)| ObjectStamp {
            kind: "EndpointSlice".into(),
            name: id.to_string(),
            resource_version: (version != 0).then_some(version),
            origin: origin.to_string(),
        })
        .chain(pods.into_iter().map(|pod| ObjectStamp {
            kind: "Pod".into(),
            name: pod.to_string(),
            resource_version: None,
            origin: String::new(),
        }))
        .collect();
    Entry {
        frontend: f.address.to_string(),
        kind: format!("{:?}", f.kind),
        clients: clients.to_owned(),
        service: f.service.to_string(),
        port_name: f.port_name.to_string(),
        service_object,
        slices,
        written_at: (stamp.written_at != 0).then(|| {
            k8s_openapi::jiff::Timestamp::from_second(i64::from(stamp.written_at))
                .map(|t| t.to_string())
                .unwrap_or_default()
        }),
        policies,
        backends,
        outcome,
    }
}

/// The text `lb-agent explain` prints; `map_lines` describe the entry as the pinned maps
/// hold it, by frontend.
#[must_use]
pub fn render(explanation: &Explanation, map_lines: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let from = explanation
        .from
        .as_deref()
        .map_or_else(String::new, |f| format!(" from {f}"));
    if explanation.entries.is_empty() {
        let _ = writeln!(
            out,
            "{}{from}: no Service frontend; the datapath leaves it untouched (the connection goes where routing sends it)",
            explanation.target
        );
        return out;
    }
    for e in &explanation.entries {
        let port = if e.port_name.is_empty() {
            String::new()
        } else {
            format!(" port {}", e.port_name)
        };
        let _ = writeln!(
            out,
            "{} ({}, Service {}{port})",
            e.frontend, e.kind, e.service
        );
        let _ = writeln!(out, "  for:      {}", e.clients);
        let _ = writeln!(out, "  outcome:  {}{from}", e.outcome);
        if let Some(map) = map_lines(&e.frontend) {
            let _ = writeln!(out, "  map:      {map}");
        }
        for p in &e.policies {
            let _ = writeln!(out, "  policy:   {p}");
        }
        for b in &e.backends {
            let mut where_ = Vec::new();
            if let Some(node) = &b.node {
                where_.push(format!("node {node}"));
            }
            if let Some(zone) = &b.zone {
                where_.push(format!("zone {zone}"));
            }
            if b.remote {
                where_.push("another node: SNAT when reached from outside".into());
            }
            let _ = writeln!(
                out,
                "  backend:  slot {} {} {} [{}] from {}",
                b.slot,
                b.backend,
                b.state,
                where_.join(", "),
                b.source
            );
        }
        let stamp = |o: &ObjectStamp| {
            let version = o.resource_version.map_or_else(
                || "no resourceVersion".to_owned(),
                |v| format!("resourceVersion {v}"),
            );
            let origin = if o.origin.is_empty() || o.origin == "api" {
                String::new()
            } else {
                format!(", from {}", o.origin)
            };
            format!("{} {} ({version}{origin})", o.kind, o.name)
        };
        let _ = writeln!(out, "  made by:  {}", stamp(&e.service_object));
        for s in &e.slices {
            let _ = writeln!(out, "            {}", stamp(s));
        }
        let _ = writeln!(
            out,
            "  written:  {}",
            e.written_at
                .as_deref()
                .unwrap_or("before this agent started (adopted from the pinned maps)")
        );
    }
    out
}
