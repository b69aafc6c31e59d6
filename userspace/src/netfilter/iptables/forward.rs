//! The eBPF mode's half of kube-proxy's KUBE-FORWARD: on a host whose FORWARD policy is DROP
//! (Docker sets it), forwarded Service traffic must be accepted in the filter table's FORWARD
//! chain itself. An accept in kpr's own nftables table would not do: a packet passes netfilter
//! only if every base chain at the hook accepts it, and the DROP policy is iptables'.
//!
//! The chain `KPR-FORWARD` holds kube-proxy's rules ([`render::forward_rules`]): packets the tc
//! programs marked for masquerade, and established flows, are accepted. A prepended jump from
//! FORWARD reaches it, ensured with `iptables -C`/`-I` as kube-proxy ensures its jumps. It is
//! written in the node's iptables backend (iptables-nft or legacy, detected as the iptables mode
//! detects it). The other modes and `kpr cleanup` remove both
//! ([`crate::netfilter::cleanup::ebpf_forward_chain`]).

use std::process::Command;

use super::render::{self, JumpRule, Table};
use super::{ensure_jump, run, Backend, IptablesError, Tools};
use crate::model::Family;

/// The eBPF mode's chain in the filter table.
pub const CHAIN: &str = "KPR-FORWARD";

/// The jump from FORWARD into [`CHAIN`] (`crate::netfilter::cleanup` removes both).
pub const JUMP: JumpRule = JumpRule {
    table: Table::Filter,
    from: "FORWARD",
    to: CHAIN,
    comment: "kpr forwarding rules",
    ctstate_new: false,
};

/// What the eBPF mode keeps in FORWARD.
#[derive(Clone, Debug)]
pub struct ForwardAccept {
    backend: Backend,
    /// The masquerade mark, as iptables spells it (`0x00004000`).
    mark: String,
    /// `--conntrack-tcp-be-liberal`: no INVALID drop.
    liberal: bool,
}

impl ForwardAccept {
    pub fn new(backend: Backend, mark: u32, liberal: bool) -> ForwardAccept {
        ForwardAccept {
            backend,
            mark: format!("{mark:#010x}"),
            liberal,
        }
    }

    /// Whether this backend's tools are installed (the container image has none: its agent
    /// cannot write iptables rules at all).
    pub fn tools_installed(&self) -> bool {
        let tool = self.backend.command("iptables-restore");
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(&tool).is_file()))
    }

    /// The restore input: the chain declared (created, or flushed) and filled.
    pub fn restore_input(&self) -> String {
        let mut text = format!("*filter\n:{CHAIN} - [0:0]\n");
        for rule in render::forward_rules(CHAIN, &self.mark, self.liberal, false) {
            text.push_str(&rule);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        text
    }

    /// Writes the chain and ensures the jump into it. Idempotent.
    pub fn ensure(&self) -> Result<(), IptablesError> {
        let mut restore = Command::new(self.backend.command("iptables-restore"));
        restore.args(["-w", "5", "-W", "100000", "--noflush"]);
        run(restore, Some(self.restore_input().as_bytes()))?;
        let tools = Tools {
            backend: self.backend,
            family: Family::V4,
        };
        ensure_jump(tools, &JUMP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_holds_kube_proxys_forward_rules() {
        let f = ForwardAccept::new(Backend::Nft, 0x4000, false);
        assert_eq!(
            f.restore_input(),
            "*filter\n:KPR-FORWARD - [0:0]\n\
             -A KPR-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
             -A KPR-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x00004000/0x00004000 -j ACCEPT\n\
             -A KPR-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
             COMMIT\n"
        );
        let liberal = ForwardAccept::new(Backend::Nft, 0x4000, true).restore_input();
        assert!(!liberal.contains("INVALID"), "{liberal}");
    }
}
