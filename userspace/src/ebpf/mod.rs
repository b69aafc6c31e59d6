//! The eBPF dataplane: loads kpr's kernel programs, pins their maps, attaches the socket-LB
//! programs to a cgroup v2 directory and the north-south programs to the node's external
//! devices (see [`tc`]), and keeps the maps in sync with the model.

pub mod conntrack;
pub mod events;
pub mod layouts;
pub mod links;
pub mod maps;
pub mod sctp;
pub mod sockterm;
pub mod sync;
pub mod tc;

use std::collections::HashSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, MapData, MapInfo, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSkbAttachType};
use aya::{Ebpf, EbpfLoader};
use kpr_common::{
    SockRevNat4Key, SockRevNat4Value, AFFINITY_GROUP_MAP, BACKENDS_MAP, COUNTERS_MAP, COUNTER_MAX,
    CT6_MAP, CT6_NEW_MAP, CT_MAP, CT_NEW_MAP, IPPROTO_UDP, SERVICES_MAP, SOCK_CHECK_GATE_MAP,
    SOCK_REVNAT_MAP, SRC_RANGE_MAP,
};

use self::conntrack::{Conntrack4, Conntrack6, ConntrackConfig, ConntrackError, SweepStats};
use self::maps::{AyaLbMaps, LbMaps, MapOpError, SrcRangeMap};
use self::sync::{LbSyncer, SyncError, SyncStats};
use self::tc::TcLinks;
use crate::model::DesiredState;

/// The kernel object built by build.rs (aya-build) from dataplane-ebpf.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpr"));

/// The socket-LB programs, by function name in dataplane-ebpf.
const SOCK_PROGRAMS: [&str; 8] = [
    "kpr_connect4",
    "kpr_sendmsg4",
    "kpr_recvmsg4",
    "kpr_getpeer4",
    "kpr_connect6",
    "kpr_sendmsg6",
    "kpr_recvmsg6",
    "kpr_getpeer6",
];

/// The cgroup egress program that checks loadBalancerSourceRanges for clients on the node.
const EGRESS_PROGRAM: &str = "kpr_egress4";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("pin directory {0}: {1}")]
    PinDir(PathBuf, String),
    #[error("cgroup {0}: {1}")]
    Cgroup(PathBuf, String),
    #[error("loading kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("map {0}: {1}")]
    Map(&'static str, String),
    #[error("device {0}: {1}")]
    Device(String, String),
    #[error("pinned link {0}: {1}")]
    Link(PathBuf, String),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
    #[error(transparent)]
    Events(#[from] events::EventsError),
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE): {0}")]
    NetnsCookie(std::io::Error),
}

/// Where the dataplane pins its maps and which cgroup it serves.
#[derive(Clone, Debug)]
pub struct EbpfConfig {
    /// A directory on a bpffs; maps are pinned here by name and reused across restarts.
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory whose processes get socket-level load balancing.
    pub cgroup: PathBuf,
    /// Sizes of the services and backends maps (entries). Maps already pinned keep theirs;
    /// what does not fit is refused by Service port (see [`sync::Capacity`]).
    pub lb_capacity: sync::Capacity,
    /// Attaching to the root of a cgroup v2 hierarchy affects every process on the host: a
    /// production DaemonSet wants that, a test must never do it. Off unless asked for.
    pub allow_cgroup_root: bool,
    /// Program kpr's nftables table (masquerade by mark, no-endpoint reject) in the calling
    /// thread's network namespace on every sync, with masquerade mark `Some(mark)`. The agent
    /// does; tests that run in the host's namespace leave it `None`.
    pub nftables_mark: Option<u32>,
    /// The accept for forwarded Service traffic in the filter table's FORWARD chain
    /// (kube-proxy's KUBE-FORWARD), ensured on every full sync. The agent sets it; tests in
    /// the host's namespace leave it `None`.
    pub forward_accept: Option<crate::netfilter::iptables::forward::ForwardAccept>,
    /// Emit datapath events (translations, drops with their reason) and log them
    /// (`--datapath-events`, see [`events`]). Off, the loaded programs hold no event code.
    pub datapath_events: bool,
    /// Where the pods' network namespaces are (`--pod-netns-dir`): connected UDP sockets of
    /// backends that left are destroyed there and in the agent's own namespace (see
    /// [`sockterm`]). None: the agent's namespace only.
    pub pod_netns_dir: Option<PathBuf>,
    /// ClusterIP traffic routed to the node (translated by the tc programs) is masqueraded
    /// as kube-proxy does it: always with `--masquerade-all`, else when its source is outside
    /// `local_cidr4` (`--detect-local-mode=ClusterCIDR` with `--cluster-cidr`); with neither,
    /// never.
    pub masquerade_all: bool,
    /// The local-traffic detector (`--detect-local-mode`) for IPv4.
    pub local: crate::netfilter::plan::LocalDetector,
    /// Its IPv6 CIDR (ClusterCIDR with an IPv6 `--cluster-cidr`); interface detectors are
    /// `local`'s for both families.
    pub local6: Option<ipnet::IpNet>,
    /// NodeCIDR: `local` follows the Node's pod CIDRs (refreshed on each sync).
    pub local_from_node: bool,
    /// Drop, as kube-proxy does, rather than refuse at connect() calls to a ClusterIP with
    /// internalTrafficPolicy Local and no endpoint on this node while the Service has
    /// endpoints elsewhere (`--reject-no-local-endpoints=false`).
    pub drop_no_local_endpoints: bool,
    /// Masquerade externalTrafficPolicy Cluster traffic from outside to backends on this node
    /// too, as kube-proxy does (`--masquerade-local-endpoints`). Off (the default), such
    /// traffic keeps the client's address, as with Cilium: its replies come back through this
    /// node anyway.
    pub masquerade_local_endpoints: bool,
    /// Serve SCTP service ports through nftables rules in the tables `kpr-sctp` (see
    /// [`sctp`]), in the calling thread's network namespace. The agent does; `None` leaves
    /// them unserved (tests in the host's namespace).
    pub sctp: Option<sctp::SctpConfig>,
}

