//! kube-proxy's own iptables rules for a [`DesiredState`], byte for byte in the shape that
//! kube-proxy's iptables proxier (kubernetes `pkg/proxy/iptables/proxier.go`, `syncProxyRules`)
//! feeds to `iptables-restore`.
//!
//! This is kpr's benchmark baseline ("kube-proxy's own iptables rules for the same services")
//! and the seed of `--proxy-mode iptables`, so it follows proxier.go rather than a paraphrase:
//!
//! * argument order is the proxier's (`-m comment --comment "…" -m tcp -p tcp -d VIP --dport P`),
//!   which is what kube-proxy writes; `iptables-save` prints the same rules normalised
//!   (`-d VIP/32 -p tcp -m comment … -m tcp --dport P`);
//! * the masquerade mark is the default `--iptables-masquerade-bit=14`, formatted as kube-proxy
//!   does (`fmt.Sprintf("%#08x", 1<<14)` = `0x00004000`);
//! * defaults are those of a stock IPv4 kube-proxy: `--iptables-localhost-nodeports=true`
//!   (so the `KUBE-FIREWALL` "block incoming localnet connections" rule and a nodeport jump
//!   without `! -d 127.0.0.0/8`), nodeport addresses "all", `--random-fully` supported,
//!   `nf_conntrack_tcp_be_liberal` unset (so `KUBE-FORWARD` drops INVALID), and "large cluster
//!   mode" (no per-endpoint comments) above 1000 endpoints in total;
//! * only ClusterIP rules are produced (NodePort, externalIP and load-balancer frontends of the
//!   state are left out), for IPv4 frontends only (kube-proxy runs one proxier per family).
//!
//! Differences from kube-proxy, needed so that the text alone is a working proxy when loaded with
//! plain `iptables-restore` (which replaces the listed tables), e.g. in a fresh network namespace:
//! the built-in chains are declared (`:PREROUTING ACCEPT [0:0]` …) and the jump rules that
//! kube-proxy installs with `iptables -I` (`EnsureRule(Prepend, …)`, including the two
//! `KUBE-FIREWALL` jumps it duplicates from kubelet) are written into them, in the order that
//! prepending them one by one to empty chains produces. kube-proxy's (empty) `KUBE-PROXY-CANARY`
//! monitoring chains are not created. Services are ordered deterministically (by frontend, with
//! an optional frontend moved last) where kube-proxy iterates a Go map.

use std::fmt::Write as _;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::model::{Backend, DesiredState, Frontend, FrontendKind, ServicePortState};

/// Options of kube-proxy that change the rules for ClusterIP services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeProxyIptablesConfig {
    /// `--cluster-cidr` (with the default `--detect-local-mode=ClusterCIDR`): traffic to a
    /// ClusterIP from outside this CIDR is masqueraded. `None`: no local-traffic detector, so
    /// no such rule (kube-proxy's behaviour without a cluster CIDR).
    pub cluster_cidr: Option<String>,
    /// `--masquerade-all`: masquerade all traffic to ClusterIPs (takes precedence over
    /// `cluster_cidr`).
    pub masquerade_all: bool,
}

/// kube-proxy's masquerade mark for the default `--iptables-masquerade-bit=14`, formatted with
/// Go's `%#08x` as kube-proxy does.
pub const MASQUERADE_MARK: &str = "0x00004000";

/// Above this many endpoints (over all service ports), kube-proxy leaves out the per-endpoint
/// comments ("large cluster mode").
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

const KUBE_SERVICES: &str = "KUBE-SERVICES";
const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
const KUBE_FORWARD: &str = "KUBE-FORWARD";
const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
const KUBELET_FIREWALL: &str = "KUBE-FIREWALL";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Filter,
    Nat,
}

/// A jump from a built-in chain, as in kube-proxy's `iptablesJumpChains` (followed by
/// `iptablesKubeletJumpChains`); kube-proxy prepends each of them in this order.
struct JumpChain {
    table: Table,
    dst: &'static str,
    src: &'static str,
    comment: &'static str,
    ctstate_new: bool,
}

