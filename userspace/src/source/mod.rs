//! Sources of cluster state: they produce [`ClusterSnapshot`]s for the model.
pub mod kube;
pub mod lenient;
pub mod manifest;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// A complete, consistent view of the objects kpr proxies, as one source last read them.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// This node's Node object, when the source knows it (the API source does; a manifest
    /// directory may not).
    pub node: Option<Node>,
    /// Objects the source received but could not decode (`Kind namespace/name: reason`); each
    /// was logged once when it arrived, and every other object is in the snapshot.
    pub rejected: Vec<String>,
}
