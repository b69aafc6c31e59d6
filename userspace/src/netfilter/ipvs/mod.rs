//! `--proxy-mode ipvs`: kube-proxy's IPVS mode (pkg/proxy/ipvs), for nodes migrating from it.
//! kube-proxy deprecated the mode (KEP-5495); kpr keeps it as a migration path.
//!
//! Each sync applies [`write::IpvsRules`] for each family: the service addresses on the
//! `kube-ipvs0` dummy device (`ip`), the ipsets (one `ipset restore`, each set rewritten
//! whole), the iptables rules that match them (`iptables-restore --noflush`), and the virtual
//! and real servers through IPVS generic netlink ([`crate::ipvs`]), against what the kernel
//! holds (so a restart or a failed sync converges). A real server that leaves is drained first
//! (weight 0) and deleted once its connections are gone, kube-proxy's graceful termination;
//! UDP ones go at once, as kube-proxy's do.

pub mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use crate::dataplane::{Dataplane, DataplaneError, ModeMetrics, SyncReport};
use crate::ipvs::{Ipvs, IpvsError, RealServer, Timeouts, VirtualServer};
use crate::model::{DesiredState, Family, Protocol};
use crate::netfilter::iptables::Backend;
use crate::netfilter::plan::{self, PlanConfig};

use self::write::{IpvsRules, DUMMY_DEVICE, JUMP_RULES};

/// Errors of the IPVS mode.
#[derive(Debug, thiserror::Error)]
pub enum IpvsModeError {
    #[error(transparent)]
    Ipvs(#[from] IpvsError),
    /// A tool (`ip`, `ipset`, `iptables-restore`) failed.
    #[error("{what}: {detail}")]
    Tool { what: String, detail: String },
}

/// The mode's node-wide settings beyond the planner's.
#[derive(Clone, Debug, Default)]
pub struct IpvsConfig {
    pub scheduler: String,
    pub exclude_cidrs: Vec<IpNet>,
    pub strict_arp: bool,
    /// In seconds; 0 leaves the kernel's.
    pub timeouts: (u32, u32, u32),
}

/// `--proxy-mode ipvs` for one family.
pub struct IpvsDataplane {
    plan_cfg: PlanConfig,
    cfg: IpvsConfig,
    ipvs: Ipvs,
    backend: Backend,
    conntrack: crate::netfilter::conntrack::StaleFlows,
    metrics: ModeMetrics,
    /// Other modes' leftovers and the node set-up (sysctls, device, timeouts) were done.
    prepared: bool,
    /// What the last successful sync applied: a partial sync runs the tools (each start of
    /// iptables-nft reads the whole ruleset; in a VM without KVM a sync of them took 8 s)
    /// only for what changed. Full syncs apply everything again.
    applied: Option<IpvsRules>,
}

impl IpvsDataplane {
    /// Opens IPVS in the calling thread's namespace: fails with [`IpvsError::NotAvailable`]
    /// (naming the `ip_vs` module) on a kernel without it.
    pub fn new(plan_cfg: PlanConfig, cfg: IpvsConfig) -> Result<Self, IpvsModeError> {
        let ipvs = Ipvs::open()?;
        Ok(IpvsDataplane {
            conntrack: crate::netfilter::conntrack::StaleFlows::new(plan_cfg.family),
            plan_cfg,
            cfg,
            ipvs,
            backend: Backend::detect(),
            metrics: ModeMetrics {
                mode: "ipvs",
                ..Default::default()
            },
            prepared: false,
            applied: None,
        })
    }

    fn family(&self) -> Family {
        self.plan_cfg.family
    }