const fn jump(
    table: Table,
    dst: &'static str,
    src: &'static str,
    comment: &'static str,
    ctstate_new: bool,
) -> JumpChain {
    JumpChain {
        table,
        dst,
        src,
        comment,
        ctstate_new,
    }
}

const JUMP_CHAINS: &[JumpChain] = &[
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

const FILTER_BUILTINS: &[&str] = &["INPUT", "FORWARD", "OUTPUT"];
const NAT_BUILTINS: &[&str] = &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// kube-proxy's `portProtoHash`: the first 16 characters of base32(StdEncoding) of
/// sha256(`servicePortName + protocol`).
fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = base32::encode(base32::Alphabet::Rfc4648 { padding: true }, &digest);
    encoded.truncate(16);
    encoded
}

/// `KUBE-SVC-…` chain of a service port. `service_port_name` is the ServicePortName string
/// (`ns/name:port` or `ns/name`), `protocol` lower-case (`tcp`).
pub fn service_chain_name(service_port_name: &str, protocol: &str) -> String {
    format!(
        "KUBE-SVC-{}",
        hash16(&format!("{service_port_name}{protocol}"))
    )
}

/// `KUBE-SEP-…` chain of one endpoint (`endpoint` = `ip:port`, as Go's `net.JoinHostPort`).
pub fn endpoint_chain_name(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{service_port_name}{protocol}{endpoint}"))
    )
}

/// kube-proxy's `computeProbability(n)`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
/// (Rust's and Go's formatting both round the exact binary value half-to-even.)
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// The `iptables-restore` input kube-proxy would write for `state` (tables `filter` and `nat`).
pub fn render_kube_proxy_iptables(state: &DesiredState, cfg: &KubeProxyIptablesConfig) -> String {
    render_kube_proxy_iptables_with_last(state, cfg, None)
}

