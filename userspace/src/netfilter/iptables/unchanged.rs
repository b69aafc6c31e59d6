//! Partial syncs leave out the chains whose rules are the same as last loaded.
//!
//! kube-proxy's partial sync rewrites the shared chains (KUBE-SERVICES, KUBE-NODEPORTS, the
//! filter table's) every time. At 10,000 Services KUBE-SERVICES alone has 10,000 rules, and
//! `iptables-nft-restore` checks every jump target of every rule it is given against every
//! chain of the table: a one-endpoint change then takes most of a second to load, though
//! only a service chain and an endpoint chain changed. Left out, a chain stays as it is in the
//! kernel, which is what it would have been rewritten to. The rule text kpr computes (and its
//! golden tests hold to kube-proxy's) is unchanged; only what is loaded is smaller. Full syncs
//! (every `--sync-period`, and after any failure) load everything, so a chain changed behind
//! kpr's back is repaired there, as kube-proxy repairs service chains it skipped.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

/// Each chain's rules as last loaded, by table and chain, as digests.
#[derive(Default)]
pub struct LoadedChains {
    digests: HashMap<(String, String), u64>,
}

/// A restore input with the unchanged chains left out, and how the digests change once it is
/// loaded.
pub struct Reduced {
    pub text: String,
    /// Chains left out.
    pub omitted: usize,
    /// The digests start afresh (a full sync).
    full: bool,
    /// Chains written (with their new digests) and chains deleted.
    written: Vec<((String, String), u64)>,
    deleted: Vec<(String, String)>,
}

impl LoadedChains {
    /// `input` (iptables-restore text) without the chains whose rules are those last loaded.
    /// `full`: nothing is left out (and the digests start afresh).
    pub fn reduce(&self, input: &str, full: bool) -> Reduced {
        let chains = rules_by_chain(input);
        let mut omit: HashSet<(&str, &str)> = HashSet::new();
        let (mut written, mut deleted) = (Vec::new(), Vec::new());
        for ((table, chain), c) in &chains {
            let k = (table.to_string(), chain.to_string());
            if c.deleted {
                deleted.push(k);
            } else if !full && self.digests.get(&k) == Some(&c.digest) {
                omit.insert((table, chain));
            } else {
                written.push((k, c.digest));
            }
        }
        let mut text = String::with_capacity(input.len());
        let mut table = "";
        for line in input.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t;
            }
            let keep = match chain_of(line) {
                Some(chain) => !omit.contains(&(table, chain)),
                None => true,
            };
            if keep {
                text.push_str(line);
                text.push('\n');
            }
        }
        Reduced {
            text,
            omitted: omit.len(),
            full,
            written,
            deleted,
        }
    }

    /// `reduced` was loaded.
    pub fn loaded(&mut self, reduced: Reduced) {
        if reduced.full {
            self.digests.clear();
        }
        for k in reduced.deleted {
            self.digests.remove(&k);
        }
        self.digests.extend(reduced.written);
    }

    /// What the kernel holds is unknown (a restore failed).
    pub fn forget(&mut self) {
        self.digests.clear();
    }
}

/// One declared chain of a restore input.
struct ChainRules {
    digest: u64,
    /// `-X`: the input deletes it.
    deleted: bool,
}

/// The chain a line declares (`:CHAIN - [0:0]`), appends to (`-A CHAIN ...`) or deletes
/// (`-X CHAIN`).
fn chain_of(line: &str) -> Option<&str> {
    if let Some(rest) = line.strip_prefix(':') {
        return rest.split_whitespace().next();
    }
    let rest = line
        .strip_prefix("-A ")
        .or_else(|| line.strip_prefix("-X "))?;
    rest.split_whitespace().next()
}

