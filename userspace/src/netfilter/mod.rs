//! The netfilter proxy modes (`--proxy-mode iptables`, `--proxy-mode nftables`): kube-proxy's
//! own rules, from one planner and two writers.
//!
//! - [`plan`]: per service port, the decisions kube-proxy's proxiers take (which endpoints each
//!   traffic policy uses, which chains exist, what is rejected or dropped), computed once;
//! - [`chains`]: chain names, kube-proxy's hashes;
//! - [`iptables`]: the plan as `iptables-restore` input, and the mode that loads it;
//! - [`nftables`]: the plan as one nftables netlink transaction, and the mode that sends it;
//! - [`ipvs`]: the plan as kube-proxy's IPVS mode programs it (virtual servers, ipsets, the
//!   rules that match them), and the mode that applies it;
//! - [`families`]: one instance of a mode per address family, as kube-proxy's meta-proxier;
//! - [`cleanup`]: removing what other modes (and kube-proxy) left on the node;
//! - [`conntrack`]: deleting the conntrack entries of UDP endpoints that went away, so flows
//!   move on as they do with kube-proxy.

pub mod chains;
pub mod cleanup;
pub mod conntrack;
pub mod families;
pub mod iptables;
pub mod ipvs;
pub mod nfnetlink;
pub mod nftables;
pub mod plan;

use std::process::{Command, Stdio};

use crate::dataplane::SyncReport;
use crate::model::{DesiredState, Family};

/// A netfilter mode's sync report for the ports `cfg` serves: `writes` and `deletes` as the
/// mode counts them.
fn sync_report(
    desired: &DesiredState,
    cfg: &plan::PlanConfig,
    writes: usize,
    deletes: usize,
) -> SyncReport {
    SyncReport {
        frontends: desired
            .services
            .keys()
            .filter(|f| {
                Family::of(f.ip) == cfg.family && cfg.only_protocol.is_none_or(|p| p == f.protocol)
            })
            .count(),
        backends: desired
            .service_ports
            .iter()
            .filter(|p| cfg.serves(p))
            .map(|p| p.cluster_endpoints.len().max(p.local_endpoints.len()))
            .sum(),
        writes,
        deletes,
        refused: 0,
    }
}

/// `cmd`'s standard output if it succeeds; its errors are not the caller's business (a probe
/// of what the node has).
fn quiet(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
