//! The nfnetlink transport shared by kpr's nftables writers (the eBPF mode's own table and the
//! nftables proxy mode): libnftnl expressions built from raw attributes, and one batch (an
//! atomic nftables transaction) sent and acknowledged message by message.
use std::collections::BTreeSet;
use std::ffi::{c_void, CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;
use nftnl::{Batch, MsgType, NlMsg, Rule};

const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const NETLINK_CAP_ACK: libc::c_int = 10;

// Kernel constants (linux/netfilter/nf_tables.h, nf_nat.h, icmp.h), shared by both nftables
// writers.
pub(crate) const NFT_CMP_EQ: u32 = 0;
pub(crate) const NFT_META_L4PROTO: u32 = 16;
/// `enum nft_meta_keys`: the input interface's name (IFNAMSIZ bytes).
pub(crate) const NFT_META_IIFNAME: u32 = 6;
pub(crate) const NFT_META_MARK: u32 = 3;
pub(crate) const NFT_MSG_DELSETELEM: u16 = 14;
pub(crate) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub(crate) const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub(crate) const NFT_REJECT_ICMP_UNREACH: u32 = 0;
/// ICMP destination-unreachable code "port unreachable".
pub(crate) const ICMP_PORT_UNREACH: u8 = 3;
/// linux/netfilter/nf_nat.h: `fully-random`.
pub(crate) const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 1 << 4;
// nft's datatype numbers (nftables' `enum datatypes`) and how it composes a concatenation's
// type (`concat_subtype_add`: 6 bits per field): sets and maps carry them in their user data.
pub(crate) const TYPE_IPADDR: u32 = 7;
pub(crate) const TYPE_INET_PROTOCOL: u32 = 12;
pub(crate) const TYPE_INET_SERVICE: u32 = 13;
pub(crate) const TYPE_BITS: u32 = 6;

/// Errors of a transaction.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netfilter netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("sending the nftables transaction: {0}")]
    Send(#[source] io::Error),
    #[error("receiving the nftables acknowledgements: {0}")]
    Recv(#[source] io::Error),
    /// The kernel refused the transaction (nothing of it was applied). `errno` is the netlink
    /// error code (positive: ENOENT, EEXIST, EPERM, ...), `op` the message it answered.
    #[error("nftables refused {op}: {} (netlink error {errno})", io::Error::from_raw_os_error(*errno))]
    Kernel { op: String, errno: i32 },
    #[error("nftables transaction: {0}")]
    Protocol(String),
}

impl NetlinkError {
    /// The netlink (or socket) error code, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Socket(e) | NetlinkError::Send(e) | NetlinkError::Recv(e) => {
                e.raw_os_error()
            }
            NetlinkError::Protocol(_) => None,
        }
    }
}

impl Default for Transaction {
    fn default() -> Self {
        Self::new()
    }
}

/// A libnftnl expression by name and attributes (`NFTNL_EXPR_*`).
pub struct RawExpr {
    name: &'static CStr,
    attrs: Vec<(u32, Attr)>,
}

pub enum Attr {
    U8(u8),
    U32(u32),
    U64(u64),
    Str(CString),
    Data(Vec<u8>),
}

impl RawExpr {
    pub fn meta_load(key: u32, dreg: u32) -> RawExpr {
        RawExpr {
            name: c"meta",
            attrs: vec![
                (sys::NFTNL_EXPR_META_KEY, Attr::U32(key)),
                (sys::NFTNL_EXPR_META_DREG, Attr::U32(dreg)),
            ],
        }
    }

    pub fn meta_store(key: u32, sreg: u32) -> RawExpr {
        RawExpr {
            name: c"meta",
            attrs: vec![
                (sys::NFTNL_EXPR_META_KEY, Attr::U32(key)),
                (sys::NFTNL_EXPR_META_SREG, Attr::U32(sreg)),
            ],
        }
    }

