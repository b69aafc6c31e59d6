//! `kpr trace SRC DST:PORT [tcp|udp]`: which backend a flow would reach and why, from the live
//! maps: the production version of kube-proxy's test tracer. It follows the datapath's steps
//! (the socket programs for clients on the node, the tc programs for traffic from outside):
//! frontend lookup, source ranges, endpoints, the conntrack entry of a known flow, the
//! client's affinity entry, and the slots a new flow is chosen from.

use std::net::{IpAddr, SocketAddr};

use kpr_common::{
    CtTimeouts, CT_DIR_FORWARD, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_AFFINITY,
    SVC_FLAG_EXT_LOCAL, SVC_FLAG_SOURCE_RANGES,
};

use super::family::{AffinityExt, Ct, CtVal, Family, ServiceKeyParts, SrcRange, V4, V6};
use super::{frontend_name, FamilyMaps, Pinned};

/// Which path to trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    /// Clients on this node (pods, host processes): the socket programs.
    Internal,
    /// Traffic arriving on the node's devices: the tc programs.
    External,
    /// External when DST has an external frontend and SRC is not an address of this node.
    Auto,
}

/// One step of the datapath's decision.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    pub step: &'static str,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Trace {
    pub flow: String,
    pub scope: &'static str,
    pub steps: Vec<Step>,
    /// What happens to the flow, in one line.
    pub verdict: String,
    /// The backend, when a single one is certain (a known flow, an affinity entry, or a
    /// frontend with one backend).
    pub backend: Option<String>,
    /// The backends a new flow is chosen from at random (slot order).
    pub candidates: Vec<String>,
}

/// The flow to trace.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub src: IpAddr,
    /// The client's port, to find a known flow's conntrack entry (external path).
    pub sport: Option<u16>,
    pub dst: SocketAddr,
    pub proto: u8,
}

/// Traces `flow` through its family's maps. A v4-mapped IPv6 address (`::ffff:a.b.c.d`, from
/// a dual-stack socket) is traced as its IPv4 address, as the socket programs translate it.
pub fn trace(p: &Pinned, flow: Flow, scope: Scope, local_addrs: &[IpAddr], now_ns: u64) -> Trace {
    let src = flow.src.to_canonical();
    let src_is_local = local_addrs.contains(&src) || local_addrs.contains(&flow.src);
    match (src, flow.dst.ip().to_canonical()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            trace_family::<V4>(p, &p.v4, flow, (src, dst), scope, src_is_local, now_ns)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => match &p.v6 {
            Some(maps) => {
                trace_family::<V6>(p, maps, flow, (src, dst), scope, src_is_local, now_ns)
            }
            None => not_a_flow(
                flow,
                "this node's pins have no IPv6 maps (an agent older than IPv6 support)",
            ),
        },
        _ => not_a_flow(
            flow,
            "SRC and DST are of different address families: no packet carries both",
        ),
    }
}

fn not_a_flow(flow: Flow, why: &str) -> Trace {
    Trace {
        flow: flow_name(&flow),
        scope: "none",
        steps: vec![Step {
            step: "family",
            detail: why.to_string(),
        }],
        verdict: "not traced".into(),
        backend: None,
        candidates: Vec::new(),
    }
}

fn flow_name(flow: &Flow) -> String {
    let src = match flow.sport {
        Some(port) => SocketAddr::new(flow.src, port).to_string(),
        None => flow.src.to_string(),
    };
    format!("{src} -> {}/{}", flow.dst, super::proto_name(flow.proto))
}

