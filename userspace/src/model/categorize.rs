//! Which endpoints a service port uses under each traffic policy: kube-proxy's
//! `CategorizeEndpoints` (pkg/proxy/topology.go), without topology hints.
use std::collections::BTreeMap;

use super::service::ServicePortView;
use super::slice::SliceView;
use super::*;

/// One Service port's endpoints in one family, by traffic policy (kube-proxy's
/// `CategorizeEndpoints`, without topology hints).
pub(super) struct Endpoints {
    /// `Cluster` policy: ready endpoints, or, when there are none, the ones that still serve
    /// while terminating so that connections drain instead of being rejected.
    pub(super) cluster: Vec<Backend>,
    /// `Local` policy: this node's ready endpoints, or, when there are none, this node's
    /// serving-terminating ones (independently of the cluster-wide fallback).
    pub(super) local: Vec<Backend>,
    /// This node's ready endpoints.
    pub(super) local_ready: usize,
    /// Some endpoint anywhere is ready or serving while terminating (kube-proxy's
    /// hasAnyEndpoints).
    pub(super) any: bool,
}

pub(super) fn categorize(
    family: Family,
    port: &ServicePortView<'_>,
    slices: &[SliceView<'_>],
    node: Option<&str>,
) -> Endpoints {
    #[derive(Default)]
    struct Usable {
        ready: bool,
        draining: bool,
        local_ready: bool,
        local_draining: bool,
    }
    // The same ip:port may come from several slices (e.g. mid-migration between slices); it
    // counts once, usable if any copy says so, so the result does not depend on slice order.
    let mut seen: BTreeMap<Backend, Usable> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        // A named targetPort resolves per pod, so the number comes from the slice port with the
        // same name and protocol; several of them (rollouts) all contribute.
        for sp in slice
            .ports
            .iter()
            .filter(|sp| sp.name == port.name && sp.protocol == port.protocol)
        {
            for ep in &slice.endpoints {
                let u = seen
                    .entry(Backend {
                        ip: ep.ip,
                        port: sp.port,
                    })
                    .or_default();
                let draining = ep.serving && ep.terminating;
                let local = node.is_some() && ep.node_name == node;
                u.ready |= ep.ready;
                u.draining |= draining;
                u.local_ready |= local && ep.ready;
                u.local_draining |= local && draining;
            }
        }
    }
    let pick = |primary: fn(&Usable) -> bool, fallback: fn(&Usable) -> bool| {
        let first: Vec<Backend> = seen
            .iter()
            .filter(|(_, u)| primary(u))
            .map(|(b, _)| *b)
            .collect();
        if !first.is_empty() {
            return first;
        }
        seen.iter()
            .filter(|(_, u)| fallback(u))
            .map(|(b, _)| *b)
            .collect()
    };
    let local = pick(|u| u.local_ready, |u| u.local_draining);
    Endpoints {
        cluster: pick(|u| u.ready, |u| u.draining),
        local_ready: seen.values().filter(|u| u.local_ready).count(),
        any: seen.values().any(|u| u.ready || u.draining),
        local,
    }
}