/// The north-south (tc) part of the dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcConfig {
    /// Devices to attach the tc programs to (ingress and egress), in the calling thread's
    /// network namespace. Empty: none (the programs are still loaded and verified). The agent
    /// passes `--devices`, or [`tc::default_devices`] when that is empty.
    pub devices: Vec<String>,
    /// Sizes and lifetimes of the conntrack maps. Maps already pinned keep their size (and
    /// their flows); remove the pins to resize.
    pub conntrack: ConntrackConfig,
}

/// Loaded programs and the syncer for their maps. Dropping it leaves the programs attached
/// (their links are pinned, see [`links`]) and the maps pinned, so traffic keeps flowing while
/// the agent is away, and a restarted agent resumes with the same ids and flows. Only tc
/// programs attached through netlink (kernels without TCX, before 6.6) detach on drop.
pub struct EbpfDataplane {
    // Detach before the programs go (field order is drop order).
    tc_links: TcLinks,
    // Keeps programs and the cgroup links alive.
    ebpf: Ebpf,
    syncer: LbSyncer<AyaLbMaps>,
    counters: PerCpuArray<MapData, u64>,
    conntrack: Conntrack4,
    conntrack6: Conntrack6,
    /// The last garbage collection's figures (for the occupancy report).
    last_sweep: SweepStats,
    /// Entries the garbage collection removed since start: (expired, of backends that left).
    swept_total: (u64, u64),
    /// A second handle on the source-range trie (the syncer's maps hold the other).
    src_ranges: SrcRangeMap,
    /// kpr's nftables table, when this dataplane programs it ([`EbpfConfig::nftables_mark`]).
    table: Option<crate::nft::NftTable>,
    /// The SCTP service ports' rules ([`EbpfConfig::sctp`]).
    sctp: Option<sctp::SctpRules>,
    /// See [`EbpfConfig::forward_accept`].
    forward_accept: Option<crate::netfilter::iptables::forward::ForwardAccept>,
    /// Other modes' leftovers were removed (at the first sync).
    cleaned: bool,
    /// With datapath events on: the Service names the event reader looks frontends up in.
    event_names: Option<events::FrontendNames>,
    /// The socket reverse-NAT map: which sockets kpr translated, to which backend.
    sock_revnat: HashMap<MapData, SockRevNat4Key, SockRevNat4Value>,
    sock_revnat6: HashMap<MapData, kpr_common::SockRevNat6Key, kpr_common::SockRevNat6Value>,
    /// See [`EbpfConfig::pod_netns_dir`].
    pod_netns_dir: Option<PathBuf>,
    /// Turns the egress program's source-range checks on (see `SOCK_CHECK_GATE_MAP`).
    sock_check_gate: Array<MapData, u32>,
    /// Routed ClusterIP traffic may be masqueraded (see [`EbpfConfig::masquerade_all`]).
    cluster_ip_masquerade: bool,
    /// See [`EbpfConfig::drop_no_local_endpoints`].
    drop_no_local_endpoints: bool,
    /// See [`EbpfConfig::masquerade_local_endpoints`].
    masquerade_local_endpoints: bool,
    /// The local CIDR of the ClusterCIDR/NodeCIDR detectors (`LOCAL_NET_MAP`) and whether
    /// it follows the Node (NodeCIDR).
    local_net: Array<MapData, kpr_common::LocalNet4>,
    local_net6: Array<MapData, kpr_common::LocalNet6>,
    local_from_node: bool,
    /// The interface detectors' local tc devices (`LOCAL_DEV_MAP`), and the detector.
    local_devs: HashMap<MapData, u32, u8>,
    local: crate::netfilter::plan::LocalDetector,
    /// `--devices` as given (names and `prefix+` patterns) and what they named at the last
    /// attach.
    device_specs: Vec<String>,
    devices: Vec<String>,
    pin_dir: PathBuf,
    /// Connected UDP sockets destroyed since start; false once the kernel said it cannot.
    udp_sockets_destroyed: u64,
    destroy_supported: bool,
}

impl EbpfDataplane {
    /// Loads everything with no tc devices (see [`EbpfDataplane::load_with`]).
    pub fn load(cfg: &EbpfConfig) -> Result<Self, EbpfError> {
        Self::load_with(cfg, &TcConfig::default())
    }

