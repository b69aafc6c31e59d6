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
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, HashMap},
    programs::TcContext,
};
use kpr_common::{
    AffinityExtKey, Counter, LocalNet4, LocalNet6, Service4Value, KPR_MASQ_MARK, LOCAL_DETECT_CIDR,
    LOCAL_DETECT_INTERFACE, LOCAL_DETECT_NONE, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_AFFINITY,
    SVC_FLAG_EXT_LOCAL, SVC_FLAG_NO_SNAT, SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    affinity_group,
    conntrack::{self, Choice},
    count,
    family::{Family, V4, V6},
    packet::{self, End, Packet, Parsed, Wire},
    select::{select_backend, FrontendRef, Remembered, NO_AFFINITY},
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
    match packet::ip_version(ctx) {
        Some(4) => ingress_family::<V4>(ctx),
        Some(6) => {
            let r = ingress_family::<V6>(ctx);
            if crate::events::enabled() {
                crate::events::flush6(ctx);
            }
            r
        }
        _ => Ok(Verdict::Pass),
    }
}

// Not inlined: each family's path gets its own stack frame (the verifier allows 512 bytes for
// the whole call chain), instead of one frame holding both.
#[inline(never)]
fn ingress_family<F: Family>(ctx: &TcContext) -> Result<Verdict, Counter> {
    // Matched by reference: moving the packet out would copy it (48 bytes for IPv6) within
    // the same frame.
    match &<F::Addr as Wire>::parse(ctx) {
        Parsed::Packet(p) => ingress_packet::<F>(ctx, p),
        Parsed::Fragment => Ok(Verdict::PassCounted(Counter::TcFragment)),
        Parsed::Other => Ok(Verdict::Pass),
    }
}

