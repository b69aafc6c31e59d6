//! The netfilter planner: for each service port of the desired state, the decisions kube-proxy's
//! iptables and nftables proxiers take before writing a single rule (pkg/proxy/iptables and
//! pkg/proxy/nftables, `syncProxyRules`): which endpoints each traffic policy uses, which
//! per-service-port chains exist, where ClusterIP and external traffic go, and what is rejected
//! or dropped. Computed once; the iptables writer and the nftables writer only spell it.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Backend, DesiredState, Family, Protocol, ServicePortInfo};

/// kube-proxy's `largeClusterEndpointsThreshold`: above this many endpoints in total, the
/// iptables writer leaves out per-endpoint comments.
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// The node-wide settings the rules depend on (kube-proxy's proxier fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    pub family: Family,
    /// `--masquerade-all`: masquerade all traffic to ClusterIPs.
    pub masquerade_all: bool,
    /// The local-traffic detector (`--detect-local-mode`): ClusterIP traffic it does not call
    /// local is masqueraded, and external traffic it calls local short-circuits eTP=Local.
    pub local: LocalDetector,
    /// NodeCIDR: `local` follows the Node's pod CIDRs, refreshed from each desired state.
    pub local_from_node: bool,
    /// The node's primary IP (kube-proxy's `nodeIP`): a source range that contains it also
    /// admits traffic whose source is the LB IP itself (a node reaching its own VIP).
    pub node_ip: Option<IpAddr>,
    /// `--iptables-localhost-nodeports` (IPv4 only).
    pub localhost_nodeports: bool,
    /// `--nodeport-addresses` resolved to this node's addresses; `None`: all local addresses.
    pub nodeport_ips: Option<Vec<IpAddr>>,
    /// The masquerade mark bit value (`1 << --iptables-masquerade-bit`).
    pub masquerade_mark: u32,
    /// Plan only the service ports of this protocol (`None`: all). The eBPF mode serves its
    /// SCTP ports through the nftables writer with `Some(Sctp)` (see `ebpf::sctp`).
    pub only_protocol: Option<Protocol>,
}

impl PlanConfig {
    /// Whether the rules of this config include `port`: its family, and its protocol if the
    /// config is for one protocol only. Every writer selects its ports through this.
    pub fn serves(&self, port: &ServicePortInfo) -> bool {
        port.family == self.family && self.only_protocol.is_none_or(|p| p == port.protocol)
    }

    /// These settings with what follows the desired state, of this config's family only (each
    /// family's proxier sees its own node addresses): the node's primary IP, the NodeCIDR
    /// detector, and, with `nodeport_ips` (`--nodeport-addresses` given, or a writer that always
    /// lists them), the NodePort addresses.
    pub fn for_state(&self, desired: &DesiredState, nodeport_ips: bool) -> PlanConfig {
        let mut cfg = self.clone();
        let family = cfg.family;
        cfg.node_ip = desired.node_ip.filter(|ip| Family::of(*ip) == family);
        LocalDetector::refresh(&mut cfg, desired);
        cfg.nodeport_ips = nodeport_ips.then(|| {
            desired
                .node_ips
                .iter()
                .copied()
                .filter(|ip| Family::of(*ip) == family)
                .collect()
        });
        cfg
    }
}

/// kube-proxy's `LocalTrafficDetector`, as the rules match it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalDetector {
    /// No detector: ClusterCIDR without a `--cluster-cidr` of this family, or NodeCIDR before
    /// the Node has a pod CIDR of it (kube-proxy's no-op detector).
    #[default]
    None,
    /// Sources in this CIDR (ClusterCIDR, NodeCIDR).
    Cidr(IpNet),
    /// Packets arriving on this interface (BridgeInterface), or with `prefix` on any whose
    /// name starts with it (InterfaceNamePrefix).
    Interface { name: String, prefix: bool },
}