    /// Loads the programs, attaches the socket programs to `cfg.cgroup` and the tc programs to
    /// `tc.devices`, and restores the syncer's state from the pinned maps.
    pub fn load_with(cfg: &EbpfConfig, tc: &TcConfig) -> Result<Self, EbpfError> {
        check_fs(
            &cfg.pin_dir,
            BPF_FS_MAGIC,
            "not on a bpffs (mount -t bpf bpf DIR)",
        )
        .map_err(|e| EbpfError::PinDir(cfg.pin_dir.clone(), e))?;
        check_fs(
            &cfg.cgroup,
            CGROUP2_SUPER_MAGIC,
            "not in a cgroup v2 hierarchy",
        )
        .map_err(|e| EbpfError::Cgroup(cfg.cgroup.clone(), e))?;
        if !cfg.allow_cgroup_root && is_cgroup2_root(&cfg.cgroup) {
            return Err(EbpfError::Cgroup(
                cfg.cgroup.clone(),
                "is the root of a cgroup v2 hierarchy; refusing without --allow-cgroup-root".into(),
            ));
        }
        let cgroup = File::open(&cfg.cgroup)
            .map_err(|e| EbpfError::Cgroup(cfg.cgroup.clone(), e.to_string()))?;
        let cgroup_id = links::cgroup_id(&cfg.cgroup)
            .map_err(|e| EbpfError::Cgroup(cfg.cgroup.clone(), e.to_string()))?;

        let ct = &tc.conntrack;
        prepare_pins(&cfg.pin_dir, ct)?;
        let host_netns_cookie = links::netns_cookie().map_err(EbpfError::NetnsCookie)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .map_max_entries(SERVICES_MAP, map_size(cfg.lb_capacity.services))
            .map_max_entries(BACKENDS_MAP, map_size(cfg.lb_capacity.backends))
            .map_max_entries(CT_MAP, ct.established_entries())
            .map_max_entries(CT_NEW_MAP, ct.new_entries())
            .map_max_entries(CT6_MAP, ct.established_entries())
            .map_max_entries(CT6_NEW_MAP, ct.new_entries())
            .override_global("CT_TIMEOUTS", &ct.timeouts, true)
            .override_global("KPR_DATAPATH_EVENTS", &u8::from(cfg.datapath_events), true)
            .override_global("KPR_HOST_NETNS_COOKIE", &host_netns_cookie, true)
            .override_global("KPR_MASQUERADE_ALL", &u8::from(cfg.masquerade_all), true)
            .override_global("KPR_LOCAL_DETECT", &local_detect_mode(cfg), true)
            // aya-log's own filter: everything when on, nothing when off.
            .override_global(
                aya_log::LEVEL,
                &if cfg.datapath_events { u8::MAX } else { 0 },
                true,
            )
            .load(KERNEL_OBJECT)?;
        let event_names = if cfg.datapath_events {
            let names = events::FrontendNames::default();
            events::start(&mut ebpf, names.clone())?;
            tracing::info!("datapath events on (target kpr::datapath)");
            Some(names)
        } else {
            None
        };
        // Other versions' layouts, converted before this build's programs replace theirs.
        let moved = conntrack::adopt_v1(&cfg.pin_dir, &cfg.pin_dir.join(CT_MAP))?;
        if moved > 0 {
            tracing::info!(entries = moved, "moved an older agent's conntrack entries");
        }
        for (from, entries) in layouts::convert(&cfg.pin_dir)
            .map_err(|e| EbpfError::PinDir(cfg.pin_dir.clone(), e.to_string()))?
        {
            tracing::info!(%from, entries, "converted another kpr version's map layout");
        }
        for name in SOCK_PROGRAMS.into_iter().chain([EGRESS_PROGRAM]) {
            let program = ebpf
                .program_mut(name)
                .ok_or(EbpfError::Map(name, "program missing from object".into()))?;
            let fail = |e| EbpfError::Program(name, e);
            let pin = links::pin_path(&cfg.pin_dir, name);
            let link_fail = |e: String| EbpfError::Link(pin.clone(), e);
            // aya attaches with a bpf_link (kernel >= 5.7). Links always coexist with other
            // programs on the cgroup (the kernel attaches them as BPF_F_ALLOW_MULTI) and the
            // kernel rejects that flag in link_create, so the mode passed is Single (flags 0).
            let attached = match program {
                aya::programs::Program::CgroupSockAddr(prog) => {
                    prog.load().map_err(fail)?;
                    if adopt_cgroup_link(&pin, cgroup_id, prog.fd().map_err(fail)?)? {
                        None
                    } else {
                        let id = prog
                            .attach(&cgroup, CgroupAttachMode::Single)
                            .map_err(fail)?;
                        let link = prog.take_link(id).map_err(fail)?;
                        Some(FdLink::try_from(link).map_err(|e| link_fail(e.to_string()))?)
                    }
                }
                aya::programs::Program::CgroupSkb(prog) => {
                    prog.load().map_err(fail)?;
                    if adopt_cgroup_link(&pin, cgroup_id, prog.fd().map_err(fail)?)? {
                        None
                    } else {
                        let id = prog
                            .attach(
                                &cgroup,
                                CgroupSkbAttachType::Egress,
                                CgroupAttachMode::Single,
                            )
                            .map_err(fail)?;
                        let link = prog.take_link(id).map_err(fail)?;
                        Some(FdLink::try_from(link).map_err(|e| link_fail(e.to_string()))?)
                    }
                }
                _ => return Err(EbpfError::Map(name, "not a cgroup program".into())),
            };
            if let Some(link) = attached {
                link.pin(&pin).map_err(|e| link_fail(e.to_string()))?;
            }
        }

        // Loaded (verified) even without devices, so a verifier rejection shows at start.
        tc::load_programs(&mut ebpf)?;
        let devices = tc::resolve_devices(&tc.devices);
        let tc_links = tc::attach(&mut ebpf, &devices, &cfg.pin_dir)?;

        let services = HashMap::try_from(take_map(&mut ebpf, SERVICES_MAP)?)
            .map_err(|e| EbpfError::Map(SERVICES_MAP, e.to_string()))?;
        let backends = HashMap::try_from(take_map(&mut ebpf, BACKENDS_MAP)?)
            .map_err(|e| EbpfError::Map(BACKENDS_MAP, e.to_string()))?;
        let services6 = HashMap::try_from(take_map(&mut ebpf, kpr_common::SERVICES6_MAP)?)
            .map_err(|e| EbpfError::Map(kpr_common::SERVICES6_MAP, e.to_string()))?;
        let backends6 = HashMap::try_from(take_map(&mut ebpf, kpr_common::BACKENDS6_MAP)?)
            .map_err(|e| EbpfError::Map(kpr_common::BACKENDS6_MAP, e.to_string()))?;
        let mut local_net = Array::try_from(take_map(&mut ebpf, kpr_common::LOCAL_NET_MAP)?)
            .map_err(|e| EbpfError::Map(kpr_common::LOCAL_NET_MAP, e.to_string()))?;
        if let crate::netfilter::plan::LocalDetector::Cidr(net) = &cfg.local {
            set_local_net(&mut local_net, Some(*net))
                .map_err(|e| EbpfError::Map(kpr_common::LOCAL_NET_MAP, e.to_string()))?;
        }
        let mut local_net6 = Array::try_from(take_map(&mut ebpf, kpr_common::LOCAL_NET6_MAP)?)
            .map_err(|e| EbpfError::Map(kpr_common::LOCAL_NET6_MAP, e.to_string()))?;
        if cfg.local6.is_some() {
            set_local_net6(&mut local_net6, cfg.local6)
                .map_err(|e| EbpfError::Map(kpr_common::LOCAL_NET6_MAP, e.to_string()))?;
        }
        let mut local_devs: HashMap<MapData, u32, u8> =
            HashMap::try_from(take_map(&mut ebpf, kpr_common::LOCAL_DEV_MAP)?)
                .map_err(|e| EbpfError::Map(kpr_common::LOCAL_DEV_MAP, e.to_string()))?;
        fill_local_devs(&mut local_devs, &cfg.local, &devices)?;
        let sock_check_gate = Array::try_from(take_map(&mut ebpf, SOCK_CHECK_GATE_MAP)?)
            .map_err(|e| EbpfError::Map(SOCK_CHECK_GATE_MAP, e.to_string()))?;
        let sock_revnat = HashMap::try_from(take_map(&mut ebpf, SOCK_REVNAT_MAP)?)
            .map_err(|e| EbpfError::Map(SOCK_REVNAT_MAP, e.to_string()))?;
        let sock_revnat6 = HashMap::try_from(take_map(&mut ebpf, kpr_common::SOCK_REVNAT6_MAP)?)
            .map_err(|e| EbpfError::Map(kpr_common::SOCK_REVNAT6_MAP, e.to_string()))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, COUNTERS_MAP)?)
            .map_err(|e| EbpfError::Map(COUNTERS_MAP, e.to_string()))?;
        let pinned_size = |name: &str, wanted: u32| {
            MapInfo::from_pin(cfg.pin_dir.join(name))
                .map(|i| i.max_entries())
                .unwrap_or(wanted)
        };
        let conntrack = Conntrack4::new(
            (
                take_map(&mut ebpf, CT_MAP)?,
                take_map(&mut ebpf, CT_NEW_MAP)?,
            ),
            (CT_MAP, CT_NEW_MAP),
            pinned_size(CT_MAP, ct.established_entries()),
            pinned_size(CT_NEW_MAP, ct.new_entries()),
            ct.timeouts,
        )?;
        let conntrack6 = Conntrack6::new(
            (
                take_map(&mut ebpf, CT6_MAP)?,
                take_map(&mut ebpf, CT6_NEW_MAP)?,
            ),
            (CT6_MAP, CT6_NEW_MAP),
            pinned_size(CT6_MAP, ct.established_entries()),
            pinned_size(CT6_NEW_MAP, ct.new_entries()),
            ct.timeouts,
        )?;
        let src_ranges = SrcRangeMap {
            map: LpmTrie::try_from(take_map(&mut ebpf, SRC_RANGE_MAP)?)
                .map_err(|e| EbpfError::Map(SRC_RANGE_MAP, e.to_string()))?,
            map6: LpmTrie::try_from(take_map(&mut ebpf, kpr_common::SRC_RANGE6_MAP)?)
                .map_err(|e| EbpfError::Map(kpr_common::SRC_RANGE6_MAP, e.to_string()))?,
        };
        // The same tries again, for set_source_ranges (aya's map handles are not shareable).
        let src_ranges_again = SrcRangeMap {
            map: maps::open_pinned(&cfg.pin_dir.join(SRC_RANGE_MAP))
                .map_err(|e| EbpfError::Map(SRC_RANGE_MAP, e))?,
            map6: maps::open_pinned(&cfg.pin_dir.join(kpr_common::SRC_RANGE6_MAP))
                .map_err(|e| EbpfError::Map(kpr_common::SRC_RANGE6_MAP, e))?,
        };
        let affinity_groups = HashMap::try_from(take_map(&mut ebpf, AFFINITY_GROUP_MAP)?)
            .map_err(|e| EbpfError::Map(AFFINITY_GROUP_MAP, e.to_string()))?;
        let mut syncer = LbSyncer::restore(AyaLbMaps {
            services,
            backends,
            services6,
            backends6,
            src_ranges,
            affinity_groups,
        })?;
        // The sizes the maps really have (a pinned map keeps the size it was made with).
        let capacity = sync::Capacity {
            services: pinned_size(SERVICES_MAP, map_size(cfg.lb_capacity.services)) as usize,
            backends: pinned_size(BACKENDS_MAP, map_size(cfg.lb_capacity.backends)) as usize,
        };
        if capacity != cfg.lb_capacity {
            tracing::warn!(
                ?capacity,
                wanted = ?cfg.lb_capacity,
                "the pinned services/backends maps keep their size; remove the pins to resize"
            );
        }
        syncer.set_capacity(capacity);
        syncer.set_drop_no_local_endpoints(cfg.drop_no_local_endpoints);
        syncer.set_masquerade_local_endpoints(cfg.masquerade_local_endpoints);
        let mut dataplane = Self {
            tc_links,
            ebpf,
            syncer,
            counters,
            conntrack,
            conntrack6,
            last_sweep: SweepStats::default(),
            swept_total: (0, 0),
            src_ranges: src_ranges_again,
            table: cfg.nftables_mark.map(crate::nft::NftTable::new),
            sctp: cfg.sctp.clone().map(sctp::SctpRules::new),
            forward_accept: cfg.forward_accept.clone(),
            cleaned: false,
            event_names,
            sock_revnat,
            sock_revnat6,
            pod_netns_dir: cfg.pod_netns_dir.clone(),
            udp_sockets_destroyed: 0,
            destroy_supported: true,
            sock_check_gate,
            cluster_ip_masquerade: cfg.masquerade_all
                || cfg.local.is_implemented()
                || cfg.local6.is_some()
                || cfg.local_from_node,
            drop_no_local_endpoints: cfg.drop_no_local_endpoints,
            masquerade_local_endpoints: cfg.masquerade_local_endpoints,
            local_net,
            local_net6,
            local_from_node: cfg.local_from_node,
            local_devs,
            local: cfg.local.clone(),
            device_specs: tc.devices.clone(),
            devices,
            pin_dir: cfg.pin_dir.clone(),
        };
        // The restored frontends' ranges are checked at once (the gate is a new map).
        let on = dataplane.syncer.has_socket_checks();
        dataplane
            .set_sock_check_gate(on)
            .map_err(|e| EbpfError::Map(SOCK_CHECK_GATE_MAP, e.to_string()))?;
        Ok(dataplane)
    }

    /// Attaches the tc programs to the devices `--devices` names now, when its `prefix+`
    /// patterns name others than at the last attach (pods come and go); true if it did.
    pub fn refresh_devices(&mut self) -> Result<bool, EbpfError> {
        if !tc::has_patterns(&self.device_specs) {
            return Ok(false);
        }
        let devices = tc::resolve_devices(&self.device_specs);
        if devices == self.devices {
            return Ok(false);
        }
        self.tc_links = tc::attach(&mut self.ebpf, &devices, &self.pin_dir)?;
        // Interface indexes of devices that went may be reused: start the local set afresh.
        let stale: Vec<u32> = self.local_devs.keys().filter_map(Result::ok).collect();
        for ifindex in stale {
            self.local_devs
                .remove(&ifindex)
                .map_err(|e| EbpfError::Map(kpr_common::LOCAL_DEV_MAP, e.to_string()))?;
        }
        fill_local_devs(&mut self.local_devs, &self.local, &devices)?;
        self.devices = devices;
        Ok(true)
    }

    /// Turns the egress program's loadBalancerSourceRanges checks on or off.
    fn set_sock_check_gate(&mut self, on: bool) -> Result<(), MapOpError> {
        self.sock_check_gate
            .set(0, u32::from(on), 0)
            .map_err(|e| MapOpError {
                op: "set",
                map: SOCK_CHECK_GATE_MAP,
                detail: e.to_string(),
            })
    }

    /// Where the tc programs are attached: (device, "ingress"/"egress").
    pub fn tc_attachments(&self) -> Vec<(String, &'static str)> {
        self.tc_links.attached()
    }

    /// A loaded program by function name (tests run them with BPF_PROG_TEST_RUN).
    pub fn program(&self, name: &str) -> Option<&aya::programs::Program> {
        self.ebpf.program(name)
    }

    /// Replaces the loadBalancerSourceRanges of the external frontend with reverse-NAT id
    /// `rev_nat_id` (see [`LbMaps::put_source_ranges`] for the order relative to the frontend's
    /// `SVC_FLAG_SOURCE_RANGES`). Empty removes them.
    pub fn set_source_ranges(
        &mut self,
        rev_nat_id: u32,
        ranges: &[ipnet::IpNet],
    ) -> Result<(), MapOpError> {
        self.src_ranges.set(rev_nat_id, ranges)
    }

    /// The reverse-NAT id of a programmed frontend (slot 0) in `scope`
    /// (`kpr_common::SCOPE_INTERNAL` / `SCOPE_EXTERNAL`).
    pub fn rev_nat_id(&self, ip: Ipv4Addr, port: u16, proto: u8, scope: u8) -> Option<u32> {
        let key = kpr_common::Service4Key::scoped(
            u32::from_ne_bytes(ip.octets()),
            port.to_be(),
            proto,
            scope,
            0,
        );
        self.syncer
            .maps()
            .services
            .get(&key, 0)
            .ok()
            .map(|v| v.rev_nat_id)
    }

    /// Deletes the conntrack entries (both directions) of flows whose backend id is not in
    /// `live_backend_ids`, and every expired entry; returns how many entries went. The kernel
    /// re-balances such a flow on its next packet anyway; this frees the entries (and stops
    /// replies from a removed backend being shown as the frontend). It walks both maps: call it
    /// after syncs that removed backends, or on the full-sync period, not on every sync.
    pub fn purge_conntrack(&mut self, live_backend_ids: &HashSet<u32>) -> usize {
        let now = conntrack::monotonic_ns();
        let s = self.conntrack.sweep(Some(live_backend_ids), now)
            + self.conntrack6.sweep(Some(live_backend_ids), now);
        self.record_sweep(s);
        (s.stale + s.expired) as usize
    }

    /// [`EbpfDataplane::purge_conntrack`] with the backend ids currently in the backends map.
    pub fn purge_stale_conntrack(&mut self) -> Result<SweepStats, MapOpError> {
        let live: HashSet<u32> = self
            .syncer
            .maps()
            .dump_backends()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let now = conntrack::monotonic_ns();
        let s = self.conntrack.sweep(Some(&live), now) + self.conntrack6.sweep(Some(&live), now);
        self.record_sweep(s);
        Ok(s)
    }

    /// Removes the conntrack entries that are expired at `now_ns` (CLOCK_MONOTONIC), as the
    /// periodic garbage collection does.
    pub fn expire_conntrack(&mut self, now_ns: u64) -> SweepStats {
        let s = self.conntrack.sweep(None, now_ns) + self.conntrack6.sweep(None, now_ns);
        self.record_sweep(s);
        s
    }

    /// [`Self::expire_conntrack`] in its two halves (the walk, then the deletes), for tests of
    /// what the datapath does in between.
    pub fn plan_conntrack_expiry(&self, now_ns: u64) -> conntrack::SweepPlan<u32> {
        self.conntrack.plan_sweep(None, now_ns)
    }

    /// The second half: see [`conntrack::ConntrackMaps::apply_sweep`].
    pub fn apply_conntrack_sweep(&mut self, plan: conntrack::SweepPlan<u32>) -> SweepStats {
        let s = self.conntrack.apply_sweep(plan);
        self.record_sweep(s);
        s
    }

    fn record_sweep(&mut self, s: SweepStats) {
        self.last_sweep = s;
        self.swept_total.0 += s.expired;
        self.swept_total.1 += s.stale;
    }

    /// Number of conntrack entries in both maps (a walk: for tests and diagnostics).
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.entries().len() + self.conntrack6.entries().len()
    }

    /// The IPv4 conntrack maps (for tests and diagnostics).
    pub fn conntrack(&self) -> &Conntrack4 {
        &self.conntrack
    }

    /// The IPv6 conntrack maps (for tests and diagnostics).
    pub fn conntrack6(&self) -> &Conntrack6 {
        &self.conntrack6
    }

    pub fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, SyncError> {
        self.syncer.sync(desired)
    }

    pub fn full_sync(&mut self, desired: &DesiredState) -> Result<SyncStats, SyncError> {
        self.syncer.full_sync(desired)
    }

    /// Datapath counters summed over CPUs, by name, the conntrack garbage collection's
    /// removals (`ct_gc_expired`, `ct_gc_stale`) and the connected UDP sockets destroyed
    /// because their backend left (`udp_sockets_destroyed`).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        maps::datapath_counters(&self.counters)
            .into_iter()
            .chain([
                ("ct_gc_expired", self.swept_total.0),
                ("ct_gc_stale", self.swept_total.1),
                ("udp_sockets_destroyed", self.udp_sockets_destroyed),
            ])
            .collect()
    }

    /// Destroys the connected UDP sockets kpr translated to a backend that left its frontend
    /// (see [`sockterm`]), in the agent's namespace and the pods'. A walk of every namespace:
    /// call it after syncs that changed the maps, or on the full-sync period.
    pub fn terminate_stale_udp_sockets(&mut self) -> sockterm::TerminationStats {
        if !self.destroy_supported || !self.syncer.has_udp_frontends() {
            return sockterm::TerminationStats::default();
        }
        let (v4, v6, syncer) = (&self.sock_revnat, &self.sock_revnat6, &self.syncer);
        let revnat = sockterm::RevNatLookups {
            v4: |k: &SockRevNat4Key| v4.get(k, 0).ok(),
            v6: |k: &kpr_common::SockRevNat6Key| v6.get(k, 0).ok(),
        };
        let stats = sockterm::terminate_stale(self.pod_netns_dir.as_deref(), |socket| {
            sockterm::socket_is_stale(socket, &revnat, |frontend, id, backend| {
                syncer.still_serves(frontend, id, IPPROTO_UDP, backend)
            })
        });
        self.udp_sockets_destroyed += stats.destroyed;
        if stats.unsupported {
            self.destroy_supported = false;
            tracing::warn!(
                "this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY): connected UDP \
                 sockets stay on backends that left their Service until they reconnect"
            );
        }
        stats
    }

    pub fn occupancy(&self) -> (usize, usize) {
        self.syncer.occupancy()
    }
}

