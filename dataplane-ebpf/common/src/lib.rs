//! Map key and value types shared by kpr's kernel programs and its agent.
//!
//! The layout follows Cilium's `lb4_*` maps (bpf/lib/lb.h): one services map keyed by
//! (frontend address, port, protocol, slot) where slot 0 describes the frontend and slots
//! `1..=count` each name a backend id, plus a backends map from id to address. Splitting the
//! two lets one backend serve many frontends and lets the agent change a frontend's backend
//! set slot by slot without a window in which the frontend is missing.
//!
//! Every struct is `#[repr(C)]` with explicit padding so the kernel and userspace agree on
//! the bytes (the verifier rejects reads of uninitialised padding in keys, and hash maps hash
//! every byte of a key). Sizes are asserted at compile time. Fields that hold network-byte-
//! order values say so in their name (`_be`).
//!
//! Map names carry a version suffix: a change to a layout gets a new name, so an agent that
//! is upgraded in place never reinterprets a pinned map written by an older layout.
#![no_std]

/// Services map: [`Service4Key`] → [`Service4Value`].
pub const SERVICES_MAP: &str = "KPR_SVC4_V1";
/// Backends map: backend id (`u32`) → [`Backend4Value`].
pub const BACKENDS_MAP: &str = "KPR_BE4_V1";
/// Socket reverse-NAT map: [`SockRevNat4Key`] → [`SockRevNat4Value`].
pub const SOCK_REVNAT_MAP: &str = "KPR_SKNAT4_V1";
/// Socket forward map: [`SockFwd4Key`] → [`SockFwd4Value`].
pub const SOCK_FWD_MAP: &str = "KPR_SKFWD4_V1";
/// Session-affinity map: [`Affinity4Key`] → [`Affinity4Value`]. `_V2` in the `variant`
/// build, whose [`Affinity4Value`] has another layout (the upgrade test converts between them).
#[cfg(not(feature = "variant"))]
pub const AFFINITY_MAP: &str = "KPR_AFF4_V1";
#[cfg(feature = "variant")]
pub const AFFINITY_MAP: &str = "KPR_AFF4_V2";
pub const AFFINITY_MAP_MAX: u32 = 262_144;
/// Per-CPU datapath counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "KPR_CNT_V1";
/// North-south connection tracking (tc programs) of flows that are established (TCP: the
/// handshake completed; UDP: a reply came): [`Ct4Key`] → [`Ct4Value`], a hash without
/// preallocation, so memory follows the number of flows. Never evicted: an entry goes when it
/// expires (the agent's garbage collector) or when a new connection replaces it.
pub const CT_MAP: &str = "KPR_CT4_V2";
/// Flows that are not established yet (a TCP SYN, UDP without a reply), LRU: a flood of new
/// flows evicts only other new flows, never an established one (netfilter's "early drop" of
/// unassured entries).
pub const CT_NEW_MAP: &str = "KPR_CT4NEW_V1";
/// The single LRU conntrack map of older agents (no states, same key and value layout). The
/// agent moves its entries into [`CT_MAP`] at start and removes it.
pub const CT_MAP_V1: &str = "KPR_CT4_V1";
/// Default capacity of [`CT_MAP`]: kube-proxy's default `--conntrack-min` (131072 connections),
/// two entries per connection. The agent sizes it from the conntrack settings at load time.
pub const CT_MAP_MAX: u32 = 262_144;
/// Default capacity of [`CT_NEW_MAP`] (half of [`CT_MAP`]'s connections). Preallocated (LRU).
pub const CT_NEW_MAP_MAX: u32 = 131_072;
/// Session affinity for traffic from outside the node (tc programs): [`AffinityExt4Key`] →
/// [`Affinity4Value`], LRU.
#[cfg(not(feature = "variant"))]
pub const AFFINITY_EXT_MAP: &str = "KPR_AFFX4_V1";
#[cfg(feature = "variant")]
pub const AFFINITY_EXT_MAP: &str = "KPR_AFFX4_V2";
/// IPv6 services map: [`Service6Key`] → [`Service4Value`] (the value is the same for both
/// families: counts, ids and flags). Backend ids come from one space shared with
/// [`BACKENDS_MAP`], rev-NAT ids from one space shared with [`SERVICES_MAP`].
pub const SERVICES6_MAP: &str = "KPR_SVC6_V1";
/// IPv6 backends map: backend id (`u32`) → [`Backend6Value`].
pub const BACKENDS6_MAP: &str = "KPR_BE6_V1";
/// IPv6 socket reverse-NAT map: [`SockRevNat6Key`] → [`SockRevNat6Value`].
pub const SOCK_REVNAT6_MAP: &str = "KPR_SKNAT6_V1";
/// IPv6 socket forward map: [`SockFwd6Key`] → [`SockFwd4Value`].
pub const SOCK_FWD6_MAP: &str = "KPR_SKFWD6_V1";
/// Every map this build pins, by name (the agent checks a pin directory against it: a pin of
/// another layout version is migrated or refused, never silently shadowed).
pub const ALL_MAPS: [&str; 21] = [
    SOCK_CHECK6_MAP,
    CT6_MAP,
    CT6_NEW_MAP,
    SRC_RANGE6_MAP,
    AFFINITY_EXT6_MAP,
    SERVICES6_MAP,
    BACKENDS6_MAP,
    SOCK_REVNAT6_MAP,
    SOCK_FWD6_MAP,
    SERVICES_MAP,
    BACKENDS_MAP,
    SOCK_REVNAT_MAP,
    SOCK_FWD_MAP,
    AFFINITY_MAP,
    COUNTERS_MAP,
    CT_MAP,
    CT_NEW_MAP,
    AFFINITY_EXT_MAP,
    SRC_RANGE_MAP,
    SOCK_CHECK_MAP,
    AFFINITY_GROUP_MAP,
];

