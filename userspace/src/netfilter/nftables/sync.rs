//! The nftables mode's memory between syncs and the transaction of each: no I/O, so that
//! kube-proxy's multi-step tests run against it. A full sync replaces the table; an incremental
//! one adds, flushes and deletes only the chains, sets and elements that changed. As kube-proxy
//! does, a chain no service needs any more is first flushed and only deleted a while later, so
//! that a packet already on its way through it never meets a dangling jump.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::ruleset::{Chain, Element, ElementKey, Rule, Ruleset, Set};
use super::write::{port_fragment, write, NftablesConfig};
use crate::model::{DesiredState, Protocol, ServicePortInfo};
use crate::netfilter::plan::{plan, plan_port, PlanConfig};

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
    index: Index,
}

/// A service port by what names it in the table.
type PortKey = (String, Protocol);

fn key(p: &ServicePortInfo) -> PortKey {
    (p.name.to_string(), p.protocol)
}

/// What the programmed table was written from: enough to rewrite only what a change touches.
/// A port's part of the table is a function of its [`ServicePortInfo`] and the node-wide
/// settings alone ([`port_fragment`]), so keeping the inputs is enough to know the part.
#[derive(Default)]
struct Index {
    cfg: PlanConfig,
    ports: HashMap<PortKey, ServicePortInfo>,
    /// How many writers (the base ruleset, each port) put each element: a shared one (a
    /// ClusterIP in `cluster-ips`, once per port of its Service) stays while one still does.
    refs: HashMap<(String, ElementKey), usize>,
}

pub struct NftSyncer {
    pub plan_cfg: PlanConfig,
    /// `--nodeport-addresses` was given: NodePorts only on the node's matching addresses.
    pub nodeport_addresses_given: bool,
    pub nft: NftablesConfig,
    /// The table as last committed, and what it was written from.
    programmed: Option<(Ruleset, Index)>,
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

    /// The transaction from what was last committed to `desired`, at time `now`. Until the
    /// result is passed to [`Self::commit`], nothing counts as programmed (as after
    /// [`Self::reset`]).
    ///
    /// With the same node-wide settings as the last sync, only the service ports that changed
    /// are planned and written (a one-endpoint change costs the same at 10 or 10,000 Services);
    /// otherwise the whole table is written and compared.
    pub fn prepare(&mut self, desired: &DesiredState, full: bool, now: Instant) -> Prepared {
        let cfg = self.plan_cfg.for_state(desired, true);
        let programmed = self.programmed.take();
        let full = full || programmed.is_none();
        match programmed {
            Some((old, index)) if !full && index.cfg == cfg => {
                self.prepare_changes(old, index, desired, now)
            }
            old => self.prepare_whole(desired, cfg, old.map(|(r, _)| r), full, now),
        }
    }

    /// The whole table written, and compared with `old` (unless `full`: then replaced).
    fn prepare_whole(
        &self,
        desired: &DesiredState,
        cfg: PlanConfig,
        old: Option<Ruleset>,
        full: bool,
        now: Instant,
    ) -> Prepared {
        let plan = plan(desired, &cfg);
        let mut target = write(&plan, &cfg, &self.nft);
        let refs = dedup_elements(&mut target);
        let index = Index {
            ports: plan
                .ports
                .iter()
                .map(|p| (key(p.info), p.info.clone()))
                .collect(),
            cfg,
            refs,
        };

        let mut stale = BTreeMap::new();
        if let Some(old) = old.as_ref().filter(|_| !full) {
            for name in old.chains.keys() {
                if target.chains.contains_key(name) {
                    continue;
                }
                let since = self.stale.get(name).copied().unwrap_or(now);
                if now.saturating_duration_since(since) < STALE_CHAIN_DELAY {
                    target.chains.insert(name.clone(), empty_chain());
                    stale.insert(name.clone(), since);
                }
            }
        }
        let ops = match old.as_ref() {
            Some(old) if !full => diff(old, &target),
            _ => full_ops(&target),
        };
        Prepared {
            target,
            ops,
            full,
            stale,
            index,
        }
    }

