//! Connected UDP sockets of both families, listed and destroyed through sock_diag (`NETLINK_SOCK_DIAG`),
//! in this network namespace or in others.
//!
//! The eBPF mode translates a connected UDP socket once, at connect(): when its backend leaves,
//! nothing moves it (kube-proxy deletes the flow's conntrack entry instead, and the next
//! datagram is balanced again). `SOCK_DESTROY` disconnects the socket: a receive fails
//! with `ECONNABORTED`, a send with `EDESTADDRREQ`, so the application reconnects and is
//! balanced again (Cilium does the same).
//!
//! UDP sockets can be destroyed this way since Linux 4.5, with `CONFIG_INET_DIAG_DESTROY`
//! (Debian's kernels have it); without it the kernel answers `EOPNOTSUPP`, and the agent warns
//! once and leaves such sockets alone. The other way, `bpf_sock_destroy()` from a UDP socket
//! iterator (Linux 6.5), needs no kernel option but is no better here: an iterator too walks
//! only the namespace it was created in. A sock_diag socket sees the namespace it was created
//! in, so pods' sockets are reached by entering each pod's namespace from a thread of its own.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::netlink::{NetlinkError, NetlinkSocket, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("sock_diag: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("sock_diag reply: {0}")]
    Malformed(&'static str),
    #[error("network namespace {0}: {1}")]
    Netns(PathBuf, io::Error),
}

/// One connected UDP socket, as sock_diag names it (the family and id destroy exactly this
/// socket). An IPv6 socket connected to an IPv4 address has a v4-mapped peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The kernel's socket cookie, as `bpf_get_socket_cookie` returns it.
    pub cookie: u64,
    family: u8,
    id: [u8; SOCKID_LEN],
}

impl UdpSocket {
    #[cfg(test)]
    pub(crate) fn for_test(cookie: u64, peer: SocketAddr) -> Self {
        Self {
            local: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
            peer,
            cookie,
            family: libc::AF_INET as u8,
            id: [0; SOCKID_LEN],
        }
    }
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const TCP_ESTABLISHED: u32 = 1;
/// `struct inet_diag_sockid`: sport, dport (be16), src, dst (4 × be32), if (u32), cookie (2 × u32).
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad (u8 each), states (u32), sockid.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans (u8 each), sockid, then five u32.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// A sock_diag socket in the calling thread's network namespace.
pub struct SockDiag {
    socket: NetlinkSocket,
}

impl SockDiag {
    pub fn open() -> Result<Self, SockDiagError> {
        Ok(Self {
            socket: NetlinkSocket::open(NETLINK_SOCK_DIAG)?,
        })
    }