/// loadBalancerSourceRanges: LPM trie keyed by `bpf_lpm_trie_key` { prefixlen, [`SrcRange4Key`] }
/// → `u8` (unused, 1).
pub const SRC_RANGE_MAP: &str = "KPR_LBSRC4_V1";
pub const SRC_RANGE_MAP_MAX: u32 = 65_536;

/// Session-affinity groups: frontend rev-NAT id (`u32`) → the id its clients' affinity entries
/// are keyed by (`u32`). Every frontend of a Service port shares one group, as kube-proxy's
/// `recent` lists are per Service port: a client reaching the ClusterIP and then the NodePort
/// keeps its backend. A frontend without an entry is its own group.
pub const AFFINITY_GROUP_MAP: &str = "KPR_AFFGRP_V1";

/// Sockets the cgroup egress program checks: [`SockRevNat4Key`] (socket, destination) → the
/// frontend's rev-NAT id (`u32`) when the socket was translated to a frontend with
/// loadBalancerSourceRanges and its source address is still to be checked, or
/// [`SOCK_CHECK_DROP`] when its packets are to be dropped ([`SVC_FLAG_NO_LOCAL_DROP`]). LRU:
/// entries of sockets that closed before sending are evicted.
pub const SOCK_CHECK_MAP: &str = "KPR_SKCHK4_V1";
/// [`SOCK_CHECK_MAP`] for IPv6 sockets: [`SockRevNat6Key`] → `u32`.
pub const SOCK_CHECK6_MAP: &str = "KPR_SKCHK6_V1";
pub const SOCK_CHECK_MAP_MAX: u32 = 65_536;
/// The [`SOCK_CHECK_MAP`] value that drops (rev-NAT ids start at 1).
pub const SOCK_CHECK_DROP: u32 = 0;

/// One `u32`: non-zero while some frontend has loadBalancerSourceRanges or
/// [`SVC_FLAG_NO_LOCAL_DROP`], so the cgroup egress program costs one array read per packet
/// otherwise. Set by the agent; not pinned (a new
/// agent sets it from the maps it restores).
pub const SOCK_CHECK_GATE_MAP: &str = "KPR_SKGATE_V1";

/// kube-proxy's local-traffic detector for ClusterIP traffic routed to the node (tc): which
/// sources are local, so not masqueraded. [`LocalNet4`] at index 0 (ClusterCIDR, NodeCIDR).
/// Not pinned: the agent sets it at load and on syncs (a Node's pod CIDR can come later).
pub const LOCAL_NET_MAP: &str = "KPR_LOCNET4_V1";
/// The interface detectors (BridgeInterface, InterfaceNamePrefix): the tc devices (by
/// ifindex, `u32` → `u8`) whose traffic is local. Not pinned; set at load.
pub const LOCAL_DEV_MAP: &str = "KPR_LOCALDEV_V1";
/// `KPR_LOCAL_DETECT` (a read-only global): no detector, a CIDR ([`LOCAL_NET_MAP`]), or
/// interfaces ([`LOCAL_DEV_MAP`]).
pub const LOCAL_DETECT_NONE: u8 = 0;
pub const LOCAL_DETECT_CIDR: u8 = 1;
pub const LOCAL_DETECT_INTERFACE: u8 = 2;

/// The local CIDR of [`LOCAL_NET_MAP`]: sources with `address & mask == net` are local. `set`
/// 0: none (yet), nothing is local.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalNet<A> {
    /// Network and mask, network byte order.
    pub net_be: A,
    pub mask_be: A,
    pub set: u32,
}
pub type LocalNet4 = LocalNet<u32>;
/// [`LOCAL_NET6_MAP`]'s value.
pub type LocalNet6 = LocalNet<[u32; 4]>;
/// The IPv6 local CIDR ([`LocalNet6`] at index 0), as [`LOCAL_NET_MAP`] for IPv4.
pub const LOCAL_NET6_MAP: &str = "KPR_LOCNET6_V1";

/// The datapath events' per-CPU rate limit ([`EventRate`]). Not pinned: a new agent starts
/// a new window.
pub const EVENT_RATE_MAP: &str = "KPR_EVRATE_V1";

