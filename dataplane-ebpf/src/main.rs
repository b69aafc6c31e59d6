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
mod packet;
mod tc;

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_F_NO_PREALLOC},
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
    EbpfContext,
};
use kpr_common::{
    Affinity4Key, Affinity4Value, AffinityExt4Key, Backend4Value, Counter, Ct4Key, Ct4Value,
    Service4Key, Service4Value, SockFwd4Key, SockFwd4Value, SockRevNat4Key, SockRevNat4Value,
    SrcRange4Key, AFFINITY_MAP_MAX, AFFINITY_SCAN_MAX, BACKENDS_MAP_MAX, COUNTER_MAX, CT_MAP_MAX,
    CT_NEW_MAP_MAX, IPPROTO_TCP, IPPROTO_UDP, SERVICES_MAP_MAX, SOCK_CHECK_DROP,
    SOCK_REVNAT_MAP_MAX, SRC_RANGE_MAP_MAX, SVC_FLAG_AFFINITY, SVC_FLAG_NO_LOCAL_DROP,
    SVC_FLAG_SOURCE_RANGES,
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

/// sock_addr programs allow the call with 1 and refuse it with 0.
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn kpr_connect4(ctx: SockAddrContext) -> i32 {
    // A connect is translated once for the socket's life: no stickiness needed.
    forward(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kpr_sendmsg4(ctx: SockAddrContext) -> i32 {
    // Unconnected UDP: keep the socket on its backend, as conntrack keeps a UDP flow.
    forward(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kpr_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    // recvmsg hooks must return 1; there is nothing to refuse here.
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn kpr_getpeer4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    SYS_PROCEED
}

/// A socket call [`try_forward`] sent to a backend.
struct Translation {
    backend: (u32, u16),
    /// Session affinity chose the backend.
    by_affinity: bool,
}

/// A socket call to a frontend that [`try_forward`] refuses.
struct Refusal {
    reason: Counter,
    rev_nat_id: u32,
}

/// connect4 / sendmsg4: translate a frontend to a backend, or refuse the call.
#[inline(always)]
fn forward(ctx: &SockAddrContext, sticky: bool) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid bpf_sock_addr for its whole run.
    let (address_be, port_be, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    let frontend = (address_be, port_be);
    match try_forward(ctx, frontend, proto, sticky) {
        Ok(Some((t, rev_nat_id))) => {
            count(Counter::Translated);
            events::socket_translated(ctx, proto, frontend, t.backend, rev_nat_id, t.by_affinity);
            SYS_PROCEED
        }
        // Not a frontend: leave the call alone.
        Ok(None) => SYS_PROCEED,
        Err(Refusal { reason, rev_nat_id }) => {
            count(reason);
            events::socket_refused(ctx, proto, frontend, rev_nat_id, reason);
            // Refuse with ECONNREFUSED, as a TCP RST would: a service with no usable backend
            // must fail fast, not hang until a timeout. Sending the packet on to the VIP would
            // only reach nothing.
            // SAFETY: bpf_set_retval is available to connect4/sendmsg4 (kernel >= 5.18).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            SYS_REJECT
        }
    }
}

/// The backend (and the frontend's reverse-NAT id) for a call to `(address_be, port_be)`;
/// None when that is no frontend.
#[inline(always)]
fn try_forward(
    ctx: &SockAddrContext,
    (address_be, port_be): (u32, u16),
    proto: u8,
    sticky: bool,
) -> Result<Option<(Translation, u32)>, Refusal> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(None);
    }
    let frontend_key = Service4Key::new(address_be, port_be, proto, 0);
    // SAFETY: values are plain data, copied out at once.
    let frontend: Service4Value = match unsafe { SERVICES.get(&frontend_key) } {
        Some(v) => *v,
        None => return Ok(None),
    };
    // SAFETY: a read of read-only data; sock_addr programs may call bpf_get_netns_cookie.
    if kpr_common::is_loopback4_be(address_be)
        && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
            != unsafe { core::ptr::read_volatile(&KPR_HOST_NETNS_COOKIE) }
    {
        return Ok(None);
    }
    let refuse = |reason| Refusal {
        reason,
        rev_nat_id: frontend.rev_nat_id,
    };
    // SAFETY: sock_addr programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if frontend.count == 0 {
        // kube-proxy drops traffic of internalTrafficPolicy: Local without a local endpoint
        // (when asked to do the same): the call goes on untranslated, and the egress program
        // drops the socket's packets to the frontend.
        if frontend.flags & SVC_FLAG_NO_LOCAL_DROP != 0 && egress::checks_on() {
            let key = SockRevNat4Key {
                cookie,
                address_be,
                port_be,
                pad: 0,
            };
            if egress::SOCK_CHECKS
                .insert(&key, &SOCK_CHECK_DROP, 0)
                .is_ok()
            {
                return Ok(None);
            }
        }
        return Err(refuse(Counter::DropNoBackend));
    }
    let fwd_key = SockFwd4Key {
        cookie,
        address_be,
        port_be,
        proto,
        pad: 0,
    };

    // The socket's previous choice, if that backend is still in the service.
    let mut chosen: Option<(u16, u32)> = None;
    if sticky {
        if let Some(prev) = unsafe { SOCK_FWD.get(&fwd_key) } {
            let prev = *prev;
            if let Some(slot) =
                backend_slot(&frontend_key, frontend.count, prev.slot, prev.backend_id)
            {
                chosen = Some((slot, prev.backend_id));
                count(Counter::StickyReused);
            }
        }
    }

    // Session affinity: the client's backend for this frontend, unless the timeout passed since
    // its last new connection or the backend left the service.
    let affinity = frontend.flags & SVC_FLAG_AFFINITY != 0;
    let mut now = 0;
    let mut by_affinity = false;
    let affinity_key = Affinity4Key {
        // SAFETY: sock_addr programs may call bpf_get_netns_cookie on their context.
        client_cookie: if affinity {
            unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
        } else {
            0
        },
        rev_nat_id: if affinity {
            affinity_group(frontend.rev_nat_id)
        } else {
            0
        },
        pad: 0,
    };
    if affinity {
        // SAFETY: helper without preconditions.
        now = unsafe { bpf_ktime_get_ns() };
        if chosen.is_none() {
            if let Some(prev) = unsafe { AFFINITY.get(&affinity_key) } {
                let prev = *prev;
                // For slot 0, backend_id is the affinity timeout in seconds.
                let timeout_ns = u64::from(frontend.backend_id) * 1_000_000_000;
                if now.wrapping_sub(prev.last_used_ns) <= timeout_ns {
                    if let Some(slot) =
                        backend_slot(&frontend_key, frontend.count, prev.slot, prev.backend_id)
                    {
                        chosen = Some((slot, prev.backend_id));
                        by_affinity = true;
                        count(Counter::AffinityReused);
                    }
                }
            }
        }
    }
    let (slot, backend_id) = match chosen {
        Some(c) => c,
        None => {
            // SAFETY: helper without preconditions.
            let pick = unsafe { bpf_get_prandom_u32() } % u32::from(frontend.count);
            let slot = pick as u16 + 1;
            let slot_key = Service4Key::new(address_be, port_be, proto, slot);
            match unsafe { SERVICES.get(&slot_key) } {
                Some(v) => (slot, v.backend_id),
                None => return Err(refuse(Counter::DropSlotMissing)),
            }
        }
    };
    let backend: Backend4Value = match unsafe { BACKENDS.get(&backend_id) } {
        Some(b) => *b,
        None => return Err(refuse(Counter::DropBackendMissing)),
    };
    if sticky {
        let v = SockFwd4Value {
            backend_id,
            slot,
            pad: 0,
        };
        // Best effort: without the entry the next datagram picks again, as before.
        let _ = SOCK_FWD.insert(&fwd_key, &v, 0);
    }
    if affinity {
        let v = Affinity4Value {
            last_used_ns: now,
            backend_id,
            slot,
            pad: 0,
        };
        // Best effort: without the entry the client's next connection chooses anew.
        let _ = AFFINITY.insert(&affinity_key, &v, 0);
    }

    // Remember what this socket asked for, so recvmsg/getpeername can show it again.
    let revnat_key = SockRevNat4Key {
        cookie,
        address_be: backend.address_be,
        port_be: backend.port_be,
        pad: 0,
    };
    let revnat = SockRevNat4Value {
        address_be,
        port_be,
        pad: 0,
        rev_nat_id: frontend.rev_nat_id,
    };
    // An unconnected UDP socket sends many datagrams to the same backend: skip the write (and
    // the LRU bookkeeping it costs) when the entry is already there.
    let known = matches!(unsafe { SOCK_REVNAT.get(&revnat_key) }, Some(v) if *v == revnat);
    if !known && SOCK_REVNAT.insert(&revnat_key, &revnat, 0).is_err() {
        return Err(refuse(Counter::DropRevNatUpdate));
    }
    // loadBalancerSourceRanges: the source address is known only once the packet is routed, so
    // the egress program checks it (see the egress module). Without the note the socket would
    // pass unchecked: refuse rather.
    if frontend.flags & SVC_FLAG_SOURCE_RANGES != 0
        && egress::checks_on()
        && egress::SOCK_CHECKS
            .insert(&revnat_key, &frontend.rev_nat_id, 0)
            .is_err()
    {
        return Err(refuse(Counter::DropRevNatUpdate));
    }

    // SAFETY: user_ip4/user_port are writable in connect4 and sendmsg4.
    unsafe {
        (*sa).user_ip4 = backend.address_be;
        (*sa).user_port = u32::from(backend.port_be);
    }
    let translation = Translation {
        backend: (backend.address_be, backend.port_be),
        by_affinity,
    };
    Ok(Some((translation, frontend.rev_nat_id)))
}

/// The slot of `frontend` (in its scope) that holds `backend_id`: `hint` if it still does, else
/// the first of up to AFFINITY_SCAN_MAX slots that does. None when the backend left the service.
#[inline(always)]
fn backend_slot(frontend: &Service4Key, count: u16, hint: u16, backend_id: u32) -> Option<u16> {
    let holds = |slot: u16| {
        let key = Service4Key::scoped(
            frontend.address_be,
            frontend.port_be,
            frontend.proto,
            frontend.scope,
            slot,
        );
        // SAFETY: values are plain data, read at once.
        matches!(unsafe { SERVICES.get(&key) }, Some(v) if v.backend_id == backend_id)
    };
    if hint >= 1 && hint <= count && holds(hint) {
        return Some(hint);
    }
    let mut slot = 1;
    while slot <= AFFINITY_SCAN_MAX {
        if slot > count {
            break;
        }
        if holds(slot) {
            return Some(slot);
        }
        slot += 1;
    }
    None
}

/// recvmsg4 / getpeername4: show the frontend instead of the backend the socket really talks to.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in try_forward.
    let (address_be, port_be, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return;
    }
    // SAFETY: sock_addr programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNat4Key {
        cookie,
        address_be,
        port_be,
        pad: 0,
    };
    let revnat: SockRevNat4Value = match unsafe { SOCK_REVNAT.get(&key) } {
        Some(v) => *v,
        None => return,
    };
    // Only translate back to a frontend that still exists and is the same service: a deleted
    // (or deleted and re-created) ClusterIP must not keep being shown to the application.
    let frontend_key = Service4Key::new(revnat.address_be, revnat.port_be, proto, 0);
    match unsafe { SERVICES.get(&frontend_key) } {
        Some(f) if f.rev_nat_id == revnat.rev_nat_id => {}
        _ => {
            let _ = SOCK_REVNAT.remove(&key);
            count(Counter::RevNatStale);
            return;
        }
    }
    // SAFETY: user_ip4/user_port are writable in recvmsg4 and getpeername4.
    unsafe {
        (*sa).user_ip4 = revnat.address_be;
        (*sa).user_port = u32::from(revnat.port_be);
    }
    count(Counter::RevTranslated);
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
