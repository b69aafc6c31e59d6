//! SCTP Services in the eBPF mode: served by kube-proxy's nftables ruleset for the SCTP
//! service ports only, in kpr's own tables `ip kpr-sctp` and `ip6 kpr-sctp`.
//!
//! Why not the programs: the tc path would have to rewrite addresses under SCTP's CRC32c
//! checksum, which covers the whole packet and has no incremental helper (unlike the TCP and
//! UDP checksums), and an SCTP association may use several addresses (multi-homing) that a
//! per-packet translation of one of them does not follow; the socket hooks would see only
//! the connect() of the first address. Netfilter's NAT handles both (it recomputes
//! the checksum, and its SCTP conntrack follows the association), so kpr's SCTP frontends
//! are translated there — with the very planner and writer of `--proxy-mode nftables`, so
//! their semantics (policies, affinity, source ranges, no-endpoint reject) are that mode's.
//! The eBPF maps hold no SCTP frontend (`sync::LbSyncer` skips them).
//!
//! The tables belong to the eBPF mode: they are written inside its sync (a failure fails the
//! sync), deleted when no SCTP service port is left, and removed with the mode's other state
//! by `kpr cleanup` and by the other modes' start.

use crate::dataplane::{Dataplane, DataplaneError};
use crate::model::{DesiredState, Protocol};
use crate::netfilter::nftables::{sync::NftSyncer, write::NftablesConfig, NftablesDataplane};
use crate::netfilter::plan::PlanConfig;

/// The tables' name (in families `ip` and `ip6`).
pub const TABLE: &std::ffi::CStr = c"kpr-sctp";
const TABLE_NAME: &str = "kpr-sctp";

/// What the SCTP rules need to know of the node: the netfilter planner's settings, per
/// family the node proxies.
#[derive(Clone, Debug)]
pub struct SctpConfig {
    pub plans: Vec<PlanConfig>,
    /// `--nodeport-addresses` was given.
    pub nodeport_addresses_given: bool,
}

/// The eBPF mode's SCTP half.
pub struct SctpRules {
    /// One per family (concrete, unlike `PerFamily`'s, so the dataplane stays `Send`).
    rules: Vec<NftablesDataplane>,
    /// The tables exist (as far as this process knows).
    programmed: bool,
}

impl SctpRules {
    pub fn new(cfg: SctpConfig) -> SctpRules {
        let rules = cfg
            .plans
            .into_iter()
            .map(|mut plan| {
                plan.only_protocol = Some(Protocol::Sctp);
                let syncer = NftSyncer::new(
                    plan,
                    cfg.nodeport_addresses_given,
                    NftablesConfig::default(),
                );
                NftablesDataplane::in_table(syncer, TABLE_NAME)
            })
            .collect();
        SctpRules {
            rules,
            programmed: false,
        }
    }

    /// Programs the SCTP service ports of `desired`, or removes the tables when there is none
    /// (on a full sync also tables an earlier process left).
    pub fn sync(&mut self, desired: &DesiredState, full: bool) -> Result<(), DataplaneError> {
        if has_sctp_ports(desired) {
            // The first write replaces what an earlier process left.
            let full = full || !self.programmed;
            // Every family is written even when one fails; the first error is the sync's.
            let mut first_error = None;
            for rules in &mut self.rules {
                if let Err(e) = rules.sync(desired, full) {
                    first_error.get_or_insert(e);
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            self.programmed = true;
        } else if self.programmed || full {
            crate::netfilter::cleanup::delete_tables(TABLE)
                .map_err(crate::netfilter::nftables::NftablesError::from)?;
            self.programmed = false;
        }
        Ok(())
    }
}

/// Whether `desired` has SCTP service ports (which the maps do not hold).
pub fn has_sctp_ports(desired: &DesiredState) -> bool {
    desired
        .service_ports
        .iter()
        .any(|p| p.protocol == Protocol::Sctp)
}
