//! The north-south tc programs (`kpr_tc_ingress`, `kpr_tc_egress`), packet by packet.
//!
//! Most tests load the real object through `EbpfDataplane::load_with` (pins on a bpffs mounted
//! in a temporary directory, socket programs on a cgroup v2 directory created under a cgroup2
//! mount in that same temporary directory, no tc devices), program frontends through the pinned
//! maps, and run the programs on crafted Ethernet/IPv4/TCP and UDP frames with
//! BPF_PROG_TEST_RUN, which attaches nothing and sends nothing. Checksums of every rewritten
//! frame are recomputed here from scratch.
//!
//! `real_traffic_*` builds three network namespaces (client, node, pod) joined by veth pairs,
//! attaches the programs to the node's client-facing veth (inside the node namespace) and
//! connects over TCP. Everything is created by and deleted with the test (guards), and traffic
//! only goes to addresses inside those namespaces.
//!
//! Root only: fails, naming what is missing, otherwise.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use kpr::model::{
    Backend, DesiredState, Frontend, FrontendKind, Protocol, ServicePortName, ServicePortState,
};
use kpr_common::{
    IPPROTO_TCP, IPPROTO_UDP, KPR_MASQ_MARK, SCOPE_EXTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_EXT_LOCAL,
    SVC_FLAG_SOURCE_RANGES,
};

mod tc_harness;
use tc_harness::*;

// ---------------------------------------------------------------------------------------------
// Packet tests

#[test]
fn nodeport_tcp_is_translated_with_valid_checksums_and_marked_for_masquerade() {
    require();
    let mut env = Env::new();
    env.program(&nodeport(IPPROTO_TCP, 0, &[B1]));
    let syn = build(&tcp(CLIENT, 40000, NODE, NODE_PORT, TCP_SYN));
    // A mark bit someone else set survives.
    let (rc, out, mark) = env.run(INGRESS, &syn, 0x1);
    assert_eq!(rc, PASS);
    assert_eq!(
        view(&out),
        View {
            src: CLIENT,
            sport: 40000,
            dst: Ipv4Addr::new(10, 244, 1, 5),
            dport: 8080
        }
    );
    assert_checksums(&out);
    assert_eq!(out.len(), syn.len());
    assert_eq!(&out[..12], &syn[..12], "Ethernet addresses untouched");
    assert_eq!(
        mark,
        0x1 | KPR_MASQ_MARK,
        "externalTrafficPolicy: Cluster → masquerade"
    );
    assert_eq!(env.counter("tc_translated"), 1);

    // The next segments of the flow (not SYNs) follow the conntrack entry.
    let ack = build(&tcp(CLIENT, 40000, NODE, NODE_PORT, TCP_ACK));
    let (rc, out, mark) = env.run(INGRESS, &ack, 0);
    assert_eq!(rc, PASS);
    assert_eq!(backend_of(&view(&out)), addr(B1));
    assert_checksums(&out);
    assert_eq!(mark, KPR_MASQ_MARK);
    assert_eq!(env.counter("tc_ct_reused"), 1);
}

#[test]
fn replies_are_translated_back_on_egress_with_valid_checksums() {
    require();
    let mut env = Env::new();
    env.program(&nodeport(IPPROTO_TCP, 0, &[B1]));
    let (rc, _, _) = env.run(
        INGRESS,
        &build(&tcp(CLIENT, 40001, NODE, NODE_PORT, TCP_SYN)),
        0,
    );
    assert_eq!(rc, PASS);
    let (bip, bport) = addr(B1);
    let synack = build(&tcp(bip, bport, CLIENT, 40001, TCP_SYN | TCP_ACK));
    let (rc, out, mark) = env.run(EGRESS, &synack, 0);
    assert_eq!(rc, PASS);
    assert_eq!(
        view(&out),
        View {
            src: NODE,
            sport: NODE_PORT,
            dst: CLIENT,
            dport: 40001
        }
    );
    assert_checksums(&out);
    assert_eq!(mark, 0, "egress sets no mark");
    assert_eq!(env.counter("tc_rev_translated"), 1);

    // Another client port of the same backend is not a tracked flow: untouched.
    let other = build(&tcp(bip, bport, CLIENT, 40002, TCP_ACK));
    let (rc, out, _) = env.run(EGRESS, &other, 0);
    assert_eq!((rc, &out), (PASS, &other));
    assert_eq!(env.counter("tc_rev_translated"), 1);
}

