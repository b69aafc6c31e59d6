//! The lab's state file, teardown by name, persistent labs and stale-lab collection.
//!
//! Teardown never trusts recorded pids (they may have been reused): it kills exactly the
//! processes that are inside one of the lab's network namespaces or in the lab's cgroup tree
//! (`<cgroup2>/<prefix>` and, in a lab with a fabric, its per-node and external-client
//! children), and finds namespaces (`<prefix>-<role>`: nodes, pods, fabric, external client),
//! mounts (everything below the work directory: cgroup2, every node's bpffs) and the cgroup
//! tree by the lab's prefix.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::lab::{LabNode, Pod};
use crate::netns::{ip, netns_exists, netns_list};
use crate::LAB_RUN_DIR;

/// The prefix `cargo xtask lab up` uses for its persistent lab.
pub const PERSISTENT_PREFIX: &str = "kl-lab";

const STATE_FILE: &str = "lab.json";

/// What a lab consists of; written to `/run/kpr-lab/<prefix>/lab.json` while the lab is
/// built and whenever it changes, so that a lab can be torn down by another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    /// Pid and start time (clock ticks since boot, /proc/PID/stat field 22) of the process
    /// that built the lab; a non-kept lab whose creator is gone is stale.
    pub creator_pid: i32,
    pub creator_start: u64,
    /// Persistent lab (survives its creator); only [`down`]/[`down_all`] remove it.
    pub kept: bool,
    /// Node 1's namespace.
    pub node_ns: String,
    /// Every namespace the lab creates (recorded before creation).
    pub namespaces: Vec<String>,
    pub pods: Vec<Pod>,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// Long-running processes the lab started (informational; teardown finds processes by
    /// namespace and cgroup instead).
    pub pids: Vec<i32>,
    pub work_dir: PathBuf,
    pub cgroup_mount: PathBuf,
    /// Node 1's cgroup directory.
    pub cgroup_dir: PathBuf,
    /// Node 1's bpffs.
    pub bpffs_dir: PathBuf,
    pub labtool: PathBuf,
    /// Every node, node 1 first (node 1 repeats `node_ns`, `cgroup_dir`, `bpffs_dir`).
    #[serde(default)]
    pub nodes: Vec<LabNode>,
    /// The fabric's namespace, if the lab has one.
    #[serde(default)]
    pub fabric_ns: Option<String>,
    /// The external client, if any.
    #[serde(default)]
    pub external: Option<Pod>,
    /// The external client's cgroup directory (no kpr attaches to it).
    #[serde(default)]
    pub external_cgroup_dir: Option<PathBuf>,
}

impl LabState {
    pub(crate) fn path_for(prefix: &str) -> PathBuf {
        work_dir_for(prefix).join(STATE_FILE)
    }

    /// Reads `/run/kpr-lab/<prefix>/lab.json`.
    pub fn load(prefix: &str) -> Result<LabState> {
        let path = Self::path_for(prefix);
        let text = fs::read_to_string(&path)
            .map_err(|e| LabError::io(format!("read {}", path.display()), e))?;
        let mut state: LabState = serde_json::from_str(&text)
            .map_err(|e| LabError::Other(format!("parse {}: {e}", path.display())))?;
        if state.nodes.is_empty() {
            // A state file of a one-node lab written before labs had several nodes.
            state.nodes.push(LabNode {
                index: 1,
                name: "node1".into(),
                ns: state.node_ns.clone(),
                fabric_ip: crate::lab::node_fabric_ip(1),
                fabric_ip6: crate::lab::node_fabric_ip6(1),
                cgroup_dir: state.cgroup_dir.clone(),
                bpffs_dir: state.bpffs_dir.clone(),
            });
        }
        Ok(state)
    }

    /// Writes the state file atomically (temp file + rename).
    pub(crate) fn save(&self) -> Result<()> {
        let path = self.work_dir.join(STATE_FILE);
        let tmp = self.work_dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("LabState serializes");
        fs::write(&tmp, text).map_err(|e| LabError::io(format!("write {}", tmp.display()), e))?;
        fs::rename(&tmp, &path)
            .map_err(|e| LabError::io(format!("rename to {}", path.display()), e))
    }

    fn creator_alive(&self) -> bool {
        proc_start_time(self.creator_pid) == Some(self.creator_start)
    }
}

