//! The IPVS writer: a [`Plan`] spelled as what kube-proxy's IPVS proxier programs
//! (pkg/proxy/ipvs/proxier.go, `syncProxyRules` and `writeIptablesRules`): the service
//! addresses bound to the `kube-ipvs0` dummy device, one virtual server per frontend with its
//! real servers, the ipsets that classify frontends, and the iptables rules that match the sets
//! (masquerade, NodePorts, LB firewall, health-check ports). The dataplane (`super`) applies it.
//!
//! The decisions are the planner's: which endpoints each policy uses (a virtual server's real
//! servers are the policy's endpoints, so `Local` traffic reaches local ones only, and a
//! frontend without any has a virtual server without real servers, whose packets the local
//! stack refuses, as kube-proxy's do), session affinity as persistence.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{Backend, Family, Protocol};
use crate::netfilter::iptables::render::{forward_rules, JumpRule, Table};
use crate::netfilter::plan::{LocalDetector, Plan, PlanConfig, Policy, PortPlan};

/// kube-proxy's dummy device that holds the service addresses.
pub const DUMMY_DEVICE: &str = "kube-ipvs0";

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_NODE_PORT: &str = "KUBE-NODE-PORT";
pub const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_SOURCE_RANGES_FIREWALL: &str = "KUBE-SOURCE-RANGES-FIREWALL";

// kube-proxy's ipset names (pkg/proxy/ipvs/ipset.go).
pub const SET_CLUSTER_IP: &str = "KUBE-CLUSTER-IP";
pub const SET_EXTERNAL_IP: &str = "KUBE-EXTERNAL-IP";
pub const SET_EXTERNAL_IP_LOCAL: &str = "KUBE-EXTERNAL-IP-LOCAL";
pub const SET_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
pub const SET_LOAD_BALANCER_LOCAL: &str = "KUBE-LOAD-BALANCER-LOCAL";
pub const SET_LOAD_BALANCER_FW: &str = "KUBE-LOAD-BALANCER-FW";
pub const SET_LOAD_BALANCER_SOURCE_CIDR: &str = "KUBE-LOAD-BALANCER-SOURCE-CIDR";
pub const SET_HEALTH_CHECK_NODE_PORT: &str = "KUBE-HEALTH-CHECK-NODE-PORT";

/// The NodePort sets of a protocol: (all, eTP Local). TCP and UDP ports are `bitmap:port`
/// sets matched with `-p <proto>`; SCTP's are `hash:ip,port` (kube-proxy's choice: a bitmap
/// cannot tell the protocol, and `-p sctp` needs the module at rule load).
fn node_port_sets(p: Protocol) -> (&'static str, &'static str) {
    match p {
        Protocol::Tcp => ("KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP"),
        Protocol::Udp => ("KUBE-NODE-PORT-UDP", "KUBE-NODE-PORT-LOCAL-UDP"),
        Protocol::Sctp => ("KUBE-NODE-PORT-SCTP-HASH", "KUBE-NODE-PORT-LOCAL-SCTP-HASH"),
    }
}

/// An ipset: its type and entries, as `ipset restore` spells them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpSet {
    pub kind: &'static str,
    pub comment: &'static str,
    pub entries: BTreeSet<String>,
}

/// A virtual server kpr wants, keyed by (protocol, address, port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedServer {
    /// ClientIP affinity: persistence for this long.
    pub persistence_s: Option<u32>,
    /// The real servers, all with weight 1.
    pub real_servers: Vec<Backend>,
}

/// Everything the IPVS mode programs for one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpvsRules {
    /// Addresses bound to [`DUMMY_DEVICE`]: ClusterIPs, externalIPs, LB IPs.
    pub addresses: BTreeSet<IpAddr>,
    pub servers: BTreeMap<(Protocol, IpAddr, u16), WantedServer>,
    pub sets: BTreeMap<&'static str, IpSet>,
    /// `iptables-restore --noflush` input for the nat and filter tables.
    pub restore: String,
}

fn proto(p: Protocol) -> &'static str {
    p.as_lower()
}

/// `ip,proto:port`, an ipset `hash:ip,port` entry.
fn ip_port(ip: IpAddr, p: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", proto(p))
}

impl IpvsRules {
    fn add(&mut self, set: &'static str, entry: String) {
        self.sets.entry(set).or_default().entries.insert(entry);
    }

    fn server(&mut self, p: &PortPlan, address: IpAddr, port: u16, policy: Option<Policy>) {
        let real_servers = policy
            .map(|pol| p.endpoints_of(pol).to_vec())
            .unwrap_or_default();
        let persistence_s = p
            .info
            .session_affinity
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        self.servers.insert(
            (p.info.protocol, address, port),
            WantedServer {
                persistence_s,
                real_servers,
            },
        );
    }
}

