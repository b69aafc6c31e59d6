//! The nftables writer: a [`Plan`] as the ruleset kube-proxy's nftables proxier builds
//! (pkg/proxy/nftables/proxier.go): one table, verdict maps from destinations to per-service
//! chains, `numgen` load balancing, affinity sets with timeouts, no-endpoint and firewall maps.
//! Checked against kube-proxy's own test expectations.

use std::net::IpAddr;

use ipnet::IpNet;

use super::ruleset::{
    Addr, BaseChain, Chain, ChainType, Element, ElementKey, Hook, Key, Rule, Ruleset, Set, Stmt,
    Verdict,
};
use crate::model::Family;
use crate::netfilter::chains::{nftables_endpoint_base, nftables_service_base};
use crate::netfilter::plan::{LocalDetector, Plan, PlanConfig, Policy, PortPlan, Refusal};

pub const CLUSTER_IPS_SET: &str = "cluster-ips";
pub const NODEPORT_IPS_SET: &str = "nodeport-ips";
pub const FIREWALL_IPS_MAP: &str = "firewall-ips";
pub const NO_ENDPOINT_SERVICES_MAP: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS_MAP: &str = "no-endpoint-nodeports";
pub const SERVICE_IPS_MAP: &str = "service-ips";
pub const SERVICE_NODEPORTS_MAP: &str = "service-nodeports";

const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
const FIREWALL_CHECK: &str = "firewall-check";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
const MASQUERADING: &str = "masquerading";
const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
const REJECT_CHAIN: &str = "reject-chain";
const SERVICES: &str = "services";
const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";

/// The nftables mode's own settings beyond the plan's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftablesConfig {
    /// The cluster's service CIDRs: traffic to an address in them that is no ClusterIP is
    /// dropped ("unallocated"). Empty: unknown, no such rule.
    pub service_cidrs: Vec<IpNet>,
}

fn jump(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(c.to_string()))
}

fn goto(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Goto(c.to_string()))
}

fn base(ty: ChainType, hook: Hook, priority: i32, rules: Vec<Rule>) -> Chain {
    Chain {
        base: Some(BaseChain { ty, hook, priority }),
        comment: None,
        rules,
    }
}

