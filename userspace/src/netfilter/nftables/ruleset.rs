//! kube-proxy's nftables ruleset as data: chains of typed statements, sets, maps and their
//! elements. The writer ([`super::write`]) builds it from the plan; [`Ruleset::dump`] prints it
//! in the syntax of kube-proxy's `knftables.Fake.Dump()` (what kube-proxy's tests compare and
//! what `nft` itself accepts), and [`super::netlink`] encodes it for the kernel. Keeping the
//! statements typed is what lets both be exact.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Backend, Family, Protocol};

/// kube-proxy's table name (in family `ip` or `ip6`).
pub const TABLE: &str = "kube-proxy";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainType {
    Filter,
    Nat,
}

/// A base chain's hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BaseChain {
    pub ty: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub base: Option<BaseChain>,
    pub comment: Option<String>,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub stmts: Vec<Stmt>,
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(stmts: Vec<Stmt>) -> Rule {
        Rule {
            stmts,
            comment: None,
        }
    }

    pub fn commented(stmts: Vec<Stmt>, comment: &str) -> Rule {
        Rule {
            stmts,
            comment: Some(comment.to_string()),
        }
    }
}

/// Which address of the packet a statement looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    Saddr,
    Daddr,
}

/// The keys kube-proxy's sets and maps use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// `ipv4_addr` / `ipv6_addr`.
    Addr,
    /// `inet_proto . inet_service`.
    ProtoPort,
    /// `ipv4_addr . inet_proto . inet_service`.
    AddrProtoPort,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Accept,
    Drop,
    Reject,
    Return,
    Jump(String),
    Goto(String),
}

/// The statements kube-proxy's rules are made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    /// `ct state new`.
    CtStateNew,
    /// `ip daddr 172.30.0.41`, `ip saddr != 10.0.0.0/8`.
    Prefix {
        addr: Addr,
        negate: bool,
        net: IpNet,
    },
    /// `ip daddr { 172.30.0.0/16 }`, `ip saddr != { 203.0.113.0/25 , 5.6.7.8 }`: an anonymous
    /// interval set.
    PrefixSet {
        addr: Addr,
        negate: bool,
        nets: Vec<IpNet>,
    },
    /// `ip daddr @cluster-ips`.
    InSet {
        addr: Addr,
        set: String,
    },
    /// `fib saddr type local`.
    FibSaddrLocal,
    /// `iifname "cni0"`, `iifname != "veth*"` (with `prefix`).
    Iifname {
        name: String,
        prefix: bool,
        negate: bool,
    },
    /// `meta l4proto tcp`.
    L4proto(Protocol),
    /// `mark and 0x4000 == 0`.
    MarkClear(u32),
    /// `mark set mark or 0x4000`.
    MarkOr(u32),
    /// `mark set mark xor 0x4000`.
    MarkXor(u32),
    /// `ip daddr . meta l4proto . th dport vmap @map` / `meta l4proto . th dport vmap @map`.
    Vmap {
        key: Key,
        map: String,
    },
    /// `numgen random mod N vmap { 0 : goto a , 1 : goto b }`.
    NumgenVmap(Vec<String>),
    /// `update @set { ip saddr }`.
    UpdateSaddr(String),
    /// `dnat to 10.180.0.1:80`.
    Dnat(Backend),
    /// `masquerade fully-random`.
    Masquerade,
    Verdict(Verdict),
}

impl Rule {
    /// Whether the rule refers to the named set or map.
    pub fn uses_set(&self, name: &str) -> bool {
        self.stmts.iter().any(|s| match s {
            Stmt::InSet { set, .. } | Stmt::UpdateSaddr(set) => set == name,
            Stmt::Vmap { map, .. } => map == name,
            _ => false,
        })
    }
}

/// A set (no data) or a verdict map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub key: Key,
    /// A map to verdicts (`: verdict`), not a plain set.
    pub verdict_map: bool,
    /// `flags dynamic,timeout` with `timeout Ns` (affinity sets).
    pub timeout_s: Option<u64>,
    pub comment: Option<String>,
}