/// The sets every sync declares (so that the rules that match them load even while empty).
fn declared_sets() -> BTreeMap<&'static str, IpSet> {
    let mut sets = BTreeMap::new();
    let mut declare = |name, kind, comment| {
        sets.insert(
            name,
            IpSet {
                kind,
                comment,
                entries: BTreeSet::new(),
            },
        );
    };
    declare(
        SET_CLUSTER_IP,
        "hash:ip,port",
        "Kubernetes service cluster ip + port for masquerade purpose",
    );
    declare(
        SET_EXTERNAL_IP,
        "hash:ip,port",
        "Kubernetes service external ip + port for masquerade and filter purpose",
    );
    declare(
        SET_EXTERNAL_IP_LOCAL,
        "hash:ip,port",
        "Kubernetes service external ip + port with externalTrafficPolicy=local",
    );
    declare(
        SET_LOAD_BALANCER,
        "hash:ip,port",
        "Kubernetes service lb portal",
    );
    declare(
        SET_LOAD_BALANCER_LOCAL,
        "hash:ip,port",
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    );
    declare(
        SET_LOAD_BALANCER_FW,
        "hash:ip,port",
        "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    );
    declare(
        SET_LOAD_BALANCER_SOURCE_CIDR,
        "hash:ip,port,net",
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    );
    declare(
        SET_HEALTH_CHECK_NODE_PORT,
        "bitmap:port",
        "Kubernetes health check node port",
    );
    for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        let (all, local) = node_port_sets(p);
        let kind = if p == Protocol::Sctp {
            "hash:ip,port"
        } else {
            "bitmap:port"
        };
        declare(all, kind, "Kubernetes nodeport");
        declare(
            local,
            kind,
            "Kubernetes nodeport with externalTrafficPolicy=local",
        );
    }
    sets
}

/// The IPVS mode's state for `plan` (one family).
pub fn write(plan: &Plan, cfg: &PlanConfig) -> IpvsRules {
    let mut r = IpvsRules {
        sets: declared_sets(),
        ..Default::default()
    };
    let node_ips: Vec<IpAddr> = cfg.nodeport_ips.clone().unwrap_or_default();
    for p in &plan.ports {
        let info = p.info;
        let protocol = info.protocol;
        // ClusterIP.
        r.addresses.insert(info.cluster_ip);
        r.add(
            SET_CLUSTER_IP,
            ip_port(info.cluster_ip, protocol, info.port),
        );
        r.server(p, info.cluster_ip, info.port, p.internal);
        let external = p.has_external_endpoints.then_some(p.external_policy);
        let local = info.external_policy_local;
        for &ip in &info.external_ips {
            r.addresses.insert(ip);
            let set = if local {
                SET_EXTERNAL_IP_LOCAL
            } else {
                SET_EXTERNAL_IP
            };
            r.add(set, ip_port(ip, protocol, info.port));
            r.server(p, ip, info.port, external);
        }
        for &ip in &info.load_balancer_ips {
            r.addresses.insert(ip);
            let entry = ip_port(ip, protocol, info.port);
            r.add(SET_LOAD_BALANCER, entry.clone());
            if local {
                r.add(SET_LOAD_BALANCER_LOCAL, entry.clone());
            }
            if !info.load_balancer_source_ranges.is_empty() {
                r.add(SET_LOAD_BALANCER_FW, entry.clone());
                for net in &info.load_balancer_source_ranges {
                    r.add(SET_LOAD_BALANCER_SOURCE_CIDR, format!("{entry},{net}"));
                }
                if p.firewall_allows_lb_ips {
                    r.add(
                        SET_LOAD_BALANCER_SOURCE_CIDR,
                        format!("{entry},{ip}/{}", if ip.is_ipv4() { 32 } else { 128 }),
                    );
                }
            }
            r.server(p, ip, info.port, external);
        }
        if let Some(node_port) = info.node_port {
            let (all, local_set) = node_port_sets(protocol);
            let entry = |ip: IpAddr| match protocol {
                Protocol::Sctp => ip_port(ip, protocol, node_port),
                _ => node_port.to_string(),
            };
            for &ip in &node_ips {
                r.add(all, entry(ip));
                if local {
                    r.add(local_set, entry(ip));
                }
                r.server(p, ip, node_port, external);
            }
        }
        if let Some(hc) = info.health_check_node_port {
            r.add(SET_HEALTH_CHECK_NODE_PORT, hc.to_string());
        }
    }
    r.restore = iptables_restore(cfg);
    r
}

