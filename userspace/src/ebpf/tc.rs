//! The north-south programs (`kpr_tc_ingress`, `kpr_tc_egress`) on the node's external devices.
//!
//! On kernels with TCX (>= 6.6) each attachment is a TCX bpf_link, appended after any other
//! program on the device and pinned (`KPR_LINK_tc_<device>_<ingress|egress>`, see [`links`]),
//! so it stays while the agent is away and the next agent replaces its program atomically.
//!
//! On older kernels a clsact filter is added through netlink, at kpr's own priority and handle
//! ([`NETLINK_PRIORITY`], [`NETLINK_HANDLE`]); the agent leaves it attached when it exits, and
//! the next agent replaces the filter's program in place (a netlink replace of that filter,
//! atomic for packets), so there too a restart does not pause north-south traffic. Netlink
//! filters have no pins: `kpr cleanup` and the netfilter modes remove them by name on every
//! device ([`detach_netlink_filters`]). `KPR_TC_ATTACH=netlink` forces this path on a kernel
//! with TCX (tests). A clsact qdisc is added first when missing; TCX does not need it, but
//! the fallback does and it is harmless.
//!
//! Device names, like all of this, resolve in the calling thread's network namespace.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::os::fd::AsFd as _;
use std::path::Path;

use aya::programs::links::{FdLink, LinkOrder};
use aya::programs::tc::{
    qdisc_add_clsact, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcError,
    TcHandle,
};
use aya::programs::SchedClassifier;
use aya::util::KernelVersion;
use aya::Ebpf;

use super::{links, EbpfError};

/// The tc programs, by function name in dataplane-ebpf.
pub const TC_INGRESS: &str = "kpr_tc_ingress";
pub const TC_EGRESS: &str = "kpr_tc_egress";

/// Prefix of the tc link pins' names (after [`links::LINK_PIN_PREFIX`]).
const TC_PIN: &str = "tc_";

/// kpr's netlink filters' priority and handle: fixed, so that the next agent finds and
/// replaces them ("KP").
pub const NETLINK_PRIORITY: u16 = 0x4b50;
pub const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0x4b50);

/// The programs' attachments: pinned TCX links, or netlink filters, which stay attached when
/// this is dropped (the next agent replaces them).
#[derive(Default)]
pub struct TcLinks {
    attached: Vec<(String, TcAttachType)>,
    netlink: Vec<SchedClassifierLink>,
}

impl Drop for TcLinks {
    fn drop(&mut self) {
        // Dropping aya's link would detach the filter.
        for link in self.netlink.drain(..) {
            std::mem::forget(link);
        }
    }
}

/// Removes kpr's netlink tc filters (both programs, both directions) from every device of
/// this network namespace; returns "device direction" of each removed.
pub fn detach_netlink_filters() -> Vec<String> {
    let mut removed = Vec::new();
    for dev in interface_names() {
        for (name, ty) in [
            (TC_INGRESS, TcAttachType::Ingress),
            (TC_EGRESS, TcAttachType::Egress),
        ] {
            if aya::programs::tc::qdisc_detach_program(&dev, ty, name).is_ok() {
                removed.push(format!("{dev} {}", dir_name(ty)));
            }
        }
    }
    removed
}

/// Every interface name in this network namespace (if_nameindex(3)).
fn interface_names() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return out;
    }
    let mut cur = list;
    // SAFETY: walking the array up to its terminating entry.
    unsafe {
        while (*cur).if_index != 0 {
            if !(*cur).if_name.is_null() {
                out.push(
                    CStr::from_ptr((*cur).if_name)
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            cur = cur.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Whether tc programs attach with TCX links (kernel >= 6.6, unless `KPR_TC_ATTACH=netlink`).
/// The fallback is said once, naming the kernel and what it means for restarts.
fn use_tcx() -> bool {
    if std::env::var("KPR_TC_ATTACH").is_ok_and(|v| v == "netlink") {
        return false;
    }
    let current = KernelVersion::current();
    let tcx = current
        .as_ref()
        .is_ok_and(|v| *v >= KernelVersion::new(6, 6, 0));
    if !tcx {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::info!(
                kernel = ?current.ok(),
                "this kernel has no TCX links (6.6 and later): the tc programs attach as \
                 netlink filters on a clsact qdisc instead, which stay attached across restarts \
                 until `kpr cleanup` or another mode removes them"
            )
        });
    }
    tcx
}

fn dir_name(ty: TcAttachType) -> &'static str {
    match ty {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

impl TcLinks {
    /// (device, "ingress"/"egress") of every attachment.
    pub fn attached(&self) -> Vec<(String, &'static str)> {
        self.attached
            .iter()
            .map(|(dev, ty)| (dev.clone(), dir_name(*ty)))
            .collect()
    }
}

impl std::fmt::Debug for TcLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.attached()).finish()
    }
}

