//! Chain names, as kube-proxy derives them: the iptables mode's `KUBE-SVC-<hash>` family and
//! the nftables mode's readable `service-<hash>-<ns>/<name>/<proto>/<port>` family. Both hash
//! the service port name (and the endpoint) the same way, so a name never depends on anything
//! but the object it belongs to.

use sha2::{Digest, Sha256};

use crate::model::{Backend, Protocol, ServicePortName};

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

/// kube-proxy's nftables `servicePortChainNameBase`: `<hash8>-<ns>/<name>/<proto>/<port name>`,
/// the hash over the readable part itself. The readable part shows what the chain is for; the
/// hash keeps apart names that differ only in characters nftables does not allow.
pub fn nftables_service_base(spn: &ServicePortName, protocol: Protocol) -> String {
    with_hash(format!(
        "{}/{}/{}/{}",
        spn.namespace,
        spn.name,
        protocol.as_lower(),
        spn.port
    ))
}

/// kube-proxy's nftables `servicePortEndpointChainNameBase`:
/// `<hash8>-<ns>/<name>/<proto>/<port name>__<ip>/<port>`.
pub fn nftables_endpoint_base(
    spn: &ServicePortName,
    protocol: Protocol,
    endpoint: &Backend,
) -> String {
    with_hash(format!(
        "{}/{}/{}/{}__{}/{}",
        spn.namespace,
        spn.name,
        protocol.as_lower(),
        spn.port,
        endpoint.ip,
        endpoint.port
    ))
}

fn with_hash(base: String) -> String {
    let mut hash = hash16(&base);
    hash.truncate(8);
    format!("{hash}-{base}")
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

    #[test]
    fn nftables_names_match_kube_proxy() {
        // From kube-proxy's TestOverallNFTablesRules.
        let spn = ServicePortName {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port: "p80".into(),
        };
        assert_eq!(
            nftables_service_base(&spn, Protocol::Tcp),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        let ep = Backend {
            ip: "10.180.0.1".parse().unwrap(),
            port: 80,
        };
        assert_eq!(
            nftables_endpoint_base(&spn, Protocol::Tcp, &ep),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }
}
