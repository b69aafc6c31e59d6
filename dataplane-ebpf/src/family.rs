//! The address families as types: [`V4`] and [`V6`] name each family's maps, and every
//! program that balances (the socket programs, the tc programs with their conntrack) is written
//! once, generic over [`Family`]. Session affinity of clients on the node (keyed by network
//! namespace) and the affinity groups have no family and are shared.

use aya_ebpf::{
    maps::{lpm_trie::Key, HashMap, LruHashMap},
    programs::SockAddrContext,
};
use kpr_common::{
    Affinity4Value, AffinityExtKey, Counter, CtKey, CtValue, Service4Key, Service4Value,
    Service6Key, SockFwd4Key, SockFwd4Value, SockFwd6Key, SockRevNat4Key, SockRevNat4Value,
    SockRevNat6Key, SockRevNat6Value, SrcRangeKey,
};

use crate::{
    egress, events,
    packet::{Packet, Wire},
    AFFINITY_EXT, AFFINITY_EXT6, BACKENDS, BACKENDS6, CONNTRACK, CONNTRACK6, CONNTRACK6_NEW,
    CONNTRACK_NEW, SERVICES, SERVICES6, SOCK_FWD, SOCK_FWD6, SOCK_REVNAT, SOCK_REVNAT6, SRC_RANGES,
    SRC_RANGES6,
};

/// One address family's maps, as the socket programs use them.
pub trait Family {
    /// An address in network byte order, as `bpf_sock_addr` and packets hold it.
    type Addr: Copy + PartialEq + Wire + 'static;
    /// The conntrack value's padding (it makes the value a multiple of 8 bytes).
    type CtPad: Copy + Default + 'static;
    /// The tc ingress path in several BPF functions (calls), not one: IPv6's keys and values
    /// do not fit one 512-byte stack frame, while the IPv4 path (with its events' record
    /// arguments) fits only as one: the verifier adds up the frames of a call chain.
    const SPLIT_TC_FRAMES: bool;

    /// North-south conntrack: established flows, and flows not established yet.
    fn ct() -> &'static HashMap<CtKey<Self::Addr>, CtValue<Self::Addr, Self::CtPad>>;
    fn ct_new() -> &'static LruHashMap<CtKey<Self::Addr>, CtValue<Self::Addr, Self::CtPad>>;
    /// loadBalancerSourceRanges: whether `saddr` is allowed for frontend `rev_nat_id`.
    fn source_allowed(rev_nat_id: u32, saddr: Self::Addr) -> bool;
    /// Session affinity of clients outside the node, keyed by their address.
    fn affinity_ext(key: &AffinityExtKey<Self::Addr>) -> Option<Affinity4Value>;
    fn set_affinity_ext(key: &AffinityExtKey<Self::Addr>, value: &Affinity4Value);
    /// The local-traffic detector's CIDR of this family: whether `saddr` is in it (None:
    /// no CIDR set).
    fn local_source(saddr: Self::Addr) -> Option<bool>;
    /// tc events (see the events module): a new flow of `pkt` sent to `backend`, a packet
    /// dropped. The packet goes by reference, so an IPv6 event can be a BPF call of its own
    /// (five arguments at most) with its own frame.
    fn flow_translated(
        ctx: &aya_ebpf::programs::TcContext,
        pkt: &Packet<Self::Addr>,
        backend: &(Self::Addr, u16),
        rev_nat_id: u32,
        affinity: bool,
    );
    fn flow_dropped(
        ctx: &aya_ebpf::programs::TcContext,
        pkt: &Packet<Self::Addr>,
        rev_nat_id: u32,
        reason: Counter,
    );

