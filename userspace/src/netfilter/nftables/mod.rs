//! `--proxy-mode nftables`: kube-proxy's nftables ruleset, sent as one netlink transaction.

pub mod ruleset;
pub mod sync;
pub mod write;

/// Errors of the nftables mode.
#[derive(Debug, thiserror::Error)]
pub enum NftablesError {
    #[error("netlink: {0}")]
    Netlink(String),
}
