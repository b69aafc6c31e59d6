//! Connected UDP sockets whose backend left their Service: found and destroyed.
//!
//! The socket programs translate a connected UDP socket once, at connect(), and record it in
//! the socket reverse-NAT map (cookie, backend → frontend, rev-NAT id). kube-proxy moves such a
//! flow when its endpoint goes (it deletes the flow's conntrack entry); here nothing runs per
//! packet, so the socket would stay on the old backend forever (a DNS forwarder's upstream
//! socket, statsd, QUIC). After a sync that changed the maps, every connected UDP socket of the
//! node's namespace and of the pods' namespaces is listed (sock_diag), and each one kpr
//! translated to a backend its frontend no longer has is destroyed: its next call fails
//! (ECONNABORTED, or EDESTADDRREQ on a send), and the application's reconnect is balanced
//! anew. TCP connections stay, as kube-proxy leaves them. See [`crate::sockdiag`] for the
//! kernel side and its requirements.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kpr_common::{SockRevNat4Key, SockRevNat4Value};

use crate::netlink::NetlinkError;
use crate::sockdiag::{self, SockDiagError, UdpSocket4};

/// What one pass found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TerminationStats {
    /// Connected UDP sockets listed, in every namespace walked.
    pub listed: u64,
    /// Those kpr translated to a backend that left.
    pub stale: u64,
    pub destroyed: u64,
    /// Namespaces or sockets that failed, with why.
    pub failures: Vec<String>,
    /// The kernel cannot destroy sockets (no CONFIG_INET_DIAG_DESTROY).
    pub unsupported: bool,
}

/// The stale sockets among `listed`, by namespace: those with a reverse-NAT entry (kpr
/// translated them) whose frontend no longer serves their backend. A socket without an entry
/// was not translated by kpr (or its entry was evicted: then nothing tells, and it is left).
pub fn stale_sockets(
    listed: Vec<(Option<PathBuf>, Vec<UdpSocket4>)>,
    revnat: impl Fn(&SockRevNat4Key) -> Option<SockRevNat4Value>,
    still_serves: impl Fn(&SockRevNat4Value, (u32, u16)) -> bool,
) -> BTreeMap<Option<PathBuf>, Vec<UdpSocket4>> {
    let mut out: BTreeMap<Option<PathBuf>, Vec<UdpSocket4>> = BTreeMap::new();
    for (netns, sockets) in listed {
        for s in sockets {
            let backend = (
                u32::from_ne_bytes(s.peer.ip().octets()),
                s.peer.port().to_be(),
            );
            let key = SockRevNat4Key {
                cookie: s.cookie,
                address_be: backend.0,
                port_be: backend.1,
                pad: 0,
            };
            match revnat(&key) {
                Some(v) if !still_serves(&v, backend) => {
                    out.entry(netns.clone()).or_default().push(s)
                }
                _ => {}
            }
        }
    }
    out
}

/// One pass: lists the connected UDP sockets of this namespace and of every namespace in
/// `netns_dir`, and destroys the stale ones.
pub fn terminate_stale(
    netns_dir: Option<&Path>,
    revnat: impl Fn(&SockRevNat4Key) -> Option<SockRevNat4Value>,
    still_serves: impl Fn(&SockRevNat4Value, (u32, u16)) -> bool,
) -> TerminationStats {
    let mut stats = TerminationStats::default();
    let others = netns_dir.map(sockdiag::named_netns).unwrap_or_default();
    let mut listed = Vec::new();
    for (netns, r) in sockdiag::in_each_netns(&others, |_, diag| diag.connected_udp4()) {
        match r {
            Ok(sockets) => {
                stats.listed += sockets.len() as u64;
                listed.push((netns, sockets));
            }
            // A pod's namespace that went meanwhile is no failure.
            Err(e) if gone_meanwhile(&e) => {}
            Err(e) => stats.failures.push(describe(netns.as_deref(), &e)),
        }
    }
    let stale = stale_sockets(listed, revnat, still_serves);
    stats.stale = stale.values().map(|v| v.len() as u64).sum();
    if stale.is_empty() {
        return stats;
    }
    let paths: Vec<PathBuf> = stale.keys().flatten().cloned().collect();
    let results = sockdiag::in_each_netns(&paths, |netns, diag| {
        let mut destroyed = 0u64;
        let mut errors = Vec::new();
        for s in stale
            .get(&netns.map(Path::to_path_buf))
            .into_iter()
            .flatten()
        {
            match diag.destroy(s) {
                Ok(()) => destroyed += 1,
                Err(e) => errors.push((s.peer, e)),
            }
        }
        Ok((destroyed, errors))
    });
    for (netns, r) in results {
        match r {
            Ok((destroyed, errors)) => {
                stats.destroyed += destroyed;
                for (peer, e) in errors {
                    stats.unsupported |= matches!(
                        e,
                        SockDiagError::Netlink(NetlinkError::Kernel(libc::EOPNOTSUPP))
                    );
                    stats.failures.push(format!(
                        "{}: socket to {peer}: {e}",
                        where_(netns.as_deref())
                    ));
                }
            }
            Err(e) if gone_meanwhile(&e) => {}
            Err(e) => stats.failures.push(describe(netns.as_deref(), &e)),
        }
    }
    stats
}

/// A pod's namespace that went between the listing and the walk: no failure.
fn gone_meanwhile(e: &SockDiagError) -> bool {
    matches!(e, SockDiagError::Netns(_, io) if io.kind() == std::io::ErrorKind::NotFound)
}

fn where_(netns: Option<&Path>) -> String {
    netns.map_or_else(
        || "the node's network namespace".to_string(),
        |p| format!("network namespace {}", p.display()),
    )
}

fn describe(netns: Option<&Path>, e: &SockDiagError) -> String {
    format!("{}: {e}", where_(netns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sockets_kpr_translated_to_a_backend_that_left_are_stale() {
        let sock = |cookie, peer: &str| UdpSocket4::for_test(cookie, peer.parse().unwrap());
        let pod = Some(PathBuf::from("/var/run/netns/pod"));
        let listed = vec![
            (
                None,
                vec![sock(1, "10.244.1.11:5353"), sock(2, "10.244.1.12:5353")],
            ),
            (
                pod.clone(),
                vec![sock(3, "10.244.1.11:5353"), sock(4, "192.0.2.1:53")],
            ),
        ];
        let gone = u32::from_ne_bytes([10, 244, 1, 11]);
        let revnat = |k: &SockRevNat4Key| {
            // Socket 4 talks to an address directly: kpr never translated it.
            (k.cookie != 4).then_some(SockRevNat4Value {
                address_be: 0,
                port_be: 0,
                pad: 0,
                rev_nat_id: 7,
            })
        };
        let stale = stale_sockets(listed, revnat, |_, (address_be, _)| address_be != gone);
        let cookies: Vec<(Option<PathBuf>, Vec<u64>)> = stale
            .into_iter()
            .map(|(ns, v)| (ns, v.iter().map(|s| s.cookie).collect()))
            .collect();
        assert_eq!(cookies, vec![(None, vec![1]), (pod, vec![3])]);
    }
}
