//! The model's vocabulary: what a frontend, a backend and a service port are, and the desired
//! state every dataplane consumes.
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

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
    /// `internalTrafficPolicy: Local` on a ClusterIP frontend: `backends` are this node's
    /// endpoints only.
    pub internal_policy_local: bool,
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
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `spec.healthCheckNodePort` of a `type: LoadBalancer` Service with
    /// `externalTrafficPolicy: Local` (kube-proxy's `NeedsHealthCheck`), on every frontend of the
    /// Service.
    pub health_check_node_port: Option<u16>,
    /// kube-proxy's `localEndpoints` for the service health server (`LocalReadyEndpoints`): this
    /// node's ready endpoints of the Service in this frontend's address family, counted once per
    /// Service port (a pod serving two ports counts twice). Same on every frontend of the
    /// Service and family; 0 when the node name is unknown.
    pub local_endpoints: usize,
    /// A ClusterIP frontend with `internalTrafficPolicy: Local`, no endpoint on this node and
    /// endpoints elsewhere: kube-proxy drops its traffic ("has no local endpoints"), where a
    /// Service without any endpoint is rejected. (`backends` is empty either way.)
    pub internal_local_elsewhere: bool,
}

/// Everything the dataplane should serve: by frontend (what the eBPF maps hold), and by service
/// port (what kube-proxy's netfilter proxiers build their per-service-port chains from). Both
/// describe the same Services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, ServicePortState>,
    /// One entry per Service port and family, sorted by (family, name, protocol).
    pub service_ports: Vec<ServicePortInfo>,
    /// The node addresses NodePorts are served on ([`NodeContext::node_ips`]).
    pub node_ips: Vec<IpAddr>,
    /// The node's primary address ([`NodeContext::node_ip`]).
    pub node_ip: Option<IpAddr>,
    /// The Node's pod CIDRs ([`NodeContext::pod_cidrs`]).
    pub node_pod_cidrs: Vec<IpNet>,
}

/// One Service port in one address family as kube-proxy's proxiers see it (its `ServicePort`
/// with the endpoints `CategorizeEndpoints` picks): the netfilter modes' input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: ServicePortName,
    pub protocol: Protocol,
    pub family: Family,
    /// The Service's ClusterIP of this family.
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// `spec.externalIPs` of this family.
    pub external_ips: Vec<IpAddr>,
    /// VIP-mode load-balancer ingress IPs of this family.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `loadBalancerSourceRanges` of this family (network, prefix length).
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// kube-proxy's `InternalPolicyLocal()`.
    pub internal_policy_local: bool,
    /// kube-proxy's `ExternalPolicyLocal()`: `externalTrafficPolicy: Local` on a Service with
    /// an external destination.
    pub external_policy_local: bool,
    pub session_affinity: Option<Duration>,
    pub health_check_node_port: Option<u16>,
    /// `CategorizeEndpoints`' clusterEndpoints: empty unless the port uses cluster endpoints.
    pub cluster_endpoints: Vec<Backend>,
    /// `CategorizeEndpoints`' localEndpoints: empty unless the port uses local endpoints.
    pub local_endpoints: Vec<Backend>,
    /// `CategorizeEndpoints`' hasAnyEndpoints: some endpoint anywhere is ready, or serving
    /// while terminating.
    pub has_endpoints: bool,
}

impl Default for ServicePortInfo {
    fn default() -> Self {
        ServicePortInfo {
            name: ServicePortName::default(),
            protocol: Protocol::Tcp,
            family: Family::V4,
            cluster_ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 0,
            node_port: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            internal_policy_local: false,
            external_policy_local: false,
            session_affinity: None,
            health_check_node_port: None,
            cluster_endpoints: Vec::new(),
            local_endpoints: Vec::new(),
            has_endpoints: false,
        }
    }
}

impl ServicePortInfo {
    /// kube-proxy's `ExternallyAccessible()`: a NodePort, an externalIP or a load-balancer IP.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// kube-proxy's `UsesClusterEndpoints()`.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || (self.externally_accessible() && !self.external_policy_local)
    }

    /// kube-proxy's `UsesLocalEndpoints()`.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || self.external_policy_local
    }
}

/// What the model needs to know about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name: endpoints whose `nodeName` equals it are local. `None` (or empty):
    /// no endpoint is local.
    pub node_name: Option<String>,
    /// The node's `topology.kubernetes.io/zone` label: which endpoints' zone hints are for
    /// this node. `None`: no zone hints apply.
    pub zone: Option<String>,
    /// The addresses NodePorts are served on, already filtered by `--nodeport-addresses`.
    /// Empty: no NodePort frontends.
    pub node_ips: Vec<IpAddr>,
    /// kube-proxy's `nodeIP`, the node's primary address: a `loadBalancerSourceRanges` entry
    /// holding it also admits the LB IPs as sources (a node reaching its own VIP).
    pub node_ip: Option<IpAddr>,
    /// The Node's `spec.podCIDRs`: what `--detect-local-mode=NodeCIDR` calls local.
    pub pod_cidrs: Vec<IpNet>,
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

/// An address family. kube-proxy runs one proxier per family; kpr's model keeps frontends and
/// endpoints of both, and each one knows its family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The Kubernetes name (`ipFamilies`, slices' `addressType`, kube-proxy's `ip_family`).
    pub const fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}
