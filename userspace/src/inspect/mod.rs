//! `kpr status` and `kpr trace`: what this node's eBPF dataplane holds, read from the live
//! pinned maps, so they work while the agent is down too. The Service each frontend belongs
//! to is not in the maps; it comes from the agent's admin socket when the agent runs. Both
//! families' maps are read through one generic path ([`family::Family`]).

pub mod family;
pub mod render;
pub mod trace;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData, MapInfo, PerCpuArray};
use ipnet::IpNet;
use kpr_common::{
    Affinity4Value, Service4Value, AFFINITY_GROUP_MAP, COUNTERS_MAP, IPPROTO_TCP, IPPROTO_UDP,
    SCOPE_EXTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_EXT_LOCAL, SVC_FLAG_NO_SNAT,
    SVC_FLAG_SOURCE_RANGES,
};

use family::{AffinityExt, Ct, CtVal, Family, ServiceKeyParts, SrcRange, V4, V6};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("map {map} (pin {pin}): {detail}; is the eBPF mode running on this node, with this --bpf-pin-dir?")]
    Map {
        map: &'static str,
        pin: PathBuf,
        detail: String,
    },
}

/// One family's pinned maps, opened.
pub struct FamilyMaps<F: Family> {
    services: HashMap<MapData, F::ServiceKey, Service4Value>,
    backends: HashMap<MapData, u32, F::Backend>,
    src_ranges: LpmTrie<MapData, SrcRange<F>, u8>,
    affinity_ext: HashMap<MapData, AffinityExt<F>, Affinity4Value>,
    ct: HashMap<MapData, Ct<F>, CtVal<F>>,
    ct_new: HashMap<MapData, Ct<F>, CtVal<F>>,
}

/// The pinned maps, opened.
pub struct Pinned {
    pin_dir: PathBuf,
    v4: FamilyMaps<V4>,
    /// None: pins of an agent older than IPv6 support.
    v6: Option<FamilyMaps<V6>>,
    /// None: pins of an agent older than affinity groups (every frontend its own group).
    affinity_groups: Option<HashMap<MapData, u32, u32>>,
    counters: PerCpuArray<MapData, u64>,
}

/// The map `name` pinned in `pin_dir`, as the typed handle `T`.
fn typed<T>(pin_dir: &Path, name: &'static str) -> Result<T, InspectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let pin = pin_dir.join(name);
    crate::ebpf::maps::open_pinned(&pin).map_err(|detail| InspectError::Map {
        map: name,
        pin,
        detail,
    })
}