    pub fn payload(base: u32, offset: u32, len: u32, dreg: u32) -> RawExpr {
        RawExpr {
            name: c"payload",
            attrs: vec![
                (sys::NFTNL_EXPR_PAYLOAD_BASE, Attr::U32(base)),
                (sys::NFTNL_EXPR_PAYLOAD_OFFSET, Attr::U32(offset)),
                (sys::NFTNL_EXPR_PAYLOAD_LEN, Attr::U32(len)),
                (sys::NFTNL_EXPR_PAYLOAD_DREG, Attr::U32(dreg)),
            ],
        }
    }

    /// `reg = (reg & mask) ^ xor`.
    pub fn bitwise(reg: u32, mask: &[u8], xor: &[u8]) -> RawExpr {
        debug_assert_eq!(mask.len(), xor.len());
        RawExpr {
            name: c"bitwise",
            attrs: vec![
                (sys::NFTNL_EXPR_BITWISE_SREG, Attr::U32(reg)),
                (sys::NFTNL_EXPR_BITWISE_DREG, Attr::U32(reg)),
                (sys::NFTNL_EXPR_BITWISE_LEN, Attr::U32(mask.len() as u32)),
                (sys::NFTNL_EXPR_BITWISE_MASK, Attr::Data(mask.to_vec())),
                (sys::NFTNL_EXPR_BITWISE_XOR, Attr::Data(xor.to_vec())),
            ],
        }
    }

    pub fn cmp_eq(sreg: u32, data: &[u8]) -> RawExpr {
        RawExpr {
            name: c"cmp",
            attrs: vec![
                (sys::NFTNL_EXPR_CMP_SREG, Attr::U32(sreg)),
                (sys::NFTNL_EXPR_CMP_OP, Attr::U32(NFT_CMP_EQ)),
                (sys::NFTNL_EXPR_CMP_DATA, Attr::Data(data.to_vec())),
            ],
        }
    }

    pub fn lookup(sreg: u32, set: &CStr, set_id: u32) -> RawExpr {
        RawExpr {
            name: c"lookup",
            attrs: vec![
                (sys::NFTNL_EXPR_LOOKUP_SREG, Attr::U32(sreg)),
                (sys::NFTNL_EXPR_LOOKUP_SET, Attr::Str(set.to_owned())),
                (sys::NFTNL_EXPR_LOOKUP_SET_ID, Attr::U32(set_id)),
            ],
        }
    }

    pub fn masquerade(flags: u32) -> RawExpr {
        RawExpr {
            name: c"masq",
            attrs: vec![(sys::NFTNL_EXPR_MASQ_FLAGS, Attr::U32(flags))],
        }
    }

    /// Masquerade with the source port between registers `min` and `max`.
    pub fn masquerade_ports(flags: u32, min: u32, max: u32) -> RawExpr {
        RawExpr {
            name: c"masq",
            attrs: vec![
                (sys::NFTNL_EXPR_MASQ_FLAGS, Attr::U32(flags)),
                (sys::NFTNL_EXPR_MASQ_REG_PROTO_MIN, Attr::U32(min)),
                (sys::NFTNL_EXPR_MASQ_REG_PROTO_MAX, Attr::U32(max)),
            ],
        }
    }

    /// Loads `data` into register `dreg`.
    pub fn immediate(dreg: u32, data: &[u8]) -> RawExpr {
        RawExpr {
            name: c"immediate",
            attrs: vec![
                (sys::NFTNL_EXPR_IMM_DREG, Attr::U32(dreg)),
                (sys::NFTNL_EXPR_IMM_DATA, Attr::Data(data.to_vec())),
            ],
        }
    }

    pub fn reject(kind: u32, code: u8) -> RawExpr {
        RawExpr {
            name: c"reject",
            attrs: vec![
                (sys::NFTNL_EXPR_REJECT_TYPE, Attr::U32(kind)),
                (sys::NFTNL_EXPR_REJECT_CODE, Attr::U8(code)),
            ],
        }
    }
}

