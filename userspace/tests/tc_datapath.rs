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
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use kpr::ebpf::conntrack::ConntrackConfig;
use kpr::ebpf::{EbpfConfig, EbpfDataplane, TcConfig};
use kpr::model::{
    Backend, DesiredState, Frontend, FrontendKind, Protocol, ServicePortName, ServicePortState,
};
use kpr_common::{
    Backend4Value, Service4Key, Service4Value, BACKENDS_MAP, IPPROTO_TCP, IPPROTO_UDP,
    KPR_MASQ_MARK, SCOPE_EXTERNAL, SERVICES_MAP, SVC_FLAG_AFFINITY, SVC_FLAG_EXT_LOCAL,
    SVC_FLAG_SOURCE_RANGES,
};

/// Loading programs, mounting bpffs/cgroup2 and building namespaces need root; fails (never passes untested) when
/// not root or a tool is missing.
#[track_caller]
fn require() {
    kpr_lab::preconditions::require("the tc datapath tests", &["ip", "nft", "mount"]);
}

const INGRESS: &str = "kpr_tc_ingress";
const EGRESS: &str = "kpr_tc_egress";
/// TC_ACT_UNSPEC: "no verdict", the packet goes on (see the tc module).
const PASS: i32 = -1;
const SHOT: i32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const NODE_PORT: u16 = 30080;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn mount(fstype: &str, target: &Path) {
    let src = CString::new(fstype).unwrap();
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            cstr(target).as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount {fstype} on {}: {}",
        target.display(),
        std::io::Error::last_os_error()
    );
}

fn umount(target: &Path) {
    // SAFETY: valid C string. Lazy, so a leaked fd cannot keep the test's mount around.
    unsafe { libc::umount2(cstr(target).as_ptr(), libc::MNT_DETACH) };
}

/// A bpffs and a cgroup2 mount in a temporary directory, a cgroup directory under the latter
/// and the dataplane loaded on them. Drop unloads, removes the cgroup and unmounts.
struct Env {
    dp: Option<EbpfDataplane>,
    bpf: PathBuf,
    cg_mount: PathBuf,
    cg: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Self::with_devices(Vec::new())
    }

    /// Loads with `devices` (which resolve in the calling thread's network namespace).
    fn with_devices(devices: Vec<String>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let bpf = dir.path().join("bpf");
        let cg_mount = dir.path().join("cgroup2");
        std::fs::create_dir(&bpf).unwrap();
        std::fs::create_dir(&cg_mount).unwrap();
        mount("bpf", &bpf);
        let mut env = Env {
            dp: None,
            bpf,
            cg_mount: cg_mount.clone(),
            cg: PathBuf::new(),
            _dir: dir,
        };
        mount("cgroup2", &cg_mount);
        let cg = cg_mount.join(unique("kpr-tc"));
        std::fs::create_dir(&cg).unwrap();
        env.cg = cg.clone();
        let dp = EbpfDataplane::load_with(
            &EbpfConfig {
                pin_dir: env.bpf.clone(),
                cgroup: cg,
                allow_cgroup_root: false,
                // These tests run in the host's namespace: kpr's table is never written here.
                nftables_mark: None,
            },
            &TcConfig {
                devices,
                conntrack: ConntrackConfig {
                    max_connections: 2048,
                    ..ConntrackConfig::default()
                },
            },
        )
        .unwrap_or_else(|e| panic!("loading the dataplane: {e}"));
        env.dp = Some(dp);
        env
    }

    fn dp(&mut self) -> &mut EbpfDataplane {
        self.dp.as_mut().unwrap()
    }

    fn services(&self) -> HashMap<MapData, Service4Key, Service4Value> {
        let m = MapData::from_pin(self.bpf.join(SERVICES_MAP)).unwrap();
        HashMap::try_from(Map::from_map_data(m).unwrap()).unwrap()
    }

    fn backends(&self) -> HashMap<MapData, u32, Backend4Value> {
        let m = MapData::from_pin(self.bpf.join(BACKENDS_MAP)).unwrap();
        HashMap::try_from(Map::from_map_data(m).unwrap()).unwrap()
    }

    /// Programs an external-scope frontend directly in the maps (the syncer does not set the
    /// tc flags yet); backend ids and rev-NAT ids are the test's.
    fn program(&self, svc: &Svc) {
        let mut backends = self.backends();
        let mut services = self.services();
        for (id, ip, port) in &svc.backends {
            let v = Backend4Value {
                address_be: be_addr(*ip),
                port_be: port.to_be(),
                proto: svc.proto,
                flags: 0,
            };
            backends.insert(id, v, 0).unwrap();
        }
        let key = |slot: u16| {
            Service4Key::scoped(
                be_addr(svc.ip),
                svc.port.to_be(),
                svc.proto,
                SCOPE_EXTERNAL,
                slot,
            )
        };
        for (i, (id, _, _)) in svc.backends.iter().enumerate() {
            let v = Service4Value {
                backend_id: *id,
                rev_nat_id: svc.rev_nat_id,
                ..Default::default()
            };
            services.insert(key(i as u16 + 1), v, 0).unwrap();
        }
        let slot0 = Service4Value {
            backend_id: svc.affinity_timeout_s,
            rev_nat_id: svc.rev_nat_id,
            count: svc.backends.len() as u16,
            flags: svc.flags,
            pad: 0,
        };
        services.insert(key(0), slot0, 0).unwrap();
        // Slots beyond the count (from an earlier, larger programming) go.
        for slot in svc.backends.len() as u16 + 1..=16 {
            let _ = services.remove(&key(slot));
        }
    }

    fn counter(&mut self, name: &str) -> u64 {
        self.dp()
            .counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// Runs a tc program on `frame` with `mark` in the skb: (return code, frame out, mark out).
    fn run(&mut self, prog: &str, frame: &[u8], mark: u32) -> (i32, Vec<u8>, u32) {
        let p: &SchedClassifier = self.dp().program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        // struct __sk_buff: len, pkt_type, mark, ...; the kernel reads and writes back `mark`.
        let mut ctx_in = [0u8; 256];
        ctx_in[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat: 1,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {prog}: {e}"));
        out.truncate(r.data_size_out as usize);
        let mark = u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap());
        (r.return_value as i32, out, mark)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        drop(self.dp.take());
        if !self.cg.as_os_str().is_empty() {
            let _ = std::fs::remove_dir(&self.cg);
        }
        umount(&self.cg_mount);
        umount(&self.bpf);
    }
}