/// Map pins of another layout version than this build's (`KPR_<NAME>_V<n>` where this build
/// pins `KPR_<NAME>_V<m>`, m ≠ n), except those this build converts (`KPR_CT4_V1`, see
/// [`conntrack::adopt_v1`]; the affinity maps' other layout, see [`layouts`]). Starting beside them would leave their live state (sockets'
/// reverse NAT, affinity, flows) unused while the old programs may still read them.
pub fn foreign_layout_pins(pin_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let base = |name: &str| {
        name.rsplit_once("_V")
            .map(|(b, v)| (b.to_string(), v.to_string()))
    };
    let ours: Vec<(String, String)> = kpr_common::ALL_MAPS
        .iter()
        .filter_map(|m| base(m))
        .collect();
    let convertible = layouts::convertible_pins();
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("KPR_") && !n.starts_with(links::LINK_PIN_PREFIX))
        .filter(|n| n != kpr_common::CT_MAP_V1 && !convertible.contains(n))
        .filter(|n| {
            base(n).is_some_and(|(b, v)| {
                v.chars().all(|c| c.is_ascii_digit())
                    && ours.iter().any(|(ob, ov)| *ob == b && *ov != v)
            })
        })
        .collect();
    out.sort();
    out
}

/// Pins left by an older agent that this one cannot reuse as they are.
fn prepare_pins(pin_dir: &Path, ct: &ConntrackConfig) -> Result<(), EbpfError> {
    let foreign = foreign_layout_pins(pin_dir);
    if !foreign.is_empty() {
        return Err(EbpfError::PinDir(
            pin_dir.to_path_buf(),
            format!(
                "holds maps of another kpr version's layout ({}) that this version cannot                  migrate; start the kpr version that made them, or run `kpr cleanup` first                  (live flows, affinity and UDP reverse translations on this node are lost)",
                foreign.join(", ")
            ),
        ));
    }
    // The counters array grew when the tc counters were added. Its contents are only
    // statistics, so a smaller pin is replaced rather than leaving new counters uncounted.
    let counters = pin_dir.join(COUNTERS_MAP);
    if let Ok(info) = MapInfo::from_pin(&counters) {
        if info.max_entries() < COUNTER_MAX {
            tracing::info!(
                pin = %counters.display(),
                from = info.max_entries(),
                to = COUNTER_MAX,
                "re-creating the counters map with room for more counters"
            );
            std::fs::remove_file(&counters)
                .map_err(|e| EbpfError::PinDir(counters.clone(), e.to_string()))?;
        }
    }
    // The conntrack maps keep their size: re-creating them would drop every live flow.
    for (name, wanted) in [
        (CT_MAP, ct.established_entries()),
        (CT_NEW_MAP, ct.new_entries()),
        (CT6_MAP, ct.established_entries()),
        (CT6_NEW_MAP, ct.new_entries()),
    ] {
        if let Ok(info) = MapInfo::from_pin(pin_dir.join(name)) {
            if info.max_entries() != wanted {
                tracing::warn!(
                    map = name,
                    pinned = info.max_entries(),
                    wanted,
                    "the pinned conntrack map keeps its size; remove the pin to resize it"
                );
            }
        }
    }
    Ok(())
}

