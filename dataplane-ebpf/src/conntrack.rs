//! Connection tracking for north-south flows (the tc programs).
//!
//! Each translated flow has two entries (see `CtKey`; each family has its own maps):
//! - forward, keyed by the packet as the client sends it (client → frontend): which backend
//!   the flow goes to. Looked up by every ingress packet to an external frontend, so a flow
//!   stays on its backend even when the service's backend set changes;
//! - reverse, keyed by the reply as the backend sends it (backend → client): which frontend
//!   to show the client again. Looked up by every egress packet.
//!
//! Entries have a state (`CT_FLAG_*`: reply seen, FIN from either side, RST) and a lifetime
//! that follows it (`CtTimeouts`, netfilter's defaults with kube-proxy's settings). An expired
//! entry is ignored and removed by the packet that finds it; the agent's garbage collector
//! removes the rest.
//!
//! Two maps, so that a flood of new flows cannot evict established ones (netfilter's early
//! drop of unassured entries does the same):
//! - `KPR_CT4NEW_V1` (LRU) holds flows that are not established yet: a TCP flow until the
//!   client's first segment after the backend answered, a UDP flow until the first reply;
//! - `KPR_CT4_V2` (hash, not evicted) holds established flows. A flow moves there when it
//!   becomes established; if that map is full it stays among the new ones (counted).
//!
//! A reply tuple is shared between a translated flow and a direct connection from the same
//! client port to the backend's own address (a pod IP routed to the node): replies of both
//! look alike on egress. A new connection kpr does not translate (a TCP SYN, or a UDP packet,
//! to an address that is not a frontend) therefore removes the translated flow whose reply
//! tuple it has ([`replace_untranslated`]): the newer connection wins, as it would win a
//! client port in the client's own stack.

use kpr_common::{
    ct_tcp_closed, Counter, CtKey, CtTimeouts, CtValue, CT_DIR_FORWARD, CT_DIR_REVERSE,
    CT_FLAG_FIN_BACKEND, CT_FLAG_FIN_CLIENT, CT_FLAG_MASQ, CT_FLAG_RST, CT_FLAG_SEEN_REPLY,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::family::Family;
use crate::select::backend_slot;
use crate::{count, packet::Packet};

/// A family's conntrack key and value.
type Key<F> = CtKey<<F as Family>::Addr>;
type Value<F> = CtValue<<F as Family>::Addr, <F as Family>::CtPad>;

/// How often (at most) a flow's `last_seen_ns` is refreshed: writing the entries on every
/// packet would cost two map updates per packet for a lifetime that only needs seconds.
const REFRESH_NS: u64 = 1_000_000_000;

/// Lifetimes by state, set by the agent at load time (a read-only global: the verifier sees
/// the agent's values).
#[no_mangle]
static CT_TIMEOUTS: CtTimeouts = CtTimeouts::DEFAULT;

/// The backend a flow goes to.
#[derive(Clone, Copy)]
pub struct Choice<A> {
    pub backend_id: u32,
    pub slot: u16,
    pub address_be: A,
    pub port_be: u16,
    /// Masquerade the flow (externalTrafficPolicy: Cluster).
    pub masq: bool,
}

/// Which conntrack map an entry is in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Established,
    New,
}

impl Table {
    #[inline(always)]
    fn get_ptr_mut<F: Family>(self, key: &Key<F>) -> Option<*mut Value<F>> {
        match self {
            Table::Established => F::ct().get_ptr_mut(key),
            Table::New => F::ct_new().get_ptr_mut(key),
        }
    }

    #[inline(always)]
    fn insert<F: Family>(self, key: &Key<F>, value: &Value<F>) -> Result<(), i32> {
        match self {
            Table::Established => F::ct().insert(key, value, 0).map(|_| ()),
            Table::New => F::ct_new().insert(key, value, 0).map(|_| ()),
        }
    }

