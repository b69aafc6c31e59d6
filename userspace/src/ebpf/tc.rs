//! The north-south programs (`kpr_tc_ingress`, `kpr_tc_egress`) on the node's external devices.
//!
//! Attachment goes through aya: on kernels >= 6.6 a TCX bpf_link (appended after any other
//! program on the device, detached when the link's fd closes), on older ones a clsact filter
//! added through netlink (detached by the link's drop, in the network namespace it was added
//! in). A clsact qdisc is added first when missing; TCX does not need it, but the fallback does
//! and it is harmless.
//!
//! Device names, like all of this, resolve in the calling thread's network namespace.

use std::collections::BTreeSet;
use std::ffi::CStr;

use aya::programs::tc::{qdisc_add_clsact, SchedClassifierLink, TcAttachType, TcError};
use aya::programs::SchedClassifier;
use aya::Ebpf;

use super::EbpfError;

/// The tc programs, by function name in dataplane-ebpf.
pub const TC_INGRESS: &str = "kpr_tc_ingress";
pub const TC_EGRESS: &str = "kpr_tc_egress";

/// The programs' attachments. Dropping this detaches them.
#[derive(Default)]
pub struct TcLinks {
    links: Vec<(String, TcAttachType, SchedClassifierLink)>,
}

impl TcLinks {
    /// (device, "ingress"/"egress") of every attachment.
    pub fn attached(&self) -> Vec<(String, &'static str)> {
        self.links
            .iter()
            .map(|(dev, ty, _)| {
                let dir = match ty {
                    TcAttachType::Egress => "egress",
                    _ => "ingress",
                };
                (dev.clone(), dir)
            })
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
/// [`load_programs`]). On error, whatever was attached is detached again.
pub(super) fn attach(ebpf: &mut Ebpf, devices: &[String]) -> Result<TcLinks, EbpfError> {
    let mut out = TcLinks::default();
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
            let id = prog
                .attach(dev, ty)
                .map_err(|e| EbpfError::Device(dev.clone(), format!("attaching {name}: {e}")))?;
            let link = prog
                .take_link(id)
                .map_err(|e| EbpfError::Program(name, e))?;
            out.links.push((dev.clone(), ty, link));
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