/// A map size as the kernel takes it (at least 1).
fn map_size(entries: usize) -> u32 {
    u32::try_from(entries).unwrap_or(u32::MAX).max(1)
}

/// Marks the devices of `devices` that the interface detector of `local` calls local (none for
/// the other detectors).
fn fill_local_devs(
    map: &mut HashMap<MapData, u32, u8>,
    local: &crate::netfilter::plan::LocalDetector,
    devices: &[String],
) -> Result<(), EbpfError> {
    let crate::netfilter::plan::LocalDetector::Interface { name, prefix } = local else {
        return Ok(());
    };
    for dev in devices {
        let is_local = if *prefix {
            dev.starts_with(name.as_str())
        } else {
            dev == name
        };
        if is_local {
            let ifindex =
                links::ifindex(dev).map_err(|e| EbpfError::Device(dev.clone(), e.to_string()))?;
            map.insert(ifindex, 1, 0)
                .map_err(|e| EbpfError::Map(kpr_common::LOCAL_DEV_MAP, e.to_string()))?;
        }
    }
    Ok(())
}

/// The `KPR_LOCAL_DETECT` global for `cfg`'s detector.
fn local_detect_mode(cfg: &EbpfConfig) -> u8 {
    use crate::netfilter::plan::LocalDetector;
    match &cfg.local {
        LocalDetector::Interface { .. } => kpr_common::LOCAL_DETECT_INTERFACE,
        LocalDetector::Cidr(_) => kpr_common::LOCAL_DETECT_CIDR,
        LocalDetector::None if cfg.local_from_node || cfg.local6.is_some() => {
            kpr_common::LOCAL_DETECT_CIDR
        }
        LocalDetector::None => kpr_common::LOCAL_DETECT_NONE,
    }
}