    #[inline(always)]
    fn remove<F: Family>(self, key: &Key<F>) {
        // A missing key is fine: another CPU removed it, or the LRU evicted it.
        let _ = match self {
            Table::Established => F::ct().remove(key),
            Table::New => F::ct_new().remove(key),
        };
    }
}

/// An entry found by [`find`], and where it lives. Read in place, not copied: an IPv6 value is
/// 48 bytes of a 512-byte stack.
struct Found<F: Family> {
    ptr: *mut Value<F>,
    table: Table,
}

impl<F: Family> Found<F> {
    #[inline(always)]
    fn value(&self) -> &Value<F> {
        // SAFETY: a pointer to a map value, valid for this program run. Another CPU may write
        // it meanwhile (see `touch`); every field read is a plain value.
        unsafe { &*self.ptr }
    }
}

/// The entry of `key` in `table`.
#[inline(always)]
fn find_in<F: Family>(table: Table, key: &Key<F>) -> Option<Found<F>> {
    let ptr = table.get_ptr_mut::<F>(key)?;
    Some(Found { ptr, table })
}

/// The entry of `key`, established flows first (the common case for a packet that has one).
#[inline(always)]
fn find<F: Family>(key: &Key<F>) -> Option<Found<F>> {
    find_in::<F>(Table::Established, key).or_else(|| find_in::<F>(Table::New, key))
}

/// The entry of `key` if it is still within its lifetime at `now`; an expired one is removed
/// with its sibling (and counted), and the packet is one of no known flow.
#[inline(always)]
fn find_alive<F: Family>(key: &Key<F>, now: u64) -> Option<Found<F>> {
    let found = find::<F>(key)?;
    if !alive::<F>(key, found.value(), now) {
        count(Counter::TcCtExpired);
        remove_flow::<F>(&found, key);
        return None;
    }
    Some(found)
}

#[inline(always)]
fn timeouts() -> CtTimeouts {
    // SAFETY: a plain static; read_volatile keeps the compiler from folding in the default the
    // agent replaces at load time.
    unsafe { core::ptr::read_volatile(&CT_TIMEOUTS) }
}

/// The entry is still within its lifetime. A `last_seen_ns` a little ahead of `now` (written
/// by another CPU meanwhile) counts as just seen.
#[inline(always)]
fn alive<F: Family>(key: &Key<F>, v: &Value<F>, now: u64) -> bool {
    let lifetime_ns = u64::from(timeouts().lifetime_s(key.proto, v.flags)) * 1_000_000_000;
    now.saturating_sub(v.last_seen_ns) <= lifetime_ns
}

/// The other entry of the flow `key` belongs to.
#[inline(always)]
fn sibling<F: Family>(key: &Key<F>, v: &Value<F>) -> Key<F> {
    if key.dir == CT_DIR_FORWARD {
        // client → frontend; the reply is backend → client.
        CtKey::new(
            v.address_be,
            v.port_be,
            key.saddr_be,
            key.sport_be,
            key.proto,
            CT_DIR_REVERSE,
        )
    } else {
        // backend → client; the request was client → frontend.
        CtKey::new(
            key.daddr_be,
            key.dport_be,
            v.address_be,
            v.port_be,
            key.proto,
            CT_DIR_FORWARD,
        )
    }
}

/// Removes the flow `key` belongs to (both entries).
#[inline(always)]
fn remove_flow<F: Family>(found: &Found<F>, key: &Key<F>) {
    found.table.remove::<F>(&sibling::<F>(key, found.value()));
    found.table.remove::<F>(key);
}

/// Writes `flags` and `now` into the entry and its sibling (same map).
#[inline(always)]
fn touch<F: Family>(found: &Found<F>, key: &Key<F>, flags: u8, slot: u16, now: u64) {
    // SAFETY: pointers to map values, valid for this program run. Another CPU may write the
    // same entries at the same time; both store the same backend and a similar time, and flags
    // only ever gain bits, so a lost update costs at most one more refresh.
    unsafe {
        (*found.ptr).flags = flags;
        (*found.ptr).last_seen_ns = now;
        (*found.ptr).slot = slot;
    }
    if let Some(other) = found
        .table
        .get_ptr_mut::<F>(&sibling::<F>(key, found.value()))
    {
        // SAFETY: as above.
        unsafe {
            (*other).flags = flags;
            (*other).last_seen_ns = now;
            (*other).slot = slot;
        }
    }
}

