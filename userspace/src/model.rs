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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IANA protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Lower-case name, as kube-proxy uses it in chain-name hashes and iptables `-p`.
    pub const fn as_lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// kube-proxy's ServicePortName: `namespace/name:port` (`namespace/name` when the port is unnamed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name`; empty for a single unnamed port.
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// An address:port:protocol that clients dial: a ClusterIP, a node address with a NodePort, an
/// externalIP or a load-balancer IP, with the Service port (the NodePort for node addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol.as_lower()),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol.as_lower()),
        }
    }
}

/// A backend address:port (an endpoint with the resolved target port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// Which address of a Service a frontend is. Everything but `ClusterIp` is "external" in
/// kube-proxy's sense (`ExternallyAccessible`): reachable from outside the cluster, and subject
/// to the external traffic policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// One of `spec.clusterIPs` × a Service port.
    #[default]
    ClusterIp,
    /// A node address ([`NodeContext::node_ips`]) × a port's `nodePort`.
    NodePort,
    /// One of `spec.externalIPs` × a Service port.
    ExternalIp,
    /// One of `status.loadBalancer.ingress[].ip` (VIP mode) × a Service port.
    LoadBalancer,
}

impl FrontendKind {
    /// NodePort, externalIP and load-balancer frontends: kube-proxy's external destinations.
    pub const fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// One service port on one frontend, as it should be programmed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePortState {
    pub name: ServicePortName,
    pub kind: FrontendKind,
    /// Backends for clients on this node (pods and host processes; the socket-level path),
    /// sorted and de-duplicated. Empty means "reject": no usable endpoint.
    ///
    /// ClusterIP frontends: `internalTrafficPolicy: Local` → this node's endpoints (ready, else
    /// serving-terminating), otherwise the cluster's (ready, else serving-terminating).
    /// External frontends: the cluster's endpoints whatever the policies (kube-proxy's short
    /// circuit; a Service with an external frontend always "uses cluster endpoints").
    pub backends: Vec<Backend>,
    /// Backends for traffic arriving from outside the node (the tc path), sorted and
    /// de-duplicated; empty means "no endpoint for external traffic".
    /// `externalTrafficPolicy: Local` → this node's endpoints only (ready, else
    /// serving-terminating); `Cluster` → the cluster's. Equal to `backends` on ClusterIP
    /// frontends.
    pub external_backends: Vec<Backend>,
    /// `externalTrafficPolicy: Local` on an external frontend: outside traffic keeps its client
    /// address (no masquerade) and is dropped when this node has no endpoint.
    pub external_policy_local: bool,
    /// Traffic from outside must be source-NATed to the node: `externalTrafficPolicy: Cluster`
    /// and some external backend lives on another node (its reply would not come back through
    /// this node). Like Cilium, and unlike kube-proxy, traffic to a backend on this node keeps
    /// the client's address even with `Cluster`: the reply returns through this node anyway.
    pub external_snat: bool,
    /// `sessionAffinity: ClientIP`: how long a client stays on its backend
    /// (`sessionAffinityConfig.clientIP.timeoutSeconds`, default 10800 s). Same on every
    /// frontend of the Service.
    pub session_affinity: Option<Duration>,
    /// `spec.loadBalancerSourceRanges` of this frontend's address family (kube-proxy filters
    /// them per family), as network address and prefix length with host bits cleared. Only on
    /// LoadBalancer frontends; empty means "any source".
    pub load_balancer_source_ranges: Vec<(IpAddr, u8)>,
    /// `spec.healthCheckNodePort` of a `type: LoadBalancer` Service with
    /// `externalTrafficPolicy: Local` (kube-proxy's `NeedsHealthCheck`), on every frontend of the
    /// Service.
    pub health_check_node_port: Option<u16>,
    /// kube-proxy's `localEndpoints` for the service health server (`LocalReadyEndpoints`): this
    /// node's ready endpoints of the Service in this frontend's address family, counted once per
    /// Service port (a pod serving two ports counts twice). Same on every frontend of the
    /// Service and family; 0 when the node name is unknown.
    pub local_endpoints: usize,
}

/// Everything the dataplane should serve, keyed by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, ServicePortState>,
}

/// What the model needs to know about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name: endpoints whose `nodeName` equals it are local. `None` (or empty):
    /// no endpoint is local.
    pub node_name: Option<String>,
    /// The addresses NodePorts are served on, already filtered by `--nodeport-addresses`.
    /// Empty: no NodePort frontends.
    pub node_ips: Vec<IpAddr>,
}