/// Writes the ClusterCIDR/NodeCIDR detector's IPv4 CIDR (None: no CIDR yet, nothing local).
fn set_local_net(
    map: &mut Array<MapData, kpr_common::LocalNet4>,
    net: Option<ipnet::IpNet>,
) -> Result<(), MapOpError> {
    let value = match net {
        Some(ipnet::IpNet::V4(n)) => kpr_common::LocalNet4 {
            net_be: u32::from_ne_bytes(n.network().octets()),
            mask_be: u32::from_ne_bytes(n.netmask().octets()),
            set: 1,
        },
        _ => kpr_common::LocalNet4::default(),
    };
    map.set(0, value, 0).map_err(|e| MapOpError {
        op: "set",
        map: kpr_common::LOCAL_NET_MAP,
        detail: e.to_string(),
    })
}

/// Writes the detector's IPv6 CIDR (None: none, nothing local).
fn set_local_net6(
    map: &mut Array<MapData, kpr_common::LocalNet6>,
    net: Option<ipnet::IpNet>,
) -> Result<(), MapOpError> {
    let words = |o: [u8; 16]| -> [u32; 4] {
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        [w(0), w(4), w(8), w(12)]
    };
    let value = match net {
        Some(ipnet::IpNet::V6(n)) => kpr_common::LocalNet6 {
            net_be: words(n.network().octets()),
            mask_be: words(n.netmask().octets()),
            set: 1,
        },
        _ => kpr_common::LocalNet6::default(),
    };
    map.set(0, value, 0).map_err(|e| MapOpError {
        op: "set",
        map: kpr_common::LOCAL_NET6_MAP,
        detail: e.to_string(),
    })
}