/// The state bits a TCP packet adds: `fin` (the sender's FIN bit) and RST.
#[inline(always)]
fn tcp_flags_of<A>(pkt: &Packet<A>, fin: u8) -> u8 {
    if pkt.proto != IPPROTO_TCP {
        return 0;
    }
    let mut f = 0;
    if pkt.is_tcp_fin() {
        f |= fin;
    }
    if pkt.is_tcp_rst() {
        f |= CT_FLAG_RST;
    }
    f
}

#[inline(always)]
pub fn forward_key<A: Copy>(pkt: &Packet<A>) -> CtKey<A> {
    CtKey::new(
        pkt.saddr,
        pkt.sport,
        pkt.daddr,
        pkt.dport,
        pkt.proto,
        CT_DIR_FORWARD,
    )
}

/// The reply as the backend sends it: the key of the reverse entry.
#[inline(always)]
pub fn reply_key<A: Copy>(pkt: &Packet<A>) -> CtKey<A> {
    CtKey {
        dir: CT_DIR_REVERSE,
        ..forward_key(pkt)
    }
}

/// [`lookup`] as a function of its own (BPF-to-BPF call): see `Family::SPLIT_TC_FRAMES`.
#[inline(never)]
pub fn lookup_call<F: Family>(
    pkt: &Packet<F::Addr>,
    frontend: &(F::Addr, u16, u8, u8),
    count_: u16,
    now: u64,
) -> Option<Known<F::Addr>> {
    lookup::<F>(pkt, frontend, count_, now)
}

/// A known flow's backend, and whether the packet establishes the flow (its new state and
/// slot): the caller moves it with [`establish_new`] then, in a call of its own where the
/// family's frames are split (see `Family::SPLIT_TC_FRAMES`), else [`lookup`] already did.
#[derive(Clone, Copy)]
pub struct Known<A> {
    pub choice: Choice<A>,
    pub establish: Option<(u8, u16)>,
}

/// Moves the new flow of `pkt` (client → frontend) to the established map with `flags` and
/// `slot`, as [`lookup`] decided. Not inlined: see `Family::SPLIT_TC_FRAMES`.
#[inline(never)]
pub fn establish_new<F: Family>(pkt: &Packet<F::Addr>, state: &(u8, u16), now: u64) {
    let key = forward_key(pkt);
    if let Some(found) = find_in::<F>(Table::New, &key) {
        establish::<F>(&found, &key, state.0, state.1, now);
    }
}