fn trace_family<F: Family>(
    p: &Pinned,
    maps: &FamilyMaps<F>,
    flow: Flow,
    (src, dst): (F::Ip, F::Ip),
    scope: Scope,
    src_is_local: bool,
    now_ns: u64,
) -> Trace
where
    Ct<F>: aya::Pod,
    CtVal<F>: aya::Pod,
    AffinityExt<F>: aya::Pod,
    SrcRange<F>: aya::Pod,
{
    let key = |scope| ServiceKeyParts {
        scope,
        address_be: F::addr(dst),
        port_be: flow.dst.port().to_be(),
        proto: flow.proto,
        backend_slot: 0,
    };
    let external = maps.service(key(SCOPE_EXTERNAL));
    let scope = match scope {
        Scope::Internal => SCOPE_INTERNAL,
        Scope::External => SCOPE_EXTERNAL,
        Scope::Auto if external.is_some() && !src_is_local => SCOPE_EXTERNAL,
        Scope::Auto => SCOPE_INTERNAL,
    };
    let mut t = Trace {
        flow: flow_name(&flow),
        scope: if scope == SCOPE_EXTERNAL {
            "external (tc programs)"
        } else {
            "internal (socket programs)"
        },
        steps: Vec::new(),
        verdict: String::new(),
        backend: None,
        candidates: Vec::new(),
    };
    let step = |t: &mut Trace, step, detail: String| t.steps.push(Step { step, detail });
    let mut fkey = key(scope);
    // The tc program serves a ClusterIP routed to the node from its internal scope (never a
    // loopback address), as kube-proxy's PREROUTING rules do.
    if scope == SCOPE_EXTERNAL && external.is_none() && !flow.dst.ip().is_loopback() {
        let internal = key(SCOPE_INTERNAL);
        if maps.service(internal).is_some() {
            fkey = internal;
        }
    }
    let Some(fe) = maps.service(fkey) else {
        step(
            &mut t,
            "frontend",
            format!(
                "{} is not a frontend in this scope",
                frontend_name::<F>(fkey)
            ),
        );
        t.verdict = if scope == SCOPE_EXTERNAL {
            "not translated: the packet passes to the stack untouched".into()
        } else {
            "not translated: the socket call proceeds to the address as given".into()
        };
        return t;
    };
    step(
        &mut t,
        "frontend",
        format!(
            "{} found: rev-NAT id {}, {} backend slot(s), flags {:#04x}",
            frontend_name::<F>(fkey),
            fe.rev_nat_id,
            fe.count,
            fe.flags
        ),
    );
    if scope == SCOPE_EXTERNAL && fe.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        let ranges = maps.source_ranges(fe.rev_nat_id);
        if !maps.source_allowed(fe.rev_nat_id, src) {
            step(
                &mut t,
                "source ranges",
                format!("{src} is outside {ranges:?}"),
            );
            t.verdict = "dropped (drop_source_range)".into();
            return t;
        }
        step(
            &mut t,
            "source ranges",
            format!("{src} is inside {ranges:?}"),
        );
    }
    if fe.count == 0 {
        step(&mut t, "endpoints", "none".into());
        t.verdict = match (scope == SCOPE_EXTERNAL, fe.flags & SVC_FLAG_EXT_LOCAL != 0) {
            (false, _) => "refused: connect() fails with ECONNREFUSED (drop_no_backend)".into(),
            (true, true) => "dropped: externalTrafficPolicy Local, no endpoint on this node (drop_no_local_backend)".into(),
            (true, false) => "passed to the stack, which refuses it (tc_no_backend_passed; kpr's reject rules)".into(),
        };
        return t;
    }
    let slots: Vec<(u16, u32, String)> = (1..=fe.count)
        .filter_map(|slot| {
            let s = maps.service(ServiceKeyParts {
                backend_slot: slot,
                ..fkey
            })?;
            let b = maps.backend(s.backend_id)?;
            Some((slot, s.backend_id, b.to_string()))
        })
        .collect();
    t.candidates = slots.iter().map(|(_, _, a)| a.clone()).collect();
    let by_id = |id: u32| {
        slots
            .iter()
            .find(|(_, i, _)| *i == id)
            .map(|(_, _, a)| a.clone())
    };

    if scope == SCOPE_EXTERNAL {
        if let Some(sport) = flow.sport {
            let ck = Ct::<F>::new(
                F::addr(src),
                sport.to_be(),
                fkey.address_be,
                fkey.port_be,
                flow.proto,
                CT_DIR_FORWARD,
            );
            let found = maps
                .ct
                .get(&ck, 0)
                .map(|v| (v, "established"))
                .or_else(|_| maps.ct_new.get(&ck, 0).map(|v| (v, "new")));
            match found {
                Ok((v, table)) => {
                    let alive =
                        !crate::ebpf::conntrack::expired(&CtTimeouts::DEFAULT, &ck, &v, now_ns);
                    let backend = by_id(v.backend_id);
                    step(
                        &mut t,
                        "conntrack",
                        format!(
                            "a known flow ({table}, flags {:#04x}{}) on backend id {}{}",
                            v.flags,
                            if alive {
                                ""
                            } else {
                                ", expired under the default lifetimes"
                            },
                            v.backend_id,
                            backend
                                .as_ref()
                                .map(|a| format!(" ({a})"))
                                .unwrap_or_else(
                                    || " (no longer in the frontend: re-balanced)".into()
                                )
                        ),
                    );
                    if let (Some(b), true) = (backend, alive) {
                        t.verdict = format!("translated to {b}: the flow keeps its backend");
                        t.backend = Some(b);
                        return t;
                    }
                }
                Err(_) => step(&mut t, "conntrack", "no entry: a new flow".into()),
            }
        }
    }
    if fe.flags & SVC_FLAG_AFFINITY != 0 {
        if scope == SCOPE_EXTERNAL {
            let ak = AffinityExt::<F> {
                client_address_be: F::addr(src),
                rev_nat_id: p.affinity_group(fe.rev_nat_id),
            };
            match maps.affinity_ext.get(&ak, 0) {
                Ok(a) => {
                    let age_s = now_ns.saturating_sub(a.last_used_ns) / 1_000_000_000;
                    let valid = age_s <= u64::from(fe.backend_id);
                    let backend = by_id(a.backend_id);
                    step(
                        &mut t,
                        "affinity",
                        format!(
                            "entry for {src}: backend id {}, last new connection {age_s} s ago (timeout {} s){}",
                            a.backend_id,
                            fe.backend_id,
                            if valid { "" } else { ": expired" }
                        ),
                    );
                    if let (Some(b), true) = (backend, valid) {
                        t.verdict = format!("translated to {b} (ClientIP affinity)");
                        t.backend = Some(b);
                        return t;
                    }
                }
                Err(_) => step(
                    &mut t,
                    "affinity",
                    format!("no entry for {src}: one is made by the first connection"),
                ),
            }
        } else {
            step(
                &mut t,
                "affinity",
                format!(
                    "ClientIP affinity ({} s), keyed by the client's network namespace: not traceable from an address",
                    fe.backend_id
                ),
            );
        }
    }
    step(
        &mut t,
        "selection",
        format!(
            "a slot at random among {}: {}",
            slots.len(),
            slots
                .iter()
                .map(|(s, id, a)| format!("{s} => {a} (id {id})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    if slots.len() == 1 {
        t.backend = Some(slots[0].2.clone());
        t.verdict = format!("translated to {}", slots[0].2);
    } else {
        t.verdict = format!("translated to one of {} backends", slots.len());
    }
    t
}
