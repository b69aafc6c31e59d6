//! iptables-save text → tables, chains and rules, with the line number of each.
//!
//! The input is untrusted text (a file someone copied off a node), so every malformed line is
//! an error naming its line, never a panic. The grammar is iptables-save's: `*table`, chain
//! declarations `:NAME POLICY [packets:bytes]`, `-A CHAIN …` rules (optionally prefixed by
//! `[packets:bytes]` with `iptables-save -c`), `COMMIT`, and `#` comments. kube-proxy's own
//! iptables-restore input (what its unit tests expect, what `kpr render-iptables` prints) is
//! the same grammar with the options in another order, so it is read too.
//!
//! Rules are kept as parsed options, in no particular order: iptables-save prints them in its
//! canonical order (`-d` before `-p` before `-m`), kube-proxy writes them in its own, and the
//! interpreter must not care.

use std::collections::BTreeMap;

use ipnet::IpNet;

/// Why the text is not a (complete) iptables-save dump. Every variant names its 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: not iptables-save output: {text:?} (expected *table, :chain, -A rule, COMMIT or a # comment)")]
    Foreign { line: usize, text: String },
    #[error("line {line}: {what} outside a table (no *table line before it)")]
    OutsideTable { line: usize, what: &'static str },
    #[error(
        "line {line}: table {table} starts before table {open} (line {open_line}) was committed"
    )]
    Unterminated {
        line: usize,
        table: String,
        open: String,
        open_line: usize,
    },
    #[error("line {line}: table {table} appears twice (import one dump, of one address family, at a time)")]
    DuplicateTable { line: usize, table: String },
    #[error("line {line}: chain {chain} is declared twice")]
    DuplicateChain { line: usize, chain: String },
    #[error("line {line}: rule in chain {chain}, which the table does not declare")]
    UndefinedChain { line: usize, chain: String },
    #[error("line {line}: rule jumps to {target}, which is neither a chain of table {table} nor a target iptables knows")]
    UndefinedTarget {
        line: usize,
        target: String,
        table: String,
    },
    #[error(
        "line {line}: {command} is an iptables-restore command; iptables-save writes only -A rules"
    )]
    RestoreCommand { line: usize, command: String },
    #[error("line {line}: {reason}")]
    BadRule { line: usize, reason: String },
    #[error("line {line} (end of input): table {table} (line {table_line}) has no COMMIT: the dump is truncated")]
    Truncated {
        line: usize,
        table: String,
        table_line: usize,
    },
    #[error("line {line} (end of input): no table at all: not iptables-save output")]
    Empty { line: usize },
}

/// A whole dump: its tables by name.
#[derive(Debug, Default, Clone)]
pub struct Dump {
    pub tables: BTreeMap<String, Table>,
    /// Lines in the input (for errors about the dump as a whole).
    pub lines: usize,
}

#[derive(Debug, Default, Clone)]
pub struct Table {
    pub line: usize,
    pub chains: BTreeMap<String, Chain>,
}

#[derive(Debug, Default, Clone)]
pub struct Chain {
    pub line: usize,
    pub rules: Vec<Rule>,
}

/// An address match, possibly negated (`! -s 10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrMatch {
    pub negated: bool,
    pub net: IpNet,
}

/// `-m recent` as kube-proxy uses it for ClientIP affinity.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recent {
    pub name: Option<String>,
    pub set: bool,
    pub rcheck: bool,
    pub seconds: Option<u64>,
}

/// One rule's options that kube-proxy's chains are told apart by; everything else it may carry
/// (`-m mark`, `-m conntrack`, `-m statistic`, nfacct, …) is accepted and not kept.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rule {
    pub line: usize,
    pub source: Option<AddrMatch>,
    pub destination: Option<AddrMatch>,
    pub protocol: Option<String>,
    pub dport: Option<u16>,
    pub comment: Option<String>,
    /// `-m addrtype --src-type X` (negation kept in the flag).
    pub src_type: Option<(bool, String)>,
    pub dst_type: Option<(bool, String)>,
    pub recent: Option<Recent>,
    /// `-m set --match-set NAME …`: the IPVS mode's ipsets.
    pub match_set: Option<String>,
    /// `-j` / `-g` target.
    pub target: Option<String>,
    /// `--to-destination` of a DNAT target.
    pub to_destination: Option<String>,
}