/// The backend of a known flow of `pkt` (client → `frontend`, which has `count` slots), if
/// the flow is alive and its backend still one of the frontend's. Otherwise the flow's
/// entries go and the caller treats the packet as one of no known flow (re-balanced if it may
/// start one, i.e. UDP or a TCP SYN; a TCP segment goes to the stack, which resets the
/// connection, as the backend is gone). A SYN from the client port of a TCP flow that closed
/// starts a new connection.
#[inline(always)]
pub fn lookup<F: Family>(
    pkt: &Packet<F::Addr>,
    frontend: &(F::Addr, u16, u8, u8),
    count_: u16,
    now: u64,
) -> Option<Known<F::Addr>> {
    let key = forward_key(pkt);
    let found = find_alive::<F>(&key, now)?;
    let ct = found.value();
    if pkt.is_tcp_syn() && ct_tcp_closed(ct.flags) {
        remove_flow::<F>(&found, &key);
        return None;
    }
    let holds = |slot: u16, backend_id: u32| {
        matches!(
            F::service(frontend.0, frontend.1, frontend.2, frontend.3, slot),
            Some(v) if v.backend_id == backend_id
        )
    };
    let Some(slot) = backend_slot(holds, count_, ct.slot, ct.backend_id) else {
        remove_flow::<F>(&found, &key);
        return None;
    };
    let flags = ct.flags | tcp_flags_of(pkt, CT_FLAG_FIN_CLIENT);
    let mut pending = None;
    if found.table == Table::New
        && pkt.proto == IPPROTO_TCP
        && ct.flags & CT_FLAG_SEEN_REPLY != 0
        && !pkt.is_tcp_syn()
        && !pkt.is_tcp_rst()
    {
        // The client answered the backend's SYN-ACK: the connection is established. (A RST
        // instead, as a SYN flood's spoofed or vanished clients send, ends it where it is.)
        if F::SPLIT_TC_FRAMES {
            pending = Some((flags, slot));
        } else {
            establish::<F>(&found, &key, flags, slot, now);
        }
    } else if flags != ct.flags
        || slot != ct.slot
        || now.saturating_sub(ct.last_seen_ns) > REFRESH_NS
    {
        touch::<F>(&found, &key, flags, slot, now);
    }
    Some(Known {
        choice: Choice {
            backend_id: ct.backend_id,
            slot,
            address_be: ct.address_be,
            port_be: ct.port_be,
            masq: ct.flags & CT_FLAG_MASQ != 0,
        },
        establish: pending,
    })
}

/// Moves the flow of `found` (a new flow) to the established map with `flags`. When that map
/// is full the flow stays where it is, updated.
#[inline(always)]
fn establish<F: Family>(found: &Found<F>, key: &Key<F>, flags: u8, slot: u16, now: u64) {
    // Both entries are updated where they are, then copied to the established map straight
    // from the new map's values: no copies on the stack, which the IPv6 path has no room for.
    touch::<F>(found, key, flags, slot, now);
    let other_key = sibling::<F>(key, found.value());
    let Some(other) = Table::New.get_ptr_mut::<F>(&other_key) else {
        // The sibling was evicted: the flow's replies are not translated any more; it stays
        // among the new flows and ages out.
        return;
    };
    // SAFETY: a pointer to a map value, valid for this program run.
    if Table::Established
        .insert::<F>(&other_key, unsafe { &*other })
        .is_err()
    {
        count(Counter::CtEstablishedFull);
        return;
    }
    if Table::Established.insert::<F>(key, found.value()).is_err() {
        Table::Established.remove::<F>(&other_key);
        count(Counter::CtEstablishedFull);
        return;
    }
    Table::New.remove::<F>(&other_key);
    Table::New.remove::<F>(key);
}

/// Records a new flow of `pkt` (client → frontend) to `choice`, among the new flows: the
/// established flow it would shadow goes ([`evict_shadowed`]), then its entries are written
/// ([`insert_new`]).
#[inline(always)]
pub fn create<F: Family>(
    pkt: &Packet<F::Addr>,
    choice: &Choice<F::Addr>,
    rev_nat_id: u32,
    now: u64,
) -> Result<(), Counter> {
    evict_shadowed::<F>(pkt, choice);
    insert_new::<F>(pkt, choice, rev_nat_id, now)
}

/// An established flow with the reply tuple of a new flow of `pkt` to `choice` (the same
/// client port, earlier, to another frontend of the same backend) is removed, or its reverse
/// entry (looked up first) would answer for the new flow's replies. Only established flows
/// need it: a new flow's reverse entry is overwritten by [`insert_new`] (its forward entry,
/// left without a reverse, ages out of the LRU).
#[inline(always)]
pub fn evict_shadowed<F: Family>(pkt: &Packet<F::Addr>, choice: &Choice<F::Addr>) {
    let key = reverse_key::<F>(pkt, choice);
    if let Some(old) = find_in::<F>(Table::Established, &key) {
        remove_flow::<F>(&old, &key);
    }
}