#[test]
fn udp_is_translated_both_ways_and_a_zero_checksum_stays_zero() {
    require();
    let mut env = Env::new();
    env.program(&nodeport(IPPROTO_UDP, 0, &[B3]));
    let (bip, bport) = addr(B3);

    let d = build(&udp(CLIENT, 5353, NODE, NODE_PORT));
    let (rc, out, mark) = env.run(INGRESS, &d, 0);
    assert_eq!(rc, PASS);
    assert_eq!(backend_of(&view(&out)), (bip, bport));
    assert_ne!(l4_csum_field(&out), 0);
    assert_checksums(&out);
    assert_eq!(mark, KPR_MASQ_MARK);
    let reply = build(&udp(bip, bport, CLIENT, 5353));
    let (rc, out, _) = env.run(EGRESS, &reply, 0);
    assert_eq!(rc, PASS);
    assert_eq!((view(&out).src, view(&out).sport), (NODE, NODE_PORT));
    assert_ne!(l4_csum_field(&out), 0);
    assert_checksums(&out);

    // No checksum: rewritten addresses and ports, checksum still "none".
    let mut s = udp(CLIENT, 5354, NODE, NODE_PORT);
    s.udp_no_csum = true;
    let (rc, out, _) = env.run(INGRESS, &build(&s), 0);
    assert_eq!(rc, PASS);
    assert_eq!(backend_of(&view(&out)), (bip, bport));
    assert_eq!(l4_csum_field(&out), 0);
    assert_checksums(&out);
    let mut r = udp(bip, bport, CLIENT, 5354);
    r.udp_no_csum = true;
    let (rc, out, _) = env.run(EGRESS, &build(&r), 0);
    assert_eq!(rc, PASS);
    assert_eq!((view(&out).src, view(&out).sport), (NODE, NODE_PORT));
    assert_eq!(l4_csum_field(&out), 0);
    assert_checksums(&out);
}

#[test]
fn a_flow_keeps_its_backend_and_flows_spread_over_all_backends() {
    require();
    let mut env = Env::new();
    env.program(&nodeport(IPPROTO_TCP, 0, &[B1, B2, B3]));
    let mut seen = BTreeSet::new();
    for port in 41000..41060 {
        let (rc, first, _) = env.run(
            INGRESS,
            &build(&tcp(CLIENT, port, NODE, NODE_PORT, TCP_SYN)),
            0,
        );
        assert_eq!(rc, PASS);
        let b = backend_of(&view(&first));
        for _ in 0..3 {
            let (_, again, _) = env.run(
                INGRESS,
                &build(&tcp(CLIENT, port, NODE, NODE_PORT, TCP_ACK)),
                0,
            );
            assert_eq!(backend_of(&view(&again)), b, "client port {port} moved");
        }
        seen.insert(b);
    }
    // 60 flows over 3 backends: missing one has probability 3·(2/3)^60 ≈ 10⁻¹⁰.
    assert_eq!(seen, BTreeSet::from([addr(B1), addr(B2), addr(B3)]));

    // The backend of a flow leaves: its next packet is re-balanced to one that is left.
    let (_, first, _) = env.run(
        INGRESS,
        &build(&tcp(CLIENT, 42000, NODE, NODE_PORT, TCP_SYN)),
        0,
    );
    let gone = backend_of(&view(&first));
    let rest: Vec<_> = [B1, B2, B3]
        .into_iter()
        .filter(|b| addr(*b) != gone)
        .collect();
    env.program(&nodeport(IPPROTO_TCP, 0, &rest));
    let (rc, out, _) = env.run(
        INGRESS,
        &build(&tcp(CLIENT, 42000, NODE, NODE_PORT, TCP_SYN)),
        0,
    );
    assert_eq!(rc, PASS);
    let now = backend_of(&view(&out));
    assert_ne!(now, gone);
    assert!(rest.iter().any(|b| addr(*b) == now));
}

