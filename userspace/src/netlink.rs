//! A raw netlink socket for one request at a time (ctnetlink, sock_diag): send a request, read
//! its replies until the dump ends or the kernel acknowledges it.
//!
//! Both users need only this much of netlink, which is why there is no netlink crate here.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink send: {0}")]
    Send(#[source] io::Error),
    #[error("netlink receive: {0}")]
    Recv(#[source] io::Error),
    #[error("netlink: truncated message")]
    Truncated,
    /// The kernel refused the request with this errno.
    #[error("netlink: {}", io::Error::from_raw_os_error(*.0))]
    Kernel(i32),
}

pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;

pub struct NetlinkSocket {
    fd: OwnedFd,
    seq: Cell<u32>,
}

impl NetlinkSocket {
    /// A socket of netlink `protocol` (`NETLINK_NETFILTER`, `NETLINK_SOCK_DIAG`, ...) in the
    /// calling thread's network namespace, which it keeps.
    pub fn open(protocol: i32) -> Result<Self, NetlinkError> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            seq: Cell::new(0),
        })
    }

    /// Sends one request and calls `each(type, payload)` for every reply message, until the
    /// dump's end or the acknowledgement (with [`NLM_F_ACK`]) of this request.
    pub fn request(
        &self,
        kind: u16,
        flags: u16,
        payload: &[u8],
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<(), NetlinkError> {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        let len = NLMSG_HDRLEN + payload.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0, no groups).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and `to` outlive the call; the lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                std::ptr::addr_of!(to).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(NetlinkError::Send(io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Recv(e));
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let mseq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(NetlinkError::Truncated);
                }
                let body = &rest[NLMSG_HDRLEN..len];
                // Messages are 4-byte aligned.
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = body.get(0..4).ok_or(NetlinkError::Truncated)?;
                        return match i32::from_ne_bytes(code.try_into().unwrap()) {
                            0 => Ok(()),
                            e => Err(NetlinkError::Kernel(-e)),
                        };
                    }
                    _ => each(ty, body),
                }
            }
        }
    }
}