    /// Only the ports that changed, applied to the table as last committed (`r`).
    fn prepare_changes(
        &self,
        mut r: Ruleset,
        mut index: Index,
        desired: &DesiredState,
        now: Instant,
    ) -> Prepared {
        let cfg = index.cfg.clone();
        // Each changed port's part of the table before and after.
        let mut before = Ruleset::new(cfg.family);
        let mut after = Ruleset::new(cfg.family);
        let mut seen: HashSet<PortKey> = HashSet::new();
        for info in desired.service_ports.iter().filter(|p| cfg.serves(p)) {
            let k = key(info);
            let old = index.ports.get(&k);
            if old != Some(info) {
                if let Some(old) = old {
                    merge(&mut before, port_fragment(&plan_port(old, &cfg), &cfg));
                }
                merge(&mut after, port_fragment(&plan_port(info, &cfg), &cfg));
                index.ports.insert(k.clone(), info.clone());
            }
            seen.insert(k);
        }
        let gone: Vec<PortKey> = index
            .ports
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(old) = index.ports.remove(&k) {
                merge(&mut before, port_fragment(&plan_port(&old, &cfg), &cfg));
            }
        }

        let mut ops = Vec::new();
        let mut stale = self.stale.clone();
        // New sets, then new chains, then refilled chains: what rules and elements refer to
        // exists before them.
        let mut replaced_sets = Vec::new();
        for (name, set) in &after.sets {
            match r.sets.get(name) {
                Some(s) if s == set => {}
                Some(_) => replaced_sets.push(name.clone()),
                None => ops.push(Op::AddSet(name.clone())),
            }
            r.sets.insert(name.clone(), set.clone());
        }
        for name in after.chains.keys().filter(|c| !r.chains.contains_key(*c)) {
            ops.push(Op::AddChain(name.clone()));
        }
        let still_written: HashSet<String> = after.chains.keys().cloned().collect();
        for (name, chain) in std::mem::take(&mut after.chains) {
            stale.remove(&name);
            match r.chains.get(&name) {
                Some(c) if c.rules == chain.rules => {}
                Some(_) => {
                    ops.push(Op::FlushChain(name.clone()));
                    ops.extend(
                        chain
                            .rules
                            .iter()
                            .map(|x| Op::AddRule(name.clone(), x.clone())),
                    );
                }
                None => ops.extend(
                    chain
                        .rules
                        .iter()
                        .map(|x| Op::AddRule(name.clone(), x.clone())),
                ),
            }
            r.chains.insert(name, chain);
        }
        // Chains nothing needs any more: flushed now, deleted once they have been stale long
        // enough (a packet on its way through one never meets a dangling jump).
        for name in before.chains.keys().filter(|c| !still_written.contains(*c)) {
            if let Some(c) = r.chains.get_mut(name) {
                if !c.rules.is_empty() {
                    ops.push(Op::FlushChain(name.clone()));
                }
                *c = empty_chain();
                stale.insert(name.clone(), now);
            }
        }

        // Elements: the changed ports' removed and added ones, shared ones counted.
        let mut touched: BTreeSet<(String, ElementKey)> = BTreeSet::new();
        // Every contribution counts, duplicates included: `before` and `after` merge several
        // ports, and two ports of one Service each put its ClusterIP in `cluster-ips`.
        for (set, elements) in &before.elements {
            for e in elements {
                let k = (set.clone(), e.key);
                if let Some(n) = index.refs.get_mut(&k) {
                    *n = n.saturating_sub(1);
                }
                touched.insert(k);
            }
        }
        let mut wanted: HashMap<(String, ElementKey), Element> = HashMap::new();
        for (set, elements) in &after.elements {
            for e in elements {
                let k = (set.clone(), e.key);
                *index.refs.entry(k.clone()).or_default() += 1;
                touched.insert(k.clone());
                wanted.insert(k, e.clone());
            }
        }
        let mut deletes = Vec::new();
        let mut adds = Vec::new();
        for k in touched {
            let (set, ek) = (&k.0, k.1);
            if !r.sets.contains_key(set) || replaced_sets.contains(set) {
                continue;
            }
            let list = r.elements.entry(set.clone()).or_default();
            let at = list.iter().position(|e| e.key == ek);
            let owners = index.refs.get(&k).copied().unwrap_or(0);
            if owners == 0 {
                index.refs.remove(&k);
                if let Some(i) = at {
                    list.remove(i);
                    deletes.push(Op::DeleteElement(set.clone(), ek));
                }
                continue;
            }
            // Still owned: by a changed port (its element wins) or only by unchanged writers
            // (whose element is the one already there).
            let Some(want) = wanted.remove(&k) else {
                continue;
            };
            match at {
                Some(i) if list[i] == want => {}
                Some(i) => {
                    deletes.push(Op::DeleteElement(set.clone(), ek));
                    adds.push(Op::AddElement(set.clone(), want.clone()));
                    list[i] = want;
                }
                None => {
                    adds.push(Op::AddElement(set.clone(), want.clone()));
                    list.push(want);
                }
            }
        }
        ops.extend(deletes);
        ops.extend(adds);

