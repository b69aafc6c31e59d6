//! The iptables writer: a [`Plan`] spelled as the `iptables-restore` input kube-proxy's iptables
//! proxier writes (pkg/proxy/iptables/proxier.go, `syncProxyRules`), rule for rule and argument
//! for argument, so that kube-proxy's own test expectations are its golden files. The same text
//! is kpr's benchmark baseline (`kpr render-iptables`).
//!
//! kube-proxy iterates a Go map of service ports; kpr writes them in the plan's order (sorted),
//! which is one of the orders kube-proxy may produce.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;

use crate::model::Family;
use crate::netfilter::chains::{
    iptables_endpoint_chain, IptablesChains, IPTABLES_SERVICE_CHAIN_PREFIXES,
};
use crate::netfilter::plan::{LocalDetector, Plan, PlanConfig, Policy, PortPlan, Refusal};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// kubelet's chain, which kube-proxy also fills (the localhost-NodePort protection).
pub const KUBELET_FIREWALL: &str = "KUBE-FIREWALL";

/// An iptables table kpr writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Nat,
}

impl Table {
    pub const fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }

    /// The built-in chains of the table.
    pub const fn builtins(self) -> &'static [&'static str] {
        match self {
            Table::Filter => &["INPUT", "FORWARD", "OUTPUT"],
            Table::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        }
    }
}