impl RawExpr {
    /// A libnftnl expression with these attributes; the caller owns it (a rule it is added to
    /// takes it over).
    pub fn alloc(&self) -> NonNull<sys::nftnl_expr> {
        // SAFETY: libnftnl copies every attribute value it is given.
        unsafe {
            let Some(expr) = NonNull::new(sys::nftnl_expr_alloc(self.name.as_ptr())) else {
                // Out of memory for a few bytes: do what std does.
                std::process::abort();
            };
            let e = expr.as_ptr();
            for (attr, value) in &self.attrs {
                let attr = *attr as u16;
                match value {
                    Attr::U8(v) => sys::nftnl_expr_set_u8(e, attr, *v),
                    Attr::U32(v) => sys::nftnl_expr_set_u32(e, attr, *v),
                    Attr::U64(v) => sys::nftnl_expr_set_u64(e, attr, *v),
                    Attr::Str(s) => {
                        sys::nftnl_expr_set_str(e, attr, s.as_ptr());
                    }
                    Attr::Data(d) => {
                        sys::nftnl_expr_set(e, attr, d.as_ptr() as *const c_void, d.len() as u32);
                    }
                }
            }
            expr
        }
    }

    /// An expression of `name` with `attrs`.
    pub fn new(name: &'static CStr, attrs: Vec<(u32, Attr)>) -> RawExpr {
        RawExpr { name, attrs }
    }
}

impl Expression for RawExpr {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        self.alloc()
    }
}

/// A batch and what each of its messages does (for errors).
pub struct Transaction {
    batch: Batch,
    ops: Vec<String>,
}

impl Transaction {
    pub fn new() -> Transaction {
        Transaction {
            batch: Batch::new(),
            ops: Vec::new(),
        }
    }

    pub fn add<T: NlMsg>(&mut self, msg: &T, msg_type: MsgType, what: impl FnOnce() -> String) {
        self.batch.add(msg, msg_type);
        self.ops.push(what());
    }

    /// Sends the batch and waits for its acknowledgement; the first error is returned (the
    /// kernel then applies nothing of the batch).
    ///
    /// Only the last message asks for an acknowledgement: the kernel reports a failing message
    /// whether asked or not, and delivers every answer only once the whole batch is processed,
    /// so one acknowledgement per message (libnftnl's default) overflows the socket's receive
    /// queue (ENOBUFS) from about a thousand Services on.
    pub fn commit(self) -> Result<(), NetlinkError> {
        let n_msgs = self.ops.len() as u32;
        let batch = self.batch.finalize();
        let seqs = batch.sequence_numbers();
        // Kernels >= 6.10 acknowledge the batch begin and end messages too (nftnl then gives
        // them sequence numbers): messages are numbered after the begin message.
        let acked_ends = seqs.len() as u32 == n_msgs + 2;
        let first_msg = seqs.start + u32::from(acked_ends);
        let describe = |seq: u32| -> String {
            match seq.checked_sub(first_msg) {
                Some(i) if (i as usize) < self.ops.len() => self.ops[i as usize].clone(),
                _ => "the batch".to_string(),
            }
        };

        let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(NetlinkError::Socket)?;
        let fd = socket.as_raw_fd();
        let mut bytes: Vec<u8> = batch.iter().flatten().copied().collect();
        let last_acked = ack_only_last(&mut bytes)?;
        prepare_socket(fd, bytes.len());
        send_all(fd, &[&bytes]).map_err(NetlinkError::Send)?;

        let portid = socket.portid();
        let mut pending: BTreeSet<u32> = last_acked.into_iter().collect();
        if acked_ends {
            pending.insert(seqs.start);
            pending.insert(seqs.end - 1);
        }
        let mut buf = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
        while !pending.is_empty() {
            let n = socket.recv(&mut buf).map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    NetlinkError::Recv(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from the kernel for {} messages", pending.len()),
                    ))
                } else {
                    NetlinkError::Recv(e)
                }
            })?;
            let mut rest = &buf[..n];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                let pid = u32::from_ne_bytes(rest[12..16].try_into().unwrap());
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(NetlinkError::Protocol(format!(
                        "truncated netlink message ({len} bytes, {} left)",
                        rest.len()
                    )));
                }
                if pid == portid && kind == NLMSG_ERROR {
                    if len < NLMSG_HDRLEN + 4 {
                        return Err(NetlinkError::Protocol("short netlink error message".into()));
                    }
                    let code = i32::from_ne_bytes(rest[16..20].try_into().unwrap());
                    if code != 0 {
                        return Err(NetlinkError::Kernel {
                            op: describe(seq),
                            errno: -code,
                        });
                    }
                    pending.remove(&seq);
                }
                // NLMSG_ALIGN
                let step = (len + 3) & !3;
                rest = &rest[step.min(rest.len())..];
            }
        }
        Ok(())
    }
}

