//! `--proxy-mode iptables`: kube-proxy's iptables rules, loaded with `iptables-restore
//! --noflush` in the agent's network namespace.
//!
//! As kube-proxy (since 1.26) does: a full sync rewrites every chain and ensures the jump rules
//! from the built-in chains; a partial sync rewrites the shared chains (KUBE-SERVICES,
//! KUBE-NODEPORTS, the filter table) and only the per-service-port chains of ports that changed.
//! Chains no longer used are flushed and deleted (in large clusters only once per sync period,
//! as kube-proxy: listing the table takes long there). A failed restore fails the sync, and
//! the runner's full resync follows. What is loaded leaves out, on partial syncs, the shared
//! chains that did not change ([`unchanged`]).

pub mod forward;
pub mod render;
pub mod unchanged;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::dataplane::{Dataplane, DataplaneError, ModeMetrics, SyncReport};
use crate::model::{DesiredState, Family, Protocol, ServicePortInfo, ServicePortName};
use crate::netfilter::plan::{plan_port, PlanConfig, LARGE_CLUSTER_ENDPOINTS_THRESHOLD};

pub use render::{
    IptablesConfig, IptablesRules, JumpRule, PortRules, Table, WriteScope, JUMP_RULES,
};

/// Errors of the iptables mode.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Which iptables backend the node uses: kube-proxy must write its rules where kubelet and the
/// rest of the node's rules are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// iptables-nft: the nf_tables kernel API behind iptables' syntax (Debian's default).
    Nft,
    /// iptables-legacy: the x_tables kernel API.
    Legacy,
}

impl Backend {
    /// The command for `tool` (`iptables`, `iptables-save`, `iptables-restore`).
    pub fn command(self, tool: &str) -> String {
        let suffix = tool.strip_prefix("iptables").unwrap_or("");
        match self {
            Backend::Nft => format!("iptables-nft{suffix}"),
            Backend::Legacy => format!("iptables-legacy{suffix}"),
        }
    }

    /// Detects the backend as kube-proxy's image does (iptables-wrapper): the one where kubelet
    /// left its canary chains, else the one holding more rules, else nft.
    pub fn detect() -> Backend {
        let save =
            |b: Backend| crate::netfilter::quiet(&mut Command::new(b.command("iptables-save")));
        let (nft, legacy) = (save(Backend::Nft), save(Backend::Legacy));
        let hint = |s: &Option<String>| {
            s.as_deref().is_some_and(|s| {
                s.contains(":KUBE-IPTABLES-HINT") || s.contains(":KUBE-KUBELET-CANARY")
            })
        };
        let rules = |s: &Option<String>| {
            s.as_deref()
                .map_or(0, |s| s.lines().filter(|l| l.starts_with("-A ")).count())
        };
        match (nft.is_some(), legacy.is_some()) {
            (true, false) => Backend::Nft,
            (false, true) => Backend::Legacy,
            _ if hint(&nft) => Backend::Nft,
            _ if hint(&legacy) => Backend::Legacy,
            _ if rules(&legacy) > rules(&nft) => Backend::Legacy,
            _ => Backend::Nft,
        }
    }
}

/// The commands of one backend for one family: `iptables*` for IPv4, `ip6tables*` for IPv6
/// (kube-proxy runs one iptables proxier per family, each with its own tool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tools {
    pub backend: Backend,
    pub family: Family,
}

impl Tools {
    /// The command for `tool` (`iptables`, `iptables-save`, `iptables-restore`) in this
    /// family.
    pub fn command(self, tool: &str) -> String {
        let command = self.backend.command(tool);
        match self.family {
            Family::V4 => command,
            Family::V6 => command.replacen("iptables", "ip6tables", 1),
        }
    }

    /// Whether the tools run here (an IPv6 proxier needs `ip6tables` and a kernel with IPv6).
    pub fn work(self) -> bool {
        crate::netfilter::quiet(Command::new(self.command("iptables-save")).args(["-t", "nat"]))
            .is_some()
    }
}