/// Targets iptables provides (extensions and the built-in verdicts), which a rule may name
/// without a chain of that name. A jump to any other undeclared name means the dump is
/// incomplete (or hand-edited): iptables-save declares every chain of the table it prints.
const KNOWN_TARGETS: &[&str] = &[
    "ACCEPT",
    "DROP",
    "REJECT",
    "RETURN",
    "QUEUE",
    "NFQUEUE",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "REDIRECT",
    "NETMAP",
    "MARK",
    "CONNMARK",
    "CONNSECMARK",
    "SECMARK",
    "LOG",
    "NFLOG",
    "ULOG",
    "TRACE",
    "NOTRACK",
    "CT",
    "TPROXY",
    "TCPMSS",
    "TCPOPTSTRIP",
    "CHECKSUM",
    "CLASSIFY",
    "DSCP",
    "TOS",
    "TTL",
    "HL",
    "ECN",
    "SET",
    "AUDIT",
    "IDLETIMER",
    "LED",
    "RATEEST",
    "SYNPROXY",
    "TEE",
    "CLUSTERIP",
    "HMARK",
    "NFACCT",
];

/// Splits a rule into words as iptables-restore does: whitespace separates, double quotes group
/// (with `\"` and `\\` escapes inside). A quoted word is never an option, whatever it starts with.
fn words(text: &str, line: usize) -> Result<Vec<(String, bool)>, ParseError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Ok(out);
        };
        let mut word = String::new();
        let mut quoted = false;
        if first == '"' {
            quoted = true;
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(ParseError::BadRule {
                            line,
                            reason: "unterminated quote".into(),
                        })
                    }
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => word.push(c),
                        None => {
                            return Err(ParseError::BadRule {
                                line,
                                reason: "unterminated quote".into(),
                            })
                        }
                    },
                    Some(c) => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push((word, quoted));
    }
}

/// An address or network as iptables prints it (`10.0.0.1/32`, `10.0.0.0/8`, `fd00::1/128`) or
/// as kube-proxy writes it (a bare address).
fn parse_net(s: &str, line: usize) -> Result<IpNet, ParseError> {
    crate::cidr::parse(s)
        .or_else(|_| crate::cidr::parse_ip(s).map(IpNet::from))
        .map_err(|e| ParseError::BadRule {
            line,
            reason: format!("bad address {s:?}: {e}"),
        })
}

/// Parses the options of one rule (everything after `-A CHAIN`).
fn parse_rule(words: &[(String, bool)], line: usize) -> Result<Rule, ParseError> {
    let bad = |reason: String| ParseError::BadRule { line, reason };
    let mut rule = Rule {
        line,
        ..Rule::default()
    };
    let is_option = |w: &(String, bool)| !w.1 && (w.0.starts_with('-') || w.0 == "!");
    let mut i = 0;
    let mut negated = false;
    while let Some((word, quoted)) = words.get(i) {
        i += 1;
        if *quoted {
            return Err(bad(format!("unexpected word \"{word}\"")));
        }
        if word == "!" {
            negated = true;
            continue;
        }
        if !word.starts_with('-') {
            return Err(bad(format!("unexpected word {word:?}")));
        }
        // The option's values: the words up to the next option.
        let start = i;
        while words.get(i).is_some_and(|w| !is_option(w)) {
            i += 1;
        }
        let values: Vec<&str> = words
            .get(start..i)
            .unwrap_or_default()
            .iter()
            .map(|(w, _)| w.as_str())
            .collect();
        let one = || -> Result<&str, ParseError> {
            match values.as_slice() {
                [v] => Ok(v),
                _ => Err(bad(format!("{word} takes one value, got {}", values.len()))),
            }
        };
        let neg = std::mem::take(&mut negated);
        match word.as_str() {
            "-s" | "--source" => {
                rule.source = Some(AddrMatch {
                    negated: neg,
                    net: parse_net(one()?, line)?,
                })
            }
            "-d" | "--destination" => {
                rule.destination = Some(AddrMatch {
                    negated: neg,
                    net: parse_net(one()?, line)?,
                })
            }
            "-p" | "--protocol" => rule.protocol = Some(one()?.to_ascii_lowercase()),
            "--dport" | "--destination-port" => {
                let v = one()?;
                rule.dport = Some(
                    v.parse()
                        .map_err(|_| bad(format!("bad port {v:?} (a single port is expected)")))?,
                );
            }
            "--comment" => rule.comment = Some(one()?.to_string()),
            "--src-type" => rule.src_type = Some((neg, one()?.to_string())),
            "--dst-type" => rule.dst_type = Some((neg, one()?.to_string())),
            "--match-set" => rule.match_set = values.first().map(|s| s.to_string()),
            "-j" | "--jump" | "-g" | "--goto" => rule.target = Some(one()?.to_string()),
            "--to-destination" => rule.to_destination = Some(one()?.to_string()),
            "--name" | "--set" | "--rcheck" | "--update" | "--seconds" | "--reap" | "--rsource"
            | "--rdest" | "--mask" | "--hitcount" | "--rttl" | "--remove"
                if rule.recent.is_some() || word == "--rcheck" || word == "--set" =>
            {
                let r = rule.recent.get_or_insert_with(Recent::default);
                match word.as_str() {
                    "--name" => r.name = Some(one()?.to_string()),
                    "--set" => r.set = true,
                    "--rcheck" => r.rcheck = true,
                    "--seconds" => {
                        let v = one()?;
                        r.seconds =
                            Some(v.parse().map_err(|_| bad(format!("bad --seconds {v:?}")))?);
                    }
                    _ => {}
                }
            }
            "-m" | "--match" if one()? == "recent" => {
                rule.recent.get_or_insert_with(Recent::default);
            }
            // Everything else is accepted as it is: kube-proxy's chains are told apart by the
            // options above, and other tools' rules are not interpreted at all.
            _ => {}
        }
    }
    if negated {
        return Err(bad("\"!\" at the end of the rule".into()));
    }
    Ok(rule)
}

