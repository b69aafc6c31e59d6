//! The seam between the sync runner and the proxy modes.
//!
//! Every mode (`ebpf`, `iptables`, `nftables`) implements [`Dataplane`]. The runner and the
//! observers see only this trait, never which mode runs. A mode owns everything it programs on
//! the node (the eBPF mode its maps and its nftables table, the netfilter modes their tables),
//! so any failure to program it fails [`Dataplane::sync`], and the runner answers that with a
//! full resync.

use crate::model::DesiredState;

/// What a dataplane reports after a sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub frontends: usize,
    pub backends: usize,
    /// Objects written (map entries, rules, chains, set elements: each mode counts its own).
    pub writes: usize,
    pub deletes: usize,
    /// Service ports the dataplane refused because its tables are full (eBPF mode).
    pub refused: usize,
}

/// Entries in one of the dataplane's tables, and its capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapOccupancy {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Why a sync failed. Each variant is one mode's own error type.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("eBPF maps: {0}")]
    Ebpf(#[from] crate::ebpf::sync::SyncError),
    #[error("kpr's nftables table: {0}")]
    EbpfTable(#[from] crate::nft::NftError),
    #[error("attaching the tc programs: {0}")]
    EbpfDevices(String),
    #[error("iptables mode: {0}")]
    Iptables(#[from] crate::netfilter::iptables::IptablesError),
    #[error("nftables mode: {0}")]
    Nftables(#[from] crate::netfilter::nftables::NftablesError),
    #[error("ipvs mode: {0}")]
    Ipvs(#[from] crate::netfilter::ipvs::IpvsModeError),
}

/// A proxy mode.
pub trait Dataplane {
    /// Programs `desired`. With `full`, first re-reads what the dataplane actually holds and
    /// repairs any difference (the runner asks for that periodically and after a failure).
    fn sync(&mut self, desired: &DesiredState, full: bool) -> Result<SyncReport, DataplaneError>;

    /// Datapath counters (typed drop reasons and the like), by name.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// The Service ports (`namespace/name:port`) the last sync refused because the tables are
    /// full: not programmed, whatever the desired state says.
    fn refused(&self) -> Vec<String> {
        Vec::new()
    }

    /// How full the dataplane's tables are.
    fn occupancy(&self) -> Vec<MapOccupancy> {
        Vec::new()
    }

    /// Per-mode figures for kube-proxy's per-mode metrics (rules per table and the like).
    fn mode_metrics(&self) -> ModeMetrics {
        ModeMetrics::default()
    }
}

/// What a netfilter mode reports for kube-proxy's per-mode metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModeMetrics {
    /// `iptables` or `nftables` (empty for the eBPF mode, which has none of these).
    pub mode: &'static str,
    /// `kubeproxy_sync_proxy_rules_iptables_total{table}`: rules in each table after the last
    /// sync (iptables mode).
    pub iptables_rules: Vec<(&'static str, u64)>,
    /// The same per address family (`IPv4`, `IPv6`), for the metric's `ip_family` label.
    pub iptables_rules_by_family: Vec<(&'static str, &'static str, u64)>,
    /// `kubeproxy_sync_proxy_rules_nftables_objects{...}`-style totals (nftables mode): chains,
    /// rules, set and map elements.
    pub nftables_objects: Vec<(&'static str, u64)>,
    /// The same per address family (the `ip` and the `ip6` table).
    pub nftables_objects_by_family: Vec<(&'static str, &'static str, u64)>,
    /// Failed restores / transactions so far (`kubeproxy_iptables_restore_failures_total`).
    pub restore_failures: u64,
    /// Failed partial restores so far (`kubeproxy_iptables_partial_restore_failures_total`).
    pub partial_restore_failures: u64,
}