/// kube-proxy's KUBE-FORWARD rules in `chain`: forwarded traffic marked for masquerade (a
/// Service's, by `mark`) and established flows are accepted, so a FORWARD policy of DROP
/// (Docker sets one) does not drop them; INVALID packets are dropped unless conntrack is
/// liberal. The eBPF mode writes the same rules in its own chain ([`super::forward`]).
pub fn forward_rules(chain: &str, mark: &str, liberal: bool, nfacct: bool) -> Vec<String> {
    let mut rules = Vec::new();
    if !liberal {
        let count = if nfacct {
            format!(" -m nfacct --nfacct-name {NFACCT_CT_STATE_INVALID_DROPPED}")
        } else {
            String::new()
        };
        rules.push(format!(
            "-A {chain} -m conntrack --ctstate INVALID{count} -j DROP"
        ));
    }
    rules.push(format!(
        "-A {chain} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    ));
    rules.push(format!(
        "-A {chain} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));
    rules
}

/// A jump from a built-in chain into one of kube-proxy's (kube-proxy's `iptablesJumpChains`
/// followed by `iptablesKubeletJumpChains`). kube-proxy ensures each with `iptables -C`/`-I`
/// (prepend) rather than in the restore input, so as not to own the built-in chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpRule {
    pub table: Table,
    pub from: &'static str,
    pub to: &'static str,
    pub comment: &'static str,
    pub ctstate_new: bool,
}

impl JumpRule {
    /// The rule's arguments after `-A <from>` / `-C <from>` / `-I <from>`.
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.ctstate_new {
            a.extend(["-m", "conntrack", "--ctstate", "NEW"].map(String::from));
        }
        if !self.comment.is_empty() {
            a.extend(["-m", "comment", "--comment"].map(String::from));
            a.push(self.comment.to_string());
        }
        a.extend(["-j".to_string(), self.to.to_string()]);
        a
    }

    /// As a line of restore input (the comment quoted).
    pub fn line(&self) -> String {
        let mut l = format!("-A {}", self.from);
        for a in self.args() {
            if a.contains(' ') {
                let _ = write!(l, " \"{a}\"");
            } else {
                let _ = write!(l, " {a}");
            }
        }
        l
    }
}

const fn jump(
    table: Table,
    to: &'static str,
    from: &'static str,
    comment: &'static str,
    ctstate_new: bool,
) -> JumpRule {
    JumpRule {
        table,
        from,
        to,
        comment,
        ctstate_new,
    }
}

/// kube-proxy's jump rules, in the order it ensures them.
pub const JUMP_RULES: &[JumpRule] = &[
    jump(
        Table::Filter,
        KUBE_EXTERNAL_SERVICES,
        "INPUT",
        "kubernetes externally-visible service portals",
        true,
    ),
    jump(
        Table::Filter,
        KUBE_EXTERNAL_SERVICES,
        "FORWARD",
        "kubernetes externally-visible service portals",
        true,
    ),
    jump(
        Table::Filter,
        KUBE_NODEPORTS,
        "INPUT",
        "kubernetes health check service ports",
        false,
    ),
    jump(
        Table::Filter,
        KUBE_SERVICES,
        "FORWARD",
        "kubernetes service portals",
        true,
    ),
    jump(
        Table::Filter,
        KUBE_SERVICES,
        "OUTPUT",
        "kubernetes service portals",
        true,
    ),
    jump(
        Table::Filter,
        KUBE_FORWARD,
        "FORWARD",
        "kubernetes forwarding rules",
        false,
    ),
    jump(
        Table::Filter,
        KUBE_PROXY_FIREWALL,
        "INPUT",
        "kubernetes load balancer firewall",
        true,
    ),
    jump(
        Table::Filter,
        KUBE_PROXY_FIREWALL,
        "OUTPUT",
        "kubernetes load balancer firewall",
        true,
    ),
    jump(
        Table::Filter,
        KUBE_PROXY_FIREWALL,
        "FORWARD",
        "kubernetes load balancer firewall",
        true,
    ),
    jump(
        Table::Nat,
        KUBE_SERVICES,
        "OUTPUT",
        "kubernetes service portals",
        false,
    ),
    jump(
        Table::Nat,
        KUBE_SERVICES,
        "PREROUTING",
        "kubernetes service portals",
        false,
    ),
    jump(
        Table::Nat,
        KUBE_POSTROUTING,
        "POSTROUTING",
        "kubernetes postrouting rules",
        false,
    ),
    // iptablesKubeletJumpChains: no comment.
    jump(Table::Filter, KUBELET_FIREWALL, "INPUT", "", false),
    jump(Table::Filter, KUBELET_FIREWALL, "OUTPUT", "", false),
];

/// The iptables mode's own settings beyond the plan's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptablesConfig {
    /// The masquerade mark as kube-proxy spells it (`fmt.Sprintf("%#08x", 1<<bit)`:
    /// `0x00004000`; kube-proxy's unit tests use `0x4000`).
    pub mark: String,
    /// `--random-fully` on the MASQUERADE rule (iptables ≥ 1.6.2).
    pub random_fully: bool,
    /// `nf_conntrack_tcp_be_liberal` is set: no INVALID-drop rule is needed.
    pub conntrack_tcp_liberal: bool,
    /// kube-proxy's nfacct counters exist (the packet counts behind its
    /// `iptables_ct_state_invalid_dropped_packets_total` and
    /// `iptables_localhost_nodeports_accepted_packets_total` metrics): the rules count into
    /// them.
    pub nfacct: bool,
}

/// kube-proxy's nfacct counter names.
pub const NFACCT_CT_STATE_INVALID_DROPPED: &str = "ct_state_invalid_dropped_pkts";
pub const NFACCT_LOCALHOST_NODEPORTS_ACCEPTED: &str = "localhost_nps_accepted_pkts";

impl IptablesConfig {
    /// kube-proxy's defaults for mark bit `bit` (14 by default).
    pub fn for_mark_bit(bit: u32) -> IptablesConfig {
        IptablesConfig {
            mark: format!("{:#010x}", 1u32 << bit),
            random_fully: true,
            conntrack_tcp_liberal: false,
            nfacct: false,
        }
    }
}

/// What a sync writes besides the plan.
#[derive(Clone, Copy, Default)]
pub struct WriteScope<'a> {
    /// Only the per-service-port nat chains of the ports this says changed are written (a
    /// partial sync, as kube-proxy since 1.26); `None`: every one (a full sync).
    pub changed: Option<&'a dyn Fn(&PortPlan) -> bool>,
    /// The nat chains the kernel holds now (from `iptables-save -t nat`): kpr's service chains
    /// among them that the plan no longer uses are flushed and deleted.
    pub existing_nat_chains: Option<&'a BTreeSet<String>>,
}

