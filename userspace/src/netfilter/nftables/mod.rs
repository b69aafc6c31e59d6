//! `--proxy-mode nftables`: kube-proxy's nftables ruleset, sent as one netlink transaction.

/// Errors of the nftables mode.
#[derive(Debug, thiserror::Error)]
pub enum NftablesError {
    #[error("netlink: {0}")]
    Netlink(String),
}