#[inline(always)]
fn ingress_packet<F: Family>(ctx: &TcContext, pkt: &Packet<F::Addr>) -> Result<Verdict, Counter> {
    let Some((frontend_key, frontend)) = lookup_frontend::<F>(pkt) else {
        // Not translated, but its replies may look like a translated flow's.
        if F::SPLIT_TC_FRAMES {
            conntrack::replace_untranslated_call::<F>(pkt);
        } else {
            conntrack::replace_untranslated::<F>(pkt);
        }
        return Ok(Verdict::Pass);
    };
    let r = translate::<F>(ctx, pkt, frontend_key, &frontend);
    if let Err(reason) = r {
        F::flow_dropped(ctx, pkt, frontend.rev_nat_id, reason);
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
fn lookup_frontend<F: Family>(
    pkt: &Packet<F::Addr>,
) -> Option<(FrontendRef<F::Addr>, Service4Value)> {
    if let Some(v) = F::service(pkt.daddr, pkt.dport, pkt.proto, SCOPE_EXTERNAL, 0) {
        return Some(((pkt.daddr, pkt.dport, pkt.proto, SCOPE_EXTERNAL), v));
    }
    if F::is_loopback(pkt.daddr) {
        return None;
    }
    F::service(pkt.daddr, pkt.dport, pkt.proto, SCOPE_INTERNAL, 0)
        .map(|v| ((pkt.daddr, pkt.dport, pkt.proto, SCOPE_INTERNAL), v))
}

/// Whether a new flow to `frontend_key` is source-NATed (marked for kpr's masquerade rule).
/// External frontends follow their flags (externalTrafficPolicy). A ClusterIP follows
/// kube-proxy's rule for its internal chain: `--masquerade-all`, or a source the local-traffic
/// detector (`--detect-local-mode`) does not call local; with neither, not at all.
#[inline(always)]
fn masquerades<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    scope: u8,
    frontend: &Service4Value,
) -> bool {
    if scope == SCOPE_EXTERNAL {
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
        // NodeCIDR before the Node has a pod CIDR (of this family): no detector yet.
        LOCAL_DETECT_CIDR => F::local_source(pkt.saddr).is_some_and(|local| !local),
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
pub static LOCAL_NET: Array<LocalNet4> = Array::with_max_entries(1, 0);

#[map(name = "KPR_LOCNET6_V1")]
pub static LOCAL_NET6: Array<LocalNet6> = Array::with_max_entries(1, 0);

#[map(name = "KPR_LOCALDEV_V1")]
static LOCAL_DEVS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

/// Sends a packet to external frontend `frontend` on to its flow's backend (choosing one for
/// a new flow), or drops it.
#[inline(always)]
fn translate<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    frontend_key: FrontendRef<F::Addr>,
    frontend: &Service4Value,
) -> Result<Verdict, Counter> {
    // loadBalancerSourceRanges come first: a client outside them learns nothing about the
    // service, not even whether it has endpoints.
    if frontend.flags & SVC_FLAG_SOURCE_RANGES != 0
        && !F::source_allowed(frontend.rev_nat_id, pkt.saddr)
    {
        return Err(Counter::DropSourceRange);
    }

    if frontend.count == 0 {
        if frontend.flags & SVC_FLAG_EXT_LOCAL != 0 {
            return Err(Counter::DropNoLocalBackend);
        }
        return Ok(Verdict::PassCounted(Counter::TcNoBackendPassed));
    }

    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let known = if F::SPLIT_TC_FRAMES {
        conntrack::lookup_call::<F>(pkt, &frontend_key, frontend.count, now)
    } else {
        conntrack::lookup::<F>(pkt, &frontend_key, frontend.count, now)
    };
    let choice = match known {
        Some(k) => {
            count(Counter::TcCtReused);
            if let Some(state) = k.establish {
                conntrack::establish_new::<F>(pkt, &state, now);
            }
            k.choice
        }
        None => {
            // Only a SYN starts a TCP flow. A mid-stream segment without an entry (evicted, or
            // a reply that happens to be addressed to a frontend's address and port, such as a
            // masqueraded connection's reply) would be sent to a backend that knows nothing of
            // the connection; left alone, it meets the stack, as without kpr.
            if pkt.proto == kpr_common::IPPROTO_TCP && !pkt.is_tcp_syn() {
                return Ok(Verdict::PassCounted(Counter::TcCtMissNotSyn));
            }
            let flow = NewFlow {
                frontend_key,
                frontend: *frontend,
                now,
            };
            new_flow::<F>(ctx, pkt, &flow)?
        }
    };

    if F::SPLIT_TC_FRAMES {
        rewrite_call::<F>(ctx, pkt, End::Dst, &(choice.address_be, choice.port_be))?;
    } else {
        packet::rewrite(ctx, pkt, End::Dst, choice.address_be, choice.port_be)
            .map_err(|_| Counter::DropRewrite)?;
    }
    if choice.masq {
        packet::or_mark(ctx, KPR_MASQ_MARK);
    }
    Ok(Verdict::Translated(Counter::TcTranslated))
}

/// A new flow's frontend, as [`new_flow`] takes it (one pointer: BPF calls take at most five
/// arguments).
struct NewFlow<A> {
    frontend_key: FrontendRef<A>,
    frontend: Service4Value,
    now: u64,
}

/// [`select`] as a function of its own (BPF-to-BPF call): see `Family::SPLIT_TC_FRAMES`.
#[inline(never)]
fn select_call<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    flow: &NewFlow<F::Addr>,
) -> Result<(Choice<F::Addr>, bool), Counter> {
    select::<F>(ctx, pkt, flow.frontend_key, &flow.frontend, flow.now)
}

/// [`conntrack::create`] as two functions of their own: see `Family::SPLIT_TC_FRAMES`. As
/// one, its frame (and the memset call zeroing the IPv6 value's padding) took the chain past
/// 6.1's 512 bytes, where every frame counts at least 32.
#[inline(never)]
fn evict_call<F: Family>(pkt: &Packet<F::Addr>, choice: &Choice<F::Addr>) {
    conntrack::evict_shadowed::<F>(pkt, choice)
}

/// See [`evict_call`].
#[inline(never)]
fn create_call<F: Family>(
    pkt: &Packet<F::Addr>,
    choice: &Choice<F::Addr>,
    flow: &NewFlow<F::Addr>,
) -> Result<(), Counter> {
    conntrack::insert_new::<F>(pkt, choice, flow.frontend.rev_nat_id, flow.now)
}

/// [`packet::rewrite`] as a function of its own: see `Family::SPLIT_TC_FRAMES`.
#[inline(never)]
fn rewrite_call<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    end: End,
    target: &(F::Addr, u16),
) -> Result<(), Counter> {
    packet::rewrite(ctx, pkt, end, target.0, target.1).map_err(|_| Counter::DropRewrite)
}