    /// Once per process: other modes' leftovers, the dummy device, sysctls, timeouts.
    fn prepare(&mut self) -> Result<(), IpvsModeError> {
        if self.family() == Family::V4 {
            crate::netfilter::cleanup::other_modes(crate::netfilter::cleanup::Leftovers::Ipvs);
        }
        // kube-proxy's: the dummy device stays down; its addresses are local all the same.
        let exists = Command::new("ip")
            .args(["link", "show", DUMMY_DEVICE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !exists {
            run(
                "creating kube-ipvs0",
                Command::new("ip").args(["link", "add", DUMMY_DEVICE, "type", "dummy"]),
                None,
            )?;
        }
        // kube-proxy's IPVS sysctls: conntrack for the masquerade rules, expiry so a removed
        // real server's flows move on. kube-proxy turns connection reuse handling off only
        // before 5.9, whose reuse handling delayed new connections by a second; from 5.9 on
        // it is left on, so that a new connection from a client port still in the table (SCTP
        // picks its ports at random: among 60 associations one repeats often enough) is
        // scheduled afresh instead of riding the old entry.
        let old_kernel = aya::util::KernelVersion::current()
            .is_ok_and(|v| v < aya::util::KernelVersion::new(5, 9, 0));
        let mut sysctls = vec![
            ("net/ipv4/vs/conntrack", "1"),
            ("net/ipv4/vs/expire_nodest_conn", "1"),
            ("net/ipv4/vs/expire_quiescent_template", "1"),
            ("net/ipv4/ip_forward", "1"),
        ];
        if old_kernel {
            sysctls.push(("net/ipv4/vs/conn_reuse_mode", "0"));
        }
        if self.cfg.strict_arp {
            sysctls.push(("net/ipv4/conf/all/arp_ignore", "1"));
            sysctls.push(("net/ipv4/conf/all/arp_announce", "2"));
        }
        for (name, value) in sysctls {
            if let Err(e) = std::fs::write(format!("/proc/sys/{name}"), value) {
                tracing::warn!("setting {name}={value}: {e}");
            }
        }
        let (tcp, tcp_fin, udp) = self.cfg.timeouts;
        if tcp + tcp_fin + udp > 0 {
            self.ipvs.set_timeouts(&Timeouts { tcp, tcp_fin, udp })?;
        }
        self.prepared = true;
        Ok(())
    }

    fn apply(
        &mut self,
        rules: &IpvsRules,
        cfg: &PlanConfig,
        full: bool,
    ) -> Result<(usize, usize), IpvsModeError> {
        let (mut writes, mut deletes) = (0, 0);
        // What the last sync applied, unless this one is full (then everything is read back
        // or written again).
        let last = if full { None } else { self.applied.take() };
        // Addresses first: a virtual server's packets reach IPVS only once its address is
        // local.
        let have = match &last {
            Some(l) => l.addresses.clone(),
            None => dummy_addresses(self.family()),
        };
        let mut batch = String::new();
        for ip in rules.addresses.difference(&have) {
            batch.push_str(&format!(
                "address add {ip}/{} dev {DUMMY_DEVICE}\n",
                prefix(*ip)
            ));
            writes += 1;
        }
        if !batch.is_empty() {
            run(
                "adding service addresses to kube-ipvs0",
                Command::new("ip").args(["-batch", "-"]),
                Some(&batch),
            )?;
        }
        if last.as_ref().is_none_or(|l| l.sets != rules.sets) {
            run(
                "ipset restore",
                Command::new("ipset").arg("restore"),
                Some(&write::ipset_restore(&rules.sets, self.family())),
            )?;
        }
        if last.as_ref().is_none_or(|l| l.restore != rules.restore) {
            run(
                "iptables-restore",
                Command::new(self.tool("iptables-restore")).args(["-w", "5", "--noflush"]),
                Some(&rules.restore),
            )?;
        }
        if last.is_none() {
            self.ensure_jumps()?;
        }

        let current: BTreeMap<(Protocol, IpAddr, u16), VirtualServer> = self
            .ipvs
            .services()?
            .into_iter()
            .filter(|vs| vs.family() == self.family())
            .map(|vs| ((vs.protocol, vs.address, vs.port), vs))
            .collect();
        for (key, want) in &rules.servers {
            let mut vs = VirtualServer::new(key.0, key.1, key.2, &self.cfg.scheduler);
            vs.persistence_timeout = want.persistence_s;
            match current.get(key) {
                None => {
                    self.ipvs.add_service(&vs)?;
                    writes += 1;
                }
                Some(old)
                    if old.scheduler != vs.scheduler
                        || old.persistence_timeout != vs.persistence_timeout
                        || old.netmask != vs.netmask =>
                {
                    self.ipvs.update_service(&vs)?;
                    writes += 1;
                }
                Some(_) => {}
            }
            let (w, d) = self.apply_real_servers(&vs, &want.real_servers)?;
            writes += w;
            deletes += d;
        }
        // Virtual servers nothing wants: those on service addresses and NodePort addresses
        // kpr programs (others, and the excluded CIDRs, are someone else's, as kube-proxy
        // leaves them).
        let ours: BTreeSet<IpAddr> = have
            .iter()
            .chain(rules.addresses.iter())
            .chain(cfg.nodeport_ips.iter().flatten())
            .copied()
            .collect();
        for (key, vs) in &current {
            if rules.servers.contains_key(key)
                || !ours.contains(&vs.address)
                || self
                    .cfg
                    .exclude_cidrs
                    .iter()
                    .any(|c| c.contains(&vs.address))
            {
                continue;
            }
            match self.ipvs.delete_service(vs) {
                Ok(()) => deletes += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut batch = String::new();
        for ip in have.difference(&rules.addresses) {
            batch.push_str(&format!(
                "address del {ip}/{} dev {DUMMY_DEVICE}\n",
                prefix(*ip)
            ));
            deletes += 1;
        }
        if !batch.is_empty() {
            run(
                "removing service addresses from kube-ipvs0",
                Command::new("ip").args(["-batch", "-"]),
                Some(&batch),
            )?;
        }
        Ok((writes, deletes))
    }

    /// Makes `vs`'s real servers `want` (weight 1); the others are drained, then deleted.
    fn apply_real_servers(
        &self,
        vs: &VirtualServer,
        want: &[crate::model::Backend],
    ) -> Result<(usize, usize), IpvsModeError> {
        let (mut writes, mut deletes) = (0, 0);
        let have = self.ipvs.destinations(vs)?;
        let wanted: BTreeSet<(IpAddr, u16)> = want.iter().map(|b| (b.ip, b.port)).collect();
        for &(ip, port) in &wanted {
            match have.iter().find(|rs| rs.address == ip && rs.port == port) {
                None => {
                    self.ipvs
                        .add_destination(vs, &RealServer::new(ip, port, 1))?;
                    writes += 1;
                }
                Some(rs) if rs.weight != 1 => {
                    self.ipvs
                        .update_destination(vs, &RealServer::new(ip, port, 1))?;
                    writes += 1;
                }
                Some(_) => {}
            }
        }
        for rs in have
            .iter()
            .filter(|rs| !wanted.contains(&(rs.address, rs.port)))
        {
            let idle = rs.connections.active == 0 && rs.connections.inactive == 0;
            if vs.protocol == Protocol::Udp || idle {
                match self.ipvs.delete_destination(vs, rs) {
                    Ok(()) => deletes += 1,
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            } else if rs.weight != 0 {
                // Graceful termination: no new connections, the current ones go on.
                self.ipvs
                    .update_destination(vs, &RealServer::new(rs.address, rs.port, 0))?;
                writes += 1;
            }
        }
        Ok((writes, deletes))
    }

    fn tool(&self, name: &str) -> String {
        let cmd = self.backend.command(name);
        match self.family() {
            Family::V4 => cmd,
            Family::V6 => cmd.replacen("iptables", "ip6tables", 1),
        }
    }

    /// The jumps from the built-in chains, inserted first unless there.
    fn ensure_jumps(&self) -> Result<(), IpvsModeError> {
        for j in JUMP_RULES {
            let table = j.table.name();
            let check = Command::new(self.tool("iptables"))
                .args(["-w", "5", "-t", table, "-C", j.from])
                .args(j.args())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !check {
                run(
                    &format!("iptables -t {table} -I {} -j {}", j.from, j.to),
                    Command::new(self.tool("iptables"))
                        .args(["-w", "5", "-t", table, "-I", j.from])
                        .args(j.args()),
                    None,
                )?;
            }
        }
        Ok(())
    }
}

impl Dataplane for IpvsDataplane {
    fn sync(&mut self, desired: &DesiredState, full: bool) -> Result<SyncReport, DataplaneError> {
        if !self.prepared {
            self.prepare()?;
        }
        let cfg = self.plan_cfg.for_state(desired, true);
        let plan = plan::plan(desired, &cfg);
        let rules = write::write(&plan, &cfg);
        let (writes, deletes) = match self.apply(&rules, &cfg, full) {
            Ok(r) => r,
            Err(e) => {
                // `applied` stays empty: the next sync writes everything again.
                self.metrics.restore_failures += 1;
                return Err(e.into());
            }
        };
        self.applied = Some(rules);
        self.conntrack.cleanup(desired);
        Ok(crate::netfilter::sync_report(
            desired, &cfg, writes, deletes,
        ))
    }

    fn mode_metrics(&self) -> ModeMetrics {
        self.metrics.clone()
    }
}

/// The addresses of `family` on kube-ipvs0.
fn dummy_addresses(family: Family) -> BTreeSet<IpAddr> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "dev", DUMMY_DEVICE])
        .stderr(Stdio::null())
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    parse_addresses(&text)
        .into_iter()
        .filter(|ip| Family::of(*ip) == family)
        .collect()
}

/// The addresses of `ip -o addr show` lines (`... inet 10.96.0.1/32 scope global ...`).
fn parse_addresses(text: &str) -> BTreeSet<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            f.find(|w| *w == "inet" || *w == "inet6")?;
            f.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

fn prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// Runs `cmd` with `stdin`, failing with its output if it fails.
fn run(what: &str, cmd: &mut Command, stdin: Option<&str>) -> Result<(), IpvsModeError> {
    let tool = |detail: String| IpvsModeError::Tool {
        what: what.to_string(),
        detail,
    };
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool(e.to_string()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| tool(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| tool(e.to_string()))?;
    if !out.status.success() {
        return Err(tool(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Removes what the IPVS mode leaves on a node: the dummy device (with the addresses), the
/// virtual servers (where IPVS exists) and kube-proxy's ipsets; its iptables chains are
/// kube-proxy's and go with them. What went is returned for the report.
pub fn cleanup() -> Vec<String> {
    let mut removed = Vec::new();
    if Command::new("ip")
        .args(["link", "del", DUMMY_DEVICE])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        removed.push(format!("device {DUMMY_DEVICE}"));
    }
    if let Ok(ipvs) = Ipvs::open() {
        if ipvs.services().is_ok_and(|s| !s.is_empty()) && ipvs.flush().is_ok() {
            removed.push("IPVS virtual servers".into());
        }
    }
    let sets = Command::new("ipset")
        .args(["list", "-n"])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for set in sets.lines().filter(|s| s.starts_with("KUBE-")) {
        if Command::new("ipset")
            .args(["destroy", set])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            removed.push(format!("ipset {set}"));
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_from_ip_o_addr() {
        let text = "9: kube-ipvs0    inet 10.96.0.1/32 scope global kube-ipvs0\\       valid_lft forever preferred_lft forever\n\
                    9: kube-ipvs0    inet6 fd00:10:96::1/128 scope global \\       valid_lft forever preferred_lft forever\n";
        let got = parse_addresses(text);
        assert_eq!(got.len(), 2);
        assert!(got.contains(&"10.96.0.1".parse::<IpAddr>().unwrap()));
    }
}