/// The restore input for a plan, with what kube-proxy's metrics count of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptablesRules {
    pub text: String,
    /// Rules written to the filter table.
    pub filter_rules: usize,
    /// Rules written to the nat table (less the `-X` lines), and rules that a partial sync
    /// left in place (their chains unchanged).
    pub nat_rules: usize,
    pub nat_rules_skipped: usize,
    /// Stale chains this input deletes.
    pub deleted_chains: usize,
}

/// kube-proxy's `LineBuffer`, reduced to what is needed here: lines and their count.
#[derive(Default)]
struct Lines {
    text: String,
    lines: usize,
}

impl Lines {
    fn line(&mut self, l: impl AsRef<str>) {
        self.text.push_str(l.as_ref());
        self.text.push('\n');
        self.lines += 1;
    }

    /// `utiliptables.MakeChainLine`.
    fn chain(&mut self, chain: &str) {
        self.line(format!(":{chain} - [0:0]"));
    }

    fn append_from(&mut self, other: &Lines) {
        self.text.push_str(&other.text);
        self.lines += other.lines;
    }
}

/// kube-proxy's `computeProbability(n)`: `fmt.Sprintf("%0.10f", 1.0/float64(n))` (Rust's and
/// Go's formatting both round the exact binary value half to even).
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Writes the restore input for `plan`.
pub fn write(
    plan: &Plan,
    cfg: &PlanConfig,
    ipt: &IptablesConfig,
    scope: WriteScope<'_>,
) -> IptablesRules {
    let large = plan.large_cluster();
    let ports: Vec<(PortRules, bool)> = plan
        .ports
        .iter()
        .map(|p| {
            (
                port_rules(p, cfg, ipt, large),
                scope.changed.is_none_or(|f| f(p)),
            )
        })
        .collect();
    let ports: Vec<(&PortRules, bool)> = ports.iter().map(|(r, c)| (r, *c)).collect();
    assemble(&ports, cfg, ipt, scope.existing_nat_chains)
}

/// Everything one service port writes: its rules in the shared chains and its own chains. A
/// function of the port's plan, the node-wide settings and the large-cluster mode only, so a
/// sync can keep the ports' rules that did not change instead of writing them again.
#[derive(Default)]
pub struct PortRules {
    /// Its rules in the filter table's shared chains.
    filter: Lines,
    /// Its rules in the nat table's shared chains (KUBE-SERVICES, KUBE-NODEPORTS).
    nat: Lines,
    own: PortChains,
    /// Its own chains' names.
    active: Vec<String>,
    /// Its endpoints (kube-proxy's large-cluster measure).
    pub endpoints: usize,
}

/// The rules of service port `p`.
pub fn port_rules(p: &PortPlan, cfg: &PlanConfig, ipt: &IptablesConfig, large: bool) -> PortRules {
    let mut r = PortRules::default();
    let mut active = BTreeSet::new();
    r.own = write_port(p, cfg, ipt, large, &mut r.filter, &mut r.nat, &mut active);
    r.active = active.into_iter().collect();
    r.endpoints = p.endpoints.len();
    r
}