/// Adopts the cgroup link pinned at `pin` (see [`links::adopt`]): true when it is attached to
/// the cgroup and now runs `prog`, false when a new link must be attached and pinned.
fn adopt_cgroup_link(
    pin: &Path,
    cgroup_id: u64,
    prog: &aya::programs::ProgramFd,
) -> Result<bool, EbpfError> {
    match links::adopt(pin, links::Target::Cgroup(cgroup_id), prog.as_fd())
        .map_err(|e| EbpfError::Link(pin.to_path_buf(), e.to_string()))?
    {
        links::Adoption::Updated => Ok(true),
        links::Adoption::Removed(info) => {
            tracing::info!(
                pin = %pin.display(),
                ?info,
                "removed a pinned link attached elsewhere"
            );
            Ok(false)
        }
        links::Adoption::None => Ok(false),
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name)
        .ok_or(EbpfError::Map(name, "missing from object".into()))
}

fn check_fs(path: &Path, magic: i64, what: &str) -> Result<(), String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| "path contains NUL".to_string())?;
    // SAFETY: statfs writes into the zeroed struct we pass; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if st.f_type as i64 != magic {
        return Err(what.to_string());
    }
    Ok(())
}

/// In cgroup v2 every cgroup but the root has a `cgroup.type` file (cgroup-v2.rst), which
/// tells the root apart however many times and wherever the hierarchy is mounted.
fn is_cgroup2_root(path: &Path) -> bool {
    !path.join("cgroup.type").exists()
}

