//! The API server source: kube-rs watchers over Services and EndpointSlices.

/// An API resource the agent reads, and the verbs it uses on it: the RBAC rules in
/// `deploy/` must grant exactly these (a test checks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Plural resource name.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Everything the agent reads from the API server.
pub const API_ACCESS: [ApiAccess; 2] = [
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
];