/// The table, chains, sets and maps every sync has, whatever the Services.
fn base_ruleset(cfg: &PlanConfig, nft: &NftablesConfig) -> Ruleset {
    let mut r = Ruleset::new(cfg.family);
    let mark = cfg.masquerade_mark;
    let new_jump = |c: &str| Rule::new(vec![Stmt::CtStateNew, jump(c)]);
    use ChainType::{Filter, Nat};
    for (name, chain) in [
        (
            "filter-prerouting-pre-dnat",
            base(
                Filter,
                Hook::Prerouting,
                -110,
                vec![new_jump(FIREWALL_CHECK)],
            ),
        ),
        (
            "filter-output-pre-dnat",
            base(Filter, Hook::Output, -110, vec![new_jump(FIREWALL_CHECK)]),
        ),
        (
            "filter-forward",
            base(
                Filter,
                Hook::Forward,
                0,
                vec![
                    new_jump(SERVICE_ENDPOINTS_CHECK),
                    new_jump(CLUSTER_IPS_CHECK),
                ],
            ),
        ),
        (
            "filter-input",
            base(
                Filter,
                Hook::Input,
                0,
                vec![
                    new_jump(NODEPORT_ENDPOINTS_CHECK),
                    new_jump(SERVICE_ENDPOINTS_CHECK),
                ],
            ),
        ),
        (
            "filter-output",
            base(
                Filter,
                Hook::Output,
                0,
                vec![
                    new_jump(SERVICE_ENDPOINTS_CHECK),
                    new_jump(CLUSTER_IPS_CHECK),
                ],
            ),
        ),
        (
            "nat-prerouting",
            base(
                Nat,
                Hook::Prerouting,
                -100,
                vec![Rule::new(vec![jump(SERVICES)])],
            ),
        ),
        (
            "nat-output",
            base(
                Nat,
                Hook::Output,
                -100,
                vec![Rule::new(vec![jump(SERVICES)])],
            ),
        ),
        (
            "nat-postrouting",
            base(
                Nat,
                Hook::Postrouting,
                100,
                vec![Rule::new(vec![jump(MASQUERADING)])],
            ),
        ),
    ] {
        r.chains.insert(name.to_string(), chain);
    }

    let mut cluster_ips_check = vec![Rule::commented(
        vec![
            Stmt::InSet {
                addr: Addr::Daddr,
                set: CLUSTER_IPS_SET.into(),
            },
            Stmt::Verdict(Verdict::Reject),
        ],
        "Reject traffic to invalid ports of ClusterIPs",
    )];
    if !nft.service_cidrs.is_empty() {
        cluster_ips_check.push(Rule::commented(
            vec![
                Stmt::PrefixSet {
                    addr: Addr::Daddr,
                    negate: false,
                    nets: nft.service_cidrs.clone(),
                },
                Stmt::Verdict(Verdict::Drop),
            ],
            "Drop traffic to unallocated ClusterIPs",
        ));
    }
    r.chain(CLUSTER_IPS_CHECK, cluster_ips_check);
    r.chain(
        FIREWALL_CHECK,
        vec![Rule::new(vec![Stmt::Vmap {
            key: Key::AddrProtoPort,
            map: FIREWALL_IPS_MAP.into(),
        }])],
    );
    r.chain(
        MARK_FOR_MASQUERADE,
        vec![Rule::new(vec![Stmt::MarkOr(mark)])],
    );
    r.chain(
        MASQUERADING,
        vec![
            Rule::new(vec![Stmt::MarkClear(mark), Stmt::Verdict(Verdict::Return)]),
            Rule::new(vec![Stmt::MarkXor(mark)]),
            Rule::new(vec![Stmt::Masquerade]),
        ],
    );
    r.chain(
        NODEPORT_ENDPOINTS_CHECK,
        vec![Rule::new(vec![
            Stmt::InSet {
                addr: Addr::Daddr,
                set: NODEPORT_IPS_SET.into(),
            },
            Stmt::Vmap {
                key: Key::ProtoPort,
                map: NO_ENDPOINT_NODEPORTS_MAP.into(),
            },
        ])],
    );
    r.chains.insert(
        REJECT_CHAIN.to_string(),
        Chain {
            base: None,
            comment: Some("helper for @no-endpoint-services / @no-endpoint-nodeports".into()),
            rules: vec![Rule::new(vec![Stmt::Verdict(Verdict::Reject)])],
        },
    );
    r.chain(
        SERVICES,
        vec![
            Rule::new(vec![Stmt::Vmap {
                key: Key::AddrProtoPort,
                map: SERVICE_IPS_MAP.into(),
            }]),
            Rule::new(vec![
                Stmt::InSet {
                    addr: Addr::Daddr,
                    set: NODEPORT_IPS_SET.into(),
                },
                Stmt::Vmap {
                    key: Key::ProtoPort,
                    map: SERVICE_NODEPORTS_MAP.into(),
                },
            ]),
        ],
    );
    r.chain(
        SERVICE_ENDPOINTS_CHECK,
        vec![Rule::new(vec![Stmt::Vmap {
            key: Key::AddrProtoPort,
            map: NO_ENDPOINT_SERVICES_MAP.into(),
        }])],
    );

    let set = |key, verdict_map, comment: &str| Set {
        key,
        verdict_map,
        timeout_s: None,
        comment: Some(comment.to_string()),
    };
    r.set(CLUSTER_IPS_SET, set(Key::Addr, false, "Active ClusterIPs"));
    r.set(
        NODEPORT_IPS_SET,
        set(Key::Addr, false, "IPs that accept NodePort traffic"),
    );
    r.set(
        FIREWALL_IPS_MAP,
        set(
            Key::AddrProtoPort,
            true,
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
    );
    r.set(
        NO_ENDPOINT_NODEPORTS_MAP,
        set(
            Key::ProtoPort,
            true,
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
    );
    r.set(
        NO_ENDPOINT_SERVICES_MAP,
        set(
            Key::AddrProtoPort,
            true,
            "vmap to drop or reject packets to services with no endpoints",
        ),
    );
    r.set(
        SERVICE_IPS_MAP,
        set(
            Key::AddrProtoPort,
            true,
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
    );
    r.set(
        SERVICE_NODEPORTS_MAP,
        set(Key::ProtoPort, true, "NodePort traffic"),
    );
    for ip in cfg.nodeport_ips.iter().flatten() {
        if (cfg.family == Family::V6) == ip.is_ipv6() {
            r.element(
                NODEPORT_IPS_SET,
                Element {
                    key: ElementKey::Addr(*ip),
                    comment: None,
                    verdict: None,
                },
            );
        }
    }
    r
}

/// The names of one service port's chains.
struct Names {
    cluster: String,
    local: String,
    external: String,
    firewall: String,
}

impl Names {
    fn of(p: &PortPlan) -> Names {
        let base = nftables_service_base(&p.info.name, p.info.protocol);
        Names {
            cluster: format!("service-{base}"),
            local: format!("local-{base}"),
            external: format!("external-{base}"),
            firewall: format!("firewall-{base}"),
        }
    }

    fn policy(&self, p: Policy) -> &str {
        match p {
            Policy::Cluster => &self.cluster,
            Policy::Local => &self.local,
        }
    }
}

/// The chains, sets and elements of one service port, added to `r`.
fn write_port(r: &mut Ruleset, p: &PortPlan, cfg: &PlanConfig) {
    let info = p.info;
    let n = Names::of(p);
    let proto = info.protocol;
    let refusal = |x: Refusal| match x {
        Refusal::Reject => Verdict::Goto(REJECT_CHAIN.into()),
        Refusal::Drop => Verdict::Drop,
    };
    let el = |key: ElementKey, comment: Option<&str>, verdict: Verdict| Element {
        key,
        comment: comment.map(str::to_string),
        verdict: Some(verdict),
    };
    let addr_key = |ip: IpAddr| ElementKey::AddrProtoPort(ip, proto, info.port);

    r.element(
        CLUSTER_IPS_SET,
        Element {
            key: ElementKey::Addr(info.cluster_ip),
            comment: None,
            verdict: None,
        },
    );
    match (p.internal, p.internal_refusal) {
        (Some(policy), _) => r.element(
            SERVICE_IPS_MAP,
            el(
                addr_key(info.cluster_ip),
                None,
                Verdict::Goto(n.policy(policy).into()),
            ),
        ),
        (None, Some(x)) => r.element(
            NO_ENDPOINT_SERVICES_MAP,
            el(addr_key(info.cluster_ip), Some(&p.name), refusal(x)),
        ),
        (None, None) => {}
    }
    for &ip in info.external_ips.iter().chain(&info.load_balancer_ips) {
        if p.uses_external_chain {
            r.element(
                SERVICE_IPS_MAP,
                el(addr_key(ip), None, Verdict::Goto(n.external.clone())),
            );
        }
        if let Some(x) = p.external_refusal {
            r.element(
                NO_ENDPOINT_SERVICES_MAP,
                el(addr_key(ip), Some(&p.name), refusal(x)),
            );
        }
    }
    if p.uses_firewall {
        for &ip in &info.load_balancer_ips {
            r.element(
                FIREWALL_IPS_MAP,
                el(addr_key(ip), None, Verdict::Goto(n.firewall.clone())),
            );
        }
    }
    if let Some(np) = info.node_port {
        let key = ElementKey::ProtoPort(proto, np);
        if p.uses_external_chain {
            r.element(
                SERVICE_NODEPORTS_MAP,
                el(key, None, Verdict::Goto(n.external.clone())),
            );
        }
        if let Some(x) = p.external_refusal {
            r.element(
                NO_ENDPOINT_NODEPORTS_MAP,
                el(key, Some(&p.name), refusal(x)),
            );
        }
    }

    // Masquerading of ClusterIP traffic, at the head of the internal traffic chain.
    let masq_rule = || -> Option<Rule> {
        let dst = Stmt::Prefix {
            addr: Addr::Daddr,
            negate: false,
            net: info.cluster_ip.into(),
        };
        if cfg.masquerade_all {
            Some(Rule::new(vec![dst, jump(MARK_FOR_MASQUERADE)]))
        } else {
            Some(Rule::new(vec![
                dst,
                local_match(&cfg.local, true)?,
                jump(MARK_FOR_MASQUERADE),
            ]))
        }
    };

    for policy in [Policy::Cluster, Policy::Local] {
        if !p.uses(policy) {
            continue;
        }
        let mut rules = Vec::new();
        if p.internal == Some(policy) {
            rules.extend(masq_rule());
        }
        let endpoints = p.endpoints_of(policy);
        let ep_chains: Vec<String> = endpoints
            .iter()
            .map(|e| format!("endpoint-{}", nftables_endpoint_base(&info.name, proto, e)))
            .collect();
        if info.session_affinity.is_some() {
            for e in endpoints {
                let base = nftables_endpoint_base(&info.name, proto, e);
                rules.push(Rule::new(vec![
                    Stmt::InSet {
                        addr: Addr::Saddr,
                        set: format!("affinity-{base}"),
                    },
                    goto(&format!("endpoint-{base}")),
                ]));
            }
        }
        rules.push(Rule::new(vec![Stmt::NumgenVmap(ep_chains)]));
        r.chain(n.policy(policy), rules);
    }

    if p.uses_external_chain {
        let mut rules = Vec::new();
        if !info.external_policy_local {
            rules.push(Rule::new(vec![jump(MARK_FOR_MASQUERADE)]));
        } else {
            if let Some(local) = local_match(&cfg.local, false) {
                rules.push(Rule::commented(
                    vec![local, goto(&n.cluster)],
                    "short-circuit pod traffic",
                ));
            }
            rules.push(Rule::commented(
                vec![Stmt::FibSaddrLocal, jump(MARK_FOR_MASQUERADE)],
                "masquerade local traffic",
            ));
            rules.push(Rule::commented(
                vec![Stmt::FibSaddrLocal, goto(&n.cluster)],
                "short-circuit local traffic",
            ));
        }
        if p.has_external_endpoints {
            rules.push(Rule::new(vec![goto(n.policy(p.external_policy))]));
        }
        r.chain(&n.external, rules);
    }

    if p.uses_firewall {
        let mut sources = info.load_balancer_source_ranges.clone();
        if p.firewall_allows_lb_ips {
            sources.extend(info.load_balancer_ips.iter().map(|&ip| IpNet::from(ip)));
        }
        r.chain(
            &n.firewall,
            vec![Rule::new(vec![
                Stmt::PrefixSet {
                    addr: Addr::Saddr,
                    negate: true,
                    nets: sources,
                },
                Stmt::Verdict(Verdict::Drop),
            ])],
        );
    }

    for e in &p.endpoints {
        let base = nftables_endpoint_base(&info.name, proto, e);
        let mut rules = vec![Rule::new(vec![
            Stmt::Prefix {
                addr: Addr::Saddr,
                negate: false,
                net: e.ip.into(),
            },
            jump(MARK_FOR_MASQUERADE),
        ])];
        if let Some(timeout) = info.session_affinity {
            let set = format!("affinity-{base}");
            r.set(
                &set,
                Set {
                    key: Key::Addr,
                    verdict_map: false,
                    timeout_s: Some(timeout.as_secs()),
                    comment: None,
                },
            );
            rules.push(Rule::new(vec![Stmt::UpdateSaddr(set)]));
        }
        rules.push(Rule::new(vec![Stmt::L4proto(proto), Stmt::Dnat(*e)]));
        r.chain(&format!("endpoint-{base}"), rules);
    }
}

/// The whole ruleset for `plan`.
pub fn write(plan: &Plan, cfg: &PlanConfig, nft: &NftablesConfig) -> Ruleset {
    let mut r = base_ruleset(cfg, nft);
    for p in &plan.ports {
        write_port(&mut r, p, cfg);
    }
    r
}

/// What one service port puts in the table: its own chains and sets, and its elements of the
/// shared sets and maps (written into an otherwise empty ruleset).
pub fn port_fragment(p: &PortPlan, cfg: &PlanConfig) -> Ruleset {
    let mut r = Ruleset::new(cfg.family);
    write_port(&mut r, p, cfg);
    r
}

/// kube-proxy's local-traffic detector as an nftables match (`IfLocal`, or with `negate`
/// `IfNotLocal`); None without a detector.
fn local_match(local: &LocalDetector, negate: bool) -> Option<Stmt> {
    match local {
        LocalDetector::None => None,
        LocalDetector::Cidr(net) => Some(Stmt::Prefix {
            addr: Addr::Saddr,
            negate,
            net: *net,
        }),
        LocalDetector::Interface { name, prefix } => Some(Stmt::Iifname {
            name: name.clone(),
            prefix: *prefix,
            negate,
        }),
    }
}
