//! This node's own Node object, as an input: its zone (for topology-aware endpoint choice)
//! and whether it is eligible for load-balancer traffic (for `/healthz`), both as
//! kube-proxy reads them.
use k8s_openapi::api::core::v1::Node;

/// The label holding a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What the agent reads from a Node object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// Neither being deleted (`deletionTimestamp` set) nor tainted
    /// `ToBeDeletedByClusterAutoscaler` (any effect): a load balancer should keep sending
    /// it traffic.
    pub eligible: bool,
}

impl NodeInfo {
    /// Reads `node`.
    #[must_use]
    pub fn of(node: &Node) -> Self {
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(ZONE_LABEL))
            .filter(|zone| !zone.is_empty())
            .cloned();
        let deleting = node.metadata.deletion_timestamp.is_some();
        let to_be_deleted = node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        Self {
            zone,
            eligible: !deleting && !to_be_deleted,
        }
    }
}

/// This node as the sources last saw its Node object. Until one is seen the node has no
/// zone and is eligible (kube-proxy's start-up assumption: eligible until a Node says
/// otherwise).
#[derive(Clone, Debug)]
pub struct ThisNode {
    /// `--node-name`; without it no Node is this node's.
    name: Option<String>,
    zone: Option<String>,
    eligible: bool,
}

impl ThisNode {
    #[must_use]
    pub const fn new(name: Option<String>) -> Self {
        Self {
            name,
            zone: None,
            eligible: true,
        }
    }

    /// Whether `node` is this node's Node object.
    #[must_use]
    pub fn is_this(&self, node: &Node) -> bool {
        self.name.is_some() && node.metadata.name == self.name
    }

    /// Takes this node's Node object as added or changed (other Nodes are ignored).
    pub fn apply(&mut self, node: &Node) {
        if self.is_this(node) {
            let info = NodeInfo::of(node);
            self.zone = info.zone;
            self.eligible = info.eligible;
        }
    }

    /// The Node object `name` was deleted, `last` its final state if known (ignored when
    /// `name` is not this node). The zone is gone with it; eligibility comes from the final
    /// state, as kube-proxy's (a graceful deletion carries a `deletionTimestamp`), and stays
    /// as it was without one.
    pub fn delete(&mut self, name: &str, last: Option<&Node>) {
        if self.name.as_deref() != Some(name) {
            return;
        }
        self.zone = None;
        if let Some(node) = last {
            self.eligible = NodeInfo::of(node).eligible;
        }
    }

    /// `--node-name`.
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The zone, as `ClusterState::set_node_zone` takes it.
    #[must_use]
    pub fn zone(&self) -> Option<String> {
        self.zone.clone()
    }

    #[must_use]
    pub const fn eligible(&self) -> bool {
        self.eligible
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
        jiff::Timestamp,
    };

    use super::*;

    fn node(name: &str, zone: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: zone.map(|z| [(ZONE_LABEL.to_string(), z.to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            ..Taint::default()
        }
    }

    #[test]
    fn zone_and_eligibility() {
        let plain = node("a", Some("zone-1"));
        assert_eq!(
            NodeInfo::of(&plain),
            NodeInfo {
                zone: Some("zone-1".into()),
                eligible: true
            }
        );
        assert_eq!(NodeInfo::of(&node("a", None)).zone, None);
        assert_eq!(NodeInfo::of(&node("a", Some(""))).zone, None);

        let mut deleting = plain.clone();
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        assert!(!NodeInfo::of(&deleting).eligible);

        let mut tainted = plain.clone();
        tainted.spec = Some(NodeSpec {
            taints: Some(vec![
                taint("node.kubernetes.io/unschedulable", "NoSchedule"),
                taint(TO_BE_DELETED_TAINT, "NoSchedule"),
            ]),
            ..NodeSpec::default()
        });
        assert!(!NodeInfo::of(&tainted).eligible);
        // Only the autoscaler's taint counts, not cordoning or other taints.
        tainted.spec = Some(NodeSpec {
            taints: Some(vec![taint(
                "node.kubernetes.io/unschedulable",
                "NoSchedule",
            )]),
            unschedulable: Some(true),
            ..NodeSpec::default()
        });
        assert!(NodeInfo::of(&tainted).eligible);
    }

    #[test]
    fn only_this_nodes_object_counts() {
        let mut this = ThisNode::new(Some("a".into()));
        assert_eq!((this.zone(), this.eligible()), (None, true));
        this.apply(&node("b", Some("zone-2")));
        assert_eq!(this.zone(), None);
        this.apply(&node("a", Some("zone-1")));
        assert_eq!(this.zone().as_deref(), Some("zone-1"));

        let mut deleting = node("a", Some("zone-1"));
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        this.delete("b", None);
        assert_eq!(this.zone().as_deref(), Some("zone-1"), "not this node");
        this.delete("a", Some(&deleting));
        assert_eq!((this.zone(), this.eligible()), (None, false));

        let mut unnamed = ThisNode::new(None);
        unnamed.apply(&node("a", Some("zone-1")));
        assert_eq!(unnamed.zone(), None);
    }
}
