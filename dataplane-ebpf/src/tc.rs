//! North-south service load balancing: tc (clsact) programs on the node's external devices,
//! for NodePort, externalIP and LoadBalancer frontends reached from outside the node.
//!
//! Traffic from processes on the node never gets here translated twice: the socket programs
//! translate it at connect()/sendmsg() to a backend address, which is not a frontend.
//!
//! - `kpr_tc_ingress` looks up the destination in the services map's external scope
//!   (`SCOPE_EXTERNAL`, whose slots follow externalTrafficPolicy), keeps each flow on one
//!   backend through conntrack (`KPR_CT4NEW_V1`, `KPR_CT4_V2`: see the conntrack module), rewrites the destination (DNAT) and lets the
//!   stack route the packet to the local pod or to the node of a remote one.
//! - `kpr_tc_egress` rewrites the source of replies (backend → client) back to the frontend.
//!
//! Source NAT for externalTrafficPolicy: Cluster is not done here. Ingress sets
//! `KPR_MASQ_MARK` on the packet and kpr's nftables table masquerades marked packets in
//! postrouting; netfilter's conntrack undoes it on the replies before they reach the egress
//! program. Netfilter already does SNAT well (source port allocation, collisions between
//! clients, reply matching); doing it in BPF would need a port allocator and a second
//! conntrack. With externalTrafficPolicy: Local no mark is set and the backend sees the
//! client's address, as with kube-proxy.
//!
//! A frontend without endpoints:
//! - externalTrafficPolicy: Local (`SVC_FLAG_EXT_LOCAL`, set while the Service has endpoints
//!   on other nodes): dropped (kube-proxy drops too: the client's load balancer health check
//!   steers traffic away from this node);
//! - otherwise passed to the stack untouched. For a NodePort on a node address no socket
//!   listens, so the kernel answers a TCP RST or an ICMP port unreachable at once; for
//!   externalIPs and LoadBalancer IPs kpr's nftables table holds reject rules.
//!
//! IPv4 fragments: a non-first fragment has no ports, so it is passed untouched (counted).
//! The first fragment is translated like any packet, so a fragmented datagram to a frontend
//! does not reach its backend whole; tracking fragments (Cilium's frag map) is left to do.
//!
//! Return codes: a packet kpr lets through gets `TC_ACT_UNSPEC` ("no verdict"): with TCX or a
//! clsact filter chain, programs after kpr's still see it, and with none the packet passes.
//! Drops are `TC_ACT_SHOT`, each counted under its reason.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap},
    programs::TcContext,
};
use kpr_common::{
    Affinity4Value, AffinityExt4Key, Backend4Value, Counter, LocalNet4, Service4Key, Service4Value,
    SrcRange4Key, KPR_MASQ_MARK, LOCAL_DETECT_CIDR, LOCAL_DETECT_INTERFACE, LOCAL_DETECT_NONE,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_EXT_LOCAL, SVC_FLAG_NO_SNAT,
    SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    affinity_group,
    conntrack::{self, Choice},
    count, events,
    packet::{self, End, Packet, Parsed},
    AFFINITY_EXT, BACKENDS, SERVICES, SRC_RANGES,
};

/// What happens to a packet that is not dropped.
enum Verdict {
    /// Not for kpr, or left to the stack: untouched, nothing to count.
    Pass,
    /// Passed untouched, counted for visibility.
    PassCounted(Counter),
    /// Rewritten; counted.
    Translated(Counter),
}

#[classifier]
pub fn kpr_tc_ingress(ctx: TcContext) -> i32 {
    finish(ingress(&ctx))
}

#[classifier]
pub fn kpr_tc_egress(ctx: TcContext) -> i32 {
    finish(egress(&ctx))
}