impl LocalDetector {
    /// The detector for `family` from the configuration: `cidrs` are `--cluster-cidr`'s for
    /// ClusterCIDR and the Node's pod CIDRs for NodeCIDR (kube-proxy uses the first of the
    /// family).
    pub fn for_family(mode: &crate::config::DetectLocal, cidrs: &[IpNet], family: Family) -> Self {
        use crate::config::DetectLocal as D;
        match mode {
            D::ClusterCidr | D::NodeCidr => cidrs
                .iter()
                .find(|c| Family::of(c.addr()) == family)
                .map_or(LocalDetector::None, |c| LocalDetector::Cidr(c.trunc())),
            D::BridgeInterface(name) => LocalDetector::Interface {
                name: name.clone(),
                prefix: false,
            },
            D::InterfaceNamePrefix(name) => LocalDetector::Interface {
                name: name.clone(),
                prefix: true,
            },
        }
    }

    /// `cfg` for a sync of `desired`: with NodeCIDR, the detector of the Node's pod CIDRs now.
    pub fn refresh(cfg: &mut PlanConfig, desired: &crate::model::DesiredState) {
        if cfg.local_from_node {
            cfg.local = LocalDetector::for_family(
                &crate::config::DetectLocal::NodeCidr,
                &desired.node_pod_cidrs,
                cfg.family,
            );
        }
    }

    /// kube-proxy's `IsImplemented`.
    pub fn is_implemented(&self) -> bool {
        *self != LocalDetector::None
    }
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            family: Family::V4,
            masquerade_all: false,
            local: LocalDetector::None,
            local_from_node: false,
            node_ip: None,
            localhost_nodeports: true,
            nodeport_ips: None,
            masquerade_mark: 0x4000,
            only_protocol: None,
        }
    }
}

/// Which of a service port's policy chains a kind of traffic uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// `KUBE-SVC-…` / `service-…`: the cluster's endpoints.
    Cluster,
    /// `KUBE-SVL-…` / `local-…`: this node's endpoints.
    Local,
}

/// What a filter rule does to traffic that has no endpoint to go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The service port has no endpoints at all: refuse at once (ICMP port unreachable / RST).
    Reject,
    /// A `Local` policy and no local endpoint: drop silently.
    Drop,
}

/// Everything the writers need to know about one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPlan<'a> {
    pub info: &'a ServicePortInfo,
    /// kube-proxy's `svcPortNameString` (`ns/name:port`, or `ns/name` for an unnamed port).
    pub name: String,
    /// Some endpoint anywhere is usable (kube-proxy's hasEndpoints).
    pub has_endpoints: bool,
    /// Traffic to the ClusterIP goes to this policy chain; `None`: it is refused (see
    /// `internal_refusal`).
    pub internal: Option<Policy>,
    /// Why ClusterIP traffic is refused, when it is.
    pub internal_refusal: Option<Refusal>,
    /// The policy chain external traffic ends in, past the external chain's special cases.
    pub external_policy: Policy,
    /// External traffic (from outside the node) has endpoints to go to.
    pub has_external_endpoints: bool,
    /// Why external traffic is refused, when it is (`None` while it has endpoints).
    pub external_refusal: Option<Refusal>,
    pub uses_cluster_chain: bool,
    pub uses_local_chain: bool,
    /// The external-destinations chain (`KUBE-EXT-…`) exists: the port is externally
    /// accessible and has endpoints somewhere (even without local ones: the short circuit for
    /// traffic from this node still applies).
    pub uses_external_chain: bool,
    /// The firewall chain (`KUBE-FW-…`) for `loadBalancerSourceRanges` exists.
    pub uses_firewall: bool,
    /// A source range contains the node's IP, so the LB IPs as sources are admitted too.
    pub firewall_allows_lb_ips: bool,
    /// The endpoints of each policy chain, in kube-proxy's order (by `ip:port` string).
    pub cluster_endpoints: Vec<Backend>,
    pub local_endpoints: Vec<Backend>,
    /// Every endpoint a chain refers to (kube-proxy's allLocallyReachableEndpoints), by string.
    pub endpoints: Vec<Backend>,
}

