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

/// A frontend as a running agent reports it (its status's `frontends`, over the admin
/// socket): what it programmed, in any proxy mode.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct LiveFrontend {
    pub service: String,
    pub kind: String,
    #[serde(default)]
    pub backends: Vec<String>,
    #[serde(default)]
    pub external_backends: Option<Vec<String>>,
    #[serde(default)]
    pub policy_local: bool,
    #[serde(default)]
    pub affinity_timeout_s: Option<u64>,
    #[serde(default)]
    pub source_ranges: Vec<String>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    #[error("the agent's frontend {key:?}: {reason}")]
    Frontend { key: String, reason: String },
}

/// The frontends of a live agent's status (by `ip:port/proto`), in `family` when given, as the
/// views [`frontends`] makes of service ports. NodePorts, one entry per node address there, are
/// one frontend here, as in a dump.
pub fn live_frontends(
    live: &BTreeMap<String, LiveFrontend>,
    family: Option<crate::model::Family>,
) -> Result<BTreeMap<FrontendKey, FrontendView>, LiveError> {
    let bad = |key: &str, reason: String| LiveError::Frontend {
        key: key.to_owned(),
        reason,
    };
    // kube-proxy's rules tell "no endpoint anywhere" (reject) from "none for this policy"
    // (drop); the status tells it by whether any frontend of the service port has endpoints.
    let mut has_endpoints: BTreeMap<&str, bool> = BTreeMap::new();
    for f in live.values() {
        let any =
            !f.backends.is_empty() || f.external_backends.as_ref().is_some_and(|b| !b.is_empty());
        *has_endpoints.entry(f.service.as_str()).or_default() |= any;
    }
    let mut out = BTreeMap::new();
    for (key, f) in live {
        let (addr, proto) = key
            .rsplit_once('/')
            .ok_or_else(|| bad(key, "no /protocol".into()))?;
        let addr: std::net::SocketAddr = addr.parse().map_err(|e| bad(key, format!("{e}")))?;
        if family.is_some_and(|fam| crate::model::Family::of(addr.ip()) != fam) {
            continue;
        }
        let protocol = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            other => return Err(bad(key, format!("protocol {other:?}"))),
        };
        let external = f.kind != "ClusterIP";
        let address = if f.kind == "NodePort" {
            Address::NodePort
        } else {
            Address::Ip(addr.ip())
        };
        let names = if external {
            f.external_backends.as_ref().unwrap_or(&f.backends)
        } else {
            &f.backends
        };
        let mut endpoints = names
            .iter()
            .map(|b| {
                let a: std::net::SocketAddr = b
                    .parse()
                    .map_err(|e| bad(key, format!("backend {b:?}: {e}")))?;
                Ok(Backend {
                    ip: a.ip(),
                    port: a.port(),
                })
            })
            .collect::<Result<Vec<_>, LiveError>>()?;
        endpoints.sort();
        endpoints.dedup();
        let mut source_ranges = f
            .source_ranges
            .iter()
            .map(|r| {
                r.parse::<IpNet>()
                    .map_err(|e| bad(key, format!("source range {r:?}: {e}")))
            })
            .collect::<Result<Vec<_>, LiveError>>()?;
        source_ranges.sort();
        let known = has_endpoints
            .get(f.service.as_str())
            .copied()
            .unwrap_or_default();
        out.entry(FrontendKey {
            address,
            port: addr.port(),
            protocol,
        })
        .or_insert(FrontendView {
            service_port: f.service.clone(),
            drops: endpoints.is_empty() && known,
            endpoints,
            policy_local: f.policy_local,
            affinity: f.affinity_timeout_s.map(Duration::from_secs),
            source_ranges,
            policies_known: known,
        });
    }
    Ok(out)
}

/// One line per difference between the dump's frontends and the desired state's; empty when
/// they agree.
pub fn diff(dump: &[ServicePortInfo], desired: &[ServicePortInfo]) -> Vec<String> {
    diff_views(&frontends(dump), &frontends(desired), "manifests")
}