/// The reverse (backend → client) key of a new flow of `pkt` to `choice`.
#[inline(always)]
fn reverse_key<F: Family>(pkt: &Packet<F::Addr>, choice: &Choice<F::Addr>) -> Key<F> {
    CtKey::new(
        choice.address_be,
        choice.port_be,
        pkt.saddr,
        pkt.sport,
        pkt.proto,
        CT_DIR_REVERSE,
    )
}

/// Writes a new flow's entries. The reverse entry is written first: a forward entry without
/// its reverse would translate requests whose replies are then not translated back. A reverse
/// entry without a forward one (the second write failed) is harmless and evicted by the LRU.
#[inline(always)]
pub fn insert_new<F: Family>(
    pkt: &Packet<F::Addr>,
    choice: &Choice<F::Addr>,
    rev_nat_id: u32,
    now: u64,
) -> Result<(), Counter> {
    let flags = if choice.masq { CT_FLAG_MASQ } else { 0 };
    // One key and one value on the stack, rewritten from the reverse entry into the forward
    // one (the IPv6 path has no room for two of each).
    let mut key = reverse_key::<F>(pkt, choice);
    let mut value: Value<F> = CtValue {
        last_seen_ns: now,
        backend_id: choice.backend_id,
        rev_nat_id,
        address_be: pkt.daddr,
        port_be: pkt.dport,
        slot: choice.slot,
        flags,
        pad: Default::default(),
    };
    if Table::New.insert::<F>(&key, &value).is_err() {
        return Err(Counter::CtCreateFailed);
    }
    key = forward_key(pkt);
    value.address_be = choice.address_be;
    value.port_be = choice.port_be;
    if Table::New.insert::<F>(&key, &value).is_err() {
        return Err(Counter::CtCreateFailed);
    }
    Ok(())
}

/// The frontend to show for a reply `pkt` (backend → client), if it belongs to a live
/// translated flow: (frontend address, frontend port). The reply updates the flow's state; a
/// UDP flow's first reply establishes it.
#[inline(always)]
pub fn reverse<F: Family>(pkt: &Packet<F::Addr>, now: u64) -> Option<(F::Addr, u16)> {
    let key = reply_key(pkt);
    let found = find_alive::<F>(&key, now)?;
    let ct = found.value();
    let flags = ct.flags | CT_FLAG_SEEN_REPLY | tcp_flags_of(pkt, CT_FLAG_FIN_BACKEND);
    if found.table == Table::New && pkt.proto == IPPROTO_UDP {
        establish::<F>(&found, &key, flags, ct.slot, now);
    } else if flags != ct.flags || now.saturating_sub(ct.last_seen_ns) > REFRESH_NS {
        touch::<F>(&found, &key, flags, ct.slot, now);
    }
    Some((ct.address_be, ct.port_be))
}

/// [`replace_untranslated`] as a function of its own: see `Family::SPLIT_TC_FRAMES`.
#[inline(never)]
pub fn replace_untranslated_call<F: Family>(pkt: &Packet<F::Addr>) {
    replace_untranslated::<F>(pkt)
}

/// `pkt` reached the node for an address that is not a frontend: kpr does not translate it.
/// If it opens a connection (a TCP SYN; any UDP packet, as UDP has no opening) whose reply
/// tuple is a translated flow's, that flow goes (see the module doc).
#[inline(always)]
pub fn replace_untranslated<F: Family>(pkt: &Packet<F::Addr>) {
    if !(pkt.proto == IPPROTO_UDP || pkt.is_tcp_syn()) {
        return;
    }
    // The replies of `pkt`'s connection: from its destination back to its source.
    let key: Key<F> = CtKey::new(
        pkt.daddr,
        pkt.dport,
        pkt.saddr,
        pkt.sport,
        pkt.proto,
        CT_DIR_REVERSE,
    );
    if let Some(found) = find::<F>(&key) {
        remove_flow::<F>(&found, &key);
        count(Counter::TcCtReplaced);
    }
}
