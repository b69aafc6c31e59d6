//! Turns a [`DesiredState`] into writes on the load-balancing maps, as a diff.
//!
//! Order matters because the kernel reads the maps while we write them (Cilium's order):
//! 1. new backends first, so no slot can name an id the backends map lacks;
//! 2. per frontend: backend slots, then the frontend slot (its count), then slots beyond the
//!    new count — a reader sees either the old or the new backend set, never a dangling slot;
//! 3. backends no frontend uses any more, last.
//!
//! Removed frontends (slot 0 first, so no new lookups start, then their slots) go before all
//! of this: they serve nobody any more, and full maps need their room for the new ones.
//!
//! Ids (backend ids, reverse-NAT ids) are restored from the pinned maps at start, so a restart
//! of the agent neither re-shuffles nor invalidates what live sockets recorded.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use kpr_common::{
    Backend4Value, Backend6Value, Service4Key, Service4Value, Service6Key, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_EXT_LOCAL, SVC_FLAG_NONE, SVC_FLAG_NO_LOCAL_DROP,
    SVC_FLAG_NO_SNAT, SVC_FLAG_SOURCE_RANGES,
};

use super::maps::{BackendValue, LbMaps, MapOpError, ServiceKey};
use crate::model::{DesiredState, Frontend, ServicePortName};

/// Errors of the eBPF sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Map(#[from] MapOpError),
    #[error("out of {0} ids")]
    IdsExhausted(&'static str),
}

/// What one sync did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends: usize,
    pub backends: usize,
    pub writes: usize,
    pub deletes: usize,
    /// Service ports refused because the maps cannot hold them (see [`Capacity`]).
    pub refused: usize,
}

/// How many entries the services and backends maps hold. Service ports are admitted in name
/// order while they fit; the rest are refused, each with a log line, and everything admitted
/// keeps working (a map insert failing midway would instead fail every sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    pub services: usize,
    pub backends: usize,
}

impl Default for Capacity {
    /// The maps' compiled-in sizes.
    fn default() -> Self {
        Self {
            services: kpr_common::SERVICES_MAP_MAX as usize,
            backends: kpr_common::BACKENDS_MAP_MAX as usize,
        }
    }
}

/// An address as the maps hold it (network byte order): the family picks the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapAddr {
    V4(u32),
    V6([u32; 4]),
}

impl MapAddr {
    pub fn of(ip: IpAddr) -> MapAddr {
        match ip {
            IpAddr::V4(ip) => MapAddr::V4(u32::from_ne_bytes(ip.octets())),
            IpAddr::V6(ip) => {
                let o = ip.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                MapAddr::V6([word(0), word(4), word(8), word(12)])
            }
        }
    }
}

/// A frontend as the maps key it, without the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FrontendKey {
    address: MapAddr,
    port_be: u16,
    proto: u8,
    scope: u8,
}

impl FrontendKey {
    fn slot(self, slot: u16) -> ServiceKey {
        match self.address {
            MapAddr::V4(a) => ServiceKey::V4(Service4Key::scoped(
                a,
                self.port_be,
                self.proto,
                self.scope,
                slot,
            )),
            MapAddr::V6(a) => ServiceKey::V6(Service6Key::scoped(
                a,
                self.port_be,
                self.proto,
                self.scope,
                slot,
            )),
        }
    }

    fn of(key: &ServiceKey) -> FrontendKey {
        match key {
            ServiceKey::V4(k) => FrontendKey {
                address: MapAddr::V4(k.address_be),
                port_be: k.port_be,
                proto: k.proto,
                scope: k.scope,
            },
            ServiceKey::V6(k) => FrontendKey {
                address: MapAddr::V6(k.address_be),
                port_be: k.port_be,
                proto: k.proto,
                scope: k.scope,
            },
        }
    }
}

/// What one frontend (in one scope) should look like.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WantFrontend {
    backends: Vec<BackendKey>,
    /// Slot 0's flags and, with SVC_FLAG_AFFINITY, the timeout in seconds (in `backend_id`).
    flags: u8,
    affinity_timeout_s: u32,
    /// loadBalancerSourceRanges (external scope of LoadBalancer frontends only), sorted.
    source_ranges: Vec<IpNet>,
}

/// A backend as the maps describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendKey {
    address: MapAddr,
    port_be: u16,
    proto: u8,
}

impl BackendKey {
    fn value(self) -> BackendValue {
        match self.address {
            MapAddr::V4(address_be) => BackendValue::V4(Backend4Value {
                address_be,
                port_be: self.port_be,
                proto: self.proto,
                flags: 0,
            }),
            MapAddr::V6(address_be) => BackendValue::V6(Backend6Value {
                address_be,
                port_be: self.port_be,
                proto: self.proto,
                flags: 0,
            }),
        }
    }

    fn of(value: &BackendValue) -> BackendKey {
        match value {
            BackendValue::V4(v) => BackendKey {
                address: MapAddr::V4(v.address_be),
                port_be: v.port_be,
                proto: v.proto,
            },
            BackendValue::V6(v) => BackendKey {
                address: MapAddr::V6(v.address_be),
                port_be: v.port_be,
                proto: v.proto,
            },
        }
    }
}

/// What we believe a frontend looks like in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ProgrammedFrontend {
    /// Slot 0's value, if slot 0 exists.
    rev_nat_id: Option<u32>,
    count: u16,
    flags: u8,
    affinity_timeout_s: u32,
    source_ranges: Vec<IpNet>,
    /// Every slot > 0 present in the map → backend id (may include slots beyond `count` after
    /// a restore from maps left by an interrupted sync).
    slots: BTreeMap<u16, u32>,
}

/// Diffs desired state against what it has programmed, through an [`LbMaps`].
pub struct LbSyncer<M> {
    maps: M,
    backends: HashMap<BackendKey, u32>,
    /// Backend ids present in the map that no key owns (duplicates found on restore).
    stray_backends: BTreeSet<u32>,
    frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
    /// Ids present in the maps, kept alongside so allocation is O(1) (not a scan per new id).
    backend_ids: HashSet<u32>,
    rev_nat_ids: HashSet<u32>,
    /// Frontend rev-NAT id → its session-affinity group, where the two differ.
    affinity_groups: BTreeMap<u32, u32>,
    /// Drop (kube-proxy) rather than refuse calls to a ClusterIP with internalTrafficPolicy
    /// Local and no local endpoint (`SVC_FLAG_NO_LOCAL_DROP`).
    drop_no_local_endpoints: bool,
    /// Masquerade externalTrafficPolicy Cluster traffic to backends on this node too, as
    /// kube-proxy does (`--masquerade-local-endpoints`); off, it keeps the client's address.
    masquerade_local_endpoints: bool,
    next_backend_id: u32,
    next_rev_nat_id: u32,
    /// Set when a sync failed midway: our view may differ from the maps, so the next sync
    /// re-reads them first.
    dirty: bool,
    /// The maps' sizes; None: unbounded (test fakes).
    capacity: Option<Capacity>,
    /// Service ports refused at the last sync, with why (logged when they first are).
    refused: BTreeMap<String, String>,
}

