//! `kpr status` and `kpr trace`: what this node's eBPF dataplane holds, read from the live
//! pinned maps, so they work while the agent is down too. The Service each frontend belongs
//! to is not in the maps; it comes from the agent's admin socket when the agent runs.

pub mod render;
pub mod trace;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData, MapInfo, PerCpuArray};
use kpr_common::{
    Affinity4Value, AffinityExt4Key, Backend4Value, Ct4Key, Ct4Value, Service4Key, Service4Value,
    SrcRange4Key, AFFINITY_EXT_MAP, AFFINITY_GROUP_MAP, BACKENDS_MAP, COUNTERS_MAP, CT_MAP,
    CT_NEW_MAP, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SERVICES_MAP, SRC_RANGE_MAP,
    SVC_FLAG_AFFINITY, SVC_FLAG_EXT_LOCAL, SVC_FLAG_NO_SNAT, SVC_FLAG_SOURCE_RANGES,
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("map {map} (pin {pin}): {detail}; is the eBPF mode running on this node, with this --bpf-pin-dir?")]
    Map {
        map: &'static str,
        pin: PathBuf,
        detail: String,
    },
}

/// The pinned maps, opened.
pub struct Pinned {
    pin_dir: PathBuf,
    services: HashMap<MapData, Service4Key, Service4Value>,
    backends: HashMap<MapData, u32, Backend4Value>,
    src_ranges: LpmTrie<MapData, SrcRange4Key, u8>,
    affinity_ext: HashMap<MapData, AffinityExt4Key, Affinity4Value>,
    /// None: pins of an agent older than affinity groups (every frontend its own group).
    affinity_groups: Option<HashMap<MapData, u32, u32>>,
    counters: PerCpuArray<MapData, u64>,
    ct: HashMap<MapData, Ct4Key, Ct4Value>,
    ct_new: HashMap<MapData, Ct4Key, Ct4Value>,
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

impl Pinned {
    pub fn open(pin_dir: &Path) -> Result<Pinned, InspectError> {
        Ok(Pinned {
            pin_dir: pin_dir.to_path_buf(),
            services: typed(pin_dir, SERVICES_MAP)?,
            backends: typed(pin_dir, BACKENDS_MAP)?,
            src_ranges: typed(pin_dir, SRC_RANGE_MAP)?,
            affinity_ext: typed(pin_dir, AFFINITY_EXT_MAP)?,
            affinity_groups: typed(pin_dir, AFFINITY_GROUP_MAP).ok(),
            counters: typed(pin_dir, COUNTERS_MAP)?,
            ct: typed(pin_dir, CT_MAP)?,
            ct_new: typed(pin_dir, CT_NEW_MAP)?,
        })
    }

    fn service(&self, key: &Service4Key) -> Option<Service4Value> {
        self.services.get(key, 0).ok()
    }

    /// The session-affinity group of frontend `rev_nat_id` (see `AFFINITY_GROUP_MAP`).
    fn affinity_group(&self, rev_nat_id: u32) -> u32 {
        self.affinity_groups
            .as_ref()
            .and_then(|m| m.get(&rev_nat_id, 0).ok())
            .unwrap_or(rev_nat_id)
    }

    fn backend(&self, id: u32) -> Option<Backend4Value> {
        self.backends.get(&id, 0).ok()
    }

    /// The source ranges of frontend `rev_nat_id`, as CIDRs.
    fn source_ranges(&self, rev_nat_id: u32) -> Vec<String> {
        let mut out: Vec<String> = self
            .src_ranges
            .keys()
            .filter_map(Result::ok)
            .map(|k| crate::ebpf::maps::src_range_of(&k))
            .filter(|(id, _)| *id == rev_nat_id)
            .map(|(_, net)| net.to_string())
            .collect();
        out.sort();
        out
    }

    /// Whether `client` is inside frontend `rev_nat_id`'s source ranges (the tc program's
    /// LPM lookup).
    fn source_allowed(&self, rev_nat_id: u32, client: Ipv4Addr) -> bool {
        let key = LpmKey::new(
            kpr_common::src_range_prefixlen(32),
            SrcRange4Key {
                rev_nat_id,
                address_be: u32::from_ne_bytes(client.octets()),
            },
        );
        self.src_ranges.get(&key, 0).is_ok()
    }

    /// Datapath counters summed over CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        crate::ebpf::maps::datapath_counters(&self.counters)
            .into_iter()
            .map(|(name, n)| (name.to_string(), n))
            .collect()
    }

    /// (map, entries, capacity) of every map kpr sizes.
    pub fn occupancy(&self) -> Vec<MapUse> {
        let count = |keys: usize| keys as u64;
        let cap = |name: &str| {
            MapInfo::from_pin(self.pin_dir.join(name))
                .map(|i| u64::from(i.max_entries()))
                .unwrap_or(0)
        };
        vec![
            MapUse {
                map: SERVICES_MAP,
                entries: count(self.services.keys().filter(Result::is_ok).count()),
                capacity: cap(SERVICES_MAP),
            },
            MapUse {
                map: BACKENDS_MAP,
                entries: count(self.backends.keys().filter(Result::is_ok).count()),
                capacity: cap(BACKENDS_MAP),
            },
            MapUse {
                map: CT_MAP,
                entries: count(self.ct.keys().filter(Result::is_ok).count()),
                capacity: cap(CT_MAP),
            },
            MapUse {
                map: CT_NEW_MAP,
                entries: count(self.ct_new.keys().filter(Result::is_ok).count()),
                capacity: cap(CT_NEW_MAP),
            },
        ]
    }

    /// Every frontend (slot 0 entries), sorted by scope, address, port and protocol.
    pub fn frontends(&self) -> Vec<FrontendView> {
        let mut keys: Vec<Service4Key> = self
            .services
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.backend_slot == 0)
            .collect();
        keys.sort_by_key(|k| {
            (
                k.scope,
                u32::from_be(k.address_be),
                u16::from_be(k.port_be),
                k.proto,
            )
        });
        keys.iter()
            .filter_map(|k| Some(self.frontend(k, self.service(k)?)))
            .collect()
    }

    fn frontend(&self, key: &Service4Key, v: Service4Value) -> FrontendView {
        let backends = (1..=v.count)
            .map(|slot| {
                let slot_key = Service4Key {
                    backend_slot: slot,
                    ..*key
                };
                match self
                    .service(&slot_key)
                    .and_then(|s| self.backend(s.backend_id).map(|b| (s.backend_id, b)))
                {
                    Some((id, b)) => BackendView {
                        slot,
                        id,
                        address: backend_addr(&b).to_string(),
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
            frontend: frontend_name(key),
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

/// The IPv4 addresses of this network namespace's interfaces (getifaddrs(3)).
pub fn local_ipv4_addresses() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list freed below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: a node of the list, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family says what follows.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: AF_INET entries carry a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
    }
    // SAFETY: from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// `ip:port/proto` of a services key.
pub fn frontend_name(k: &Service4Key) -> String {
    format!(
        "{}/{}",
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(k.address_be)),
            u16::from_be(k.port_be)
        ),
        proto_name(k.proto)
    )
}

fn backend_addr(b: &Backend4Value) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(b.address_be)),
        u16::from_be(b.port_be),
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
