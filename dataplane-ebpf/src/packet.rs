//! Packet parsing and address/port rewriting for the tc programs.
//!
//! Headers are read with `bpf_skb_load_bytes` (`TcContext::load`) rather than through direct
//! packet pointers: the helper checks the bounds against the whole skb itself (a failed read is
//! an error, never an out-of-bounds access), and it also reads headers that sit in a non-linear
//! part of the skb, which direct access would need a `bpf_skb_pull_data` for. Writes go through
//! `bpf_skb_store_bytes` and the checksum helpers, which keep `skb->csum` right for
//! CHECKSUM_COMPLETE and CHECKSUM_PARTIAL packets (Cilium's lb4 rewrites work the same way).
//!
//! Only Ethernet devices are handled: the IPv4 header is expected at offset 14 (the agent only
//! attaches to ARPHRD_ETHER devices). IPv6 and anything that is not TCP or UDP over IPv4 is
//! left alone.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    cty::c_long,
    programs::TcContext,
};
use kpr_common::{IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

/// Offsets inside the IPv4 header.
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;
/// The fragment offset mask of `frag_off` (host order).
pub const IP_OFFSET: u16 = 0x1fff;

/// TCP header flags (byte 13).
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;

/// The fixed IPv4 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// The first 14 bytes of a TCP header: ports, sequence numbers and flags.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpStart {
    sport: u16,
    dport: u16,
    seq: u32,
    ack_seq: u32,
    doff: u8,
    flags: u8,
}

/// What the tc programs need to know about an IPv4 TCP/UDP packet. Addresses and ports are
/// in network byte order, as on the wire.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
}

/// Result of [`parse`].
pub enum Parsed {
    /// An IPv4 TCP or UDP packet with its ports.
    Packet(Packet),
    /// A non-first IPv4 fragment: it has no L4 header, so no ports to look up.
    Fragment,
    /// Anything else (not IPv4, not TCP/UDP, truncated): not ours.
    Other,
}

impl Packet {
    /// A TCP packet that opens a connection (SYN without ACK). Only those start a flow.
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    #[inline(always)]
    pub fn is_tcp_fin(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & TCP_FLAG_FIN != 0
    }

    #[inline(always)]
    pub fn is_tcp_rst(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & TCP_FLAG_RST != 0
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    fn l4_csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    let ethertype: u16 = match ctx.load(12) {
        Ok(v) => v,
        Err(_) => return Parsed::Other,
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        return Parsed::Other;
    }
    let ip: Ipv4Hdr = match ctx.load(ETH_HLEN) {
        Ok(v) => v,
        Err(_) => return Parsed::Other,
    };
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    if ip.version_ihl >> 4 != 4 || ihl < 20 {
        return Parsed::Other;
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Parsed::Other;
    }
    let frag_off = u16::from_be(ip.frag_off);
    if frag_off & IP_OFFSET != 0 {
        return Parsed::Fragment;
    }
    // A first fragment (MF set, offset 0) carries the ports and is handled like any packet;
    // see the tc module for what that means for the datagram.
    let l4_off = ETH_HLEN + ihl;
    let (sport, dport, tcp_flags) = if ip.proto == IPPROTO_TCP {
        // Reading up to the flags byte also proves the header is there; the checksum (bytes
        // 16..18) is bounds-checked by the helper that updates it.
        match ctx.load::<TcpStart>(l4_off) {
            Ok(t) => (t.sport, t.dport, t.flags),
            Err(_) => return Parsed::Other,
        }
    } else {
        match ctx.load::<[u16; 4]>(l4_off) {
            Ok(u) => (u[0], u[1], 0),
            Err(_) => return Parsed::Other,
        }
    };
    Parsed::Packet(Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        tcp_flags,
        l4_off,
    })
}

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Destination address and port (DNAT, ingress).
    Dst,
    /// Source address and port (reverse NAT of replies, egress).
    Src,
}

/// Rewrites one end of `pkt` to `addr`:`port` (network byte order) and updates the IPv4 header
/// checksum and the TCP/UDP checksum (including its pseudo-header) incrementally.
///
/// A UDP checksum of 0 means "none" and stays 0 (`BPF_F_MARK_MANGLED_0`, which also writes a
/// result of 0 as 0xffff, RFC 768). Errors are the helpers' (e.g. a truncated header).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    end: End,
    addr: u32,
    port: u16,
) -> Result<(), c_long> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Dst => (pkt.daddr, pkt.dport, IP_DADDR_OFF, pkt.l4_off + 2),
        End::Src => (pkt.saddr, pkt.sport, IP_SADDR_OFF, pkt.l4_off),
    };
    let csum_off = pkt.l4_csum_off();
    let mangled_0 = if pkt.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if addr != old_addr {
        // The address is part of the L4 pseudo-header: BPF_F_PSEUDO_HDR also keeps skb->csum
        // right for CHECKSUM_COMPLETE. The low bits of the flags are the field size.
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(addr), 4)?;
        ctx.store(addr_off, &addr, 0)?;
    }
    if port != old_port {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(port),
            mangled_0 | 2,
        )?;
        ctx.store(port_off, &port, 0)?;
    }
    Ok(())
}

/// ORs `bits` into `skb->mark`.
#[inline(always)]
pub fn or_mark(ctx: &TcContext, bits: u32) {
    // SAFETY: the context is the kernel's __sk_buff for this run; tc programs may read and write
    // `mark`.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | bits);
}