        // Stale chains whose time is up, then sets that went away (their rules are flushed).
        let expired: Vec<String> = stale
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= STALE_CHAIN_DELAY)
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            stale.remove(&name);
            if r.chains.remove(&name).is_some() {
                ops.push(Op::DeleteChain(name));
            }
        }
        for name in before.sets.keys().filter(|s| !after.sets.contains_key(*s)) {
            if r.sets.remove(name).is_some() {
                r.elements.remove(name);
                ops.push(Op::DeleteSet(name.clone()));
            }
        }
        replace_sets(&mut ops, &r, &replaced_sets);
        Prepared {
            target: r,
            ops,
            full: false,
            stale,
            index,
        }
    }

    /// The prepared transaction was committed.
    pub fn commit(&mut self, p: Prepared) -> &Ruleset {
        self.stale = p.stale;
        &self.programmed.insert((p.target, p.index)).0
    }

    /// The transaction failed: what the kernel holds is unknown, so the next sync replaces
    /// the table.
    pub fn reset(&mut self) {
        self.programmed = None;
        self.stale.clear();
    }
}

fn empty_chain() -> Chain {
    Chain {
        base: None,
        comment: None,
        rules: Vec::new(),
    }
}

/// Adds `part`'s chains, sets and elements to `into`.
fn merge(into: &mut Ruleset, part: Ruleset) {
    into.chains.extend(part.chains);
    into.sets.extend(part.sets);
    for (set, elements) in part.elements {
        into.elements.entry(set).or_default().extend(elements);
    }
}

/// `elements` with one element per key, the last one added winning (as in a set).
fn dedup(elements: &[Element]) -> Vec<&Element> {
    let mut seen: HashMap<ElementKey, usize> = HashMap::new();
    let mut out: Vec<&Element> = Vec::new();
    for e in elements {
        match seen.get(&e.key) {
            Some(&i) => out[i] = e,
            None => {
                seen.insert(e.key, out.len());
                out.push(e);
            }
        }
    }
    out
}

/// Keeps one element per key in every set of `r`, and returns how many writers put each.
fn dedup_elements(r: &mut Ruleset) -> HashMap<(String, ElementKey), usize> {
    let mut refs = HashMap::new();
    for (set, elements) in r.elements.iter_mut() {
        for e in elements.iter() {
            *refs.entry((set.clone(), e.key)).or_default() += 1;
        }
        *elements = dedup(elements).into_iter().cloned().collect();
    }
    refs
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
    let replaced_sets: Vec<String> = replaced_sets.into_iter().collect();
    replace_sets(&mut ops, new, &replaced_sets);
    ops
}

/// Sets whose definition changed (an affinity timeout) are deleted and added again, with
/// their elements. The kernel refuses to delete a set a rule still refers to (EBUSY), so the
/// chains whose rules refer to one are flushed first and refilled after it is back.
fn replace_sets(ops: &mut Vec<Op>, target: &Ruleset, replaced: &[String]) {
    if replaced.is_empty() {
        return;
    }
    let users: Vec<(&String, &Chain)> = target
        .chains
        .iter()
        .filter(|(_, c)| {
            c.rules
                .iter()
                .any(|r| replaced.iter().any(|s| r.uses_set(s)))
        })
        .collect();
    for (name, _) in &users {
        ops.push(Op::FlushChain((*name).clone()));
    }
    for name in replaced {
        ops.push(Op::DeleteSet(name.clone()));
        ops.push(Op::AddSet(name.clone()));
        for e in target.elements.get(name).into_iter().flatten() {
            ops.push(Op::AddElement(name.clone(), e.clone()));
        }
    }
    for (name, c) in users {
        ops.extend(c.rules.iter().map(|x| Op::AddRule(name.clone(), x.clone())));
    }
}
