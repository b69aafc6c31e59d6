//! Connection tracking for north-south flows (the tc programs).
//!
//! Each translated flow has two entries in `KPR_CT4_V1` (an LRU hash, so flows that end are
//! never deleted explicitly: the LRU evicts them, and the agent purges the entries of backends
//! that left the service):
//! - forward, keyed by the packet as the client sends it (client → frontend): which backend
//!   the flow goes to. Looked up by every ingress packet to an external frontend, so a flow
//!   stays on its backend even when the service's backend set changes;
//! - reverse, keyed by the reply as the backend sends it (backend → client): which frontend
//!   to show the client again. Looked up by every egress packet.
//!
//! There is no TCP state machine and no timeout: an entry lives until the LRU evicts it or the
//! agent purges it. A TCP flow starts only at a SYN (see the tc module), so a stale entry can
//! only be reused by a new connection from the same client port to the same frontend, which
//! then goes to the backend the previous one used, if that backend is still in the service.

use kpr_common::{Counter, Ct4Key, Ct4Value, Service4Key, CT_DIR_FORWARD, CT_DIR_REVERSE};

use crate::{backend_slot, packet::Packet, CONNTRACK};

/// How often (at most) a flow's `last_seen_ns` is refreshed: writing the entry on every packet
/// would cost a map update per packet for information the agent only needs coarsely.
const REFRESH_NS: u64 = 1_000_000_000;

/// The backend a flow goes to.
#[derive(Clone, Copy)]
pub struct Choice {
    pub backend_id: u32,
    pub slot: u16,
    pub address_be: u32,
    pub port_be: u16,
    /// Masquerade the flow (externalTrafficPolicy: Cluster).
    pub masq: bool,
}

#[inline(always)]
pub fn forward_key(pkt: &Packet) -> Ct4Key {
    Ct4Key {
        saddr_be: pkt.saddr,
        daddr_be: pkt.daddr,
        sport_be: pkt.sport,
        dport_be: pkt.dport,
        proto: pkt.proto,
        dir: CT_DIR_FORWARD,
        pad: [0; 2],
    }
}

/// The reply as the backend sends it: the key of the reverse entry.
#[inline(always)]
pub fn reply_key(pkt: &Packet) -> Ct4Key {
    Ct4Key {
        saddr_be: pkt.saddr,
        daddr_be: pkt.daddr,
        sport_be: pkt.sport,
        dport_be: pkt.dport,
        proto: pkt.proto,
        dir: CT_DIR_REVERSE,
        pad: [0; 2],
    }
}

/// The backend of a known flow, if the flow is known and its backend is still one of the
/// frontend's (`count` slots of `frontend`). A flow whose backend left the service gets None:
/// the caller treats it as a new flow (re-balanced if it may start one, i.e. UDP or a TCP SYN;
/// a TCP segment of it goes to the stack, which resets the connection, as the backend is gone).
#[inline(always)]
pub fn lookup(key: &Ct4Key, frontend: &Service4Key, count: u16, now: u64) -> Option<Choice> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a pointer to the map value, valid for this program run; read once.
    let ct: Ct4Value = unsafe { *entry };
    let slot = backend_slot(frontend, count, ct.slot, ct.backend_id)?;
    if slot != ct.slot || now.wrapping_sub(ct.last_seen_ns) > REFRESH_NS {
        // SAFETY: as above. Another CPU may write the same entry at the same time; both
        // writers store the same backend and a similar time, so either result is fine.
        unsafe {
            (*entry).slot = slot;
            (*entry).last_seen_ns = now;
        }
    }
    Some(Choice {
        backend_id: ct.backend_id,
        slot,
        address_be: ct.address_be,
        port_be: ct.port_be,
        masq: ct.flags & kpr_common::CT_FLAG_MASQ != 0,
    })
}

/// Records a new flow of `pkt` (client → frontend) to `choice`. The reverse entry is written
/// first: a forward entry without its reverse would translate requests whose replies are then
/// not translated back. A reverse entry without a forward one (the second write failed) is
/// harmless and evicted by the LRU.
#[inline(always)]
pub fn create(pkt: &Packet, choice: &Choice, rev_nat_id: u32, now: u64) -> Result<(), Counter> {
    let flags = if choice.masq {
        kpr_common::CT_FLAG_MASQ
    } else {
        0
    };
    let reverse_key = Ct4Key {
        saddr_be: choice.address_be,
        daddr_be: pkt.saddr,
        sport_be: choice.port_be,
        dport_be: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REVERSE,
        pad: [0; 2],
    };
    let reverse = Ct4Value {
        last_seen_ns: now,
        backend_id: choice.backend_id,
        rev_nat_id,
        address_be: pkt.daddr,
        port_be: pkt.dport,
        slot: choice.slot,
        flags,
        pad: [0; 7],
    };
    if CONNTRACK.insert(reverse_key, reverse, 0).is_err() {
        return Err(Counter::CtCreateFailed);
    }
    let forward = Ct4Value {
        address_be: choice.address_be,
        port_be: choice.port_be,
        ..reverse
    };
    if CONNTRACK.insert(forward_key(pkt), forward, 0).is_err() {
        return Err(Counter::CtCreateFailed);
    }
    Ok(())
}

/// The frontend to show for a reply, if `key` (a reply as the backend sends it) belongs to a
/// tracked flow: (frontend address, frontend port).
#[inline(always)]
pub fn reverse(key: &Ct4Key) -> Option<(u32, u16)> {
    // SAFETY: plain data, copied out at once.
    let v = unsafe { CONNTRACK.get(key) }?;
    Some((v.address_be, v.port_be))
}
