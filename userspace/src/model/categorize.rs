//! Which endpoints a service port uses under each traffic policy: kube-proxy's
//! `CategorizeEndpoints` (pkg/proxy/topology.go), topology hints included.
use std::collections::{BTreeMap, BTreeSet};

use super::service::ServicePortView;
use super::slice::SliceView;
use super::*;

/// One Service port's endpoints in one family, by traffic policy (kube-proxy's
/// `CategorizeEndpoints`).
pub(super) struct Endpoints {
    /// `Cluster` policy: ready endpoints, or, when there are none, the ones that still serve
    /// while terminating so that connections drain instead of being rejected; of those, the
    /// ones whose topology hints are for this node or its zone when [`topology`] applies.
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

/// Which endpoints the topology hints keep (kube-proxy's `topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// No hints apply: every endpoint.
    Any,
    /// trafficDistribution PreferSameNode: endpoints hinted for this node.
    SameNode,
    /// PreferSameZone / PreferClose: endpoints hinted for this node's zone.
    SameZone,
}

/// The hints of one endpoint (all its copies across slices).
#[derive(Default)]
struct Hints<'a> {
    zones: BTreeSet<&'a str>,
    nodes: BTreeSet<&'a str>,
}

/// kube-proxy's rule, over the ready endpoints: node hints are used if every one has some and
/// one is for this node; else zone hints, if every one has some and one is for this zone.
/// Any endpoint without hints (a slice the controller has not hinted yet) turns them off.
fn topology<'a>(
    ready: impl Iterator<Item = &'a Hints<'a>> + Clone,
    node: Option<&str>,
    zone: Option<&str>,
) -> Topology {
    let all_have = |f: fn(&Hints<'_>) -> bool| ready.clone().all(f);
    if all_have(|h| !h.nodes.is_empty())
        && node.is_some_and(|n| ready.clone().any(|h| h.nodes.contains(n)))
    {
        return Topology::SameNode;
    }
    if all_have(|h| !h.zones.is_empty())
        && zone.is_some_and(|z| ready.clone().any(|h| h.zones.contains(z)))
    {
        return Topology::SameZone;
    }
    Topology::Any
}

pub(super) fn categorize(
    family: Family,
    port: &ServicePortView<'_>,
    slices: &[SliceView<'_>],
    node: Option<&str>,
    zone: Option<&str>,
) -> Endpoints {
    #[derive(Default)]
    struct Usable<'a> {
        ready: bool,
        draining: bool,
        local_ready: bool,
        local_draining: bool,
        hints: Hints<'a>,
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
                u.hints.zones.extend(&ep.zone_hints);
                u.hints.nodes.extend(&ep.node_hints);
            }
        }
    }
    let topology = topology(
        seen.values().filter(|u| u.ready).map(|u| &u.hints),
        node,
        zone,
    );
    // Topology narrows the cluster-wide choice only; the Local policy is local already.
    let in_topology = |u: &Usable<'_>| match topology {
        Topology::Any => true,
        Topology::SameNode => node.is_some_and(|n| u.hints.nodes.contains(n)),
        Topology::SameZone => zone.is_some_and(|z| u.hints.zones.contains(z)),
    };
    let pick = |primary: &dyn Fn(&Usable<'_>) -> bool, fallback: &dyn Fn(&Usable<'_>) -> bool| {
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
    let local = pick(&|u| u.local_ready, &|u| u.local_draining);
    Endpoints {
        cluster: pick(&|u| u.ready && in_topology(u), &|u| {
            u.draining && in_topology(u)
        }),
        local_ready: seen.values().filter(|u| u.local_ready).count(),
        any: seen.values().any(|u| u.ready || u.draining),
        local,
    }
}
