//! kube-proxy's iptables chain structure → the service ports it implements.
//!
//! What is read, and where kube-proxy (pkg/proxy/iptables/proxier.go) writes it:
//! - nat `KUBE-SERVICES`: one rule per ClusterIP (→ `KUBE-SVC-` for the Cluster internal
//!   policy, `KUBE-SVL-` for Local), externalIP and load-balancer IP (→ `KUBE-EXT-`, or
//!   `KUBE-FW-` with loadBalancerSourceRanges). The comment says `ns/name:port cluster IP`,
//!   `external IP` or `loadbalancer IP`.
//! - nat `KUBE-NODEPORTS`: NodePorts (→ `KUBE-EXT-`).
//! - nat `KUBE-EXT-`: Local external policy iff it jumps to `KUBE-SVL-` or short-circuits
//!   locally originated traffic (`--src-type LOCAL`) to `KUBE-SVC-`.
//! - nat `KUBE-FW-`: one `-s RANGE -j KUBE-EXT-` rule per source range.
//! - nat `KUBE-SVC-` / `KUBE-SVL-`: the cluster / local endpoints (`-j KUBE-SEP-`), ClientIP
//!   affinity (`-m recent --rcheck --seconds N`).
//! - nat `KUBE-SEP-`: the endpoint (`-j DNAT --to-destination IP:PORT`).
//! - filter `KUBE-SERVICES` / `KUBE-EXTERNAL-SERVICES`: ports without (local) endpoints, which
//!   have no nat chains: REJECT "has no endpoints", DROP "has no local endpoints".
//! - filter `KUBE-NODEPORTS`: health check node ports.
//!
//! The chains' hashes tie everything of one service port together (kube-proxy hashes the
//! ServicePortName and protocol, [`IptablesChains`]); the comments give the names. What the
//! dump cannot tell is returned as [`Note`]s, never guessed silently.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::parse::{Chain, Dump, Rule, Table};
use crate::model::{Backend, Family, Protocol, ServicePortInfo, ServicePortName};
use crate::netfilter::chains::{hash16, IptablesChains};

/// Why a parsed dump is not kube-proxy's iptables mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpretError {
    #[error("no nat table with a KUBE-SERVICES chain in the {lines} lines of the dump: not the rules of kube-proxy's iptables mode")]
    NotKubeProxy { lines: usize },
    #[error("line {line}: ipset match {set}: the rules of kube-proxy's IPVS mode; only its iptables mode can be imported")]
    Ipvs { line: usize, set: String },
    #[error("line {line}: the dump mixes IPv4 and IPv6 addresses ({ip}); iptables-save and ip6tables-save are imported one at a time")]
    MixedFamilies { line: usize, ip: IpAddr },
}

/// Something the dump does not say, or says in a way the importer had to resolve: reported on
/// stderr so that nothing is guessed silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The rule or chain it is about, when there is one.
    pub line: Option<usize>,
    pub text: String,
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.text),
            None => f.write_str(&self.text),
        }
    }
}

/// The service ports a dump implements (one address family), and what could not be recovered.
#[derive(Debug, Clone, Default)]
pub struct Imported {
    pub family: Option<Family>,
    /// Sorted by name and protocol. `cluster_endpoints` holds the `KUBE-SVC-` chain's
    /// endpoints, `local_endpoints` the `KUBE-SVL-` chain's: what the model's
    /// `CategorizeEndpoints` would give for the same objects on this node.
    pub ports: Vec<ServicePortInfo>,
    /// Names derived from a chain hash (no comment named the service port).
    pub derived_names: Vec<ServicePortName>,
    pub notes: Vec<Note>,
}