/// The chains `input` declares (a declaration flushes the chain), with a digest of the rules
/// it appends to each, in order.
fn rules_by_chain(input: &str) -> HashMap<(&str, &str), ChainRules> {
    let mut hashers: HashMap<(&str, &str), (DefaultHasher, bool)> = HashMap::new();
    let mut table = "";
    for line in input.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
        } else if let Some(rest) = line.strip_prefix(':') {
            if let Some(chain) = rest.split_whitespace().next() {
                hashers.entry((table, chain)).or_default();
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            if let Some((h, _)) = hashers.get_mut(&(table, chain)) {
                line.hash(h);
            }
        } else if let Some(rest) = line.strip_prefix("-X ") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            if let Some((_, deleted)) = hashers.get_mut(&(table, chain)) {
                *deleted = true;
            }
        }
    }
    hashers
        .into_iter()
        .map(|(k, (h, deleted))| {
            (
                k,
                ChainRules {
                    digest: h.finish(),
                    deleted,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: &str = "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
        -A KUBE-FORWARD -j ACCEPT\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n\
        :KUBE-SEP-A1 - [0:0]\n-A KUBE-SERVICES -d 10.0.0.1/32 -j KUBE-SVC-A\n\
        -A KUBE-SVC-A -j KUBE-SEP-A1\n-A KUBE-SEP-A1 -j DNAT --to-destination 10.1.0.1:80\nCOMMIT\n";

    fn loaded(input: &str) -> LoadedChains {
        let mut l = LoadedChains::default();
        let r = l.reduce(input, true);
        assert_eq!(r.text, input, "a full sync loads everything");
        l.loaded(r);
        l
    }

    #[test]
    fn unchanged_chains_are_left_out_of_partial_syncs() {
        let l = loaded(FIRST);
        // One endpoint replaced: KUBE-SVC-A changes, KUBE-SEP-A1 goes, KUBE-SEP-A2 comes.
        let second = "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
            -A KUBE-FORWARD -j ACCEPT\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n\
            :KUBE-SEP-A2 - [0:0]\n:KUBE-SEP-A1 - [0:0]\n-A KUBE-SERVICES -d 10.0.0.1/32 -j KUBE-SVC-A\n\
            -A KUBE-SVC-A -j KUBE-SEP-A2\n-A KUBE-SEP-A2 -j DNAT --to-destination 10.1.0.2:80\n\
            -X KUBE-SEP-A1\nCOMMIT\n";
        let r = l.reduce(second, false);
        assert_eq!(
            r.text,
            "*filter\nCOMMIT\n*nat\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-A2 - [0:0]\n\
             :KUBE-SEP-A1 - [0:0]\n-A KUBE-SVC-A -j KUBE-SEP-A2\n\
             -A KUBE-SEP-A2 -j DNAT --to-destination 10.1.0.2:80\n-X KUBE-SEP-A1\nCOMMIT\n"
        );
        assert_eq!(r.omitted, 3);
    }

    #[test]
    fn the_same_chain_name_in_two_tables_is_two_chains() {
        let l = loaded(FIRST);
        let changed = FIRST.replacen(
            ":KUBE-SERVICES - [0:0]\n:KUBE-FORWARD",
            ":KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j REJECT\n:KUBE-FORWARD",
            1,
        );
        let r = l.reduce(&changed, false);
        assert!(
            r.text.starts_with(
                "*filter\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j REJECT\nCOMMIT\n*nat\n"
            ),
            "{}",
            r.text
        );
        assert!(!r.text.contains("10.0.0.1"), "{}", r.text);
    }

    #[test]
    fn a_deleted_chain_is_written_again_when_it_comes_back() {
        let mut l = loaded(FIRST);
        let deleting = "*nat\n:KUBE-SEP-A1 - [0:0]\n-X KUBE-SEP-A1\nCOMMIT\n";
        let r = l.reduce(deleting, false);
        assert_eq!(r.text, deleting);
        l.loaded(r);
        // The same rules as before the deletion: the kernel no longer has them.
        let r = l.reduce(FIRST, false);
        assert!(r.text.contains("-A KUBE-SEP-A1 -j DNAT"), "{}", r.text);
    }

    #[test]
    fn after_a_failure_everything_is_written() {
        let mut l = loaded(FIRST);
        l.forget();
        assert_eq!(l.reduce(FIRST, false).text, FIRST);
    }
}
