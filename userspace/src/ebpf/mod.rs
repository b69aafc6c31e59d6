//! The eBPF dataplane: loads kpr's kernel programs, pins their maps, attaches the socket-LB
//! programs to a cgroup v2 directory, and keeps the maps in sync with the model.

pub mod maps;
pub mod sync;

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use kpr_common::{Counter, BACKENDS_MAP, COUNTERS_MAP, SERVICES_MAP};

use self::maps::AyaLbMaps;
use self::sync::{LbSyncer, SyncError, SyncStats};
use crate::model::DesiredState;

/// The kernel object built by build.rs (aya-build) from dataplane-ebpf.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpr"));

/// The socket-LB programs, by function name in dataplane-ebpf.
const SOCK_PROGRAMS: [&str; 4] = [
    "kpr_connect4",
    "kpr_sendmsg4",
    "kpr_recvmsg4",
    "kpr_getpeer4",
];

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
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// Where the dataplane pins its maps and which cgroup it serves.
#[derive(Clone, Debug)]
pub struct EbpfConfig {
    /// A directory on a bpffs; maps are pinned here by name and reused across restarts.
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory whose processes get socket-level load balancing.
    pub cgroup: PathBuf,
    /// Attaching to the root of a cgroup v2 hierarchy affects every process on the host: a
    /// production DaemonSet wants that, a test must never do it. Off unless asked for.
    pub allow_cgroup_root: bool,
}

/// Loaded programs and the syncer for their maps. Dropping it detaches the programs; the
/// pinned maps stay, so a restarted agent resumes with the same ids.
pub struct EbpfDataplane {
    // Keeps programs and their links alive.
    _ebpf: Ebpf,
    syncer: LbSyncer<AyaLbMaps>,
    counters: PerCpuArray<aya::maps::MapData, u64>,
}

impl EbpfDataplane {
    pub fn load(cfg: &EbpfConfig) -> Result<Self, EbpfError> {
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

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .load(KERNEL_OBJECT)?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(EbpfError::Map(name, "program missing from object".into()))?
                .try_into()
                .map_err(|e| EbpfError::Program(name, e))?;
            prog.load().map_err(|e| EbpfError::Program(name, e))?;
            // aya attaches with a bpf_link (kernel >= 5.7). Links always coexist with other
            // programs on the cgroup (the kernel attaches them as BPF_F_ALLOW_MULTI) and the
            // kernel rejects that flag in link_create, so the mode passed is Single (flags 0).
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| EbpfError::Program(name, e))?;
        }

        let services = HashMap::try_from(take_map(&mut ebpf, SERVICES_MAP)?)
            .map_err(|e| EbpfError::Map(SERVICES_MAP, e.to_string()))?;
        let backends = HashMap::try_from(take_map(&mut ebpf, BACKENDS_MAP)?)
            .map_err(|e| EbpfError::Map(BACKENDS_MAP, e.to_string()))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, COUNTERS_MAP)?)
            .map_err(|e| EbpfError::Map(COUNTERS_MAP, e.to_string()))?;
        let syncer = LbSyncer::restore(AyaLbMaps { services, backends })?;
        Ok(Self {
            _ebpf: ebpf,
            syncer,
            counters,
        })
    }

    pub fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, SyncError> {
        self.syncer.sync(desired)
    }

    pub fn full_sync(&mut self, desired: &DesiredState) -> Result<SyncStats, SyncError> {
        self.syncer.full_sync(desired)
    }

    /// Datapath counters summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|c| {
                let total = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (c.name(), total)
            })
            .collect()
    }

    pub fn occupancy(&self) -> (usize, usize) {
        self.syncer.occupancy()
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

impl crate::runner::Dataplane for EbpfDataplane {
    fn sync(
        &mut self,
        desired: &DesiredState,
        full: bool,
    ) -> Result<crate::runner::SyncReport, Box<dyn std::error::Error + Send + Sync>> {
        let stats = if full {
            self.full_sync(desired)?
        } else {
            EbpfDataplane::sync(self, desired)?
        };
        if stats.skipped > 0 {
            tracing::warn!(
                skipped = stats.skipped,
                "IPv6 frontends are not served by the eBPF dataplane yet"
            );
        }
        Ok(crate::runner::SyncReport {
            frontends: stats.frontends,
            backends: stats.backends,
            writes: stats.writes,
            deletes: stats.deletes,
        })
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        EbpfDataplane::counters(self)
    }

    fn occupancy(&self) -> Vec<crate::runner::MapOccupancy> {
        let (services, backends) = self.syncer.map_entries();
        vec![
            crate::runner::MapOccupancy {
                map: SERVICES_MAP,
                entries: services as u64,
                capacity: u64::from(kpr_common::SERVICES_MAP_MAX),
            },
            crate::runner::MapOccupancy {
                map: BACKENDS_MAP,
                entries: backends as u64,
                capacity: u64::from(kpr_common::BACKENDS_MAP_MAX),
            },
        ]
    }
}