/// A new flow of `pkt`: its backend chosen and its conntrack entries written.
#[inline(always)]
fn new_flow<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    flow: &NewFlow<F::Addr>,
) -> Result<Choice<F::Addr>, Counter> {
    let (c, by_affinity) = if F::SPLIT_TC_FRAMES {
        select_call::<F>(ctx, pkt, flow)?
    } else {
        select::<F>(ctx, pkt, flow.frontend_key, &flow.frontend, flow.now)?
    };
    if F::SPLIT_TC_FRAMES {
        evict_call::<F>(pkt, &c);
        create_call::<F>(pkt, &c, flow)?;
    } else {
        conntrack::create::<F>(pkt, &c, flow.frontend.rev_nat_id, flow.now)?;
    }
    F::flow_translated(
        ctx,
        pkt,
        &(c.address_be, c.port_be),
        flow.frontend.rev_nat_id,
        by_affinity,
    );
    Ok(c)
}

/// Chooses the backend of a new flow: the client's affinity backend if the frontend has
/// session affinity and it is still valid (then also true), else a slot at random.
#[inline(always)]
fn select<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    (address, port_be, proto, scope): FrontendRef<F::Addr>,
    frontend: &Service4Value,
    now: u64,
) -> Result<(Choice<F::Addr>, bool), Counter> {
    let affinity = frontend.flags & SVC_FLAG_AFFINITY != 0;
    // Keyed by the client's address: traffic from outside has a real one, which is what
    // kube-proxy's ClientIP affinity uses.
    let affinity_key = AffinityExtKey {
        client_address_be: pkt.saddr,
        rev_nat_id: if affinity {
            affinity_group(frontend.rev_nat_id)
        } else {
            0
        },
    };
    let remembered = Remembered {
        sticky: (0, 0),
        affinity: if affinity {
            F::affinity_ext(&affinity_key).unwrap_or(NO_AFFINITY)
        } else {
            NO_AFFINITY
        },
        now,
    };
    let frontend_ref = (address, port_be, proto, scope);
    let chosen = select_backend::<F>(&frontend_ref, frontend, &remembered)?;
    let (slot, backend_id, by_affinity) = (chosen.slot, chosen.backend_id, chosen.by_affinity);
    let (backend_address, backend_port) = chosen.backend;
    if affinity {
        F::set_affinity_ext(&affinity_key, &chosen.affinity_entry(now));
    }
    let choice = Choice {
        backend_id,
        slot,
        address_be: backend_address,
        port_be: backend_port,
        masq: masquerades::<F>(ctx, pkt, scope, frontend),
    };
    Ok((choice, by_affinity))
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Result<Verdict, Counter> {
    match packet::ip_version(ctx) {
        Some(4) => egress_family::<V4>(ctx),
        Some(6) => egress_family::<V6>(ctx),
        _ => Ok(Verdict::Pass),
    }
}

#[inline(always)]
fn egress_family<F: Family>(ctx: &TcContext) -> Result<Verdict, Counter> {
    let pkt = match <F::Addr as Wire>::parse(ctx) {
        Parsed::Packet(p) => p,
        // Fragments of replies are not tracked either (see the module doc); not counted here,
        // to count each fragment once per node.
        Parsed::Fragment | Parsed::Other => return Ok(Verdict::Pass),
    };
    egress_packet::<F>(ctx, pkt)
}

#[inline(never)]
fn egress_packet<F: Family>(ctx: &TcContext, pkt: Packet<F::Addr>) -> Result<Verdict, Counter> {
    // netfilter undid the masquerade when the reply entered the node (nat prerouting), so a
    // reply reads backend → client here.
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((address_be, port_be)) = conntrack::reverse::<F>(&pkt, now) else {
        return Ok(Verdict::Pass);
    };
    packet::rewrite(ctx, &pkt, End::Src, address_be, port_be).map_err(|_| Counter::DropRewrite)?;
    Ok(Verdict::Translated(Counter::TcRevTranslated))
}
