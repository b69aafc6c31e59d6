//! Attachments that outlive the agent.
//!
//! kube-proxy's rules stay in the kernel while kube-proxy restarts; kpr's programs must too, or
//! every restart (a crash, an upgrade, a rolling update of the DaemonSet) drops the node's
//! Service traffic until the new agent has attached again. So every attachment is a bpf_link
//! pinned in the pin directory (`KPR_LINK_<program>` for the cgroup hooks,
//! `KPR_LINK_tc_<device>_<ingress|egress>` for TCX), next to the pinned maps the programs use.
//! A pinned link stays attached after the agent exits, whatever the signal.
//!
//! At start the agent adopts each pinned link that is attached where it should be (the same
//! cgroup, the same device) and replaces its program with the one it just loaded, with
//! BPF_LINK_UPDATE: atomic, so no packet and no socket call meets no program. A pin attached
//! elsewhere (another `--cgroup-path`, a device that is gone) is removed, which detaches it,
//! and a new link is attached and pinned. Removing the pins (`kpr cleanup`, or another proxy
//! mode starting) detaches the programs.
//!
//! aya 0.14 has no update for cgroup links and no way to read a link's target, so the few
//! bpf(2) commands needed are issued here directly.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

/// Every link pin's name starts with this (and so with `KPR_`, which `kpr cleanup` removes).
pub const LINK_PIN_PREFIX: &str = "KPR_LINK_";

/// bpf(2) commands (include/uapi/linux/bpf.h). Pinning a new link goes through aya.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `enum bpf_link_type`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// Where a link should be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A cgroup v2 directory, by its id (the directory's inode number).
    Cgroup(u64),
    /// A device's TCX hook, by interface index (in the agent's network namespace).
    Tcx(u32),
}

/// A link's kernel view (`struct bpf_link_info`, the part kpr reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// None: a link type kpr does not create, or a link whose target is gone.
    pub target: Option<Target>,
}

/// The pin path of a link.
pub fn pin_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("{LINK_PIN_PREFIX}{name}"))
}

/// What [`adopt`] did with a pin.
#[derive(Debug, PartialEq, Eq)]
pub enum Adoption {
    /// The pinned link is attached to the target and now runs the new program.
    Updated,
    /// There was no pin.
    None,
    /// The pin was attached elsewhere (or its target is gone); it was removed.
    Removed(LinkInfo),
}

/// Adopts the link pinned at `pin` if it is attached to `target`: its program becomes `prog`.
/// A pin attached to anything else is removed (the link detaches once nothing holds it).
pub fn adopt(pin: &Path, target: Target, prog: BorrowedFd<'_>) -> io::Result<Adoption> {
    let link = match obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Adoption::None),
        Err(e) => return Err(e),
    };
    let info = link_info(link.as_fd())?;
    if info.target != Some(target) {
        std::fs::remove_file(pin)?;
        return Ok(Adoption::Removed(info));
    }
    link_update(link.as_fd(), prog)?;
    Ok(Adoption::Updated)
}

/// The kernel's view of the link pinned at `pin`.
pub fn pinned_info(pin: &Path) -> io::Result<LinkInfo> {
    let fd = obj_get(pin)?;
    link_info(fd.as_fd())
}

/// The names (after [`LINK_PIN_PREFIX`]) of the link pins in `pin_dir`.
pub fn pinned_names(pin_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(LINK_PIN_PREFIX)
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

/// Removes every link pin in `pin_dir` (detaching kpr's programs); returns the paths removed.
pub fn unpin_all(pin_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for name in pinned_names(pin_dir) {
        let p = pin_path(pin_dir, &name);
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// The id of the cgroup v2 directory `dir` (its inode number, which is what the kernel
/// reports as a cgroup link's `cgroup_id`).
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(dir)?.ino())
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14), as
/// the programs' `bpf_get_netns_cookie` reads it.
pub fn netns_cookie() -> io::Result<u64> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: a plain socket call; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is valid for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The interface index of `dev` in the calling thread's network namespace.
pub fn ifindex(dev: &str) -> io::Result<u32> {
    let name = CString::new(dev).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    let path = cpath(pin)?;
    // union bpf_attr, obj: { pathname u64, bpf_fd u32, file_flags u32, path_fd s32 }.
    let mut attr = [0u64; 3];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type u32, id u32, prog_id u32, then (8-aligned, at byte 16) a
    // union: cgroup { cgroup_id u64, attach_type u32 }, tcx { ifindex u32, attach_type u32 }.
    let mut info = [0u64; 16];
    // union bpf_attr, info: { bpf_fd u32, info_len u32, info u64 }.
    let mut attr = [0u64; 2];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let link_type = info[0] as u32;
    let id = (info[0] >> 32) as u32;
    let prog_id = info[1] as u32;
    let target = match link_type {
        BPF_LINK_TYPE_CGROUP if info[2] != 0 => Some(Target::Cgroup(info[2])),
        BPF_LINK_TYPE_TCX if info[2] as u32 != 0 => Some(Target::Tcx(info[2] as u32)),
        _ => None,
    };
    Ok(LinkInfo {
        id,
        prog_id,
        target,
    })
}

fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // union bpf_attr, link_update: { link_fd u32, new_prog_fd u32, flags u32, old_prog_fd u32 }.
    let mut attr = [0u64; 2];
    attr[0] = u64::from(link.as_raw_fd() as u32) | (u64::from(prog.as_raw_fd() as u32) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded union bpf_attr prefix of the size passed; the kernel
    // copies at most that many bytes and writes only into memory it points at that we own
    // (the info buffer, alive for this call).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