/// Why an object was not used. Carries enough to name the object in a log line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("Service {namespace}/{name}: {reason}")]
    InvalidService {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("EndpointSlice {namespace}/{name}: {reason}")]
    InvalidSlice {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// Label that ties an EndpointSlice to its Service (same namespace).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label are handled by the cluster's headless machinery, not a proxy.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Services carrying this label ask for a different proxy; kube-proxy ignores them whatever the
/// value, and so do we.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent (the API server's default).
pub const DEFAULT_SESSION_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
/// The longest ClientIP affinity the API server accepts (`MaxClientIPServiceAffinitySeconds`).
pub const MAX_SESSION_AFFINITY_TIMEOUT: Duration = Duration::from_secs(86_400);

// Manifests often omit the namespace; `kubectl apply` would put them in "default", so the
// Service and its slices must agree on that.
const DEFAULT_NAMESPACE: &str = "default";

/// Checks a Service the way kpr needs it to be well-formed (metadata name, known type, parseable
/// ClusterIP(s), ports with a valid number, nodePort and a known protocol, externalIPs,
/// load-balancer ingress IPs, source ranges, traffic policies, session affinity). Sources call
/// this per document so that a bad object is reported with its origin and skipped.
pub fn validate_service(svc: &Service) -> Result<(), ModelError> {
    parse_service(svc).map(|_| ())
}

/// Checks an EndpointSlice (name, service-name label, address type, parseable addresses
/// for IPv4/IPv6 slices, port numbers).
pub fn validate_slice(slice: &EndpointSlice) -> Result<(), ModelError> {
    parse_slice(slice).map(|_| ())
}

/// Builds the desired state without knowing the node: ClusterIP, externalIP and load-balancer
/// frontends, no NodePort frontends (no node addresses), and no endpoint is local (so
/// `internalTrafficPolicy: Local` ClusterIPs and `externalTrafficPolicy: Local` external traffic
/// have no backends). Same as [`build_for_node`] with an empty [`NodeContext`].
pub fn build(services: &[Service], slices: &[EndpointSlice]) -> (DesiredState, Vec<ModelError>) {
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
pub fn build_for_node(
    services: &[Service],
    slices: &[EndpointSlice],
    ctx: &NodeContext,
) -> (DesiredState, Vec<ModelError>) {
    let mut errors = Vec::new();

    let mut slices_by_service: BTreeMap<(&str, &str), Vec<SliceView<'_>>> = BTreeMap::new();
    for slice in slices {
        match parse_slice(slice) {
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
        match parse_service(svc) {
            Ok(Some(view)) => views.push(view),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    // Processing in name order makes the winner of any conflict independent of input order.
    views.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));

    let mut state = DesiredState::default();
    let mut seen = BTreeSet::new();
    // Round one: ClusterIP frontends. Two Services claiming one ClusterIP:port is something the
    // API server prevents; from hand-written manifests it can happen.
    let mut kept = Vec::new();
    for view in &views {
        if !seen.insert((view.namespace, view.name)) {
            errors.push(view.error("defined more than once; the first definition is used"));
            continue;
        }
        let slices = slices_by_service
            .get(&(view.namespace, view.name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (internal, external): (Vec<_>, Vec<_>) = service_ports(view, slices, ctx)
            .into_iter()
            .partition(|(_, s)| s.kind == FrontendKind::ClusterIp);
        if let Some(e) = conflict(&state, view, &internal) {
            errors.push(e);
            continue;
        }
        let internal_frontends: Vec<Frontend> = internal.iter().map(|(f, _)| *f).collect();
        state.services.extend(internal);
        kept.push((view, internal_frontends, external));
    }
    // Round two: external frontends.
    for (view, internal, external) in kept {
        if let Some(e) = conflict(&state, view, &external) {
            errors.push(e);
            for f in &internal {
                state.services.remove(f);
            }
            continue;
        }
        state.services.extend(external);
    }
    (state, errors)
}

/// The error for the first of `ports` that `state` already serves.
fn conflict(
    state: &DesiredState,
    view: &ServiceView<'_>,
    ports: &[(Frontend, ServicePortState)],
) -> Option<ModelError> {
    ports.iter().find_map(|(f, _)| {
        state
            .services
            .get(f)
            .map(|owner| view.error(&format!("frontend {f} is already used by {}", owner.name)))
    })
}

/// A Service reduced to what the model uses, already checked.
struct ServiceView<'a> {
    namespace: &'a str,
    name: &'a str,
    /// ClusterIPs; their families are the families the Service is proxied in.
    ips: Vec<IpAddr>,
    ports: Vec<ServicePortView<'a>>,
    external_ips: Vec<IpAddr>,
    /// VIP-mode load-balancer ingress IPs (type LoadBalancer only).
    load_balancer_ips: Vec<IpAddr>,
    load_balancer_source_ranges: Vec<(IpAddr, u8)>,
    /// `internalTrafficPolicy: Local`.
    internal_local: bool,
    /// `externalTrafficPolicy: Local` (kube-proxy's `ExternalPolicyLocal` also requires an
    /// external destination; without one there is no frontend it applies to).
    external_local: bool,
    session_affinity: Option<Duration>,
    health_check_node_port: Option<u16>,
}

struct ServicePortView<'a> {
    name: &'a str,
    port: u16,
    protocol: Protocol,
    /// The nodePort of a NodePort/LoadBalancer Service port; always `None` for slice ports.
    node_port: Option<u16>,
}

impl ServiceView<'_> {
    fn error(&self, reason: &str) -> ModelError {
        ModelError::InvalidService {
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// `Ok(None)`: a valid Service that kube-proxy does not proxy (headless, ExternalName, or
/// claimed by another proxy).
fn parse_service(svc: &Service) -> Result<Option<ServiceView<'_>>, ModelError> {
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
        let ip: IpAddr = s
            .parse()
            .map_err(|_| fail(format!("invalid ClusterIP {s:?}")))?;
        if ips.contains(&ip) {
            return Err(fail(format!("ClusterIP {ip} is listed twice")));
        }
        ips.push(ip);
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
    for s in spec.external_ips.iter().flatten() {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| fail(format!("invalid externalIP {s:?}")))?;
        external_ips.push(ip);
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
            let ip: IpAddr = s.parse().map_err(|_| {
                fail(format!(
                    "status.loadBalancer.ingress[{i}]: invalid ip {s:?}"
                ))
            })?;
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
        let cidr = parse_cidr(s)
            .ok_or_else(|| fail(format!("loadBalancerSourceRanges[{i}]: invalid CIDR {s:?}")))?;
        load_balancer_source_ranges.push(cidr);
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
fn parse_policy(p: Option<&str>) -> Result<bool, String> {
    match p {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(format!("unknown policy {other:?}")),
    }
}

fn parse_session_affinity(spec: &ServiceSpec) -> Result<Option<Duration>, String> {
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

/// `addr/len`, as Go's `net.ParseCIDR` reads it: the address with its host bits cleared.
fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(ip) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            Some((IpAddr::V4(Ipv4Addr::from(u32::from(ip) & mask)), len))
        }
        IpAddr::V6(ip) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            Some((IpAddr::V6(Ipv6Addr::from(u128::from(ip) & mask)), len))
        }
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// An EndpointSlice reduced to what the model uses, already checked.
struct SliceView<'a> {
    namespace: &'a str,
    service: &'a str,
    family: Family,
    /// Only ports that carry a number.
    ports: Vec<ServicePortView<'a>>,
    /// Only endpoints that have an address.
    endpoints: Vec<EndpointView<'a>>,
}

struct EndpointView<'a> {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// `nodeName`: the endpoint is local to the node of that name.
    node_name: Option<&'a str>,
}

/// `Ok(None)`: an FQDN slice, which kube-proxy ignores.
fn parse_slice(slice: &EndpointSlice) -> Result<Option<SliceView<'_>>, ModelError> {
    let namespace = namespace_of(&slice.metadata);
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    let fail = |reason: String| ModelError::InvalidSlice {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(fail("metadata.name is missing".into()));
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        "FQDN" => {
            tracing::debug!("EndpointSlice {namespace}/{name}: FQDN slices are not proxied");
            return Ok(None);
        }
        other => return Err(fail(format!("unsupported addressType {other:?}"))),
    };
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail(format!("label {LABEL_SERVICE_NAME} is missing")))?;

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = parse_protocol(p.protocol.as_deref())
            .map_err(|reason| fail(format!("ports[{i}]: {reason}")))?;
        // A port without a number would mean "all ports", which kube-proxy does not implement.
        let Some(number) = p.port else { continue };
        let port = u16::try_from(number)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| fail(format!("ports[{i}]: port {number} is out of range 1-65535")))?;
        ports.push(ServicePortView {
            name: p.name.as_deref().unwrap_or_default(),
            port,
            protocol,
            node_port: None,
        });
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        for a in &ep.addresses {
            match a.parse::<IpAddr>() {
                Ok(ip) if Family::of(ip) == family => {}
                _ => {
                    return Err(fail(format!(
                        "endpoints[{i}]: {a:?} is not an {} address",
                        slice.address_type
                    )));
                }
            }
        }
        // Like kube-proxy: an endpoint is its first address; one without any is ignored.
        let Some(ip) = ep.addresses.first().and_then(|a| a.parse().ok()) else {
            continue;
        };
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(EndpointView {
            ip,
            ready,
            // kube-proxy (endpointslicecache.go) and the API docs read a missing `serving` as
            // true, not as a copy of `ready`.
            serving: c.and_then(|c| c.serving).unwrap_or(true),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.as_deref(),
        });
    }
    Ok(Some(SliceView {
        namespace,
        service,
        family,
        ports,
        endpoints,
    }))
}