    /// Slot `slot` of frontend (`address`, `port_be`, `proto`) in `scope`.
    fn service(
        address: Self::Addr,
        port_be: u16,
        proto: u8,
        scope: u8,
        slot: u16,
    ) -> Option<Service4Value>;
    /// Backend `id`'s address and port.
    fn backend(id: u32) -> Option<(Self::Addr, u16)>;
    fn is_loopback(address: Self::Addr) -> bool;
    /// The backend an unconnected socket last sent to for a frontend.
    fn sticky(cookie: u64, frontend: (Self::Addr, u16), proto: u8) -> Option<SockFwd4Value>;
    fn set_sticky(cookie: u64, frontend: (Self::Addr, u16), proto: u8, value: &SockFwd4Value);
    /// The frontend a socket talking to `backend` asked for: (address, port, rev-NAT id).
    fn revnat(cookie: u64, backend: (Self::Addr, u16)) -> Option<(Self::Addr, u16, u32)>;
    /// Records it; Err when the map refused the entry.
    fn set_revnat(
        cookie: u64,
        backend: (Self::Addr, u16),
        frontend: (Self::Addr, u16),
        rev_nat_id: u32,
    ) -> Result<(), ()>;
    fn forget_revnat(cookie: u64, backend: (Self::Addr, u16));
    /// Notes the socket's packets to `dest` for the cgroup egress program (`value`: the
    /// frontend's rev-NAT id to check source ranges against, or SOCK_CHECK_DROP).
    fn note_check(cookie: u64, dest: (Self::Addr, u16), value: u32) -> Result<(), ()>;
    /// The note of the socket's packets to `dest`, if any; and its removal.
    fn sock_check(cookie: u64, dest: (Self::Addr, u16)) -> Option<u32>;
    fn clear_check(cookie: u64, dest: (Self::Addr, u16));
    fn event_translated(
        ctx: &SockAddrContext,
        proto: u8,
        frontend: (Self::Addr, u16),
        backend: (Self::Addr, u16),
        rev_nat_id: u32,
        affinity: bool,
    );
    fn event_refused(
        ctx: &SockAddrContext,
        proto: u8,
        frontend: (Self::Addr, u16),
        rev_nat_id: u32,
        reason: Counter,
    );
}

/// The key of a socket and its peer (address, port), as the reverse-NAT and check maps key
/// them.
#[inline(always)]
fn sock_key4(cookie: u64, address_be: u32, port_be: u16) -> SockRevNat4Key {
    SockRevNat4Key {
        cookie,
        address_be,
        port_be,
        pad: 0,
    }
}

#[inline(always)]
fn sock_key6(cookie: u64, address_be: [u32; 4], port_be: u16) -> SockRevNat6Key {
    SockRevNat6Key {
        cookie,
        address_be,
        port_be,
        pad: [0; 6],
    }
}

/// IPv4: `KPR_SVC4_V1` and friends.
pub struct V4;