/// The restore input from every service port's rules, in order; a port marked `false` keeps
/// its own chains as they are in the kernel (a partial sync: its lines are counted, for the
/// metrics, and dropped). `existing_nat_chains`: see [`WriteScope`].
pub fn assemble(
    ports: &[(&PortRules, bool)],
    cfg: &PlanConfig,
    ipt: &IptablesConfig,
    existing_nat_chains: Option<&BTreeSet<String>>,
) -> IptablesRules {
    let mark = &ipt.mark;
    let mut filter_chains = Lines::default();
    let mut filter_rules = Lines::default();
    let mut nat_chains = Lines::default();
    let mut nat_rules = Lines::default();
    let mut skipped_chains = Lines::default();
    let mut skipped_rules = Lines::default();

    for chain in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        filter_chains.chain(chain);
    }
    for chain in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        nat_chains.chain(chain);
    }
    nat_rules.line(format!(
        "-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"
    ));
    nat_rules.line(format!("-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"));
    nat_rules.line(format!(
        "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{}",
        if ipt.random_fully { " --random-fully" } else { "" }
    ));
    nat_rules.line(format!("-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}"));

    let ipv6 = cfg.family == Family::V6;
    if !ipv6 && cfg.localhost_nodeports {
        // kube-proxy's copy of kubelet's rule against the route_localnet hole (issue 90259).
        filter_chains.chain(KUBELET_FIREWALL);
        filter_rules.line(format!(
            "-A {KUBELET_FIREWALL} -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        ));
    }

    for (rules, write_own) in ports {
        filter_rules.append_from(&rules.filter);
        nat_rules.append_from(&rules.nat);
        if *write_own {
            nat_chains.append_from(&rules.own.chains);
            nat_rules.append_from(&rules.own.rules);
        } else {
            skipped_chains.append_from(&rules.own.chains);
            skipped_rules.append_from(&rules.own.rules);
        }
    }

    let mut deleted = 0;
    if let Some(existing) = existing_nat_chains {
        // Service chains of the nat table in use after this input is loaded.
        let active: HashSet<&str> = ports
            .iter()
            .flat_map(|(r, _)| r.active.iter().map(String::as_str))
            .collect();
        for chain in existing.iter().filter(|c| !active.contains(c.as_str())) {
            if !IPTABLES_SERVICE_CHAIN_PREFIXES
                .iter()
                .any(|p| chain.starts_with(p))
            {
                continue;
            }
            // A chain line flushes the chain; then it can go.
            nat_chains.chain(chain);
            nat_rules.line(format!("-X {chain}"));
            deleted += 1;
        }
    }

    // The tail call to the NodePorts chain, after every other service rule.
    const NODEPORTS_COMMENT: &str =
        "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    match &cfg.nodeport_ips {
        None => {
            let mut dst = String::from("-m addrtype --dst-type LOCAL");
            if ipv6 {
                dst.push_str(" ! -d ::1/128");
            } else if !cfg.localhost_nodeports {
                dst.push_str(" ! -d 127.0.0.0/8");
            }
            nat_rules.line(format!(
                "-A {KUBE_SERVICES} -m comment --comment {NODEPORTS_COMMENT} {dst} -j {KUBE_NODEPORTS}"
            ));
        }
        Some(ips) => {
            for ip in ips {
                if ip.is_loopback() && (ipv6 || !cfg.localhost_nodeports) {
                    continue;
                }
                nat_rules.line(format!(
                    "-A {KUBE_SERVICES} -m comment --comment {NODEPORTS_COMMENT} -d {ip} -j {KUBE_NODEPORTS}"
                ));
            }
        }
    }

    for line in forward_rules(KUBE_FORWARD, mark, ipt.conntrack_tcp_liberal, ipt.nfacct) {
        filter_rules.line(line);
    }

    let mut text = String::new();
    text.push_str("*filter\n");
    text.push_str(&filter_chains.text);
    text.push_str(&filter_rules.text);
    text.push_str("COMMIT\n*nat\n");
    text.push_str(&nat_chains.text);
    text.push_str(&nat_rules.text);
    text.push_str("COMMIT\n");
    IptablesRules {
        text,
        filter_rules: filter_rules.lines,
        nat_rules: nat_rules.lines - deleted,
        nat_rules_skipped: skipped_rules.lines,
        deleted_chains: deleted,
    }
}

/// One service port's chains and the rules in them.
#[derive(Default)]
struct PortChains {
    chains: Lines,
    rules: Lines,
}

