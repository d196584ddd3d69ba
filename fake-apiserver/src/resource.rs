//! The resource types the fake serves, and their API coordinates.

use std::fmt;
use std::str::FromStr;

/// A resource type served by the fake API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// `v1` `Service` (`/api/v1/services`).
    Service,
    /// `discovery.k8s.io/v1` `EndpointSlice` (`/apis/discovery.k8s.io/v1/endpointslices`).
    EndpointSlice,
    /// `v1` `Node` (`/api/v1/nodes`), cluster-scoped.
    Node,
}

impl ResourceKind {
    /// Every served resource type.
    pub const ALL: [ResourceKind; 3] = [
        ResourceKind::Service,
        ResourceKind::EndpointSlice,
        ResourceKind::Node,
    ];

    /// Whether objects of this type live in a namespace (a Node does not: its
    /// `metadata.namespace` is empty and its paths have no `namespaces/{ns}`).
    pub fn namespaced(self) -> bool {
        !matches!(self, ResourceKind::Node)
    }

    /// The object kind, e.g. `Service`.
    pub fn kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "Service",
            ResourceKind::EndpointSlice => "EndpointSlice",
            ResourceKind::Node => "Node",
        }
    }

    /// The list kind, e.g. `ServiceList`.
    pub fn list_kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "ServiceList",
            ResourceKind::EndpointSlice => "EndpointSliceList",
            ResourceKind::Node => "NodeList",
        }
    }

    /// The `apiVersion` (group/version), e.g. `v1` or `discovery.k8s.io/v1`.
    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::Service | ResourceKind::Node => "v1",
            ResourceKind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The API group (empty for the core group).
    pub fn group(self) -> &'static str {
        match self {
            ResourceKind::Service | ResourceKind::Node => "",
            ResourceKind::EndpointSlice => "discovery.k8s.io",
        }
    }

    /// The plural resource name used in URLs, e.g. `services`.
    pub fn plural(self) -> &'static str {
        match self {
            ResourceKind::Service => "services",
            ResourceKind::EndpointSlice => "endpointslices",
            ResourceKind::Node => "nodes",
        }
    }

    /// The resource type whose `kind` is `kind` (case-sensitive, as in manifests).
    pub fn from_kind(kind: &str) -> Option<Self> {
        ResourceKind::ALL.into_iter().find(|k| k.kind() == kind)
    }

    /// A dense index (0..3), used for per-kind arrays.
    pub(crate) fn index(self) -> usize {
        match self {
            ResourceKind::Service => 0,
            ResourceKind::EndpointSlice => 1,
            ResourceKind::Node => 2,
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// Error of [`ResourceKind::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported resource kind {0:?} (expected Service, EndpointSlice or Node)")]
pub struct UnknownKind(pub String);

impl FromStr for ResourceKind {
    type Err = UnknownKind;

    /// Accepts the kind (`Service`), the plural (`services`) or the lowercase singular
    /// (`service`, `endpointslice`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResourceKind::ALL
            .into_iter()
            .find(|k| k.kind() == s || k.plural() == s || k.kind().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_kinds() {
        assert_eq!("Service".parse(), Ok(ResourceKind::Service));
        assert_eq!("services".parse(), Ok(ResourceKind::Service));
        assert_eq!("endpointslice".parse(), Ok(ResourceKind::EndpointSlice));
        assert_eq!("nodes".parse(), Ok(ResourceKind::Node));
        assert!(!ResourceKind::Node.namespaced());
        assert!("Pod".parse::<ResourceKind>().is_err());
        assert_eq!(
            ResourceKind::from_kind("EndpointSlice"),
            Some(ResourceKind::EndpointSlice)
        );
    }
}
