//! The one change type both sources emit and the [`Reconciler`](crate::reconcile::Reconciler)
//! applies: an object came or changed, went, or a relist of one kind began or ended.
use std::{fmt, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};

use crate::model::ObjectRef;

/// The kinds of object the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    /// Cluster-scoped: its [`ObjectRef`] has an empty namespace.
    Node,
}

impl Kind {
    /// The Kubernetes `kind`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Pod => "Pod",
            Self::Node => "Node",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One object the sources understand.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Pod(Box<Pod>),
    /// A Node: this node's gives its zone and eligibility, others are ignored.
    Node(Box<Node>),
}

impl Object {
    #[must_use]
    pub const fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Pod(_) => Kind::Pod,
            Self::Node(_) => Kind::Node,
        }
    }

    /// Namespace (`default` when unset; empty for a Node) and name.
    #[must_use]
    pub fn id(&self) -> ObjectRef {
        match self {
            Self::Service(o) => ObjectRef::of(&o.metadata),
            Self::EndpointSlice(o) => ObjectRef::of(&o.metadata),
            Self::Pod(o) => ObjectRef::of(&o.metadata),
            Self::Node(o) => ObjectRef::new("", o.metadata.name.as_deref().unwrap_or_default()),
        }
    }
}

/// A change of the cluster as a source sees it.
#[derive(Clone, Debug)]
pub enum Change {
    /// The object is new or changed; `origin` (a file, or `api`) names it in reports.
    Apply { origin: Arc<str>, object: Object },
    /// The object is gone.
    Delete { kind: Kind, id: ObjectRef },
    /// A relist of `kind` begins: the objects of that kind applied until
    /// [`Change::Relisted`] are all there are.
    Relisting(Kind),
    /// The relist of `kind` is complete: objects of that kind it did not apply are gone.
    Relisted(Kind),
}
