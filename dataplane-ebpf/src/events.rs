//! Datapath events for an operator debugging a Service (`kpr --datapath-events`): each
//! translation, with its frontend, backend and whether session affinity chose it, and each
//! drop or refusal with its reason. They travel as aya-log records through aya-log's ring
//! buffer; the agent names the Service and the reason and logs them through `tracing`.
//!
//! Off (the default) costs nothing: [`KPR_DATAPATH_EVENTS`] is read-only data the agent sets
//! at load time, so the verifier knows its value and removes every event branch from the
//! loaded program. On, events are limited to [`EVENTS_PER_SECOND`] per CPU; the rest are
//! counted (`Counter::EventsSuppressed`), so a flood costs one map update per packet, not a
//! record.
//!
//! The messages are `key=value` text the agent reads back: `rev_nat=` names the frontend's
//! Service, `reason=` a `Counter`. Keep the keys as they are (userspace `ebpf::events`).
use aya_ebpf::{
    helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray, programs::TcContext, EbpfContext,
};
use aya_log_ebpf::{info, warn};
use kpr_common::{Counter, EventRate};

use crate::{count, packet::Packet};

/// 1 when the agent runs with `--datapath-events`. Replaced at load time.
#[unsafe(no_mangle)]
static KPR_DATAPATH_EVENTS: u8 = 0;

/// The most events one CPU emits in one second.
const EVENTS_PER_SECOND: u32 = 200;

// Per CPU: no atomics, and a busy CPU does not starve the others' events. Not pinned: a
// restarted agent starts a new window.
#[map(name = "KPR_EVRATE_V1")]
static EVENT_RATE: PerCpuArray<EventRate> = PerCpuArray::with_max_entries(1, 0);

/// Whether to emit an event now: events are on and this CPU is within its budget.
#[inline(always)]
fn emit() -> bool {
    // SAFETY: a plain static; read_volatile keeps the compiler from folding in the default
    // the agent replaces at load time (the verifier, which sees the real value, folds it).
    if unsafe { core::ptr::read_volatile(&KPR_DATAPATH_EVENTS) } == 0 {
        return false;
    }
    let Some(rate) = EVENT_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot; nothing else writes it while the program runs.
    let rate = unsafe { &mut *rate };
    if now.wrapping_sub(rate.window_start_ns) >= 1_000_000_000 {
        rate.window_start_ns = now;
        rate.emitted = 0;
    }
    if rate.emitted >= EVENTS_PER_SECOND {
        count(Counter::EventsSuppressed);
        return false;
    }
    rate.emitted += 1;
    true
}

/// An address as aya-log's `{:i}` prints it (network byte order).
#[inline(always)]
fn ip(address_be: u32) -> [u8; 4] {
    address_be.to_ne_bytes()
}

/// connect()/sendmsg() to a frontend was sent to a backend.
#[inline(always)]
pub fn socket_translated<C: EbpfContext>(
    ctx: &C,
    proto: u8,
    frontend: (u32, u16),
    backend: (u32, u16),
    rev_nat_id: u32,
    affinity: bool,
) {
    if emit() {
        info!(
            ctx,
            "socket translated proto={} frontend={:i}:{} backend={:i}:{} rev_nat={} affinity={}",
            proto,
            ip(frontend.0),
            u16::from_be(frontend.1),
            ip(backend.0),
            u16::from_be(backend.1),
            rev_nat_id,
            u8::from(affinity)
        );
    }
}

/// connect()/sendmsg() to a frontend was refused.
#[inline(always)]
pub fn socket_refused<C: EbpfContext>(
    ctx: &C,
    proto: u8,
    frontend: (u32, u16),
    rev_nat_id: u32,
    reason: Counter,
) {
    if emit() {
        warn!(
            ctx,
            "socket refused proto={} frontend={:i}:{} rev_nat={} reason={}",
            proto,
            ip(frontend.0),
            u16::from_be(frontend.1),
            rev_nat_id,
            reason as u32
        );
    }
}

