//! `kpr trace SRC DST:PORT [tcp|udp]`: which backend a flow would reach and why, from the live
//! maps: the production version of kube-proxy's test tracer. It follows the datapath's steps
//! (the socket programs for clients on the node, the tc programs for traffic from outside):
//! frontend lookup, source ranges, endpoints, the conntrack entry of a known flow, the
//! client's affinity entry, and the slots a new flow is chosen from.

use std::net::{Ipv4Addr, SocketAddrV4};

use kpr_common::{
    AffinityExt4Key, Ct4Key, CtTimeouts, Service4Key, CT_DIR_FORWARD, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_EXT_LOCAL, SVC_FLAG_SOURCE_RANGES,
};

use super::{frontend_name, Pinned};

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
    pub src: Ipv4Addr,
    /// The client's port, to find a known flow's conntrack entry (external path).
    pub sport: Option<u16>,
    pub dst: SocketAddrV4,
    pub proto: u8,
}

pub fn trace(p: &Pinned, flow: Flow, scope: Scope, local_addrs: &[Ipv4Addr], now_ns: u64) -> Trace {
    let key = |scope| {
        Service4Key::scoped(
            u32::from_ne_bytes(flow.dst.ip().octets()),
            flow.dst.port().to_be(),
            flow.proto,
            scope,
            0,
        )
    };
    let external = p.service(&key(SCOPE_EXTERNAL));
    let scope = match scope {
        Scope::Internal => SCOPE_INTERNAL,
        Scope::External => SCOPE_EXTERNAL,
        Scope::Auto if external.is_some() && !local_addrs.contains(&flow.src) => SCOPE_EXTERNAL,
        Scope::Auto => SCOPE_INTERNAL,
    };
    let mut t = Trace {
        flow: format!(
            "{}{} -> {}/{}",
            flow.src,
            flow.sport.map(|p| format!(":{p}")).unwrap_or_default(),
            flow.dst,
            super::proto_name(flow.proto)
        ),
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
        if p.service(&internal).is_some() {
            fkey = internal;
        }
    }
    let Some(fe) = p.service(&fkey) else {
        step(
            &mut t,
            "frontend",
            format!("{} is not a frontend in this scope", frontend_name(&fkey)),
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
            frontend_name(&fkey),
            fe.rev_nat_id,
            fe.count,
            fe.flags
        ),
    );
    if scope == SCOPE_EXTERNAL && fe.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        let ranges = p.source_ranges(fe.rev_nat_id);
        if !p.source_allowed(fe.rev_nat_id, flow.src) {
            step(
                &mut t,
                "source ranges",
                format!("{} is outside {ranges:?}", flow.src),
            );
            t.verdict = "dropped (drop_source_range)".into();
            return t;
        }
        step(
            &mut t,
            "source ranges",
            format!("{} is inside {ranges:?}", flow.src),
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
            let s = p.service(&Service4Key {
                backend_slot: slot,
                ..fkey
            })?;
            let b = p.backend(s.backend_id)?;
            Some((slot, s.backend_id, super::backend_addr(&b).to_string()))
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
            let ck = Ct4Key::new(
                u32::from_ne_bytes(flow.src.octets()),
                sport.to_be(),
                fkey.address_be,
                fkey.port_be,
                flow.proto,
                CT_DIR_FORWARD,
            );
            let found =
                p.ct.get(&ck, 0)
                    .map(|v| (v, "established"))
                    .or_else(|_| p.ct_new.get(&ck, 0).map(|v| (v, "new")));
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
            let ak = AffinityExt4Key {
                client_address_be: u32::from_ne_bytes(flow.src.octets()),
                rev_nat_id: p.affinity_group(fe.rev_nat_id),
            };
            match p.affinity_ext.get(&ak, 0) {
                Ok(a) => {
                    let age_s = now_ns.saturating_sub(a.last_used_ns) / 1_000_000_000;
                    let valid = age_s <= u64::from(fe.backend_id);
                    let backend = by_id(a.backend_id);
                    step(
                        &mut t,
                        "affinity",
                        format!(
                            "entry for {}: backend id {}, last new connection {age_s} s ago (timeout {} s){}",
                            flow.src,
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
                    format!(
                        "no entry for {}: one is made by the first connection",
                        flow.src
                    ),
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