impl<M: LbMaps> LbSyncer<M> {
    /// Creates a syncer that starts from what the maps already hold (after an agent restart,
    /// the pinned maps keep serving and keep their ids).
    pub fn restore(maps: M) -> Result<Self, SyncError> {
        let mut s = Self {
            maps,
            backends: HashMap::new(),
            stray_backends: BTreeSet::new(),
            frontends: BTreeMap::new(),
            backend_ids: HashSet::new(),
            rev_nat_ids: HashSet::new(),
            affinity_groups: BTreeMap::new(),
            drop_no_local_endpoints: false,
            masquerade_local_endpoints: false,
            next_backend_id: 1,
            next_rev_nat_id: 1,
            dirty: false,
            capacity: None,
            refused: BTreeMap::new(),
        };
        s.reload()?;
        Ok(s)
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Number of frontends and backends currently programmed.
    pub fn occupancy(&self) -> (usize, usize) {
        (self.frontends.len(), self.backends.len())
    }

    /// Entries this syncer keeps in the services map (slot 0 plus backend slots per frontend)
    /// and in the backends map.
    pub fn map_entries(&self) -> (usize, usize) {
        let services = self
            .frontends
            .values()
            .map(|f| usize::from(f.rev_nat_id.is_some()) + f.slots.len())
            .sum();
        (services, self.backend_ids.len())
    }

    fn reload(&mut self) -> Result<(), SyncError> {
        self.backends.clear();
        self.stray_backends.clear();
        self.frontends.clear();
        self.backend_ids.clear();
        self.rev_nat_ids.clear();
        let mut max_backend = 0;
        for (id, v) in self.maps.dump_backends()? {
            max_backend = max_backend.max(id);
            self.backend_ids.insert(id);
            let key = BackendKey::of(&v);
            if let Some(other) = self.backends.insert(key, id) {
                // Two ids for one backend: keep the lower, retire the other once unused.
                let (keep, drop) = (other.min(id), other.max(id));
                self.backends.insert(key, keep);
                self.stray_backends.insert(drop);
            }
        }
        let mut max_rev = 0;
        for (k, v) in self.maps.dump_services()? {
            let fk = FrontendKey::of(&k);
            let f = self.frontends.entry(fk).or_default();
            if k.backend_slot() == 0 {
                f.rev_nat_id = Some(v.rev_nat_id);
                f.count = v.count;
                f.flags = v.flags;
                f.affinity_timeout_s = v.backend_id;
                max_rev = max_rev.max(v.rev_nat_id);
                self.rev_nat_ids.insert(v.rev_nat_id);
            } else {
                f.slots.insert(k.backend_slot(), v.backend_id);
            }
        }
        let mut ranges: HashMap<u32, Vec<IpNet>> = HashMap::new();
        for (rev, net) in self.maps.dump_source_ranges()? {
            ranges.entry(rev).or_default().push(net);
        }
        for f in self.frontends.values_mut() {
            if let Some(r) = f.rev_nat_id.and_then(|rev| ranges.remove(&rev)) {
                f.source_ranges = r;
                f.source_ranges.sort();
            }
        }
        self.affinity_groups = self.maps.dump_affinity_groups()?.into_iter().collect();
        self.next_backend_id = max_backend.wrapping_add(1).max(1);
        self.next_rev_nat_id = max_rev.wrapping_add(1).max(1);
        self.dirty = false;
        Ok(())
    }

    /// Programs `desired`. On error the maps may hold a mix of old and new state (each step
    /// keeps the datapath consistent); the next call re-reads the maps and converges.
    pub fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, SyncError> {
        if self.dirty {
            self.reload()?;
        }
        self.dirty = true;
        let stats = self.apply(desired)?;
        self.dirty = false;
        Ok(stats)
    }

    /// Re-reads the maps, then programs `desired`: repairs anything that changed behind our back.
    pub fn full_sync(&mut self, desired: &DesiredState) -> Result<SyncStats, SyncError> {
        self.dirty = true;
        self.sync(desired)
    }

    /// Bounds what is programmed by the maps' sizes (see [`Capacity`]).
    pub fn set_capacity(&mut self, capacity: Capacity) {
        self.capacity = Some(capacity);
    }

    pub fn capacity(&self) -> Option<Capacity> {
        self.capacity
    }

    /// Service ports refused at the last sync for lack of map space, with the reason.
    /// Drop (kube-proxy's behaviour) rather than refuse calls to a ClusterIP with
    /// internalTrafficPolicy Local and no endpoint on this node (`--reject-no-local-endpoints`).
    pub fn set_drop_no_local_endpoints(&mut self, drop: bool) {
        self.drop_no_local_endpoints = drop;
    }

    /// Masquerade externalTrafficPolicy Cluster traffic even when every backend is on this
    /// node (kube-proxy's behaviour, `--masquerade-local-endpoints`).
    pub fn set_masquerade_local_endpoints(&mut self, on: bool) {
        self.masquerade_local_endpoints = on;
    }

    /// Whether a programmed frontend has its packets checked by the egress program:
    /// loadBalancerSourceRanges, or a drop for want of local endpoints.
    pub fn has_socket_checks(&self) -> bool {
        self.frontends
            .values()
            .any(|f| !f.source_ranges.is_empty() || f.flags & SVC_FLAG_NO_LOCAL_DROP != 0)
    }

    /// Whether a UDP frontend is programmed (only then can a connected UDP socket be stale).
    pub fn has_udp_frontends(&self) -> bool {
        self.frontends
            .keys()
            .any(|k| k.proto == kpr_common::IPPROTO_UDP)
    }

    /// Whether the frontend a socket was translated for (`revnat`, as the socket programs
    /// recorded it) is still the same frontend and still has the backend the socket talks to
    /// (`address_be`, `port_be`, as the maps key them).
    pub fn still_serves(
        &self,
        (frontend_address, frontend_port_be): (MapAddr, u16),
        rev_nat_id: u32,
        proto: u8,
        (address, port_be): (MapAddr, u16),
    ) -> bool {
        let key = FrontendKey {
            address: frontend_address,
            port_be: frontend_port_be,
            proto,
            scope: kpr_common::SCOPE_INTERNAL,
        };
        let Some(frontend) = self.frontends.get(&key) else {
            return false;
        };
        if frontend.rev_nat_id != Some(rev_nat_id) {
            return false;
        }
        let backend = BackendKey {
            address,
            port_be,
            proto,
        };
        let Some(id) = self.backends.get(&backend) else {
            return false;
        };
        frontend
            .slots
            .iter()
            .any(|(slot, b)| *slot <= frontend.count && b == id)
    }

    pub fn refused(&self) -> &BTreeMap<String, String> {
        &self.refused
    }

    /// Removes from `want` the Service ports (all their frontends) that do not fit, admitting
    /// them in name order; returns (name, reason) of those refused. A frontend programmed now
    /// is counted at the larger of its old and new size: removed frontends go first (step 0
    /// below), but a kept one is rewritten in place, so both sizes exist for a moment.
    fn admit(
        &self,
        want: &mut BTreeMap<FrontendKey, WantFrontend>,
        owners: &BTreeMap<String, Vec<FrontendKey>>,
    ) -> BTreeMap<String, String> {
        let mut refused = BTreeMap::new();
        let Some(cap) = self.capacity else {
            return refused;
        };
        let mut entries = 0usize;
        let mut backends: HashSet<BackendKey> = HashSet::new();
        for (name, fks) in owners {
            let need: usize = fks
                .iter()
                .map(|fk| {
                    let old = self.frontends.get(fk).map_or(0, |f| f.slots.len());
                    1 + want[fk].backends.len().max(old)
                })
                .sum();
            let new_backends: HashSet<BackendKey> = fks
                .iter()
                .flat_map(|fk| want[fk].backends.iter().copied())
                .filter(|b| !backends.contains(b))
                .collect();
            let reason = if entries + need > cap.services {
                Some(format!(
                    "{} frontend(s) need {need} services-map entries and {} of {} are left                      (--bpf-services-map-max)",
                    fks.len(),
                    cap.services - entries,
                    cap.services
                ))
            } else if backends.len() + new_backends.len() > cap.backends {
                Some(format!(
                    "{} new backend(s) and {} of {} backends-map entries are left                      (--bpf-backends-map-max)",
                    new_backends.len(),
                    cap.backends - backends.len(),
                    cap.backends
                ))
            } else {
                None
            };
            match reason {
                Some(r) => {
                    for fk in fks {
                        want.remove(fk);
                    }
                    refused.insert(name.clone(), r);
                }
                None => {
                    entries += need;
                    backends.extend(new_backends);
                }
            }
        }
        refused
    }

    fn apply(&mut self, desired: &DesiredState) -> Result<SyncStats, SyncError> {
        let mut stats = SyncStats::default();
        let mut want: BTreeMap<FrontendKey, WantFrontend> = BTreeMap::new();
        // Service port → its frontends (both scopes), for admission by name.
        let mut owners: BTreeMap<String, Vec<FrontendKey>> = BTreeMap::new();
        // kube-proxy's firewall also lets the Service's own LoadBalancer IPs in as sources when
        // the node's IP is inside the ranges (traffic a cloud's LB hairpins back, or from a
        // host process bound to an LB IP assigned on the node).
        let lb_ips_allowed: BTreeMap<&ServicePortName, Vec<IpNet>> = desired
            .service_ports
            .iter()
            .filter(|p| {
                desired.node_ip.is_some_and(|node| {
                    p.load_balancer_source_ranges
                        .iter()
                        .any(|net| net.contains(&node))
                })
            })
            .map(|p| {
                let ips = p.load_balancer_ips.iter().map(|ip| IpNet::from(*ip));
                (&p.name, ips.collect())
            })
            .collect();
        for (frontend, state) in &desired.services {
            // SCTP frontends are served by netfilter rules (see `ebpf::sctp`), never by the
            // programs, which would pass them untranslated.
            if frontend.protocol == crate::model::Protocol::Sctp {
                continue;
            }
            let fk = frontend_key(frontend, SCOPE_INTERNAL);
            // Traffic from outside the node meets the tc path's external scope. A loopback
            // NodePort address (localhost NodePorts) has none, so only the node's own
            // sockets reach it: never a packet that arrives addressed to 127.0.0.1 from
            // another host (CVE-2020-8558); the stack drops that as a martian.
            let external = state.kind.is_external() && !frontend.ip.is_loopback();
            let owned = owners.entry(state.name.to_string()).or_default();
            owned.push(fk);
            if external {
                owned.push(FrontendKey {
                    scope: SCOPE_EXTERNAL,
                    ..fk
                });
            }
            let (flags, affinity_timeout_s) = match state.session_affinity {
                // The model bounds the timeout to 1..=86400 s, so it fits.
                Some(t) => (
                    SVC_FLAG_AFFINITY,
                    u32::try_from(t.as_secs()).unwrap_or(u32::MAX),
                ),
                None => (SVC_FLAG_NONE, 0),
            };
            // The model keeps only this frontend's family's ranges.
            let mut source_ranges: Vec<IpNet> = state
                .load_balancer_source_ranges
                .iter()
                .map(IpNet::trunc)
                .collect();
            if !source_ranges.is_empty() {
                source_ranges.extend(
                    lb_ips_allowed
                        .get(&state.name)
                        .into_iter()
                        .flatten()
                        .filter(|net| net.addr().is_ipv4() == frontend.ip.is_ipv4()),
                );
            }
            source_ranges.sort();
            source_ranges.dedup();
            // (The socket path checks IPv6 frontends' ranges for no client on the node yet: it
            // refuses them all, never lets one through unchecked.)
            let range_flag = if source_ranges.is_empty() {
                SVC_FLAG_NONE
            } else {
                SVC_FLAG_SOURCE_RANGES
            };
            let drop_flag = if self.drop_no_local_endpoints && state.internal_local_elsewhere {
                SVC_FLAG_NO_LOCAL_DROP
            } else {
                SVC_FLAG_NONE
            };
            // The socket programs check the ranges too (for clients on the node: pods, host
            // processes), through the internal frontend's own rev-NAT id.
            want.insert(
                fk,
                WantFrontend {
                    backends: backend_keys(&state.backends, fk.proto),
                    flags: flags | range_flag | drop_flag,
                    affinity_timeout_s,
                    source_ranges: source_ranges.clone(),
                },
            );
            if external {
                // What only the tc path reads: eTP=Local and the source ranges.
                let mut ext_flags = flags;
                // eTP=Local drops outside traffic on a node without a local endpoint, but only
                // while the Service has endpoints somewhere: with none at all it is refused,
                // as any Service without endpoints (kube-proxy's "has no endpoints" REJECT
                // comes before its "has no local endpoints" DROP).
                if state.external_policy_local && !state.backends.is_empty() {
                    ext_flags |= SVC_FLAG_EXT_LOCAL;
                } else if state.external_policy_local {
                    // No endpoint anywhere: nothing to masquerade either.
                    ext_flags |= SVC_FLAG_NO_SNAT;
                } else if !state.external_snat && !self.masquerade_local_endpoints {
                    ext_flags |= SVC_FLAG_NO_SNAT;
                }
                ext_flags |= range_flag;
                let ext = FrontendKey {
                    scope: SCOPE_EXTERNAL,
                    ..fk
                };
                want.insert(
                    ext,
                    WantFrontend {
                        backends: backend_keys(&state.external_backends, fk.proto),
                        flags: ext_flags,
                        affinity_timeout_s,
                        source_ranges,
                    },
                );
            }
        }

        let refused = self.admit(&mut want, &owners);
        for (name, reason) in &refused {
            if !self.refused.contains_key(name) {
                tracing::warn!("refused Service {name}: the maps are full: {reason}");
            }
        }
        stats.refused = refused.len();
        self.refused = refused;

        // 0. Frontends that are gone: slot 0 first. Before the new ones are written, so that
        // full maps have room; nobody is served by them any more.
        let gone: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|fk| !want.contains_key(fk))
            .copied()
            .collect();
        for fk in gone {
            let old = &self.frontends[&fk];
            if let Some(rev) = old.rev_nat_id {
                self.maps.delete_service(&fk.slot(0))?;
                stats.deletes += 1;
                self.rev_nat_ids.remove(&rev);
                if !old.source_ranges.is_empty() {
                    self.maps.put_source_ranges(rev, &[])?;
                }
            }
            let slots: Vec<u16> = old.slots.keys().copied().collect();
            for slot in slots {
                self.maps.delete_service(&fk.slot(slot))?;
                stats.deletes += 1;
            }
            self.frontends.remove(&fk);
        }

        // 1. Backends first.
        for bk in want.values().flat_map(|w| &w.backends) {
            if self.backends.contains_key(bk) {
                continue;
            }
            let id = self.alloc_backend_id()?;
            self.maps.put_backend(id, &bk.value())?;
            stats.writes += 1;
            self.backends.insert(*bk, id);
        }

        // 2. Frontends: slots, then slot 0, then slots beyond the new count.
        for (fk, w) in &want {
            let ids: Vec<u32> = w.backends.iter().map(|bk| self.backends[bk]).collect();
            let count = ids.len() as u16;
            let old = self.frontends.get(fk).cloned().unwrap_or_default();
            let rev_nat_id = match old.rev_nat_id {
                Some(id) => id,
                None => self.alloc_rev_nat_id()?,
            };
            for (i, id) in ids.iter().enumerate() {
                let slot = i as u16 + 1;
                if old.slots.get(&slot) == Some(id) {
                    continue;
                }
                let value = Service4Value {
                    backend_id: *id,
                    rev_nat_id,
                    ..Default::default()
                };
                self.maps.put_service(&fk.slot(slot), &value)?;
                stats.writes += 1;
            }
            // Allowed sources go in before the flag that makes tc check them, and out after it
            // is cleared: an allowed client is never dropped in between.
            let ranges_changed = old.source_ranges != w.source_ranges;
            if ranges_changed && !w.source_ranges.is_empty() {
                self.maps.put_source_ranges(rev_nat_id, &w.source_ranges)?;
                stats.writes += 1;
            }
            if old.rev_nat_id != Some(rev_nat_id)
                || old.count != count
                || old.flags != w.flags
                || old.affinity_timeout_s != w.affinity_timeout_s
            {
                let value = Service4Value {
                    // Slot 0's backend_id is the affinity timeout (Cilium's union).
                    backend_id: w.affinity_timeout_s,
                    rev_nat_id,
                    count,
                    flags: w.flags,
                    pad: 0,
                };
                self.maps.put_service(&fk.slot(0), &value)?;
                stats.writes += 1;
            }
            if ranges_changed && w.source_ranges.is_empty() {
                self.maps.put_source_ranges(rev_nat_id, &[])?;
                stats.deletes += 1;
            }
            for slot in old.slots.keys().filter(|s| **s > count) {
                self.maps.delete_service(&fk.slot(*slot))?;
                stats.deletes += 1;
            }
            let slots = ids
                .iter()
                .enumerate()
                .map(|(i, id)| (i as u16 + 1, *id))
                .collect();
            self.frontends.insert(
                *fk,
                ProgrammedFrontend {
                    rev_nat_id: Some(rev_nat_id),
                    count,
                    flags: w.flags,
                    affinity_timeout_s: w.affinity_timeout_s,
                    source_ranges: w.source_ranges.clone(),
                    slots,
                },
            );
        }

        // 3. Session-affinity groups: every frontend of a Service port shares its clients'
        // affinity (kube-proxy's `recent` lists are per Service port, so a client reaching the
        // ClusterIP and then the NodePort keeps one backend). The group is the port's smallest
        // rev-NAT id, so it follows from the maps alone after a restart. A frontend that is
        // its own group needs no entry.
        let mut groups: BTreeMap<u32, u32> = BTreeMap::new();
        for fks in owners.values() {
            let programmed: Vec<&ProgrammedFrontend> =
                fks.iter().filter_map(|fk| self.frontends.get(fk)).collect();
            let Some(group) = programmed.iter().filter_map(|f| f.rev_nat_id).min() else {
                continue;
            };
            for f in programmed {
                match f.rev_nat_id {
                    Some(id) if id != group && f.flags & SVC_FLAG_AFFINITY != 0 => {
                        groups.insert(id, group);
                    }
                    _ => {}
                }
            }
        }
        for (id, group) in &groups {
            if self.affinity_groups.get(id) != Some(group) {
                self.maps.put_affinity_group(*id, *group)?;
                stats.writes += 1;
            }
        }
        for id in self.affinity_groups.keys() {
            if !groups.contains_key(id) {
                self.maps.delete_affinity_group(*id)?;
                stats.deletes += 1;
            }
        }
        self.affinity_groups = groups;

        // 4. Backends nothing refers to any more.
        let used: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|f| f.slots.values().copied())
            .collect();
        let unused: Vec<(BackendKey, u32)> = self
            .backends
            .iter()
            .filter(|(_, id)| !used.contains(id))
            .map(|(k, id)| (*k, *id))
            .collect();
        for (bk, id) in unused {
            self.maps.delete_backend(id)?;
            stats.deletes += 1;
            self.backends.remove(&bk);
            self.backend_ids.remove(&id);
        }
        for id in std::mem::take(&mut self.stray_backends) {
            if !used.contains(&id) {
                self.maps.delete_backend(id)?;
                stats.deletes += 1;
                self.backend_ids.remove(&id);
            }
        }