#[test]
fn external_traffic_policy_local_keeps_the_client_and_drops_without_local_endpoints() {
    require();
    let mut env = Env::new();
    env.program(&nodeport(IPPROTO_TCP, SVC_FLAG_EXT_LOCAL, &[B1]));
    let syn = build(&tcp(CLIENT, 40010, NODE, NODE_PORT, TCP_SYN));
    let (rc, out, mark) = env.run(INGRESS, &syn, 0);
    assert_eq!(rc, PASS);
    assert_eq!(backend_of(&view(&out)), addr(B1));
    assert_eq!(view(&out).src, CLIENT, "the client address is kept");
    assert_eq!(mark, 0, "no masquerade with externalTrafficPolicy: Local");
    assert_checksums(&out);

    // No local endpoint: dropped.
    env.program(&nodeport(IPPROTO_TCP, SVC_FLAG_EXT_LOCAL, &[]));
    let syn = build(&tcp(CLIENT, 40011, NODE, NODE_PORT, TCP_SYN));
    let (rc, _, _) = env.run(INGRESS, &syn, 0);
    assert_eq!(rc, SHOT);
    assert_eq!(env.counter("drop_no_local_backend"), 1);

    // externalTrafficPolicy: Cluster without any endpoint: passed untouched to the stack,
    // which refuses it (no socket on the NodePort; reject rules for the other frontends).
    env.program(&nodeport(IPPROTO_TCP, 0, &[]));
    let (rc, out, mark) = env.run(INGRESS, &syn, 0);
    assert_eq!((rc, &out, mark), (PASS, &syn, 0));
    assert_eq!(env.counter("tc_no_backend_passed"), 1);
}

#[test]
fn load_balancer_source_ranges_allow_and_deny() {
    require();
    let mut env = Env::new();
    let mut lb = nodeport(IPPROTO_TCP, SVC_FLAG_SOURCE_RANGES, &[B1]);
    lb.ip = Ipv4Addr::new(198, 51, 100, 200);
    lb.port = 443;
    lb.rev_nat_id = 2000;
    env.program(&lb);
    // Ranges of another frontend must not let anyone in.
    env.dp()
        .set_source_ranges(2001, &["0.0.0.0/0".parse().unwrap()])
        .unwrap();
    let from = |ip: Ipv4Addr, port: u16| build(&tcp(ip, port, lb.ip, 443, TCP_SYN));

    let (rc, _, _) = env.run(INGRESS, &from(CLIENT, 1), 0);
    assert_eq!(rc, SHOT, "no ranges for the frontend: nobody is allowed");
    env.dp()
        .set_source_ranges(2000, &["192.0.2.77/24".parse().unwrap()])
        .unwrap();
    let (rc, out, _) = env.run(INGRESS, &from(CLIENT, 2), 0);
    assert_eq!(rc, PASS);
    assert_eq!(backend_of(&view(&out)), addr(B1));
    let (rc, _, _) = env.run(INGRESS, &from(OTHER_CLIENT, 3), 0);
    assert_eq!(rc, SHOT);
    assert_eq!(env.counter("drop_source_range"), 2);

    // Replace the ranges: now only 203.0.113.0/28.
    env.dp()
        .set_source_ranges(2000, &["203.0.113.0/28".parse().unwrap()])
        .unwrap();
    let (rc, _, _) = env.run(INGRESS, &from(OTHER_CLIENT, 4), 0);
    assert_eq!(rc, PASS);
    let (rc, _, _) = env.run(INGRESS, &from(CLIENT, 5), 0);
    assert_eq!(rc, SHOT);
    // Removing them denies everyone again.
    env.dp().set_source_ranges(2000, &[]).unwrap();
    let (rc, _, _) = env.run(INGRESS, &from(OTHER_CLIENT, 6), 0);
    assert_eq!(rc, SHOT);
}