/// IPv6: `KPR_SVC6_V1` and friends.
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    type CtPad = [u8; 7];
    const SPLIT_TC_FRAMES: bool = false;

    #[inline(always)]
    fn ct() -> &'static HashMap<CtKey<u32>, CtValue<u32, [u8; 7]>> {
        &CONNTRACK
    }

    #[inline(always)]
    fn ct_new() -> &'static LruHashMap<CtKey<u32>, CtValue<u32, [u8; 7]>> {
        &CONNTRACK_NEW
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: u32, address_be: u32) -> bool {
        let key = Key::new(
            kpr_common::src_range_prefixlen(32),
            SrcRangeKey {
                rev_nat_id,
                address_be,
            },
        );
        SRC_RANGES.get(&key).is_some()
    }

    #[inline(always)]
    fn affinity_ext(key: &AffinityExtKey<u32>) -> Option<Affinity4Value> {
        // SAFETY: plain data, copied out at once.
        unsafe { AFFINITY_EXT.get(key) }.copied()
    }

    #[inline(always)]
    fn set_affinity_ext(key: &AffinityExtKey<u32>, value: &Affinity4Value) {
        // Best effort: without the entry the client's next connection chooses anew.
        let _ = AFFINITY_EXT.insert(key, value, 0);
    }

    #[inline(always)]
    fn local_source(saddr: u32) -> Option<bool> {
        match crate::tc::LOCAL_NET.get(0) {
            Some(n) if n.set != 0 => Some(saddr & n.mask_be == n.net_be),
            _ => None,
        }
    }

    #[inline(always)]
    fn flow_translated(
        ctx: &aya_ebpf::programs::TcContext,
        pkt: &Packet<u32>,
        backend: &(u32, u16),
        rev_nat_id: u32,
        affinity: bool,
    ) {
        events::flow_translated(
            ctx,
            pkt.proto,
            (pkt.saddr, pkt.sport),
            (pkt.daddr, pkt.dport),
            *backend,
            rev_nat_id,
            affinity,
        );
    }

    #[inline(always)]
    fn flow_dropped(
        ctx: &aya_ebpf::programs::TcContext,
        pkt: &Packet<u32>,
        rev_nat_id: u32,
        reason: Counter,
    ) {
        events::flow_dropped(
            ctx,
            pkt.proto,
            (pkt.saddr, pkt.sport),
            (pkt.daddr, pkt.dport),
            rev_nat_id,
            reason,
        );
    }

    #[inline(always)]
    fn service(
        address: u32,
        port_be: u16,
        proto: u8,
        scope: u8,
        slot: u16,
    ) -> Option<Service4Value> {
        let key = Service4Key::scoped(address, port_be, proto, scope, slot);
        // SAFETY: values are plain data, copied out at once.
        unsafe { SERVICES.get(&key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<(u32, u16)> {
        // SAFETY: as above.
        unsafe { BACKENDS.get(&id) }.map(|b| (b.address_be, b.port_be))
    }

    #[inline(always)]
    fn is_loopback(address: u32) -> bool {
        kpr_common::is_loopback4_be(address)
    }

    #[inline(always)]
    fn sticky(cookie: u64, (address_be, port_be): (u32, u16), proto: u8) -> Option<SockFwd4Value> {
        let key = SockFwd4Key {
            cookie,
            address_be,
            port_be,
            proto,
            pad: 0,
        };
        // SAFETY: as above.
        unsafe { SOCK_FWD.get(&key) }.copied()
    }

    #[inline(always)]
    fn set_sticky(
        cookie: u64,
        (address_be, port_be): (u32, u16),
        proto: u8,
        value: &SockFwd4Value,
    ) {
        let key = SockFwd4Key {
            cookie,
            address_be,
            port_be,
            proto,
            pad: 0,
        };
        // Best effort: without the entry the next datagram picks again, as before.
        let _ = SOCK_FWD.insert(&key, value, 0);
    }

    #[inline(always)]
    fn revnat(cookie: u64, (address_be, port_be): (u32, u16)) -> Option<(u32, u16, u32)> {
        let key = sock_key4(cookie, address_be, port_be);
        // SAFETY: as above.
        unsafe { SOCK_REVNAT.get(&key) }.map(|v| (v.address_be, v.port_be, v.rev_nat_id))
    }

    #[inline(always)]
    fn set_revnat(
        cookie: u64,
        (address_be, port_be): (u32, u16),
        frontend: (u32, u16),
        rev_nat_id: u32,
    ) -> Result<(), ()> {
        let key = sock_key4(cookie, address_be, port_be);
        let value = SockRevNat4Value {
            address_be: frontend.0,
            port_be: frontend.1,
            pad: 0,
            rev_nat_id,
        };
        // An unconnected UDP socket sends many datagrams to the same backend: skip the write
        // (and the LRU bookkeeping it costs) when the entry is already there.
        // SAFETY: as above.
        if matches!(unsafe { SOCK_REVNAT.get(&key) }, Some(v) if *v == value) {
            return Ok(());
        }
        SOCK_REVNAT.insert(&key, &value, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn forget_revnat(cookie: u64, (address_be, port_be): (u32, u16)) {
        let key = sock_key4(cookie, address_be, port_be);
        let _ = SOCK_REVNAT.remove(&key);
    }

    #[inline(always)]
    fn note_check(cookie: u64, (address_be, port_be): (u32, u16), value: u32) -> Result<(), ()> {
        let key = sock_key4(cookie, address_be, port_be);
        egress::SOCK_CHECKS.insert(&key, &value, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn sock_check(cookie: u64, (address_be, port_be): (u32, u16)) -> Option<u32> {
        let key = sock_key4(cookie, address_be, port_be);
        // SAFETY: a plain value, copied out at once.
        unsafe { egress::SOCK_CHECKS.get(&key) }.copied()
    }

    #[inline(always)]
    fn clear_check(cookie: u64, (address_be, port_be): (u32, u16)) {
        let key = sock_key4(cookie, address_be, port_be);
        let _ = egress::SOCK_CHECKS.remove(&key);
    }

    #[inline(always)]
    fn event_translated(
        ctx: &SockAddrContext,
        proto: u8,
        frontend: (u32, u16),
        backend: (u32, u16),
        rev_nat_id: u32,
        affinity: bool,
    ) {
        events::socket_translated(ctx, proto, frontend, backend, rev_nat_id, affinity);
    }

    #[inline(always)]
    fn event_refused(
        ctx: &SockAddrContext,
        proto: u8,
        frontend: (u32, u16),
        rev_nat_id: u32,
        reason: Counter,
    ) {
        events::socket_refused(ctx, proto, frontend, rev_nat_id, reason);
    }
}

impl Family for V6 {
    type Addr = [u32; 4];
    type CtPad = [u8; 11];
    const SPLIT_TC_FRAMES: bool = true;

    #[inline(always)]
    fn ct() -> &'static HashMap<CtKey<[u32; 4]>, CtValue<[u32; 4], [u8; 11]>> {
        &CONNTRACK6
    }

    #[inline(always)]
    fn ct_new() -> &'static LruHashMap<CtKey<[u32; 4]>, CtValue<[u32; 4], [u8; 11]>> {
        &CONNTRACK6_NEW
    }

    #[inline(always)]
    fn source_allowed(rev_nat_id: u32, address_be: [u32; 4]) -> bool {
        let key = Key::new(
            kpr_common::src_range_prefixlen(128),
            SrcRangeKey {
                rev_nat_id,
                address_be,
            },
        );
        SRC_RANGES6.get(&key).is_some()
    }

    #[inline(always)]
    fn affinity_ext(key: &AffinityExtKey<[u32; 4]>) -> Option<Affinity4Value> {
        // SAFETY: plain data, copied out at once.
        unsafe { AFFINITY_EXT6.get(key) }.copied()
    }

    #[inline(always)]
    fn set_affinity_ext(key: &AffinityExtKey<[u32; 4]>, value: &Affinity4Value) {
        let _ = AFFINITY_EXT6.insert(key, value, 0);
    }

    #[inline(always)]
    fn local_source(saddr: [u32; 4]) -> Option<bool> {
        match crate::tc::LOCAL_NET6.get(0) {
            Some(n) if n.set != 0 => Some(
                saddr[0] & n.mask_be[0] == n.net_be[0]
                    && saddr[1] & n.mask_be[1] == n.net_be[1]
                    && saddr[2] & n.mask_be[2] == n.net_be[2]
                    && saddr[3] & n.mask_be[3] == n.net_be[3],
            ),
            _ => None,
        }
    }

    #[inline(always)]
    fn flow_translated(
        _: &aya_ebpf::programs::TcContext,
        pkt: &Packet<[u32; 4]>,
        backend: &([u32; 4], u16),
        rev_nat_id: u32,
        affinity: bool,
    ) {
        events::flow_translated6(pkt, backend, rev_nat_id, affinity);
    }

    #[inline(always)]
    fn flow_dropped(
        _: &aya_ebpf::programs::TcContext,
        pkt: &Packet<[u32; 4]>,
        rev_nat_id: u32,
        reason: Counter,
    ) {
        events::flow_dropped6(pkt, rev_nat_id, reason);
    }

    #[inline(always)]
    fn service(
        address: [u32; 4],
        port_be: u16,
        proto: u8,
        scope: u8,
        slot: u16,
    ) -> Option<Service4Value> {
        let key = Service6Key::scoped(address, port_be, proto, scope, slot);
        // SAFETY: values are plain data, copied out at once.
        unsafe { SERVICES6.get(&key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<([u32; 4], u16)> {
        // SAFETY: as above.
        unsafe { BACKENDS6.get(&id) }.map(|b| (b.address_be, b.port_be))
    }

    #[inline(always)]
    fn is_loopback(address: [u32; 4]) -> bool {
        kpr_common::is_loopback6_be(address)
    }

    #[inline(always)]
    fn sticky(
        cookie: u64,
        (address_be, port_be): ([u32; 4], u16),
        proto: u8,
    ) -> Option<SockFwd4Value> {
        let key = SockFwd6Key {
            cookie,
            address_be,
            port_be,
            proto,
            pad: [0; 5],
        };
        // SAFETY: as above.
        unsafe { SOCK_FWD6.get(&key) }.copied()
    }

    #[inline(always)]
    fn set_sticky(
        cookie: u64,
        (address_be, port_be): ([u32; 4], u16),
        proto: u8,
        value: &SockFwd4Value,
    ) {
        let key = SockFwd6Key {
            cookie,
            address_be,
            port_be,
            proto,
            pad: [0; 5],
        };
        let _ = SOCK_FWD6.insert(&key, value, 0);
    }

    #[inline(always)]
    fn revnat(cookie: u64, (address_be, port_be): ([u32; 4], u16)) -> Option<([u32; 4], u16, u32)> {
        let key = sock_key6(cookie, address_be, port_be);
        // SAFETY: as above.
        unsafe { SOCK_REVNAT6.get(&key) }.map(|v| (v.address_be, v.port_be, v.rev_nat_id))
    }

    #[inline(always)]
    fn set_revnat(
        cookie: u64,
        (address_be, port_be): ([u32; 4], u16),
        frontend: ([u32; 4], u16),
        rev_nat_id: u32,
    ) -> Result<(), ()> {
        let key = sock_key6(cookie, address_be, port_be);
        let value = SockRevNat6Value {
            address_be: frontend.0,
            port_be: frontend.1,
            pad: 0,
            rev_nat_id,
        };
        // SAFETY: as above.
        if matches!(unsafe { SOCK_REVNAT6.get(&key) }, Some(v) if *v == value) {
            return Ok(());
        }
        SOCK_REVNAT6.insert(&key, &value, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn forget_revnat(cookie: u64, (address_be, port_be): ([u32; 4], u16)) {
        let key = sock_key6(cookie, address_be, port_be);
        let _ = SOCK_REVNAT6.remove(&key);
    }

    #[inline(always)]
    fn note_check(
        cookie: u64,
        (address_be, port_be): ([u32; 4], u16),
        value: u32,
    ) -> Result<(), ()> {
        let key = sock_key6(cookie, address_be, port_be);
        egress::SOCK_CHECKS6.insert(&key, &value, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn sock_check(cookie: u64, (address_be, port_be): ([u32; 4], u16)) -> Option<u32> {
        let key = sock_key6(cookie, address_be, port_be);
        // SAFETY: a plain value, copied out at once.
        unsafe { egress::SOCK_CHECKS6.get(&key) }.copied()
    }

    #[inline(always)]
    fn clear_check(cookie: u64, (address_be, port_be): ([u32; 4], u16)) {
        let key = sock_key6(cookie, address_be, port_be);
        let _ = egress::SOCK_CHECKS6.remove(&key);
    }

    #[inline(always)]
    fn event_translated(
        ctx: &SockAddrContext,
        proto: u8,
        frontend: ([u32; 4], u16),
        backend: ([u32; 4], u16),
        rev_nat_id: u32,
        affinity: bool,
    ) {
        events::socket_translated6(ctx, proto, frontend, backend, rev_nat_id, affinity);
    }

    #[inline(always)]
    fn event_refused(
        ctx: &SockAddrContext,
        proto: u8,
        frontend: ([u32; 4], u16),
        rev_nat_id: u32,
        reason: Counter,
    ) {
        events::socket_refused6(ctx, proto, frontend, rev_nat_id, reason);
    }
}