#[inline(always)]
fn finish(r: Result<Verdict, Counter>) -> i32 {
    match r {
        Ok(Verdict::Pass) => TC_ACT_UNSPEC,
        Ok(Verdict::PassCounted(c)) | Ok(Verdict::Translated(c)) => {
            count(c);
            TC_ACT_UNSPEC
        }
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Result<Verdict, Counter> {
    let pkt = match packet::parse(ctx) {
        Parsed::Packet(p) => p,
        Parsed::Fragment => return Ok(Verdict::PassCounted(Counter::TcFragment)),
        Parsed::Other => return Ok(Verdict::Pass),
    };
    let Some((frontend_key, frontend)) = lookup_frontend(&pkt) else {
        // Not translated, but its replies may look like a translated flow's.
        conntrack::replace_untranslated(&pkt);
        return Ok(Verdict::Pass);
    };
    let r = translate(ctx, &pkt, &frontend_key, &frontend);
    if let Err(reason) = r {
        events::flow_dropped(
            ctx,
            pkt.proto,
            (pkt.saddr, pkt.sport),
            (pkt.daddr, pkt.dport),
            frontend.rev_nat_id,
            reason,
        );
    }
    r
}

/// The frontend a packet from outside is addressed to: its external scope (NodePort,
/// externalIP, LoadBalancer IP), else a ClusterIP's internal scope. kube-proxy translates
/// ClusterIPs in PREROUTING, so traffic routed to the node (a router that sends the Service
/// CIDR to nodes, a sandboxed runtime's guest) reaches the Service too. A frontend with an
/// external scope is never served from its internal one here, and loopback addresses never
/// (CVE-2020-8558: localhost NodePorts have an internal scope only).
#[inline(always)]
fn lookup_frontend(pkt: &Packet) -> Option<(Service4Key, Service4Value)> {
    let external = Service4Key::scoped(pkt.daddr, pkt.dport, pkt.proto, SCOPE_EXTERNAL, 0);
    // SAFETY: values are plain data, copied out at once.
    if let Some(v) = unsafe { SERVICES.get(external) } {
        return Some((external, *v));
    }
    if kpr_common::is_loopback4_be(pkt.daddr) {
        return None;
    }
    let internal = Service4Key::scoped(pkt.daddr, pkt.dport, pkt.proto, SCOPE_INTERNAL, 0);
    // SAFETY: as above.
    unsafe { SERVICES.get(internal) }.map(|v| (internal, *v))
}

/// Whether a new flow to `frontend_key` is source-NATed (marked for kpr's masquerade rule).
/// External frontends follow their flags (externalTrafficPolicy). A ClusterIP follows
/// kube-proxy's rule for its internal chain: `--masquerade-all`, or a source the local-traffic
/// detector (`--detect-local-mode`) does not call local; with neither, not at all.
#[inline(always)]
fn masquerades(
    ctx: &TcContext,
    pkt: &Packet,
    frontend_key: &Service4Key,
    frontend: &Service4Value,
) -> bool {
    if frontend_key.scope == SCOPE_EXTERNAL {
        return frontend.flags & (SVC_FLAG_EXT_LOCAL | SVC_FLAG_NO_SNAT) == 0;
    }
    // SAFETY: reads of read-only data set at load time.
    let (all, detect) = unsafe {
        (
            core::ptr::read_volatile(&KPR_MASQUERADE_ALL),
            core::ptr::read_volatile(&KPR_LOCAL_DETECT),
        )
    };
    if all != 0 {
        return true;
    }
    match detect {
        LOCAL_DETECT_CIDR => match LOCAL_NET.get(0) {
            Some(n) if n.set != 0 => pkt.saddr & n.mask_be != n.net_be,
            // NodeCIDR before the Node has a pod CIDR: no detector yet.
            _ => false,
        },
        LOCAL_DETECT_INTERFACE => {
            // A copy on the stack: the verifier takes no map key from the context.
            // SAFETY: the context is the kernel's __sk_buff for this run.
            let ifindex: u32 = unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).ifindex) };
            // SAFETY: a plain value, read at once.
            unsafe { LOCAL_DEVS.get(&ifindex) }.is_none()
        }
        _ => false,
    }
}

/// `--masquerade-all` (set by the agent at load time).
#[no_mangle]
static KPR_MASQUERADE_ALL: u8 = 0;
/// The local-traffic detector (`LOCAL_DETECT_*`, `--detect-local-mode`), set at load time.
#[no_mangle]
static KPR_LOCAL_DETECT: u8 = LOCAL_DETECT_NONE;

#[map(name = "KPR_LOCNET4_V1")]
static LOCAL_NET: Array<LocalNet4> = Array::with_max_entries(1, 0);

#[map(name = "KPR_LOCALDEV_V1")]
static LOCAL_DEVS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