pub(crate) fn work_dir_for(prefix: &str) -> PathBuf {
    Path::new(LAB_RUN_DIR).join(prefix)
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
pub(crate) fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The pid encoded in a test prefix `kl-<tag>-<pid>-<n>`; `None` for other names (such as
/// the persistent `kl-lab`).
fn prefix_pid(prefix: &str) -> Option<i32> {
    let parts: Vec<&str> = prefix.split('-').collect();
    if parts.len() != 4 || parts[0] != "kl" {
        return None;
    }
    parts[3].parse::<u64>().ok()?;
    parts[2].parse().ok()
}

/// The lab prefix of a namespace named `<prefix>-<role>` with a test prefix.
fn netns_prefix(ns: &str) -> Option<String> {
    let (prefix, role) = ns.rsplit_once('-')?;
    if role.is_empty() {
        return None;
    }
    prefix_pid(prefix).map(|_| prefix.to_string())
}

/// Namespaces that belong to `prefix`: `<prefix>-<role>` with a role without dashes.
fn namespaces_of(prefix: &str) -> Vec<String> {
    let head = format!("{prefix}-");
    netns_list()
        .into_iter()
        .filter(|n| {
            n.strip_prefix(&head)
                .is_some_and(|role| !role.is_empty() && !role.contains('-'))
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn is_mount_point(dir: &Path) -> bool {
    mounts_under(dir).iter().any(|p| p == dir)
}

/// (dev, inode) of each namespace file.
fn netns_ids(names: &[String]) -> BTreeSet<(u64, u64)> {
    names
        .iter()
        .filter_map(|n| fs::metadata(format!("/var/run/netns/{n}")).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

/// `dir` and every cgroup below it, deepest first.
fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<(usize, PathBuf)>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                // In cgroupfs, the directories are exactly the child cgroups.
                if e.file_type().is_ok_and(|t| t.is_dir()) && depth < 16 {
                    walk(&e.path(), depth + 1, out);
                }
            }
        }
        out.push((depth, dir.to_path_buf()));
    }
    let mut out = Vec::new();
    if dir.is_dir() {
        walk(dir, 0, &mut out);
    }
    out.sort_by_key(|(d, _)| std::cmp::Reverse(*d));
    out.into_iter().map(|(_, p)| p).collect()
}

/// Pids of processes in any of the given namespaces or in the cgroup tree under `cgroup_dir`.
fn lab_pids(ns_ids: &BTreeSet<(u64, u64)>, cgroup_dir: Option<&Path>) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    let me = std::process::id() as i32;
    if !ns_ids.is_empty() {
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if pid == me {
                    continue;
                }
                if let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) {
                    if ns_ids.contains(&(m.dev(), m.ino())) {
                        pids.insert(pid);
                    }
                }
            }
        }
    }
    if let Some(top) = cgroup_dir {
        for dir in cgroup_tree(top) {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(
                    text.split_whitespace()
                        .filter_map(|s| s.parse::<i32>().ok())
                        .filter(|&p| p != me),
                );
            }
        }
    }
    pids
}

/// Kills (SIGKILL) every process in the lab's namespaces and cgroup tree and waits (bounded)
/// until they are gone. Zombies of the current process are reaped by their guards.
fn kill_lab_processes(namespaces: &[String], cgroup_dir: Option<&Path>, errors: &mut Vec<String>) {
    let ids = netns_ids(namespaces);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = lab_pids(&ids, cgroup_dir);
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            errors.push(format!("processes still alive in the lab: {pids:?}"));
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// rmdir a cgroup directory and the cgroups below it (deepest first).
fn remove_cgroup_tree(top: &Path, errors: &mut Vec<String>) {
    for dir in cgroup_tree(top) {
        remove_cgroup_dir(&dir, errors);
    }
}

/// rmdir a cgroup directory, retrying while it is busy (bounded).
fn remove_cgroup_dir(dir: &Path, errors: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                if Instant::now() >= deadline {
                    errors.push(format!("rmdir {}: {e}", dir.display()));
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn unmount(dir: &Path, errors: &mut Vec<String>) {
    match umount2(dir, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => errors.push(format!("umount {}: {e}", dir.display())),
    }
}

/// Removes the lab's work directory, only after nothing is mounted below it: then the
/// subdirectories users of the lab create (manifests, benchmark inputs) hold only this file
/// system's files and may be removed recursively.
fn remove_work_dir(dir: &Path, errors: &mut Vec<String>) {
    if !dir.exists() {
        return;
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        errors.push(format!(
            "not removing {}: still mounted: {left:?}",
            dir.display()
        ));
        return;
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let r = match e.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&p),
                _ => fs::remove_file(&p),
            };
            match r {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    errors.push(format!("remove {}: {err}", p.display()))
                }
                _ => {}
            }
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            errors.push(format!("rmdir {}: {e}", dir.display()))
        }
        _ => {}
    }
    let _ = fs::remove_dir(LAB_RUN_DIR);
}

/// A cgroup2 mount of our own for reaching cgroup directories of labs whose mount is gone.
struct TempCgroupMount {
    dir: PathBuf,
    parent: PathBuf,
}

