//! Packet parsing and address/port rewriting for the tc programs.
//!
//! Headers are read with `bpf_skb_load_bytes` (`TcContext::load`) rather than through direct
//! packet pointers: the helper checks the bounds against the whole skb itself (a failed read is
//! an error, never an out-of-bounds access), and it also reads headers that sit in a non-linear
//! part of the skb, which direct access would need a `bpf_skb_pull_data` for. Writes go through
//! `bpf_skb_store_bytes` and the checksum helpers, which keep `skb->csum` right for
//! CHECKSUM_COMPLETE and CHECKSUM_PARTIAL packets (Cilium's lb4 rewrites work the same way).
//!
//! Only Ethernet devices are handled: the IP header is expected at offset 14 (the agent only
//! attaches to ARPHRD_ETHER devices). TCP and UDP over IPv4 and IPv6 are parsed; IPv6 packets
//! with extension headers (fragments among them) and anything else are left alone.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    cty::c_long,
    programs::TcContext,
};
use kpr_common::{IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Offsets inside the IPv6 header.
const IP6_SADDR_OFF: usize = ETH_HLEN + 8;
const IP6_DADDR_OFF: usize = ETH_HLEN + 24;
const IP6_HLEN: usize = 40;

/// The fixed IPv6 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub version_class_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

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

/// What the tc programs need to know about a TCP/UDP packet of the family whose addresses are
/// `A` (`u32`, `[u32; 4]`). Addresses and ports are in network byte order, as on the wire.
#[derive(Clone, Copy)]
pub struct Packet<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
}

/// Result of [`Wire::parse`].
pub enum Parsed<A> {
    /// A TCP or UDP packet with its ports (IPv6: without extension headers).
    Packet(Packet<A>),
    /// A non-first IPv4 fragment: it has no L4 header, so no ports to look up.
    Fragment,
    /// Anything else (not IPv4, not TCP/UDP, truncated): not ours.
    Other,
}

impl<A> Packet<A> {
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

/// The IP version of the frame's payload (4 or 6), from its ethertype; None for anything else.
#[inline(always)]
pub fn ip_version(ctx: &TcContext) -> Option<u8> {
    let ethertype: u16 = ctx.load(12).ok()?;
    match u16::from_be(ethertype) {
        ETH_P_IP => Some(4),
        ETH_P_IPV6 => Some(6),
        _ => None,
    }
}

/// An IPv4 packet (the ethertype already checked).
#[inline(always)]
fn parse4(ctx: &TcContext) -> Parsed<u32> {
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
    let Some((sport, dport, tcp_flags)) = ports(ctx, ip.proto, l4_off) else {
        return Parsed::Other;
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

/// An IPv6 packet whose next header is TCP or UDP. Extension headers (a fragment header
/// among them) are not walked: such packets are not ours.
#[inline(never)]
fn parse6(ctx: &TcContext) -> Parsed<[u32; 4]> {
    let ip: Ipv6Hdr = match ctx.load(ETH_HLEN) {
        Ok(v) => v,
        Err(_) => return Parsed::Other,
    };
    if u32::from_be(ip.version_class_flow) >> 28 != 6 {
        return Parsed::Other;
    }
    if ip.next_header != IPPROTO_TCP && ip.next_header != IPPROTO_UDP {
        return Parsed::Other;
    }
    let l4_off = ETH_HLEN + IP6_HLEN;
    let Some((sport, dport, tcp_flags)) = ports(ctx, ip.next_header, l4_off) else {
        return Parsed::Other;
    };
    Parsed::Packet(Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.next_header,
        tcp_flags,
        l4_off,
    })
}

/// Source port, destination port and TCP flags (0 for UDP) of the L4 header at `l4_off`.
#[inline(always)]
fn ports(ctx: &TcContext, proto: u8, l4_off: usize) -> Option<(u16, u16, u8)> {
    if proto == IPPROTO_TCP {
        // Reading up to the flags byte also proves the header is there; the checksum (bytes
        // 16..18) is bounds-checked by the helper that updates it.
        ctx.load::<TcpStart>(l4_off)
            .ok()
            .map(|t| (t.sport, t.dport, t.flags))
    } else {
        ctx.load::<[u16; 4]>(l4_off).ok().map(|u| (u[0], u[1], 0))
    }
}

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Destination address and port (DNAT, ingress).
    Dst,
    /// Source address and port (reverse NAT of replies, egress).
    Src,
}

/// An address family's wire format: parsing its packets, and its part of a packet rewrite (the
/// address itself and the checksums that cover it).
pub trait Wire: Copy + PartialEq {
    /// The frame's packet of this family (the ethertype already checked, see [`ip_version`]).
    fn parse(ctx: &TcContext) -> Parsed<Self>;

