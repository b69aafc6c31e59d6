//! The state a dump implies against a desired state, frontend by frontend.
//!
//! Both sides are service ports as the model describes them ([`ServicePortInfo`]: the endpoints
//! each traffic policy uses on this node), so the comparison is semantic: rule order, chain
//! hashes and comments do not matter, only what a client of each frontend gets.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::model::{Backend, Protocol, ServicePortInfo};

/// Where clients dial: an address, or any node address with a NodePort (the dump does not say
/// which node addresses kube-proxy served NodePorts on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Address {
    Ip(IpAddr),
    NodePort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FrontendKey {
    pub address: Address,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.protocol.as_lower();
        match self.address {
            Address::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}/{proto}", self.port),
            Address::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}/{proto}", self.port),
            Address::NodePort => write!(f, "nodePort {}/{proto}", self.port),
        }
    }
}

/// What a client of one frontend gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendView {
    pub service_port: String,
    /// The endpoints its traffic policy uses (sorted).
    pub endpoints: Vec<Backend>,
    /// Without endpoints: dropped (endpoints exist elsewhere) rather than rejected.
    pub drops: bool,
    pub policy_local: bool,
    pub affinity: Option<Duration>,
    pub source_ranges: Vec<IpNet>,
    /// A port without any endpoint shows neither policies nor affinity in kube-proxy's rules.
    pub policies_known: bool,
}

/// Every frontend of `ports`.
pub fn frontends(ports: &[ServicePortInfo]) -> BTreeMap<FrontendKey, FrontendView> {
    let mut out = BTreeMap::new();
    for p in ports {
        let view = |local: bool, ranges: &[IpNet]| {
            let mut endpoints = if local {
                p.local_endpoints.clone()
            } else {
                p.cluster_endpoints.clone()
            };
            endpoints.sort();
            endpoints.dedup();
            FrontendView {
                service_port: p.name.to_string(),
                drops: endpoints.is_empty() && p.has_endpoints,
                endpoints,
                policy_local: local,
                affinity: p.session_affinity,
                source_ranges: {
                    let mut r = ranges.to_vec();
                    r.sort();
                    r
                },
                policies_known: p.has_endpoints,
            }
        };
        let key = |address, port| FrontendKey {
            address,
            port,
            protocol: p.protocol,
        };
        out.insert(
            key(Address::Ip(p.cluster_ip), p.port),
            view(p.internal_policy_local, &[]),
        );
        let external = view(p.external_policy_local, &[]);
        for ip in &p.external_ips {
            out.insert(key(Address::Ip(*ip), p.port), external.clone());
        }
        for ip in &p.load_balancer_ips {
            out.insert(
                key(Address::Ip(*ip), p.port),
                view(p.external_policy_local, &p.load_balancer_source_ranges),
            );
        }
        if let Some(np) = p.node_port {
            out.insert(key(Address::NodePort, np), external);
        }
    }
    out
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn affinity(a: Option<Duration>) -> String {
    match a {
        Some(d) => format!("ClientIP {}s", d.as_secs()),
        None => "None".into(),
    }
}

fn policy(local: bool) -> &'static str {
    if local {
        "Local"
    } else {
        "Cluster"
    }
}

/// One line per difference between the dump's frontends and the desired state's; empty when
/// they agree.
pub fn diff(dump: &[ServicePortInfo], desired: &[ServicePortInfo]) -> Vec<String> {
    let (a, b) = (frontends(dump), frontends(desired));
    let mut out = Vec::new();
    for (key, d) in &a {
        let Some(m) = b.get(key) else {
            out.push(format!("{key} ({}): only in the dump", d.service_port));
            continue;
        };
        let name = if d.service_port == m.service_port {
            d.service_port.clone()
        } else {
            format!("dump {}, manifests {}", d.service_port, m.service_port)
        };
        if d.endpoints != m.endpoints {
            let only = |x: &[Backend], y: &[Backend]| {
                x.iter()
                    .filter(|e| !y.contains(e))
                    .copied()
                    .collect::<Vec<_>>()
            };
            out.push(format!(
                "{key} ({name}): endpoints differ: only in the dump {}; only in the manifests {}",
                list(&only(&d.endpoints, &m.endpoints)),
                list(&only(&m.endpoints, &d.endpoints)),
            ));
        } else if d.endpoints.is_empty() && d.drops != m.drops {
            let verdict = |drops| if drops { "dropped" } else { "rejected" };
            out.push(format!(
                "{key} ({name}): without endpoints: dump {}, manifests {}",
                verdict(d.drops),
                verdict(m.drops)
            ));
        }
        if !d.policies_known || !m.policies_known {
            continue;
        }
        if d.policy_local != m.policy_local {
            out.push(format!(
                "{key} ({name}): traffic policy: dump {}, manifests {}",
                policy(d.policy_local),
                policy(m.policy_local)
            ));
        }
        if d.affinity != m.affinity {
            out.push(format!(
                "{key} ({name}): session affinity: dump {}, manifests {}",
                affinity(d.affinity),
                affinity(m.affinity)
            ));
        }
        if d.source_ranges != m.source_ranges {
            out.push(format!(
                "{key} ({name}): loadBalancerSourceRanges: dump {}, manifests {}",
                list(&d.source_ranges),
                list(&m.source_ranges)
            ));
        }
    }
    for (key, m) in &b {
        if !a.contains_key(key) {
            out.push(format!("{key} ({}): only in the manifests", m.service_port));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(ip: &str, eps: &[&str]) -> ServicePortInfo {
        ServicePortInfo {
            name: crate::model::ServicePortName {
                namespace: "ns".into(),
                name: "svc".into(),
                port: "p".into(),
            },
            cluster_ip: ip.parse().unwrap(),
            port: 80,
            cluster_endpoints: eps
                .iter()
                .map(|e| {
                    let a: std::net::SocketAddr = e.parse().unwrap();
                    Backend {
                        ip: a.ip(),
                        port: a.port(),
                    }
                })
                .collect(),
            has_endpoints: !eps.is_empty(),
            ..ServicePortInfo::default()
        }
    }

    #[test]
    fn same_state_no_lines() {
        let a = vec![port("10.0.0.1", &["10.1.0.1:8080", "10.1.0.2:8080"])];
        let mut b = a.clone();
        b[0].cluster_endpoints.reverse();
        assert!(diff(&a, &b).is_empty());
    }

    #[test]
    fn each_difference_one_line() {
        let a = vec![port("10.0.0.1", &["10.1.0.1:8080"])];
        let mut b = vec![port("10.0.0.1", &["10.1.0.2:8080"])];
        b[0].session_affinity = Some(Duration::from_secs(60));
        b.push(port("10.0.0.2", &[]));
        let lines = diff(&a, &b);
        assert_eq!(
            lines,
            [
                "10.0.0.1:80/tcp (ns/svc:p): endpoints differ: only in the dump 10.1.0.1:8080; only in the manifests 10.1.0.2:8080",
                "10.0.0.1:80/tcp (ns/svc:p): session affinity: dump None, manifests ClientIP 60s",
                "10.0.0.2:80/tcp (ns/svc:p): only in the manifests",
            ]
        );
    }

    #[test]
    fn unknowable_policies_are_not_compared() {
        // A port without endpoints: kube-proxy's REJECT says nothing of its affinity.
        let a = vec![port("10.0.0.1", &[])];
        let mut b = a.clone();
        b[0].session_affinity = Some(Duration::from_secs(60));
        b[0].internal_policy_local = true;
        assert!(diff(&a, &b).is_empty());
    }
}