/// Default capacities. The agent may override them at load time.
pub const SERVICES_MAP_MAX: u32 = 262_144;
pub const BACKENDS_MAP_MAX: u32 = 131_072;
pub const SOCK_REVNAT_MAP_MAX: u32 = 262_144;

/// Whether an IPv4 address (network byte order, as the maps and packets hold it) is in
/// 127.0.0.0/8.
pub const fn is_loopback4_be(address_be: u32) -> bool {
    u32::from_be(address_be) >> 24 == 127
}

/// IP protocol numbers, as the kernel reports them in `bpf_sock_addr.protocol`.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Key of the services map.
///
/// Slot 0 is the frontend itself; slots `1..=count` hold the frontend's backends in the
/// order the agent chose. The program picks a slot at random, so the order does not bias
/// the choice.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4Key {
    /// Frontend IPv4 address, network byte order.
    pub address_be: u32,
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// 0 for the frontend, `1..=count` for backends.
    pub backend_slot: u16,
    /// IP protocol number ([`IPPROTO_TCP`], [`IPPROTO_UDP`], ...).
    pub proto: u8,
    /// [`SCOPE_INTERNAL`] or [`SCOPE_EXTERNAL`].
    pub scope: u8,
    /// Explicit padding; always zero.
    pub pad: [u8; 2],
}

/// Entries for clients on this node (the socket-level programs): every frontend has them.
pub const SCOPE_INTERNAL: u8 = 0;
/// Entries for traffic arriving from outside the node (the tc programs): NodePort, externalIP
/// and LoadBalancer frontends only. Their backends differ from the internal ones when
/// `externalTrafficPolicy: Local` limits outside traffic to this node's endpoints, while
/// clients on the node still reach every endpoint (kube-proxy's short-circuit). Cilium keys
/// its services the same way (LB_LOOKUP_SCOPE_EXT/INT).
pub const SCOPE_EXTERNAL: u8 = 1;

impl Service4Key {
    pub const fn new(address_be: u32, port_be: u16, proto: u8, backend_slot: u16) -> Self {
        Self::scoped(address_be, port_be, proto, SCOPE_INTERNAL, backend_slot)
    }

    pub const fn scoped(
        address_be: u32,
        port_be: u16,
        proto: u8,
        scope: u8,
        backend_slot: u16,
    ) -> Self {
        Self {
            address_be,
            port_be,
            backend_slot,
            proto,
            scope,
            pad: [0; 2],
        }
    }
}

/// Value of the services map.
///
/// For slot 0: `count` backends and the frontend's `rev_nat_id`; `backend_id` holds the session
/// affinity timeout in seconds when [`SVC_FLAG_AFFINITY`] is set (Cilium's union), else 0.
/// For slot n > 0: `backend_id` names the backend; `count` and `rev_nat_id` repeat slot 0's so a
/// slot can be checked against its frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Service4Value {
    pub backend_id: u32,
    /// Identifies the frontend; stored in socket reverse-NAT entries so a reply can be checked
    /// against a frontend that still exists. 32 bits (Cilium uses 16): kpr targets more than
    /// 65,535 frontends.
    pub rev_nat_id: u32,
    /// Number of backends in slots `1..=count`. 0 means the service has no endpoints.
    pub count: u16,
    /// [`SVC_FLAG_*`](SVC_FLAG_NONE) bits.
    pub flags: u8,
    pub pad: u8,
}

pub const SVC_FLAG_NONE: u8 = 0;
/// `sessionAffinity: ClientIP`; slot 0's `backend_id` is the timeout in seconds.
pub const SVC_FLAG_AFFINITY: u8 = 1 << 0;
/// External scope only: `externalTrafficPolicy: Local`, while the Service has endpoints (on
/// some node). The tc program keeps the client's source address (no masquerade mark) and drops
/// traffic when the node has no local endpoint (`count == 0`), as kube-proxy does ("has no
/// local endpoints"). Without any endpoint the flag is not set and traffic is refused.
pub const SVC_FLAG_EXT_LOCAL: u8 = 1 << 1;
/// External scope only: `loadBalancerSourceRanges` apply to this frontend; clients not matched
/// by [`SRC_RANGE_MAP`] under the frontend's `rev_nat_id` are dropped.
pub const SVC_FLAG_SOURCE_RANGES: u8 = 1 << 2;
/// External scope only: every backend is on this node, so traffic is not source-NATed (no
/// masquerade mark): the reply comes back through this node anyway, and the backend sees the
/// client's address. Set by the agent for `externalTrafficPolicy: Cluster` frontends whose
/// backends are all local.
pub const SVC_FLAG_NO_SNAT: u8 = 1 << 3;

/// Internal scope only: `internalTrafficPolicy: Local` without a local endpoint while the
/// Service has endpoints elsewhere (`count == 0`), and the agent runs with kube-proxy's drop
/// (`--reject-no-local-endpoints=false`). The socket programs then leave the call untranslated
/// and note the socket for the cgroup egress program, which drops its packets
/// (`drop_no_local_backend`), instead of refusing the call at once.
pub const SVC_FLAG_NO_LOCAL_DROP: u8 = 1 << 4;