#[test]
fn session_affinity_keeps_a_client_address_on_one_backend() {
    require();
    let mut env = Env::new();
    let mut svc = nodeport(IPPROTO_TCP, SVC_FLAG_AFFINITY, &[B1, B2, B3]);
    svc.affinity_timeout_s = 600;
    env.program(&svc);
    let mut per_client: BTreeMap<Ipv4Addr, BTreeSet<(Ipv4Addr, u16)>> = BTreeMap::new();
    for i in 0..12u8 {
        let client = Ipv4Addr::new(192, 0, 2, 10 + i);
        for port in 43000..43010 {
            let (rc, out, _) = env.run(
                INGRESS,
                &build(&tcp(client, port, NODE, NODE_PORT, TCP_SYN)),
                0,
            );
            assert_eq!(rc, PASS);
            per_client
                .entry(client)
                .or_default()
                .insert(backend_of(&view(&out)));
        }
    }
    for (client, backends) in &per_client {
        assert_eq!(backends.len(), 1, "{client} went to {backends:?}");
    }
    // Different clients are still balanced: 12 clients on one backend has probability 3⁻¹¹.
    let used: BTreeSet<_> = per_client.values().flatten().collect();
    assert!(used.len() > 1);
    assert!(env.counter("affinity_reused") >= 12 * 9);
}

#[test]
fn packets_that_are_not_for_an_external_frontend_pass_untouched() {
    require();
    let mut env = Env::new();
    env.program(&nodeport(IPPROTO_TCP, 0, &[B1]));
    let cases = [
        ("other port", build(&tcp(CLIENT, 40020, NODE, 22, TCP_SYN))),
        (
            "other protocol",
            build(&udp(CLIENT, 40020, NODE, NODE_PORT)),
        ),
        (
            "other address",
            build(&tcp(CLIENT, 40020, OTHER_CLIENT, NODE_PORT, TCP_SYN)),
        ),
        (
            "a mid-stream segment without a flow",
            build(&tcp(CLIENT, 40021, NODE, NODE_PORT, TCP_ACK)),
        ),
        ("a non-first fragment", {
            let mut s = tcp(CLIENT, 40022, NODE, NODE_PORT, TCP_SYN);
            s.frag_off = 185; // offset 1480 bytes
            build(&s)
        }),
        ("IPv6", {
            let mut f = build(&tcp(CLIENT, 40023, NODE, NODE_PORT, TCP_SYN));
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            f
        }),
        ("ARP", {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
            f.extend_from_slice(&[0u8; 28]);
            f
        }),
        ("a truncated header", {
            let f = build(&tcp(CLIENT, 40024, NODE, NODE_PORT, TCP_SYN));
            f[..ETH + 20 + 8].to_vec()
        }),
    ];
    for (what, frame) in &cases {
        for prog in [INGRESS, EGRESS] {
            let (rc, out, mark) = env.run(prog, frame, 0);
            assert_eq!((rc, &out, mark), (PASS, frame, 0), "{what} ({prog})");
        }
    }
    assert_eq!(env.counter("tc_translated"), 0);
    assert_eq!(env.counter("tc_ct_miss_not_syn"), 1);
    assert_eq!(env.counter("tc_fragment"), 1);
    assert_eq!(env.dp().conntrack_entries(), 0);
}

#[test]
fn purge_removes_the_flows_of_backends_that_left() {
    require();
    let mut env = Env::new();
    env.program(&nodeport(IPPROTO_TCP, 0, &[B1, B2]));
    for port in 44000..44020 {
        env.run(
            INGRESS,
            &build(&tcp(CLIENT, port, NODE, NODE_PORT, TCP_SYN)),
            0,
        );
    }
    assert_eq!(env.dp().conntrack_entries(), 40, "two entries per flow");
    let on_b1 = (44000..44020)
        .filter(|port| {
            let (_, out, _) = env.run(
                INGRESS,
                &build(&tcp(CLIENT, *port, NODE, NODE_PORT, TCP_ACK)),
                0,
            );
            backend_of(&view(&out)) == addr(B1)
        })
        .count();
    assert_eq!(env.dp().purge_conntrack(&HashSet::from([B1.0, B2.0])), 0);
    let purged = env.dp().purge_conntrack(&HashSet::from([B1.0]));
    assert_eq!(purged, 2 * (20 - on_b1));
    assert_eq!(env.dp().conntrack_entries(), 2 * on_b1);
    // The maps' own backends: B1 and B2 are both still there, so nothing goes.
    let s = env.dp().purge_stale_conntrack().unwrap();
    assert_eq!((s.stale, s.expired), (0, 0));
}

