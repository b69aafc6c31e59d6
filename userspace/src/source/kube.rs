//! The Kubernetes API source (placeholder: being written).

/// One kind of access the agent needs to the API server. The deployment's RBAC must grant
/// exactly these (a test compares deploy/ with this list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group ("" for the core group).
    pub group: &'static str,
    /// Resource (plural, lower case).
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Everything the agent reads from the API server.
pub const API_ACCESS: &[ApiAccess] = &[
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
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
    },
];