/// `skb->mark` bit the tc ingress program sets on north-south traffic that must be
/// masqueraded (`externalTrafficPolicy: Cluster`): kpr's nftables table masquerades packets
/// carrying it in postrouting. It is the bit kube-proxy uses for KUBE-MARK-MASQ
/// (`--iptables-masquerade-bit` 14), so a node's other netfilter users already leave it alone.
pub const KPR_MASQ_MARK: u32 = 0x4000;

/// How many backend slots the datapath scans to check that an affinity's backend is still in the
/// service when it is no longer in its recorded slot. Beyond this, affinity is re-chosen.
pub const AFFINITY_SCAN_MAX: u16 = 64;

/// Key of the IPv6 services map: [`Service4Key`] with a 128-bit address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service6Key {
    /// Frontend IPv6 address, network byte order (as `bpf_sock_addr.user_ip6` holds it).
    pub address_be: [u32; 4],
    pub port_be: u16,
    pub backend_slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}

impl Service6Key {
    pub const fn new(address_be: [u32; 4], port_be: u16, proto: u8, backend_slot: u16) -> Self {
        Self::scoped(address_be, port_be, proto, SCOPE_INTERNAL, backend_slot)
    }

    pub const fn scoped(
        address_be: [u32; 4],
        port_be: u16,
        proto: u8,
        scope: u8,
        backend_slot: u16,
    ) -> Self {
        Self {
            address_be,
            port_be,
            backend_slot,
            proto,
            scope,
            pad: [0; 2],
        }
    }
}

/// Value of the IPv6 backends map (key: backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend6Value {
    /// Backend IPv6 address, network byte order.
    pub address_be: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Key of the IPv6 socket reverse-NAT map (see [`SockRevNat4Key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNat6Key {
    pub cookie: u64,
    /// Backend IPv6 address, network byte order.
    pub address_be: [u32; 4],
    pub port_be: u16,
    pub pad: [u8; 6],
}

/// Value of the IPv6 socket reverse-NAT map: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNat6Value {
    pub address_be: [u32; 4],
    pub port_be: u16,
    pub pad: u16,
    pub rev_nat_id: u32,
}

/// Key of the IPv6 socket forward map (see [`SockFwd4Key`]); its value is a [`SockFwd4Value`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockFwd6Key {
    pub cookie: u64,
    pub address_be: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub pad: [u8; 5],
}

/// Whether an IPv6 address (as `user_ip6` holds it) is an IPv4-mapped one (`::ffff:a.b.c.d`),
/// which a dual-stack socket uses to reach an IPv4 address; its IPv4 address is word 3.
pub const fn is_v4_mapped_be(address_be: [u32; 4]) -> bool {
    address_be[0] == 0 && address_be[1] == 0 && address_be[2] == u32::to_be(0xffff)
}

/// `::1`, as `user_ip6` holds it.
pub const fn is_loopback6_be(address_be: [u32; 4]) -> bool {
    address_be[0] == 0 && address_be[1] == 0 && address_be[2] == 0 && address_be[3] == u32::to_be(1)
}

/// Value of the backends map (key: backend id, `u32`, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend4Value {
    /// Backend IPv4 address, network byte order.
    pub address_be: u32,
    /// Backend port, network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Key of the socket reverse-NAT map: which socket talked to which backend.
///
/// Keyed by the socket cookie as well as the backend so that two sockets of different
/// services that happen to share a backend never see each other's frontend address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNat4Key {
    pub cookie: u64,
    /// Backend IPv4 address, network byte order.
    pub address_be: u32,
    /// Backend port, network byte order.
    pub port_be: u16,
    pub pad: u16,
}

/// Value of the socket reverse-NAT map: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNat4Value {
    /// Frontend IPv4 address, network byte order.
    pub address_be: u32,
    /// Frontend port, network byte order.
    pub port_be: u16,
    pub pad: u16,
    pub rev_nat_id: u32,
}

/// Key of the socket forward map: which backend an unconnected UDP socket was sent to for a
/// frontend.
///
/// kube-proxy keeps a UDP flow on one backend through conntrack; without this, every datagram
/// of an unconnected socket would pick a new backend, which breaks any protocol with state
/// across datagrams (QUIC, DTLS, most RPC over UDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockFwd4Key {
    pub cookie: u64,
    /// Frontend IPv4 address, network byte order.
    pub address_be: u32,
    /// Frontend port, network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub pad: u8,
}

/// Value of the socket forward map. The entry is used only while the frontend's slot `slot`
/// still names `backend_id`: a backend removed from the service is never kept.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockFwd4Value {
    pub backend_id: u32,
    pub slot: u16,
    pub pad: u16,
}

/// Key of the session-affinity map: a client and a frontend's affinity group
/// ([`AFFINITY_GROUP_MAP`]).
///
/// At the socket layer the client is identified by its network namespace cookie: connect()
/// on an unbound socket has no source address yet, and every socket of a pod shares the pod's
/// namespace (host processes share the host's, as they share the node's address for
/// kube-proxy). The frontend is named by its affinity group ([`AFFINITY_GROUP_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Affinity4Key {
    pub client_cookie: u64,
    /// The frontend's affinity group: a rev-NAT id shared by its Service port's frontends.
    pub rev_nat_id: u32,
    pub pad: u32,
}

/// Value of the session-affinity map.
#[cfg(not(feature = "variant"))]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Affinity4Value {
    /// bpf_ktime_get_ns() of the client's last new connection to the frontend.
    pub last_used_ns: u64,
    pub backend_id: u32,
    /// Slot the backend was in; checked first, then up to [`AFFINITY_SCAN_MAX`] slots.
    pub slot: u16,
    pub pad: u16,
}

/// The `variant` build's layout of the session-affinity value (`KPR_AFF4_V2`): the same
/// fields in another order, so that an upgrade between the two builds has a real layout
/// change to convert.
#[cfg(feature = "variant")]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Affinity4Value {
    pub backend_id: u32,
    pub slot: u16,
    pub pad: u16,
    pub last_used_ns: u64,
}