impl PortPlan<'_> {
    /// The chain a policy refers to is written (it has endpoints).
    pub fn uses(&self, policy: Policy) -> bool {
        match policy {
            Policy::Cluster => self.uses_cluster_chain,
            Policy::Local => self.uses_local_chain,
        }
    }

    /// The endpoints of a policy chain.
    pub fn endpoints_of(&self, policy: Policy) -> &[Backend] {
        match policy {
            Policy::Cluster => &self.cluster_endpoints,
            Policy::Local => &self.local_endpoints,
        }
    }
}

/// The plan for every service port of one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    pub ports: Vec<PortPlan<'a>>,
    /// Endpoints summed over every service port (kube-proxy's large-cluster measure).
    pub total_endpoints: usize,
}

impl Plan<'_> {
    /// kube-proxy's `largeClusterMode`.
    pub fn large_cluster(&self) -> bool {
        self.total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD
    }
}

/// Endpoints in kube-proxy's order: sorted by their `ip:port` string.
fn by_string(backends: &[Backend]) -> Vec<Backend> {
    let mut v: Vec<(String, Backend)> = backends.iter().map(|b| (b.to_string(), *b)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.dedup_by(|a, b| a.0 == b.0);
    v.into_iter().map(|(_, b)| b).collect()
}

/// Plans every service port of `state` in `cfg.family`.
pub fn plan<'a>(state: &'a DesiredState, cfg: &PlanConfig) -> Plan<'a> {
    let ports: Vec<PortPlan<'a>> = state
        .service_ports
        .iter()
        .filter(|p| cfg.serves(p))
        .map(|p| plan_port(p, cfg))
        .collect();
    // kube-proxy counts the endpoints of its endpoints map, i.e. every endpoint of the
    // service port; the union of the policy sets is what kpr's model keeps of them.
    let total_endpoints = ports.iter().map(|p| p.endpoints.len()).sum();
    Plan {
        ports,
        total_endpoints,
    }
}