/// One element's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElementKey {
    Addr(IpAddr),
    ProtoPort(Protocol, u16),
    AddrProtoPort(IpAddr, Protocol, u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub key: ElementKey,
    pub comment: Option<String>,
    pub verdict: Option<Verdict>,
}

/// The whole table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    pub comment: String,
    pub chains: BTreeMap<String, Chain>,
    pub sets: BTreeMap<String, Set>,
    /// Elements by set or map name, in the order added.
    pub elements: BTreeMap<String, Vec<Element>>,
}

impl Ruleset {
    pub fn new(family: Family) -> Ruleset {
        Ruleset {
            family,
            comment: "rules for kube-proxy".into(),
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
            elements: BTreeMap::new(),
        }
    }

    /// `ip` or `ip6`.
    pub fn family_name(&self) -> &'static str {
        match self.family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// Adds a regular chain (with its rules).
    pub fn chain(&mut self, name: &str, rules: Vec<Rule>) {
        self.chains.insert(
            name.to_string(),
            Chain {
                base: None,
                comment: None,
                rules,
            },
        );
    }

    pub fn set(&mut self, name: &str, set: Set) {
        self.sets.insert(name.to_string(), set);
    }

    pub fn element(&mut self, set: &str, e: Element) {
        self.elements.entry(set.to_string()).or_default().push(e);
    }

    /// knftables' `Fake.Dump()`: the table, the chains, sets and maps in name order, every
    /// chain's rules, then every set's and map's elements.
    pub fn dump(&self) -> String {
        let fam = self.family_name();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "add table {fam} {TABLE} {{ comment {:?} ; }}",
            self.comment
        );
        for (name, c) in &self.chains {
            let _ = write!(out, "add chain {fam} {TABLE} {name}");
            match (&c.base, &c.comment) {
                (Some(b), _) => {
                    let _ = write!(
                        out,
                        " {{ type {} hook {} priority {} ; }}",
                        match b.ty {
                            ChainType::Filter => "filter",
                            ChainType::Nat => "nat",
                        },
                        b.hook.name(),
                        b.priority
                    );
                }
                (None, Some(comment)) => {
                    let _ = write!(out, " {{ comment {comment:?} ; }}");
                }
                (None, None) => {}
            }
            out.push('\n');
        }
        for (name, s) in self.sets.iter().filter(|(_, s)| !s.verdict_map) {
            let _ = writeln!(out, "add set {fam} {TABLE} {name} {}", self.set_spec(s));
        }
        for (name, s) in self.sets.iter().filter(|(_, s)| s.verdict_map) {
            let _ = writeln!(out, "add map {fam} {TABLE} {name} {}", self.set_spec(s));
        }
        for (name, c) in &self.chains {
            for r in &c.rules {
                let _ = writeln!(out, "add rule {fam} {TABLE} {name} {}", self.rule_text(r));
            }
        }
        let ordered = self
            .sets
            .iter()
            .filter(|(_, s)| !s.verdict_map)
            .chain(self.sets.iter().filter(|(_, s)| s.verdict_map));
        for (name, _) in ordered {
            for e in self.elements.get(name).into_iter().flatten() {
                let _ = writeln!(out, "add element {fam} {TABLE} {name} {}", element_text(e));
            }
        }
        out
    }

    fn set_spec(&self, s: &Set) -> String {
        let mut spec = format!("{{ type {}", self.key_type(s.key));
        if s.verdict_map {
            spec.push_str(" : verdict");
        }
        spec.push_str(" ;");
        if let Some(t) = s.timeout_s {
            let _ = write!(spec, " flags dynamic,timeout ; timeout {t}s ;");
        }
        if let Some(c) = &s.comment {
            let _ = write!(spec, " comment {c:?} ;");
        }
        spec.push_str(" }");
        spec
    }

    fn key_type(&self, k: Key) -> String {
        let addr = match self.family {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        };
        match k {
            Key::Addr => addr.to_string(),
            Key::ProtoPort => "inet_proto . inet_service".into(),
            Key::AddrProtoPort => format!("{addr} . inet_proto . inet_service"),
        }
    }

    /// A rule as `nft` syntax, its comment last.
    pub fn rule_text(&self, r: &Rule) -> String {
        let ip = self.family_name();
        let words: Vec<String> = r.stmts.iter().map(|s| stmt_text(ip, s)).collect();
        let mut t = words.join(" ");
        if let Some(c) = &r.comment {
            let _ = write!(t, " comment {c:?}");
        }
        t
    }
}