/// Datapath counters: translations done and typed drop/failure reasons.
///
/// The index of each variant in [`COUNTERS_MAP`] is its discriminant; new reasons are
/// appended so that older agents still read the ones they know.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connect/sendmsg to a frontend was translated to a backend.
    Translated = 0,
    /// A frontend with no backends was hit; the socket call was refused.
    DropNoBackend = 1,
    /// A service slot pointed at a backend id missing from the backends map (the agent is
    /// mid-update or a map is corrupt); the call was refused rather than sent to the VIP.
    DropBackendMissing = 2,
    /// A service slot in `1..=count` was missing.
    DropSlotMissing = 3,
    /// The socket reverse-NAT entry could not be written; replies to an unconnected UDP
    /// socket would show the backend address, so the call was refused.
    DropRevNatUpdate = 4,
    /// A reply/getpeername address was translated back to its frontend.
    RevTranslated = 5,
    /// A reverse-NAT entry whose frontend no longer exists was found and removed.
    RevNatStale = 6,
    /// An unconnected UDP send reused the backend its socket used before.
    StickyReused = 7,
    /// A new connection went to the client's affinity backend.
    AffinityReused = 8,
    /// tc ingress: an external frontend with `externalTrafficPolicy: Local` and no endpoint on
    /// this node was hit; or cgroup egress: a packet to a frontend with
    /// `internalTrafficPolicy: Local` and no local endpoint ([`SVC_FLAG_NO_LOCAL_DROP`]). The
    /// packet was dropped (kube-proxy drops it too).
    DropNoLocalBackend = 9,
    /// tc ingress, or cgroup egress for a socket on the node: a client outside the frontend's
    /// `loadBalancerSourceRanges`; dropped.
    DropSourceRange = 10,
    /// tc ingress: the conntrack entries of a new flow could not be written; dropped rather than
    /// sent on with no way to translate the replies.
    CtCreateFailed = 11,
    /// tc ingress: a packet to an external frontend was translated (DNAT) to a backend.
    TcTranslated = 12,
    /// tc egress: a reply was translated back (SNAT) to its frontend.
    TcRevTranslated = 13,
    /// tc ingress: a packet of a known flow kept its backend.
    TcCtReused = 14,
    /// tc ingress: a non-first IPv4 fragment (no L4 header) passed untouched.
    TcFragment = 15,
    /// tc ingress: an external frontend with no endpoints at all (`externalTrafficPolicy:
    /// Cluster`) was hit; the packet was passed to the stack, which refuses it.
    TcNoBackendPassed = 16,
    /// tc ingress: a TCP packet that is not a SYN and has no conntrack entry; passed untouched
    /// (only a SYN starts a flow, see the tc program).
    TcCtMissNotSyn = 17,
    /// tc ingress/egress: rewriting the packet (store or checksum helper) failed; dropped.
    DropRewrite = 18,
    /// tc: a conntrack entry had outlived its lifetime when a packet looked it up; removed, and
    /// the packet treated as one of no known flow.
    TcCtExpired = 19,
    /// tc ingress: a new connection kpr does not translate (a TCP SYN or a UDP packet to an
    /// address that is not a frontend) has the reply tuple of a translated flow; the flow's
    /// entries were removed, so the new connection's replies are not rewritten.
    TcCtReplaced = 20,
    /// tc: a flow could not be moved to the established map (full); it stays among the new
    /// flows, where a flood of new flows may evict it.
    CtEstablishedFull = 21,
    /// A datapath event (`--datapath-events`) over its CPU's rate limit was not emitted.
    EventsSuppressed = 22,
}

/// Number of counters; size of [`COUNTERS_MAP`]. (Was 16 before the tc counters: a pin left by
/// an older agent is smaller, and the agent re-creates it, see userspace `ebpf`.)
pub const COUNTER_MAX: u32 = 32;

