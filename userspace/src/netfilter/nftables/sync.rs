//! The nftables mode's memory between syncs and the transaction of each: no I/O, so that
//! kube-proxy's multi-step tests run against it. A full sync replaces the table; an incremental
//! one adds, flushes and deletes only the chains, sets and elements that changed. As kube-proxy
//! does, a chain no service needs any more is first flushed and only deleted a while later, so
//! that a packet already on its way through it never meets a dangling jump.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::ruleset::{Chain, Element, ElementKey, Rule, Ruleset, Set};
use super::write::{write, NftablesConfig};
use crate::model::DesiredState;
use crate::netfilter::plan::{plan, PlanConfig};

/// How long a flushed chain stays before it is deleted (kube-proxy waits one second).
pub const STALE_CHAIN_DELAY: Duration = Duration::from_secs(1);

/// One operation of a transaction, in the order it is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Replace the whole table (add it, delete it with whatever it held, add it again).
    ReplaceTable,
    AddChain(String),
    FlushChain(String),
    DeleteChain(String),
    AddRule(String, Rule),
    AddSet(String),
    DeleteSet(String),
    AddElement(String, Element),
    DeleteElement(String, ElementKey),
}

/// The state after a sync, and the operations that get the kernel there.
pub struct Prepared {
    /// Everything the table holds once the transaction is committed.
    pub target: Ruleset,
    pub ops: Vec<Op>,
    pub full: bool,
    stale: BTreeMap<String, Instant>,
}

pub struct NftSyncer {
    pub plan_cfg: PlanConfig,
    /// `--nodeport-addresses` was given: NodePorts only on the node's matching addresses.
    pub nodeport_addresses_given: bool,
    pub nft: NftablesConfig,
    programmed: Option<Ruleset>,
    /// Chains flushed because nothing needs them, and since when.
    stale: BTreeMap<String, Instant>,
}

impl NftSyncer {
    pub fn new(plan_cfg: PlanConfig, nodeport_addresses_given: bool, nft: NftablesConfig) -> Self {
        NftSyncer {
            plan_cfg,
            nodeport_addresses_given,
            nft,
            programmed: None,
            stale: BTreeMap::new(),
        }
    }

    /// Nothing is known to be programmed: the next sync replaces the table.
    pub fn needs_full(&self) -> bool {
        self.programmed.is_none()
    }

    /// Chains kept flushed until they may be deleted.
    pub fn stale_chains(&self) -> Vec<&str> {
        self.stale.keys().map(String::as_str).collect()
    }

    /// The transaction from what was last committed to `desired`, at time `now`.
    pub fn prepare(&self, desired: &DesiredState, full: bool, now: Instant) -> Prepared {
        let mut cfg = self.plan_cfg.clone();
        cfg.node_ip = desired.node_ip;
        cfg.nodeport_ips = Some(desired.node_ips.clone());
        let plan = plan(desired, &cfg);
        let mut target = write(&plan, &cfg, &self.nft);
        let full = full || self.programmed.is_none();

        let mut stale = BTreeMap::new();
        if let Some(old) = self.programmed.as_ref().filter(|_| !full) {
            for name in old.chains.keys() {
                if target.chains.contains_key(name) {
                    continue;
                }
                let since = self.stale.get(name).copied().unwrap_or(now);
                if now.saturating_duration_since(since) < STALE_CHAIN_DELAY {
                    target.chains.insert(
                        name.clone(),
                        Chain {
                            base: None,
                            comment: None,
                            rules: Vec::new(),
                        },
                    );
                    stale.insert(name.clone(), since);
                }
            }
        }
        let ops = match self.programmed.as_ref() {
            Some(old) if !full => diff(old, &target),
            _ => full_ops(&target),
        };
        Prepared {
            target,
            ops,
            full,
            stale,
        }
    }

    /// The prepared transaction was committed.
    pub fn commit(&mut self, p: Prepared) -> Ruleset {
        self.stale = p.stale;
        self.programmed = Some(p.target.clone());
        p.target
    }

