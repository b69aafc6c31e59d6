//! kpr's kernel programs: socket-level service load balancing ("socket LB", this file) and
//! north-south load balancing in tc programs on the node's external devices (`tc`, with
//! `conntrack` and `packet`). The maps, shared by both, are defined here.
//!
//! The cgroup v2 sock_addr hooks run when a process in the cgroup calls connect(), sendmsg(),
//! recvmsg() or getpeername() on an IPv4 socket. A connect or send to a service frontend
//! (ClusterIP:port) is rewritten to a backend chosen at random, once, at the socket call:
//! nothing runs per packet afterwards, which is why this path costs the same at 1 service as at
//! 100,000. The receive and getpeername hooks undo the rewrite in what the application sees, so
//! an unconnected UDP client gets replies "from" the ClusterIP and a TCP client's peer is the
//! ClusterIP it dialled.
//!
//! The map layout is documented in `kpr-common`.
#![no_std]
#![no_main]

mod conntrack;
mod egress;
mod events;
mod family;
mod packet;
mod select;
mod socklb;
mod tc;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use kpr_common::{
    Affinity4Key, Affinity4Value, AffinityExt4Key, AffinityExt6Key, Backend4Value, Backend6Value,
    Counter, Ct4Key, Ct4Value, Ct6Key, Ct6Value, Service4Key, Service4Value, Service6Key,
    SockFwd4Key, SockFwd4Value, SockFwd6Key, SockRevNat4Key, SockRevNat4Value, SockRevNat6Key,
    SockRevNat6Value, SrcRange4Key, SrcRange6Key, AFFINITY_MAP_MAX, BACKENDS_MAP_MAX, COUNTER_MAX,
    CT_MAP_MAX, CT_NEW_MAP_MAX, SERVICES_MAP_MAX, SOCK_REVNAT_MAP_MAX, SRC_RANGE_MAP_MAX,
};

// Map names must equal the `*_MAP` constants in kpr-common: the agent finds them by name.
#[map(name = "KPR_SVC4_V1")]
static SERVICES: HashMap<Service4Key, Service4Value> = HashMap::pinned(SERVICES_MAP_MAX, 0);

#[map(name = "KPR_BE4_V1")]
static BACKENDS: HashMap<u32, Backend4Value> = HashMap::pinned(BACKENDS_MAP_MAX, 0);

// LRU: entries for sockets that closed are never deleted explicitly; the LRU evicts them.
#[map(name = "KPR_SKNAT4_V1")]
static SOCK_REVNAT: LruHashMap<SockRevNat4Key, SockRevNat4Value> =
    LruHashMap::pinned(SOCK_REVNAT_MAP_MAX, 0);

// LRU for the same reason as SOCK_REVNAT.
#[map(name = "KPR_SKFWD4_V1")]
static SOCK_FWD: LruHashMap<SockFwd4Key, SockFwd4Value> =
    LruHashMap::pinned(SOCK_REVNAT_MAP_MAX, 0);

// The IPv6 maps: the same layout with 128-bit addresses (see kpr-common).
#[map(name = "KPR_SVC6_V1")]
static SERVICES6: HashMap<Service6Key, Service4Value> = HashMap::pinned(SERVICES_MAP_MAX, 0);

#[map(name = "KPR_BE6_V1")]
static BACKENDS6: HashMap<u32, Backend6Value> = HashMap::pinned(BACKENDS_MAP_MAX, 0);

#[map(name = "KPR_SKNAT6_V1")]
static SOCK_REVNAT6: LruHashMap<SockRevNat6Key, SockRevNat6Value> =
    LruHashMap::pinned(SOCK_REVNAT_MAP_MAX, 0);

#[map(name = "KPR_SKFWD6_V1")]
static SOCK_FWD6: LruHashMap<SockFwd6Key, SockFwd4Value> =
    LruHashMap::pinned(SOCK_REVNAT_MAP_MAX, 0);

// LRU: a client that went away is forgotten; the timeout is checked on use, not by expiry.
#[cfg_attr(not(feature = "variant"), map(name = "KPR_AFF4_V1"))]
#[cfg_attr(feature = "variant", map(name = "KPR_AFF4_V2"))]
static AFFINITY: LruHashMap<Affinity4Key, Affinity4Value> = LruHashMap::pinned(AFFINITY_MAP_MAX, 0);

#[map(name = "KPR_CNT_V1")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_MAX, 0);

// North-south conntrack (tc programs), two entries per flow (see the conntrack module).
// Established flows: never evicted, so allocated as they come (no preallocation); entries go
// when they expire or are replaced. The agent sizes both maps at load time.
#[map(name = "KPR_CT4_V2")]
static CONNTRACK: HashMap<Ct4Key, Ct4Value> = HashMap::pinned(CT_MAP_MAX, BPF_F_NO_PREALLOC);

