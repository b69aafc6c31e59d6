//! Which addresses of this node serve NodePorts (kube-proxy's `--nodeport-addresses`).
//!
//! As kube-proxy's `GetNodeIPs`: the addresses of the node's interfaces ([`crate::localaddr`])
//! that the filter selects; no filter selects them all. `primary` is the Node object's
//! InternalIP(s), kube-proxy's node IPs. Loopback addresses serve NodePorts only on IPv4 and
//! only with `--iptables-localhost-nodeports` (kube-proxy's rule; the nftables mode never
//! does), and only to clients on the node (CVE-2020-8558: the datapath never serves them to
//! traffic arriving from outside).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::config::NodePortAddress;

/// The NodePort addresses among `local` (this node's interface addresses) for `node` under
/// `filter` (empty: every local address).
pub fn nodeport_ips(
    node: Option<&Node>,
    local: &[IpAddr],
    filter: &[NodePortAddress],
    localhost_nodeports: bool,
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    if filter.is_empty() {
        out.extend(local);
    }
    for f in filter {
        match f {
            NodePortAddress::Primary => match node {
                Some(node) => out.extend(primary_ips(node)),
                // Without a Node object the primary address is unknown; serving none would
                // switch NodePorts off, so every address of the node serves (the agent logs
                // that it has no Node).
                None => out.extend(local.iter().filter(|ip| !ip.is_loopback())),
            },
            NodePortAddress::All => out.extend(local),
            NodePortAddress::Localhost => out.extend(local.iter().filter(|ip| ip.is_loopback())),
            NodePortAddress::Cidr(c) => out.extend(local.iter().filter(|ip| c.contains(*ip))),
        }
    }
    out.retain(|ip| match ip {
        IpAddr::V4(v4) => !v4.is_loopback() || localhost_nodeports,
        IpAddr::V6(v6) => !v6.is_loopback(),
    });
    out.sort();
    out.dedup();
    out
}

/// Whether `filter` selects every local address of a family (kube-proxy's `MatchAll`): the
/// iptables mode then matches NodePorts with `addrtype LOCAL` rather than address by address.
pub fn matches_all(filter: &[NodePortAddress]) -> bool {
    filter.is_empty()
        || filter.iter().any(|f| match f {
            NodePortAddress::All => true,
            NodePortAddress::Cidr(c) => c.prefix_len() == 0,
            _ => false,
        })
}

/// The Node's InternalIPs, or lacking any, its first address (kube-proxy's node IPs).
fn primary_ips(node: &Node) -> Vec<IpAddr> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let internal: Vec<IpAddr> = addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| crate::cidr::parse_ip(&a.address).ok())
        .collect();
    if !internal.is_empty() {
        return internal;
    }
    addresses
        .iter()
        .find_map(|a| crate::cidr::parse_ip(&a.address).ok())
        .into_iter()
        .collect()
}

/// The node's `topology.kubernetes.io/zone` label (topology hints).
pub fn zone(node: Option<&Node>) -> Option<String> {
    node?
        .metadata
        .labels
        .as_ref()?
        .get("topology.kubernetes.io/zone")
        .filter(|z| !z.is_empty())
        .cloned()
}

/// The Node's `spec.podCIDRs` (or, from older API servers, `spec.podCIDR`); an unparsable
/// entry is skipped.
pub fn pod_cidrs(node: Option<&Node>) -> Vec<ipnet::IpNet> {
    let Some(spec) = node.and_then(|n| n.spec.as_ref()) else {
        return Vec::new();
    };
    let listed = spec.pod_cidrs.clone().unwrap_or_default();
    let all = if listed.is_empty() {
        spec.pod_cidr.iter().cloned().collect()
    } else {
        listed
    };
    all.iter()
        .filter_map(|c| crate::cidr::parse(c.trim()).ok())
        .collect()
}

/// kube-proxy's `nodeIP`: the node's first InternalIP (or, lacking one, its first address).
pub fn primary_ip(node: Option<&Node>) -> Option<IpAddr> {
    primary_ips(node?).first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "192.168.1.10"},
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "Hostname", "address": "n1"}
            ]}
        }))
        .unwrap()
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// The interfaces' addresses: lo, eth0 (InternalIP), eth1, and IPv6 loopback and eth0.
    fn local() -> Vec<IpAddr> {
        ips(&["127.0.0.1", "192.168.1.10", "10.1.0.5", "::1", "fd00::10"])
    }

    #[test]
    fn default_is_every_local_address_with_or_without_a_node() {
        let all = ips(&["10.1.0.5", "127.0.0.1", "192.168.1.10", "fd00::10"]);
        assert_eq!(nodeport_ips(Some(&node()), &local(), &[], true), all);
        assert_eq!(nodeport_ips(None, &local(), &[], true), all);
    }

    #[test]
    fn loopback_serves_only_ipv4_and_only_with_localhost_nodeports() {
        let got = nodeport_ips(None, &local(), &[NodePortAddress::Localhost], true);
        assert_eq!(got, ips(&["127.0.0.1"]));
        let got = nodeport_ips(None, &local(), &[], false);
        assert_eq!(got, ips(&["10.1.0.5", "192.168.1.10", "fd00::10"]));
    }

    #[test]
    fn cidrs_match_interface_addresses() {
        let cidr = |s: &str| NodePortAddress::Cidr(s.parse().unwrap());
        let got = nodeport_ips(Some(&node()), &local(), &[cidr("10.0.0.0/8")], true);
        assert_eq!(got, ips(&["10.1.0.5"]));
        // 203.0.113.7 is the Node's ExternalIP but on no interface: not served.
        let got = nodeport_ips(Some(&node()), &local(), &[cidr("203.0.113.0/24")], true);
        assert_eq!(got, Vec::<IpAddr>::new());
        let got = nodeport_ips(None, &local(), &[cidr("127.0.0.0/8")], false);
        assert_eq!(got, Vec::<IpAddr>::new());
    }

    #[test]
    fn primary_is_the_nodes_internal_ip_and_every_address_without_a_node() {
        let primary = [NodePortAddress::Primary];
        assert_eq!(
            nodeport_ips(Some(&node()), &local(), &primary, true),
            ips(&["192.168.1.10"])
        );
        assert_eq!(
            nodeport_ips(None, &local(), &primary, true),
            ips(&["10.1.0.5", "192.168.1.10", "fd00::10"])
        );
        assert_eq!(primary_ip(Some(&node())), Some(ips(&["192.168.1.10"])[0]));
    }

    #[test]
    fn match_all_is_no_filter_all_or_a_zero_prefix() {
        assert!(matches_all(&[]));
        assert!(matches_all(&[NodePortAddress::All]));
        assert!(matches_all(&[NodePortAddress::Cidr(
            "0.0.0.0/0".parse().unwrap()
        )]));
        assert!(!matches_all(&[NodePortAddress::Primary]));
        assert!(!matches_all(&[NodePortAddress::Cidr(
            "10.0.0.0/8".parse().unwrap()
        )]));
    }
}
