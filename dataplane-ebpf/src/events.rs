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
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray, EbpfContext};
use aya_log_ebpf::{info, warn};
use kpr_common::{Counter, EventRate};

use crate::count;

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