impl TempCgroupMount {
    fn new() -> Result<Self> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let parent = Path::new(LAB_RUN_DIR).join(format!(".gc-{}-{n}", std::process::id()));
        let dir = parent.join("cgroup2");
        create_dir_all_retry(&dir)?;
        let guard = TempCgroupMount { dir, parent };
        mount(
            Some("none"),
            &guard.dir,
            Some("cgroup2"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| LabError::nix(format!("mount cgroup2 on {}", guard.dir.display()), e))?;
        Ok(guard)
    }
}

impl Drop for TempCgroupMount {
    fn drop(&mut self) {
        let mut errors = Vec::new();
        if is_mount_point(&self.dir) {
            unmount(&self.dir, &mut errors);
        }
        let _ = fs::remove_dir(&self.dir);
        let _ = fs::remove_dir(&self.parent);
        let _ = fs::remove_dir(LAB_RUN_DIR);
        for e in errors {
            eprintln!("kpr-lab: cleanup: {e}");
        }
    }
}

/// Tears down everything that belongs to `prefix`: processes in its namespaces and cgroup
/// tree, the namespaces, the cgroup tree, the mounts and the work directory. Returns the
/// errors met (it carries on after each).
pub(crate) fn teardown(prefix: &str, state: Option<&LabState>) -> Vec<String> {
    let mut errors = Vec::new();
    let work_dir = work_dir_for(prefix);

    let mut namespaces: Vec<String> = namespaces_of(prefix);
    if let Some(s) = state {
        for n in &s.namespaces {
            if !namespaces.contains(n) && netns_exists(n) {
                namespaces.push(n.clone());
            }
        }
    }
    // The cgroup directory: through the lab's own mount if it is still there, else through
    // a temporary mount of the (same) cgroup2 hierarchy.
    let own_mount = work_dir.join("cgroup2");
    let mut temp = None;
    let cgroup_root = if is_mount_point(&own_mount) {
        Some(own_mount.clone())
    } else {
        match TempCgroupMount::new() {
            Ok(t) => {
                let d = t.dir.clone();
                temp = Some(t);
                Some(d)
            }
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        }
    };
    let cgroup_dir = cgroup_root.map(|r| r.join(prefix)).filter(|d| d.is_dir());

    kill_lab_processes(&namespaces, cgroup_dir.as_deref(), &mut errors);

    // Pods and the external client first, then the nodes, the fabric last (deleting a
    // namespace removes the ends of the veths in it).
    let rank = |n: &String| {
        let role = n.rsplit('-').next().unwrap_or("");
        if role == "fab" {
            2
        } else if role
            .strip_prefix("node")
            .is_some_and(|i| i.chars().all(|c| c.is_ascii_digit()))
        {
            1
        } else {
            0
        }
    };
    namespaces.sort_by_key(rank);
    for ns in &namespaces {
        // Another process may be collecting the same stale lab: gone is fine.
        if let Err(e) = ip(&["netns", "del", ns]) {
            if netns_exists(ns) {
                errors.push(e.to_string());
            }
        }
    }
    if let Some(dir) = &cgroup_dir {
        remove_cgroup_tree(dir, &mut errors);
    }
    drop(temp);
    for m in mounts_under(&work_dir) {
        unmount(&m, &mut errors);
    }
    remove_work_dir(&work_dir, &mut errors);
    errors
}

/// Tears down the lab `prefix` (normally a persistent one) from its state file and by
/// name. Returns `true` if anything of it existed.
pub fn down(prefix: &str) -> Result<bool> {
    if !crate::is_root() {
        return Err(LabError::NotRoot);
    }
    validate_prefix(prefix)?;
    let state = LabState::load(prefix).ok();
    let existed =
        state.is_some() || work_dir_for(prefix).exists() || !namespaces_of(prefix).is_empty();
    if !existed {
        return Ok(false);
    }
    let errors = teardown(prefix, state.as_ref());
    if errors.is_empty() {
        Ok(true)
    } else {
        Err(LabError::Other(format!(
            "tearing down {prefix}: {}",
            errors.join("; ")
        )))
    }
}

