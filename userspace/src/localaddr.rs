//! The addresses of this network namespace's interfaces, and a watch that follows them.
//!
//! kube-proxy serves NodePorts on the node's interface addresses (its `GetNodeIPs`), so an
//! address added to an interface serves NodePorts at once and a removed one stops. The list
//! comes from `getifaddrs(3)`; an rtnetlink socket subscribed to the address groups says when
//! to read it again (any message, or an overflow, means "re-read": cheaper to get right than
//! applying each notification).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum LocalAddrError {
    #[error("listing interface addresses: {0}")]
    List(io::Error),
    #[error("subscribing to address changes (rtnetlink): {0}")]
    Subscribe(io::Error),
}

/// Every address of every interface in this network namespace, sorted, without duplicates.
pub fn list() -> Result<Vec<IpAddr>, LocalAddrError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(LocalAddrError::List(io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut at = head;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*at };
        if let Some(ip) = unsafe { sockaddr_ip(ifa.ifa_addr) } {
            out.push(ip);
        }
        at = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// # Safety
/// `sa` is null or points to a sockaddr of the family it names.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    match i32::from((*sa).sa_family) {
        libc::AF_INET => {
            let sin = &*(sa as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            let sin6 = &*(sa as *const libc::sockaddr_in6);
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// The current addresses, and a receiver that sees every later change. A thread of its own
/// waits on rtnetlink; it ends once every receiver is gone.
pub fn watch() -> Result<watch::Receiver<Vec<IpAddr>>, LocalAddrError> {
    let socket = Subscription::open().map_err(LocalAddrError::Subscribe)?;
    // Listed after subscribing, so no change falls between the two.
    let (tx, rx) = watch::channel(list()?);
    std::thread::Builder::new()
        .name("kpr-localaddr".into())
        .spawn(move || follow(socket, tx))
        .map_err(LocalAddrError::Subscribe)?;
    Ok(rx)
}

fn follow(socket: Subscription, tx: watch::Sender<Vec<IpAddr>>) {
    while !tx.is_closed() {
        match socket.wait() {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!("reading address changes: {e}; re-reading the addresses");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        match list() {
            Ok(now) => {
                tx.send_if_modified(|addrs| {
                    if *addrs == now {
                        return false;
                    }
                    tracing::info!(addresses = ?now, "this node's addresses changed");
                    *addrs = now;
                    true
                });
            }
            Err(e) => tracing::warn!("{e}; keeping the last known addresses"),
        }
    }
}

/// An rtnetlink socket in the IPv4 and IPv6 address groups.
struct Subscription(std::os::fd::OwnedFd);

impl Subscription {
    fn open() -> io::Result<Subscription> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscalls; the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        // A timeout, so the thread notices when nobody listens any more.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: valid pointers and lengths for both calls.
        unsafe {
            if libc::bind(
                fd,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ) != 0
                || libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &timeout as *const libc::timeval as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Subscription(owned))
    }

    /// Waits up to a second: true when an address may have changed (a message, or messages
    /// lost to an overflow), false on the timeout.
    fn wait(&self) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 16 * 1024];
        // SAFETY: buf is valid for its length.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(false),
            Some(libc::ENOBUFS) => Ok(true),
            _ => Err(e),
        }
    }
}