        stats.frontends = self.frontends.len();
        stats.backends = self.backends.len();
        Ok(stats)
    }

    fn alloc_backend_id(&mut self) -> Result<u32, SyncError> {
        let used = &self.backend_ids;
        let id = next_free(&mut self.next_backend_id, |id| used.contains(&id))
            .ok_or(SyncError::IdsExhausted("backend"))?;
        self.backend_ids.insert(id);
        Ok(id)
    }

    fn alloc_rev_nat_id(&mut self) -> Result<u32, SyncError> {
        let used = &self.rev_nat_ids;
        let id = next_free(&mut self.next_rev_nat_id, |id| used.contains(&id))
            .ok_or(SyncError::IdsExhausted("reverse-NAT"))?;
        self.rev_nat_ids.insert(id);
        Ok(id)
    }
}

/// Ids grow monotonically (wrapping, skipping 0 and ids in use) rather than reusing the lowest
/// free one: a just-freed id may still be recorded by live sockets or conntrack entries.
fn next_free(next: &mut u32, in_use: impl Fn(u32) -> bool) -> Option<u32> {
    // In practice the first candidate is free; the bound only guards against a full id space.
    for _ in 0..1_000_000 {
        let id = *next;
        *next = next.wrapping_add(1).max(1);
        if id != 0 && !in_use(id) {
            return Some(id);
        }
    }
    None
}