/// tc ingress: a new flow from outside the node was sent to a backend.
#[inline(always)]
pub fn flow_translated<C: EbpfContext>(
    ctx: &C,
    proto: u8,
    client: (u32, u16),
    frontend: (u32, u16),
    backend: (u32, u16),
    rev_nat_id: u32,
    affinity: bool,
) {
    if emit() {
        info!(
            ctx,
            "flow translated proto={} client={:i}:{} frontend={:i}:{} backend={:i}:{} rev_nat={} affinity={}",
            proto,
            ip(client.0),
            u16::from_be(client.1),
            ip(frontend.0),
            u16::from_be(frontend.1),
            ip(backend.0),
            u16::from_be(backend.1),
            rev_nat_id,
            u8::from(affinity)
        );
    }
}

/// tc ingress: a packet to a frontend was dropped.
#[inline(always)]
pub fn flow_dropped<C: EbpfContext>(
    ctx: &C,
    proto: u8,
    client: (u32, u16),
    frontend: (u32, u16),
    rev_nat_id: u32,
    reason: Counter,
) {
    if emit() {
        warn!(
            ctx,
            "flow dropped proto={} client={:i}:{} frontend={:i}:{} rev_nat={} reason={}",
            proto,
            ip(client.0),
            u16::from_be(client.1),
            ip(frontend.0),
            u16::from_be(frontend.1),
            rev_nat_id,
            reason as u32
        );
    }
}