/// Parses a whole dump. Jumps are checked against the table's chains once the table is
/// committed (iptables-save declares every chain before the first rule, but kube-proxy's
/// restore input need not).
pub fn parse(text: &str) -> Result<Dump, ParseError> {
    let mut dump = Dump::default();
    // The table being read: (name, its line, its contents).
    let mut open: Option<(String, Table)> = None;
    let mut last = 0;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        last = line;
        let text = raw.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if let Some(name) = text.strip_prefix('*') {
            if let Some((open_name, t)) = &open {
                return Err(ParseError::Unterminated {
                    line,
                    table: name.to_string(),
                    open: open_name.clone(),
                    open_line: t.line,
                });
            }
            let name = name.trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(ParseError::Foreign {
                    line,
                    text: raw.to_string(),
                });
            }
            if dump.tables.contains_key(name) {
                return Err(ParseError::DuplicateTable {
                    line,
                    table: name.to_string(),
                });
            }
            open = Some((
                name.to_string(),
                Table {
                    line,
                    ..Table::default()
                },
            ));
            continue;
        }
        if text == "COMMIT" {
            let Some((name, table)) = open.take() else {
                return Err(ParseError::OutsideTable {
                    line,
                    what: "COMMIT",
                });
            };
            check_targets(&name, &table)?;
            dump.tables.insert(name, table);
            continue;
        }
        if let Some(decl) = text.strip_prefix(':') {
            let Some((_, table)) = open.as_mut() else {
                return Err(ParseError::OutsideTable {
                    line,
                    what: "chain declaration",
                });
            };
            let name = decl.split_whitespace().next().unwrap_or_default();
            if name.is_empty() {
                return Err(ParseError::Foreign {
                    line,
                    text: raw.to_string(),
                });
            }
            if table.chains.contains_key(name) {
                return Err(ParseError::DuplicateChain {
                    line,
                    chain: name.to_string(),
                });
            }
            table.chains.insert(
                name.to_string(),
                Chain {
                    line,
                    rules: Vec::new(),
                },
            );
            continue;
        }
        // `iptables-save -c` prefixes each rule with its counters.
        let rule_text = match text.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((counters, rest))
                    if counters.split_once(':').is_some_and(|(p, b)| {
                        p.parse::<u64>().is_ok() && b.parse::<u64>().is_ok()
                    }) =>
                {
                    rest.trim_start()
                }
                _ => {
                    return Err(ParseError::Foreign {
                        line,
                        text: raw.to_string(),
                    })
                }
            },
            None => text,
        };
        let ws = words(rule_text, line)?;
        let command = ws.first().map(|w| w.0.as_str()).unwrap_or_default();
        match command {
            "-A" | "--append" => {}
            "-I" | "--insert" | "-D" | "--delete" | "-R" | "--replace" | "-N" | "--new-chain"
            | "-X" | "--delete-chain" | "-F" | "--flush" | "-Z" | "-P" => {
                return Err(ParseError::RestoreCommand {
                    line,
                    command: command.to_string(),
                })
            }
            _ => {
                return Err(ParseError::Foreign {
                    line,
                    text: raw.to_string(),
                })
            }
        }
        let Some((_, table)) = open.as_mut() else {
            return Err(ParseError::OutsideTable { line, what: "rule" });
        };
        let chain = ws.get(1).map(|w| w.0.clone()).unwrap_or_default();
        let rule = parse_rule(ws.get(2..).unwrap_or_default(), line)?;
        match table.chains.get_mut(&chain) {
            Some(c) => c.rules.push(rule),
            None => return Err(ParseError::UndefinedChain { line, chain }),
        }
    }
    dump.lines = last;
    if let Some((name, table)) = open {
        return Err(ParseError::Truncated {
            line: last,
            table: name,
            table_line: table.line,
        });
    }
    if dump.tables.is_empty() {
        return Err(ParseError::Empty { line: last });
    }
    Ok(dump)
}