/// Writes one service port: its rules in the shared chains (KUBE-SERVICES, KUBE-NODEPORTS,
/// and the filter table's) straight into `filter` and `nat`, and returns its own chains.
fn write_port(
    p: &PortPlan,
    cfg: &PlanConfig,
    ipt: &IptablesConfig,
    large: bool,
    filter: &mut Lines,
    nat: &mut Lines,
    active: &mut BTreeSet<String>,
) -> PortChains {
    let info = p.info;
    let name = &p.name;
    let proto = info.protocol.as_lower();
    let chains = IptablesChains::new(name, info.protocol);
    let policy_chain = |policy: Policy| match policy {
        Policy::Cluster => chains.cluster.as_str(),
        Policy::Local => chains.local.as_str(),
    };
    let port = info.port;
    let refusal_target = |r: Refusal| match r {
        Refusal::Reject => "REJECT",
        Refusal::Drop => "DROP",
    };
    let refusal_comment = |r: Refusal| match r {
        Refusal::Reject => format!("\"{name} has no endpoints\""),
        Refusal::Drop => format!("\"{name} has no local endpoints\""),
    };
    let external_chain = chains.external.as_str();
    let lb_chain = if p.uses_firewall {
        chains.firewall.as_str()
    } else {
        external_chain
    };

    // ClusterIP.
    match (p.internal, p.internal_refusal) {
        (Some(policy), _) => nat.line(format!(
            "-A {KUBE_SERVICES} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {port} -j {}",
            info.cluster_ip,
            policy_chain(policy)
        )),
        (None, Some(r)) => filter.line(format!(
            "-A {KUBE_SERVICES} -m comment --comment {} -m {proto} -p {proto} -d {} --dport {port} -j {}",
            refusal_comment(r),
            info.cluster_ip,
            refusal_target(r)
        )),
        (None, None) => {}
    }

    // externalIPs.
    for ip in &info.external_ips {
        if p.has_endpoints {
            nat.line(format!(
                "-A {KUBE_SERVICES} -m comment --comment \"{name} external IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {external_chain}"
            ));
        }
        if let Some(r) = p.external_refusal {
            filter.line(format!(
                "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {} -m {proto} -p {proto} -d {ip} --dport {port} -j {}",
                refusal_comment(r),
                refusal_target(r)
            ));
        }
    }

    // Load-balancer IPs.
    for ip in &info.load_balancer_ips {
        if p.has_endpoints {
            nat.line(format!(
                "-A {KUBE_SERVICES} -m comment --comment \"{name} loadbalancer IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {lb_chain}"
            ));
        }
        if p.uses_firewall {
            filter.line(format!(
                "-A {KUBE_PROXY_FIREWALL} -m comment --comment \"{name} traffic not accepted by {}\" -m {proto} -p {proto} -d {ip} --dport {port} -j DROP",
                chains.firewall
            ));
        }
    }
    if let Some(r) = p.external_refusal {
        for ip in &info.load_balancer_ips {
            filter.line(format!(
                "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {} -m {proto} -p {proto} -d {ip} --dport {port} -j {}",
                refusal_comment(r),
                refusal_target(r)
            ));
        }
    }

    // NodePort.
    if let Some(node_port) = info.node_port {
        if p.has_endpoints {
            if cfg.localhost_nodeports && cfg.family == Family::V4 && ipt.nfacct {
                nat.line(format!(
                    "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} -d 127.0.0.0/8 --dport {node_port} -m nfacct --nfacct-name {NFACCT_LOCALHOST_NODEPORTS_ACCEPTED} -j {external_chain}"
                ));
            }
            nat.line(format!(
                "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} --dport {node_port} -j {external_chain}"
            ));
        }
        if let Some(r) = p.external_refusal {
            filter.line(format!(
                "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {node_port} -j {}",
                refusal_comment(r),
                refusal_target(r)
            ));
        }
    }

    // Health-check node port.
    if let Some(hc) = info.health_check_node_port {
        filter.line(format!(
            "-A {KUBE_NODEPORTS} -m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT"
        ));
    }

    // From here on: the port's own chains (left alone by a partial sync when unchanged).
    let mut own = PortChains {
        chains: Lines::default(),
        rules: Lines::default(),
    };

    if let Some(policy) = p.internal {
        let args = format!(
            "-m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {port}",
            info.cluster_ip
        );
        let chain = policy_chain(policy);
        if cfg.masquerade_all {
            own.rules
                .line(format!("-A {chain} {args} -j {KUBE_MARK_MASQ}"));
        } else if cfg.local.is_implemented() {
            own.rules.line(format!(
                "-A {chain} {args} {} -j {KUBE_MARK_MASQ}",
                if_not_local(&cfg.local)
            ));
        }
    }

    if p.uses_external_chain {
        own.chains.chain(external_chain);
        active.insert(external_chain.to_string());
        if !info.external_policy_local {
            own.rules.line(format!(
                "-A {external_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"
            ));
        } else {
            if cfg.local.is_implemented() {
                own.rules.line(format!(
                    "-A {external_chain} -m comment --comment \"pod traffic for {name} external destinations\" {} -j {}",
                    if_local(&cfg.local),
                    chains.cluster
                ));
            }
            own.rules.line(format!(
                "-A {external_chain} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
            ));
            own.rules.line(format!(
                "-A {external_chain} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {}",
                chains.cluster
            ));
        }
        if p.has_external_endpoints {
            own.rules.line(format!(
                "-A {external_chain} -j {}",
                policy_chain(p.external_policy)
            ));
        }
    }

    if p.uses_firewall {
        let fw = &chains.firewall;
        own.chains.chain(fw);
        active.insert(fw.clone());
        let head = format!("-A {fw} -m comment --comment \"{name} loadbalancer IP\"");
        for net in &info.load_balancer_source_ranges {
            own.rules
                .line(format!("{head} -s {net} -j {external_chain}"));
        }
        if p.firewall_allows_lb_ips {
            for ip in &info.load_balancer_ips {
                own.rules
                    .line(format!("{head} -s {ip} -j {external_chain}"));
            }
        }
        own.rules.line(format!(
            "-A {fw} -m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""
        ));
    }

    for policy in [Policy::Cluster, Policy::Local] {
        if !p.uses(policy) {
            continue;
        }
        let chain = policy_chain(policy);
        own.chains.chain(chain);
        active.insert(chain.to_string());
        service_to_endpoints(&mut own.rules, p, chain, p.endpoints_of(policy), large);
    }

    for ep in &p.endpoints {
        let sep = iptables_endpoint_chain(name, info.protocol, ep);
        own.chains.chain(&sep);
        active.insert(sep.clone());
        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        own.rules.line(format!(
            "-A {sep}{comment} -s {} -j {KUBE_MARK_MASQ}",
            ep.ip
        ));
        let recent = if info.session_affinity.is_some() {
            format!(" -m recent --name {sep} --set")
        } else {
            String::new()
        };
        own.rules.line(format!(
            "-A {sep}{comment}{recent} -m {proto} -p {proto} -j DNAT --to-destination {ep}"
        ));
    }

    own
}

