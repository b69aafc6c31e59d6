//! What IPVS holds: virtual servers (services), their real servers (destinations), the
//! connection timeouts and the version, as kpr reads and writes them.

use std::fmt;
use std::net::IpAddr;

use crate::model::{Family, Protocol};

/// `IP_VS_SVC_F_PERSISTENT`: kept out of [`VirtualServer::flags`], which
/// [`VirtualServer::persistence_timeout`] stands for.
pub(super) const SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: the kernel's own bookkeeping, set on every service it lists.
pub(super) const SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_SVC_F_ONEPACKET`: schedule each UDP datagram on its own.
pub const SVC_F_ONEPACKET: u32 = 0x0004;
/// `IP_VS_SVC_F_SCHED1..3`: meaning depends on the scheduler (see the `SH_`/`MH_` names).
pub const SVC_F_SCHED1: u32 = 0x0008;
pub const SVC_F_SCHED2: u32 = 0x0010;
pub const SVC_F_SCHED3: u32 = 0x0020;
/// sh and mh: skip a real server of weight 0 (or overloaded) instead of failing.
pub const SVC_F_SCHED_SH_FALLBACK: u32 = SVC_F_SCHED1;
/// sh and mh: hash the client's port as well as its address.
pub const SVC_F_SCHED_SH_PORT: u32 = SVC_F_SCHED2;
pub const SVC_F_SCHED_MH_FALLBACK: u32 = SVC_F_SCHED1;
pub const SVC_F_SCHED_MH_PORT: u32 = SVC_F_SCHED2;

/// The longest scheduler name IPVS takes, without its NUL (`IP_VS_SCHEDNAME_MAXLEN - 1`).
pub const SCHED_NAME_MAX: usize = 15;

/// An IPVS virtual server: what clients connect to, identified by protocol, address and port.
/// Its family is its address's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VirtualServer {
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
    /// The scheduler's name: `rr`, `wrr`, `lc`, `sh`, `mh`, ... (the kernel loads
    /// `ip_vs_<name>` on first use).
    pub scheduler: String,
    /// Service flags ([`SVC_F_ONEPACKET`], the scheduler flags). Persistence is
    /// [`Self::persistence_timeout`], and the kernel's hashed flag is never shown or sent.
    pub flags: u32,
    /// Client persistence (session affinity) for this many seconds; `None` for none.
    pub persistence_timeout: Option<u32>,
    /// Clients whose addresses share this many leading bits share persistence: the full
    /// length (32 or 128) for per-client affinity. The kernel's netmask, as a prefix length.
    pub netmask: u32,
}

impl VirtualServer {
    /// A virtual server without persistence or flags, with a per-client netmask.
    pub fn new(protocol: Protocol, address: IpAddr, port: u16, scheduler: &str) -> Self {
        Self {
            protocol,
            address,
            port,
            scheduler: scheduler.to_string(),
            flags: 0,
            persistence_timeout: None,
            netmask: full_prefix(Family::of(address)),
        }
    }

    pub fn family(&self) -> Family {
        Family::of(self.address)
    }
}

impl fmt::Display for VirtualServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.protocol.as_lower(),
            std::net::SocketAddr::new(self.address, self.port)
        )
    }
}

pub(super) fn full_prefix(family: Family) -> u32 {
    match family {
        Family::V4 => 32,
        Family::V6 => 128,
    }
}

/// How IPVS sends a connection to a real server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Forward {
    /// NAT (`IP_VS_CONN_F_MASQ`), what kube-proxy uses.
    #[default]
    Masquerade,
    /// The real server is this host (`IP_VS_CONN_F_LOCALNODE`).
    Local,
    /// IP-in-IP tunnelling (`IP_VS_CONN_F_TUNNEL`).
    Tunnel,
    /// Direct routing (`IP_VS_CONN_F_DROUTE`).
    DirectRoute,
}

impl Forward {
    pub(super) const fn code(self) -> u32 {
        match self {
            Forward::Masquerade => 0,
            Forward::Local => 1,
            Forward::Tunnel => 2,
            Forward::DirectRoute => 3,
        }
    }

    pub(super) const fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Forward::Masquerade),
            1 => Some(Forward::Local),
            2 => Some(Forward::Tunnel),
            3 => Some(Forward::DirectRoute),
            _ => None,
        }
    }
}

/// Connections the kernel counts on a real server; read only (zero in what is written).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Connections {
    pub active: u32,
    pub inactive: u32,
    pub persistent: u32,
}

/// An IPVS real server (destination) of a virtual server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RealServer {
    pub address: IpAddr,
    pub port: u16,
    /// 0 sends it no new connections while its current ones go on (graceful termination).
    pub weight: u32,
    pub forward: Forward,
    /// Connection limits; 0 for none.
    pub upper_threshold: u32,
    pub lower_threshold: u32,
    /// As the kernel counts them when read; ignored when written.
    pub connections: Connections,
}

impl RealServer {
    /// A masqueraded real server without limits.
    pub fn new(address: IpAddr, port: u16, weight: u32) -> Self {
        Self {
            address,
            port,
            weight,
            forward: Forward::Masquerade,
            upper_threshold: 0,
            lower_threshold: 0,
            connections: Connections::default(),
        }
    }
}

impl fmt::Display for RealServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.address, self.port))
    }
}

/// IPVS's connection timeouts, in seconds. Written, 0 leaves a timeout as it is (the kernel's
/// rule).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

/// The kernel's IPVS version (1.2.1 for every kernel since 2.6.28).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
    pub patch: u8,
}

impl Version {
    pub(super) const fn from_code(code: u32) -> Self {
        Self {
            major: (code >> 16) as u8,
            minor: (code >> 8) as u8,
            patch: code as u8,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}