/// An IPv6 address as aya-log's `{:i}` prints it: its 16 bytes in network order. The messages
/// bracket it (`[fd00::1]:80`), so the agent reads `frontend=` back as a socket address.
#[inline(always)]
fn ip6(address_be: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = address_be[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// [`socket_translated`] for IPv6.
#[inline(always)]
pub fn socket_translated6<C: EbpfContext>(
    ctx: &C,
    proto: u8,
    frontend: ([u32; 4], u16),
    backend: ([u32; 4], u16),
    rev_nat_id: u32,
    affinity: bool,
) {
    if emit() {
        info!(
            ctx,
            "socket translated proto={} frontend=[{:i}]:{} backend=[{:i}]:{} rev_nat={} affinity={}",
            proto,
            ip6(frontend.0),
            u16::from_be(frontend.1),
            ip6(backend.0),
            u16::from_be(backend.1),
            rev_nat_id,
            u8::from(affinity)
        );
    }
}

/// [`socket_refused`] for IPv6.
#[inline(always)]
pub fn socket_refused6<C: EbpfContext>(
    ctx: &C,
    proto: u8,
    frontend: ([u32; 4], u16),
    rev_nat_id: u32,
    reason: Counter,
) {
    if emit() {
        warn!(
            ctx,
            "socket refused proto={} frontend=[{:i}]:{} rev_nat={} reason={}",
            proto,
            ip6(frontend.0),
            u16::from_be(frontend.1),
            rev_nat_id,
            reason as u32
        );
    }
}

/// Whether events are on at all (the value the agent set at load time), without taking from
/// the rate budget: lets an event that is a BPF call of its own skip the call when off.
#[inline(always)]
pub fn enabled() -> bool {
    // SAFETY: as in `emit`.
    unsafe { core::ptr::read_volatile(&KPR_DATAPATH_EVENTS) != 0 }
}

/// An IPv6 tc event waiting to be logged. The IPv6 path is deep (see
/// `Family::SPLIT_TC_FRAMES`): a record's arguments do not fit on top of it within the
/// verifier's 512 bytes of stack, so the path writes the event here and the program's entry
/// point, with the path's frames gone, logs it ([`flush6`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    backend: [u32; 4],
    sport: u16,
    dport: u16,
    backend_port: u16,
    proto: u8,
    /// [`PENDING_NONE`], [`PENDING_TRANSLATED`] or [`PENDING_DROPPED`].
    kind: u8,
    rev_nat_id: u32,
    /// The drop's `Counter`; for a translation, 1 when affinity chose the backend.
    detail: u32,
}

const PENDING_NONE: u8 = 0;
const PENDING_TRANSLATED: u8 = 1;
const PENDING_DROPPED: u8 = 2;

// Per CPU: a program runs to its end on one CPU, so the entry written by the path is the one
// its entry point reads. Not pinned.
#[map(name = "KPR_EVPEND6_V1")]
static PENDING6: PerCpuArray<Pending6> = PerCpuArray::with_max_entries(1, 0);

/// A BPF call of its own, taking everything by reference: inlined, its copies would grow
/// the IPv6 path's frame.
#[inline(never)]
fn pend6(
    pkt: &Packet<[u32; 4]>,
    kind: u8,
    backend: &([u32; 4], u16),
    rev_nat_id: u32,
    detail: u32,
) {
    let Some(p) = PENDING6.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; nothing else writes it while the program runs.
    let p = unsafe { &mut *p };
    p.saddr = pkt.saddr;
    p.daddr = pkt.daddr;
    p.sport = pkt.sport;
    p.dport = pkt.dport;
    p.proto = pkt.proto;
    p.backend = backend.0;
    p.backend_port = backend.1;
    p.rev_nat_id = rev_nat_id;
    p.detail = detail;
    p.kind = kind;
}

/// [`flow_translated`] for IPv6, logged by [`flush6`].
#[inline(always)]
pub fn flow_translated6(
    pkt: &Packet<[u32; 4]>,
    backend: &([u32; 4], u16),
    rev_nat_id: u32,
    affinity: bool,
) {
    if enabled() {
        pend6(
            pkt,
            PENDING_TRANSLATED,
            backend,
            rev_nat_id,
            u32::from(affinity),
        );
    }
}

/// [`flow_dropped`] for IPv6, logged by [`flush6`].
#[inline(always)]
pub fn flow_dropped6(pkt: &Packet<[u32; 4]>, rev_nat_id: u32, reason: Counter) {
    if enabled() {
        // A constant: promoted to a static, not built on the stack.
        pend6(
            pkt,
            PENDING_DROPPED,
            &([0; 4], 0),
            rev_nat_id,
            reason as u32,
        );
    }
}

/// Logs the IPv6 event the path left, if any. Called by the tc entry point after the path
/// returned, so the record's frame is not added to the path's.
#[inline(never)]
pub fn flush6(ctx: &TcContext) {
    let Some(p) = PENDING6.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, as in `pend6`.
    let p = unsafe { &mut *p };
    match p.kind {
        PENDING_TRANSLATED => log_translated6(ctx, p),
        PENDING_DROPPED => log_dropped6(ctx, p),
        _ => return,
    }
    p.kind = PENDING_NONE;
}

#[inline(never)]
fn log_translated6(ctx: &TcContext, p: &Pending6) {
    if emit() {
        info!(
            ctx,
            "flow translated proto={} client=[{:i}]:{} frontend=[{:i}]:{} backend=[{:i}]:{} rev_nat={} affinity={}",
            p.proto,
            ip6(p.saddr),
            u16::from_be(p.sport),
            ip6(p.daddr),
            u16::from_be(p.dport),
            ip6(p.backend),
            u16::from_be(p.backend_port),
            p.rev_nat_id,
            p.detail
        );
    }
}

#[inline(never)]
fn log_dropped6(ctx: &TcContext, p: &Pending6) {
    if emit() {
        warn!(
            ctx,
            "flow dropped proto={} client=[{:i}]:{} frontend=[{:i}]:{} rev_nat={} reason={}",
            p.proto,
            ip6(p.saddr),
            u16::from_be(p.sport),
            ip6(p.daddr),
            u16::from_be(p.dport),
            p.rev_nat_id,
            p.detail
        );
    }
}