/// Plans one service port: a port's plan depends on nothing but the port and `cfg`, which is
/// what lets the nftables mode rewrite only the ports that changed.
pub fn plan_port<'a>(info: &'a ServicePortInfo, cfg: &PlanConfig) -> PortPlan<'a> {
    let name = info.name.to_string();
    let cluster_endpoints = by_string(&info.cluster_endpoints);
    let local_endpoints = by_string(&info.local_endpoints);
    let mut all: Vec<Backend> = cluster_endpoints.clone();
    all.extend(local_endpoints.iter().copied());
    let endpoints = by_string(&all);

    let has_endpoints = info.has_endpoints;
    let uses_cluster_chain = !cluster_endpoints.is_empty() && info.uses_cluster_endpoints();
    let uses_local_chain = !local_endpoints.is_empty() && info.uses_local_endpoints();

    let (internal_policy, has_internal_endpoints) = if info.internal_policy_local {
        (Policy::Local, has_endpoints && !local_endpoints.is_empty())
    } else {
        (Policy::Cluster, has_endpoints)
    };
    let (external_policy, has_external_endpoints) = if info.external_policy_local {
        (Policy::Local, has_endpoints && !local_endpoints.is_empty())
    } else {
        (Policy::Cluster, has_endpoints)
    };
    let refusal = |has: bool| match (has_endpoints, has) {
        (false, _) => Some(Refusal::Reject),
        (true, false) => Some(Refusal::Drop),
        (true, true) => None,
    };
    let uses_firewall = has_endpoints
        && !info.load_balancer_ips.is_empty()
        && !info.load_balancer_source_ranges.is_empty();
    let firewall_allows_lb_ips = cfg.node_ip.is_some_and(|node| {
        info.load_balancer_source_ranges
            .iter()
            .any(|net| net.contains(&node))
    });
    PortPlan {
        info,
        name,
        has_endpoints,
        internal: has_internal_endpoints.then_some(internal_policy),
        internal_refusal: refusal(has_internal_endpoints),
        external_policy,
        has_external_endpoints,
        external_refusal: refusal(has_external_endpoints),
        uses_cluster_chain,
        uses_local_chain,
        uses_external_chain: has_endpoints && info.externally_accessible(),
        uses_firewall,
        firewall_allows_lb_ips,
        cluster_endpoints,
        local_endpoints,
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};

    fn be(s: &str) -> Backend {
        let (ip, port) = s.rsplit_once(':').unwrap();
        Backend {
            ip: ip.parse().unwrap(),
            port: port.parse().unwrap(),
        }
    }

    fn info() -> ServicePortInfo {
        ServicePortInfo {
            name: ServicePortName {
                namespace: "ns".into(),
                name: "svc".into(),
                port: "p".into(),
            },
            protocol: Protocol::Tcp,
            cluster_ip: "10.96.0.1".parse().unwrap(),
            port: 80,
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_are_in_kube_proxys_string_order() {
        let mut i = info();
        i.cluster_endpoints = vec![be("10.0.0.9:80"), be("10.0.0.10:80")];
        i.has_endpoints = true;
        let p = plan_port(&i, &PlanConfig::default());
        assert_eq!(
            p.cluster_endpoints,
            vec![be("10.0.0.10:80"), be("10.0.0.9:80")]
        );
        assert_eq!(p.internal, Some(Policy::Cluster));
        assert_eq!(p.internal_refusal, None);
    }

    #[test]
    fn local_policies_without_local_endpoints_drop_and_none_at_all_rejects() {
        let mut i = info();
        i.internal_policy_local = true;
        i.has_endpoints = true;
        let p = plan_port(&i, &PlanConfig::default());
        assert_eq!(p.internal, None);
        assert_eq!(p.internal_refusal, Some(Refusal::Drop));
        i.has_endpoints = false;
        let p = plan_port(&i, &PlanConfig::default());
        assert_eq!(p.internal_refusal, Some(Refusal::Reject));
    }

    #[test]
    fn firewall_admits_lb_ips_when_a_range_holds_the_node() {
        let mut i = info();
        i.has_endpoints = true;
        i.cluster_endpoints = vec![be("10.0.0.1:80")];
        i.load_balancer_ips = vec!["203.0.113.1".parse().unwrap()];
        i.load_balancer_source_ranges = vec!["192.168.0.0/16".parse().unwrap()];
        let cfg = PlanConfig {
            node_ip: Some("192.168.1.2".parse().unwrap()),
            ..PlanConfig::default()
        };
        let p = plan_port(&i, &cfg);
        assert!(p.uses_firewall && p.firewall_allows_lb_ips && p.uses_external_chain);
        let p = plan_port(&i, &PlanConfig::default());
        assert!(!p.firewall_allows_lb_ips);
    }

    #[test]
    fn each_family_sees_only_its_own_node_addresses() {
        let desired = DesiredState {
            node_ips: vec!["192.168.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            node_ip: Some("192.168.0.2".parse().unwrap()),
            ..Default::default()
        };
        let v6 = PlanConfig {
            family: Family::V6,
            ..Default::default()
        };
        let c = v6.for_state(&desired, true);
        assert_eq!(c.nodeport_ips, Some(vec!["fd00::2".parse().unwrap()]));
        assert_eq!(
            c.node_ip, None,
            "the primary IP is IPv4: no node IP for IPv6"
        );
        let c = PlanConfig::default().for_state(&desired, true);
        assert_eq!(c.nodeport_ips, Some(vec!["192.168.0.2".parse().unwrap()]));
        assert_eq!(c.node_ip, desired.node_ip);
        assert_eq!(
            PlanConfig::default()
                .for_state(&desired, false)
                .nodeport_ips,
            None
        );
    }
}
