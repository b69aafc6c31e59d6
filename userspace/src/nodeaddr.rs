//! Which addresses of this node serve NodePorts (kube-proxy's `--nodeport-addresses`).
//!
//! kube-proxy reads the addresses of the node's interfaces; kpr takes them from this node's
//! Node object (`status.addresses`), which the API source delivers and which is what the
//! `primary` keyword means anyway. A manifest-directory source has no Node, hence no NodePorts.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::config::NodePortAddress;

/// The NodePort addresses for `node` under `filter` (empty: kube-proxy's default, `primary`).
pub fn nodeport_ips(node: Option<&Node>, filter: &[NodePortAddress]) -> Vec<IpAddr> {
    let addresses: Vec<(String, IpAddr)> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .filter_map(|a| Some((a.type_.clone(), a.address.parse().ok()?)))
                .collect()
        })
        .unwrap_or_default();
    let primary = || -> Vec<IpAddr> {
        addresses
            .iter()
            .filter(|(t, _)| t == "InternalIP")
            .map(|(_, ip)| *ip)
            .collect()
    };
    let mut out = Vec::new();
    if filter.is_empty() {
        out = primary();
    }
    for f in filter {
        match f {
            NodePortAddress::Primary => out.extend(primary()),
            NodePortAddress::All => out.extend(addresses.iter().map(|(_, ip)| *ip)),
            NodePortAddress::Localhost => out.push(IpAddr::from([127, 0, 0, 1])),
            NodePortAddress::Cidr(c) => out.extend(
                addresses
                    .iter()
                    .map(|(_, ip)| *ip)
                    .filter(|ip| c.contains(ip)),
            ),
        }
    }
    out.sort();
    out.dedup();
    out
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

/// kube-proxy's `nodeIP`: the node's first InternalIP (or, lacking one, its first address).
pub fn primary_ip(node: Option<&Node>) -> Option<IpAddr> {
    let addresses = node?.status.as_ref()?.addresses.as_ref()?;
    let parse = |t: Option<&str>| {
        addresses
            .iter()
            .filter(|a| t.is_none_or(|t| a.type_ == t))
            .find_map(|a| a.address.parse().ok())
    };
    parse(Some("InternalIP")).or_else(|| parse(None))
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

    #[test]
    fn default_is_the_primary_address() {
        assert_eq!(nodeport_ips(Some(&node()), &[]), ips(&["192.168.1.10"]));
        assert_eq!(nodeport_ips(None, &[]), Vec::<IpAddr>::new());
    }

    #[test]
    fn filters_select_addresses() {
        let n = node();
        assert_eq!(
            nodeport_ips(Some(&n), &[NodePortAddress::All]),
            ips(&["192.168.1.10", "203.0.113.7"])
        );
        let cidr = NodePortAddress::Cidr("203.0.113.0/24".parse().unwrap());
        assert_eq!(nodeport_ips(Some(&n), &[cidr]), ips(&["203.0.113.7"]));
        assert_eq!(
            nodeport_ips(
                Some(&n),
                &[NodePortAddress::Localhost, NodePortAddress::Primary]
            ),
            ips(&["127.0.0.1", "192.168.1.10"])
        );
    }
}
