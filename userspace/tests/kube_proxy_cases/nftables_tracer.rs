//! A packet tracer over kpr's nftables ruleset, after kube-proxy's `nftablesTracer`: it runs the
//! pre-DNAT filter chain, nat prerouting (the first DNAT target becomes the destination), then
//! filter forward and input; verdict maps are looked up, every `numgen` target is followed
//! (so all reachable endpoints are listed), and a jump to mark-for-masquerade sets the
//! masquerade flag. It works on the typed ruleset, so a statement it does not know is a
//! compile error rather than a silent pass.

use std::net::IpAddr;

use kpr::model::Protocol;
use kpr::netfilter::nftables::ruleset::{Addr, ElementKey, Key, Ruleset, Stmt, Verdict};

pub struct Packet<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Protocol,
    pub dport: u16,
    pub local: &'a [IpAddr],
}

/// How a chain ended.
#[derive(PartialEq)]
enum End {
    /// A terminal verdict (drop, reject, dnat): the trace is over.
    Terminal,
    /// The chain ran out or returned.
    Continue,
}

struct Trace<'a> {
    r: &'a Ruleset,
    outputs: Vec<String>,
    masq: bool,
}

impl Trace<'_> {
    fn has(&self, set: &str, key: ElementKey) -> Option<Option<&Verdict>> {
        self.r
            .elements
            .get(set)?
            .iter()
            .rev()
            .find(|e| e.key == key)
            .map(|e| e.verdict.as_ref())
    }

    fn verdict(&mut self, v: &Verdict, p: &Packet, depth: usize) -> Option<End> {
        match v {
            Verdict::Drop => {
                self.outputs.push("DROP".into());
                Some(End::Terminal)
            }
            Verdict::Reject => {
                self.outputs.push("REJECT".into());
                Some(End::Terminal)
            }
            Verdict::Accept => Some(End::Terminal),
            Verdict::Return => Some(End::Continue),
            Verdict::Jump(c) if c == "mark-for-masquerade" => {
                self.masq = true;
                None
            }
            Verdict::Jump(c) => match self.chain(c, p, depth + 1) {
                End::Terminal => Some(End::Terminal),
                End::Continue => None,
            },
            // The called chain's end is this chain's end.
            Verdict::Goto(c) => Some(self.chain(c, p, depth + 1)),
        }
    }

    fn chain(&mut self, name: &str, p: &Packet, depth: usize) -> End {
        assert!(depth < 32, "jump loop through {name}");
        let Some(chain) = self.r.chains.get(name) else {
            return End::Continue;
        };
        'rules: for rule in &chain.rules {
            for stmt in &rule.stmts {
                let addr = |a: &Addr| match a {
                    Addr::Saddr => p.src,
                    Addr::Daddr => p.dst,
                };
                match stmt {
                    Stmt::CtStateNew | Stmt::UpdateSaddr(_) => {}
                    Stmt::Prefix {
                        addr: a,
                        negate,
                        net,
                    } => {
                        if net.contains(&addr(a)) == *negate {
                            continue 'rules;
                        }
                    }
                    Stmt::PrefixSet {
                        addr: a,
                        negate,
                        nets,
                    } => {
                        let inside = nets.iter().any(|n| n.contains(&addr(a)));
                        if inside == *negate {
                            continue 'rules;
                        }
                    }
                    Stmt::InSet { addr: a, set } => {
                        if self.has(set, ElementKey::Addr(addr(a))).is_none() {
                            continue 'rules;
                        }
                    }
                    // The traced packets come from no named interface (kube-proxy's cases
                    // use no interface detector).
                    Stmt::Iifname { negate, .. } => {
                        if !*negate {
                            continue 'rules;
                        }
                    }
                    Stmt::FibSaddrLocal => {
                        if !p.local.contains(&p.src) {
                            continue 'rules;
                        }
                    }
                    Stmt::L4proto(proto) => {
                        if *proto != p.proto {
                            continue 'rules;
                        }
                    }
                    Stmt::MarkClear(_) | Stmt::MarkOr(_) | Stmt::MarkXor(_) | Stmt::Masquerade => {}
                    Stmt::Vmap { key, map } => {
                        let k = match key {
                            Key::AddrProtoPort => {
                                ElementKey::AddrProtoPort(p.dst, p.proto, p.dport)
                            }
                            Key::ProtoPort => ElementKey::ProtoPort(p.proto, p.dport),
                            Key::Addr => ElementKey::Addr(p.dst),
                        };
                        match self.has(map, k).flatten().cloned() {
                            Some(v) => match self.verdict(&v, p, depth) {
                                Some(end) => return end,
                                None => continue 'rules,
                            },
                            None => continue 'rules,
                        }
                    }
                    Stmt::NumgenVmap(targets) => {
                        for t in targets {
                            self.chain(t, p, depth + 1);
                        }
                        return End::Terminal;
                    }
                    Stmt::Dnat(b) => {
                        self.outputs.push(b.to_string());
                        return End::Terminal;
                    }
                    Stmt::Verdict(v) => {
                        if let Some(end) = self.verdict(v, p, depth) {
                            return end;
                        }
                    }
                }
            }
        }
        End::Continue
    }
}

/// Traces `p` through `r`: (outputs joined with ", ", masquerade).
pub fn trace(r: &Ruleset, p: &Packet) -> (String, bool) {
    let mut t = Trace {
        r,
        outputs: Vec::new(),
        masq: false,
    };
    if t.chain("filter-prerouting-pre-dnat", p, 0) == End::Terminal {
        return (t.outputs.join(", "), t.masq);
    }
    t.chain("nat-prerouting", p, 0);
    let mut dst = p.dst;
    if let Some(first) = t.outputs.first() {
        let host = first.rsplit_once(':').map_or(first.as_str(), |(h, _)| h);
        if let Ok(ip) = host.trim_matches(['[', ']']).parse() {
            dst = ip;
        }
    }
    let after = Packet {
        src: p.src,
        dst,
        proto: p.proto,
        dport: p.dport,
        local: p.local,
    };
    if t.chain("filter-forward", &after, 0) != End::Terminal {
        t.chain("filter-input", &after, 0);
    }
    (t.outputs.join(", "), t.masq)
}