/// `proxier.localDetector.IfNotLocal()`.
fn if_not_local(local: &LocalDetector) -> String {
    match local {
        LocalDetector::None => String::new(),
        _ => format!("! {}", if_local(local)),
    }
}

/// `proxier.localDetector.IfLocal()`: `-s 10.0.0.0/8`, `-i cni0`, `-i veth+`.
fn if_local(local: &LocalDetector) -> String {
    match local {
        LocalDetector::None => String::new(),
        LocalDetector::Cidr(net) => format!("-s {net}"),
        LocalDetector::Interface { name, prefix } => {
            format!("-i {name}{}", if *prefix { "+" } else { "" })
        }
    }
}

/// kube-proxy's `writeServiceToEndpointRules`: affinity checks first, then one probabilistic
/// jump per endpoint, the last one unconditional.
fn service_to_endpoints(
    rules: &mut Lines,
    p: &PortPlan,
    chain: &str,
    endpoints: &[crate::model::Backend],
    large: bool,
) {
    let name = &p.name;
    let info = p.info;
    let comment = |ep: &crate::model::Backend| {
        if large {
            String::new()
        } else {
            format!(" -m comment --comment \"{name} -> {ep}\"")
        }
    };
    if let Some(timeout) = info.session_affinity {
        for ep in endpoints {
            let sep = iptables_endpoint_chain(name, info.protocol, ep);
            rules.line(format!(
                "-A {chain}{} -m recent --name {sep} --rcheck --seconds {} --reap -j {sep}",
                comment(ep),
                timeout.as_secs()
            ));
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let sep = iptables_endpoint_chain(name, info.protocol, ep);
        let stat = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {}",
                probability(n - i)
            )
        } else {
            String::new()
        };
        rules.line(format!("-A {chain}{}{stat} -j {sep}", comment(ep)));
    }
}

