//! Sources of cluster state: they produce [`ClusterSnapshot`]s for the model.
pub mod kube;
pub mod lenient;
pub mod manifest;

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// A complete, consistent view of the objects kpr proxies, as one source last read them.
///
/// The objects are shared (with the source's store and with earlier snapshots): a change to
/// one of 100,000 objects makes a snapshot that copies none of them, and the model's cache
/// recognises every unchanged object by its address before it compares contents.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// This node's Node object, when the source knows it (the API source does; a manifest
    /// directory may not).
    pub node: Option<Node>,
    /// Objects the source received but could not decode (`Kind namespace/name: reason`); each
    /// was logged once when it arrived, and every other object is in the snapshot.
    pub rejected: Vec<String>,
}

/// `a` and `b` hold the same objects: the same allocations, or equal contents.
pub fn same_objects<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_object(x, y))
}

/// The same allocation, or equal contents.
pub fn same_object<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

impl ClusterSnapshot {
    /// Adds `part`'s objects (shared, not copied), and its node if it has one.
    pub fn extend(&mut self, part: &ClusterSnapshot) {
        self.services.extend(part.services.iter().cloned());
        self.slices.extend(part.slices.iter().cloned());
        if part.node.is_some() {
            self.node.clone_from(&part.node);
        }
        self.rejected.extend(part.rejected.iter().cloned());
    }

    /// The same objects, node and rejections as `other` (what a source compares before it
    /// publishes).
    pub fn same_as(&self, other: &ClusterSnapshot) -> bool {
        same_objects(&self.services, &other.services)
            && same_objects(&self.slices, &other.slices)
            && self.node == other.node
            && self.rejected == other.rejected
    }
}