/// The frontends of one Service with their backends. A frontend listed twice within the
/// Service keeps its first kind, in kube-proxy's rule order: ClusterIP, externalIP,
/// load-balancer IP (per port, as in `KUBE-SERVICES`), then NodePorts (`KUBE-NODEPORTS`, last).
fn service_ports(
    view: &ServiceView<'_>,
    slices: &[SliceView<'_>],
    ctx: &NodeContext,
) -> BTreeMap<Frontend, ServicePortState> {
    let node = ctx.node_name.as_deref().filter(|n| !n.is_empty());
    // kube-proxy runs one proxier per family, and each proxies only the Services with a
    // ClusterIP of its family: an externalIP, LB IP or node address of another family is unused.
    let families: BTreeSet<Family> = view.ips.iter().map(|&ip| Family::of(ip)).collect();
    let in_families = |ip: &&IpAddr| families.contains(&Family::of(**ip));

    let mut endpoints: BTreeMap<(usize, Family), Endpoints> = BTreeMap::new();
    let mut local_ready: BTreeMap<Family, usize> = BTreeMap::new();
    for (i, port) in view.ports.iter().enumerate() {
        for &family in &families {
            let e = categorize(family, port, slices, node);
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
                external_snat,
                session_affinity: view.session_affinity,
                load_balancer_source_ranges: if kind == FrontendKind::LoadBalancer {
                    view.load_balancer_source_ranges
                        .iter()
                        .filter(|(net, _)| Family::of(*net) == family)
                        .copied()
                        .collect()
                } else {
                    Vec::new()
                },
                health_check_node_port: view.health_check_node_port,
                local_endpoints: local_ready.get(&family).copied().unwrap_or_default(),
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
    out
}

/// One Service port's endpoints in one family, by traffic policy (kube-proxy's
/// `CategorizeEndpoints`, without topology hints).
struct Endpoints {
    /// `Cluster` policy: ready endpoints, or, when there are none, the ones that still serve
    /// while terminating so that connections drain instead of being rejected.
    cluster: Vec<Backend>,
    /// `Local` policy: this node's ready endpoints, or, when there are none, this node's
    /// serving-terminating ones (independently of the cluster-wide fallback).
    local: Vec<Backend>,
    /// This node's ready endpoints.
    local_ready: usize,
}

fn categorize(
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
        local,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn svc(ns: &str, name: &str, spec: Value) -> Service {
        svc_obj(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
    }

    fn svc_obj(v: Value) -> Service {
        serde_json::from_value(v).expect("test Service")
    }

    /// A ClusterIP Service with the given IPs and `[name, port, protocol]` ports.
    fn cluster_ip(ns: &str, name: &str, ips: &[&str], ports: Value) -> Service {
        svc(
            ns,
            name,
            json!({"clusterIP": ips[0], "clusterIPs": ips, "ports": ports}),
        )
    }

    fn slice(
        ns: &str,
        name: &str,
        service: &str,
        family: &str,
        ports: Value,
        endpoints: Value,
    ) -> EndpointSlice {
        slice_obj(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {LABEL_SERVICE_NAME: service}},
            "addressType": family,
            "ports": ports,
            "endpoints": endpoints,
        }))
    }

    fn slice_obj(v: Value) -> EndpointSlice {
        serde_json::from_value(v).expect("test EndpointSlice")
    }

    fn ready(ip: &str) -> Value {
        json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}})
    }

    fn fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            ip: ip.parse().expect("test IP"),
            port,
            protocol,
        }
    }

    fn be(ip: &str, port: u16) -> Backend {
        Backend {
            ip: ip.parse().expect("test IP"),
            port,
        }
    }

    fn backends(state: &DesiredState, f: Frontend) -> Vec<Backend> {
        state
            .services
            .get(&f)
            .unwrap_or_else(|| {
                panic!(
                    "no frontend {f} in {:?}",
                    state.services.keys().collect::<Vec<_>>()
                )
            })
            .backends
            .clone()
    }

    fn web() -> (Service, EndpointSlice) {
        (
            cluster_ip(
                "demo",
                "web",
                &["10.96.0.10"],
                json!([{"name": "http", "port": 80}]),
            ),
            slice(
                "demo",
                "web-1",
                "web",
                "IPv4",
                json!([{"name": "http", "port": 8080}]),
                json!([ready("10.244.0.3"), ready("10.244.0.1")]),
            ),
        )
    }

    #[test]
    fn basic_service_gets_sorted_backends_and_port_name() {
        let (s, sl) = web();
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        assert_eq!(state.services.len(), 1);
        let f = fe("10.96.0.10", 80, Protocol::Tcp);
        assert_eq!(
            backends(&state, f),
            vec![be("10.244.0.1", 8080), be("10.244.0.3", 8080)]
        );
        let name = &state.services[&f].name;
        assert_eq!(name.to_string(), "demo/web:http");
    }

    #[test]
    fn headless_and_unset_cluster_ip_are_skipped_silently() {
        let ports = json!([{"port": 80}]);
        let services = [
            svc("a", "none", json!({"clusterIP": "None", "ports": ports})),
            svc("a", "empty", json!({"clusterIP": "", "ports": ports})),
            svc("a", "absent", json!({"ports": ports})),
            svc_obj(json!({"metadata": {"name": "nospec"}})),
        ];
        for s in &services {
            assert_eq!(validate_service(s), Ok(()));
        }
        let (state, errors) = build(&services, &[]);
        assert_eq!(errors, vec![]);
        assert!(state.services.is_empty(), "{:?}", state.services);
    }

    #[test]
    fn external_name_is_skipped_silently() {
        let s = svc(
            "a",
            "ext",
            json!({"type": "ExternalName", "externalName": "example.com", "clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
        );
        let (state, errors) = build(&[s], &[]);
        assert_eq!(errors, vec![]);
        assert!(state.services.is_empty());
    }

    #[test]
    fn services_labelled_for_other_proxies_are_skipped() {
        for label in [LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME] {
            let s = svc_obj(json!({
                "metadata": {"namespace": "a", "name": "x", "labels": {label: ""}},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
            }));
            let (state, errors) = build(&[s], &[]);
            assert_eq!(errors, vec![], "{label}");
            assert!(state.services.is_empty(), "{label}");
        }
    }

    #[test]
    fn protocol_defaults_to_tcp_and_udp_sctp_are_kept_apart() {
        let s = cluster_ip(
            "a",
            "p",
            &["10.96.0.1"],
            json!([{"name": "a", "port": 53}, {"name": "b", "port": 53, "protocol": "UDP"}, {"name": "c", "port": 53, "protocol": "SCTP"}]),
        );
        let (state, errors) = build(&[s], &[]);
        assert_eq!(errors, vec![]);
        let keys: Vec<Frontend> = state.services.keys().copied().collect();
        assert_eq!(
            keys,
            vec![
                fe("10.96.0.1", 53, Protocol::Tcp),
                fe("10.96.0.1", 53, Protocol::Udp),
                fe("10.96.0.1", 53, Protocol::Sctp),
            ]
        );
    }

    #[test]
    fn frontend_without_endpoints_exists_with_no_backends() {
        let (s, _) = web();
        let (state, errors) = build(&[s], &[]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![]
        );
    }

    fn assert_invalid_service(s: Service, needle: &str) {
        let err = validate_service(&s).expect_err(needle);
        match &err {
            ModelError::InvalidService { reason, .. } => {
                assert!(
                    reason.contains(needle),
                    "{reason:?} should mention {needle:?}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        let (good, _) = web();
        let (state, errors) = build(&[s, good], &[]);
        assert_eq!(errors, vec![err]);
        assert_eq!(state.services.len(), 1, "the valid Service is kept");
    }

    #[test]
    fn invalid_services_are_reported_and_skipped_without_affecting_others() {
        assert_invalid_service(
            cluster_ip("a", "bad-ip", &["10.96.0.300"], json!([{"port": 80}])),
            "invalid ClusterIP",
        );
        // A bad secondary IP spoils the Service as a whole, not just one family.
        assert_invalid_service(
            cluster_ip(
                "a",
                "bad-ip6",
                &["10.96.0.3", "fd00::zz"],
                json!([{"port": 80}]),
            ),
            "invalid ClusterIP \"fd00::zz\"",
        );
        assert_invalid_service(
            cluster_ip("a", "p0", &["10.96.0.3"], json!([{"port": 0}])),
            "out of range",
        );
        assert_invalid_service(
            cluster_ip("a", "pbig", &["10.96.0.3"], json!([{"port": 65536}])),
            "out of range",
        );
        assert_invalid_service(
            cluster_ip(
                "a",
                "proto",
                &["10.96.0.3"],
                json!([{"port": 80, "protocol": "tcp"}]),
            ),
            "unknown protocol",
        );
        assert_invalid_service(
            svc_obj(json!({"metadata": {"namespace": "a"}, "spec": {"clusterIP": "10.96.0.3"}})),
            "metadata.name",
        );
        assert_invalid_service(
            cluster_ip(
                "a",
                "dup",
                &["10.96.0.3"],
                json!([{"name": "x", "port": 80}, {"name": "y", "port": 80}]),
            ),
            "listed twice",
        );
    }

    #[test]
    fn cluster_ip_is_used_when_cluster_ips_is_absent() {
        let s = svc(
            "a",
            "old",
            json!({"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}),
        );
        let (state, errors) = build(&[s], &[]);
        assert_eq!(errors, vec![]);
        assert!(state
            .services
            .contains_key(&fe("10.96.0.7", 80, Protocol::Tcp)));
    }

    #[test]
    fn dual_stack_frontends_get_backends_of_their_own_family() {
        let s = cluster_ip(
            "a",
            "ds",
            &["10.96.0.5", "fd00:96::5"],
            json!([{"port": 80}]),
        );
        let v4 = slice(
            "a",
            "ds-4",
            "ds",
            "IPv4",
            json!([{"port": 8080}]),
            json!([ready("10.244.0.5")]),
        );
        let v6 = slice(
            "a",
            "ds-6",
            "ds",
            "IPv6",
            json!([{"port": 8080}]),
            json!([ready("fd00:244::5")]),
        );
        let (state, errors) = build(&[s], &[v6, v4]);
        assert_eq!(errors, vec![]);
        assert_eq!(state.services.len(), 2);
        assert_eq!(
            backends(&state, fe("10.96.0.5", 80, Protocol::Tcp)),
            vec![be("10.244.0.5", 8080)]
        );
        assert_eq!(
            backends(&state, fe("fd00:96::5", 80, Protocol::Tcp)),
            vec![be("fd00:244::5", 8080)]
        );
    }

    #[test]
    fn named_target_ports_resolve_by_name_and_protocol() {
        let s = cluster_ip(
            "a",
            "multi",
            &["10.96.0.9"],
            json!([
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "metrics", "port": 9090, "targetPort": "prom"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]),
        );
        // Port order in the slice differs from the Service, and "dns" exists only for TCP.
        let sl = slice(
            "a",
            "multi-x",
            "multi",
            "IPv4",
            json!([
                {"name": "metrics", "port": 9100},
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "TCP"},
            ]),
            json!([ready("10.244.1.1")]),
        );
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.9", 80, Protocol::Tcp)),
            vec![be("10.244.1.1", 8080)]
        );
        assert_eq!(
            backends(&state, fe("10.96.0.9", 9090, Protocol::Tcp)),
            vec![be("10.244.1.1", 9100)]
        );
        assert_eq!(backends(&state, fe("10.96.0.9", 53, Protocol::Udp)), vec![]);
    }

    #[test]
    fn unnamed_ports_match_empty_and_missing_names() {
        let s = cluster_ip("a", "u", &["10.96.0.2"], json!([{"port": 80}]));
        let missing = slice(
            "a",
            "u-1",
            "u",
            "IPv4",
            json!([{"port": 8080}]),
            json!([ready("10.244.0.1")]),
        );
        let empty = slice(
            "a",
            "u-2",
            "u",
            "IPv4",
            json!([{"name": "", "port": 8080}]),
            json!([ready("10.244.0.2")]),
        );
        let named = slice(
            "a",
            "u-3",
            "u",
            "IPv4",
            json!([{"name": "x", "port": 8080}]),
            json!([ready("10.244.0.3")]),
        );
        let (state, errors) = build(&[s], &[missing, empty, named]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.2", 80, Protocol::Tcp)),
            vec![be("10.244.0.1", 8080), be("10.244.0.2", 8080)]
        );
        assert_eq!(
            state.services[&fe("10.96.0.2", 80, Protocol::Tcp)]
                .name
                .to_string(),
            "a/u"
        );
    }

    fn endpoint(
        ip: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Value {
        json!({"addresses": [ip], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn backends_of(endpoints: Value) -> Vec<Backend> {
        let (s, _) = web();
        let sl = slice(
            "demo",
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            endpoints,
        );
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        backends(&state, fe("10.96.0.10", 80, Protocol::Tcp))
    }

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let got = backends_of(json!([
            endpoint("10.0.0.1", Some(true), Some(true), Some(false)),
            endpoint("10.0.0.2", Some(false), Some(true), Some(true)),
            endpoint("10.0.0.3", Some(false), Some(false), Some(false)),
        ]));
        assert_eq!(got, vec![be("10.0.0.1", 8080)]);
    }

    #[test]
    fn without_ready_endpoints_serving_terminating_ones_are_used() {
        let got = backends_of(json!([
            endpoint("10.0.0.2", Some(false), Some(true), Some(true)),
            endpoint("10.0.0.3", Some(false), Some(false), Some(true)),
            endpoint("10.0.0.4", Some(false), Some(true), Some(false)),
            endpoint("10.0.0.5", Some(false), None, Some(true)),
        ]));
        assert_eq!(got, vec![be("10.0.0.2", 8080), be("10.0.0.5", 8080)]);
    }

    #[test]
    fn missing_conditions_mean_ready() {
        let got = backends_of(json!([
            {"addresses": ["10.0.0.1"]},
            endpoint("10.0.0.2", None, None, None),
            endpoint("10.0.0.3", Some(false), None, None),
        ]));
        assert_eq!(got, vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]);
    }

    #[test]
    fn not_ready_and_not_terminating_means_reject() {
        let got = backends_of(json!([endpoint(
            "10.0.0.1",
            Some(false),
            Some(false),
            Some(false)
        )]));
        assert_eq!(got, vec![]);
    }

    #[test]
    fn only_the_first_address_is_used_and_empty_endpoints_are_ignored() {
        let got = backends_of(json!([
            {"addresses": ["10.0.0.9", "10.0.0.1"]},
            {"addresses": []},
        ]));
        assert_eq!(got, vec![be("10.0.0.9", 8080)]);
    }

    #[test]
    fn duplicate_endpoints_count_once() {
        let (s, a) = web();
        let b = slice(
            "demo",
            "web-2",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([
                ready("10.244.0.3"),
                ready("10.244.0.3"),
                ready("10.244.0.2")
            ]),
        );
        let (state, errors) = build(&[s], &[a, b]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![
                be("10.244.0.1", 8080),
                be("10.244.0.2", 8080),
                be("10.244.0.3", 8080)
            ]
        );
    }

    #[test]
    fn fqdn_slices_are_ignored_silently() {
        let (s, _) = web();
        let fqdn = slice(
            "demo",
            "web-f",
            "web",
            "FQDN",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": ["example.com"]}]),
        );
        assert_eq!(validate_slice(&fqdn), Ok(()));
        let (state, errors) = build(&[s], &[fqdn]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![]
        );
    }

    fn assert_invalid_slice(bad: EndpointSlice, needle: &str) {
        let err = validate_slice(&bad).expect_err(needle);
        match &err {
            ModelError::InvalidSlice { reason, .. } => {
                assert!(
                    reason.contains(needle),
                    "{reason:?} should mention {needle:?}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        let (s, good) = web();
        let (state, errors) = build(&[s], &[bad, good]);
        assert_eq!(errors, vec![err]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![be("10.244.0.1", 8080), be("10.244.0.3", 8080)],
            "only the good slice contributes"
        );
    }

    #[test]
    fn invalid_slices_are_reported_and_skipped_alone() {
        let http = json!([{"name": "http", "port": 8080}]);
        assert_invalid_slice(
            slice_obj(json!({
                "metadata": {"namespace": "demo", "name": "nolabel"},
                "addressType": "IPv4", "ports": http, "endpoints": [ready("10.9.9.9")],
            })),
            LABEL_SERVICE_NAME,
        );
        assert_invalid_slice(
            slice(
                "demo",
                "bad-addr",
                "web",
                "IPv4",
                http.clone(),
                json!([ready("10.9.9.9"), ready("10.9.9")]),
            ),
            "\"10.9.9\" is not an IPv4 address",
        );
        // Every address is checked, though only the first one is used.
        assert_invalid_slice(
            slice(
                "demo",
                "mixed",
                "web",
                "IPv4",
                http.clone(),
                json!([{"addresses": ["10.9.9.9", "fd00::1"]}]),
            ),
            "not an IPv4 address",
        );
        assert_invalid_slice(
            slice(
                "demo",
                "v6-in-v4",
                "web",
                "IPv6",
                http.clone(),
                json!([ready("10.9.9.9")]),
            ),
            "not an IPv6 address",
        );
        assert_invalid_slice(
            slice(
                "demo",
                "port",
                "web",
                "IPv4",
                json!([{"name": "http", "port": 70000}]),
                json!([ready("10.9.9.9")]),
            ),
            "out of range",
        );
        assert_invalid_slice(
            slice(
                "demo",
                "proto",
                "web",
                "IPv4",
                json!([{"name": "http", "port": 1, "protocol": "ICMP"}]),
                json!([]),
            ),
            "unknown protocol",
        );
        assert_invalid_slice(
            slice("demo", "family", "web", "IPv5", http.clone(), json!([])),
            "addressType",
        );
        assert_invalid_slice(
            slice_obj(json!({
                "metadata": {"namespace": "demo", "labels": {LABEL_SERVICE_NAME: "web"}},
                "addressType": "IPv4", "ports": http, "endpoints": [ready("10.9.9.9")],
            })),
            "metadata.name",
        );
    }

    #[test]
    fn slice_ports_without_a_number_are_ignored() {
        let (s, _) = web();
        let sl = slice(
            "demo",
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http"}, {"name": "http", "port": 8081}]),
            json!([ready("10.244.0.1")]),
        );
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![be("10.244.0.1", 8081)]
        );
    }

    #[test]
    fn slices_match_by_label_within_the_namespace_only() {
        let (s, _) = web();
        let other_ns = slice(
            "prod",
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([ready("10.1.1.1")]),
        );
        // The slice name alone means nothing; only the label ties it to a Service.
        let other_svc = slice(
            "demo",
            "web",
            "api",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([ready("10.1.1.2")]),
        );
        let (state, errors) = build(&[s], &[other_ns, other_svc]);
        assert_eq!(errors, vec![]);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            vec![]
        );
    }

    #[test]
    fn missing_namespace_means_default_on_both_sides() {
        let s = svc_obj(
            json!({"metadata": {"name": "n"}, "spec": {"clusterIP": "10.96.0.4", "ports": [{"port": 80}]}}),
        );
        let sl = slice_obj(json!({
            "metadata": {"name": "n-1", "labels": {LABEL_SERVICE_NAME: "n"}},
            "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": [ready("10.0.0.1")],
        }));
        let (state, errors) = build(&[s], &[sl]);
        assert_eq!(errors, vec![]);
        let f = fe("10.96.0.4", 80, Protocol::Tcp);
        assert_eq!(backends(&state, f), vec![be("10.0.0.1", 8080)]);
        assert_eq!(state.services[&f].name.namespace, "default");
    }

    #[test]
    fn conflicting_frontends_keep_the_first_service_by_name() {
        let a = cluster_ip("x", "a", &["10.96.0.1"], json!([{"port": 80}]));
        let b = cluster_ip(
            "x",
            "b",
            &["10.96.0.1"],
            json!([{"port": 80}, {"name": "other", "port": 81}]),
        );
        for input in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
            let (state, errors) = build(&input, &[]);
            assert_eq!(state.services.len(), 1, "all of b is dropped");
            assert_eq!(
                state.services[&fe("10.96.0.1", 80, Protocol::Tcp)]
                    .name
                    .name,
                "a"
            );
            assert!(
                matches!(&errors[..], [ModelError::InvalidService { name, .. }] if name == "b"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn build_does_not_depend_on_input_order() {
        let (s1, sl1) = web();
        let s2 = cluster_ip(
            "demo",
            "api",
            &["10.96.0.11", "fd00::11"],
            json!([{"name": "grpc", "port": 9000}]),
        );
        let sl2 = slice(
            "demo",
            "api-1",
            "api",
            "IPv4",
            json!([{"name": "grpc", "port": 9000}]),
            json!([ready("10.0.0.9"), ready("10.0.0.8")]),
        );
        // Same backend, ready in one slice and terminating in the other: usable whatever the order.
        let sl3 = slice(
            "demo",
            "api-2",
            "api",
            "IPv4",
            json!([{"name": "grpc", "port": 9000}]),
            json!([
                endpoint("10.0.0.8", Some(false), Some(true), Some(true)),
                ready("10.0.0.7")
            ]),
        );
        let (a, ea) = build(
            &[s1.clone(), s2.clone()],
            &[sl1.clone(), sl2.clone(), sl3.clone()],
        );
        let (b, eb) = build(&[s2, s1], &[sl3, sl2, sl1]);
        assert_eq!(a, b);
        assert_eq!(ea, eb);
        assert_eq!(
            backends(&a, fe("10.96.0.11", 9000, Protocol::Tcp)),
            vec![
                be("10.0.0.7", 9000),
                be("10.0.0.8", 9000),
                be("10.0.0.9", 9000)
            ]
        );
        assert_eq!(backends(&a, fe("fd00::11", 9000, Protocol::Tcp)), vec![]);
    }

    #[test]
    fn a_service_defined_twice_is_reported_once_and_kept_once() {
        let (s, _) = web();
        let (state, errors) = build(&[s.clone(), s], &[]);
        assert_eq!(state.services.len(), 1);
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    // ---- NodePort, externalIPs, load balancers, traffic policies, affinity ----

    const NODE: &str = "node-a";

    fn ctx() -> NodeContext {
        NodeContext {
            node_name: Some(NODE.into()),
            node_ips: vec![
                "192.168.1.10".parse().unwrap(),
                "192.168.2.10".parse().unwrap(),
                "fd00:1::10".parse().unwrap(),
            ],
        }
    }

    /// An endpoint on `node` with the given conditions.
    fn on(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
        json!({"addresses": [ip], "nodeName": node,
               "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn ready_on(ip: &str, node: &str) -> Value {
        on(ip, node, true, true, false)
    }

    /// `demo/web` (ClusterIP 10.96.0.10, port http 80 → 8080, nodePort 30080 for types that
    /// have one) with `extra` merged into its spec.
    fn web_with(extra: Value) -> Service {
        let mut spec = json!({
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        svc("demo", "web", spec)
    }

    fn web_slice(endpoints: Value) -> EndpointSlice {
        slice(
            "demo",
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            endpoints,
        )
    }

    /// One local ready endpoint (10.0.0.1) and one remote ready endpoint (10.0.0.2).
    fn local_and_remote() -> EndpointSlice {
        web_slice(json!([
            ready_on("10.0.0.1", NODE),
            ready_on("10.0.0.2", "node-b")
        ]))
    }

    fn port_state(state: &DesiredState, f: Frontend) -> &ServicePortState {
        state.services.get(&f).unwrap_or_else(|| {
            panic!(
                "no frontend {f} in {:?}",
                state.services.keys().collect::<Vec<_>>()
            )
        })
    }

    fn build_ok(services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
        let (state, errors) = build_for_node(services, slices, &ctx());
        assert_eq!(errors, vec![]);
        state
    }

    fn tcp(ip: &str, port: u16) -> Frontend {
        fe(ip, port, Protocol::Tcp)
    }

    fn kinds(state: &DesiredState) -> Vec<(Frontend, FrontendKind)> {
        state.services.iter().map(|(f, s)| (*f, s.kind)).collect()
    }

    #[test]
    fn cluster_ip_only_services_are_unchanged_by_the_node_context() {
        let (s, sl) = web();
        let (plain, e1) = build(std::slice::from_ref(&s), std::slice::from_ref(&sl));
        let (with_node, e2) = build_for_node(&[s], &[sl], &ctx());
        assert_eq!((e1, e2), (vec![], vec![]));
        assert_eq!(plain, with_node);
        let st = port_state(&plain, tcp("10.96.0.10", 80));
        assert_eq!(st.kind, FrontendKind::ClusterIp);
        assert_eq!(st.external_backends, st.backends);
        assert_eq!(st.session_affinity, None);
        assert_eq!(st.health_check_node_port, None);
        assert!(st.load_balancer_source_ranges.is_empty());
    }

    #[test]
    fn internal_policy_local_gives_cluster_ips_this_nodes_endpoints() {
        let s = web_with(json!({"internalTrafficPolicy": "Local"}));
        let state = build_ok(std::slice::from_ref(&s), &[local_and_remote()]);
        let st = port_state(&state, tcp("10.96.0.10", 80));
        assert_eq!(st.backends, vec![be("10.0.0.1", 8080)]);
        assert_eq!(st.external_backends, st.backends);
        assert_eq!(st.local_endpoints, 1);

        // Without a node name nothing is local: the ClusterIP rejects.
        let (state, errors) = build(std::slice::from_ref(&s), &[local_and_remote()]);
        assert_eq!(errors, vec![]);
        assert_eq!(backends(&state, tcp("10.96.0.10", 80)), vec![]);
        assert_eq!(state.services[&tcp("10.96.0.10", 80)].local_endpoints, 0);

        // Only remote endpoints: nothing for this node either.
        let remote = web_slice(json!([ready_on("10.0.0.2", "node-b")]));
        let state = build_ok(&[s], &[remote]);
        assert_eq!(backends(&state, tcp("10.96.0.10", 80)), vec![]);
    }

    #[test]
    fn local_policy_falls_back_to_this_nodes_serving_terminating_endpoints() {
        let s = web_with(json!({
            "type": "NodePort",
            "internalTrafficPolicy": "Local",
            "externalTrafficPolicy": "Local",
        }));
        let sl = web_slice(json!([
            on("10.0.0.1", NODE, false, true, true),
            on("10.0.0.3", NODE, false, false, true),
            on("10.0.0.4", NODE, false, true, false),
            ready_on("10.0.0.2", "node-b"),
            on("10.0.0.5", "node-b", false, true, true),
        ]));
        let state = build_ok(&[s], &[sl]);
        let cip = port_state(&state, tcp("10.96.0.10", 80));
        assert_eq!(cip.backends, vec![be("10.0.0.1", 8080)]);
        assert_eq!(cip.local_endpoints, 0, "only ready endpoints count");
        let np = port_state(&state, tcp("192.168.1.10", 30080));
        assert_eq!(np.external_backends, vec![be("10.0.0.1", 8080)]);
        assert!(np.external_policy_local);
        assert!(
            !np.external_snat,
            "externalTrafficPolicy: Local never source-NATs"
        );
        assert!(
            !cip.external_policy_local,
            "only external frontends carry the policy"
        );
        // The cluster-wide fallback is independent: a ready endpoint exists elsewhere.
        assert_eq!(np.backends, vec![be("10.0.0.2", 8080)]);
    }

    #[test]
    fn local_ready_endpoints_win_over_local_terminating_ones() {
        let s = web_with(json!({"internalTrafficPolicy": "Local"}));
        let sl = web_slice(json!([
            on("10.0.0.1", NODE, false, true, true),
            ready_on("10.0.0.3", NODE),
        ]));
        let state = build_ok(&[s], &[sl]);
        assert_eq!(
            backends(&state, tcp("10.96.0.10", 80)),
            vec![be("10.0.0.3", 8080)]
        );
    }

    #[test]
    fn external_policy_local_keeps_outside_traffic_local_and_short_circuits_node_clients() {
        let s = web_with(json!({"type": "NodePort", "externalTrafficPolicy": "Local"}));
        let state = build_ok(&[s], &[local_and_remote()]);
        let all = vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)];
        let np = port_state(&state, tcp("192.168.1.10", 30080));
        assert_eq!(np.kind, FrontendKind::NodePort);
        assert_eq!(np.external_backends, vec![be("10.0.0.1", 8080)]);
        assert_eq!(
            np.backends, all,
            "clients on the node use the cluster endpoints"
        );
        let cip = port_state(&state, tcp("10.96.0.10", 80));
        assert_eq!((&cip.backends, &cip.external_backends), (&all, &all));
    }

    #[test]
    fn external_policy_local_without_local_endpoints_has_no_external_backends() {
        let s = web_with(json!({"type": "NodePort", "externalTrafficPolicy": "Local"}));
        let remote = web_slice(json!([ready_on("10.0.0.2", "node-b")]));
        let state = build_ok(&[s], &[remote]);
        let np = port_state(&state, tcp("192.168.1.10", 30080));
        assert_eq!(np.external_backends, vec![]);
        assert_eq!(np.backends, vec![be("10.0.0.2", 8080)]);
        assert_eq!(np.local_endpoints, 0);
    }

    #[test]
    fn both_policies_local() {
        // kube-proxy: a Service with any external destination always "uses cluster endpoints"
        // (serviceport.go UsesClusterEndpoints), for the short circuit; so only the ClusterIP
        // and outside traffic are local.
        let s = web_with(json!({
            "type": "NodePort",
            "internalTrafficPolicy": "Local",
            "externalTrafficPolicy": "Local",
        }));
        let state = build_ok(&[s], &[local_and_remote()]);
        let local = vec![be("10.0.0.1", 8080)];
        let all = vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)];
        let cip = port_state(&state, tcp("10.96.0.10", 80));
        assert_eq!((&cip.backends, &cip.external_backends), (&local, &local));
        let np = port_state(&state, tcp("192.168.2.10", 30080));
        assert_eq!((&np.backends, &np.external_backends), (&all, &local));
    }

    #[test]
    fn cluster_policies_use_every_endpoint_everywhere() {
        let s = web_with(
            json!({"type": "NodePort", "externalTrafficPolicy": "Cluster",
                                "internalTrafficPolicy": "Cluster"}),
        );
        let state = build_ok(&[s], &[local_and_remote()]);
        let all = vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)];
        for st in state.services.values() {
            assert_eq!((&st.backends, &st.external_backends), (&all, &all));
            // One backend is on another node: outside traffic must be source-NATed.
            assert_eq!(st.external_snat, st.kind.is_external());
        }
    }

    #[test]
    fn outside_traffic_to_local_backends_only_is_not_source_natted() {
        let s = web_with(json!({"type": "NodePort", "externalTrafficPolicy": "Cluster"}));
        let sl = web_slice(json!([ready_on("10.0.0.1", NODE)]));
        let state = build_ok(&[s], &[sl]);
        let np = state
            .services
            .values()
            .find(|st| st.kind == FrontendKind::NodePort)
            .expect("a NodePort frontend");
        assert_eq!(np.external_backends, vec![be("10.0.0.1", 8080)]);
        assert!(!np.external_snat);
    }

    #[test]
    fn node_ports_are_served_on_each_node_ip_of_the_services_families() {
        let s = web_with(json!({"type": "NodePort"}));
        let state = build_ok(&[s], &[local_and_remote()]);
        assert_eq!(
            kinds(&state),
            vec![
                (tcp("10.96.0.10", 80), FrontendKind::ClusterIp),
                (tcp("192.168.1.10", 30080), FrontendKind::NodePort),
                (tcp("192.168.2.10", 30080), FrontendKind::NodePort),
            ],
            "no IPv6 node address for a single-stack IPv4 Service"
        );
        assert_eq!(
            state.services[&tcp("192.168.1.10", 30080)].name.to_string(),
            "demo/web:http"
        );

        // Dual stack, UDP: each family's node addresses, with that family's endpoints.
        let ds = svc(
            "a",
            "dns",
            json!({"type": "NodePort", "clusterIPs": ["10.96.0.53", "fd00:96::53"],
                   "clusterIP": "10.96.0.53",
                   "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}]}),
        );
        let v4 = slice(
            "a",
            "dns-4",
            "dns",
            "IPv4",
            json!([{"port": 5353, "protocol": "UDP"}]),
            json!([ready("10.0.0.53")]),
        );
        let v6 = slice(
            "a",
            "dns-6",
            "dns",
            "IPv6",
            json!([{"port": 5353, "protocol": "UDP"}]),
            json!([ready("fd00:244::53")]),
        );
        let state = build_ok(&[ds], &[v4, v6]);
        let udp = |ip| fe(ip, 30053, Protocol::Udp);
        assert_eq!(state.services.len(), 5);
        assert_eq!(
            backends(&state, udp("192.168.1.10")),
            vec![be("10.0.0.53", 5353)]
        );
        assert_eq!(
            backends(&state, udp("fd00:1::10")),
            vec![be("fd00:244::53", 5353)]
        );
        assert_eq!(
            state.services[&udp("fd00:1::10")].kind,
            FrontendKind::NodePort
        );

        // Without node addresses (`build`), no NodePort frontends.
        let (state, _) = build(&[web_with(json!({"type": "NodePort"}))], &[]);
        assert_eq!(state.services.len(), 1);
    }

    #[test]
    fn node_ports_need_a_nodeport_or_loadbalancer_type_and_an_allocated_port() {
        // A ClusterIP Service cannot have a nodePort; one in a manifest is ignored.
        let state = build_ok(&[web_with(json!({}))], &[]);
        assert_eq!(
            kinds(&state),
            vec![(tcp("10.96.0.10", 80), FrontendKind::ClusterIp)]
        );

        let lb = web_with(json!({"type": "LoadBalancer"}));
        let state = build_ok(&[lb], &[]);
        assert_eq!(state.services.len(), 3, "a LoadBalancer has NodePorts too");

        for port in [
            json!({"name": "http", "port": 80}),
            json!({"name": "http", "port": 80, "nodePort": 0}),
        ] {
            let lb = web_with(
                json!({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                                     "ports": [port]}),
            );
            let state = build_ok(&[lb], &[]);
            assert_eq!(
                kinds(&state),
                vec![(tcp("10.96.0.10", 80), FrontendKind::ClusterIp)]
            );
        }
    }

    #[test]
    fn out_of_range_node_ports_are_rejected() {
        for n in [70000, -1] {
            assert_invalid_service(
                svc(
                    "a",
                    "np",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.3",
                                      "ports": [{"port": 80, "nodePort": n}]}),
                ),
                "nodePort",
            );
        }
    }

    fn lb_with_ingress(ingress: Value) -> Service {
        let mut s = web_with(json!({"type": "LoadBalancer"}));
        s.status = serde_json::from_value(json!({"loadBalancer": {"ingress": ingress}})).unwrap();
        s
    }

    #[test]
    fn load_balancer_ingress_ips_in_vip_mode_are_frontends() {
        let s = lb_with_ingress(json!([
            {"ip": "203.0.113.1"},
            {"hostname": "lb.example.com"},
            {"ip": "203.0.113.2", "ipMode": "Proxy"},
            {"ip": "203.0.113.3", "ipMode": "VIP"},
            {"ip": "2001:db8::1"},
        ]));
        let state = build_ok(&[s], &[local_and_remote()]);
        let lbs: Vec<Frontend> = state
            .services
            .iter()
            .filter(|(_, s)| s.kind == FrontendKind::LoadBalancer)
            .map(|(f, _)| *f)
            .collect();
        assert_eq!(lbs, vec![tcp("203.0.113.1", 80), tcp("203.0.113.3", 80)]);
        assert_eq!(
            backends(&state, tcp("203.0.113.3", 80)),
            vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]
        );

        // The status of a Service that is not a LoadBalancer is not used.
        let mut s = lb_with_ingress(json!([{"ip": "203.0.113.1"}]));
        s.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let state = build_ok(&[s], &[]);
        assert_eq!(state.services.len(), 1);

        assert_invalid_service(lb_with_ingress(json!([{"ip": "203.0.113"}])), "invalid ip");
    }

    #[test]
    fn load_balancer_with_local_policy() {
        let s = web_with(
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                "healthCheckNodePort": 32000}),
        );
        let mut s2 = s.clone();
        s2.status = lb_with_ingress(json!([{"ip": "203.0.113.1"}])).status;
        let state = build_ok(&[s2], &[local_and_remote()]);
        let lb = port_state(&state, tcp("203.0.113.1", 80));
        assert_eq!(lb.external_backends, vec![be("10.0.0.1", 8080)]);
        assert_eq!(
            lb.backends,
            vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]
        );
    }

    #[test]
    fn external_ips_are_frontends_of_the_services_families() {
        let s = web_with(json!({"externalIPs": ["198.51.100.1", "2001:db8::2"],
                                "externalTrafficPolicy": "Local"}));
        let state = build_ok(&[s], &[local_and_remote()]);
        assert_eq!(
            kinds(&state),
            vec![
                (tcp("10.96.0.10", 80), FrontendKind::ClusterIp),
                (tcp("198.51.100.1", 80), FrontendKind::ExternalIp),
            ]
        );
        // externalIPs make even a ClusterIP Service "external" for the traffic policy.
        let ext = port_state(&state, tcp("198.51.100.1", 80));
        assert_eq!(ext.external_backends, vec![be("10.0.0.1", 8080)]);
        assert_eq!(
            ext.backends,
            vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]
        );
        assert!(ext.load_balancer_source_ranges.is_empty());

        assert_invalid_service(
            web_with(json!({"externalIPs": ["198.51.100.300"]})),
            "invalid externalIP",
        );
    }

    #[test]
    fn an_address_listed_twice_in_one_service_is_served_once_as_its_first_kind() {
        let mut s = web_with(json!({"type": "LoadBalancer",
                                    "externalIPs": ["10.96.0.10", "198.51.100.1", "198.51.100.1"]}));
        s.status = lb_with_ingress(json!([{"ip": "198.51.100.1"}])).status;
        let state = build_ok(&[s], &[]);
        assert_eq!(
            kinds(&state),
            vec![
                (tcp("10.96.0.10", 80), FrontendKind::ClusterIp),
                (tcp("192.168.1.10", 30080), FrontendKind::NodePort),
                (tcp("192.168.2.10", 30080), FrontendKind::NodePort),
                (tcp("198.51.100.1", 80), FrontendKind::ExternalIp),
            ]
        );
    }

    #[test]
    fn an_external_address_never_takes_another_services_cluster_ip() {
        // "a/thief" sorts first, but its externalIP is "b/victim"'s ClusterIP:port.
        let thief = svc(
            "a",
            "thief",
            json!({"clusterIP": "10.96.0.1",
                                             "externalIPs": ["10.96.0.2"], "ports": [{"port": 80}]}),
        );
        let victim = svc(
            "b",
            "victim",
            json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80}]}),
        );
        for input in [
            vec![thief.clone(), victim.clone()],
            vec![victim.clone(), thief.clone()],
        ] {
            let (state, errors) = build_for_node(&input, &[], &ctx());
            assert_eq!(
                kinds(&state),
                vec![(tcp("10.96.0.2", 80), FrontendKind::ClusterIp)]
            );
            assert_eq!(state.services[&tcp("10.96.0.2", 80)].name.name, "victim");
            assert!(
                matches!(&errors[..], [ModelError::InvalidService { name, reason, .. }]
                    if name == "thief" && reason.contains("b/victim")),
                "{errors:?}"
            );
        }
        // Between two external claims, the first Service by name wins, the other goes whole.
        let a = svc(
            "x",
            "a",
            json!({"clusterIP": "10.96.0.1", "externalIPs": ["198.51.100.1"],
                                     "ports": [{"port": 80}]}),
        );
        let b = svc(
            "x",
            "b",
            json!({"clusterIP": "10.96.0.2", "externalIPs": ["198.51.100.1"],
                                     "ports": [{"port": 80}]}),
        );
        let (state, errors) = build_for_node(&[b, a], &[], &ctx());
        assert_eq!(
            kinds(&state),
            vec![
                (tcp("10.96.0.1", 80), FrontendKind::ClusterIp),
                (tcp("198.51.100.1", 80), FrontendKind::ExternalIp),
            ]
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    #[test]
    fn load_balancer_source_ranges_are_parsed_per_family_onto_lb_frontends() {
        let mut s = svc(
            "a",
            "lb",
            json!({
                "type": "LoadBalancer",
                "clusterIPs": ["10.96.0.7", "fd00:96::7"], "clusterIP": "10.96.0.7",
                "ports": [{"port": 443, "nodePort": 30443}],
                "loadBalancerSourceRanges": [" 10.0.0.0/8 ", "192.168.1.77/24", "2001:db8::1/32", "",
                                             "0.0.0.0/0"],
            }),
        );
        s.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [
            {"ip": "203.0.113.7"}, {"ip": "2001:db8:1::7"}]}}))
        .unwrap();
        let state = build_ok(&[s], &[]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            port_state(&state, tcp("203.0.113.7", 443)).load_balancer_source_ranges,
            vec![
                (ip("10.0.0.0"), 8),
                (ip("192.168.1.0"), 24),
                (ip("0.0.0.0"), 0)
            ]
        );
        assert_eq!(
            port_state(&state, tcp("2001:db8:1::7", 443)).load_balancer_source_ranges,
            vec![(ip("2001:db8::"), 32)]
        );
        for f in [
            tcp("10.96.0.7", 443),
            tcp("192.168.1.10", 30443),
            tcp("fd00:1::10", 30443),
        ] {
            assert!(
                port_state(&state, f).load_balancer_source_ranges.is_empty(),
                "{f}"
            );
        }

        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "2001:db8::/129",
            "foo/8",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "10.0.0.0/8/8",
        ] {
            assert_invalid_service(
                web_with(json!({"type": "LoadBalancer", "loadBalancerSourceRanges": [bad]})),
                "invalid CIDR",
            );
        }
    }

    #[test]
    fn session_affinity_client_ip() {
        let s = web_with(json!({"type": "NodePort", "sessionAffinity": "ClientIP"}));
        let state = build_ok(&[s], &[]);
        assert_eq!(state.services.len(), 3);
        for st in state.services.values() {
            assert_eq!(st.session_affinity, Some(Duration::from_secs(10_800)));
        }
        for secs in [1, 60, 86_400] {
            let s = web_with(json!({"sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": secs}}}));
            let state = build_ok(&[s], &[]);
            assert_eq!(
                state.services[&tcp("10.96.0.10", 80)].session_affinity,
                Some(Duration::from_secs(secs))
            );
        }
        for none in [
            json!({"sessionAffinity": "None"}),
            json!({}),
            // The config means nothing without ClientIP.
            json!({"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}}),
        ] {
            let state = build_ok(&[web_with(none)], &[]);
            assert_eq!(
                state.services[&tcp("10.96.0.10", 80)].session_affinity,
                None
            );
        }
        for secs in [0, -1, 86_401] {
            assert_invalid_service(
                web_with(json!({"sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": secs}}})),
                "out of range 1-86400",
            );
        }
        assert_invalid_service(
            web_with(json!({"sessionAffinity": "Cookie"})),
            "sessionAffinity",
        );
    }

    #[test]
    fn health_check_node_port_only_for_local_load_balancers() {
        let lb_local = web_with(
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                       "healthCheckNodePort": 32000}),
        );
        let state = build_ok(&[lb_local], &[local_and_remote()]);
        assert_eq!(state.services.len(), 3);
        for st in state.services.values() {
            assert_eq!(st.health_check_node_port, Some(32000));
        }
        for other in [
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Cluster", "healthCheckNodePort": 32000}),
            json!({"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}),
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
        ] {
            let state = build_ok(&[web_with(other.clone())], &[]);
            assert!(
                state
                    .services
                    .values()
                    .all(|s| s.health_check_node_port.is_none()),
                "{other}"
            );
        }
        assert_invalid_service(
            web_with(
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                            "healthCheckNodePort": 70000}),
            ),
            "healthCheckNodePort",
        );
    }

    #[test]
    fn local_endpoints_count_this_nodes_ready_endpoints_per_service_port() {
        let s = svc(
            "demo",
            "web",
            json!({
                "type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                "clusterIPs": ["10.96.0.10", "fd00:96::10"], "clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                          {"name": "https", "port": 443, "nodePort": 30443}],
            }),
        );
        let sl = slice(
            "demo",
            "web-1",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080}, {"name": "https", "port": 8443}]),
            json!([
                ready_on("10.0.0.1", NODE),
                ready_on("10.0.0.3", NODE),
                on("10.0.0.4", NODE, false, true, true),
                ready_on("10.0.0.2", "node-b"),
                ready("10.0.0.5"),
            ]),
        );
        let state = build_ok(std::slice::from_ref(&s), std::slice::from_ref(&sl));
        // Two local ready pods × two ports, as kube-proxy's LocalReadyEndpoints counts them.
        for f in [
            tcp("10.96.0.10", 80),
            tcp("10.96.0.10", 443),
            tcp("192.168.1.10", 30443),
        ] {
            assert_eq!(port_state(&state, f).local_endpoints, 4, "{f}");
        }
        assert_eq!(
            port_state(&state, tcp("fd00:96::10", 80)).local_endpoints,
            0
        );
        assert_eq!(
            port_state(&state, tcp("fd00:1::10", 30080)).local_endpoints,
            0
        );
        let (state, _) = build(&[s], &[sl]);
        assert!(state.services.values().all(|s| s.local_endpoints == 0));
    }

    #[test]
    fn unknown_types_and_policies_are_rejected() {
        assert_invalid_service(web_with(json!({"type": "Magic"})), "unknown type");
        assert_invalid_service(
            web_with(json!({"externalTrafficPolicy": "local"})),
            "externalTrafficPolicy",
        );
        assert_invalid_service(
            web_with(json!({"internalTrafficPolicy": "Nearest"})),
            "internalTrafficPolicy",
        );
    }

    #[test]
    fn every_kind_of_a_skipped_service_is_skipped() {
        let mut headless = web_with(json!({"type": "LoadBalancer", "clusterIP": "None",
                                           "clusterIPs": ["None"], "externalIPs": ["198.51.100.1"]}));
        headless.status = lb_with_ingress(json!([{"ip": "203.0.113.1"}])).status;
        let mut labelled = lb_with_ingress(json!([{"ip": "203.0.113.1"}]));
        labelled.metadata.labels =
            Some([(LABEL_SERVICE_PROXY_NAME.to_string(), "x".to_string())].into());
        let (state, errors) = build_for_node(&[headless, labelled], &[], &ctx());
        assert_eq!(errors, vec![]);
        assert!(state.services.is_empty(), "{:?}", state.services);
    }
}