/// Like [`render_kube_proxy_iptables`], with the rules of `last` (if it is an IPv4 frontend of
/// `state`) placed after those of every other service: its `KUBE-SERVICES` rule is then the last
/// service rule of the linear chain, the worst case for a lookup.
pub fn render_kube_proxy_iptables_with_last(
    state: &DesiredState,
    cfg: &KubeProxyIptablesConfig,
    last: Option<&Frontend>,
) -> String {
    // IPv4 ClusterIP frontends only (NodePort, externalIP and load-balancer rules are not
    // rendered yet); endpoints of the same family only (kube-proxy's per-family maps).
    let wanted = |fe: &Frontend, sps: &ServicePortState| {
        matches!(fe.ip, IpAddr::V4(_)) && sps.kind == FrontendKind::ClusterIp
    };
    let mut services: Vec<(&Frontend, &ServicePortState, Vec<Backend>)> = state
        .services
        .iter()
        .filter(|(fe, sps)| wanted(fe, sps) && Some(*fe) != last)
        .map(|(fe, sps)| (fe, sps, ipv4_backends(sps)))
        .collect();
    if let Some(last) = last {
        if let Some((fe, sps)) = state.services.get_key_value(last) {
            if wanted(fe, sps) {
                services.push((fe, sps, ipv4_backends(sps)));
            }
        }
    }

    let total_endpoints: usize = services.iter().map(|(_, _, b)| b.len()).sum();
    let large_cluster_mode = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;

    let mut filter_chains = Lines::default();
    let mut filter_rules = Lines::default();
    let mut nat_chains = Lines::default();
    let mut nat_rules = Lines::default();

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

    nat_rules.line(format_args!(
        "-A {KUBE_POSTROUTING} -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"
    ));
    nat_rules.line(format_args!(
        "-A {KUBE_POSTROUTING} -j MARK --xor-mark {MASQUERADE_MARK}"
    ));
    nat_rules.line(format_args!(
        "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    ));
    nat_rules.line(format_args!(
        "-A {KUBE_MARK_MASQ} -j MARK --or-mark {MASQUERADE_MARK}"
    ));

    // IPv4 with localhost nodeports (the default): kube-proxy's copy of kubelet's rule.
    filter_chains.chain(KUBELET_FIREWALL);
    filter_rules.line(format_args!(
        "-A {KUBELET_FIREWALL} -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    ));

    for (fe, sps, backends) in &services {
        let protocol = fe.protocol.as_lower();
        let name = sps.name.to_string();
        let vip = fe.ip;
        let port = fe.port;

        if backends.is_empty() {
            // No endpoints: only a REJECT in the filter table, no nat chains.
            filter_rules.line(format_args!(
                "-A {KUBE_SERVICES} -m comment --comment \"{name} has no endpoints\" -m {protocol} -p {protocol} -d {vip} --dport {port} -j REJECT"
            ));
            continue;
        }

        let svc_chain = service_chain_name(&name, protocol);
        let cluster_ip_match = format!(
            "-m comment --comment \"{name} cluster IP\" -m {protocol} -p {protocol} -d {vip} --dport {port}"
        );
        nat_rules.line(format_args!(
            "-A {KUBE_SERVICES} {cluster_ip_match} -j {svc_chain}"
        ));
        if cfg.masquerade_all {
            nat_rules.line(format_args!(
                "-A {svc_chain} {cluster_ip_match} -j {KUBE_MARK_MASQ}"
            ));
        } else if let Some(cidr) = &cfg.cluster_cidr {
            nat_rules.line(format_args!(
                "-A {svc_chain} {cluster_ip_match} ! -s {cidr} -j {KUBE_MARK_MASQ}"
            ));
        }

        // The KUBE-SVC chain: one probabilistic jump per endpoint, the last one unconditional.
        nat_chains.chain(&svc_chain);
        let sep_chains: Vec<String> = backends
            .iter()
            .map(|b| endpoint_chain_name(&name, protocol, &b.to_string()))
            .collect();
        let n = backends.len();
        for (i, (backend, sep_chain)) in backends.iter().zip(&sep_chains).enumerate() {
            let mut line = format!("-A {svc_chain}");
            if !large_cluster_mode {
                let _ = write!(line, " -m comment --comment \"{name} -> {backend}\"");
            }
            if i < n - 1 {
                let _ = write!(
                    line,
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                );
            }
            let _ = write!(line, " -j {sep_chain}");
            nat_rules.line(format_args!("{line}"));
        }

        // One KUBE-SEP chain per endpoint.
        for (backend, sep_chain) in backends.iter().zip(&sep_chains) {
            nat_chains.chain(sep_chain);
            let comment = if large_cluster_mode {
                String::new()
            } else {
                format!(" -m comment --comment {name}")
            };
            nat_rules.line(format_args!(
                "-A {sep_chain}{comment} -s {} -j {KUBE_MARK_MASQ}",
                backend.ip
            ));
            nat_rules.line(format_args!(
                "-A {sep_chain}{comment} -m {protocol} -p {protocol} -j DNAT --to-destination {backend}"
            ));
        }
    }

    // NodePorts (externalTrafficPolicy: Cluster): KUBE-NODEPORTS matches the port only (the
    // jump to it already required a local destination), then KUBE-EXT masquerades and hands
    // over to the Service's KUBE-SVC chain. A NodePort is one rule whatever the number of node
    // addresses, so frontends are de-duplicated by (service port, protocol, node port).
    // (externalTrafficPolicy: Local's KUBE-SVL chains and NodePorts without endpoints are not
    // rendered yet.)
    let with_svc_chain: std::collections::BTreeSet<String> = services
        .iter()
        .filter(|(_, _, b)| !b.is_empty())
        .map(|(fe, sps, _)| service_chain_name(&sps.name.to_string(), fe.protocol.as_lower()))
        .collect();
    let mut nodeports: Vec<(String, &'static str, u16)> = state
        .services
        .iter()
        .filter(|(fe, sps)| {
            matches!(fe.ip, IpAddr::V4(_))
                && sps.kind == FrontendKind::NodePort
                && !sps.external_policy_local
        })
        .map(|(fe, sps)| (sps.name.to_string(), fe.protocol.as_lower(), fe.port))
        .collect();
    nodeports.sort();
    nodeports.dedup();
    for (name, protocol, port) in &nodeports {
        let svc_chain = service_chain_name(name, protocol);
        if !with_svc_chain.contains(&svc_chain) {
            continue;
        }
        let ext_chain = format!("KUBE-EXT-{}", &svc_chain["KUBE-SVC-".len()..]);
        nat_chains.chain(&ext_chain);
        nat_rules.line(format_args!(
            "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {protocol} -p {protocol} --dport {port} -j {ext_chain}"
        ));
        nat_rules.line(format_args!(
            "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"
        ));
        nat_rules.line(format_args!("-A {ext_chain} -j {svc_chain}"));
    }

    // Tail call to the nodeports chain (nodeport addresses "all", IPv4, localhost nodeports on).
    nat_rules.line(format_args!(
        "-A {KUBE_SERVICES} -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}"
    ));

    filter_rules.line(format_args!(
        "-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP"
    ));
    filter_rules.line(format_args!(
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j ACCEPT"
    ));
    filter_rules.line(format_args!(
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));

    let mut out = String::new();
    write_table(
        &mut out,
        Table::Filter,
        FILTER_BUILTINS,
        &filter_chains,
        &filter_rules,
    );
    write_table(&mut out, Table::Nat, NAT_BUILTINS, &nat_chains, &nat_rules);
    out
}

fn ipv4_backends(sps: &ServicePortState) -> Vec<Backend> {
    sps.backends
        .iter()
        .filter(|b| matches!(b.ip, IpAddr::V4(_)))
        .copied()
        .collect()
}

/// `*table`, built-in chain declarations, kube-proxy's chain lines, the jumps from the built-in
/// chains, kube-proxy's rules, `COMMIT`.
fn write_table(out: &mut String, table: Table, builtins: &[&str], chains: &Lines, rules: &Lines) {
    out.push_str(match table {
        Table::Filter => "*filter\n",
        Table::Nat => "*nat\n",
    });
    for builtin in builtins {
        let _ = writeln!(out, ":{builtin} ACCEPT [0:0]");
    }
    out.push_str(&chains.0);
    for builtin in builtins {
        // kube-proxy prepends (`iptables -I`) each jump in list order, so on an empty chain
        // they end up in reverse order.
        for j in JUMP_CHAINS
            .iter()
            .rev()
            .filter(|j| j.table == table && j.src == *builtin)
        {
            let _ = write!(out, "-A {}", j.src);
            if j.ctstate_new {
                out.push_str(" -m conntrack --ctstate NEW");
            }
            if !j.comment.is_empty() {
                let _ = write!(out, " -m comment --comment \"{}\"", j.comment);
            }
            let _ = writeln!(out, " -j {}", j.dst);
        }
    }
    out.push_str(&rules.0);
    out.push_str("COMMIT\n");
}

/// kube-proxy's `LineBuffer`, reduced to what is needed here.
#[derive(Default)]
struct Lines(String);

impl Lines {
    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        let _ = self.0.write_fmt(args);
        self.0.push('\n');
    }

    /// `utiliptables.MakeChainLine`.
    fn chain(&mut self, chain: &str) {
        let _ = writeln!(self.0, ":{chain} - [0:0]");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};
    use std::net::Ipv4Addr;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fe(ip: &str, port: u16) -> Frontend {
        Frontend {
            ip: v4(ip),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port: port.into(),
        }
    }

    fn be(ip: &str, port: u16) -> Backend {
        Backend { ip: v4(ip), port }
    }

    /// Two services: `default/web:http` with three endpoints, `default/empty` with none.
    fn basic_state() -> DesiredState {
        let mut state = DesiredState::default();
        state.services.insert(
            fe("10.96.0.10", 80),
            ServicePortState {
                name: spn("default", "web", "http"),
                backends: vec![
                    be("10.244.1.2", 8080),
                    be("10.244.1.3", 8080),
                    be("10.244.2.4", 8080),
                ],
                ..Default::default()
            },
        );
        state.services.insert(
            fe("10.96.0.20", 443),
            ServicePortState {
                name: spn("default", "empty", ""),
                backends: vec![],
                ..Default::default()
            },
        );
        state
    }

    fn basic_cfg() -> KubeProxyIptablesConfig {
        KubeProxyIptablesConfig {
            cluster_cidr: Some("10.244.0.0/16".into()),
            masquerade_all: false,
        }
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // Independently computed:
        // python3 -c "import hashlib,base64;print(base64.b32encode(hashlib.sha256(b'ns/svc:httptcp').digest())[:16])"
        assert_eq!(
            service_chain_name("ns/svc:http", "tcp"),
            "KUBE-SVC-JK7NJ6AASESNLSKV"
        );
        // ... of b'ns/svc:httptcp10.0.0.1:8080'
        assert_eq!(
            endpoint_chain_name("ns/svc:http", "tcp", "10.0.0.1:8080"),
            "KUBE-SEP-FYUL5HB5O2NLPKXW"
        );
        // The well-known chain of the `kubernetes` Service on every cluster.
        assert_eq!(
            service_chain_name("default/kubernetes:https", "tcp"),
            "KUBE-SVC-NPX46M4PTMTKRN6Y"
        );
        // The name used is the ServicePortName's Display.
        assert_eq!(spn("ns", "svc", "http").to_string(), "ns/svc:http");
        assert!(service_chain_name("ns/svc:http", "tcp").len() <= 28);
    }

    #[test]
    fn probabilities_match_go_formatting() {
        assert_eq!(probability(1), "1.0000000000");
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(7), "0.1428571429");
        // An exact tie at the 11th digit (1/2048 = 0.00048828125): Go rounds half to even.
        assert_eq!(probability(2048), "0.0004882812");
    }

    #[test]
    fn svc_chain_has_statistic_jumps() {
        let out = render_kube_proxy_iptables(&basic_state(), &basic_cfg());
        let svc = service_chain_name("default/web:http", "tcp");
        let jumps: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc} ")) && l.contains("KUBE-SEP-"))
            .collect();
        assert_eq!(jumps.len(), 3);
        assert!(jumps[0].contains("--probability 0.3333333333"));
        assert!(jumps[1].contains("--probability 0.5000000000"));
        assert!(!jumps[2].contains("statistic"));
        let sep = endpoint_chain_name("default/web:http", "tcp", "10.244.1.2:8080");
        assert_eq!(
            jumps[0],
            format!(
                "-A {svc} -m comment --comment \"default/web:http -> 10.244.1.2:8080\" -m statistic --mode random --probability 0.3333333333 -j {sep}"
            )
        );
        assert!(out.contains(&format!(
            "-A {sep} -m comment --comment default/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.2:8080\n"
        )));
        assert!(out.contains(&format!(
            "-A {sep} -m comment --comment default/web:http -s 10.244.1.2 -j KUBE-MARK-MASQ\n"
        )));
    }

    #[test]
    fn no_endpoints_rejects_in_filter_only() {
        let out = render_kube_proxy_iptables(&basic_state(), &basic_cfg());
        let (filter, nat) = out.split_once("*nat\n").unwrap();
        assert!(filter.contains(
            "-A KUBE-SERVICES -m comment --comment \"default/empty has no endpoints\" -m tcp -p tcp -d 10.96.0.20 --dport 443 -j REJECT\n"
        ));
        assert!(!nat.contains("default/empty"));
        assert!(!out.contains(&service_chain_name("default/empty", "tcp")));
    }

    #[test]
    fn masquerade_options() {
        let state = basic_state();
        let svc = service_chain_name("default/web:http", "tcp");
        let masq = |cfg: &KubeProxyIptablesConfig| -> Vec<String> {
            render_kube_proxy_iptables(&state, cfg)
                .lines()
                .filter(|l| {
                    l.starts_with(&format!("-A {svc} ")) && l.ends_with("-j KUBE-MARK-MASQ")
                })
                .map(String::from)
                .collect()
        };
        let head = format!(
            "-A {svc} -m comment --comment \"default/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80"
        );
        assert_eq!(
            masq(&basic_cfg()),
            vec![format!("{head} ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ")]
        );
        let all = KubeProxyIptablesConfig {
            cluster_cidr: Some("10.244.0.0/16".into()),
            masquerade_all: true,
        };
        assert_eq!(masq(&all), vec![format!("{head} -j KUBE-MARK-MASQ")]);
        assert!(masq(&KubeProxyIptablesConfig::default()).is_empty());
    }

    fn kube_services_targets(out: &str) -> Vec<String> {
        let nat = out.split_once("*nat\n").unwrap().1;
        nat.lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .collect()
    }

    #[test]
    fn last_frontend_goes_last_and_nodeports_stays_last() {
        let mut state = DesiredState::default();
        for i in 1..=3u8 {
            state.services.insert(
                fe(&format!("10.96.0.{i}"), 80),
                ServicePortState {
                    name: spn("ns", &format!("s{i}"), ""),
                    backends: vec![be(&format!("10.244.0.{i}"), 80)],
                    ..Default::default()
                },
            );
        }
        let cfg = KubeProxyIptablesConfig::default();
        let chain = |i: u8| service_chain_name(&format!("ns/s{i}"), "tcp");
        let plain = render_kube_proxy_iptables(&state, &cfg);
        assert_eq!(
            kube_services_targets(&plain),
            vec![chain(1), chain(2), chain(3), "KUBE-NODEPORTS".into()]
        );
        let first = fe("10.96.0.1", 80);
        let out = render_kube_proxy_iptables_with_last(&state, &cfg, Some(&first));
        assert_eq!(
            kube_services_targets(&out),
            vec![chain(2), chain(3), chain(1), "KUBE-NODEPORTS".into()]
        );
        // A frontend that is not in the state changes nothing.
        let other = fe("10.96.9.9", 80);
        assert_eq!(
            render_kube_proxy_iptables_with_last(&state, &cfg, Some(&other)),
            plain
        );
    }

    #[test]
    fn ipv6_frontends_are_skipped() {
        let mut state = basic_state();
        state.services.insert(
            Frontend {
                ip: "fd00::10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            ServicePortState {
                name: spn("default", "v6", ""),
                backends: vec![Backend {
                    ip: "fd00:1::2".parse().unwrap(),
                    port: 80,
                }],
                ..Default::default()
            },
        );
        let out = render_kube_proxy_iptables(&state, &basic_cfg());
        assert_eq!(
            out,
            render_kube_proxy_iptables(&basic_state(), &basic_cfg())
        );
    }

    #[test]
    fn non_cluster_ip_frontends_are_skipped() {
        let mut state = basic_state();
        for (i, kind) in [
            // NodePorts are rendered (see nodeports_jump_through_kube_ext_to_the_service_chain).
            FrontendKind::ExternalIp,
            FrontendKind::LoadBalancer,
        ]
        .into_iter()
        .enumerate()
        {
            state.services.insert(
                fe(&format!("192.0.2.{}", i + 1), 30080),
                ServicePortState {
                    name: spn("default", "web", "http"),
                    kind,
                    backends: vec![be("10.244.1.2", 8080)],
                    ..Default::default()
                },
            );
        }
        let last = fe("192.0.2.1", 30080);
        assert_eq!(
            render_kube_proxy_iptables_with_last(&state, &basic_cfg(), Some(&last)),
            render_kube_proxy_iptables(&basic_state(), &basic_cfg())
        );
    }

    #[test]
    fn nodeports_jump_through_kube_ext_to_the_service_chain() {
        let mut state = basic_state();
        let (cip, sps) = state
            .services
            .iter()
            .find(|(_, s)| !s.backends.is_empty())
            .map(|(f, s)| (*f, s.clone()))
            .unwrap();
        for node_ip in ["192.168.1.10", "192.168.1.11"] {
            let mut np = sps.clone();
            np.kind = FrontendKind::NodePort;
            state.services.insert(
                Frontend {
                    ip: v4(node_ip),
                    port: 30080,
                    protocol: cip.protocol,
                },
                np,
            );
        }
        let out = render_kube_proxy_iptables(&state, &basic_cfg());
        let name = sps.name.to_string();
        let svc = service_chain_name(&name, "tcp");
        let ext = format!("KUBE-EXT-{}", &svc[9..]);
        let np_rules: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("-A KUBE-NODEPORTS"))
            .collect();
        assert_eq!(
            np_rules.len(),
            1,
            "one rule per NodePort, not per address: {np_rules:?}"
        );
        assert!(
            np_rules[0].ends_with(&format!("--dport 30080 -j {ext}")),
            "{}",
            np_rules[0]
        );
        assert!(out.contains(&format!(":{ext} - [0:0]")));
        assert!(out.contains(&format!("-A {ext} -j {svc}")));
        assert!(out.contains(&format!("-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ")));
    }

    #[test]
    fn large_cluster_mode_drops_endpoint_comments() {
        let mut state = DesiredState::default();
        let backends: Vec<Backend> = (0..=LARGE_CLUSTER_ENDPOINTS_THRESHOLD as u32)
            .map(|i| Backend {
                ip: IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i)),
                port: 80,
            })
            .collect();
        state.services.insert(
            fe("10.96.0.1", 80),
            ServicePortState {
                name: spn("ns", "big", ""),
                backends,
                ..Default::default()
            },
        );
        let out = render_kube_proxy_iptables(&state, &KubeProxyIptablesConfig::default());
        let svc = service_chain_name("ns/big", "tcp");
        assert!(out.contains(&format!(
            "-A {svc} -m statistic --mode random --probability 0.0009990010 -j KUBE-SEP-"
        )));
        assert!(!out.contains("-m comment --comment ns/big"));
        assert!(!out.contains("ns/big ->"));
        // The KUBE-SERVICES rule keeps its comment.
        assert!(out.contains("--comment \"ns/big cluster IP\""));
    }

    #[test]
    fn output_shape() {
        let out = render_kube_proxy_iptables(&basic_state(), &basic_cfg());
        assert!(out.starts_with("*filter\n"));
        assert!(out.ends_with("COMMIT\n"));
        assert_eq!(out.matches("COMMIT\n").count(), 2);
        assert!(out.contains("\nCOMMIT\n*nat\n"));
        // Every chain used as a jump target or appended to is declared in its table.
        for table in out.split("COMMIT\n").filter(|t| !t.is_empty()) {
            let declared: Vec<&str> = table
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .map(|l| l.split(' ').next().unwrap())
                .collect();
            for line in table.lines().filter(|l| l.starts_with("-A ")) {
                let chain = line.split(' ').nth(1).unwrap();
                assert!(declared.contains(&chain), "{chain} undeclared");
                let target = line
                    .rsplit_once(" -j ")
                    .unwrap()
                    .1
                    .split(' ')
                    .next()
                    .unwrap();
                if target.starts_with("KUBE-") {
                    assert!(declared.contains(&target), "{target} undeclared");
                }
            }
        }
    }

    const GOLDEN_BASIC: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/iptables-basic.txt"
    );

    #[test]
    fn golden_basic() {
        let out = render_kube_proxy_iptables(&basic_state(), &basic_cfg());
        if let Err(e) = crate::golden::compare(std::path::Path::new(GOLDEN_BASIC), &out) {
            panic!("{e}");
        }
    }

    #[test]
    #[ignore = "rewrites the golden files: run by `cargo xtask goldens`"]
    fn write_goldens() {
        let out = render_kube_proxy_iptables(&basic_state(), &basic_cfg());
        crate::golden::write(
            std::path::Path::new(GOLDEN_BASIC),
            &crate::golden::self_made_header(
                "The iptables-restore input kpr renders for basic_state() (iptables.rs tests).",
            ),
            &out,
        );
    }
}
