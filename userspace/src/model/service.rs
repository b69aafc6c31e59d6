//! Service parsing: a Service object reduced to what the model uses, checked once.
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::cidr::parse_ip;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::*;

/// Checks a Service the way kpr needs it to be well-formed (metadata name, known type, parseable
/// ClusterIP(s), ports with a valid number, nodePort and a known protocol, traffic policies,
/// session affinity). Sources call this per document so that a bad object is reported with its
/// origin and skipped. A bad externalIP, load-balancer ingress IP or source range is not an
/// error here: the model skips that entry alone, as kube-proxy does.
pub fn validate_service(svc: &Service) -> Result<(), ModelError> {
    parse_service(svc, &mut Vec::new()).map(|_| ())
}

/// A Service reduced to what the model uses, already checked.
pub(super) struct ServiceView<'a> {
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
    /// ClusterIPs; their families are the families the Service is proxied in.
    pub(super) ips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePortView<'a>>,
    pub(super) external_ips: Vec<IpAddr>,
    /// VIP-mode load-balancer ingress IPs (type LoadBalancer only).
    pub(super) load_balancer_ips: Vec<IpAddr>,
    pub(super) load_balancer_source_ranges: Vec<IpNet>,
    /// `internalTrafficPolicy: Local`.
    pub(super) internal_local: bool,
    /// `externalTrafficPolicy: Local` (kube-proxy's `ExternalPolicyLocal` also requires an
    /// external destination; without one there is no frontend it applies to).
    pub(super) external_local: bool,
    pub(super) session_affinity: Option<Duration>,
    pub(super) health_check_node_port: Option<u16>,
}

pub(super) struct ServicePortView<'a> {
    pub(super) name: &'a str,
    pub(super) port: u16,
    pub(super) protocol: Protocol,
    /// The nodePort of a NodePort/LoadBalancer Service port; always `None` for slice ports.
    pub(super) node_port: Option<u16>,
}

