//! Socket-level load balancing for both address families: one selection ([`try_forward`]) and
//! one reverse translation ([`reverse`]), generic over [`Family`], which names a family's
//! maps. IPv4 sockets use [`V4`]; IPv6 sockets use [`V6`], except for IPv4-mapped addresses
//! (`::ffff:10.96.0.10`, a dual-stack socket reaching an IPv4 Service), which are translated
//! through the IPv4 maps and written back mapped.
//!
//! Session affinity is keyed by the client's network namespace and the frontend's affinity
//! group, neither of which has a family, so both families share the affinity map.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext,
};
use kpr_common::{
    Affinity4Key, Counter, SockFwd4Value, IPPROTO_TCP, IPPROTO_UDP, SOCK_CHECK_DROP,
    SVC_FLAG_AFFINITY, SVC_FLAG_NO_LOCAL_DROP, SVC_FLAG_SOURCE_RANGES,
};

pub use crate::family::{Family, V4, V6};
use crate::select::{select_backend, Remembered, NO_AFFINITY};
use crate::{affinity_group, count, egress, AFFINITY, KPR_HOST_NETNS_COOKIE};

/// sock_addr programs allow the call with 1 and refuse it with 0.
pub const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The destination of an IPv6 socket call, in network byte order.
#[inline(always)]
fn user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr; user_ip6 is read one
    // 32-bit word at a time, as the verifier requires.
    unsafe {
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    }
}

#[inline(always)]
fn set_user_ip6(sa: *mut bpf_sock_addr, address: [u32; 4]) {
    // SAFETY: user_ip6 is writable in connect6, sendmsg6, recvmsg6 and getpeername6, one
    // 32-bit word at a time.
    unsafe {
        (*sa).user_ip6[0] = address[0];
        (*sa).user_ip6[1] = address[1];
        (*sa).user_ip6[2] = address[2];
        (*sa).user_ip6[3] = address[3];
    }
}

/// `::ffff:<address>`.
#[inline(always)]
fn v4_mapped(address_be: u32) -> [u32; 4] {
    [0, 0, u32::to_be(0xffff), address_be]
}

#[inline(always)]
fn call(ctx: &SockAddrContext) -> (u16, u8) {
    let sa = ctx.sock_addr;
    // SAFETY: as in user_ip6.
    unsafe { ((*sa).user_port as u16, (*sa).protocol as u8) }
}

/// connect4 / sendmsg4.
#[inline(always)]
pub fn forward4(ctx: &SockAddrContext, sticky: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in user_ip6.
    let address = unsafe { (*sa).user_ip4 };
    forward::<V4>(ctx, address, sticky, |(ip, port)| {
        // SAFETY: user_ip4/user_port are writable in connect4 and sendmsg4.
        unsafe {
            (*sa).user_ip4 = ip;
            (*sa).user_port = u32::from(port);
        }
    })
}

/// connect6 / sendmsg6: IPv6 frontends, and IPv4 ones through v4-mapped addresses.
#[inline(always)]
pub fn forward6(ctx: &SockAddrContext, sticky: bool) -> i32 {
    let sa = ctx.sock_addr;
    let address = user_ip6(sa);
    let set_port = |port: u16| {
        // SAFETY: user_port is writable in connect6 and sendmsg6.
        unsafe { (*sa).user_port = u32::from(port) }
    };
    if kpr_common::is_v4_mapped_be(address) {
        return forward::<V4>(ctx, address[3], sticky, |(ip, port)| {
            set_user_ip6(sa, v4_mapped(ip));
            set_port(port);
        });
    }
    forward::<V6>(ctx, address, sticky, |(ip, port)| {
        set_user_ip6(sa, ip);
        set_port(port);
    })
}

/// recvmsg4 / getpeername4.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in user_ip6.
    let address = unsafe { (*sa).user_ip4 };
    if let Some((ip, port)) = reverse::<V4>(ctx, address) {
        // SAFETY: user_ip4/user_port are writable in recvmsg4 and getpeername4.
        unsafe {
            (*sa).user_ip4 = ip;
            (*sa).user_port = u32::from(port);
        }
    }
}

/// recvmsg6 / getpeername6.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let address = user_ip6(sa);
    let set_port = |port: u16| {
        // SAFETY: user_port is writable in recvmsg6 and getpeername6.
        unsafe { (*sa).user_port = u32::from(port) }
    };
    if kpr_common::is_v4_mapped_be(address) {
        if let Some((ip, port)) = reverse::<V4>(ctx, address[3]) {
            set_user_ip6(sa, v4_mapped(ip));
            set_port(port);
        }
    } else if let Some((ip, port)) = reverse::<V6>(ctx, address) {
        set_user_ip6(sa, ip);
        set_port(port);
    }
}

/// A socket call [`try_forward`] sent to a backend.
struct Translation<A> {
    backend: (A, u16),
    /// Session affinity chose the backend.
    by_affinity: bool,
    rev_nat_id: u32,
}

/// A socket call to a frontend that [`try_forward`] refuses.
struct Refusal {
    reason: Counter,
    rev_nat_id: u32,
}