/// The restore input on its own (for a fresh namespace or the benchmark, with plain
/// `iptables-restore`, which replaces the tables it names): the built-in chains declared and
/// kube-proxy's jump rules written into them, in the order prepending them one by one leaves.
pub fn standalone(rules: &str) -> String {
    // A jump is written only to a chain the input declares (without localhost NodePorts,
    // kubelet's KUBE-FIREWALL is not kube-proxy's to declare).
    let declared: BTreeSet<&str> = rules
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut out = String::new();
    let mut table = None;
    let mut jumps_written = false;
    for line in rules.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = match t {
                "filter" => Some(Table::Filter),
                "nat" => Some(Table::Nat),
                _ => None,
            };
            jumps_written = false;
            out.push_str(line);
            out.push('\n');
            if let Some(t) = table {
                for b in t.builtins() {
                    let _ = writeln!(out, ":{b} ACCEPT [0:0]");
                }
            }
            continue;
        }
        if !jumps_written
            && (line.starts_with("-A ") || line.starts_with("-X ") || line == "COMMIT")
        {
            if let Some(t) = table {
                for b in t.builtins() {
                    for j in JUMP_RULES
                        .iter()
                        .rev()
                        .filter(|j| j.table == t && j.from == *b && declared.contains(j.to))
                    {
                        out.push_str(&j.line());
                        out.push('\n');
                    }
                }
            }
            jumps_written = true;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod local_detector_tests {
    use super::*;
    use crate::config::DetectLocal;

    #[test]
    fn each_detector_matches_as_kube_proxys_does() {
        let cidrs = ["10.0.0.0/8".parse().unwrap(), "fd00::/48".parse().unwrap()];
        let d = |mode: &DetectLocal, family| LocalDetector::for_family(mode, &cidrs, family);
        let v4 = d(&DetectLocal::ClusterCidr, Family::V4);
        assert_eq!(
            (if_local(&v4), if_not_local(&v4)),
            ("-s 10.0.0.0/8".into(), "! -s 10.0.0.0/8".into())
        );
        assert_eq!(
            if_local(&d(&DetectLocal::NodeCidr, Family::V6)),
            "-s fd00::/48"
        );
        let prefix = d(&DetectLocal::InterfaceNamePrefix("veth".into()), Family::V4);
        assert_eq!(if_not_local(&prefix), "! -i veth+");
        let bridge = d(&DetectLocal::BridgeInterface("cni0".into()), Family::V6);
        assert_eq!(if_local(&bridge), "-i cni0");
        // No CIDR of the family: no detector, no rule.
        let none = LocalDetector::for_family(&DetectLocal::ClusterCidr, &cidrs[1..], Family::V4);
        assert!(!none.is_implemented());
        assert_eq!(if_not_local(&none), "");
    }
}
