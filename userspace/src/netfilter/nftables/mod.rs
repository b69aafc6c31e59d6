//! `--proxy-mode nftables`: kube-proxy's nftables ruleset, sent as one netlink transaction.

pub mod netlink;
pub mod ruleset;
pub mod sync;
pub mod write;

use std::time::Instant;

use crate::dataplane::{Dataplane, DataplaneError, ModeMetrics, SyncReport};
use crate::model::DesiredState;
use crate::netfilter::nfnetlink::NetlinkError;

use self::netlink::Encoder;
use self::sync::NftSyncer;

/// Errors of the nftables mode.
#[derive(Debug, thiserror::Error)]
pub enum NftablesError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// `--proxy-mode nftables`: kube-proxy's `table ip kube-proxy`, programmed through netlink in
/// the agent's network namespace, one transaction per sync. A failed transaction changes
/// nothing (the kernel applies all of it or none), fails the sync, and the runner's full
/// resync replaces the table.
pub struct NftablesDataplane {
    syncer: NftSyncer,
    metrics: ModeMetrics,
    /// The mode's own UDP conntrack cleanup; `None` in another mode's table (that mode has its
    /// own).
    conntrack: Option<crate::netfilter::conntrack::StaleFlows>,
    /// The table written: kube-proxy's, or the eBPF mode's SCTP table.
    table: &'static str,
    /// Other modes' leftovers were removed (at the first sync); `true` from the start in
    /// another mode's table (that mode removes them).
    cleaned: bool,
}

impl NftablesDataplane {
    /// `--proxy-mode nftables`: kube-proxy's table.
    pub fn new(syncer: NftSyncer) -> Self {
        let conntrack = crate::netfilter::conntrack::StaleFlows::new(syncer.plan_cfg.family);
        NftablesDataplane {
            conntrack: Some(conntrack),
            table: self::ruleset::TABLE,
            cleaned: false,
            ..NftablesDataplane::in_table(syncer, self::ruleset::TABLE)
        }
    }

    /// kube-proxy's ruleset for the ports `syncer` plans, in the table `table` of another
    /// mode, which owns it (the eBPF mode's SCTP ports: see `ebpf::sctp`).
    pub fn in_table(syncer: NftSyncer, table: &'static str) -> Self {
        NftablesDataplane {
            syncer,
            metrics: ModeMetrics {
                mode: "nftables",
                ..Default::default()
            },
            conntrack: None,
            table,
            cleaned: true,
        }
    }
}

impl Dataplane for NftablesDataplane {
    fn sync(&mut self, desired: &DesiredState, full: bool) -> Result<SyncReport, DataplaneError> {
        if !std::mem::replace(&mut self.cleaned, true) {
            crate::netfilter::cleanup::other_modes(crate::netfilter::cleanup::Leftovers::Nftables);
        }
        let full = full || self.syncer.needs_full();
        let prepared = self.syncer.prepare(desired, full, Instant::now());
        let (writes, deletes) = prepared.ops.iter().fold((0, 0), |(w, d), op| match op {
            sync::Op::DeleteChain(_) | sync::Op::DeleteSet(_) | sync::Op::DeleteElement(..) => {
                (w, d + 1)
            }
            _ => (w + 1, d),
        });
        let txn = Encoder::for_table(&prepared.target, self.table).encode(&prepared.ops);
        if let Err(e) = txn.commit() {
            self.metrics.restore_failures += 1;
            if !full {
                self.metrics.partial_restore_failures += 1;
            }
            self.syncer.reset();
            return Err(NftablesError::from(e).into());
        }
        let target = self.syncer.commit(prepared);
        self.metrics.nftables_objects = vec![
            ("chains", target.chains.len() as u64),
            (
                "rules",
                target.chains.values().map(|c| c.rules.len() as u64).sum(),
            ),
            ("sets", target.sets.len() as u64),
            (
                "elements",
                target.elements.values().map(|e| e.len() as u64).sum(),
            ),
        ];
        let family = self.syncer.plan_cfg.family.label();
        self.metrics.nftables_objects_by_family = self
            .metrics
            .nftables_objects
            .iter()
            .map(|&(kind, n)| (kind, family, n))
            .collect();
        if let Some(conntrack) = &mut self.conntrack {
            conntrack.cleanup(desired);
        }
        Ok(crate::netfilter::sync_report(
            desired,
            &self.syncer.plan_cfg,
            writes,
            deletes,
        ))
    }

    fn mode_metrics(&self) -> ModeMetrics {
        self.metrics.clone()
    }
}