    /// The transaction failed: what the kernel holds is unknown, so the next sync replaces
    /// the table.
    pub fn reset(&mut self) {
        self.programmed = None;
        self.stale.clear();
    }
}

/// Every object of `r`, after replacing the table.
pub fn full_ops(r: &Ruleset) -> Vec<Op> {
    let mut ops = vec![Op::ReplaceTable];
    ops.extend(r.sets.keys().map(|s| Op::AddSet(s.clone())));
    ops.extend(r.chains.keys().map(|c| Op::AddChain(c.clone())));
    for (name, c) in &r.chains {
        ops.extend(
            c.rules
                .iter()
                .map(|rule| Op::AddRule(name.clone(), rule.clone())),
        );
    }
    for (set, elements) in &r.elements {
        ops.extend(
            elements
                .iter()
                .map(|e| Op::AddElement(set.clone(), e.clone())),
        );
    }
    ops
}

/// Elements by key (the last one added wins, as in a set).
fn by_key(elements: Option<&Vec<Element>>) -> BTreeMap<ElementKey, &Element> {
    elements.into_iter().flatten().map(|e| (e.key, e)).collect()
}

/// The operations from `old` to `new`, ordered so that nothing is referred to before it
/// exists or deleted while something still refers to it: new sets and chains, then chains
/// refilled (flush, add rules), then element changes, then chains and sets that went away.
fn diff(old: &Ruleset, new: &Ruleset) -> Vec<Op> {
    let mut ops = Vec::new();
    let set_changed = |name: &String, s: &Set| old.sets.get(name) != Some(s);
    let mut replaced_sets = BTreeSet::new();
    for (name, s) in &new.sets {
        if old.sets.contains_key(name) && set_changed(name, s) {
            // A set's type cannot change in place.
            replaced_sets.insert(name.clone());
        } else if !old.sets.contains_key(name) {
            ops.push(Op::AddSet(name.clone()));
        }
    }
    for name in new.chains.keys().filter(|c| !old.chains.contains_key(*c)) {
        ops.push(Op::AddChain(name.clone()));
    }
    for (name, c) in &new.chains {
        match old.chains.get(name) {
            Some(o) if o.rules == c.rules => {}
            Some(_) => {
                ops.push(Op::FlushChain(name.clone()));
                ops.extend(c.rules.iter().map(|r| Op::AddRule(name.clone(), r.clone())));
            }
            None => ops.extend(c.rules.iter().map(|r| Op::AddRule(name.clone(), r.clone()))),
        }
    }
    let names: BTreeSet<&String> = old.elements.keys().chain(new.elements.keys()).collect();
    for set in names {
        if replaced_sets.contains(set) || !new.sets.contains_key(set) {
            continue;
        }
        let (o, n) = (by_key(old.elements.get(set)), by_key(new.elements.get(set)));
        for (k, e) in &o {
            if n.get(k) != Some(e) {
                ops.push(Op::DeleteElement(set.clone(), *k));
            }
        }
        for (k, e) in &n {
            if o.get(k) != Some(e) {
                ops.push(Op::AddElement(set.clone(), (*e).clone()));
            }
        }
    }
    for name in old.chains.keys().filter(|c| !new.chains.contains_key(*c)) {
        // Whatever referred to it was flushed or deleted above.
        if !old.chains[name].rules.is_empty() {
            ops.push(Op::FlushChain(name.clone()));
        }
        ops.push(Op::DeleteChain(name.clone()));
    }
    for name in old.sets.keys().filter(|s| !new.sets.contains_key(*s)) {
        ops.push(Op::DeleteSet(name.clone()));
    }
    for name in &replaced_sets {
        ops.push(Op::DeleteSet(name.clone()));
        ops.push(Op::AddSet(name.clone()));
        for e in new.elements.get(name).into_iter().flatten() {
            ops.push(Op::AddElement(name.clone(), e.clone()));
        }
    }
    ops
}