fn check_targets(name: &str, table: &Table) -> Result<(), ParseError> {
    for chain in table.chains.values() {
        for rule in &chain.rules {
            if let Some(target) = &rule.target {
                if !table.chains.contains_key(target) && !KNOWN_TARGETS.contains(&target.as_str()) {
                    return Err(ParseError::UndefinedTarget {
                        line: rule.line,
                        target: target.clone(),
                        table: name.to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "# Generated by iptables-save v1.8.9 on Thu Dec  3 17:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-X - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KUBE-SVC-X
[12:345] -A KUBE-SVC-X ! -s 10.0.0.0/8 -m recent --name KUBE-SEP-Y --rcheck --seconds 300 --reap -j DNAT --to-destination [fd00::1]:80
COMMIT
# Completed on Thu Dec  3 17:00:00 2026
";

    #[test]
    fn reads_iptables_save_text() {
        let dump = parse(SAVED).unwrap();
        let nat = &dump.tables["nat"];
        assert_eq!(nat.line, 2);
        let svc = &nat.chains["KUBE-SERVICES"].rules[0];
        assert_eq!(svc.line, 7);
        assert_eq!(svc.comment.as_deref(), Some("ns1/svc1:p80 cluster IP"));
        assert_eq!(
            svc.destination.unwrap().net,
            "172.30.0.41/32".parse().unwrap()
        );
        assert_eq!(svc.protocol.as_deref(), Some("tcp"));
        assert_eq!(svc.dport, Some(80));
        assert_eq!(svc.target.as_deref(), Some("KUBE-SVC-X"));
        let r = &nat.chains["KUBE-SVC-X"].rules[0];
        assert!(r.source.unwrap().negated);
        let recent = r.recent.as_ref().unwrap();
        assert!(recent.rcheck && !recent.set);
        assert_eq!(recent.seconds, Some(300));
        assert_eq!(r.to_destination.as_deref(), Some("[fd00::1]:80"));
    }

    #[test]
    fn quotes_and_escapes() {
        let w = words(r#"-m comment --comment "a \"b\" c" -j X"#, 1).unwrap();
        assert_eq!(w[3], ("a \"b\" c".to_string(), true));
        assert!(matches!(
            words(r#"--comment "open"#, 4),
            Err(ParseError::BadRule { line: 4, .. })
        ));
    }

    #[test]
    fn errors_name_their_line() {
        let truncated = SAVED.replace("COMMIT\n", "");
        assert!(matches!(
            parse(&truncated),
            Err(ParseError::Truncated {
                line: 9,
                table_line: 2,
                ..
            })
        ));
        let undefined = SAVED.replace("-j KUBE-SVC-X\n", "-j KUBE-SVC-Z\n");
        assert!(matches!(
            parse(&undefined),
            Err(ParseError::UndefinedTarget { line: 7, .. })
        ));
        let chain = SAVED.replace("-A KUBE-SVC-X", "-A KUBE-SVC-Q");
        assert!(matches!(
            parse(&chain),
            Err(ParseError::UndefinedChain { line: 8, .. })
        ));
        let nft = "table ip filter {\n\tchain input {\n\t}\n}\n";
        assert!(matches!(
            parse(nft),
            Err(ParseError::Foreign { line: 1, .. })
        ));
        assert!(matches!(
            parse("# nothing\n"),
            Err(ParseError::Empty { line: 1 })
        ));
        assert!(matches!(
            parse("*nat\n:A - [0:0]\n-X A\nCOMMIT\n"),
            Err(ParseError::RestoreCommand { line: 3, .. })
        ));
        assert!(matches!(
            parse("*nat\n:A - [0:0]\n-A A -d 300.1.1.1 -j ACCEPT\nCOMMIT\n"),
            Err(ParseError::BadRule { line: 3, .. })
        ));
        assert!(matches!(
            parse("*nat\nCOMMIT\n*nat\nCOMMIT\n"),
            Err(ParseError::DuplicateTable { line: 3, .. })
        ));
        assert!(matches!(
            parse("*nat\n*filter\nCOMMIT\n"),
            Err(ParseError::Unterminated { line: 2, .. })
        ));
    }

    #[test]
    fn never_panics_on_garbage() {
        // Every prefix of a valid dump, and a few odd lines: errors or dumps, never panics.
        for end in 0..SAVED.len() {
            if SAVED.is_char_boundary(end) {
                let _ = parse(&SAVED[..end]);
            }
        }
        for odd in [
            "[",
            "[1:2",
            "[a:b] -A X",
            "-A",
            ":",
            "*",
            "*nat\n-A\n",
            "*nat\n:X\n-A X !\nCOMMIT",
        ] {
            let _ = parse(odd);
        }
    }
}
