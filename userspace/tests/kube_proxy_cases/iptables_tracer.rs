//! A packet tracer over iptables-restore text, after kube-proxy's `iptablesTracer`: it walks
//! nat PREROUTING, applies the first DNAT, then walks the filter chains kube-proxy filters in,
//! and reports every endpoint a packet could reach (each probabilistic jump is followed) and
//! whether anything marked it for masquerade. Flows are asserted without root.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Chains of one table: name → rules (the text after `-A CHAIN `).
type Table = BTreeMap<String, Vec<String>>;

/// Parsed restore input.
pub struct Rules {
    tables: BTreeMap<String, Table>,
}

impl Rules {
    pub fn parse(text: &str) -> Rules {
        let mut tables: BTreeMap<String, Table> = BTreeMap::new();
        let mut current = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(t) = line.strip_prefix('*') {
                current = t.to_string();
                tables.entry(current.clone()).or_default();
            } else if let Some(c) = line.strip_prefix(':') {
                let name = c.split_whitespace().next().unwrap_or_default();
                tables
                    .entry(current.clone())
                    .or_default()
                    .entry(name.to_string())
                    .or_default();
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
                tables
                    .entry(current.clone())
                    .or_default()
                    .entry(chain.to_string())
                    .or_default()
                    .push(rest.to_string());
            }
        }
        Rules { tables }
    }
}

/// One traced packet.
pub struct Packet<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    /// Addresses of the node (`-m addrtype --*-type LOCAL`).
    pub local: &'a [IpAddr],
}

struct Walk<'a> {
    table: &'a Table,
    outputs: Vec<String>,
    masq: bool,
}

/// Splits a rule into words, keeping `"quoted strings"` whole.
fn words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in rule.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn addr_matches(value: &str, ip: IpAddr) -> bool {
    match kpr::cidr::parse(value) {
        Ok(net) => net.contains(&ip),
        Err(_) => value.parse::<IpAddr>().is_ok_and(|v| v == ip),
    }
}

impl Walk<'_> {
    /// Whether every condition the tracer knows holds for `p`.
    fn matches(&self, w: &[String], p: &Packet) -> bool {
        let mut i = 0;
        let mut negate = false;
        while i < w.len() {
            let arg = |k: usize| w.get(i + k).map(String::as_str).unwrap_or_default();
            let ok = match w[i].as_str() {
                "!" => {
                    negate = true;
                    i += 1;
                    continue;
                }
                "-s" => Some(addr_matches(arg(1), p.src)),
                "-d" => Some(addr_matches(arg(1), p.dst)),
                "--src-type" => Some(arg(1) == "LOCAL" && p.local.contains(&p.src)),
                "--dst-type" => Some(arg(1) == "LOCAL" && p.local.contains(&p.dst)),
                "--dport" => Some(arg(1) == p.dport.to_string()),
                // State the tracer does not model never matches.
                "--rcheck" | "--ctstate" => return false,
                "-m" if arg(1) == "mark" => return false,
                _ => None,
            };
            if let Some(ok) = ok {
                if ok == negate {
                    return false;
                }
                negate = false;
                i += 2;
            } else {
                negate = false;
                i += 1;
            }
        }
        true
    }

    /// Walks `chain`; true if it ended in a terminal verdict.
    fn chain(&mut self, chain: &str, p: &Packet, depth: usize) -> bool {
        assert!(depth < 32, "jump loop through {chain}");
        let Some(rules) = self.table.get(chain) else {
            return false;
        };
        for rule in rules.clone() {
            let w = words(&rule);
            let Some(j) = w.iter().position(|x| x == "-j") else {
                continue;
            };
            if !self.matches(&w[..j], p) {
                continue;
            }
            let target = w.get(j + 1).map(String::as_str).unwrap_or_default();
            match target {
                "KUBE-MARK-MASQ" => self.masq = true,
                "ACCEPT" | "REJECT" | "DROP" => {
                    self.outputs.push(target.to_string());
                    return true;
                }
                "DNAT" => {
                    let to = w
                        .iter()
                        .position(|x| x == "--to-destination")
                        .and_then(|k| w.get(k + 1))
                        .cloned()
                        .unwrap_or_default();
                    self.outputs.push(to);
                    return true;
                }
                other => {
                    let probabilistic = w.iter().any(|x| x == "--probability");
                    if self.chain(other, p, depth + 1) && !probabilistic {
                        return true;
                    }
                }
            }
        }
        false
    }
}

/// Traces `p` through `rules`: (outputs joined with ", ", masquerade).
pub fn trace(rules: &Rules, p: &Packet) -> (String, bool) {
    let empty = Table::new();
    let nat = rules.tables.get("nat").unwrap_or(&empty);
    let filter = rules.tables.get("filter").unwrap_or(&empty);
    let mut walk = Walk {
        table: nat,
        outputs: Vec::new(),
        masq: false,
    };
    walk.chain("PREROUTING", p, 0);
    let mut dst = p.dst;
    if let Some(first) = walk.outputs.first() {
        let host = first.rsplit_once(':').map_or(first.as_str(), |(h, _)| h);
        if let Ok(ip) = host.trim_matches(['[', ']']).parse() {
            dst = ip;
        }
    }
    let translated = Packet {
        src: p.src,
        dst,
        dport: p.dport,
        local: p.local,
    };
    let (outputs, masq) = (walk.outputs, walk.masq);
    let mut walk = Walk {
        table: filter,
        outputs,
        masq,
    };
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        walk.chain(chain, &translated, 0);
    }
    (walk.outputs.join(", "), walk.masq)
}