fn frontend_key(f: &Frontend, scope: u8) -> FrontendKey {
    FrontendKey {
        address: MapAddr::of(f.ip),
        port_be: f.port.to_be(),
        proto: f.protocol.number(),
        scope,
    }
}

/// Backends as the maps key them, sorted and de-duplicated. The slot count is 16 bits;
/// more backends than that per service port is far beyond any real EndpointSlice set, so they
/// are capped rather than failing the whole sync.
fn backend_keys(backends: &[crate::model::Backend], proto: u8) -> Vec<BackendKey> {
    let mut keys: Vec<BackendKey> = backends
        .iter()
        .map(|b| BackendKey {
            address: MapAddr::of(b.ip),
            port_be: b.port.to_be(),
            proto,
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys.truncate(usize::from(u16::MAX));
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Protocol, ServicePortName, ServicePortState};
    use std::net::Ipv4Addr;

    /// An in-memory LbMaps that checks, after every single write, what the kernel program
    /// relies on: every slot 1..=count of every frontend names a backend that exists. It can
    /// fail the n-th operation to exercise recovery.
    #[derive(Default)]
    struct FakeMaps {
        services: BTreeMap<ServiceKey, Service4Value>,
        backends: BTreeMap<u32, BackendValue>,
        ops: usize,
        fail_at: Option<usize>,
        /// A full map refuses new keys, as the kernel's does (E2BIG).
        max: Option<Capacity>,
        src_ranges: BTreeMap<u32, Vec<IpNet>>,
        affinity_groups: BTreeMap<u32, u32>,
    }

    fn full(map: &'static str) -> MapOpError {
        MapOpError {
            op: "update",
            map,
            detail: "map full (E2BIG)".into(),
        }
    }

    impl FakeMaps {
        fn op(&mut self) -> Result<(), MapOpError> {
            self.ops += 1;
            if self.fail_at == Some(self.ops) {
                return Err(MapOpError {
                    op: "update",
                    map: "fake",
                    detail: "injected failure".into(),
                });
            }
            Ok(())
        }

        fn check_invariant(&self) {
            for (k, v) in &self.services {
                if k.backend_slot() != 0 {
                    continue;
                }
                for slot in 1..=v.count {
                    let sk = FrontendKey::of(k).slot(slot);
                    let sv = self
                        .services
                        .get(&sk)
                        .unwrap_or_else(|| panic!("slot {slot} of {k:?} missing"));
                    assert!(
                        self.backends.contains_key(&sv.backend_id),
                        "slot {slot} of {k:?} names missing backend {}",
                        sv.backend_id
                    );
                }
            }
        }

        /// What a lookup from the kernel program would resolve: frontend → backends.
        fn resolve(&self) -> Resolution {
            let mut out = BTreeMap::new();
            for (k, v) in &self.services {
                if k.backend_slot() != 0 {
                    continue;
                }
                let fk = FrontendKey::of(k);
                let mut bs: Vec<(MapAddr, u16)> = (1..=v.count)
                    .map(|s| {
                        let key = fk.slot(s);
                        let b = BackendKey::of(&self.backends[&self.services[&key].backend_id]);
                        (b.address, b.port_be)
                    })
                    .collect();
                bs.sort();
                let affinity = (v.flags & SVC_FLAG_AFFINITY != 0).then_some(v.backend_id);
                out.insert(fk.tuple(fk.scope), (bs, affinity));
            }
            out
        }
    }

    impl LbMaps for FakeMaps {
        fn put_source_ranges(
            &mut self,
            rev_nat_id: u32,
            ranges: &[IpNet],
        ) -> Result<(), MapOpError> {
            self.op()?;
            if ranges.is_empty() {
                self.src_ranges.remove(&rev_nat_id);
            } else {
                self.src_ranges.insert(rev_nat_id, ranges.to_vec());
            }
            Ok(())
        }
        fn put_affinity_group(&mut self, rev_nat_id: u32, group: u32) -> Result<(), MapOpError> {
            self.op()?;
            self.affinity_groups.insert(rev_nat_id, group);
            Ok(())
        }
        fn delete_affinity_group(&mut self, rev_nat_id: u32) -> Result<(), MapOpError> {
            self.op()?;
            self.affinity_groups.remove(&rev_nat_id);
            Ok(())
        }
        fn dump_affinity_groups(&self) -> Result<Vec<(u32, u32)>, MapOpError> {
            Ok(self.affinity_groups.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn dump_source_ranges(&self) -> Result<Vec<(u32, IpNet)>, MapOpError> {
            Ok(self
                .src_ranges
                .iter()
                .flat_map(|(id, nets)| nets.iter().map(move |n| (*id, *n)))
                .collect())
        }
        fn dump_backends(&self) -> Result<Vec<(u32, BackendValue)>, MapOpError> {
            Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn dump_services(&self) -> Result<Vec<(ServiceKey, Service4Value)>, MapOpError> {
            Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapOpError> {
            self.op()?;
            if self.max.is_some_and(|m| {
                !self.backends.contains_key(&id) && self.backends.len() >= m.backends
            }) {
                return Err(full("backends"));
            }
            self.backends.insert(id, *value);
            self.check_invariant();
            Ok(())
        }
        fn delete_backend(&mut self, id: u32) -> Result<(), MapOpError> {
            self.op()?;
            self.backends.remove(&id);
            self.check_invariant();
            Ok(())
        }
        fn put_service(
            &mut self,
            key: &ServiceKey,
            value: &Service4Value,
        ) -> Result<(), MapOpError> {
            self.op()?;
            if self.max.is_some_and(|m| {
                !self.services.contains_key(key) && self.services.len() >= m.services
            }) {
                return Err(full("services"));
            }
            self.services.insert(*key, *value);
            self.check_invariant();
            Ok(())
        }
        fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapOpError> {
            self.op()?;
            self.services.remove(key);
            self.check_invariant();
            Ok(())
        }
    }

    fn frontend_key_int(f: &Frontend) -> FrontendKey {
        frontend_key(f, SCOPE_INTERNAL)
    }

    impl FrontendKey {
        fn tuple(self, scope: u8) -> (MapAddr, u16, u8, u8) {
            (self.address, self.port_be, self.proto, scope)
        }

        fn v4(self) -> u32 {
            match self.address {
                MapAddr::V4(a) => a,
                MapAddr::V6(_) => panic!("not IPv4: {self:?}"),
            }
        }
    }

    fn fe(last: u8, port: u16) -> Frontend {
        Frontend {
            ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, last)),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn state(entries: &[(Frontend, &[u8])]) -> DesiredState {
        let mut s = DesiredState::default();
        for (f, bes) in entries {
            s.services.insert(
                *f,
                ServicePortState {
                    name: ServicePortName {
                        namespace: "default".into(),
                        name: format!("svc{}", f.port),
                        port: String::new(),
                    },
                    backends: bes
                        .iter()
                        .map(|b| Backend {
                            ip: IpAddr::V4(Ipv4Addr::new(10, 244, 1, *b)),
                            port: 8080,
                        })
                        .collect(),
                    ..Default::default()
                },
            );
        }
        s
    }

    /// (address, port, proto, scope) → (backends, affinity timeout).
    type Resolution = BTreeMap<(MapAddr, u16, u8, u8), (Vec<(MapAddr, u16)>, Option<u32>)>;

    /// The resolution the kernel would see for `desired`, computed independently of the syncer.
    fn expected(desired: &DesiredState) -> Resolution {
        let pairs = |bs: &[Backend]| {
            let mut v: Vec<(MapAddr, u16)> = bs
                .iter()
                .map(|b| (MapAddr::of(b.ip), b.port.to_be()))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let mut out = BTreeMap::new();
        for (f, st) in &desired.services {
            let fk = frontend_key(f, SCOPE_INTERNAL);
            let affinity = st.session_affinity.map(|t| t.as_secs() as u32);
            out.insert(fk.tuple(SCOPE_INTERNAL), (pairs(&st.backends), affinity));
            // Loopback NodePorts serve only the node's sockets (CVE-2020-8558).
            if st.kind.is_external() && !f.ip.is_loopback() {
                out.insert(
                    fk.tuple(SCOPE_EXTERNAL),
                    (pairs(&st.external_backends), affinity),
                );
            }
        }
        out
    }

    #[test]
    fn programs_adds_changes_and_removals_in_a_safe_order() {
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        let steps = [
            state(&[(fe(1, 80), &[11, 12, 13]), (fe(2, 53), &[12])]),
            state(&[(fe(1, 80), &[11, 13]), (fe(2, 53), &[12, 14])]),
            state(&[(fe(1, 80), &[11, 12, 13, 14, 15]), (fe(3, 443), &[])]),
            state(&[(fe(3, 443), &[15])]),
            state(&[]),
        ];
        for desired in &steps {
            s.sync(desired).unwrap();
            assert_eq!(s.maps().resolve(), expected(desired));
        }
        assert!(s.maps().services.is_empty());
        assert!(
            s.maps().backends.is_empty(),
            "unused backends must be deleted"
        );
    }

    #[test]
    fn what_does_not_fit_is_refused_by_name_and_the_rest_is_served() {
        let cap = Capacity {
            services: 10,
            backends: 5,
        };
        let maps = FakeMaps {
            max: Some(cap),
            ..Default::default()
        };
        let mut s = LbSyncer::restore(maps).unwrap();
        s.set_capacity(cap);
        // svc80 and svc81 need 4 entries each, svc82 4 more: only two fit in 10.
        let d = state(&[
            (fe(1, 80), &[11, 12, 13]),
            (fe(2, 81), &[11, 12, 13]),
            (fe(3, 82), &[14, 15, 16]),
        ]);
        let stats = s.sync(&d).unwrap();
        assert_eq!(stats.refused, 1);
        assert_eq!(
            s.refused().keys().collect::<Vec<_>>(),
            vec!["default/svc82"]
        );
        let mut served = d.clone();
        served.services.remove(&fe(3, 82));
        assert_eq!(s.maps().resolve(), expected(&served));

        // Replacing every Service at full maps works: the old ones leave first.
        let d2 = state(&[(fe(4, 90), &[11, 12, 13]), (fe(5, 91), &[11, 12])]);
        let stats = s.sync(&d2).unwrap();
        assert_eq!(stats.refused, 0);
        assert_eq!(s.maps().resolve(), expected(&d2));

        // Too many backends: refused for that reason, named in it.
        let d3 = state(&[(fe(4, 90), &[11, 12, 13]), (fe(6, 92), &[21, 22, 23])]);
        s.sync(&d3).unwrap();
        let why = &s.refused()["default/svc92"];
        assert!(why.contains("--bpf-backends-map-max"), "{why}");
    }

    #[test]
    fn a_frontend_without_backends_is_programmed_with_count_zero() {
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        s.sync(&state(&[(fe(3, 443), &[])])).unwrap();
        let slot0 = s.maps().services[&frontend_key_int(&fe(3, 443)).slot(0)];
        assert_eq!(slot0.count, 0);
        assert_ne!(slot0.rev_nat_id, 0);
    }

    #[test]
    fn an_unchanged_state_writes_nothing() {
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        let d = state(&[(fe(1, 80), &[11, 12, 13])]);
        let first = s.sync(&d).unwrap();
        assert_eq!(first.writes, 3 + 3 + 1);
        let second = s.sync(&d).unwrap();
        assert_eq!((second.writes, second.deletes), (0, 0));
    }

    #[test]
    fn restart_keeps_ids_and_writes_nothing() {
        let d = state(&[(fe(1, 80), &[11, 12, 13]), (fe(2, 53), &[12])]);
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        s.sync(&d).unwrap();
        let before_services = s.maps().services.clone();
        let before_backends = s.maps().backends.clone();
        let maps = s.maps;

        let mut restarted = LbSyncer::restore(maps).unwrap();
        let stats = restarted.sync(&d).unwrap();
        assert_eq!((stats.writes, stats.deletes), (0, 0));
        assert_eq!(restarted.maps().services, before_services);
        assert_eq!(restarted.maps().backends, before_backends);
        // New ids do not collide with restored ones.
        restarted
            .sync(&state(&[
                (fe(1, 80), &[11, 12, 13]),
                (fe(2, 53), &[12]),
                (fe(4, 8080), &[20]),
            ]))
            .unwrap();
        let revs: BTreeSet<u32> = restarted
            .maps()
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot() == 0)
            .map(|(_, v)| v.rev_nat_id)
            .collect();
        assert_eq!(revs.len(), 3);
    }

    #[test]
    fn every_injected_failure_is_recovered_by_the_next_sync() {
        let from = state(&[
            (fe(1, 80), &[11, 12, 13]),
            (fe(2, 53), &[12]),
            (fe(5, 81), &[16]),
        ]);
        let to = state(&[
            (fe(1, 80), &[12, 14]),
            (fe(3, 443), &[15, 11]),
            (fe(5, 81), &[]),
        ]);
        // Count the operations a clean transition takes, then fail each one in turn.
        let mut probe = LbSyncer::restore(FakeMaps::default()).unwrap();
        probe.sync(&from).unwrap();
        let before = probe.maps().ops;
        probe.sync(&to).unwrap();
        let total = probe.maps().ops - before;
        assert!(total > 5);
        for n in 1..=total {
            let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
            s.sync(&from).unwrap();
            let base = s.maps().ops;
            s.maps.fail_at = Some(base + n);
            assert!(s.sync(&to).is_err(), "operation {n} should have failed");
            // The invariant held at every step (checked by the fake); now recover.
            s.sync(&to).unwrap();
            assert_eq!(s.maps().resolve(), expected(&to), "after failing op {n}");
            assert_eq!(
                s.maps().backends.len(),
                4,
                "no leaked backends after failing op {n}"
            );
        }
    }

    #[test]
    fn restore_cleans_junk_left_in_the_maps() {
        let mut maps = FakeMaps::default();
        // A stray slot beyond count, a frontend without slot 0, and a duplicate backend.
        let fk = frontend_key_int(&fe(1, 80));
        let b = BackendKey {
            address: MapAddr::V4(u32::from_ne_bytes([10, 244, 1, 11])),
            port_be: 8080u16.to_be(),
            proto: 6,
        };
        maps.backends.insert(7, b.value());
        maps.backends.insert(9, b.value());
        maps.services.insert(
            fk.slot(0),
            Service4Value {
                rev_nat_id: 3,
                count: 1,
                ..Default::default()
            },
        );
        maps.services.insert(
            fk.slot(1),
            Service4Value {
                backend_id: 7,
                rev_nat_id: 3,
                ..Default::default()
            },
        );
        maps.services.insert(
            fk.slot(2),
            Service4Value {
                backend_id: 9,
                rev_nat_id: 3,
                ..Default::default()
            },
        );
        let orphan = frontend_key_int(&fe(9, 99));
        maps.services.insert(
            orphan.slot(1),
            Service4Value {
                backend_id: 7,
                ..Default::default()
            },
        );

        let mut s = LbSyncer::restore(maps).unwrap();
        let d = state(&[(fe(1, 80), &[11])]);
        s.sync(&d).unwrap();
        assert_eq!(s.maps().resolve(), expected(&d));
        assert_eq!(s.maps().services.len(), 2, "{:?}", s.maps().services);
        assert_eq!(
            s.maps().backends.keys().copied().collect::<Vec<_>>(),
            vec![7]
        );
        // The restored frontend kept its reverse-NAT id.
        assert_eq!(s.maps().services[&fk.slot(0)].rev_nat_id, 3);
    }

    #[test]
    fn ipv6_frontends_go_to_the_ipv6_maps_with_ids_shared_with_ipv4() {
        let mut d = state(&[(fe(1, 80), &[11])]);
        let v6 = Frontend {
            ip: "fd00:10:96::1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let mut st = d.services.values().next().unwrap().clone();
        st.backends = vec![Backend {
            ip: "fd00:10:244:1::b".parse().unwrap(),
            port: 8080,
        }];
        d.services.insert(v6, st);
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        let stats = s.sync(&d).unwrap();
        assert_eq!((stats.frontends, stats.backends), (2, 2));
        assert_eq!(s.maps().resolve(), expected(&d));
        let key = frontend_key_int(&v6).slot(0);
        assert!(matches!(key, ServiceKey::V6(_)), "{key:?}");
        // One id space: the two backends and the two frontends have distinct ids.
        let ids: BTreeSet<u32> = s.maps().backends.keys().copied().collect();
        assert_eq!(ids.len(), 2);
        assert!(s
            .maps()
            .backends
            .values()
            .any(|b| matches!(b, BackendValue::V6(v) if v.port_be == 8080u16.to_be())));
        let revs: BTreeSet<u32> = s
            .maps()
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot() == 0)
            .map(|(_, v)| v.rev_nat_id)
            .collect();
        assert_eq!(revs.len(), 2);
        // A restart restores both families: nothing to write.
        let maps = s.maps;
        let mut s = LbSyncer::restore(maps).unwrap();
        assert_eq!(s.sync(&d).unwrap().writes, 0);
        // Removing the IPv6 Service removes its frontend and its backend.
        d.services.remove(&v6);
        s.sync(&d).unwrap();
        assert_eq!(s.maps().resolve(), expected(&d));
        assert_eq!(s.maps().backends.len(), 1);
    }

    #[test]
    fn map_addresses_are_in_network_byte_order() {
        let a = MapAddr::of("fd00:10:96::1".parse().unwrap());
        let MapAddr::V6(words) = a else {
            panic!("{a:?}")
        };
        assert_eq!(words[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x10]);
        assert_eq!(words[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(
            MapAddr::of("10.96.0.1".parse().unwrap()),
            MapAddr::V4(u32::from_ne_bytes([10, 96, 0, 1]))
        );
    }

    #[test]
    fn external_frontends_get_an_external_scope_with_their_own_backends() {
        use crate::model::FrontendKind;
        let mut d = state(&[(fe(1, 80), &[11, 12, 13])]);
        let nodeport = Frontend {
            ip: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
            port: 30080,
            protocol: Protocol::Tcp,
        };
        let mut st = d.services[&fe(1, 80)].clone();
        st.kind = FrontendKind::NodePort;
        // externalTrafficPolicy: Local: outside traffic only to the local endpoint.
        st.external_backends = vec![st.backends[0]];
        d.services.insert(nodeport, st);
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        s.sync(&d).unwrap();
        let r = s.maps().resolve();
        assert_eq!(r, expected(&d));
        let np = frontend_key(&nodeport, SCOPE_INTERNAL);
        assert_eq!(r[&np.tuple(SCOPE_INTERNAL)].0.len(), 3);
        assert_eq!(r[&np.tuple(SCOPE_EXTERNAL)].0.len(), 1);
        // The ClusterIP has no external entry.
        let c = frontend_key(&fe(1, 80), SCOPE_INTERNAL);
        assert!(!r.contains_key(&c.tuple(SCOPE_EXTERNAL)));
        // Back to ClusterIP only: the NodePort's entries in both scopes go.
        let only = state(&[(fe(1, 80), &[11, 12, 13])]);
        s.sync(&only).unwrap();
        assert_eq!(s.maps().resolve(), expected(&only));
    }

    #[test]
    fn a_localhost_nodeport_is_never_served_to_traffic_from_outside() {
        use crate::model::FrontendKind;
        let mut d = state(&[(fe(1, 80), &[11, 12])]);
        let localhost = Frontend {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 30080,
            protocol: Protocol::Tcp,
        };
        let mut st = d.services[&fe(1, 80)].clone();
        st.kind = FrontendKind::NodePort;
        st.external_backends = st.backends.clone();
        d.services.insert(localhost, st);
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        s.sync(&d).unwrap();
        let r = s.maps().resolve();
        let k = frontend_key(&localhost, SCOPE_INTERNAL);
        let key = |scope| k.tuple(scope);
        assert_eq!(
            r[&key(SCOPE_INTERNAL)].0.len(),
            2,
            "the node's sockets reach it"
        );
        assert!(
            !r.contains_key(&key(SCOPE_EXTERNAL)),
            "no tc entry for 127.0.0.1: {r:?}"
        );
    }

    #[test]
    fn local_traffic_policy_drops_only_while_the_service_has_endpoints_elsewhere() {
        use crate::model::FrontendKind;
        let nodeport = Frontend {
            ip: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
            port: 30080,
            protocol: Protocol::Tcp,
        };
        let ext_flags = |backends: &[u8]| {
            let mut d = state(&[(nodeport, backends)]);
            let st = d.services.get_mut(&nodeport).unwrap();
            st.kind = FrontendKind::NodePort;
            st.external_policy_local = true;
            // None of them on this node.
            st.external_backends.clear();
            let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
            s.sync(&d).unwrap();
            let k = frontend_key(&nodeport, SCOPE_EXTERNAL);
            s.maps().services[&k.slot(0)].flags
        };
        // Endpoints on other nodes: dropped here (SVC_FLAG_EXT_LOCAL).
        assert_ne!(ext_flags(&[11, 12]) & SVC_FLAG_EXT_LOCAL, 0);
        // No endpoint anywhere: refused like any Service without endpoints.
        assert_eq!(ext_flags(&[]) & SVC_FLAG_EXT_LOCAL, 0);
    }

    #[test]
    fn switching_session_affinity_on_and_off_rewrites_slot_zero_only() {
        let plain = state(&[(fe(1, 80), &[11, 12])]);
        let mut sticky = plain.clone();
        sticky
            .services
            .get_mut(&fe(1, 80))
            .unwrap()
            .session_affinity = Some(std::time::Duration::from_secs(2));
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        s.sync(&plain).unwrap();
        let on = s.sync(&sticky).unwrap();
        assert_eq!((on.writes, on.deletes), (1, 0));
        assert_eq!(s.maps().resolve(), expected(&sticky));
        let key = frontend_key(&fe(1, 80), SCOPE_INTERNAL).slot(0);
        assert_eq!(s.maps().services[&key].flags, SVC_FLAG_AFFINITY);
        assert_eq!(s.maps().services[&key].backend_id, 2);
        // A restart restores the affinity setting: nothing to write.
        let maps = s.maps;
        let mut s = LbSyncer::restore(maps).unwrap();
        assert_eq!(s.sync(&sticky).unwrap().writes, 0);
        let off = s.sync(&plain).unwrap();
        assert_eq!((off.writes, off.deletes), (1, 0));
        assert_eq!(s.maps().services[&key].flags, SVC_FLAG_NONE);
    }
    #[test]
    fn a_socket_is_still_served_only_while_its_frontend_keeps_its_backend() {
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        s.sync(&state(&[(fe(1, 80), &[11, 12]), (fe(2, 81), &[13])]))
            .unwrap();
        let fk = frontend_key_int(&fe(1, 80));
        let rev_nat_id = s.maps().services[&fk.slot(0)].rev_nat_id;
        let socket = |last: u8, rev_nat_id| {
            let revnat = kpr_common::SockRevNat4Value {
                address_be: fk.v4(),
                port_be: fk.port_be,
                pad: 0,
                rev_nat_id,
            };
            let backend = (u32::from_ne_bytes([10, 244, 1, last]), 8080u16.to_be());
            (revnat, backend)
        };
        let serves = |s: &LbSyncer<FakeMaps>,
                      (r, b): (kpr_common::SockRevNat4Value, (u32, u16))| {
            s.still_serves(
                (MapAddr::V4(r.address_be), r.port_be),
                r.rev_nat_id,
                fk.proto,
                (MapAddr::V4(b.0), b.1),
            )
        };
        assert!(serves(&s, socket(11, rev_nat_id)));
        // Another frontend's backend, or the same frontend re-created under another id.
        assert!(!serves(&s, socket(13, rev_nat_id)));
        assert!(!serves(&s, socket(11, rev_nat_id + 1)));
        // The backend leaves the frontend (it stays in another frontend's backends: no matter).
        s.sync(&state(&[(fe(1, 80), &[12]), (fe(2, 81), &[11])]))
            .unwrap();
        assert!(!serves(&s, socket(11, rev_nat_id)));
        assert!(serves(&s, socket(12, rev_nat_id)));
        // The frontend goes.
        s.sync(&state(&[(fe(2, 81), &[11])])).unwrap();
        assert!(!serves(&s, socket(12, rev_nat_id)));
    }
    #[test]
    fn source_ranges_are_checked_on_both_paths_and_let_the_lb_ips_in_with_the_node() {
        let lb = Frontend {
            ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 60)),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let mut d = state(&[(lb, &[11])]);
        let st = d.services.get_mut(&lb).unwrap();
        st.kind = crate::model::FrontendKind::LoadBalancer;
        st.external_backends = st.backends.clone();
        st.load_balancer_source_ranges = vec!["192.168.0.0/24".parse().unwrap()];
        d.service_ports = vec![crate::model::ServicePortInfo {
            name: st.name.clone(),
            load_balancer_ips: vec![lb.ip],
            load_balancer_source_ranges: st.load_balancer_source_ranges.clone(),
            ..Default::default()
        }];
        let ranges = |s: &LbSyncer<FakeMaps>, scope| {
            let key = frontend_key(&lb, scope).slot(0);
            let v = s.maps().services[&key];
            assert_ne!(v.flags & SVC_FLAG_SOURCE_RANGES, 0, "scope {scope}");
            s.maps().src_ranges[&v.rev_nat_id].clone()
        };
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        s.sync(&d).unwrap();
        let only: Vec<IpNet> = vec!["192.168.0.0/24".parse().unwrap()];
        assert_eq!(ranges(&s, SCOPE_INTERNAL), only);
        assert_eq!(ranges(&s, SCOPE_EXTERNAL), only);
        assert!(s.has_socket_checks());
        // The node's IP inside the ranges: the LB IP is an allowed source too (allowFromNode).
        d.node_ip = Some("192.168.0.7".parse().unwrap());
        s.sync(&d).unwrap();
        let with_lb: Vec<IpNet> = vec![
            "192.168.0.0/24".parse().unwrap(),
            "203.0.113.60/32".parse().unwrap(),
        ];
        assert_eq!(ranges(&s, SCOPE_INTERNAL), with_lb);
        assert_eq!(ranges(&s, SCOPE_EXTERNAL), with_lb);
        // A restart restores them: nothing to write.
        let maps = s.maps;
        let mut s = LbSyncer::restore(maps).unwrap();
        assert_eq!(s.sync(&d).unwrap().writes, 0);
        // Gone with the ranges.
        d.services
            .get_mut(&lb)
            .unwrap()
            .load_balancer_source_ranges
            .clear();
        s.sync(&d).unwrap();
        assert!(!s.has_socket_checks());
        assert!(s.maps().src_ranges.is_empty());
    }
    #[test]
    fn every_frontend_of_a_service_port_shares_one_affinity_group() {
        let cluster_ip = fe(1, 80);
        let node_port = Frontend {
            ip: IpAddr::V4(Ipv4Addr::new(192, 168, 0, 7)),
            port: 30080,
            protocol: Protocol::Tcp,
        };
        let other = fe(2, 81);
        let mut d = state(&[
            (cluster_ip, &[11, 12]),
            (node_port, &[11, 12]),
            (other, &[13]),
        ]);
        for f in [cluster_ip, node_port, other] {
            let st = d.services.get_mut(&f).unwrap();
            st.session_affinity = Some(std::time::Duration::from_secs(60));
            if f == node_port {
                st.kind = crate::model::FrontendKind::NodePort;
                st.external_backends = st.backends.clone();
            }
        }
        // One Service port, two frontends (the NodePort in both scopes).
        let name = d.services[&cluster_ip].name.clone();
        d.services.get_mut(&node_port).unwrap().name = name;
        let mut s = LbSyncer::restore(FakeMaps::default()).unwrap();
        s.sync(&d).unwrap();
        let rev = |s: &LbSyncer<FakeMaps>, f: &Frontend, scope| {
            s.maps().services[&frontend_key(f, scope).slot(0)].rev_nat_id
        };
        let group =
            |s: &LbSyncer<FakeMaps>, id: u32| *s.maps().affinity_groups.get(&id).unwrap_or(&id);
        let shared = [
            rev(&s, &cluster_ip, SCOPE_INTERNAL),
            rev(&s, &node_port, SCOPE_INTERNAL),
            rev(&s, &node_port, SCOPE_EXTERNAL),
        ];
        let g = shared.iter().copied().min().unwrap();
        for id in shared {
            assert_eq!(group(&s, id), g, "{:?}", s.maps().affinity_groups);
        }
        // Another Service port is its own group.
        assert_eq!(
            group(&s, rev(&s, &other, SCOPE_INTERNAL)),
            rev(&s, &other, SCOPE_INTERNAL)
        );
        // A restart keeps the groups: nothing to write.
        let maps = s.maps;
        let mut s = LbSyncer::restore(maps).unwrap();
        assert_eq!(s.sync(&d).unwrap().writes, 0);
        // Without affinity no group entry is kept.
        for st in d.services.values_mut() {
            st.session_affinity = None;
        }
        s.sync(&d).unwrap();
        assert!(s.maps().affinity_groups.is_empty());
    }
}