#[test]
fn a_nodeport_and_a_clusterip_programmed_by_the_syncer_are_served_by_the_tc_program() {
    require();
    let mut env = Env::new();
    let backend = Backend {
        ip: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5)),
        port: 8080,
    };
    let mut desired = DesiredState::default();
    for (ip, port, kind) in [
        (Ipv4Addr::new(10, 96, 0, 10), 80, FrontendKind::ClusterIp),
        (NODE, NODE_PORT, FrontendKind::NodePort),
        (Ipv4Addr::LOCALHOST, NODE_PORT, FrontendKind::NodePort),
    ] {
        desired.services.insert(
            Frontend {
                ip: IpAddr::V4(ip),
                port,
                protocol: Protocol::Tcp,
            },
            ServicePortState {
                name: ServicePortName {
                    namespace: "default".into(),
                    name: "web".into(),
                    port: String::new(),
                },
                kind,
                backends: vec![backend],
                external_backends: vec![backend],
                ..Default::default()
            },
        );
    }
    env.dp().sync(&desired).unwrap();
    let (rc, out, _) = env.run(
        INGRESS,
        &build(&tcp(CLIENT, 45000, NODE, NODE_PORT, TCP_SYN)),
        0,
    );
    assert_eq!(rc, PASS);
    assert_eq!(
        backend_of(&view(&out)),
        (Ipv4Addr::new(10, 244, 1, 5), 8080)
    );
    assert_checksums(&out);
    // The ClusterIP has no external scope: tc serves it from its internal one (ClusterIP
    // traffic routed to the node, as kube-proxy's PREROUTING rules do), without masquerade
    // (no --masquerade-all, no local-traffic detector).
    let c = build(&tcp(
        CLIENT,
        45001,
        Ipv4Addr::new(10, 96, 0, 10),
        80,
        TCP_SYN,
    ));
    let (rc, out, mark) = env.run(INGRESS, &c, 0);
    assert_eq!(rc, PASS);
    assert_eq!(
        backend_of(&view(&out)),
        (Ipv4Addr::new(10, 244, 1, 5), 8080)
    );
    assert_eq!(mark & kpr_common::KPR_MASQ_MARK, 0);
    // A localhost NodePort (internal scope only) is never served from outside (CVE-2020-8558).
    let lo = build(&tcp(CLIENT, 45002, Ipv4Addr::LOCALHOST, NODE_PORT, TCP_SYN));
    let (rc, out, _) = env.run(INGRESS, &lo, 0);
    assert_eq!((rc, &out), (PASS, &lo));
    let rev = env
        .dp()
        .rev_nat_id(NODE, NODE_PORT, IPPROTO_TCP, SCOPE_EXTERNAL)
        .unwrap();
    assert_ne!(rev, 0);
    assert_eq!(
        env.dp().rev_nat_id(
            Ipv4Addr::new(10, 96, 0, 10),
            80,
            IPPROTO_TCP,
            SCOPE_EXTERNAL
        ),
        None
    );
}