// The kernel's map types are Pod for each family's concrete keys (kpr-common), so the
// generic code names them.
impl<F: Family> FamilyMaps<F>
where
    Ct<F>: aya::Pod,
    CtVal<F>: aya::Pod,
    AffinityExt<F>: aya::Pod,
    SrcRange<F>: aya::Pod,
{
    fn open(pin_dir: &Path) -> Result<Self, InspectError> {
        Ok(FamilyMaps {
            services: typed(pin_dir, F::SERVICES_MAP)?,
            backends: typed(pin_dir, F::BACKENDS_MAP)?,
            src_ranges: typed(pin_dir, F::SRC_RANGE_MAP)?,
            affinity_ext: typed(pin_dir, F::AFFINITY_EXT_MAP)?,
            ct: typed(pin_dir, F::CT_MAP)?,
            ct_new: typed(pin_dir, F::CT_NEW_MAP)?,
        })
    }

    fn service(&self, key: ServiceKeyParts<F::Addr>) -> Option<Service4Value> {
        self.services.get(&F::service_key(key), 0).ok()
    }

    fn backend(&self, id: u32) -> Option<SocketAddr> {
        let b = self.backends.get(&id, 0).ok()?;
        let (address_be, port_be) = F::backend(&b);
        Some(SocketAddr::new(
            F::ip(address_be).into(),
            u16::from_be(port_be),
        ))
    }

    /// The source ranges of frontend `rev_nat_id`, as CIDRs.
    fn source_ranges(&self, rev_nat_id: u32) -> Vec<String> {
        let mut out: Vec<String> = self
            .src_ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().rev_nat_id == rev_nat_id)
            .map(|k| {
                let prefix = k.prefix_len().saturating_sub(32).min(F::BITS) as u8;
                let ip: IpAddr = F::ip(k.data().address_be).into();
                IpNet::new(ip, prefix)
                    .unwrap_or_else(|_| IpNet::from(ip))
                    .to_string()
            })
            .collect();
        out.sort();
        out
    }

    /// Whether `client` is inside frontend `rev_nat_id`'s source ranges (the tc program's
    /// LPM lookup).
    fn source_allowed(&self, rev_nat_id: u32, client: F::Ip) -> bool {
        let key = LpmKey::new(
            kpr_common::src_range_prefixlen(F::BITS as u8),
            SrcRange::<F> {
                rev_nat_id,
                address_be: F::addr(client),
            },
        );
        self.src_ranges.get(&key, 0).is_ok()
    }

    fn occupancy(&self, pin_dir: &Path) -> Vec<MapUse> {
        let cap = |name: &str| {
            MapInfo::from_pin(pin_dir.join(name))
                .map(|i| u64::from(i.max_entries()))
                .unwrap_or(0)
        };
        let entry = |map: &'static str, entries: usize| MapUse {
            map,
            entries: entries as u64,
            capacity: cap(map),
        };
        vec![
            entry(
                F::SERVICES_MAP,
                self.services.keys().filter(Result::is_ok).count(),
            ),
            entry(
                F::BACKENDS_MAP,
                self.backends.keys().filter(Result::is_ok).count(),
            ),
            entry(F::CT_MAP, self.ct.keys().filter(Result::is_ok).count()),
            entry(
                F::CT_NEW_MAP,
                self.ct_new.keys().filter(Result::is_ok).count(),
            ),
        ]
    }

    /// Every frontend (slot 0 entries), sorted by scope, address, port and protocol.
    fn frontends(&self) -> Vec<FrontendView> {
        let mut keys: Vec<ServiceKeyParts<F::Addr>> = self
            .services
            .keys()
            .filter_map(Result::ok)
            .map(|k| F::service_key_parts(&k))
            .filter(|k| k.backend_slot == 0)
            .collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|k| Some(self.frontend(k, self.service(k)?)))
            .collect()
    }

    fn frontend(&self, key: ServiceKeyParts<F::Addr>, v: Service4Value) -> FrontendView {
        let backends = (1..=v.count)
            .map(|slot| {
                let slot_key = ServiceKeyParts {
                    backend_slot: slot,
                    ..key
                };
                match self
                    .service(slot_key)
                    .and_then(|s| self.backend(s.backend_id).map(|b| (s.backend_id, b)))
                {
                    Some((id, address)) => BackendView {
                        slot,
                        id,
                        address: address.to_string(),
                    },
                    None => BackendView {
                        slot,
                        id: 0,
                        address: "(missing)".into(),
                    },
                }
            })
            .collect();
        let mut flags = Vec::new();
        if v.flags & SVC_FLAG_EXT_LOCAL != 0 {
            flags.push("externalTrafficPolicy=Local");
        }
        if v.flags & SVC_FLAG_NO_SNAT != 0 {
            flags.push("no-snat");
        }
        FrontendView {
            frontend: frontend_name::<F>(key),
            scope: if key.scope == SCOPE_EXTERNAL {
                "external"
            } else {
                "internal"
            },
            service: None,
            kind: None,
            rev_nat_id: v.rev_nat_id,
            backends,
            affinity_timeout_s: (v.flags & SVC_FLAG_AFFINITY != 0).then_some(v.backend_id),
            source_ranges: if v.flags & SVC_FLAG_SOURCE_RANGES != 0 {
                self.source_ranges(v.rev_nat_id)
            } else {
                Vec::new()
            },
            flags,
        }
    }
}

impl Pinned {
    pub fn open(pin_dir: &Path) -> Result<Pinned, InspectError> {
        Ok(Pinned {
            pin_dir: pin_dir.to_path_buf(),
            v4: FamilyMaps::open(pin_dir)?,
            v6: FamilyMaps::open(pin_dir).ok(),
            affinity_groups: typed(pin_dir, AFFINITY_GROUP_MAP).ok(),
            counters: typed(pin_dir, COUNTERS_MAP)?,
        })
    }

