//! The pure model: (Services, EndpointSlices) → the frontends to program and their backends.
//!
//! No I/O happens here. This is where kube-proxy's semantics live (pkg/proxy/servicechangetracker.go,
//! serviceport.go, endpointschangetracker.go, topology.go): which Services are proxied at all, on
//! which addresses (ClusterIPs, NodePorts, externalIPs, load-balancer IPs), how slices are matched
//! to Services, which endpoints are usable under each traffic policy, how named target ports
//! resolve. Every backend (eBPF, nftables, iptables) consumes the same [`DesiredState`].
//!
//! Two sets of backends are kept per frontend, because kube-proxy treats traffic that starts on
//! the node differently from traffic that arrives from outside:
//! - [`ServicePortState::backends`] is what a client *on this node* (a pod or a host process)
//!   gets: the internal traffic policy for ClusterIPs; for NodePorts, externalIPs and
//!   load-balancer IPs, always the cluster-wide endpoints. That is kube-proxy's "short circuit"
//!   (proxier.go, `KUBE-EXT-…`: locally originated traffic to an external destination "is subject
//!   to neither form of traffic policy, which simulates going up-and-out to an external
//!   load-balancer and coming back in").
//! - [`ServicePortState::external_backends`] is what traffic *arriving from outside* gets: the
//!   external traffic policy (`Local`: this node's endpoints only, so the client address is kept).

mod build;
mod categorize;
mod incremental;
mod service;
mod slice;
#[cfg(test)]
mod tests;
mod types;

pub use build::{build, build_for_node};
pub use incremental::ModelCache;
pub use service::validate_service;
pub use slice::validate_slice;
pub use types::*;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

// Manifests often omit the namespace; `kubectl apply` would put them in "default", so the
// Service and its slices must agree on that.
const DEFAULT_NAMESPACE: &str = "default";

fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!("unknown protocol {other:?}")),
    }
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

fn has_label(meta: &ObjectMeta, label: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(label))
}