/// What is known of one service port while the chains are read.
#[derive(Default)]
struct PortBuilder {
    /// Line of the first rule seen for it.
    line: usize,
    name: Option<ServicePortName>,
    protocol: Option<Protocol>,
    cluster_ip: Option<IpAddr>,
    port: Option<u16>,
    node_port: Option<u16>,
    external_ips: Vec<IpAddr>,
    load_balancer_ips: Vec<IpAddr>,
    source_ranges: Vec<IpNet>,
    internal_local: bool,
    external_local: bool,
    affinity: Option<Duration>,
    health_check_node_port: Option<u16>,
    cluster_endpoints: Vec<Backend>,
    local_endpoints: Vec<Backend>,
    /// Some rule shows endpoints exist (a chain of endpoints, or a DROP "has no local endpoints").
    has_endpoints: bool,
    /// The filter table rejects it: no endpoint at all.
    rejected: bool,
    /// Its external addresses only seen in filter rules, which do not say externalIP or LB IP.
    external_kind_unknown: Vec<IpAddr>,
}

/// The hash of a per-service-port chain name (`KUBE-SVC-<hash>` …), if `chain` is one.
fn chain_hash(chain: &str) -> Option<(&'static str, &str)> {
    ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-"]
        .into_iter()
        .find_map(|p| chain.strip_prefix(p).map(|h| (p, h)))
}