/// kube-proxy's IPVS-mode iptables rules (`writeIptablesRules`): the same every sync, as
/// they only match the sets.
fn iptables_restore(cfg: &PlanConfig) -> String {
    let mark = format!("{:#x}", cfg.masquerade_mark);
    let mut nat = vec![
        format!(":{KUBE_SERVICES} - [0:0]"),
        format!(":{KUBE_POSTROUTING} - [0:0]"),
        format!(":{KUBE_NODE_PORT} - [0:0]"),
        format!(":{KUBE_LOAD_BALANCER} - [0:0]"),
        format!(":{KUBE_MARK_MASQ} - [0:0]"),
    ];
    let set_rule = |chain: &str, set: &str, args: &str, comment: &str, target: &str| {
        format!("-A {chain} -m comment --comment \"{comment}\" -m set --match-set {set} {args} -j {target}")
    };
    nat.push(format!(
        "-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"
    ));
    nat.push(format!("-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"));
    nat.push(format!(
        "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    ));
    nat.push(format!("-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}"));
    nat.push(set_rule(
        KUBE_SERVICES,
        SET_LOAD_BALANCER,
        "dst,dst",
        "Kubernetes service lb portal",
        KUBE_LOAD_BALANCER,
    ));
    // ClusterIP traffic is masqueraded when the detector says it is not local (or always).
    let masq_cluster = if cfg.masquerade_all {
        Some(String::new())
    } else {
        match &cfg.local {
            LocalDetector::Cidr(net) => Some(format!("! -s {net} ")),
            LocalDetector::Interface { name, prefix } => {
                Some(format!("! -i {name}{} ", if *prefix { "+" } else { "" }))
            }
            LocalDetector::None => None,
        }
    };
    if let Some(cond) = masq_cluster {
        nat.push(format!(
            "-A {KUBE_SERVICES} {cond}-m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set {SET_CLUSTER_IP} dst,dst -j {KUBE_MARK_MASQ}"
        ));
    }
    nat.push(set_rule(
        KUBE_SERVICES,
        SET_EXTERNAL_IP,
        "dst,dst",
        "Kubernetes service external ip + port for masquerade and filter purpose",
        KUBE_MARK_MASQ,
    ));
    nat.push(format!(
        "-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}"
    ));
    nat.push(format!(
        "-A {KUBE_SERVICES} -m set --match-set {SET_CLUSTER_IP} dst,dst -j ACCEPT"
    ));
    nat.push(format!(
        "-A {KUBE_SERVICES} -m set --match-set {SET_LOAD_BALANCER} dst,dst -j ACCEPT"
    ));
    nat.push(format!(
        "-A {KUBE_LOAD_BALANCER} -m set --match-set {SET_LOAD_BALANCER_LOCAL} dst,dst -j RETURN"
    ));
    nat.push(format!("-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}"));
    for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        let (all, local) = node_port_sets(p);
        let (m, args) = match p {
            Protocol::Sctp => ("", "dst,dst"),
            _ => (
                if p == Protocol::Tcp {
                    "-p tcp "
                } else {
                    "-p udp "
                },
                "dst",
            ),
        };
        nat.push(format!(
            "-A {KUBE_NODE_PORT} {m}-m comment --comment \"Kubernetes nodeport {0} with externalTrafficPolicy=local\" -m set --match-set {local} {args} -j RETURN",
            proto(p).to_uppercase()
        ));
        nat.push(format!(
            "-A {KUBE_NODE_PORT} {m}-m comment --comment \"Kubernetes nodeport {0} port for masquerade purpose\" -m set --match-set {all} {args} -j {KUBE_MARK_MASQ}",
            proto(p).to_uppercase()
        ));
    }

    let mut filter = vec![
        format!(":{KUBE_FORWARD} - [0:0]"),
        format!(":{KUBE_NODE_PORT} - [0:0]"),
        format!(":{KUBE_PROXY_FIREWALL} - [0:0]"),
        format!(":{KUBE_SOURCE_RANGES_FIREWALL} - [0:0]"),
    ];
    filter.push(format!(
        "-A {KUBE_PROXY_FIREWALL} -m set --match-set {SET_LOAD_BALANCER_FW} dst,dst -j {KUBE_SOURCE_RANGES_FIREWALL}"
    ));
    filter.push(format!(
        "-A {KUBE_SOURCE_RANGES_FIREWALL} -m set --match-set {SET_LOAD_BALANCER_SOURCE_CIDR} dst,dst,src -j RETURN"
    ));
    filter.push(format!("-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP"));
    filter.push(format!(
        "-A {KUBE_NODE_PORT} -m comment --comment \"Kubernetes health check node port\" -m set --match-set {SET_HEALTH_CHECK_NODE_PORT} dst -j ACCEPT"
    ));
    filter.extend(forward_rules(KUBE_FORWARD, &mark, false, false));

    let mut out = String::from("*nat\n");
    for l in nat {
        out.push_str(&l);
        out.push('\n');
    }
    out.push_str("COMMIT\n*filter\n");
    for l in filter {
        out.push_str(&l);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    if cfg.family == Family::V6 {
        for base in declared_sets().keys() {
            out = out.replace(
                &format!("--match-set {base} "),
                &format!("--match-set {} ", set_name(base, Family::V6)),
            );
        }
    }
    out
}

/// A set's name in `family`: kube-proxy's IPv6 sets are `KUBE-6-…` (ipsets have one family
/// each, and both families' share the namespace), cut to the kernel's 31 characters.
pub fn set_name(base: &str, family: Family) -> String {
    match family {
        Family::V4 => base.to_string(),
        Family::V6 => format!("KUBE-6-{}", base.trim_start_matches("KUBE-"))
            .chars()
            .take(IPSET_MAX_NAME)
            .collect(),
    }
}

/// The longest ipset name (`IPSET_MAXNAMELEN` less its NUL).
const IPSET_MAX_NAME: usize = 31;

const fn jump(table: Table, from: &'static str, to: &'static str) -> JumpRule {
    JumpRule {
        table,
        from,
        to,
        comment: "",
        ctstate_new: false,
    }
}

/// The jumps from the built-in chains into kube-proxy's IPVS chains.
pub const JUMP_RULES: &[JumpRule] = &[
    jump(Table::Nat, "PREROUTING", KUBE_SERVICES),
    jump(Table::Nat, "OUTPUT", KUBE_SERVICES),
    jump(Table::Nat, "POSTROUTING", KUBE_POSTROUTING),
    jump(Table::Filter, "INPUT", KUBE_PROXY_FIREWALL),
    jump(Table::Filter, "INPUT", KUBE_NODE_PORT),
    jump(Table::Filter, "FORWARD", KUBE_PROXY_FIREWALL),
    jump(Table::Filter, "FORWARD", KUBE_FORWARD),
    jump(Table::Filter, "OUTPUT", KUBE_PROXY_FIREWALL),
];

/// `ipset restore` input that makes every set of `sets` hold exactly its entries: each is
/// created if missing, flushed and filled in the one restore. (Filling a temporary set and
/// swapping it in would never show a half-written set, but 6.1's ipset refuses the swap of a
/// set created in the same restore: "ipset protocol error".)
pub fn ipset_restore(sets: &BTreeMap<&'static str, IpSet>, family: Family) -> String {
    let fam = match family {
        Family::V4 => "inet",
        Family::V6 => "inet6",
    };
    let mut out = String::new();
    for (base, set) in sets {
        let name = set_name(base, family);
        let opts = if set.kind == "bitmap:port" {
            "range 0-65535".to_string()
        } else {
            format!("family {fam} hashsize 1024 maxelem 65536")
        };
        out.push_str(&format!(
            "create {name} {} {opts} comment -exist\nflush {name}\n",
            set.kind
        ));
        for e in &set.entries {
            out.push_str(&format!("add {name} {e} comment \"{}\"\n", set.comment));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServicePortInfo, ServicePortName};
    use crate::netfilter::plan::plan_port;

    fn be(s: &str) -> Backend {
        let (ip, port) = s.rsplit_once(':').unwrap();
        Backend {
            ip: ip.parse().unwrap(),
            port: port.parse().unwrap(),
        }
    }

    fn port() -> ServicePortInfo {
        ServicePortInfo {
            name: ServicePortName {
                namespace: "ns".into(),
                name: "svc".into(),
                port: "p".into(),
            },
            cluster_ip: "10.96.0.1".parse().unwrap(),
            port: 80,
            node_port: Some(30080),
            cluster_endpoints: vec![be("10.244.1.1:8080"), be("10.244.2.1:8080")],
            local_endpoints: vec![be("10.244.1.1:8080")],
            has_endpoints: true,
            ..Default::default()
        }
    }

    fn cfg() -> PlanConfig {
        PlanConfig {
            nodeport_ips: Some(vec!["192.168.0.1".parse().unwrap()]),
            ..Default::default()
        }
    }

    fn rules(info: &ServicePortInfo) -> IpvsRules {
        let cfg = cfg();
        let plan = Plan {
            ports: vec![plan_port(info, &cfg)],
            total_endpoints: 2,
        };
        write(&plan, &cfg)
    }

    #[test]
    fn a_nodeport_service_has_a_server_per_frontend_with_the_policys_endpoints() {
        let mut info = port();
        info.session_affinity = Some(std::time::Duration::from_secs(600));
        let r = rules(&info);
        let cip: IpAddr = "10.96.0.1".parse().unwrap();
        let node: IpAddr = "192.168.0.1".parse().unwrap();
        assert_eq!(r.addresses, BTreeSet::from([cip]));
        let s = &r.servers[&(Protocol::Tcp, cip, 80)];
        assert_eq!(s.real_servers.len(), 2);
        assert_eq!(s.persistence_s, Some(600));
        assert_eq!(
            r.servers[&(Protocol::Tcp, node, 30080)].real_servers.len(),
            2
        );
        assert!(r.sets[SET_CLUSTER_IP].entries.contains("10.96.0.1,tcp:80"));
        assert!(r.sets["KUBE-NODE-PORT-TCP"].entries.contains("30080"));
        assert!(r.sets["KUBE-NODE-PORT-LOCAL-TCP"].entries.is_empty());
    }

    #[test]
    fn external_policy_local_uses_local_endpoints_and_skips_masquerade() {
        let mut info = port();
        info.external_policy_local = true;
        let r = rules(&info);
        let node: IpAddr = "192.168.0.1".parse().unwrap();
        assert_eq!(
            r.servers[&(Protocol::Tcp, node, 30080)].real_servers,
            vec![be("10.244.1.1:8080")]
        );
        assert!(r.sets["KUBE-NODE-PORT-LOCAL-TCP"].entries.contains("30080"));
    }

    #[test]
    fn without_endpoints_the_server_has_no_real_servers() {
        let mut info = port();
        info.cluster_endpoints.clear();
        info.local_endpoints.clear();
        info.has_endpoints = false;
        let r = rules(&info);
        let cip: IpAddr = "10.96.0.1".parse().unwrap();
        assert!(r.servers[&(Protocol::Tcp, cip, 80)].real_servers.is_empty());
    }

    #[test]
    fn source_ranges_fill_the_firewall_sets() {
        let mut info = port();
        info.load_balancer_ips = vec!["203.0.113.1".parse().unwrap()];
        info.load_balancer_source_ranges = vec!["192.168.100.0/24".parse().unwrap()];
        let r = rules(&info);
        assert!(r
            .addresses
            .contains(&"203.0.113.1".parse::<IpAddr>().unwrap()));
        assert!(r.sets[SET_LOAD_BALANCER_FW]
            .entries
            .contains("203.0.113.1,tcp:80"));
        assert!(r.sets[SET_LOAD_BALANCER_SOURCE_CIDR]
            .entries
            .contains("203.0.113.1,tcp:80,192.168.100.0/24"));
    }

    #[test]
    fn ipset_input_rewrites_every_set_whole() {
        let r = rules(&port());
        let text = ipset_restore(&r.sets, Family::V4);
        assert!(text.contains(
            "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist\nflush KUBE-CLUSTER-IP\n"
        ));
        assert!(text.contains(
            "add KUBE-CLUSTER-IP 10.96.0.1,tcp:80 comment \"Kubernetes service cluster ip + port for masquerade purpose\""
        ));
        assert!(text.contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535"));
    }

    #[test]
    fn ipv6_sets_have_their_own_names() {
        let cfg = PlanConfig {
            family: Family::V6,
            ..cfg()
        };
        let plan = Plan {
            ports: Vec::new(),
            total_endpoints: 0,
        };
        let r = write(&plan, &cfg);
        assert!(r.restore.contains("--match-set KUBE-6-CLUSTER-IP dst,dst"));
        assert!(!r.restore.contains("--match-set KUBE-CLUSTER-IP "));
        let text = ipset_restore(&r.sets, Family::V6);
        assert!(text.contains("create KUBE-6-CLUSTER-IP hash:ip,port family inet6"));
        let longest = set_name("KUBE-NODE-PORT-LOCAL-SCTP-HASH", Family::V6);
        assert_eq!(longest.len(), 31);
        assert!(r
            .restore
            .contains(&format!("--match-set {longest} dst,dst")));
    }

    #[test]
    fn the_rules_mark_and_masquerade_by_kube_proxys_bit() {
        let r = rules(&port());
        assert!(r
            .restore
            .contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"));
        assert!(r
            .restore
            .contains("-A KUBE-NODE-PORT -p tcp -m comment --comment \"Kubernetes nodeport TCP port for masquerade purpose\" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ"));
        assert!(r.restore.starts_with("*nat\n") && r.restore.ends_with("COMMIT\n"));
    }
}