// ---------------------------------------------------------------------------------------------
// Real traffic in network namespaces

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Network namespaces of this test, deleted on drop (with their veths).
struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn add(&mut self, suffix: &str) -> String {
        let name = format!("{}-{suffix}", unique("kpr-tc"));
        ip(&["netns", "add", &name]);
        self.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs `f` on a new thread inside network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(format!("/var/run/netns/{ns}")).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `ethtool -K dev tx off` (legacy ETHTOOL_STXCSUM ioctl), in the calling thread's namespace.
fn tx_checksum_off(dev: &str) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked) and stays NUL-terminated.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    assert!(dev.len() < ifr.ifr_name.len());
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: plain socket and ioctl calls on valid pointers that outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0);
        let rc = libc::ioctl(fd, SIOCETHTOOL, &mut ifr);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(rc, 0, "ETHTOOL_STXCSUM {dev}: {err}");
    }
}

/// A TCP server in `ns` that answers each connection with the peer address it sees, until
/// `deadline`.
fn serve_peer_address(
    ns: String,
    at: SocketAddr,
    connections: usize,
) -> std::thread::JoinHandle<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        in_netns(&ns, || {
            let l = TcpListener::bind(at).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut served = 0;
            while served < connections && Instant::now() < deadline {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut buf = [0u8; 64];
                        let n = s.read(&mut buf).unwrap_or(0);
                        let _ = s.write_all(
                            format!("{}|peer={peer}", String::from_utf8_lossy(&buf[..n]))
                                .as_bytes(),
                        );
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        })
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    h
}

fn request(ns: &str, to: SocketAddr, msg: &str) -> Result<(String, SocketAddr), String> {
    in_netns(ns, || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect {to}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let peer = s.peer_addr().unwrap();
        s.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("read: {e}"))?;
        Ok((out, peer))
    })
}

#[test]
fn real_traffic_nodeport_local_and_cluster_through_veths() {
    require();
    let mut ns = Netns { names: Vec::new() };
    let client = ns.add("client");
    let node = ns.add("node");
    let pod = ns.add("pod");
    // client 192.0.2.1 ── c0 | n0 192.0.2.2 (node) 10.244.1.1 n1 | p0 ── pod 10.244.1.5
    ip(&[
        "-n", &node, "link", "add", "n0", "type", "veth", "peer", "name", "c0", "netns", &client,
    ]);
    ip(&[
        "-n", &node, "link", "add", "n1", "type", "veth", "peer", "name", "p0", "netns", &pod,
    ]);
    for (n, dev, a) in [
        (&client, "c0", "192.0.2.1/24"),
        (&node, "n0", "192.0.2.2/24"),
        (&node, "n1", "10.244.1.1/24"),
        (&pod, "p0", "10.244.1.5/24"),
    ] {
        ip(&["-n", n, "addr", "add", a, "dev", dev]);
        ip(&["-n", n, "link", "set", dev, "up"]);
    }
    ip(&["-n", &pod, "route", "add", "default", "via", "10.244.1.1"]);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    // kpr's nftables rule for marked traffic (written by hand here, in the node namespace).
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &node, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin
        .take()
        .unwrap()
        .write_all(
            b"table ip kprtest {\n chain post {\n type nat hook postrouting priority srcnat;\n \
              meta mark & 0x4000 == 0x4000 masquerade\n }\n}\n",
        )
        .unwrap();
    assert!(nft.wait().unwrap().success());

    // The node computes TCP checksums in software when it sends on n0 and n1: packets from
    // the client and the pod arrive CHECKSUM_PARTIAL (veth), and the software checksum is
    // then computed from the pseudo-header sum the tc programs updated. The receivers verify
    // it, so a wrong CHECKSUM_PARTIAL update fails the connection.
    in_netns(&node, || {
        tx_checksum_off("n0");
        tx_checksum_off("n1");
    });

    // The dataplane, attached to n0 inside the node namespace.
    let mut env = in_netns(&node, || {
        assert!(
            kpr::ebpf::tc::default_devices() == ["n0", "n1"],
            "default devices: {:?}",
            kpr::ebpf::tc::default_devices()
        );
        Env::with_devices(vec!["n0".into()])
    });
    assert_eq!(
        env.dp().tc_attachments(),
        [("n0".to_string(), "egress"), ("n0".to_string(), "ingress")]
    );
    let backend = (1, [10, 244, 1, 5], 8080);
    let mut local = nodeport(IPPROTO_TCP, SVC_FLAG_EXT_LOCAL, &[backend]);
    local.ip = Ipv4Addr::new(192, 0, 2, 2);
    env.program(&local);
    let mut cluster = nodeport(IPPROTO_TCP, 0, &[backend]);
    cluster.ip = Ipv4Addr::new(192, 0, 2, 2);
    cluster.port = 30081;
    cluster.rev_nat_id = 1001;
    env.program(&cluster);

    let server = serve_peer_address(pod.clone(), "10.244.1.5:8080".parse().unwrap(), 2);
    let (answer, peer) = request(&client, "192.0.2.2:30080".parse().unwrap(), "local").unwrap();
    assert_eq!(peer, "192.0.2.2:30080".parse::<SocketAddr>().unwrap());
    assert!(
        answer.starts_with("local|peer=192.0.2.1:"),
        "externalTrafficPolicy: Local keeps the client address: {answer}"
    );
    let (answer, _) = request(&client, "192.0.2.2:30081".parse().unwrap(), "cluster").unwrap();
    assert!(
        answer.starts_with("cluster|peer=10.244.1.1:"),
        "externalTrafficPolicy: Cluster is masqueraded by the node: {answer}"
    );
    server.join().unwrap();
    assert!(env.counter("tc_translated") >= 4);
    assert!(env.counter("tc_rev_translated") >= 4);

    // Detached on drop: the NodePort is then just a closed port on the node.
    drop(env);
    let refused = request(&client, "192.0.2.2:30080".parse().unwrap(), "x").unwrap_err();
    assert!(refused.contains("refused"), "{refused}");
}

