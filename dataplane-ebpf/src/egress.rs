//! loadBalancerSourceRanges for clients on the node (pods and host processes), checked on the
//! first packet a socket sends to its backend.
//!
//! kube-proxy checks the ranges against the packet's source on every path, a pod's connection
//! to a LoadBalancer IP included (its TestLoadBalancer "pod to LB1 blocked"). The socket
//! programs cannot: at connect() an unbound socket has no source address yet (routing picks
//! it later). So the connect and sendmsg programs, when they translate a frontend that has
//! ranges, note the socket and its backend in `KPR_SKCHK4_V1` (`KPR_SKCHK6_V1` for IPv6), and
//! this cgroup egress program, for both families, checks the source
//! of that socket's packets to that backend against the frontend's ranges: outside them the
//! packet is dropped and counted (`drop_source_range`), as kube-proxy's firewall chain drops
//! it (a TCP client times out); inside, the note is removed and the socket's later packets pass
//! at the cost of the gate alone. While no frontend has ranges, the gate (one array read) is
//! all that runs per packet.
//!
//! The same note, with [`SOCK_CHECK_DROP`], drops every packet of a socket to a frontend with
//! `internalTrafficPolicy: Local` and no local endpoint, when the agent drops those as
//! kube-proxy does (`SVC_FLAG_NO_LOCAL_DROP`): a TCP client times out.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_skb, map},
    maps::{Array, LruHashMap},
    programs::SkBuffContext,
    EbpfContext,
};
use kpr_common::{
    Counter, SockRevNat4Key, SockRevNat6Key, IPPROTO_TCP, IPPROTO_UDP, SOCK_CHECK_DROP,
    SOCK_CHECK_MAP_MAX,
};

use crate::count;
use crate::family::{Family, V4, V6};
use crate::packet::{Ipv4Hdr, Ipv6Hdr, IP_OFFSET};

#[map(name = "KPR_SKCHK4_V1")]
pub static SOCK_CHECKS: LruHashMap<SockRevNat4Key, u32> = LruHashMap::pinned(SOCK_CHECK_MAP_MAX, 0);

#[map(name = "KPR_SKCHK6_V1")]
pub static SOCK_CHECKS6: LruHashMap<SockRevNat6Key, u32> =
    LruHashMap::pinned(SOCK_CHECK_MAP_MAX, 0);

#[map(name = "KPR_SKGATE_V1")]
static SOCK_CHECK_GATE: Array<u32> = Array::with_max_entries(1, 0);

/// cgroup_skb programs pass a packet with 1 and drop it with 0.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// Both families' packets (the name is the pinned link's, kept across versions).
#[cgroup_skb(egress)]
pub fn kpr_egress4(ctx: SkBuffContext) -> i32 {
    match try_egress(&ctx) {
        Ok(()) => PASS,
        Err(reason) => {
            count(reason);
            DROP
        }
    }
}

/// Whether the socket programs may note sockets for a source check (some frontend has ranges).
#[inline(always)]
pub fn checks_on() -> bool {
    matches!(SOCK_CHECK_GATE.get(0), Some(v) if *v != 0)
}

#[inline(always)]
fn try_egress(ctx: &SkBuffContext) -> Result<(), Counter> {
    if !checks_on() {
        return Ok(());
    }
    // cgroup skb programs see the packet from its network header on.
    let version: u8 = match ctx.load::<u8>(0) {
        Ok(b) => b >> 4,
        Err(_) => return Ok(()),
    };
    if version == 6 {
        let ip: Ipv6Hdr = match ctx.load(0) {
            Ok(ip) => ip,
            Err(_) => return Ok(()),
        };
        // Extension headers are not walked: such packets are not checked.
        if ip.next_header != IPPROTO_TCP && ip.next_header != IPPROTO_UDP {
            return Ok(());
        }
        let dport: u16 = match ctx.load(40 + 2) {
            Ok(p) => p,
            Err(_) => return Ok(()),
        };
        return check::<V6>(ctx, ip.saddr, (ip.daddr, dport));
    }
    let ip: Ipv4Hdr = match ctx.load(0) {
        Ok(ip) => ip,
        Err(_) => return Ok(()),
    };
    if ip.version_ihl >> 4 != 4 || (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP) {
        return Ok(());
    }
    // A later fragment carries no ports; the first one was checked.
    if u16::from_be(ip.frag_off) & IP_OFFSET != 0 {
        return Ok(());
    }
    let l4 = usize::from(ip.version_ihl & 0x0f) * 4;
    let dport: u16 = match ctx.load(l4 + 2) {
        Ok(p) => p,
        Err(_) => return Ok(()),
    };
    check::<V4>(ctx, ip.saddr, (ip.daddr, dport))
}

/// The check of a packet from `saddr` to `dest` (the socket's backend) of the sending socket,
/// if the socket programs noted one.
#[inline(always)]
fn check<F: Family>(
    ctx: &SkBuffContext,
    saddr: F::Addr,
    dest: (F::Addr, u16),
) -> Result<(), Counter> {
    // SAFETY: cgroup skb programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(rev_nat_id) = F::sock_check(cookie, dest) else {
        return Ok(());
    };
    if rev_nat_id == SOCK_CHECK_DROP {
        return Err(Counter::DropNoLocalBackend);
    }
    if !F::source_allowed(rev_nat_id, saddr) {
        return Err(Counter::DropSourceRange);
    }
    // Allowed: this socket's packets to this backend need no further check.
    F::clear_check(cookie, dest);
    Ok(())
}
