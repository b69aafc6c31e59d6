//! Chain names, as kube-proxy derives them: the iptables mode's `KUBE-SVC-<hash>` family and
//! the nftables mode's readable `service-<hash>-<ns>/<name>/<proto>/<port>` family. Both hash
//! the service port name (and the endpoint) the same way, so a name never depends on anything
//! but the object it belongs to.

use sha2::{Digest, Sha256};

use crate::model::{Backend, Protocol};

/// kube-proxy's `portProtoHash`: the first 16 characters of base32 (RFC 4648, padded) of
/// sha256(`input`).
pub fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = base32::encode(base32::Alphabet::Rfc4648 { padding: true }, &digest);
    encoded.truncate(16);
    encoded
}

/// The prefixes of the per-service-port iptables chains: every chain kpr may delete when it
/// is no longer in use, and nothing else.
pub const IPTABLES_SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// The iptables chains of one service port. `name` is the ServicePortName string (`ns/name:port`
/// or `ns/name`), `protocol` lower-case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptablesChains {
    /// `KUBE-SVC-…`: endpoints for `Cluster` traffic policy.
    pub cluster: String,
    /// `KUBE-SVL-…`: endpoints for `Local` traffic policy.
    pub local: String,
    /// `KUBE-EXT-…`: external destinations (short circuit, masquerade).
    pub external: String,
    /// `KUBE-FW-…`: loadBalancerSourceRanges.
    pub firewall: String,
}

impl IptablesChains {
    pub fn new(name: &str, protocol: Protocol) -> IptablesChains {
        let hash = hash16(&format!("{name}{}", protocol.as_lower()));
        IptablesChains {
            cluster: format!("KUBE-SVC-{hash}"),
            local: format!("KUBE-SVL-{hash}"),
            external: format!("KUBE-EXT-{hash}"),
            firewall: format!("KUBE-FW-{hash}"),
        }
    }
}

/// `KUBE-SEP-…`: the chain of one endpoint (`ip:port` as Go's `net.JoinHostPort`).
pub fn iptables_endpoint_chain(name: &str, protocol: Protocol, endpoint: &Backend) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{name}{}{endpoint}", protocol.as_lower()))
    )
}

/// kube-proxy's nftables `servicePortChainNameBase`: `<hash>-<ns>/<name>/<proto>/<port>`, the
/// hash over `ns/name:port` + protocol, lower-case. The readable part shows what it is; the hash
/// keeps names of different service ports apart.
pub fn nftables_service_base(
    namespace: &str,
    name: &str,
    port_name: &str,
    protocol: Protocol,
    port: u16,
) -> String {
    let spn = if port_name.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{namespace}/{name}:{port_name}")
    };
    let hash = hash16(&format!("{spn}{}", protocol.as_lower()));
    let port_part = if port_name.is_empty() {
        format!("p{port}")
    } else {
        port_name.to_string()
    };
    format!(
        "{hash}-{namespace}/{name}/{}/{port_part}",
        protocol.as_lower()
    )
}

/// kube-proxy's nftables `servicePortEndpointChainNameBase`:
/// `<hash>-<ns>/<name>/<proto>/<port>__<ip>/<port>`, the hash also over the endpoint.
pub fn nftables_endpoint_base(
    namespace: &str,
    name: &str,
    port_name: &str,
    protocol: Protocol,
    port: u16,
    endpoint: &Backend,
) -> String {
    let spn = if port_name.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{namespace}/{name}:{port_name}")
    };
    let hash = hash16(&format!("{spn}{}{endpoint}", protocol.as_lower()));
    let port_part = if port_name.is_empty() {
        format!("p{port}")
    } else {
        port_name.to_string()
    };
    let ep = match endpoint.ip {
        std::net::IpAddr::V4(ip) => format!("{ip}/{}", endpoint.port),
        std::net::IpAddr::V6(ip) => format!("{ip}/{}", endpoint.port),
    };
    format!(
        "{hash}-{namespace}/{name}/{}/{port_part}__{ep}",
        protocol.as_lower()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_names_match_kube_proxy() {
        // Independently computed:
        // python3 -c "import hashlib,base64;print(base64.b32encode(hashlib.sha256(b'ns/svc:httptcp').digest())[:16])"
        assert_eq!(
            IptablesChains::new("ns/svc:http", Protocol::Tcp).cluster,
            "KUBE-SVC-JK7NJ6AASESNLSKV"
        );
        // ... of b'ns/svc:httptcp10.0.0.1:8080'
        let ep = Backend {
            ip: "10.0.0.1".parse().unwrap(),
            port: 8080,
        };
        assert_eq!(
            iptables_endpoint_chain("ns/svc:http", Protocol::Tcp, &ep),
            "KUBE-SEP-FYUL5HB5O2NLPKXW"
        );
        // The well-known chain of the `kubernetes` Service on every cluster.
        assert_eq!(
            IptablesChains::new("default/kubernetes:https", Protocol::Tcp).cluster,
            "KUBE-SVC-NPX46M4PTMTKRN6Y"
        );
    }
}