/// nft prints a host prefix as the bare address.
fn prefix_text(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn addr_text(a: Addr) -> &'static str {
    match a {
        Addr::Saddr => "saddr",
        Addr::Daddr => "daddr",
    }
}

pub fn verdict_text(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Reject => "reject".into(),
        Verdict::Return => "return".into(),
        Verdict::Jump(c) => format!("jump {c}"),
        Verdict::Goto(c) => format!("goto {c}"),
    }
}

fn stmt_text(ip: &str, s: &Stmt) -> String {
    let neg = |n: bool| if n { "!= " } else { "" };
    match s {
        Stmt::CtStateNew => "ct state new".into(),
        Stmt::Prefix { addr, negate, net } => format!(
            "{ip} {} {}{}",
            addr_text(*addr),
            neg(*negate),
            prefix_text(*net)
        ),
        Stmt::PrefixSet { addr, negate, nets } => format!(
            "{ip} {} {}{{ {} }}",
            addr_text(*addr),
            neg(*negate),
            nets.iter()
                .map(|&n| prefix_text(n))
                .collect::<Vec<_>>()
                .join(" , ")
        ),
        Stmt::InSet { addr, set } => format!("{ip} {} @{set}", addr_text(*addr)),
        Stmt::FibSaddrLocal => "fib saddr type local".into(),
        Stmt::Iifname {
            name,
            prefix,
            negate,
        } => format!(
            "iifname {}\"{name}{}\"",
            neg(*negate),
            if *prefix { "*" } else { "" }
        ),
        Stmt::L4proto(p) => format!("meta l4proto {}", p.as_lower()),
        Stmt::MarkClear(m) => format!("mark and {m:#x} == 0"),
        Stmt::MarkOr(m) => format!("mark set mark or {m:#x}"),
        Stmt::MarkXor(m) => format!("mark set mark xor {m:#x}"),
        Stmt::Vmap { key, map } => match key {
            Key::AddrProtoPort => format!("{ip} daddr . meta l4proto . th dport vmap @{map}"),
            Key::ProtoPort => format!("meta l4proto . th dport vmap @{map}"),
            Key::Addr => format!("{ip} daddr vmap @{map}"),
        },
        Stmt::NumgenVmap(targets) => format!(
            "numgen random mod {} vmap {{ {} }}",
            targets.len(),
            targets
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{i} : goto {t}"))
                .collect::<Vec<_>>()
                .join(" , ")
        ),
        Stmt::UpdateSaddr(set) => format!("update @{set} {{ {ip} saddr }}"),
        Stmt::Dnat(b) => format!("dnat to {b}"),
        Stmt::Masquerade => "masquerade fully-random".into(),
        Stmt::Verdict(v) => verdict_text(v),
    }
}

impl fmt::Display for ElementKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElementKey::Addr(ip) => write!(f, "{ip}"),
            ElementKey::ProtoPort(p, port) => write!(f, "{} . {port}", p.as_lower()),
            ElementKey::AddrProtoPort(ip, p, port) => {
                write!(f, "{ip} . {} . {port}", p.as_lower())
            }
        }
    }
}

fn element_text(e: &Element) -> String {
    let mut t = format!("{{ {}", e.key);
    if let Some(c) = &e.comment {
        let _ = write!(t, " comment {c:?}");
    }
    if let Some(v) = &e.verdict {
        let _ = write!(t, " : {}", verdict_text(v));
    }
    t.push_str(" }");
    t
}