    /// Every connected UDP socket of this namespace, of both families (an IPv6 dump only
    /// where the kernel has IPv6).
    pub fn connected_udp(&mut self) -> Result<Vec<UdpSocket>, SockDiagError> {
        let mut out = self.connected_udp_of(libc::AF_INET as u8)?;
        match self.connected_udp_of(libc::AF_INET6 as u8) {
            Ok(v6) => out.extend(v6),
            Err(SockDiagError::Netlink(NetlinkError::Kernel(
                libc::EAFNOSUPPORT | libc::ENOENT,
            ))) => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    }

    fn connected_udp_of(&mut self, family: u8) -> Result<Vec<UdpSocket>, SockDiagError> {
        let req = request(family, 1 << TCP_ESTABLISHED, &[0; SOCKID_LEN]);
        let mut out = Vec::new();
        let mut malformed = None;
        self.socket.request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            &req,
            |kind, payload| {
                if kind != SOCK_DIAG_BY_FAMILY {
                    return;
                }
                match parse_msg(payload) {
                    Ok(Some(s)) => out.push(s),
                    Ok(None) => {}
                    Err(e) => malformed = Some(e),
                }
            },
        )?;
        match malformed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Destroys `socket`: its next receive fails with ECONNABORTED, a send with EDESTADDRREQ.
    /// A socket that closed in the meantime is no error.
    pub fn destroy(&mut self, socket: &UdpSocket) -> Result<(), SockDiagError> {
        let req = request(socket.family, u32::MAX, &socket.id);
        match self
            .socket
            .request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req, |_, _| {})
        {
            Err(NetlinkError::Kernel(libc::ENOENT)) => Ok(()),
            r => Ok(r?),
        }
    }
}

fn request(family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> [u8; REQ_LEN] {
    let mut req = [0u8; REQ_LEN];
    req[0] = family;
    req[1] = libc::IPPROTO_UDP as u8;
    req[4..8].copy_from_slice(&states.to_ne_bytes());
    req[8..].copy_from_slice(id);
    req
}

fn parse_msg(payload: &[u8]) -> Result<Option<UdpSocket>, SockDiagError> {
    if payload.len() < MSG_LEN {
        return Err(SockDiagError::Malformed("inet_diag_msg"));
    }
    let family = payload[0];
    let mut id = [0u8; SOCKID_LEN];
    id.copy_from_slice(&payload[4..4 + SOCKID_LEN]);
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    // The sockid's addresses are 16 bytes each; IPv4 uses the first 4.
    let ip = |at: usize| -> IpAddr {
        if family == libc::AF_INET as u8 {
            Ipv4Addr::new(id[at], id[at + 1], id[at + 2], id[at + 3]).into()
        } else {
            let o: [u8; 16] = id[at..at + 16].try_into().unwrap();
            Ipv6Addr::from(o).into()
        }
    };
    if family != libc::AF_INET as u8 && family != libc::AF_INET6 as u8 {
        return Ok(None);
    }
    let word = |at: usize| u64::from(u32::from_ne_bytes(id[at..at + 4].try_into().unwrap()));
    Ok(Some(UdpSocket {
        local: SocketAddr::new(ip(4), port(0)),
        peer: SocketAddr::new(ip(20), port(2)),
        cookie: word(40) | word(44) << 32,
        family,
        id,
    }))
}

/// The named network namespaces in `dir` (`ip netns` and CRI runtimes keep pods' there),
/// sorted. A missing directory has none.
pub fn named_netns(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// Runs `f` in this thread's namespace (`None`) and then in each of `others` (each once,
/// skipping the calling thread's own), from a thread of its own, so that the caller's
/// namespace never changes. A namespace that cannot be entered (gone meanwhile, not a
/// namespace) is reported in the result and the walk goes on.
pub fn in_each_netns<T: Send>(
    others: &[PathBuf],
    mut f: impl FnMut(Option<&Path>, &mut SockDiag) -> Result<T, SockDiagError> + Send,
) -> Vec<(Option<PathBuf>, Result<T, SockDiagError>)> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let mut out = Vec::new();
                let mut seen = std::collections::HashSet::new();
                if let Ok(m) = std::fs::metadata("/proc/thread-self/ns/net") {
                    seen.insert(std::os::unix::fs::MetadataExt::ino(&m));
                }
                out.push((None, SockDiag::open().and_then(|mut d| f(None, &mut d))));
                for path in others {
                    let entered = (|| -> Result<bool, SockDiagError> {
                        let fail = |e| SockDiagError::Netns(path.clone(), e);
                        let file = std::fs::File::open(path).map_err(fail)?;
                        let ino =
                            std::os::unix::fs::MetadataExt::ino(&file.metadata().map_err(fail)?);
                        if !seen.insert(ino) {
                            return Ok(false);
                        }
                        // SAFETY: setns on this (scoped) thread only; it ends with the walk.
                        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(fail(io::Error::last_os_error()));
                        }
                        Ok(true)
                    })();
                    match entered {
                        Ok(false) => {}
                        Ok(true) => out.push((
                            Some(path.clone()),
                            SockDiag::open().and_then(|mut d| f(Some(path), &mut d)),
                        )),
                        Err(e) => out.push((Some(path.clone()), Err(e))),
                    }
                }
                out
            })
            .join()
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real connected UDP socket is listed with its cookie, and destroying it makes its next
    /// receive fail with ECONNABORTED (needs CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN).
    #[test]
    fn a_connected_udp_socket_is_listed_and_destroyed() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(peer.local_addr().unwrap()).unwrap();
        let local = s.local_addr().unwrap();
        let mut diag = SockDiag::open().unwrap();
        let all = diag.connected_udp().unwrap();
        let found = all
            .iter()
            .find(|x| x.local == local)
            .unwrap_or_else(|| panic!("{local} not among {all:?}"));
        assert_eq!(found.peer, peer.local_addr().unwrap());
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes a u64 into `cookie`.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                std::ptr::addr_of_mut!(cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(found.cookie, cookie);
        diag.destroy(found).unwrap();
        let mut buf = [0u8; 8];
        let err = s.recv(&mut buf).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        // Gone: destroying again is no error, and it is no longer listed.
        diag.destroy(found).unwrap();
        assert!(!diag
            .connected_udp()
            .unwrap()
            .iter()
            .any(|x| x.local == local));
    }

    /// The same for an IPv6 socket, and for one connected to a v4-mapped address (listed with
    /// its mapped peer).
    #[test]
    fn ipv6_connected_udp_sockets_are_listed_and_destroyed() {
        let mut diag = SockDiag::open().unwrap();
        for (bind, peer_bind) in [("[::1]:0", "[::1]:0"), ("[::]:0", "127.0.0.1:0")] {
            let peer = std::net::UdpSocket::bind(peer_bind).unwrap();
            let s = std::net::UdpSocket::bind(bind).unwrap();
            let to = match peer.local_addr().unwrap() {
                SocketAddr::V4(a) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
                v6 => v6,
            };
            s.connect(to).unwrap();
            let local = s.local_addr().unwrap();
            let all = diag.connected_udp().unwrap();
            let found = *all
                .iter()
                .find(|x| x.local.port() == local.port() && x.peer == to)
                .unwrap_or_else(|| panic!("{local} → {to} not among {all:?}"));
            diag.destroy(&found).unwrap();
            let err = s.recv(&mut [0u8; 8]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{to}: {err}");
        }
    }
}