impl Counter {
    pub const ALL: [Counter; 23] = [
        Counter::Translated,
        Counter::DropNoBackend,
        Counter::DropBackendMissing,
        Counter::DropSlotMissing,
        Counter::DropRevNatUpdate,
        Counter::RevTranslated,
        Counter::RevNatStale,
        Counter::StickyReused,
        Counter::AffinityReused,
        Counter::DropNoLocalBackend,
        Counter::DropSourceRange,
        Counter::CtCreateFailed,
        Counter::TcTranslated,
        Counter::TcRevTranslated,
        Counter::TcCtReused,
        Counter::TcFragment,
        Counter::TcNoBackendPassed,
        Counter::TcCtMissNotSyn,
        Counter::DropRewrite,
        Counter::TcCtExpired,
        Counter::TcCtReplaced,
        Counter::CtEstablishedFull,
        Counter::EventsSuppressed,
    ];

    /// Name used in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Translated => "translated",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropBackendMissing => "drop_backend_missing",
            Counter::DropSlotMissing => "drop_slot_missing",
            Counter::DropRevNatUpdate => "drop_revnat_update",
            Counter::RevTranslated => "rev_translated",
            Counter::RevNatStale => "revnat_stale",
            Counter::StickyReused => "sticky_reused",
            Counter::AffinityReused => "affinity_reused",
            Counter::DropNoLocalBackend => "drop_no_local_backend",
            Counter::DropSourceRange => "drop_source_range",
            Counter::CtCreateFailed => "ct_create_failed",
            Counter::TcTranslated => "tc_translated",
            Counter::TcRevTranslated => "tc_rev_translated",
            Counter::TcCtReused => "tc_ct_reused",
            Counter::TcFragment => "tc_fragment",
            Counter::TcNoBackendPassed => "tc_no_backend_passed",
            Counter::TcCtMissNotSyn => "tc_ct_miss_not_syn",
            Counter::DropRewrite => "drop_rewrite",
            Counter::TcCtExpired => "tc_ct_expired",
            Counter::TcCtReplaced => "tc_ct_replaced",
            Counter::CtEstablishedFull => "ct_established_full",
            Counter::EventsSuppressed => "events_suppressed",
        }
    }

    /// The counter with index `i` (how datapath events name their reason).
    pub fn from_index(i: u32) -> Option<Counter> {
        Counter::ALL.get(i as usize).copied()
    }
}

/// One CPU's datapath-event budget (`KPR_EVRATE_V1`, a per-CPU array of one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRate {
    /// bpf_ktime_get_ns() at the start of the current one-second window.
    pub window_start_ns: u64,
    /// Events emitted in the window.
    pub emitted: u32,
    pub pad: u32,
}