impl ServiceView<'_> {
    pub(super) fn error(&self, reason: &str) -> ModelError {
        ModelError::InvalidService {
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// `Ok(None)`: a valid Service that kube-proxy does not proxy (headless, ExternalName, or
/// claimed by another proxy). An entry kube-proxy would skip (an externalIP, a load-balancer
/// ingress IP or a source range that does not parse) is left out, with its reason in
/// `skipped`.
pub(super) fn parse_service<'a>(
    svc: &'a Service,
    skipped: &mut Vec<ModelError>,
) -> Result<Option<ServiceView<'a>>, ModelError> {
    let namespace = namespace_of(&svc.metadata);
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let fail = |reason: String| ModelError::InvalidService {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(fail("metadata.name is missing".into()));
    }
    if let Some(label) = [LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME]
        .into_iter()
        .find(|l| has_label(&svc.metadata, l))
    {
        tracing::debug!("Service {namespace}/{name}: not proxied (label {label})");
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    let type_ = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Ok(None),
        Some(other) => return Err(fail(format!("unknown type {other:?}"))),
    };
    // kube-proxy keys "is this Service proxied" on the primary ClusterIP alone.
    let primary = spec.cluster_ip.as_deref().unwrap_or_default();
    if primary.is_empty() || primary == "None" {
        return Ok(None);
    }

    let ip_strings: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => vec![primary],
    };
    let mut ips = Vec::with_capacity(ip_strings.len());
    for s in ip_strings {
        let ip = parse_ip(s).map_err(|_| fail(format!("invalid ClusterIP {s:?}")))?;
        if ips.contains(&ip) {
            return Err(fail(format!("ClusterIP {ip} is listed twice")));
        }
        ips.push(ip);
    }
    // `ipFamilies` names the family of each ClusterIP, in order (the API server keeps them
    // alike). kube-proxy takes, per family, the ClusterIP at that family's index in
    // `ipFamilies`; were they to disagree, its proxier of one family would be handed the other
    // family's address. kpr serves every ClusterIP in its own family instead, and says so.
    if let Some(families) = spec.ip_families.as_deref().filter(|f| !f.is_empty()) {
        let named = |f: &str| match f {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        };
        let disagree = families.len() != ips.len()
            || families
                .iter()
                .zip(&ips)
                .any(|(f, ip)| named(f) != Some(Family::of(*ip)));
        if disagree {
            skipped.push(fail(format!(
                "ipFamilies {families:?} disagree with clusterIPs {ips:?}; the check is skipped \
                 and each ClusterIP is served in its own address family"
            )));
        }
    }

    let has_node_ports = matches!(type_, ServiceType::NodePort | ServiceType::LoadBalancer);
    let mut ports: Vec<ServicePortView<'_>> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| {
                fail(format!(
                    "ports[{i}]: port {} is out of range 1-65535",
                    p.port
                ))
            })?;
        let protocol = parse_protocol(p.protocol.as_deref())
            .map_err(|reason| fail(format!("ports[{i}]: {reason}")))?;
        let name = p.name.as_deref().unwrap_or_default();
        // Either duplicate would make two frontends share a key or a slice port ambiguous.
        if ports
            .iter()
            .any(|q| q.port == port && q.protocol == protocol)
        {
            return Err(fail(format!(
                "ports[{i}]: port {port}/{} is listed twice",
                protocol.as_lower()
            )));
        }
        if ports
            .iter()
            .any(|q| q.name == name && q.protocol == protocol)
        {
            return Err(fail(format!(
                "ports[{i}]: port name {name:?} is used twice for {}",
                protocol.as_lower()
            )));
        }
        // 0 or absent: not allocated (e.g. `allocateLoadBalancerNodePorts: false`). Other types
        // cannot have one (the API server refuses it); it is ignored there.
        let node_port = match p.node_port.filter(|_| has_node_ports) {
            None | Some(0) => None,
            Some(n) => Some(u16::try_from(n).ok().ok_or_else(|| {
                fail(format!("ports[{i}]: nodePort {n} is out of range 1-65535"))
            })?),
        };
        ports.push(ServicePortView {
            name,
            port,
            protocol,
            node_port,
        });
    }

    let mut external_ips = Vec::new();
    for (i, s) in spec.external_ips.iter().flatten().enumerate() {
        match parse_ip(s) {
            Ok(ip) => external_ips.push(ip),
            Err(_) => skipped.push(fail(format!(
                "externalIPs[{i}]: invalid IP {s:?}; that externalIP is skipped"
            ))),
        }
    }

    let mut load_balancer_ips = Vec::new();
    if type_ == ServiceType::LoadBalancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default();
        for (i, ing) in ingress.iter().enumerate() {
            // Hostname-only entries are for DNS; kube-proxy programs nothing for them.
            let Some(s) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
                continue;
            };
            let Ok(ip) = parse_ip(s) else {
                skipped.push(fail(format!(
                    "status.loadBalancer.ingress[{i}]: invalid ip {s:?}; that ingress is skipped"
                )));
                continue;
            };
            // kube-proxy's IsVIPMode: absent or "VIP". A "Proxy" load balancer delivers to the
            // node addresses itself; capturing its IP on the node would bypass it.
            if ing.ip_mode.as_deref().is_some_and(|m| m != "VIP") {
                tracing::debug!(
                    "Service {namespace}/{name}: load-balancer IP {ip} is not in VIP mode; not served"
                );
                continue;
            }
            load_balancer_ips.push(ip);
        }
    }

    let mut load_balancer_source_ranges = Vec::new();
    for (i, s) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        // API validation trims whitespace before checking, so kube-proxy trims too.
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        // kube-proxy keeps the network (Go's `*IPNet`): the host bits are cleared.
        match crate::cidr::parse(s) {
            Ok(cidr) => load_balancer_source_ranges.push(cidr.trunc()),
            Err(e) => skipped.push(fail(format!(
                "loadBalancerSourceRanges[{i}]: {e}; that range is skipped"
            ))),
        }
    }

    let internal_local = parse_policy(spec.internal_traffic_policy.as_deref())
        .map_err(|e| fail(format!("internalTrafficPolicy: {e}")))?;
    let external_local = parse_policy(spec.external_traffic_policy.as_deref())
        .map_err(|e| fail(format!("externalTrafficPolicy: {e}")))?;
    let session_affinity = parse_session_affinity(spec).map_err(fail)?;

    // kube-proxy's NeedsHealthCheck: only a LoadBalancer with the Local external policy.
    let health_check_node_port =
        if type_ == ServiceType::LoadBalancer && external_local {
            match spec.health_check_node_port {
                None | Some(0) => None,
                Some(n) => Some(u16::try_from(n).ok().ok_or_else(|| {
                    fail(format!("healthCheckNodePort {n} is out of range 1-65535"))
                })?),
            }
        } else {
            None
        };

    Ok(Some(ServiceView {
        namespace,
        name,
        ips,
        ports,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        internal_local,
        external_local,
        session_affinity,
        health_check_node_port,
    }))
}

/// A traffic policy: `Ok(true)` for `Local`; absent means `Cluster`.
pub(super) fn parse_policy(p: Option<&str>) -> Result<bool, String> {
    match p {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(format!("unknown policy {other:?}")),
    }
}

pub(super) fn parse_session_affinity(spec: &ServiceSpec) -> Result<Option<Duration>, String> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_SESSION_AFFINITY_TIMEOUT)),
                Some(s) => u64::try_from(s)
                    .ok()
                    .map(Duration::from_secs)
                    .filter(|d| !d.is_zero() && *d <= MAX_SESSION_AFFINITY_TIMEOUT)
                    .map(Some)
                    .ok_or_else(|| {
                        format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {s} is out of range 1-{}",
                            MAX_SESSION_AFFINITY_TIMEOUT.as_secs()
                        )
                    }),
            }
        }
        Some(other) => Err(format!("unknown sessionAffinity {other:?}")),
    }
}