fn be_addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

struct Svc {
    ip: Ipv4Addr,
    port: u16,
    proto: u8,
    flags: u8,
    rev_nat_id: u32,
    affinity_timeout_s: u32,
    /// (backend id, address, port)
    backends: Vec<(u32, Ipv4Addr, u16)>,
}

fn nodeport(proto: u8, flags: u8, backends: &[(u32, [u8; 4], u16)]) -> Svc {
    Svc {
        ip: NODE,
        port: NODE_PORT,
        proto,
        flags,
        rev_nat_id: 1000,
        affinity_timeout_s: 0,
        backends: backends
            .iter()
            .map(|(id, ip, port)| (*id, Ipv4Addr::from(*ip), *port))
            .collect(),
    }
}

const B1: (u32, [u8; 4], u16) = (11, [10, 244, 1, 5], 8080);
const B2: (u32, [u8; 4], u16) = (12, [10, 244, 2, 6], 8080);
const B3: (u32, [u8; 4], u16) = (13, [10, 244, 3, 7], 9090);

// ---------------------------------------------------------------------------------------------
// Frames

#[derive(Clone, Debug)]
struct Spec {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    payload: &'static [u8],
    /// Send UDP with checksum 0 ("none").
    udp_no_csum: bool,
    /// IPv4 `frag_off` field (host order).
    frag_off: u16,
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Spec {
    Spec {
        src,
        dst,
        sport,
        dport,
        proto: IPPROTO_TCP,
        tcp_flags: flags,
        payload: b"hello, service",
        udp_no_csum: false,
        frag_off: 0,
    }
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Spec {
    Spec {
        proto: IPPROTO_UDP,
        tcp_flags: 0,
        payload: b"a datagram of odd length",
        ..tcp(src, sport, dst, dport, 0)
    }
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    sum16(&src.octets()) + sum16(&dst.octets()) + u32::from(proto) + len as u32
}

const ETH: usize = 14;

fn build(s: &Spec) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&s.sport.to_be_bytes());
    l4.extend_from_slice(&s.dport.to_be_bytes());
    let csum_at;
    if s.proto == IPPROTO_TCP {
        l4.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
        l4.extend_from_slice(&0u32.to_be_bytes()); // ack
        l4.push(0x50); // data offset 5
        l4.push(s.tcp_flags);
        l4.extend_from_slice(&64240u16.to_be_bytes());
        csum_at = 16;
        l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    } else {
        l4.extend_from_slice(&((8 + s.payload.len()) as u16).to_be_bytes());
        csum_at = 6;
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(s.payload);
    if !(s.proto == IPPROTO_UDP && s.udp_no_csum) {
        let mut c = !fold(pseudo(s.src, s.dst, s.proto, l4.len()) + sum16(&l4));
        if c == 0 && s.proto == IPPROTO_UDP {
            c = 0xffff;
        }
        l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&0x1234u16.to_be_bytes());
    ip.extend_from_slice(&s.frag_off.to_be_bytes());
    ip.push(64);
    ip.push(s.proto);
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&s.src.octets());
    ip.extend_from_slice(&s.dst.octets());
    let c = !fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// The addresses and ports of a frame built by [`build`] (possibly rewritten).
#[derive(Debug, PartialEq, Eq)]
struct View {
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
}

fn view(f: &[u8]) -> View {
    let ip = &f[ETH..];
    let l4 = &ip[20..];
    View {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
    }
}

fn l4_csum_field(f: &[u8]) -> u16 {
    let ip = &f[ETH..];
    let at = if ip[9] == IPPROTO_TCP { 16 } else { 6 };
    u16::from_be_bytes([ip[20 + at], ip[20 + at + 1]])
}

/// Recomputes both checksums of `f` from scratch and panics if either is wrong. A UDP checksum
/// of 0 ("none") is accepted here; callers check whether they expect one.
fn assert_checksums(f: &[u8]) {
    let ip = &f[ETH..];
    assert_eq!(fold(sum16(&ip[..20])), 0xffff, "IPv4 header checksum");
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &ip[20..tot];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if ip[9] == IPPROTO_UDP && l4_csum_field(f) == 0 {
        return;
    }
    assert_eq!(
        fold(pseudo(src, dst, ip[9], l4.len()) + sum16(l4)),
        0xffff,
        "L4 checksum of {:?}",
        view(f)
    );
}

fn backend_of(v: &View) -> (Ipv4Addr, u16) {
    (v.dst, v.dport)
}

fn addr(b: (u32, [u8; 4], u16)) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(b.1), b.2)
}

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
        .set_source_ranges(2001, &[(Ipv4Addr::UNSPECIFIED, 0)])
        .unwrap();
    let from = |ip: Ipv4Addr, port: u16| build(&tcp(ip, port, lb.ip, 443, TCP_SYN));

    let (rc, _, _) = env.run(INGRESS, &from(CLIENT, 1), 0);
    assert_eq!(rc, SHOT, "no ranges for the frontend: nobody is allowed");
    env.dp()
        .set_source_ranges(2000, &[(Ipv4Addr::new(192, 0, 2, 77), 24)])
        .unwrap();
    let (rc, out, _) = env.run(INGRESS, &from(CLIENT, 2), 0);
    assert_eq!(rc, PASS);
    assert_eq!(backend_of(&view(&out)), addr(B1));
    let (rc, _, _) = env.run(INGRESS, &from(OTHER_CLIENT, 3), 0);
    assert_eq!(rc, SHOT);
    assert_eq!(env.counter("drop_source_range"), 2);

    // Replace the ranges: now only 203.0.113.0/28.
    env.dp()
        .set_source_ranges(2000, &[(Ipv4Addr::new(203, 0, 113, 0), 28)])
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
fn a_nodeport_programmed_by_the_syncer_is_served_by_the_tc_program() {
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
    // The ClusterIP has no external scope: tc leaves it alone.
    let c = build(&tcp(
        CLIENT,
        45001,
        Ipv4Addr::new(10, 96, 0, 10),
        80,
        TCP_SYN,
    ));
    let (rc, out, _) = env.run(INGRESS, &c, 0);
    assert_eq!((rc, &out), (PASS, &c));
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