/// Loads the tc programs into the kernel (verifier) if they are not loaded yet.
pub(super) fn load_programs(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    for name in [TC_INGRESS, TC_EGRESS] {
        let prog = classifier(ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| EbpfError::Program(name, e))?;
        }
    }
    Ok(())
}

/// Attaches ingress and egress programs to every device in `devices` (already loaded with
/// [`load_programs`]), adopting the links pinned in `pin_dir` where they are, and removes the
/// pinned links of devices no longer in `devices`.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    devices: &[String],
    pin_dir: &Path,
) -> Result<TcLinks, EbpfError> {
    let tcx = use_tcx();
    let mut out = TcLinks::default();
    let mut wanted = BTreeSet::new();
    for dev in devices {
        match qdisc_add_clsact(dev) {
            Ok(()) => {}
            // EEXIST: there already is one (ours from a previous run, or another user's).
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(TcError::AlreadyAttached) => {}
            Err(e) => {
                return Err(EbpfError::Device(
                    dev.clone(),
                    format!("adding clsact: {e}"),
                ))
            }
        }
        // Egress first: once ingress translates a flow, its replies must already be translated
        // back.
        for (name, ty) in [
            (TC_EGRESS, TcAttachType::Egress),
            (TC_INGRESS, TcAttachType::Ingress),
        ] {
            let prog = classifier(ebpf, name)?;
            let device_error = |e: String| EbpfError::Device(dev.clone(), e);
            if !tcx {
                // The filter an earlier agent left: its program replaced in place. None (or
                // one the kernel will not replace): a new filter at kpr's priority and handle.
                let earlier =
                    SchedClassifierLink::attached(dev, ty, NETLINK_PRIORITY, NETLINK_HANDLE, None)
                        .map_err(|e| device_error(e.to_string()))?;
                let id = match prog.attach_to_link(earlier) {
                    Ok(id) => id,
                    Err(_) => prog
                        .attach_with_options(
                            dev,
                            ty,
                            TcAttachOptions::Netlink(NlOptions {
                                priority: NETLINK_PRIORITY,
                                handle: NETLINK_HANDLE,
                                ..Default::default()
                            }),
                        )
                        .map_err(|e| device_error(format!("attaching {name}: {e}")))?,
                };
                let link = prog
                    .take_link(id)
                    .map_err(|e| EbpfError::Program(name, e))?;
                out.netlink.push(link);
                out.attached.push((dev.clone(), ty));
                continue;
            }
            let pin_name = format!("{TC_PIN}{dev}_{}", dir_name(ty));
            let pin = links::pin_path(pin_dir, &pin_name);
            wanted.insert(pin_name);
            let ifindex = links::ifindex(dev).map_err(|e| device_error(e.to_string()))?;
            let fd = prog.fd().map_err(|e| EbpfError::Program(name, e))?;
            let link_error = |e: String| EbpfError::Link(pin.clone(), e);
            match links::adopt(&pin, links::Target::Tcx(ifindex), fd.as_fd())
                .map_err(|e| link_error(e.to_string()))?
            {
                links::Adoption::Updated => {
                    out.attached.push((dev.clone(), ty));
                    continue;
                }
                links::Adoption::Removed(info) => tracing::info!(
                    pin = %pin.display(),
                    ?info,
                    "removed a pinned tc link attached elsewhere"
                ),
                links::Adoption::None => {}
            }
            let id = prog
                .attach_with_options(dev, ty, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| device_error(format!("attaching {name}: {e}")))?;
            let link = prog
                .take_link(id)
                .map_err(|e| EbpfError::Program(name, e))?;
            FdLink::try_from(link)
                .map_err(|e| link_error(e.to_string()))?
                .pin(&pin)
                .map_err(|e| link_error(e.to_string()))?;
            out.attached.push((dev.clone(), ty));
        }
    }
    // Devices a previous agent served and this one does not (`--devices` changed).
    for name in links::pinned_names(pin_dir) {
        if name.starts_with(TC_PIN) && !wanted.contains(&name) {
            let pin = links::pin_path(pin_dir, &name);
            std::fs::remove_file(&pin).map_err(|e| EbpfError::Link(pin.clone(), e.to_string()))?;
            tracing::info!(pin = %pin.display(), "detached tc programs from a device no longer served");
        }
    }
    Ok(out)
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::Map(name, "program missing from object".into()))?
        .try_into()
        .map_err(|e| EbpfError::Program(name, e))
}