/// Translates a call to `address` (and the call's port) to a backend, writing it with
/// `store`, or refuses the call.
#[inline(always)]
fn forward<F: Family>(
    ctx: &SockAddrContext,
    address: F::Addr,
    sticky: bool,
    store: impl FnOnce((F::Addr, u16)),
) -> i32 {
    let (port_be, proto) = call(ctx);
    let frontend = (address, port_be);
    match try_forward::<F>(ctx, frontend, proto, sticky) {
        Ok(Some(t)) => {
            store(t.backend);
            count(Counter::Translated);
            F::event_translated(ctx, proto, frontend, t.backend, t.rev_nat_id, t.by_affinity);
            SYS_PROCEED
        }
        // Not a frontend: leave the call alone.
        Ok(None) => SYS_PROCEED,
        Err(Refusal { reason, rev_nat_id }) => {
            count(reason);
            F::event_refused(ctx, proto, frontend, rev_nat_id, reason);
            // Refuse with ECONNREFUSED, as a TCP RST would: a service with no usable backend
            // must fail fast, not hang until a timeout. Sending the packet on to the VIP would
            // only reach nothing.
            // SAFETY: bpf_set_retval is available to connect and sendmsg hooks (>= 5.18).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            SYS_REJECT
        }
    }
}

/// The backend for a call to `frontend`; None when that is no frontend. Both families and
/// every socket hook choose here.
#[inline(always)]
fn try_forward<F: Family>(
    ctx: &SockAddrContext,
    (address, port_be): (F::Addr, u16),
    proto: u8,
    sticky: bool,
) -> Result<Option<Translation<F::Addr>>, Refusal> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(None);
    }
    let scope = kpr_common::SCOPE_INTERNAL;
    let frontend = match F::service(address, port_be, proto, scope, 0) {
        Some(v) => v,
        None => return Ok(None),
    };
    // SAFETY: a read of read-only data; sock_addr programs may call bpf_get_netns_cookie.
    if F::is_loopback(address)
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
        if frontend.flags & SVC_FLAG_NO_LOCAL_DROP != 0
            && egress::checks_on()
            && F::note_check(cookie, (address, port_be), SOCK_CHECK_DROP).is_ok()
        {
            return Ok(None);
        }
        return Err(refuse(Counter::DropNoBackend));
    }
    // Session affinity: keyed by the client's network namespace (connect() has no source
    // address yet) and the frontend's affinity group.
    let affinity = frontend.flags & SVC_FLAG_AFFINITY != 0;
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
    let remembered = Remembered {
        // Looked up only where they apply (each is a map lookup per call).
        sticky: if sticky {
            match F::sticky(cookie, (address, port_be), proto) {
                Some(p) => (p.slot, p.backend_id),
                None => (0, 0),
            }
        } else {
            (0, 0)
        },
        affinity: if affinity {
            // SAFETY: values are plain data, copied out at once.
            match unsafe { AFFINITY.get(&affinity_key) } {
                Some(a) => *a,
                None => NO_AFFINITY,
            }
        } else {
            NO_AFFINITY
        },
        // SAFETY: helper without preconditions.
        now: if affinity {
            unsafe { bpf_ktime_get_ns() }
        } else {
            0
        },
    };
    let now = remembered.now;
    let chosen = select_backend::<F>(&(address, port_be, proto, scope), &frontend, &remembered)
        .map_err(refuse)?;
    let (slot, backend_id, backend, by_affinity) = (
        chosen.slot,
        chosen.backend_id,
        chosen.backend,
        chosen.by_affinity,
    );
    if sticky {
        let v = SockFwd4Value {
            backend_id,
            slot,
            pad: 0,
        };
        F::set_sticky(cookie, (address, port_be), proto, &v);
    }
    if affinity {
        // Best effort: without the entry the client's next connection chooses anew.
        let _ = AFFINITY.insert(&affinity_key, &chosen.affinity_entry(now), 0);
    }

    // Remember what this socket asked for, so recvmsg/getpeername can show it again.
    if F::set_revnat(cookie, backend, (address, port_be), frontend.rev_nat_id).is_err() {
        return Err(refuse(Counter::DropRevNatUpdate));
    }
    // loadBalancerSourceRanges: the source address is known only once the packet is routed, so
    // the egress program checks it (see the egress module). Without the note the socket would
    // pass unchecked: refuse rather.
    if frontend.flags & SVC_FLAG_SOURCE_RANGES != 0
        && egress::checks_on()
        && F::note_check(cookie, backend, frontend.rev_nat_id).is_err()
    {
        return Err(refuse(Counter::DropRevNatUpdate));
    }
    Ok(Some(Translation {
        backend,
        by_affinity,
        rev_nat_id: frontend.rev_nat_id,
    }))
}

/// recvmsg / getpeername: the frontend to show instead of the backend the socket really talks
/// to, if the socket was translated and its frontend still exists.
#[inline(always)]
fn reverse<F: Family>(ctx: &SockAddrContext, address: F::Addr) -> Option<(F::Addr, u16)> {
    let (port_be, proto) = call(ctx);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    // SAFETY: sock_addr programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (front_address, front_port, rev_nat_id) = F::revnat(cookie, (address, port_be))?;
    // Only translate back to a frontend that still exists and is the same service: a deleted
    // (or deleted and re-created) ClusterIP must not keep being shown to the application.
    match F::service(
        front_address,
        front_port,
        proto,
        kpr_common::SCOPE_INTERNAL,
        0,
    ) {
        Some(f) if f.rev_nat_id == rev_nat_id => {}
        _ => {
            F::forget_revnat(cookie, (address, port_be));
            count(Counter::RevNatStale);
            return None;
        }
    }
    count(Counter::RevTranslated);
    Some((front_address, front_port))
}