    /// Writes `new` over `old` at `end` and updates the checksums that cover it (`l4_csum_off`,
    /// `mangled_0`: see [`rewrite`]).
    fn store_addr(
        ctx: &TcContext,
        end: End,
        old: Self,
        new: Self,
        l4_csum_off: usize,
        mangled_0: u64,
    ) -> Result<(), c_long>;
}

impl Wire for u32 {
    #[inline(always)]
    fn parse(ctx: &TcContext) -> Parsed<u32> {
        parse4(ctx)
    }

    #[inline(always)]
    fn store_addr(
        ctx: &TcContext,
        end: End,
        old_addr: u32,
        addr: u32,
        csum_off: usize,
        mangled_0: u64,
    ) -> Result<(), c_long> {
        let addr_off = match end {
            End::Dst => IP_DADDR_OFF,
            End::Src => IP_SADDR_OFF,
        };
        // The address is part of the L4 pseudo-header: BPF_F_PSEUDO_HDR also keeps skb->csum
        // right for CHECKSUM_COMPLETE. The low bits of the flags are the field size.
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(addr), 4)?;
        ctx.store(addr_off, &addr, 0)
    }
}

impl Wire for [u32; 4] {
    #[inline(always)]
    fn parse(ctx: &TcContext) -> Parsed<[u32; 4]> {
        parse6(ctx)
    }

    /// IPv6 has no header checksum; the L4 pseudo-header covers both 128-bit addresses, so the
    /// checksum changes by the difference of the old and the new address (`bpf_csum_diff`),
    /// applied as a pseudo-header change (Cilium's `ipv6_csum_update`).
    #[inline(always)]
    fn store_addr(
        ctx: &TcContext,
        end: End,
        mut old: [u32; 4],
        mut new: [u32; 4],
        csum_off: usize,
        mangled_0: u64,
    ) -> Result<(), c_long> {
        let addr_off = match end {
            End::Dst => IP6_DADDR_OFF,
            End::Src => IP6_SADDR_OFF,
        };
        // SAFETY: both buffers are 16 bytes on this program's stack.
        let diff = unsafe {
            aya_ebpf::helpers::bpf_csum_diff(old.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0)
        };
        if diff < 0 {
            return Err(diff);
        }
        ctx.l4_csum_replace(
            csum_off,
            0,
            diff as u64,
            u64::from(BPF_F_PSEUDO_HDR) | mangled_0,
        )?;
        ctx.store(addr_off, &new, 0)
    }
}

/// Rewrites one end of `pkt` to `addr`:`port` (network byte order) and updates the IPv4 header
/// checksum (IPv4) and the TCP/UDP checksum (including its pseudo-header) incrementally.
///
/// A UDP checksum of 0 means "none" and stays 0 (`BPF_F_MARK_MANGLED_0`, which also writes a
/// result of 0 as 0xffff, RFC 768; over IPv6 a UDP checksum is never 0). Errors are the
/// helpers' (e.g. a truncated header).
#[inline(always)]
pub fn rewrite<A: Wire>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    end: End,
    addr: A,
    port: u16,
) -> Result<(), c_long> {
    let (old_addr, old_port, port_off) = match end {
        End::Dst => (pkt.daddr, pkt.dport, pkt.l4_off + 2),
        End::Src => (pkt.saddr, pkt.sport, pkt.l4_off),
    };
    let csum_off = pkt.l4_csum_off();
    let mangled_0 = if pkt.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if addr != old_addr {
        A::store_addr(ctx, end, old_addr, addr, csum_off, mangled_0)?;
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