/// The devices north-south traffic arrives on when `--devices` is not given: every interface
/// that is up, is not a loopback, is an Ethernet device (the tc programs expect an Ethernet
/// header) and carries an IPv4 address other than a link-local one, i.e. the devices that
/// hold the node's addresses. Sorted by name.
///
/// Read with getifaddrs(3), which asks the kernel over netlink in the caller's network
/// namespace (unlike /sys/class/net, which shows the namespace /sys was mounted in). Its
/// AF_PACKET entries give each device's hardware type, its AF_INET entries the addresses.
/// The devices `specs` (`--devices`) name now: a name as given, a name ending in `+` every
/// device of this namespace with that prefix (sorted, without duplicates).
pub fn resolve_devices(specs: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut all: Option<Vec<String>> = None;
    for spec in specs {
        match spec.strip_suffix('+') {
            None => out.push(spec.clone()),
            Some(prefix) => {
                let names = all.get_or_insert_with(interface_names);
                out.extend(names.iter().filter(|n| n.starts_with(prefix)).cloned());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Whether `specs` has a prefix pattern (so the devices can change while the agent runs).
pub fn has_patterns(specs: &[String]) -> bool {
    specs.iter().any(|s| s.ends_with('+'))
}

pub fn default_devices() -> Vec<String> {
    let mut ethernet = BTreeSet::new();
    let mut with_ipv4 = BTreeSet::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "getifaddrs failed: no default devices for the tc programs"
        );
        return Vec::new();
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        let flags = ifa.ifa_flags;
        if flags & libc::IFF_UP as u32 == 0 || flags & libc::IFF_LOOPBACK as u32 != 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let label = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        // An address with a label ("eth0:1") belongs to the device before the colon.
        let name = label.split(':').next().unwrap_or_default().to_string();
        // SAFETY: ifa_addr points at a sockaddr whose family says what follows.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_PACKET => {
                // SAFETY: AF_PACKET entries carry a sockaddr_ll.
                let ll = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_ll) };
                if ll.sll_hatype == libc::ARPHRD_ETHER {
                    ethernet.insert(name);
                }
            }
            libc::AF_INET => {
                // SAFETY: AF_INET entries carry a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_link_local() && !ip.is_loopback() {
                    with_ipv4.insert(name);
                }
            }
            _ => {}
        }
    }
    // SAFETY: ifap came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    ethernet.intersection(&with_ipv4).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_pattern_names_every_device_with_its_prefix() {
        // Every namespace has "lo"; a name is kept as given, present or not.
        let got = resolve_devices(&["lo+".into(), "kpr-absent0".into(), "lo".into()]);
        assert_eq!(got, ["kpr-absent0", "lo"]);
        assert!(resolve_devices(&["kpr-none-such+".into()]).is_empty());
        assert!(has_patterns(&["eth0".into(), "tap+".into()]));
        assert!(!has_patterns(&["eth0".into()]));
    }
}
