//! What the tc datapath tests share: the dataplane loaded on a private bpffs and cgroup2
//! mount, frontends programmed straight into the maps, frames built and checked byte by byte,
//! and BPF_PROG_TEST_RUN. Each test binary uses part of it.
#![allow(dead_code)]

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use aya::maps::{HashMap, Map, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use kpr::ebpf::conntrack::ConntrackConfig;
use kpr::ebpf::{EbpfConfig, EbpfDataplane, TcConfig};
use kpr_common::{
    Backend4Value, Ct4Key, Ct4Value, Service4Key, Service4Value, BACKENDS_MAP, CT_MAP, CT_NEW_MAP,
    IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SERVICES_MAP,
};

/// Loading programs, mounting bpffs/cgroup2 and building namespaces need root; fails (never passes untested) when
/// not root or a tool is missing.
#[track_caller]
pub fn require() {
    kpr_lab::preconditions::require("the tc datapath tests", &["ip", "nft", "mount"]);
}

pub const INGRESS: &str = "kpr_tc_ingress";
pub const EGRESS: &str = "kpr_tc_egress";
/// TC_ACT_UNSPEC: "no verdict", the packet goes on (see the tc module).
pub const PASS: i32 = -1;
pub const SHOT: i32 = 2;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const NODE_PORT: u16 = 30080;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub static NEXT: AtomicUsize = AtomicUsize::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

pub fn mount(fstype: &str, target: &Path) {
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

pub fn umount(target: &Path) {
    // SAFETY: valid C string. Lazy, so a leaked fd cannot keep the test's mount around.
    unsafe { libc::umount2(cstr(target).as_ptr(), libc::MNT_DETACH) };
}

/// A bpffs and a cgroup2 mount in a temporary directory, a cgroup directory under the latter
/// and the dataplane loaded on them. Drop unloads, removes the cgroup and unmounts.
pub struct Env {
    pub dp: Option<EbpfDataplane>,
    pub bpf: PathBuf,
    pub cg_mount: PathBuf,
    pub cg: PathBuf,
    pub _dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Self::with_devices(Vec::new())
    }

    /// Loads with `devices` (which resolve in the calling thread's network namespace).
    pub fn with_devices(devices: Vec<String>) -> Env {
        Self::with(
            devices,
            ConntrackConfig {
                max_connections: 2048,
                ..ConntrackConfig::default()
            },
            |_| {},
        )
    }

    /// Loads with `devices` and `conntrack`, after `before_load` has had the pin directory
    /// (to leave pins there as an older agent would).
    pub fn with(
        devices: Vec<String>,
        conntrack: ConntrackConfig,
        before_load: impl FnOnce(&Path),
    ) -> Env {
        Self::try_with(devices, conntrack, before_load)
            .unwrap_or_else(|e| panic!("loading the dataplane: {}", e.1))
    }

    /// [`Env::with`], returning a load error (with the environment, to clean up) instead of
    /// panicking.
    pub fn try_with(
        devices: Vec<String>,
        conntrack: ConntrackConfig,
        before_load: impl FnOnce(&Path),
    ) -> Result<Env, Box<(Env, String)>> {
        Self::try_with_events(devices, conntrack, false, before_load)
    }

    /// [`Env::try_with`], with datapath events on or off.
    pub fn try_with_events(
        devices: Vec<String>,
        conntrack: ConntrackConfig,
        datapath_events: bool,
        before_load: impl FnOnce(&Path),
    ) -> Result<Env, Box<(Env, String)>> {
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
        before_load(&env.bpf);
        let dp = EbpfDataplane::load_with(
            &EbpfConfig {
                pin_dir: env.bpf.clone(),
                cgroup: cg,
                lb_capacity: Default::default(),
                allow_cgroup_root: false,
                // These tests run in the host's namespace: kpr's table is never written here.
                nftables_mark: None,
                forward_accept: None,
                datapath_events,
                // Never the host's pods: only the test's own (host) namespace is walked.
                pod_netns_dir: None,
                masquerade_all: false,
                local: kpr::netfilter::plan::LocalDetector::None,
                local6: None,
                local_from_node: false,
                drop_no_local_endpoints: false,
                masquerade_local_endpoints: false,
                sctp: None,
            },
            &TcConfig { devices, conntrack },
        );
        match dp {
            Ok(dp) => {
                env.dp = Some(dp);
                Ok(env)
            }
            Err(e) => Err(Box::new((env, e.to_string()))),
        }
    }

    pub fn dp(&mut self) -> &mut EbpfDataplane {
        self.dp.as_mut().unwrap()
    }

    pub fn services(&self) -> HashMap<MapData, Service4Key, Service4Value> {
        let m = MapData::from_pin(self.bpf.join(SERVICES_MAP)).unwrap();
        HashMap::try_from(Map::from_map_data(m).unwrap()).unwrap()
    }

    pub fn backends(&self) -> HashMap<MapData, u32, Backend4Value> {
        let m = MapData::from_pin(self.bpf.join(BACKENDS_MAP)).unwrap();
        HashMap::try_from(Map::from_map_data(m).unwrap()).unwrap()
    }

    /// Programs an external-scope frontend directly in the maps (the syncer does not set the
    /// tc flags yet); backend ids and rev-NAT ids are the test's.
    pub fn program(&self, svc: &Svc) {
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

    /// A conntrack map by name (`CT_MAP`, `CT_NEW_MAP`), through its pin.
    pub fn ct_map(&self, name: &str) -> HashMap<MapData, Ct4Key, Ct4Value> {
        let m = MapData::from_pin(self.bpf.join(name)).unwrap();
        HashMap::try_from(Map::from_map_data(m).unwrap()).unwrap()
    }

    /// The entries of one conntrack map.
    pub fn ct_entries(&self, name: &str) -> Vec<(Ct4Key, Ct4Value)> {
        self.ct_map(name).iter().map(|kv| kv.unwrap()).collect()
    }

    /// Moves every conntrack entry's last packet `secs` into the past.
    pub fn age_conntrack(&self, secs: u64) {
        for name in [CT_MAP, CT_NEW_MAP] {
            let mut m = self.ct_map(name);
            let all: Vec<_> = m.iter().map(|kv| kv.unwrap()).collect();
            for (k, mut v) in all {
                v.last_seen_ns = v.last_seen_ns.saturating_sub(secs * 1_000_000_000);
                m.insert(k, v, 0).unwrap();
            }
        }
    }

    pub fn counter(&mut self, name: &str) -> u64 {
        self.dp()
            .counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// Runs a tc program on `frame` with `mark` in the skb: (return code, frame out, mark out).
    pub fn run(&mut self, prog: &str, frame: &[u8], mark: u32) -> (i32, Vec<u8>, u32) {
        self.run_repeated(prog, frame, mark, 1)
    }

    /// [`Env::run`], `repeat` times in one BPF_PROG_TEST_RUN (on one CPU, back to back).
    pub fn run_repeated(
        &mut self,
        prog: &str,
        frame: &[u8],
        mark: u32,
        repeat: u32,
    ) -> (i32, Vec<u8>, u32) {
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
                repeat,
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

pub fn be_addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub struct Svc {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
    pub rev_nat_id: u32,
    pub affinity_timeout_s: u32,
    /// (backend id, address, port)
    pub backends: Vec<(u32, Ipv4Addr, u16)>,
}

pub fn nodeport(proto: u8, flags: u8, backends: &[(u32, [u8; 4], u16)]) -> Svc {
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

pub const B1: (u32, [u8; 4], u16) = (11, [10, 244, 1, 5], 8080);
pub const B2: (u32, [u8; 4], u16) = (12, [10, 244, 2, 6], 8080);
pub const B3: (u32, [u8; 4], u16) = (13, [10, 244, 3, 7], 9090);

// ---------------------------------------------------------------------------------------------
// Frames

#[derive(Clone, Debug)]
pub struct Spec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: &'static [u8],
    /// Send UDP with checksum 0 ("none").
    pub udp_no_csum: bool,
    /// IPv4 `frag_off` field (host order).
    pub frag_off: u16,
}

pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Spec {
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

pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Spec {
    Spec {
        proto: IPPROTO_UDP,
        tcp_flags: 0,
        payload: b"a datagram of odd length",
        ..tcp(src, sport, dst, dport, 0)
    }
}

pub fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

pub fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    sum16(&src.octets()) + sum16(&dst.octets()) + u32::from(proto) + len as u32
}

pub const ETH: usize = 14;

pub fn build(s: &Spec) -> Vec<u8> {
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
pub struct View {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
}

pub fn view(f: &[u8]) -> View {
    let ip = &f[ETH..];
    let l4 = &ip[20..];
    View {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
    }
}

pub fn l4_csum_field(f: &[u8]) -> u16 {
    let ip = &f[ETH..];
    let at = if ip[9] == IPPROTO_TCP { 16 } else { 6 };
    u16::from_be_bytes([ip[20 + at], ip[20 + at + 1]])
}

/// Recomputes both checksums of `f` from scratch and panics if either is wrong. A UDP checksum
/// of 0 ("none") is accepted here; callers check whether they expect one.
pub fn assert_checksums(f: &[u8]) {
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

pub fn backend_of(v: &View) -> (Ipv4Addr, u16) {
    (v.dst, v.dport)
}

pub fn addr(b: (u32, [u8; 4], u16)) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(b.1), b.2)
}
