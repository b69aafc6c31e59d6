//! Sources of cluster state: they produce [`ClusterSnapshot`]s for the model.
pub mod manifest;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// A complete, consistent view of the objects kpr proxies, as one source last read them.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}