/// Runs `cmd` with `stdin`, failing with its stderr.
pub(crate) fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Result<String, IptablesError> {
    let command = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| IptablesError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .map_err(|source| IptablesError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| IptablesError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `iptables <args>` on `table`, waiting for the xtables lock as kube-proxy does.
fn iptables(tools: Tools, table: Table, args: &[&str]) -> Result<String, IptablesError> {
    let mut cmd = Command::new(tools.command("iptables"));
    cmd.args(["-w", "5", "-W", "100000", "-t", table.name()])
        .args(args);
    run(cmd, None)
}

/// kube-proxy's `EnsureRule(Prepend, …)` for jump `j`: inserted first in its built-in chain
/// unless it is already there (`iptables -C`).
fn ensure_jump(tools: Tools, j: &JumpRule) -> Result<(), IptablesError> {
    let args = j.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut check = vec!["-C", j.from];
    check.extend(&args);
    if iptables(tools, j.table, &check).is_err() {
        let mut insert = vec!["-I", j.from];
        insert.extend(&args);
        iptables(tools, j.table, &insert)?;
    }
    Ok(())
}

/// kube-proxy's NewProxier: NodePorts on 127.0.0.1 need `route_localnet` (IPv4), in the network
/// namespace the agent programs. Done with the first sync, never before kpr has something to
/// program; a failure only costs localhost NodePorts.
fn set_route_localnet() {
    const SYSCTL: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";
    if std::fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    if let Err(e) = std::fs::write(SYSCTL, "1") {
        tracing::warn!(
            "setting net.ipv4.conf.all.route_localnet=1: {e}; NodePorts on localhost will not work"
        );
    }
}

/// The chain names declared in `iptables-save` output.
pub fn chains_in(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The iptables mode's memory between syncs, and the restore input of each sync: no I/O, so
/// that kube-proxy's multi-step tests run against it unchanged.
pub struct RuleSyncer {
    /// The node-wide settings; `node_ip` and `nodeport_ips` are refreshed from each desired
    /// state (they follow the Node object).
    pub plan_cfg: PlanConfig,
    /// `--nodeport-addresses` was given: NodePorts only on the node's matching addresses.
    pub nodeport_addresses_given: bool,
    pub ipt: IptablesConfig,
    /// The service ports as last programmed, to tell which changed (partial syncs), with the
    /// rules written for them: a port's rules depend only on it and the settings, so unchanged
    /// ports' rules are kept rather than planned and written again at every sync. Sorted by
    /// name and protocol: looked up without building keys.
    programmed: Vec<Programmed>,
    /// The settings the kept rules were written with.
    written_with: Option<(PlanConfig, IptablesConfig)>,
    /// The large-cluster mode of the last sync (a change rewrites every chain's comments).
    large: Option<bool>,
}

type Programmed = (Arc<ServicePortInfo>, Arc<PortRules>);

fn by_port(info: &ServicePortInfo) -> (&ServicePortName, Protocol) {
    (&info.name, info.protocol)
}

/// One sync's restore input and what committing it changes.
pub struct PreparedSync {
    pub rules: IptablesRules,
    pub full: bool,
    /// Service ports whose chains this input rewrites.
    pub rewritten: usize,
    programmed: Vec<Programmed>,
    written_with: (PlanConfig, IptablesConfig),
    large: bool,
}

impl RuleSyncer {
    pub fn new(plan_cfg: PlanConfig, nodeport_addresses_given: bool, ipt: IptablesConfig) -> Self {
        RuleSyncer {
            plan_cfg,
            nodeport_addresses_given,
            ipt,
            programmed: Vec::new(),
            written_with: None,
            large: None,
        }
    }

    /// Whether the next sync must be full (nothing programmed yet, or the last one failed).
    pub fn needs_full(&self) -> bool {
        self.large.is_none()
    }

    /// Whether the last sync was in kube-proxy's large-cluster mode.
    pub fn was_large(&self) -> bool {
        self.large == Some(true)
    }

    fn plan_cfg_for(&self, desired: &DesiredState) -> PlanConfig {
        self.plan_cfg
            .for_state(desired, self.nodeport_addresses_given)
    }

    /// What was last programmed for `info`'s port, whatever its state then.
    fn last(&self, info: &ServicePortInfo) -> Option<&Programmed> {
        self.programmed
            .binary_search_by(|(i, _)| by_port(i).cmp(&by_port(info)))
            .ok()
            .map(|at| &self.programmed[at])
    }

    /// The rules kept for `info`, if it is unchanged and they were written with `cfg`.
    fn kept(&self, info: &ServicePortInfo, reusable: bool) -> Option<&Programmed> {
        if !reusable {
            return None;
        }
        self.last(info).filter(|(i, _)| **i == *info)
    }

    fn reusable(&self, cfg: &PlanConfig) -> bool {
        self.written_with
            .as_ref()
            .is_some_and(|(c, i)| c == cfg && *i == self.ipt)
    }

    /// The restore input that brings the kernel from what was last committed to `desired`.
    /// `existing_nat_chains`: the nat table's chains now (kpr's stale ones among them are
    /// deleted); `None` skips the stale-chain cleanup (kube-proxy does so in large clusters
    /// between sync periods).
    pub fn prepare(
        &self,
        desired: &DesiredState,
        full: bool,
        existing_nat_chains: Option<&BTreeSet<String>>,
    ) -> PreparedSync {
        let cfg = self.plan_cfg_for(desired);
        // Each port is looked up (and compared) once: what was last programmed for it, if it
        // is unchanged; the others are planned once, here, for the large-cluster count too.
        let reusable = self.reusable(&cfg);
        let looked_up: Vec<(&ServicePortInfo, Result<&Programmed, _>)> = ports_of(desired, &cfg)
            .map(|info| match self.kept(info, reusable) {
                Some(p) => (info, Ok(p)),
                None => (info, Err(plan_port(info, &cfg))),
            })
            .collect();
        // kube-proxy's large-cluster mode: endpoints summed over every service port.
        let endpoints: usize = looked_up
            .iter()
            .map(|(_, l)| match l {
                Ok((_, r)) => r.endpoints,
                Err(plan) => plan.endpoints.len(),
            })
            .sum();
        let large = endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
        let full = full || self.large != Some(large);
        // A change of the large-cluster mode changes every port's rules (their comments).
        let mode_kept = self.large == Some(large);
        let mut programmed: Vec<Programmed> = Vec::new();
        let mut changed = Vec::new();
        for (info, l) in looked_up {
            // Kept: unchanged since the last sync. Not kept while the configuration is the
            // same: changed. Otherwise (every port's rules rendered anew) the last sync says.
            let changed_port = match &l {
                Ok(_) => false,
                Err(_) if reusable => true,
                Err(_) => self.last(info).is_none_or(|(i, _)| **i != *info),
            };
            let entry = match l {
                Ok((i, r)) if mode_kept => (i.clone(), r.clone()),
                Ok(_) => (
                    Arc::new(info.clone()),
                    Arc::new(render::port_rules(
                        &plan_port(info, &cfg),
                        &cfg,
                        &self.ipt,
                        large,
                    )),
                ),
                Err(plan) => (
                    Arc::new(info.clone()),
                    Arc::new(render::port_rules(&plan, &cfg, &self.ipt, large)),
                ),
            };
            changed.push(full || changed_port);
            programmed.push(entry);
        }
        let rewritten = changed.iter().filter(|c| **c).count();
        let refs: Vec<(&PortRules, bool)> = programmed
            .iter()
            .zip(&changed)
            .map(|((_, r), c)| (&**r, *c))
            .collect();
        let rules = render::assemble(&refs, &cfg, &self.ipt, existing_nat_chains);
        drop(refs);
        programmed.sort_by(|(a, _), (b, _)| by_port(a).cmp(&by_port(b)));
        PreparedSync {
            rules,
            full,
            rewritten,
            programmed,
            written_with: (cfg, self.ipt.clone()),
            large,
        }
    }

    /// The prepared input was loaded.
    pub fn commit(&mut self, prepared: PreparedSync) -> IptablesRules {
        self.programmed = prepared.programmed;
        self.written_with = Some(prepared.written_with);
        self.large = Some(prepared.large);
        prepared.rules
    }

    /// Loading failed: what the kernel holds is unknown, so the next sync rewrites everything.
    pub fn reset(&mut self) {
        self.programmed.clear();
        self.written_with = None;
        self.large = None;
    }
}

/// `desired`'s service ports of `cfg`'s family, in the plan's order.
fn ports_of<'a>(
    desired: &'a DesiredState,
    cfg: &PlanConfig,
) -> impl Iterator<Item = &'a ServicePortInfo> {
    let cfg = cfg.clone();
    desired.service_ports.iter().filter(move |p| cfg.serves(p))
}

/// The iptables mode.
pub struct IptablesDataplane {
    tools: Tools,
    syncer: RuleSyncer,
    metrics: ModeMetrics,
    /// Endpoints of UDP service ports as last programmed, for the conntrack cleanup.
    conntrack: crate::netfilter::conntrack::StaleFlows,
    last_counters: std::sync::Mutex<Vec<(&'static str, u64)>>,
    /// Other modes' leftovers were removed (at the first sync).
    cleaned: bool,
    /// The chains' rules as last loaded, so that partial syncs leave out unchanged ones.
    loaded: unchanged::LoadedChains,
    /// When stale chains were last looked for (`iptables-save`), and how often to in large
    /// clusters (kube-proxy: every `--sync-period`).
    last_stale_cleanup: Option<std::time::Instant>,
    pub stale_cleanup_period: std::time::Duration,
}

impl IptablesDataplane {
    /// The mode for `syncer`'s family, with `backend`'s tools of that family.
    pub fn new(backend: Backend, syncer: RuleSyncer) -> Self {
        let family = syncer.plan_cfg.family;
        IptablesDataplane {
            tools: Tools { backend, family },
            syncer,
            metrics: ModeMetrics {
                mode: "iptables",
                ..Default::default()
            },
            conntrack: crate::netfilter::conntrack::StaleFlows::new(family),
            last_counters: std::sync::Mutex::new(refusal_counters("")),
            cleaned: false,
            loaded: Default::default(),
            last_stale_cleanup: None,
            stale_cleanup_period: std::time::Duration::from_secs(30),
        }
    }

    /// kube-proxy's `EnsureChain` + `EnsureRule(Prepend, …)` for every jump rule.
    fn ensure_jumps(&self) -> Result<(), IptablesError> {
        for j in JUMP_RULES {
            let existing = chains_in(&self.save(j.table)?);
            if !existing.contains(j.to) {
                iptables(self.tools, j.table, &["-N", j.to])?;
            }
            ensure_jump(self.tools, j)?;
        }
        Ok(())
    }

    fn save(&self, table: Table) -> Result<String, IptablesError> {
        let mut cmd = Command::new(self.tools.command("iptables-save"));
        cmd.args(["-t", table.name()]);
        run(cmd, None)
    }

    fn restore(&self, input: &str) -> Result<(), IptablesError> {
        let mut cmd = Command::new(self.tools.command("iptables-restore"));
        cmd.args(["-w", "5", "-W", "100000", "--noflush", "--counters"]);
        run(cmd, Some(input.as_bytes())).map(|_| ())
    }
}

impl Dataplane for IptablesDataplane {
    fn sync(&mut self, desired: &DesiredState, full: bool) -> Result<SyncReport, DataplaneError> {
        if !std::mem::replace(&mut self.cleaned, true) {
            crate::netfilter::cleanup::other_modes(crate::netfilter::cleanup::Leftovers::Iptables);
        }
        let full = full || self.syncer.needs_full();
        // Whether the sync turned out full (the syncer also forces one when the large-cluster
        // mode changes), for the failure counters.
        let mut was_full = full;
        let result = (|| -> Result<(PreparedSync, unchanged::Reduced), IptablesError> {
            // kube-proxy: "iptables-save" can take several seconds on hosts with lots of
            // rules, so large clusters look for stale chains once per sync period only (they
            // are harmless: nothing jumps to them).
            let cleanup = full
                || !self.syncer.was_large()
                || self
                    .last_stale_cleanup
                    .is_none_or(|t| t.elapsed() >= self.stale_cleanup_period);
            let existing = if cleanup {
                Some(chains_in(&self.save(Table::Nat)?))
            } else {
                None
            };
            let t0 = std::time::Instant::now();
            let prepared = self.syncer.prepare(desired, full, existing.as_ref());
            was_full = prepared.full;
            let t1 = std::time::Instant::now();
            if prepared.full {
                if self.syncer.plan_cfg.localhost_nodeports
                    && self.syncer.plan_cfg.family == crate::model::Family::V4
                {
                    set_route_localnet();
                }
                self.ensure_jumps()?;
            }
            let reduced = self.loaded.reduce(&prepared.rules.text, prepared.full);
            let t2 = std::time::Instant::now();
            self.restore(&reduced.text)?;
            tracing::debug!(
                rules_ms = (t1 - t0).as_secs_f64() * 1e3,
                reduce_ms = (t2 - t1).as_secs_f64() * 1e3,
                restore_ms = t2.elapsed().as_secs_f64() * 1e3,
                bytes = reduced.text.len(),
                omitted_chains = reduced.omitted,
                "iptables sync"
            );
            if cleanup {
                self.last_stale_cleanup = Some(std::time::Instant::now());
            }
            Ok((prepared, reduced))
        })();
        let prepared = match result {
            Ok((p, reduced)) => {
                self.loaded.loaded(reduced);
                p
            }
            Err(e) => {
                self.metrics.restore_failures += 1;
                if !was_full {
                    self.metrics.partial_restore_failures += 1;
                }
                self.syncer.reset();
                self.loaded.forget();
                return Err(e.into());
            }
        };
        let writes = prepared.rewritten;
        let rules = self.syncer.commit(prepared);
        self.metrics.iptables_rules = vec![
            ("filter", rules.filter_rules as u64),
            ("nat", (rules.nat_rules + rules.nat_rules_skipped) as u64),
        ];
        let family = self.syncer.plan_cfg.family.label();
        self.metrics.iptables_rules_by_family = self
            .metrics
            .iptables_rules
            .iter()
            .map(|&(table, n)| (table, family, n))
            .collect();
        self.conntrack.cleanup(desired);
        Ok(crate::netfilter::sync_report(
            desired,
            &self.syncer.plan_cfg,
            writes,
            rules.deleted_chains,
        ))
    }

    fn mode_metrics(&self) -> ModeMetrics {
        self.metrics.clone()
    }

    /// Packets refused by kube-proxy's filter rules, by reason, from the rules' own counters.
    /// A failed read reports the last counts read (the counters never go back).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut last = self.last_counters.lock().unwrap_or_else(|e| e.into_inner());
        match self.save_counted(Table::Filter) {
            Ok(save) => *last = refusal_counters(&save),
            Err(e) => tracing::warn!("reading the filter table's rule counters: {e}"),
        }
        last.clone()
    }
}

impl IptablesDataplane {
    fn save_counted(&self, table: Table) -> Result<String, IptablesError> {
        let mut cmd = Command::new(self.tools.command("iptables-save"));
        cmd.args(["-c", "-t", table.name()]);
        run(cmd, None)
    }
}

/// The netfilter modes' refusal counters, named alike in both modes.
pub const REJECT_NO_ENDPOINTS: &str = "reject_no_endpoints";
pub const DROP_NO_LOCAL_ENDPOINTS: &str = "drop_no_local_endpoints";
pub const DROP_SOURCE_RANGE: &str = "drop_source_range";

/// Sums the packet counts of `iptables-save -c` rules by why they refuse: "has no endpoints"
/// REJECTs, "has no local endpoints" DROPs, and the firewall's source-range DROPs.
pub fn refusal_counters(save: &str) -> Vec<(&'static str, u64)> {
    let (mut reject, mut local, mut range) = (0, 0, 0);
    for line in save.lines() {
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((counts, rule)) = rest.split_once("] ") else {
            continue;
        };
        let packets: u64 = counts
            .split(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if rule.contains("has no endpoints") && rule.contains("-j REJECT") {
            reject += packets;
        } else if rule.contains("has no local endpoints") && rule.contains("-j DROP") {
            local += packets;
        } else if rule.starts_with("-A KUBE-PROXY-FIREWALL ") && rule.contains("-j DROP") {
            range += packets;
        }
    }
    vec![
        (REJECT_NO_ENDPOINTS, reject),
        (DROP_NO_LOCAL_ENDPOINTS, local),
        (DROP_SOURCE_RANGE, range),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_from_iptables_save() {
        let save = "*filter\n:KUBE-SERVICES - [0:0]\n\
            [3:180] -A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable\n\
            [2:120] -A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment \"ns2/svc2:p80 has no local endpoints\" -m addrtype --dst-type LOCAL -m tcp --dport 3001 -j DROP\n\
            [5:300] -A KUBE-PROXY-FIREWALL -d 5.6.7.8/32 -p tcp -m comment --comment \"ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C\" -m tcp --dport 80 -j DROP\n\
            [7:420] -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n";
        assert_eq!(
            refusal_counters(save),
            vec![
                (REJECT_NO_ENDPOINTS, 3),
                (DROP_NO_LOCAL_ENDPOINTS, 2),
                (DROP_SOURCE_RANGE, 5)
            ]
        );
        assert_eq!(
            chains_in(save),
            BTreeSet::from(["KUBE-SERVICES".to_string()])
        );
    }

    #[test]
    fn backend_commands() {
        assert_eq!(
            Backend::Nft.command("iptables-restore"),
            "iptables-nft-restore"
        );
        assert_eq!(Backend::Legacy.command("iptables"), "iptables-legacy");
    }
}
