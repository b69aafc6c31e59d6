//! IPVS (the kernel's IP Virtual Server) over generic netlink, as kube-proxy's IPVS mode
//! programs it through github.com/moby/ipvs: virtual servers, their real servers, the
//! connection timeouts. IPVS state belongs to a network namespace: an [`Ipvs`] programs the
//! one it was opened in.

mod attr;
mod client;
mod codec;
mod types;

use std::io;

pub use client::Ipvs;
pub use types::{
    Connections, Forward, RealServer, Timeouts, Version, VirtualServer, SCHED_NAME_MAX,
    SVC_F_ONEPACKET, SVC_F_SCHED1, SVC_F_SCHED2, SVC_F_SCHED3, SVC_F_SCHED_MH_FALLBACK,
    SVC_F_SCHED_MH_PORT, SVC_F_SCHED_SH_FALLBACK, SVC_F_SCHED_SH_PORT,
};

use crate::netlink::NetlinkError;

#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The generic netlink controller knows no "IPVS" family: the module is not loaded (or
    /// the kernel is built without it).
    #[error(
        "the kernel has no IPVS (generic netlink family \"IPVS\" not found): load the kernel \
         module ip_vs (modprobe ip_vs), or use a kernel built with CONFIG_IP_VS"
    )]
    NotAvailable,
    /// The socket failed (open, send, receive) during `op`.
    #[error("IPVS {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: NetlinkError,
    },
    /// The kernel refused `op` with this errno.
    #[error("IPVS {op}: {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { op: String, errno: i32 },
    /// A reply this code cannot read.
    #[error("IPVS reply: {0}")]
    Malformed(String),
    /// A request that would not make sense to send.
    #[error("IPVS: invalid {0}")]
    Invalid(String),
}

impl IpvsError {
    /// The errno of a refused request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            IpvsError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Adding what is already there.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// Changing what is not there: the kernel says ESRCH for a virtual server, ENOENT for a
    /// real server.
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ESRCH | libc::ENOENT))
    }
}