/// Tears down every persistent lab (state file with `kept: true`) and then every stale
/// one ([`cleanup_stale`]). Labs of live processes are left alone. Returns how many labs
/// were removed.
pub fn down_all() -> Result<usize> {
    if !crate::is_root() {
        return Err(LabError::NotRoot);
    }
    let mut n = 0;
    let mut errors = Vec::new();
    for prefix in lab_dirs() {
        if let Ok(state) = LabState::load(&prefix) {
            if state.kept {
                match down(&prefix) {
                    Ok(true) => n += 1,
                    Ok(false) => {}
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
    }
    // A persistent lab whose state file was lost.
    if !namespaces_of(PERSISTENT_PREFIX).is_empty() {
        match down(PERSISTENT_PREFIX) {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    match cleanup_stale() {
        Ok(k) => n += k,
        Err(e) => errors.push(e.to_string()),
    }
    if errors.is_empty() {
        Ok(n)
    } else {
        Err(LabError::Other(errors.join("; ")))
    }
}

fn lab_dirs() -> Vec<String> {
    let Ok(rd) = fs::read_dir(LAB_RUN_DIR) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("kl-"))
        .collect()
}

/// Removes leftovers of labs whose creator is gone: work directories under
/// `/run/kpr-lab` (with their mounts), namespaces named `kl-<tag>-<pid>-<n>-*` and cgroup
/// directories named `kl-<tag>-<pid>-<n>`. Persistent labs and labs of live processes are
/// left alone. Returns how many labs were removed.
pub fn cleanup_stale() -> Result<usize> {
    if !crate::is_root() {
        return Err(LabError::NotRoot);
    }
    let mut stale: BTreeSet<String> = BTreeSet::new();
    let mut decided: BTreeSet<String> = BTreeSet::new();
    for prefix in lab_dirs() {
        decided.insert(prefix.clone());
        match LabState::load(&prefix) {
            Ok(state) => {
                if !state.kept && !state.creator_alive() {
                    stale.insert(prefix);
                }
            }
            Err(_) => {
                if prefix_pid(&prefix).is_some_and(|pid| !pid_alive(pid)) {
                    stale.insert(prefix);
                }
            }
        }
    }
    for ns in netns_list() {
        if let Some(prefix) = netns_prefix(&ns) {
            if !decided.contains(&prefix) && prefix_pid(&prefix).is_some_and(|p| !pid_alive(p)) {
                stale.insert(prefix);
            }
        }
    }
    // Cgroup directories of labs whose work directory is gone.
    let mut orphan_cgroups = Vec::new();
    if let Ok(t) = TempCgroupMount::new() {
        if let Ok(rd) = fs::read_dir(&t.dir) {
            for e in rd.flatten() {
                let Some(name) = e.file_name().into_string().ok() else {
                    continue;
                };
                if stale.contains(&name) || decided.contains(&name) {
                    continue;
                }
                if prefix_pid(&name).is_some_and(|p| !pid_alive(p)) {
                    orphan_cgroups.push(name);
                }
            }
        }
    }
    stale.extend(orphan_cgroups);

    let mut errors = Vec::new();
    for prefix in &stale {
        let state = LabState::load(prefix).ok();
        for e in teardown(prefix, state.as_ref()) {
            errors.push(format!("{prefix}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(stale.len())
    } else {
        Err(LabError::Other(format!(
            "cleaning up stale labs: {}",
            errors.join("; ")
        )))
    }
}

/// `create_dir_all`, retried: another process may remove the (empty) `/run/kpr-lab` between
/// our mkdirs.
pub(crate) fn create_dir_all_retry(dir: &Path) -> Result<()> {
    let mut last = None;
    for _ in 0..10 {
        match fs::create_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(LabError::io(format!("mkdir {}", dir.display()), e)),
        }
    }
    Err(LabError::io(
        format!("mkdir {}", dir.display()),
        last.expect("at least one attempt"),
    ))
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Prefixes are used in namespace, cgroup and directory names.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = prefix.starts_with("kl-")
        && prefix.len() <= 40
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(LabError::Other(format!(
            "invalid lab prefix {prefix:?}: must start with \"kl-\", at most 40 characters of [A-Za-z0-9_-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(prefix_pid("kl-t-123-4"), Some(123));
        assert_eq!(prefix_pid("kl-lab"), None);
        assert_eq!(prefix_pid("kl-a_b-1-x"), None);
        assert_eq!(
            netns_prefix("kl-t-123-4-node").as_deref(),
            Some("kl-t-123-4")
        );
        assert_eq!(
            netns_prefix("kl-t-123-4-be1").as_deref(),
            Some("kl-t-123-4")
        );
        assert_eq!(
            netns_prefix("kl-t-123-4-node2").as_deref(),
            Some("kl-t-123-4")
        );
        assert_eq!(
            netns_prefix("kl-t-123-4-fab").as_deref(),
            Some("kl-t-123-4")
        );
        assert_eq!(
            netns_prefix("kl-t-123-4-ext").as_deref(),
            Some("kl-t-123-4")
        );
        assert_eq!(netns_prefix("kl-lab-node"), None);
        assert_eq!(netns_prefix("kl-lab-be1"), None);
        assert!(validate_prefix("kl-lab").is_ok());
        assert!(validate_prefix("kl-t-1-2").is_ok());
        assert!(validate_prefix("x").is_err());
        assert!(validate_prefix("kl-a/b").is_err());
    }

    #[test]
    fn own_start_time() {
        let me = std::process::id() as i32;
        assert!(proc_start_time(me).is_some());
        assert_eq!(proc_start_time(me), proc_start_time(me));
    }
}