impl crate::dataplane::Dataplane for EbpfDataplane {
    fn sync(
        &mut self,
        desired: &DesiredState,
        full: bool,
    ) -> Result<crate::dataplane::SyncReport, crate::dataplane::DataplaneError> {
        if let Some(names) = &self.event_names {
            names.update(desired);
        }
        // The egress program's checks go on before a frontend that needs them is written (so
        // none of its sockets passes unchecked) and off once none is left.
        let checks_wanted = desired.services.values().any(|s| {
            !s.load_balancer_source_ranges.is_empty()
                || (self.drop_no_local_endpoints && s.internal_local_elsewhere)
        });
        if checks_wanted {
            self.set_sock_check_gate(true)
                .map_err(crate::ebpf::sync::SyncError::from)?;
        }
        if self.local_from_node {
            let net = desired.node_pod_cidrs.iter().find_map(|c| match c {
                ipnet::IpNet::V4(v4) => Some(ipnet::IpNet::V4(v4.trunc())),
                ipnet::IpNet::V6(_) => None,
            });
            set_local_net(&mut self.local_net, net).map_err(crate::ebpf::sync::SyncError::from)?;
            let net6 = desired.node_pod_cidrs.iter().find_map(|c| match c {
                ipnet::IpNet::V6(v6) => Some(ipnet::IpNet::V6(v6.trunc())),
                ipnet::IpNet::V4(_) => None,
            });
            set_local_net6(&mut self.local_net6, net6)
                .map_err(crate::ebpf::sync::SyncError::from)?;
        }
        let stats = if full {
            self.full_sync(desired)?
        } else {
            EbpfDataplane::sync(self, desired)?
        };
        if !self.syncer.has_socket_checks() {
            self.set_sock_check_gate(false)
                .map_err(crate::ebpf::sync::SyncError::from)?;
        }
        // Conntrack entries of backends that are gone: a whole-map walk, so on full syncs
        // (every sync period) only; until then the datapath re-balances such flows itself.
        if full || stats.deletes > 0 {
            match self.purge_stale_conntrack() {
                Ok(s) if s.stale + s.expired == 0 => {}
                Ok(s) => tracing::info!(
                    stale = s.stale,
                    expired = s.expired,
                    established = s.established,
                    new = s.new,
                    "conntrack garbage collected"
                ),
                Err(e) => tracing::warn!("purging stale conntrack entries: {e}"),
            }
        }
        // Connected UDP sockets of backends that left: a walk of every pod's namespace, so only
        // when the maps changed, and on full syncs (which also catch what changed while the
        // agent was away).
        if full || stats.writes + stats.deletes > 0 {
            let t = self.terminate_stale_udp_sockets();
            if t.destroyed > 0 || !t.failures.is_empty() {
                tracing::info!(
                    listed = t.listed,
                    stale = t.stale,
                    destroyed = t.destroyed,
                    failures = ?t.failures,
                    "connected UDP sockets of backends that left their Service"
                );
            }
        }
        // The netfilter half of this mode, in the same sync: a failure here fails the sync, and
        // the runner's full resync retries both halves. Before the first, what other modes
        // (or kube-proxy) left in this namespace goes.
        if self.table.is_some() && !std::mem::replace(&mut self.cleaned, true) {
            crate::netfilter::cleanup::other_modes(crate::netfilter::cleanup::Leftovers::Ebpf);
        }
        if let Some(table) = &mut self.table {
            table.apply_with(
                &crate::nft::frontends_without_endpoints(desired),
                crate::nft::needs_masquerade(desired, self.masquerade_local_endpoints)
                    || self.cluster_ip_masquerade,
            )?;
        }
        match &mut self.sctp {
            Some(rules) => rules.sync(desired, full)?,
            None if full && sctp::has_sctp_ports(desired) => tracing::warn!(
                "SCTP service ports are not served: this eBPF dataplane programs no SCTP rules"
            ),
            None => {}
        }
        if let Some(forward) = self.forward_accept.as_ref().filter(|_| full) {
            forward.ensure()?;
        }
        // `--devices` patterns: devices that appeared or went since the last full sync.
        if full {
            match self.refresh_devices() {
                Ok(true) => {
                    tracing::info!(devices = ?self.devices, "tc programs attached to the devices --devices names now")
                }
                Ok(false) => {}
                Err(e) => return Err(crate::dataplane::DataplaneError::EbpfDevices(e.to_string())),
            }
        }
        Ok(crate::dataplane::SyncReport {
            frontends: stats.frontends,
            backends: stats.backends,
            writes: stats.writes,
            deletes: stats.deletes,
            refused: stats.refused,
        })
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        EbpfDataplane::counters(self)
    }

    fn refused(&self) -> Vec<String> {
        self.syncer.refused().keys().cloned().collect()
    }

    fn occupancy(&self) -> Vec<crate::dataplane::MapOccupancy> {
        let (services, backends) = self.syncer.map_entries();
        vec![
            crate::dataplane::MapOccupancy {
                map: SERVICES_MAP,
                entries: services as u64,
                capacity: self.syncer.capacity().map_or(0, |c| c.services as u64),
            },
            crate::dataplane::MapOccupancy {
                map: BACKENDS_MAP,
                entries: backends as u64,
                capacity: self.syncer.capacity().map_or(0, |c| c.backends as u64),
            },
            // As of the last garbage collection (every full sync).
            crate::dataplane::MapOccupancy {
                map: CT_MAP,
                entries: self.last_sweep.established,
                capacity: u64::from(self.conntrack.capacities().0),
            },
            crate::dataplane::MapOccupancy {
                map: CT_NEW_MAP,
                entries: self.last_sweep.new,
                capacity: u64::from(self.conntrack.capacities().1),
            },
        ]
    }
}