/// Datapath events off cost nothing: `KPR_DATAPATH_EVENTS` is read-only data the verifier
/// knows, so it removes the event code, and every program as loaded with events off is
/// shorter than with them on.
#[test]
fn with_datapath_events_off_the_loaded_programs_hold_no_event_code() {
    require();
    let sizes = |events: bool| -> Vec<(&'static str, u32)> {
        let conntrack = kpr::ebpf::conntrack::ConntrackConfig {
            max_connections: 2048,
            ..Default::default()
        };
        let mut env = Env::try_with_events(Vec::new(), conntrack, events, |_| {})
            .unwrap_or_else(|e| panic!("loading with events {events}: {}", e.1));
        ["kpr_connect4", "kpr_sendmsg4", "kpr_tc_ingress"]
            .into_iter()
            .map(|name| {
                let info = env.dp().program(name).unwrap().info().unwrap();
                (name, info.size_translated().unwrap())
            })
            .collect()
    };
    let off = sizes(false);
    let on = sizes(true);
    for ((name, off), (_, on)) in off.iter().zip(&on) {
        println!("{name}: {off} bytes of instructions with events off, {on} with events on");
        assert!(off < on, "{name}: {off} bytes off, {on} on");
    }
}

/// With events on, one CPU emits at most 200 events a second; the rest are counted, so a
/// flood of drops costs a counter update each, not a record.
#[test]
fn datapath_events_are_rate_limited_per_cpu_and_the_rest_counted() {
    require();
    let conntrack = kpr::ebpf::conntrack::ConntrackConfig {
        max_connections: 2048,
        ..Default::default()
    };
    let mut env = Env::try_with_events(Vec::new(), conntrack, true, |_| {})
        .unwrap_or_else(|e| panic!("loading with events on: {}", e.1));
    // Every packet is a drop (no local endpoint), so every packet wants an event.
    env.program(&nodeport(IPPROTO_TCP, SVC_FLAG_EXT_LOCAL, &[]));
    let syn = build(&tcp(CLIENT, 40020, NODE, NODE_PORT, TCP_SYN));
    let (rc, _, _) = env.run_repeated(INGRESS, &syn, 0, 500);
    assert_eq!(rc, SHOT);
    assert_eq!(env.counter("drop_no_local_backend"), 500);
    // One run of 500 takes far less than the one-second window.
    assert_eq!(env.counter("events_suppressed"), 300);
}