    /// The session-affinity group of frontend `rev_nat_id` (see `AFFINITY_GROUP_MAP`).
    fn affinity_group(&self, rev_nat_id: u32) -> u32 {
        self.affinity_groups
            .as_ref()
            .and_then(|m| m.get(&rev_nat_id, 0).ok())
            .unwrap_or(rev_nat_id)
    }

    /// Datapath counters summed over CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        crate::ebpf::maps::datapath_counters(&self.counters)
            .into_iter()
            .map(|(name, n)| (name.to_string(), n))
            .collect()
    }

    /// (map, entries, capacity) of every map kpr sizes, IPv4's then IPv6's.
    pub fn occupancy(&self) -> Vec<MapUse> {
        let mut out = self.v4.occupancy(&self.pin_dir);
        if let Some(v6) = &self.v6 {
            out.extend(v6.occupancy(&self.pin_dir));
        }
        out
    }

    /// Every frontend, IPv4's then IPv6's, each sorted by scope, address, port and protocol.
    pub fn frontends(&self) -> Vec<FrontendView> {
        let mut out = self.v4.frontends();
        if let Some(v6) = &self.v6 {
            out.extend(v6.frontends());
        }
        out
    }
}

/// One frontend as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendView {
    /// `ip:port/proto`, as the status file names it.
    pub frontend: String,
    /// `internal` (clients on the node: the socket programs) or `external` (the tc programs).
    pub scope: &'static str,
    /// From the agent: the Service port and the frontend's kind.
    pub service: Option<String>,
    pub kind: Option<String>,
    pub rev_nat_id: u32,
    pub backends: Vec<BackendView>,
    pub affinity_timeout_s: Option<u32>,
    pub source_ranges: Vec<String>,
    pub flags: Vec<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackendView {
    pub slot: u16,
    pub id: u32,
    pub address: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapUse {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// What `kpr status` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeView {
    pub pin_dir: PathBuf,
    /// `reachable`, or why the agent could not be asked (names are then missing).
    pub agent: String,
    pub frontends: Vec<FrontendView>,
    pub counters: BTreeMap<String, u64>,
    pub maps: Vec<MapUse>,
}

/// The agent's status as the admin socket serves it (the part used here).
#[derive(serde::Deserialize, Default)]
struct AgentStatus {
    #[serde(default)]
    frontends: BTreeMap<String, AgentFrontend>,
}

#[derive(serde::Deserialize)]
struct AgentFrontend {
    #[serde(default)]
    service: String,
    #[serde(default)]
    kind: String,
}

/// Reads everything for `kpr status`; names from the agent at `admin_socket`, if it answers.
pub fn node_view(pin_dir: &Path, admin_socket: &Path) -> Result<NodeView, InspectError> {
    let pinned = Pinned::open(pin_dir)?;
    let mut frontends = pinned.frontends();
    let agent = match crate::admin::query(admin_socket, std::time::Duration::from_secs(2)) {
        Ok(bytes) => match serde_json::from_slice::<AgentStatus>(&bytes) {
            Ok(status) => {
                for f in &mut frontends {
                    if let Some(a) = status.frontends.get(&f.frontend) {
                        f.service = Some(a.service.clone());
                        f.kind = Some(a.kind.clone());
                    }
                }
                "reachable".to_string()
            }
            Err(e) => format!("unreadable answer: {e}"),
        },
        Err(e) => format!("not reachable ({e}); Service names unknown"),
    };
    Ok(NodeView {
        pin_dir: pin_dir.to_path_buf(),
        agent,
        frontends,
        counters: pinned.counters(),
        maps: pinned.occupancy(),
    })
}

/// `ip:port/proto` of a services key, as the agent's status names frontends (`[ip]:port/proto`
/// for IPv6).
pub fn frontend_name<F: Family>(k: ServiceKeyParts<F::Addr>) -> String {
    format!(
        "{}/{}",
        SocketAddr::new(F::ip(k.address_be).into(), u16::from_be(k.port_be)),
        proto_name(k.proto)
    )
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        kpr_common::IPPROTO_SCTP => "sctp",
        _ => "?",
    }
}
