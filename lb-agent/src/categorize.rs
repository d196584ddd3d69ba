//! Which endpoints of a Service port take new connections, for each traffic policy:
//! kube-proxy's `CategorizeEndpoints` (`pkg/proxy/topology.go`), rule for rule.
//!
//! - *Cluster* endpoints serve `internalTrafficPolicy: Cluster` and
//!   `externalTrafficPolicy: Cluster`: the ready endpoints, narrowed by topology hints when
//!   every ready endpoint carries one and one is meant for this node (or its zone); when none
//!   is ready anywhere, the serving terminating ones.
//! - *Local* endpoints serve the `Local` policies: the ready endpoints on this node; when none
//!   of those is ready, this node's serving terminating ones (independently of the rest of
//!   the cluster).
//! - `has_any`: whether the Service has a usable endpoint anywhere. Without one, traffic is
//!   refused (kube-proxy's REJECT); with one elsewhere but none here under a Local policy,
//!   it is dropped.
use std::collections::BTreeSet;

use crate::model::{EndpointInfo, L4Addr};

/// The `hints` of an endpoint (EndpointSlice `endpoints[].hints`): the zones and nodes it
/// is meant to serve. An empty list means no hint of that kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `hints.forZones[].name`.
    pub zones: BTreeSet<String>,
    /// `hints.forNodes[].name`.
    pub nodes: BTreeSet<String>,
}

/// An endpoint before selection, with its EndpointSlice conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub addr: L4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub info: std::sync::Arc<EndpointInfo>,
    pub hints: Hints,
}

impl Candidate {
    /// kube-proxy's `IsLocal`: the endpoint's `nodeName` is this node's.
    fn is_local(&self, node: &NodeTopology<'_>) -> bool {
        node.name.is_some() && self.info.node_name.as_deref() == node.name
    }

    fn is_serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// This node, as topology sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeTopology<'a> {
    /// `--node-name`.
    pub name: Option<&'a str>,
    /// The `topology.kubernetes.io/zone` label of this node's Node.
    pub zone: Option<&'a str>,
}

/// Which policies a Service port uses (kube-proxy's `UsesClusterEndpoints` and
/// `UsesLocalEndpoints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policies {
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` on a Service reachable from outside.
    pub external_local: bool,
    /// The port has a NodePort, an external IP or a LoadBalancer IP.
    pub externally_accessible: bool,
}

impl Policies {
    /// Cluster endpoints are needed: for in-cluster traffic under `Cluster`, and for any
    /// externally reachable Service (even under `externalTrafficPolicy: Local`, traffic from
    /// pods and the node to its external addresses short-circuits to them).
    #[must_use]
    pub const fn uses_cluster(&self) -> bool {
        !self.internal_local || self.externally_accessible
    }

    /// Local endpoints are needed.
    #[must_use]
    pub const fn uses_local(&self) -> bool {
        self.internal_local || (self.external_local && self.externally_accessible)
    }
}

/// Which topology narrowed the cluster endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyMode {
    /// Every ready endpoint (no usable hints).
    None,
    /// Endpoints hinted for this node's zone.
    PreferSameZone,
    /// Endpoints hinted for this node.
    PreferSameNode,
}

/// The outcome of [`categorize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Categories<'a> {
    /// Endpoints for the `Cluster` policies (empty when no policy uses them).
    pub cluster: Vec<&'a Candidate>,
    /// Endpoints for the `Local` policies (empty when no policy uses them).
    pub local: Vec<&'a Candidate>,
    /// The Service port has a usable endpoint somewhere in the cluster.
    pub has_any: bool,
    pub topology: TopologyMode,
}

/// Sorts `endpoints` (one address family's) into the categories `policies` need.
#[must_use]
pub fn categorize<'a>(
    endpoints: &'a [Candidate],
    policies: Policies,
    node: NodeTopology<'_>,
) -> Categories<'a> {
    let mut out = Categories {
        cluster: Vec::new(),
        local: Vec::new(),
        has_any: false,
        topology: TopologyMode::None,
    };
    if policies.uses_cluster() {
        out.topology = topology_mode(endpoints, node);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, out.topology, node))
            .collect();
        // Topology never leaves this empty while something is ready (the mode falls back
        // first): empty here means nothing is ready anywhere.
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|e| e.is_serving_terminating())
                .collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if policies.uses_local() {
        out.has_any |= endpoints
            .iter()
            .any(|e| e.ready || e.is_serving_terminating());
        let local_ready = endpoints.iter().any(|e| e.is_local(&node) && e.ready);
        out.local = endpoints
            .iter()
            .filter(|e| {
                e.is_local(&node)
                    && if local_ready {
                        e.ready
                    } else {
                        e.is_serving_terminating()
                    }
            })
            .collect();
    }
    out
}

/// kube-proxy's `topologyModeFromHints`: same-node when every ready endpoint has a node
/// hint and one names this node; else same-zone when every ready endpoint has a zone hint
/// and one names this node's zone; else none.
fn topology_mode(endpoints: &[Candidate], node: NodeTopology<'_>) -> TopologyMode {
    let ready: Vec<&Candidate> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    let all_have =
        |hints: fn(&Candidate) -> &BTreeSet<String>| ready.iter().all(|e| !hints(e).is_empty());
    let any_names = |hints: fn(&Candidate) -> &BTreeSet<String>, name: Option<&str>| {
        name.is_some_and(|name| ready.iter().any(|e| hints(e).contains(name)))
    };
    if all_have(|e| &e.hints.nodes) && any_names(|e| &e.hints.nodes, node.name) {
        return TopologyMode::PreferSameNode;
    }
    if all_have(|e| &e.hints.zones) && any_names(|e| &e.hints.zones, node.zone) {
        return TopologyMode::PreferSameZone;
    }
    TopologyMode::None
}

fn available_for_topology(e: &Candidate, mode: TopologyMode, node: NodeTopology<'_>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => node.name.is_some_and(|n| e.hints.nodes.contains(n)),
        TopologyMode::PreferSameZone => node.zone.is_some_and(|z| e.hints.zones.contains(z)),
    }
}

#[cfg(test)]
mod tests;
