//! Choosing a frontend's backend: one function for both families and for every path (the
//! socket programs, the tc programs), as Cilium's `lb4/lb6_select_backend`. The callers differ
//! only in what they remember a client by (a socket, a network namespace, a client address),
//! so they look that up themselves and pass it in.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use kpr_common::{Affinity4Value, Counter, Service4Value, AFFINITY_SCAN_MAX};

use crate::count;
use crate::family::Family;

/// A frontend in one scope, as the services maps key it: (address, port, protocol, scope).
pub type FrontendRef<A> = (A, u16, u8, u8);

/// A backend chosen for a new connection (or datagram).
#[derive(Clone, Copy)]
pub struct Selected<A> {
    pub slot: u16,
    pub backend_id: u32,
    pub backend: (A, u16),
    /// Session affinity chose it.
    pub by_affinity: bool,
}

impl<A> Selected<A> {
    /// The client's affinity entry for this choice, as of `now`: what every path stores.
    #[inline(always)]
    pub fn affinity_entry(&self, now: u64) -> Affinity4Value {
        Affinity4Value {
            last_used_ns: now,
            backend_id: self.backend_id,
            slot: self.slot,
            pad: 0,
        }
    }
}

/// What the caller remembers of the client, each as last recorded. Backend id 0 (never a
/// backend's) means nothing is remembered: plain values, not `Option`s, because an `Option`'s
/// payload is undefined when it is `None`, and copying undefined bytes is something the
/// verifier refuses (it reads them as uninitialised registers).
pub struct Remembered {
    /// (slot, backend id) this socket used for the frontend before (unconnected UDP).
    pub sticky: (u16, u32),
    /// The client's session-affinity entry, when the frontend has affinity.
    pub affinity: Affinity4Value,
    /// Now (`bpf_ktime_get_ns`), for the affinity timeout.
    pub now: u64,
}

/// No affinity entry.
pub const NO_AFFINITY: Affinity4Value = Affinity4Value {
    last_used_ns: 0,
    backend_id: 0,
    slot: 0,
    pad: 0,
};

/// Chooses the backend of `frontend` (slot 0's value `svc`, `svc.count > 0`): the remembered
/// sticky backend, else the client's affinity backend (unless its timeout, slot 0's
/// `backend_id` in seconds, passed since its last new connection), each only while the
/// frontend still has it; else a slot at random.
#[inline(always)]
pub fn select_backend<F: Family>(
    frontend: &FrontendRef<F::Addr>,
    svc: &Service4Value,
    remembered: &Remembered,
) -> Result<Selected<F::Addr>, Counter> {
    let (address, port_be, proto, scope) = *frontend;
    let holds = |slot: u16, backend_id: u32| {
        matches!(
            F::service(address, port_be, proto, scope, slot),
            Some(v) if v.backend_id == backend_id
        )
    };
    let mut chosen: Option<(u16, u32)> = None;
    let mut by_affinity = false;
    let (sticky_slot, sticky_id) = remembered.sticky;
    if sticky_id != 0 {
        if let Some(slot) = backend_slot(holds, svc.count, sticky_slot, sticky_id) {
            chosen = Some((slot, sticky_id));
            count(Counter::StickyReused);
        }
    }
    if chosen.is_none() && remembered.affinity.backend_id != 0 {
        {
            let prev = remembered.affinity;
            let timeout_ns = u64::from(svc.backend_id) * 1_000_000_000;
            if remembered.now.wrapping_sub(prev.last_used_ns) <= timeout_ns {
                if let Some(slot) = backend_slot(holds, svc.count, prev.slot, prev.backend_id) {
                    chosen = Some((slot, prev.backend_id));
                    by_affinity = true;
                    count(Counter::AffinityReused);
                }
            }
        }
    }
    let (slot, backend_id) = match chosen {
        Some(c) => c,
        None => {
            // SAFETY: helper without preconditions.
            let random = unsafe { bpf_get_prandom_u32() };
            // count is not 0 here; checked_rem keeps a panic path (which the verifier
            // rejects in a function of its own) out of the program.
            let Some(pick) = random.checked_rem(u32::from(svc.count)) else {
                return Err(Counter::DropNoBackend);
            };
            let slot = pick as u16 + 1;
            match F::service(address, port_be, proto, scope, slot) {
                Some(v) => (slot, v.backend_id),
                None => return Err(Counter::DropSlotMissing),
            }
        }
    };
    let Some(backend) = F::backend(backend_id) else {
        return Err(Counter::DropBackendMissing);
    };
    Ok(Selected {
        slot,
        backend_id,
        backend,
        by_affinity,
    })
}

/// The slot of a frontend (with `count` backends) that holds `backend_id` (`holds` reads a
/// slot): `hint` if it still does, else the first of up to AFFINITY_SCAN_MAX slots that does.
/// None when the backend left the service. Also how conntrack checks a flow's backend.
#[inline(always)]
pub fn backend_slot(
    holds: impl Fn(u16, u32) -> bool,
    count: u16,
    hint: u16,
    backend_id: u32,
) -> Option<u16> {
    if hint >= 1 && hint <= count && holds(hint, backend_id) {
        return Some(hint);
    }
    let mut slot = 1;
    while slot <= AFFINITY_SCAN_MAX {
        if slot > count {
            break;
        }
        if holds(slot, backend_id) {
            return Some(slot);
        }
        slot += 1;
    }
    None
}