/// One line per difference between the dump's frontends `a` and `b`'s (named `other` in the
/// lines: where `b` came from).
pub fn diff_views(
    a: &BTreeMap<FrontendKey, FrontendView>,
    b: &BTreeMap<FrontendKey, FrontendView>,
    other: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for (key, d) in a {
        let Some(m) = b.get(key) else {
            out.push(format!("{key} ({}): only in the dump", d.service_port));
            continue;
        };
        let name = if d.service_port == m.service_port {
            d.service_port.clone()
        } else {
            format!("dump {}, {other} {}", d.service_port, m.service_port)
        };
        if d.endpoints != m.endpoints {
            let only = |x: &[Backend], y: &[Backend]| {
                x.iter()
                    .filter(|e| !y.contains(e))
                    .copied()
                    .collect::<Vec<_>>()
            };
            out.push(format!(
                "{key} ({name}): endpoints differ: only in the dump {}; only in the {other} {}",
                list(&only(&d.endpoints, &m.endpoints)),
                list(&only(&m.endpoints, &d.endpoints)),
            ));
        } else if d.endpoints.is_empty() && d.drops != m.drops {
            let verdict = |drops| if drops { "dropped" } else { "rejected" };
            out.push(format!(
                "{key} ({name}): without endpoints: dump {}, {other} {}",
                verdict(d.drops),
                verdict(m.drops)
            ));
        }
        if !d.policies_known || !m.policies_known {
            continue;
        }
        if d.policy_local != m.policy_local {
            out.push(format!(
                "{key} ({name}): traffic policy: dump {}, {other} {}",
                policy(d.policy_local),
                policy(m.policy_local)
            ));
        }
        if d.affinity != m.affinity {
            out.push(format!(
                "{key} ({name}): session affinity: dump {}, {other} {}",
                affinity(d.affinity),
                affinity(m.affinity)
            ));
        }
        if d.source_ranges != m.source_ranges {
            out.push(format!(
                "{key} ({name}): loadBalancerSourceRanges: dump {}, {other} {}",
                list(&d.source_ranges),
                list(&m.source_ranges)
            ));
        }
    }
    for (key, m) in b {
        if !a.contains_key(key) {
            out.push(format!("{key} ({}): only in the {other}", m.service_port));
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

    fn live(entries: &[(&str, &str, &[&str])]) -> BTreeMap<String, LiveFrontend> {
        entries
            .iter()
            .map(|(key, kind, backends)| {
                let f = LiveFrontend {
                    service: "ns/svc:p".into(),
                    kind: kind.to_string(),
                    backends: backends.iter().map(|b| b.to_string()).collect(),
                    ..LiveFrontend::default()
                };
                (key.to_string(), f)
            })
            .collect()
    }

    #[test]
    fn a_live_agent_is_compared_as_the_manifests_are() {
        let mut dump = port("10.0.0.1", &["10.1.0.1:8080"]);
        dump.node_port = Some(30080);
        let eps: &[&str] = &["10.1.0.1:8080"];
        // One NodePort entry per node address, and an IPv6 frontend the IPv4 dump leaves out.
        let agent = live(&[
            ("10.0.0.1:80/tcp", "ClusterIP", eps),
            ("192.168.1.1:30080/tcp", "NodePort", eps),
            ("192.168.1.2:30080/tcp", "NodePort", eps),
            ("[fd00::1]:80/tcp", "ClusterIP", eps),
        ]);
        let v4 = live_frontends(&agent, Some(crate::model::Family::V4)).unwrap();
        let lines = diff_views(&frontends(&[dump.clone()]), &v4, "agent");
        assert!(lines.is_empty(), "{lines:?}");

        let mut moved = agent.clone();
        moved.get_mut("10.0.0.1:80/tcp").unwrap().backends = vec!["10.1.0.2:8080".into()];
        moved.get_mut("10.0.0.1:80/tcp").unwrap().policy_local = true;
        let v4 = live_frontends(&moved, Some(crate::model::Family::V4)).unwrap();
        assert_eq!(
            diff_views(&frontends(&[dump]), &v4, "agent"),
            [
                "10.0.0.1:80/tcp (ns/svc:p): endpoints differ: only in the dump 10.1.0.1:8080; only in the agent 10.1.0.2:8080",
                "10.0.0.1:80/tcp (ns/svc:p): traffic policy: dump Cluster, agent Local",
            ]
        );
    }

    #[test]
    fn a_status_that_does_not_read_names_its_frontend() {
        for (key, want) in [
            ("10.0.0.1:80", "no /protocol"),
            ("10.0.0.1:80/icmp", "protocol \"icmp\""),
            ("10.0.0.300:80/tcp", "invalid socket address"),
        ] {
            let e = live_frontends(&live(&[(key, "ClusterIP", &[])]), None).unwrap_err();
            assert!(
                e.to_string().contains(key) && e.to_string().contains(want),
                "{e}"
            );
        }
        let e =
            live_frontends(&live(&[("10.0.0.1:80/tcp", "ClusterIP", &["x"])]), None).unwrap_err();
        assert!(e.to_string().contains("backend \"x\""), "{e}");
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
