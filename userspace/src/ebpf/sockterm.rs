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

use std::net::IpAddr;

use kpr_common::{SockRevNat4Key, SockRevNat4Value, SockRevNat6Key, SockRevNat6Value};

use super::sync::MapAddr;
use crate::netlink::NetlinkError;
use crate::sockdiag::{self, SockDiagError, UdpSocket};

/// The reverse-NAT maps of both families, as lookups.
pub struct RevNatLookups<F4, F6> {
    pub v4: F4,
    pub v6: F6,
}

/// Whether kpr translated `socket` to a backend its frontend no longer serves: its
/// reverse-NAT entry (IPv4 map for IPv4 peers and v4-mapped ones, IPv6 map otherwise) names the
/// frontend, and `still_serves(frontend, rev_nat_id, backend)` says whether that frontend still
/// has the backend.
pub fn socket_is_stale<F4, F6>(
    socket: &UdpSocket,
    revnat: &RevNatLookups<F4, F6>,
    still_serves: impl Fn((MapAddr, u16), u32, (MapAddr, u16)) -> bool,
) -> bool
where
    F4: Fn(&SockRevNat4Key) -> Option<SockRevNat4Value>,
    F6: Fn(&SockRevNat6Key) -> Option<SockRevNat6Value>,
{
    let port_be = socket.peer.port().to_be();
    let v4 = match socket.peer.ip() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    if let Some(a) = v4 {
        let address_be = u32::from_ne_bytes(a.octets());
        let key = SockRevNat4Key {
            cookie: socket.cookie,
            address_be,
            port_be,
            pad: 0,
        };
        return (revnat.v4)(&key).is_some_and(|v| {
            !still_serves(
                (MapAddr::V4(v.address_be), v.port_be),
                v.rev_nat_id,
                (MapAddr::V4(address_be), port_be),
            )
        });
    }
    let MapAddr::V6(address_be) = MapAddr::of(socket.peer.ip()) else {
        return false;
    };
    let key = SockRevNat6Key {
        cookie: socket.cookie,
        address_be,
        port_be,
        pad: [0; 6],
    };
    (revnat.v6)(&key).is_some_and(|v| {
        !still_serves(
            (MapAddr::V6(v.address_be), v.port_be),
            v.rev_nat_id,
            (MapAddr::V6(address_be), port_be),
        )
    })
}

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

/// The stale sockets among `listed`, by namespace, as `is_stale` judges each: one with a
/// reverse-NAT entry (kpr translated it) whose frontend no longer serves its backend. A socket
/// without an entry was not translated by kpr (or its entry was evicted: then nothing tells,
/// and it is left).
pub fn stale_sockets(
    listed: Vec<(Option<PathBuf>, Vec<UdpSocket>)>,
    is_stale: impl Fn(&UdpSocket) -> bool,
) -> BTreeMap<Option<PathBuf>, Vec<UdpSocket>> {
    let mut out: BTreeMap<Option<PathBuf>, Vec<UdpSocket>> = BTreeMap::new();
    for (netns, sockets) in listed {
        for s in sockets.into_iter().filter(|s| is_stale(s)) {
            out.entry(netns.clone()).or_default().push(s);
        }
    }
    out
}

/// One pass: lists the connected UDP sockets of this namespace and of every namespace in
/// `netns_dir`, and destroys the stale ones.
pub fn terminate_stale(
    netns_dir: Option<&Path>,
    is_stale: impl Fn(&UdpSocket) -> bool,
) -> TerminationStats {
    let mut stats = TerminationStats::default();
    let others = netns_dir.map(sockdiag::named_netns).unwrap_or_default();
    let mut listed = Vec::new();
    for (netns, r) in sockdiag::in_each_netns(&others, |_, diag| diag.connected_udp()) {
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
    let stale = stale_sockets(listed, is_stale);
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
        let sock = |cookie, peer: &str| UdpSocket::for_test(cookie, peer.parse().unwrap());
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
        let gone = MapAddr::of("10.244.1.11".parse().unwrap());
        let revnat = RevNatLookups {
            // Socket 4 talks to an address directly: kpr never translated it.
            v4: |k: &SockRevNat4Key| {
                (k.cookie != 4).then_some(SockRevNat4Value {
                    address_be: 0,
                    port_be: 0,
                    pad: 0,
                    rev_nat_id: 7,
                })
            },
            v6: |_: &SockRevNat6Key| None,
        };
        let stale = stale_sockets(listed, |s| {
            socket_is_stale(s, &revnat, |_, _, (backend, _)| backend != gone)
        });
        let cookies: Vec<(Option<PathBuf>, Vec<u64>)> = stale
            .into_iter()
            .map(|(ns, v)| (ns, v.iter().map(|s| s.cookie).collect()))
            .collect();
        assert_eq!(cookies, vec![(None, vec![1]), (pod, vec![3])]);
    }

    #[test]
    fn ipv6_and_v4_mapped_sockets_are_judged_through_their_familys_map() {
        let v6_backend: std::net::SocketAddr = "[fd00:10:244:1::b]:5353".parse().unwrap();
        let mapped: std::net::SocketAddr = "[::ffff:10.244.1.11]:5353".parse().unwrap();
        let revnat = RevNatLookups {
            v4: |k: &SockRevNat4Key| {
                (k.address_be == u32::from_ne_bytes([10, 244, 1, 11])).then_some(SockRevNat4Value {
                    address_be: u32::from_ne_bytes([10, 96, 0, 10]),
                    port_be: 53u16.to_be(),
                    pad: 0,
                    rev_nat_id: 1,
                })
            },
            v6: |k: &SockRevNat6Key| {
                (k.cookie == 6).then_some(SockRevNat6Value {
                    address_be: [0; 4],
                    port_be: 53u16.to_be(),
                    pad: 0,
                    rev_nat_id: 2,
                })
            },
        };
        // Nothing is served any more: every translated socket is stale.
        let none = |_, _, _| false;
        assert!(socket_is_stale(
            &UdpSocket::for_test(6, v6_backend),
            &revnat,
            none
        ));
        assert!(!socket_is_stale(
            &UdpSocket::for_test(7, v6_backend),
            &revnat,
            none
        ));
        // The v4-mapped peer is looked up in the IPv4 map, by its IPv4 address.
        assert!(socket_is_stale(
            &UdpSocket::for_test(9, mapped),
            &revnat,
            none
        ));
        let seen = std::cell::Cell::new(None);
        socket_is_stale(&UdpSocket::for_test(9, mapped), &revnat, |f, id, b| {
            seen.set(Some((f, id, b)));
            true
        });
        let (frontend, id, backend) = seen.get().unwrap();
        assert_eq!(id, 1);
        assert_eq!(frontend.0, MapAddr::of("10.96.0.10".parse().unwrap()));
        assert_eq!(backend.0, MapAddr::of("10.244.1.11".parse().unwrap()));
    }
}