/// Sends a packet to external frontend `frontend` on to its flow's backend (choosing one for
/// a new flow), or drops it.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    pkt: &Packet,
    frontend_key: &Service4Key,
    frontend: &Service4Value,
) -> Result<Verdict, Counter> {
    let pkt = *pkt;
    // loadBalancerSourceRanges come first: a client outside them learns nothing about the
    // service, not even whether it has endpoints.
    if frontend.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        let key = Key::new(
            kpr_common::src_range_prefixlen(32),
            SrcRange4Key {
                rev_nat_id: frontend.rev_nat_id,
                address_be: pkt.saddr,
            },
        );
        if SRC_RANGES.get(&key).is_none() {
            return Err(Counter::DropSourceRange);
        }
    }

    if frontend.count == 0 {
        if frontend.flags & SVC_FLAG_EXT_LOCAL != 0 {
            return Err(Counter::DropNoLocalBackend);
        }
        return Ok(Verdict::PassCounted(Counter::TcNoBackendPassed));
    }

    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let choice = match conntrack::lookup(&pkt, frontend_key, frontend.count, now) {
        Some(c) => {
            count(Counter::TcCtReused);
            c
        }
        None => {
            // Only a SYN starts a TCP flow. A mid-stream segment without an entry (evicted, or
            // a reply that happens to be addressed to a frontend's address and port, such as a
            // masqueraded connection's reply) would be sent to a backend that knows nothing of
            // the connection; left alone, it meets the stack, as without kpr.
            if pkt.proto == kpr_common::IPPROTO_TCP && !pkt.is_tcp_syn() {
                return Ok(Verdict::PassCounted(Counter::TcCtMissNotSyn));
            }
            let (c, by_affinity) = select(ctx, &pkt, frontend_key, frontend, now)?;
            conntrack::create(&pkt, &c, frontend.rev_nat_id, now)?;
            events::flow_translated(
                ctx,
                pkt.proto,
                (pkt.saddr, pkt.sport),
                (pkt.daddr, pkt.dport),
                (c.address_be, c.port_be),
                frontend.rev_nat_id,
                by_affinity,
            );
            c
        }
    };

    packet::rewrite(ctx, &pkt, End::Dst, choice.address_be, choice.port_be)
        .map_err(|_| Counter::DropRewrite)?;
    if choice.masq {
        packet::or_mark(ctx, KPR_MASQ_MARK);
    }
    Ok(Verdict::Translated(Counter::TcTranslated))
}

/// Chooses the backend of a new flow: the client's affinity backend if the frontend has
/// session affinity and it is still valid (then also true), else a slot at random.
#[inline(always)]
fn select(
    ctx: &TcContext,
    pkt: &Packet,
    frontend_key: &Service4Key,
    frontend: &Service4Value,
    now: u64,
) -> Result<(Choice, bool), Counter> {
    let affinity = frontend.flags & SVC_FLAG_AFFINITY != 0;
    // Keyed by the client's address: traffic from outside has a real one, which is what
    // kube-proxy's ClientIP affinity uses.
    let affinity_key = AffinityExt4Key {
        client_address_be: pkt.saddr,
        rev_nat_id: if affinity {
            affinity_group(frontend.rev_nat_id)
        } else {
            0
        },
    };
    let mut chosen: Option<(u16, u32)> = None;
    let mut by_affinity = false;
    let holds = crate::socklb::holds4(*frontend_key);
    if affinity {
        // SAFETY: plain data, copied out at once.
        if let Some(prev) = unsafe { AFFINITY_EXT.get(affinity_key) } {
            let prev = *prev;
            // Same semantics as the socket program: the timeout (slot 0's backend_id, in
            // seconds) runs from the client's last new connection to the frontend.
            let timeout_ns = u64::from(frontend.backend_id) * 1_000_000_000;
            if now.wrapping_sub(prev.last_used_ns) <= timeout_ns {
                if let Some(slot) =
                    crate::socklb::backend_slot(holds, frontend.count, prev.slot, prev.backend_id)
                {
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
            let pick = unsafe { bpf_get_prandom_u32() } % u32::from(frontend.count);
            let slot = pick as u16 + 1;
            let slot_key = Service4Key::scoped(
                frontend_key.address_be,
                frontend_key.port_be,
                frontend_key.proto,
                frontend_key.scope,
                slot,
            );
            match unsafe { SERVICES.get(slot_key) } {
                Some(v) => (slot, v.backend_id),
                None => return Err(Counter::DropSlotMissing),
            }
        }
    };
    let backend: Backend4Value = match unsafe { BACKENDS.get(backend_id) } {
        Some(b) => *b,
        None => return Err(Counter::DropBackendMissing),
    };
    if affinity {
        let v = Affinity4Value {
            last_used_ns: now,
            backend_id,
            slot,
            pad: 0,
        };
        // Best effort: without the entry the client's next connection chooses anew.
        let _ = AFFINITY_EXT.insert(affinity_key, v, 0);
    }
    let choice = Choice {
        backend_id,
        slot,
        address_be: backend.address_be,
        port_be: backend.port_be,
        masq: masquerades(ctx, pkt, frontend_key, frontend),
    };
    Ok((choice, by_affinity))
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Result<Verdict, Counter> {
    let pkt = match packet::parse(ctx) {
        Parsed::Packet(p) => p,
        // Fragments of replies are not tracked either (see the module doc); not counted here,
        // to count each fragment once per node.
        Parsed::Fragment | Parsed::Other => return Ok(Verdict::Pass),
    };
    // netfilter undid the masquerade when the reply entered the node (nat prerouting), so a
    // reply reads backend → client here.
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((address_be, port_be)) = conntrack::reverse(&pkt, now) else {
        return Ok(Verdict::Pass);
    };
    packet::rewrite(ctx, &pkt, End::Src, address_be, port_be).map_err(|_| Counter::DropRewrite)?;
    Ok(Verdict::Translated(Counter::TcRevTranslated))
}
