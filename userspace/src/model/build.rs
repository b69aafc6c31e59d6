//! The builder: checked Services and slices, categorised endpoints and the node's context →
//! the desired state, with conflicts between Services settled.
use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::categorize::{categorize, Endpoints};
use super::service::{parse_service, ServiceView};
use super::slice::{parse_slice, SliceView};
use super::*;

/// Builds the desired state without knowing the node: ClusterIP, externalIP and load-balancer
/// frontends, no NodePort frontends (no node addresses), and no endpoint is local (so
/// `internalTrafficPolicy: Local` ClusterIPs and `externalTrafficPolicy: Local` external traffic
/// have no backends). Same as [`build_for_node`] with an empty [`NodeContext`].
pub fn build<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
) -> (DesiredState, Vec<ModelError>) {
    build_for_node(services, slices, &NodeContext::default())
}

/// Builds the desired state for the node described by `ctx`. Invalid objects are skipped (their
/// errors returned alongside) and never affect other objects.
///
/// Conflicts (a frontend claimed by two Services) are settled per Service, never by serving half
/// a Service: Services are taken in namespace/name order, and one that would claim a frontend
/// already taken is dropped as a whole and reported. ClusterIP frontends are claimed first, for
/// all Services, and external frontends (NodePort, externalIP, load-balancer IP) after them, so
/// an externalIP or load-balancer status naming another Service's ClusterIP:port drops its own
/// Service, never the ClusterIP's owner (externalIPs are user-chosen; cf. CVE-2020-8554). A
/// Service dropped in the second round releases its ClusterIPs; Services dropped earlier for
/// them are not reconsidered. Within one Service, an address listed under two kinds (an
/// externalIP equal to its own ClusterIP, say) is served once, as the first of ClusterIP,
/// externalIP, load-balancer IP, NodePort (the order of kube-proxy's rules).
pub fn build_for_node<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
    ctx: &NodeContext,
) -> (DesiredState, Vec<ModelError>) {
    let mut errors = Vec::new();

    let mut slices_by_service: BTreeMap<(&str, &str), Vec<SliceView<'_>>> = BTreeMap::new();
    for slice in slices {
        match parse_slice(slice.borrow(), &mut errors) {
            Ok(Some(view)) => slices_by_service
                .entry((view.namespace, view.service))
                .or_default()
                .push(view),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }

    let mut views = Vec::new();
    for svc in services {
        match parse_service(svc.borrow(), &mut errors) {
            Ok(Some(view)) => views.push(view),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    // Processing in name order makes the winner of any conflict independent of input order.
    views.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
    let mut built = Vec::new();
    let mut seen = BTreeSet::new();
    for view in &views {
        if !seen.insert((view.namespace, view.name)) {
            errors.push(view.error("defined more than once; the first definition is used"));
            continue;
        }
        let slices = slices_by_service
            .get(&(view.namespace, view.name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        built.push(Arc::new(BuiltService::of(view, slices, ctx)));
    }
    settle(&built, ctx, &mut errors)
}

/// One Service's frontends and ports as built from its objects alone, before conflicts with
/// other Services are settled: what [`crate::model::ModelCache`] keeps between builds.
#[derive(Debug)]
pub(super) struct BuiltService {
    pub namespace: String,
    pub name: String,
    pub frontends: BTreeMap<Frontend, ServicePortState>,
    pub ports: Vec<ServicePortInfo>,
}

impl BuiltService {
    pub fn of(view: &ServiceView<'_>, slices: &[SliceView<'_>], ctx: &NodeContext) -> Self {
        let (frontends, ports) = service_ports(view, slices, ctx);
        BuiltService {
            namespace: view.namespace.to_owned(),
            name: view.name.to_owned(),
            frontends,
            ports,
        }
    }

    fn error(&self, reason: &str) -> ModelError {
        ModelError::InvalidService {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// The desired state from every Service's own model, in namespace/name order (each name
/// once), with conflicts between Services settled.
pub(super) fn settle(
    built: &[Arc<BuiltService>],
    ctx: &NodeContext,
    errors: &mut Vec<ModelError>,
) -> (DesiredState, Vec<ModelError>) {
    let mut state = DesiredState::default();
    // Round one: ClusterIP frontends. Two Services claiming one ClusterIP:port is something the
    // API server prevents; from hand-written manifests it can happen.
    let mut kept = Vec::new();
    for service in built {
        let (internal, external): (Vec<_>, Vec<_>) = service
            .frontends
            .iter()
            .partition(|(_, s)| s.kind == FrontendKind::ClusterIp);
        if let Some(e) = conflict(&state, service, &internal) {
            errors.push(e);
            continue;
        }
        state
            .services
            .extend(internal.into_iter().map(|(f, s)| (*f, s.clone())));
        kept.push((service, external));
    }
    // Round two: external frontends. One another Service already serves is skipped alone
    // (kube-proxy keeps the rest of the Service, its ClusterIP above all).
    for (service, external) in kept {
        let mut ports = None;
        for (f, s) in external {
            if let Some(owner) = state.services.get(f) {
                errors.push(service.error(&format!(
                    "frontend {f} is already used by {}; that frontend is skipped",
                    owner.name
                )));
                without_frontend(
                    ports.get_or_insert_with(|| service.ports.clone()),
                    f,
                    s.kind,
                );
            } else {
                state.services.insert(*f, s.clone());
            }
        }
        match ports {
            Some(ports) => state.service_ports.extend(ports),
            None => state.service_ports.extend(service.ports.iter().cloned()),
        }
    }
    state.node_ips = ctx.node_ips.clone();
    state.node_ip = ctx.node_ip;
    state.node_pod_cidrs = ctx.pod_cidrs.clone();
    state
        .service_ports
        .sort_by(|a, b| (a.family, &a.name, a.protocol).cmp(&(b.family, &b.name, b.protocol)));
    (state, std::mem::take(errors))
}

/// Takes external frontend `f` (of `kind`) out of a Service's ports, so that the netfilter
/// modes skip it as the eBPF mode does.
fn without_frontend(ports: &mut [ServicePortInfo], f: &Frontend, kind: FrontendKind) {
    for p in ports
        .iter_mut()
        .filter(|p| p.protocol == f.protocol && p.family == Family::of(f.ip))
    {
        match kind {
            FrontendKind::ExternalIp if p.port == f.port => p.external_ips.retain(|ip| *ip != f.ip),
            FrontendKind::LoadBalancer if p.port == f.port => {
                p.load_balancer_ips.retain(|ip| *ip != f.ip)
            }
            // Two Services with one nodePort: the API server allocates them uniquely, so this
            // only comes from hand-written manifests; the port is not served by this one.
            FrontendKind::NodePort if p.node_port == Some(f.port) => p.node_port = None,
            _ => {}
        }
    }
}

/// The error for the first of `ports` that `state` already serves.
fn conflict(
    state: &DesiredState,
    service: &BuiltService,
    ports: &[(&Frontend, &ServicePortState)],
) -> Option<ModelError> {
    ports.iter().find_map(|(f, _)| {
        state
            .services
            .get(f)
            .map(|owner| service.error(&format!("frontend {f} is already used by {}", owner.name)))
    })
}

/// The frontends of one Service with their backends. A frontend listed twice within the
/// Service keeps its first kind, in kube-proxy's rule order: ClusterIP, externalIP,
/// load-balancer IP (per port, as in `KUBE-SERVICES`), then NodePorts (`KUBE-NODEPORTS`, last).
pub(super) fn service_ports(
    view: &ServiceView<'_>,
    slices: &[SliceView<'_>],
    ctx: &NodeContext,
) -> (BTreeMap<Frontend, ServicePortState>, Vec<ServicePortInfo>) {
    let node = ctx.node_name.as_deref().filter(|n| !n.is_empty());
    let zone = ctx.zone.as_deref().filter(|z| !z.is_empty());
    // kube-proxy runs one proxier per family, and each proxies only the Services with a
    // ClusterIP of its family: an externalIP, LB IP or node address of another family is unused.
    let families: BTreeSet<Family> = view.ips.iter().map(|&ip| Family::of(ip)).collect();
    let in_families = |ip: &&IpAddr| families.contains(&Family::of(**ip));

    let mut endpoints: BTreeMap<(usize, Family), Endpoints> = BTreeMap::new();
    let mut local_ready: BTreeMap<Family, usize> = BTreeMap::new();
    for (i, port) in view.ports.iter().enumerate() {
        for &family in &families {
            let e = categorize(family, port, slices, node, zone);
            *local_ready.entry(family).or_default() += e.local_ready;
            endpoints.insert((i, family), e);
        }
    }

    let mut out = BTreeMap::new();
    let mut add = |i: usize, kind: FrontendKind, ip: IpAddr, port: u16| {
        let sp = &view.ports[i];
        let frontend = Frontend {
            ip,
            port,
            protocol: sp.protocol,
        };
        if let Some(first) = out.get(&frontend).map(|s: &ServicePortState| s.kind) {
            tracing::debug!(
                "Service {}/{}: {frontend} is both {first:?} and {kind:?}; served as {first:?}",
                view.namespace,
                view.name
            );
            return;
        }
        let family = Family::of(ip);
        let e = &endpoints[&(i, family)];
        let (backends, external_backends, external_snat) = if kind.is_external() {
            // kube-proxy's short circuit: traffic from this node to an external destination
            // gets the cluster endpoints, whatever the policies.
            let external = if view.external_local {
                e.local.clone()
            } else {
                e.cluster.clone()
            };
            let snat = !view.external_local && external.iter().any(|b| !e.local.contains(b));
            (e.cluster.clone(), external, snat)
        } else {
            let internal = if view.internal_local {
                e.local.clone()
            } else {
                e.cluster.clone()
            };
            (internal.clone(), internal, false)
        };
        out.insert(
            frontend,
            ServicePortState {
                name: ServicePortName {
                    namespace: view.namespace.to_owned(),
                    name: view.name.to_owned(),
                    port: sp.name.to_owned(),
                },
                kind,
                backends,
                external_backends,
                external_policy_local: kind.is_external() && view.external_local,
                internal_policy_local: !kind.is_external() && view.internal_local,
                external_snat,
                session_affinity: view.session_affinity,
                load_balancer_source_ranges: if kind == FrontendKind::LoadBalancer {
                    view.load_balancer_source_ranges
                        .iter()
                        .filter(|net| Family::of(net.addr()) == family)
                        .copied()
                        .collect()
                } else {
                    Vec::new()
                },
                health_check_node_port: view.health_check_node_port,
                local_endpoints: local_ready.get(&family).copied().unwrap_or_default(),
                internal_local_elsewhere: !kind.is_external()
                    && view.internal_local
                    && e.local.is_empty()
                    && e.any,
            },
        );
    };

    for (i, sp) in view.ports.iter().enumerate() {
        for &ip in &view.ips {
            add(i, FrontendKind::ClusterIp, ip, sp.port);
        }
        for &ip in view.external_ips.iter().filter(in_families) {
            add(i, FrontendKind::ExternalIp, ip, sp.port);
        }
        for &ip in view.load_balancer_ips.iter().filter(in_families) {
            add(i, FrontendKind::LoadBalancer, ip, sp.port);
        }
    }
    for (i, sp) in view.ports.iter().enumerate() {
        let Some(node_port) = sp.node_port else {
            continue;
        };
        for &ip in ctx.node_ips.iter().filter(in_families) {
            add(i, FrontendKind::NodePort, ip, node_port);
        }
    }

    let mut infos = Vec::new();
    for (i, sp) in view.ports.iter().enumerate() {
        for &family in &families {
            let Some(&cluster_ip) = view.ips.iter().find(|ip| Family::of(**ip) == family) else {
                continue;
            };
            let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
                ips.iter()
                    .copied()
                    .filter(|ip| Family::of(*ip) == family)
                    .collect()
            };
            let e = &endpoints[&(i, family)];
            let mut info = ServicePortInfo {
                name: ServicePortName {
                    namespace: view.namespace.to_owned(),
                    name: view.name.to_owned(),
                    port: sp.name.to_owned(),
                },
                protocol: sp.protocol,
                family,
                cluster_ip,
                port: sp.port,
                node_port: sp.node_port,
                external_ips: of_family(&view.external_ips),
                load_balancer_ips: of_family(&view.load_balancer_ips),
                load_balancer_source_ranges: view
                    .load_balancer_source_ranges
                    .iter()
                    .filter(|net| Family::of(net.addr()) == family)
                    .copied()
                    .collect(),
                internal_policy_local: view.internal_local,
                external_policy_local: false,
                session_affinity: view.session_affinity,
                health_check_node_port: view.health_check_node_port,
                cluster_endpoints: Vec::new(),
                local_endpoints: Vec::new(),
                has_endpoints: e.any,
            };
            info.external_policy_local = view.external_local && info.externally_accessible();
            if info.uses_cluster_endpoints() {
                info.cluster_endpoints = e.cluster.clone();
            }
            if info.uses_local_endpoints() {
                info.local_endpoints = e.local.clone();
            }
            infos.push(info);
        }
    }
    (out, infos)
}