fn parse_protocol(p: Option<&str>) -> Option<Protocol> {
    match p? {
        "tcp" | "6" => Some(Protocol::Tcp),
        "udp" | "17" => Some(Protocol::Udp),
        "sctp" | "132" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// A ServicePortName as kube-proxy prints it: `ns/name:port` or `ns/name`.
fn parse_port_name(s: &str) -> Option<ServicePortName> {
    let (namespace, rest) = s.split_once('/')?;
    let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
    // Kubernetes names are DNS labels and subdomains (port names: IANA service names); they
    // become file names of the written manifests, so nothing else (no `/`) is taken as a name.
    let chars = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    let ok = |s: &str| !s.is_empty() && chars(s) && !s.starts_with('.');
    (ok(namespace) && ok(name) && chars(port)).then(|| ServicePortName {
        namespace: namespace.to_string(),
        name: name.to_string(),
        port: port.to_string(),
    })
}

/// The ServicePortName a comment starts with (`"ns/svc:p80 cluster IP"`, `"ns/svc:p80 -> …"`,
/// `"masquerade traffic for ns/svc:p80 external destinations"` …), with the rest.
fn comment_name(comment: &str) -> Option<(ServicePortName, &str)> {
    let (first, rest) = comment.split_once(' ').unwrap_or((comment, ""));
    parse_port_name(first).map(|n| (n, rest))
}

/// A single address (`-d 10.0.0.1/32`, or bare).
fn host(net: &IpNet) -> Option<IpAddr> {
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
}

/// `--to-destination IP:PORT` / `[IPv6]:PORT`.
fn parse_backend(s: &str) -> Option<Backend> {
    let addr: std::net::SocketAddr = s.parse().ok()?;
    Some(Backend {
        ip: addr.ip(),
        port: addr.port(),
    })
}

struct Reader<'a> {
    nat: &'a Table,
    filter: Option<&'a Table>,
    ports: BTreeMap<String, PortBuilder>,
    notes: Vec<Note>,
    family: Option<(Family, usize)>,
}

impl<'a> Reader<'a> {
    fn note(&mut self, line: usize, text: String) {
        self.notes.push(Note {
            line: Some(line),
            text,
        });
    }

    fn family_of(&mut self, ip: IpAddr, line: usize) -> Result<(), InterpretError> {
        let f = Family::of(ip);
        match self.family {
            None => self.family = Some((f, line)),
            Some((known, _)) if known != f => {
                return Err(InterpretError::MixedFamilies { line, ip });
            }
            _ => {}
        }
        Ok(())
    }

    fn chain(&self, name: &str) -> Option<&'a Chain> {
        self.nat.chains.get(name)
    }

    /// The port a rule belongs to, by its chain hash; records its name (from the comment, if
    /// the comment's name hashes to the chain) and protocol.
    fn port(&mut self, hash: &str, rule: &Rule) -> &mut PortBuilder {
        let protocol = parse_protocol(rule.protocol.as_deref());
        let named = rule
            .comment
            .as_deref()
            .and_then(comment_name)
            .map(|(n, _)| n);
        let p = self
            .ports
            .entry(hash.to_string())
            .or_insert_with(|| PortBuilder {
                line: rule.line,
                ..PortBuilder::default()
            });
        if p.protocol.is_none() {
            p.protocol = protocol;
        }
        if p.name.is_none() {
            if let (Some(n), Some(proto)) = (named, p.protocol) {
                // Only a name that hashes to the chain is the chain's: a comment cannot
                // rename a chain kube-proxy derived from another name.
                if hash16(&format!("{n}{}", proto.as_lower())) == hash {
                    p.name = Some(n);
                }
            }
        }
        p
    }

    /// A frontend rule's address, port and protocol: `-d IP -p PROTO --dport PORT`.
    fn frontend(&mut self, rule: &Rule) -> Result<Option<(IpAddr, u16)>, InterpretError> {
        let ip = rule
            .destination
            .filter(|d| !d.negated)
            .and_then(|d| host(&d.net));
        match (ip, rule.dport, parse_protocol(rule.protocol.as_deref())) {
            (Some(ip), Some(port), Some(_)) => {
                self.family_of(ip, rule.line)?;
                Ok(Some((ip, port)))
            }
            _ => {
                self.note(
                    rule.line,
                    "rule without a destination address, port and protocol; ignored".into(),
                );
                Ok(None)
            }
        }
    }

    fn services(&mut self) -> Result<(), InterpretError> {
        let Some(chain) = self.chain("KUBE-SERVICES") else {
            return Ok(());
        };
        for rule in &chain.rules {
            let Some(target) = rule.target.as_deref() else {
                continue;
            };
            if target == "KUBE-NODEPORTS" {
                continue;
            }
            let Some((prefix, hash)) = chain_hash(target) else {
                self.note(
                    rule.line,
                    format!("KUBE-SERVICES rule jumping to {target} is not kube-proxy's; ignored"),
                );
                continue;
            };
            let Some((ip, port)) = self.frontend(rule)? else {
                continue;
            };
            let what = rule
                .comment
                .as_deref()
                .and_then(comment_name)
                .map(|(_, rest)| rest.to_string());
            let line = rule.line;
            let p = self.port(hash, rule);
            match prefix {
                "KUBE-SVC-" | "KUBE-SVL-" => {
                    if p.cluster_ip.is_some_and(|c| c != ip) {
                        let text =
                            format!("a second ClusterIP {ip} for the same service port; ignored");
                        self.note(line, text);
                        continue;
                    }
                    p.cluster_ip = Some(ip);
                    p.port = Some(port);
                    p.internal_local = prefix == "KUBE-SVL-";
                }
                "KUBE-FW-" => push_new(&mut p.load_balancer_ips, ip),
                _ => match what.as_deref() {
                    Some("loadbalancer IP") => push_new(&mut p.load_balancer_ips, ip),
                    Some("external IP") => push_new(&mut p.external_ips, ip),
                    _ => {
                        push_new(&mut p.external_ips, ip);
                        self.note(
                            line,
                            format!("{ip}:{port}: no comment says externalIP or load-balancer IP; written as an externalIP"),
                        );
                    }
                },
            }
            if prefix != "KUBE-SVC-" && prefix != "KUBE-SVL-" {
                let p = self.port(hash, rule);
                let differs = p.port.is_some_and(|q| q != port);
                p.port.get_or_insert(port);
                if differs {
                    self.note(
                        line,
                        format!("{ip}: port {port} differs from the ClusterIP's"),
                    );
                }
            }
        }
        Ok(())
    }

    fn node_ports(&mut self) {
        let Some(chain) = self.chain("KUBE-NODEPORTS") else {
            return;
        };
        for rule in &chain.rules {
            let Some((_, hash)) = rule.target.as_deref().and_then(chain_hash) else {
                self.note(
                    rule.line,
                    "KUBE-NODEPORTS rule not understood; ignored".into(),
                );
                continue;
            };
            let Some(port) = rule.dport else {
                self.note(rule.line, "NodePort rule without --dport; ignored".into());
                continue;
            };
            let p = self.port(hash, rule);
            p.node_port = Some(port);
        }
    }

    /// Endpoints of a `KUBE-SVC-` / `KUBE-SVL-` chain, and its affinity timeout.
    fn endpoints(&mut self, chain_name: &str) -> (Vec<Backend>, Option<Duration>) {
        let mut out = Vec::new();
        let mut affinity = None;
        let Some(chain) = self.chain(chain_name) else {
            return (out, affinity);
        };
        for rule in &chain.rules {
            let Some(target) = rule.target.as_deref() else {
                continue;
            };
            if target == "KUBE-MARK-MASQ" {
                continue;
            }
            if !target.starts_with("KUBE-SEP-") {
                self.note(
                    rule.line,
                    format!("{chain_name} rule jumping to {target} is not kube-proxy's; ignored"),
                );
                continue;
            }
            if let Some(r) = rule.recent.as_ref().filter(|r| r.rcheck) {
                affinity = r.seconds.map(Duration::from_secs);
            }
            let Some(sep) = self.chain(target) else {
                continue;
            };
            let dnat = sep
                .rules
                .iter()
                .find(|r| r.target.as_deref() == Some("DNAT"));
            match dnat.and_then(|r| r.to_destination.as_deref().map(|d| (r.line, d))) {
                Some((line, dest)) => match parse_backend(dest) {
                    Some(b) => {
                        if self.family_of(b.ip, line).is_err() {
                            self.note(
                                line,
                                format!("endpoint {dest} of another address family; ignored"),
                            );
                        } else if !out.contains(&b) {
                            out.push(b);
                        }
                    }
                    None => self.note(line, format!("DNAT to {dest:?} is not IP:PORT; ignored")),
                },
                None => self.note(sep.line, format!("{target} has no DNAT rule; ignored")),
            }
        }
        (out, affinity)
    }

    /// The nat chains of every port seen so far: policies, source ranges, endpoints.
    fn port_chains(&mut self) {
        let hashes: Vec<String> = self.ports.keys().cloned().collect();
        for hash in hashes {
            let svc = format!("KUBE-SVC-{hash}");
            let svl = format!("KUBE-SVL-{hash}");
            let ext = format!("KUBE-EXT-{hash}");
            let fw = format!("KUBE-FW-{hash}");
            let mut external_local = false;
            if let Some(c) = self.chain(&ext) {
                external_local = c.rules.iter().any(|r| {
                    r.target.as_deref() == Some(svl.as_str())
                        || (r.target.as_deref() == Some(svc.as_str())
                            && r.src_type
                                .as_ref()
                                .is_some_and(|(neg, t)| !neg && t == "LOCAL"))
                });
            }
            let mut ranges = Vec::new();
            if let Some(c) = self.chain(&fw) {
                for r in &c.rules {
                    if r.target.as_deref() == Some(ext.as_str()) {
                        if let Some(s) = r.source.filter(|s| !s.negated) {
                            ranges.push((r.line, s.net));
                        }
                    }
                }
            }
            let (cluster, a1) = self.endpoints(&svc);
            let (local, a2) = self.endpoints(&svl);
            let Some(p) = self.ports.get_mut(&hash) else {
                continue;
            };
            p.external_local |= external_local;
            for (_, net) in ranges {
                // kube-proxy admits the LB IPs themselves as sources when a range holds the
                // node's IP (a node reaching its own VIP): those are not ranges of the Service.
                if host(&net).is_some_and(|ip| p.load_balancer_ips.contains(&ip)) {
                    continue;
                }
                push_new(&mut p.source_ranges, net);
            }
            p.has_endpoints |= !cluster.is_empty() || !local.is_empty();
            p.cluster_endpoints = cluster;
            p.local_endpoints = local;
            p.affinity = a1.or(a2);
        }
    }

    /// The filter table: ports without (local) endpoints, health check node ports, LB IPs
    /// behind the firewall.
    fn filter(&mut self) -> Result<(), InterpretError> {
        let Some(filter) = self.filter else {
            return Ok(());
        };
        for chain_name in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
        ] {
            let Some(chain) = filter.chains.get(chain_name) else {
                continue;
            };
            for rule in &chain.rules {
                let Some((name, rest)) = rule.comment.as_deref().and_then(comment_name) else {
                    self.note(
                        rule.line,
                        format!("filter {chain_name} rule without a service comment; ignored"),
                    );
                    continue;
                };
                let Some(proto) = parse_protocol(rule.protocol.as_deref()) else {
                    self.note(rule.line, "rule without a protocol; ignored".into());
                    continue;
                };
                let hash = hash16(&format!("{name}{}", proto.as_lower()));
                let target = rule.target.as_deref().unwrap_or_default();
                if chain_name == "KUBE-NODEPORTS" {
                    if rest == "health check node port" {
                        let port = rule.dport;
                        self.port(&hash, rule).health_check_node_port = port;
                    }
                    continue;
                }
                let none = rest == "has no endpoints" && target == "REJECT";
                let no_local = rest == "has no local endpoints" && target == "DROP";
                if chain_name == "KUBE-PROXY-FIREWALL" {
                    if let Some((ip, _)) = self.frontend(rule)? {
                        let p = self.port(&hash, rule);
                        push_new(&mut p.load_balancer_ips, ip);
                        p.external_ips.retain(|e| *e != ip);
                    }
                    continue;
                }
                if !none && !no_local {
                    self.note(
                        rule.line,
                        format!("filter {chain_name} rule {rest:?} not understood; ignored"),
                    );
                    continue;
                }
                let node_port = rule
                    .dst_type
                    .as_ref()
                    .is_some_and(|(n, t)| !n && t == "LOCAL");
                let frontend = if node_port {
                    None
                } else {
                    self.frontend(rule)?
                };
                let p = self.port(&hash, rule);
                p.rejected |= none;
                p.has_endpoints |= no_local;
                if node_port {
                    p.node_port = rule.dport;
                    if no_local {
                        p.external_local = true;
                    }
                    continue;
                }
                let Some((ip, port)) = frontend else {
                    continue;
                };
                if chain_name == "KUBE-SERVICES" {
                    p.cluster_ip.get_or_insert(ip);
                    p.port.get_or_insert(port);
                    if no_local {
                        p.internal_local = true;
                    }
                } else {
                    p.port.get_or_insert(port);
                    if no_local {
                        p.external_local = true;
                    }
                    if !p.external_ips.contains(&ip) && !p.load_balancer_ips.contains(&ip) {
                        push_new(&mut p.external_kind_unknown, ip);
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Imported {
        let mut imported = Imported {
            family: self.family.map(|(f, _)| f),
            ..Imported::default()
        };
        let ports = std::mem::take(&mut self.ports);
        for (hash, mut p) in ports {
            let line = p.line;
            let Some(protocol) = p.protocol else {
                self.note(
                    line,
                    format!("service port {hash}: no protocol in its rules; left out"),
                );
                continue;
            };
            let name = match p.name.take() {
                Some(n) => n,
                None => {
                    let n = ServicePortName {
                        namespace: super::DERIVED_NAMESPACE.into(),
                        name: format!("svc-{}", hash.to_ascii_lowercase()),
                        port: String::new(),
                    };
                    self.note(
                        line,
                        format!("no comment names the service port of chain hash {hash}: written as Service {}/{} with an unnamed port", n.namespace, n.name),
                    );
                    imported.derived_names.push(n.clone());
                    n
                }
            };
            let (Some(cluster_ip), Some(port)) = (p.cluster_ip, p.port) else {
                self.note(
                    line,
                    format!("{name}: no ClusterIP rule in the dump; left out"),
                );
                continue;
            };
            for ip in std::mem::take(&mut p.external_kind_unknown) {
                if !p.load_balancer_ips.contains(&ip) && !p.external_ips.contains(&ip) {
                    self.note(line, format!("{name}: {ip} is only in a filter rule, which does not say externalIP or load-balancer IP; written as an externalIP"));
                    p.external_ips.push(ip);
                }
            }
            if p.rejected && !p.has_endpoints {
                self.note(line, format!("{name}: no endpoints, so its traffic policies and session affinity are not in the dump; written as Cluster, no affinity"));
            }
            let uses_local = p.internal_local || p.external_local;
            let uses_cluster = !p.internal_local
                || ((p.node_port.is_some()
                    || !p.external_ips.is_empty()
                    || !p.load_balancer_ips.is_empty())
                    && !p.external_local);
            if p.has_endpoints && !uses_cluster && p.local_endpoints.is_empty() {
                self.note(line, format!("{name}: has endpoints on other nodes only (kube-proxy drops its traffic); their addresses are not in the dump and none are written"));
            } else if p.has_endpoints && !uses_cluster {
                self.note(line, format!("{name}: only this node's endpoints are in the dump (Local traffic policy); endpoints on other nodes are left out"));
            } else if p.has_endpoints
                && uses_local
                && p.local_endpoints.is_empty()
                && p.cluster_endpoints.is_empty()
            {
                self.note(line, format!("{name}: endpoints exist on other nodes only; their addresses are not in the dump"));
            }
            p.cluster_endpoints.sort();
            p.local_endpoints.sort();
            imported.ports.push(ServicePortInfo {
                name,
                protocol,
                family: Family::of(cluster_ip),
                cluster_ip,
                port,
                node_port: p.node_port,
                external_ips: p.external_ips,
                load_balancer_ips: p.load_balancer_ips,
                load_balancer_source_ranges: p.source_ranges,
                internal_policy_local: p.internal_local,
                external_policy_local: p.external_local,
                session_affinity: p.affinity,
                health_check_node_port: p.health_check_node_port,
                cluster_endpoints: p.cluster_endpoints,
                local_endpoints: p.local_endpoints,
                has_endpoints: p.has_endpoints,
            });
        }
        imported
            .ports
            .sort_by(|a, b| (&a.name, a.protocol).cmp(&(&b.name, b.protocol)));
        imported.notes = self.notes;
        imported
    }
}

fn push_new<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

/// Interprets a parsed dump as kube-proxy's iptables mode.
pub fn interpret(dump: &Dump) -> Result<Imported, InterpretError> {
    let Some(nat) = dump
        .tables
        .get("nat")
        .filter(|t| t.chains.contains_key("KUBE-SERVICES"))
    else {
        return Err(InterpretError::NotKubeProxy { lines: dump.lines });
    };
    // The IPVS mode has a nat KUBE-SERVICES chain too, matching ipsets of ClusterIPs.
    for chain in nat.chains.values() {
        for rule in &chain.rules {
            if let Some(set) = rule.match_set.as_deref().filter(|s| s.starts_with("KUBE-")) {
                return Err(InterpretError::Ipvs {
                    line: rule.line,
                    set: set.to_string(),
                });
            }
        }
    }
    let mut reader = Reader {
        nat,
        filter: dump.tables.get("filter"),
        ports: BTreeMap::new(),
        notes: Vec::new(),
        family: None,
    };
    reader.services()?;
    reader.node_ports();
    reader.filter()?;
    reader.port_chains();
    // Chains of service ports no frontend rule leads to (a sync in progress, or hand edits).
    for (name, chain) in &nat.chains {
        if let Some((_, hash)) = chain_hash(name) {
            if !reader.ports.contains_key(hash) {
                reader.note(
                    chain.line,
                    format!("chain {name}: no frontend rule leads to it; ignored"),
                );
            }
        }
    }
    Ok(reader.finish())
}

/// The chain names kube-proxy gives a service port: what the importer's hashes are checked
/// against (for tests and callers that want the chain of a name).
pub fn chains_of(name: &ServicePortName, protocol: Protocol) -> IptablesChains {
    IptablesChains::new(&name.to_string(), protocol)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::parse::parse;

    /// ip6tables-save's canonical form (addresses with prefix lengths, `-p` before `-m`), as a
    /// node prints it, not kube-proxy's restore order.
    fn saved() -> String {
        let c = chains_of(
            &ServicePortName {
                namespace: "ns".into(),
                name: "web".into(),
                port: "http".into(),
            },
            Protocol::Tcp,
        );
        let (svc, svl, ext, fw) = (c.cluster, c.local, c.external, c.firewall);
        format!(
            "# Generated by ip6tables-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-MARK-MASQ - [0:0]
:{svc} - [0:0]
:{svl} - [0:0]
:{ext} - [0:0]
:{fw} - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-SEP-B - [0:0]
-A KUBE-SERVICES -d fd00::10/128 -p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j {svc}
-A KUBE-SERVICES -d 2001:db8::5/128 -p tcp -m comment --comment \"ns/web:http loadbalancer IP\" -m tcp --dport 80 -j {fw}
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p tcp -m comment --comment \"ns/web:http\" -m tcp --dport 30080 -j {ext}
-A {fw} -s 2001:db8:1::/64 -m comment --comment \"ns/web:http loadbalancer IP\" -j {ext}
-A {fw} -m comment --comment \"other traffic to ns/web:http will be dropped by KUBE-PROXY-FIREWALL\"
-A {ext} -s fd00:10::/64 -m comment --comment \"pod traffic for ns/web:http external destinations\" -j {svc}
-A {ext} -m comment --comment \"masquerade LOCAL traffic for ns/web:http external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A {ext} -m comment --comment \"route LOCAL traffic for ns/web:http external destinations\" -m addrtype --src-type LOCAL -j {svc}
-A {ext} -j {svl}
-A {svc} -m comment --comment \"ns/web:http -> [fd00:10::1]:8080\" -m recent --rcheck --seconds 600 --reap --name KUBE-SEP-A --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -j KUBE-SEP-A
-A {svc} -m comment --comment \"ns/web:http -> [fd00:10::1]:8080\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-A
-A {svc} -m comment --comment \"ns/web:http -> [fd00:20::1]:8080\" -j KUBE-SEP-B
-A {svl} -m comment --comment \"ns/web:http -> [fd00:10::1]:8080\" -j KUBE-SEP-A
-A KUBE-SEP-A -s fd00:10::1/128 -m comment --comment \"ns/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-A -p tcp -m comment --comment \"ns/web:http\" -m recent --set --name KUBE-SEP-A --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -m tcp -j DNAT --to-destination [fd00:10::1]:8080
-A KUBE-SEP-B -p tcp -m comment --comment \"ns/web:http\" -m tcp -j DNAT --to-destination [fd00:20::1]:8080
COMMIT
"
        )
    }

    #[test]
    fn canonical_ip6tables_save_form() {
        let imported = interpret(&parse(&saved()).unwrap()).unwrap();
        assert_eq!(imported.family, Some(Family::V6));
        let [p] = imported.ports.as_slice() else {
            panic!("{:?}", imported.ports);
        };
        assert_eq!(p.name.to_string(), "ns/web:http");
        assert_eq!(p.cluster_ip, "fd00::10".parse::<IpAddr>().unwrap());
        assert_eq!((p.port, p.node_port), (80, Some(30080)));
        assert_eq!(
            p.load_balancer_ips,
            ["2001:db8::5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            p.load_balancer_source_ranges,
            ["2001:db8:1::/64".parse::<IpNet>().unwrap()]
        );
        assert!(p.external_policy_local && !p.internal_policy_local);
        assert_eq!(p.session_affinity, Some(Duration::from_secs(600)));
        let b = |s: &str| parse_backend(s).unwrap();
        assert_eq!(
            p.cluster_endpoints,
            [b("[fd00:10::1]:8080"), b("[fd00:20::1]:8080")]
        );
        assert_eq!(p.local_endpoints, [b("[fd00:10::1]:8080")]);
        assert!(imported.derived_names.is_empty());
    }

    #[test]
    fn ipvs_and_mixed_families_are_refused() {
        let ipvs = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
            -A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ\nCOMMIT\n";
        assert!(matches!(
            interpret(&parse(ipvs).unwrap()),
            Err(InterpretError::Ipvs { line: 4, .. })
        ));
        let mixed = saved().replace("-d 2001:db8::5/128", "-d 192.0.2.5/32");
        assert!(matches!(
            interpret(&parse(&mixed).unwrap()),
            Err(InterpretError::MixedFamilies { .. })
        ));
    }

    #[test]
    fn names_from_comments_must_hash_to_the_chain() {
        // A comment naming another service port does not rename the chain.
        let renamed = saved().replace("\"ns/web:http cluster IP\"", "\"ns/other:http cluster IP\"");
        let imported = interpret(&parse(&renamed).unwrap()).unwrap();
        assert_eq!(imported.ports.len(), 1);
        assert_eq!(imported.ports[0].name.to_string(), "ns/web:http");
    }
}