pub(crate) const NLM_F_ACK: u16 = 4;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

/// Clears NLM_F_ACK on every message of the batch but the last one between the batch
/// delimiters, and returns that message's sequence number (`None`: an empty batch).
fn ack_only_last(bytes: &mut [u8]) -> Result<Option<u32>, NetlinkError> {
    let mut last = None;
    let mut at = 0;
    while at + NLMSG_HDRLEN <= bytes.len() {
        let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || at + len > bytes.len() {
            return Err(NetlinkError::Protocol(format!(
                "malformed batch: a {len}-byte message at offset {at} of {}",
                bytes.len()
            )));
        }
        let kind = u16::from_ne_bytes(bytes[at + 4..at + 6].try_into().unwrap());
        if kind != NFNL_MSG_BATCH_BEGIN && kind != NFNL_MSG_BATCH_END {
            let flags = u16::from_ne_bytes(bytes[at + 6..at + 8].try_into().unwrap());
            bytes[at + 6..at + 8].copy_from_slice(&(flags & !NLM_F_ACK).to_ne_bytes());
            last = Some(at);
        }
        at += (len + 3) & !3;
    }
    Ok(last.map(|at| {
        let flags = u16::from_ne_bytes(bytes[at + 6..at + 8].try_into().unwrap());
        bytes[at + 6..at + 8].copy_from_slice(&(flags | NLM_F_ACK).to_ne_bytes());
        u32::from_ne_bytes(bytes[at + 8..at + 12].try_into().unwrap())
    }))
}

/// Acks capped to their header; a send buffer that holds the batch (as nft does); a receive
/// timeout so that a kernel that never answers cannot hang the agent.
fn prepare_socket(fd: libc::c_int, batch_len: usize) {
    let setopt = |level: libc::c_int, name: libc::c_int, value: &[u8]| {
        // SAFETY: `value` is a valid buffer of the given length for the duration of the call.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                value.as_ptr() as *const c_void,
                value.len() as libc::socklen_t,
            )
        }
    };
    let one: libc::c_int = 1;
    setopt(libc::SOL_NETLINK, NETLINK_CAP_ACK, &one.to_ne_bytes());
    if batch_len > 128 * 1024 {
        let size = libc::c_int::try_from(batch_len.saturating_mul(2)).unwrap_or(libc::c_int::MAX);
        if setopt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &size.to_ne_bytes()) != 0 {
            setopt(libc::SOL_SOCKET, libc::SO_SNDBUF, &size.to_ne_bytes());
        }
    }
    let timeout = libc::timeval {
        tv_sec: 30,
        tv_usec: 0,
    };
    // SAFETY: a plain-old-data struct viewed as bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &timeout as *const libc::timeval as *const u8,
            std::mem::size_of::<libc::timeval>(),
        )
    };
    setopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, bytes);
}

/// Sends the batch's buffers as ONE netlink message (sendmsg with an iovec per buffer): the
/// kernel processes a batch within a single skb, so it must not be split across sends.
fn send_all(fd: libc::c_int, buffers: &[&[u8]]) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = buffers
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: zeroed sockaddr_nl/msghdr are valid; the pointers stay valid during the call.
    let sent = unsafe {
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = &mut addr as *mut libc::sockaddr_nl as *mut c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        libc::sendmsg(fd, &msg, 0)
    };
    let total: usize = buffers.iter().map(|b| b.len()).sum();
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != total {
        return Err(io::Error::other(format!(
            "sendmsg sent {sent} of {total} bytes"
        )));
    }
    Ok(())
}