// Flows not established yet: LRU, so a flood of them evicts only each other.
#[map(name = "KPR_CT4NEW_V1")]
static CONNTRACK_NEW: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(CT_NEW_MAP_MAX, 0);

// Session affinity of clients outside the node, keyed by client address (tc programs). LRU as
// AFFINITY.
#[cfg_attr(not(feature = "variant"), map(name = "KPR_AFFX4_V1"))]
#[cfg_attr(feature = "variant", map(name = "KPR_AFFX4_V2"))]
static AFFINITY_EXT: LruHashMap<AffinityExt4Key, Affinity4Value> =
    LruHashMap::pinned(AFFINITY_MAP_MAX, 0);

// The IPv6 tc maps, as the IPv4 ones above.
#[map(name = "KPR_CT6_V1")]
static CONNTRACK6: HashMap<Ct6Key, Ct6Value> = HashMap::pinned(CT_MAP_MAX, BPF_F_NO_PREALLOC);

#[map(name = "KPR_CT6NEW_V1")]
static CONNTRACK6_NEW: LruHashMap<Ct6Key, Ct6Value> = LruHashMap::pinned(CT_NEW_MAP_MAX, 0);

#[cfg_attr(not(feature = "variant"), map(name = "KPR_AFFX6_V1"))]
#[cfg_attr(feature = "variant", map(name = "KPR_AFFX6_V2"))]
static AFFINITY_EXT6: LruHashMap<AffinityExt6Key, Affinity4Value> =
    LruHashMap::pinned(AFFINITY_MAP_MAX, 0);

#[map(name = "KPR_LBSRC6_V1")]
static SRC_RANGES6: LpmTrie<SrcRange6Key, u8> = LpmTrie::pinned(SRC_RANGE_MAP_MAX, 0);

// Frontend rev-NAT id → its session-affinity group (see kpr-common).
#[map(name = "KPR_AFFGRP_V1")]
static AFFINITY_GROUPS: HashMap<u32, u32> = HashMap::pinned(SERVICES_MAP_MAX, 0);

/// The affinity group of frontend `rev_nat_id`: shared by every frontend of its Service port.
#[inline(always)]
fn affinity_group(rev_nat_id: u32) -> u32 {
    // SAFETY: a plain value, copied out at once.
    match unsafe { AFFINITY_GROUPS.get(&rev_nat_id) } {
        Some(group) => *group,
        None => rev_nat_id,
    }
}

// loadBalancerSourceRanges: (frontend rev-NAT id, client prefix) → allowed.
#[map(name = "KPR_LBSRC4_V1")]
static SRC_RANGES: LpmTrie<SrcRange4Key, u8> = LpmTrie::pinned(SRC_RANGE_MAP_MAX, 0);

/// The node's network namespace (the agent's), as `bpf_get_netns_cookie` names it; set by the
/// agent at load time. A loopback frontend (a localhost NodePort) is the node's own: a pod
/// connecting to 127.0.0.1 means its own loopback, so only sockets in this namespace are
/// translated there (kube-proxy's localhost NodePorts exist only in the host namespace).
#[no_mangle]
static KPR_HOST_NETNS_COOKIE: u64 = 0;

#[cgroup_sock_addr(connect4)]
pub fn kpr_connect4(ctx: SockAddrContext) -> i32 {
    // A connect is translated once for the socket's life: no stickiness needed.
    socklb::forward4(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kpr_sendmsg4(ctx: SockAddrContext) -> i32 {
    // Unconnected UDP: keep the socket on its backend, as conntrack keeps a UDP flow.
    socklb::forward4(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kpr_recvmsg4(ctx: SockAddrContext) -> i32 {
    socklb::reverse4(&ctx);
    // recvmsg hooks must return 1; there is nothing to refuse here.
    socklb::SYS_PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn kpr_getpeer4(ctx: SockAddrContext) -> i32 {
    socklb::reverse4(&ctx);
    socklb::SYS_PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn kpr_connect6(ctx: SockAddrContext) -> i32 {
    socklb::forward6(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kpr_sendmsg6(ctx: SockAddrContext) -> i32 {
    socklb::forward6(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kpr_recvmsg6(ctx: SockAddrContext) -> i32 {
    socklb::reverse6(&ctx);
    socklb::SYS_PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn kpr_getpeer6(ctx: SockAddrContext) -> i32 {
    socklb::reverse6(&ctx);
    socklb::SYS_PROCEED
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
    // The `variant` build: every program differs from the default build's (its instructions,
    // so its tag) and behaves the same. The upgrade test runs it to replace programs under load.
    #[cfg(feature = "variant")]
    // SAFETY: a plain static, read once.
    unsafe {
        core::ptr::read_volatile(&VARIANT_MARK)
    };
}

#[cfg(feature = "variant")]
#[unsafe(no_mangle)]
static VARIANT_MARK: u32 = 1;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