/// Key of the conntrack maps ([`CT_MAP`], [`CT_NEW_MAP`]): one direction of a north-south flow.
///
/// Forward entries ([`CT_DIR_FORWARD`]) are keyed by the packet as the client sends it
/// (client → frontend); reverse entries ([`CT_DIR_REVERSE`]) by the reply as the backend sends
/// it (backend → client). All fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey<A> {
    pub saddr_be: A,
    pub daddr_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REVERSE`].
    pub dir: u8,
    pub pad: [u8; 2],
}

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REVERSE: u8 = 1;

/// The IPv4 conntrack key ([`CT_MAP`], [`CT_NEW_MAP`]).
pub type Ct4Key = CtKey<u32>;
/// The IPv6 conntrack key ([`CT6_MAP`], [`CT6_NEW_MAP`]).
pub type Ct6Key = CtKey<[u32; 4]>;
/// The IPv4 conntrack value: the address is 4 bytes, 7 of padding keep it 8-byte aligned.
pub type Ct4Value = CtValue<u32, [u8; 7]>;
/// The IPv6 conntrack value: a 16-byte address and 11 bytes of padding.
pub type Ct6Value = CtValue<[u32; 4], [u8; 11]>;
/// IPv6 north-south conntrack, as [`CT_MAP`] and [`CT_NEW_MAP`] for IPv4.
pub const CT6_MAP: &str = "KPR_CT6_V1";
pub const CT6_NEW_MAP: &str = "KPR_CT6NEW_V1";

impl<A> CtKey<A> {
    /// The key of a packet from `saddr_be:sport_be` to `daddr_be:dport_be` in direction `dir`
    /// ([`CT_DIR_FORWARD`] or [`CT_DIR_REVERSE`]); all in network byte order.
    pub const fn new(
        saddr_be: A,
        sport_be: u16,
        daddr_be: A,
        dport_be: u16,
        proto: u8,
        dir: u8,
    ) -> Self {
        Self {
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto,
            dir,
            pad: [0; 2],
        }
    }
}

/// Value of the conntrack maps.
///
/// Forward entry: `address_be`/`port_be` are the backend's (the DNAT target); reverse entry:
/// the frontend's (the SNAT source of replies). Both carry the backend id so the agent can
/// purge the entries of a backend that left (`purge_conntrack`). The two entries of a flow
/// are kept alike (same `flags`, `last_seen_ns` within the refresh interval): a packet in
/// either direction refreshes both, as one netfilter conntrack entry covers both directions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue<A, P> {
    /// bpf_ktime_get_ns() when the flow was created or last refreshed (refreshed at most about
    /// once a second, to keep writes off the per-packet path). The entry expires
    /// [`CtTimeouts::lifetime_s`] after it.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub address_be: A,
    pub port_be: u16,
    /// Forward entry: the service slot the backend was in (checked first on reuse).
    pub slot: u16,
    /// [`CT_FLAG_*`](CT_FLAG_MASQ) bits.
    pub flags: u8,
    /// Explicit padding to the next multiple of 8 (the family's alias fixes its size).
    pub pad: P,
}

/// The flow is masqueraded (externalTrafficPolicy: Cluster): its packets get [`KPR_MASQ_MARK`].
pub const CT_FLAG_MASQ: u8 = 1 << 0;
/// A reply (backend → client) was seen.
pub const CT_FLAG_SEEN_REPLY: u8 = 1 << 1;
/// TCP: the client sent a FIN.
pub const CT_FLAG_FIN_CLIENT: u8 = 1 << 2;
/// TCP: the backend sent a FIN.
pub const CT_FLAG_FIN_BACKEND: u8 = 1 << 3;
/// TCP: either side sent a RST.
pub const CT_FLAG_RST: u8 = 1 << 4;

/// A TCP flow that is over: reset, or closed from both sides. A SYN from its client port
/// starts a new connection instead of reusing it.
pub const fn ct_tcp_closed(flags: u8) -> bool {
    flags & CT_FLAG_RST != 0
        || flags & (CT_FLAG_FIN_CLIENT | CT_FLAG_FIN_BACKEND)
            == CT_FLAG_FIN_CLIENT | CT_FLAG_FIN_BACKEND
}

/// Lifetimes of conntrack entries, in seconds, by protocol and state: netfilter's defaults
/// with kube-proxy's settings (`--conntrack-tcp-timeout-established`,
/// `--conntrack-tcp-timeout-close-wait`, `--conntrack-udp-timeout`,
/// `--conntrack-udp-timeout-stream`). A read-only global of the tc programs, set by the agent
/// at load time (`CT_TIMEOUTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtTimeouts {
    /// TCP before the handshake completed (netfilter's SYN_SENT is 120 s; Cilium's 60 s).
    pub tcp_syn_s: u32,
    /// TCP established (kube-proxy's default 24 h).
    pub tcp_established_s: u32,
    /// TCP closed from one side only (kube-proxy's CLOSE_WAIT default, 1 h).
    pub tcp_half_closed_s: u32,
    /// TCP reset or closed from both sides (netfilter's CLOSE, 10 s): long enough for the last
    /// ACK and retransmitted FINs, short enough that a reused client port meets no old flow.
    pub tcp_closed_s: u32,
    /// UDP without a reply yet (netfilter's default 30 s).
    pub udp_s: u32,
    /// UDP with replies (netfilter's stream default 120 s).
    pub udp_stream_s: u32,
}

impl CtTimeouts {
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn_s: 60,
        tcp_established_s: 24 * 3600,
        tcp_half_closed_s: 3600,
        tcp_closed_s: 10,
        udp_s: 30,
        udp_stream_s: 120,
    };

    /// How long an entry of protocol `proto` with `flags` lives after its last packet.
    pub const fn lifetime_s(&self, proto: u8, flags: u8) -> u32 {
        if proto == IPPROTO_TCP {
            if ct_tcp_closed(flags) {
                self.tcp_closed_s
            } else if flags & (CT_FLAG_FIN_CLIENT | CT_FLAG_FIN_BACKEND) != 0 {
                self.tcp_half_closed_s
            } else if flags & CT_FLAG_SEEN_REPLY != 0 {
                self.tcp_established_s
            } else {
                self.tcp_syn_s
            }
        } else if flags & CT_FLAG_SEEN_REPLY != 0 {
            self.udp_stream_s
        } else {
            self.udp_s
        }
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Key of the external session-affinity map ([`AFFINITY_EXT_MAP`]): a client address and a
/// frontend. Traffic from outside the node has a real client address (unlike the socket path,
/// which keys by network namespace), which is what kube-proxy's ClientIP affinity keys by.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityExtKey<A> {
    /// Client address, network byte order.
    pub client_address_be: A,
    /// The frontend's affinity group, as in [`Affinity4Key`].
    pub rev_nat_id: u32,
}

/// Data of the loadBalancerSourceRanges LPM trie key (after the kernel's 32-bit `prefixlen`).
///
/// The trie matches bits from the first byte on, so the frontend comes first and is always
/// matched in full: `prefixlen = 32 + CIDR prefix length`. `rev_nat_id` is in host byte order
/// (matched whole, its byte order does not matter); the address is in network byte order, so
/// its prefix bits come first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SrcRangeKey<A> {
    pub rev_nat_id: u32,
    /// Client network address, network byte order.
    pub address_be: A,
}
pub type SrcRange4Key = SrcRangeKey<u32>;
/// The IPv6 trie's key ([`SRC_RANGE6_MAP`]): `prefixlen = 32 + CIDR prefix length` as well.
pub type SrcRange6Key = SrcRangeKey<[u32; 4]>;
/// loadBalancerSourceRanges of IPv6 frontends, as [`SRC_RANGE_MAP`].
pub const SRC_RANGE6_MAP: &str = "KPR_LBSRC6_V1";
pub type AffinityExt4Key = AffinityExtKey<u32>;
pub type AffinityExt6Key = AffinityExtKey<[u32; 4]>;
/// Session affinity of IPv6 clients outside the node, as [`AFFINITY_EXT_MAP`].
#[cfg(not(feature = "variant"))]
pub const AFFINITY_EXT6_MAP: &str = "KPR_AFFX6_V1";
#[cfg(feature = "variant")]
pub const AFFINITY_EXT6_MAP: &str = "KPR_AFFX6_V2";

/// `prefixlen` of a [`SrcRange4Key`] for a CIDR of `prefix` bits.
pub const fn src_range_prefixlen(prefix: u8) -> u32 {
    32 + prefix as u32
}

// The kernel and userspace must agree on these sizes; a change here is a layout change and
// needs a new map-name version.
const _: () = assert!(core::mem::size_of::<Service4Key>() == 12);
const _: () = assert!(core::mem::size_of::<Service4Value>() == 12);
const _: () = assert!(core::mem::size_of::<Service6Key>() == 24);
const _: () = assert!(core::mem::size_of::<Ct6Key>() == 40);
const _: () = assert!(core::mem::size_of::<Ct6Value>() == 48);
const _: () = assert!(core::mem::size_of::<AffinityExt6Key>() == 20);
const _: () = assert!(core::mem::size_of::<SrcRange6Key>() == 20);
const _: () = assert!(core::mem::size_of::<LocalNet6>() == 36);
const _: () = assert!(core::mem::size_of::<Backend6Value>() == 20);
const _: () = assert!(core::mem::size_of::<SockRevNat6Key>() == 32);
const _: () = assert!(core::mem::size_of::<SockRevNat6Value>() == 24);
const _: () = assert!(core::mem::size_of::<SockFwd6Key>() == 32);
const _: () = assert!(core::mem::size_of::<Backend4Value>() == 8);
const _: () = assert!(core::mem::size_of::<SockRevNat4Key>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevNat4Value>() == 12);
const _: () = assert!(core::mem::size_of::<SockFwd4Key>() == 16);
const _: () = assert!(core::mem::size_of::<SockFwd4Value>() == 8);
const _: () = assert!(core::mem::size_of::<Affinity4Key>() == 16);
const _: () = assert!(core::mem::size_of::<Affinity4Value>() == 16);
const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);
const _: () = assert!(core::mem::size_of::<Ct4Value>() == 32);
const _: () = assert!(core::mem::size_of::<AffinityExt4Key>() == 8);
const _: () = assert!(core::mem::size_of::<CtTimeouts>() == 24);
const _: () = assert!(core::mem::size_of::<SrcRange4Key>() == 8);
const _: () = assert!(core::mem::size_of::<EventRate>() == 16);
const _: () = assert!(core::mem::size_of::<LocalNet4>() == 12);
const _: () = assert!(Counter::ALL.len() as u32 <= COUNTER_MAX);
// Every counter's index is its position in ALL: the agent reads them in that order.
const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers, so any
    // byte pattern the kernel hands back is a valid value.
    unsafe impl aya::Pod for Service4Key {}
    unsafe impl aya::Pod for Service6Key {}
    unsafe impl aya::Pod for Ct6Key {}
    unsafe impl aya::Pod for Ct6Value {}
    unsafe impl aya::Pod for AffinityExt6Key {}
    unsafe impl aya::Pod for SrcRange6Key {}
    unsafe impl aya::Pod for LocalNet6 {}
    unsafe impl aya::Pod for Backend6Value {}
    unsafe impl aya::Pod for SockRevNat6Key {}
    unsafe impl aya::Pod for SockRevNat6Value {}
    unsafe impl aya::Pod for SockFwd6Key {}
    unsafe impl aya::Pod for Service4Value {}
    unsafe impl aya::Pod for Backend4Value {}
    unsafe impl aya::Pod for SockRevNat4Key {}
    unsafe impl aya::Pod for SockRevNat4Value {}
    unsafe impl aya::Pod for SockFwd4Key {}
    unsafe impl aya::Pod for SockFwd4Value {}
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for Affinity4Value {}
    unsafe impl aya::Pod for EventRate {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Value {}
    unsafe impl aya::Pod for CtTimeouts {}
    unsafe impl aya::Pod for AffinityExt4Key {}
    unsafe impl aya::Pod for SrcRange4Key {}
    unsafe impl aya::Pod for LocalNet4 {}
}
