//! IPv6 and dual-stack Services in every proxy mode, over real sockets in a dual-stack lab
//! (every pod has an IPv4 and an IPv6 address; nodes and the external client have both on the
//! fabric).
//!
//! The Services mirror the IPv4 ones of `clusterip.rs`: a SingleStack IPv6 Service, and a
//! RequireDualStack one with a ClusterIP of each family and an EndpointSlice per family, as
//! the EndpointSlice controller writes them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kpr_lab::kpr::{assert_refused, kpr_path, Kpr, ProxyMode, Refusal};
use kpr_lab::tool::UdpMode;
use kpr_lab::{per_mode, require_lab, write_manifest, Lab, LabSpec, Pod};

const VIP6: &str = "fd00:10:96::10";
const DUAL4: &str = "10.96.0.20";
const DUAL6: &str = "fd00:10:96::20";

/// One EndpointSlice of `service` for `family` (`IPv4`/`IPv6`) with ports http (TCP 8080) and
/// dns (UDP 5353) and the given ready addresses.
fn slice(service: &str, family: &str, addresses: &[String]) -> String {
    let mut y = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {family}\nports:\n  - {{name: http, protocol: TCP, port: 8080}}\n  - {{name: dns, protocol: UDP, port: 5353}}\n",
        family.to_lowercase()
    );
    if addresses.is_empty() {
        y += "endpoints: []\n";
    } else {
        y += "endpoints:\n";
        for a in addresses {
            y += &format!("  - addresses: [\"{a}\"]\n    conditions: {{ready: true}}\n");
        }
    }
    y
}

/// A Service `demo/<name>` with http (80 → 8080/TCP) and dns (53 → 5353/UDP), `extra` spec
/// lines (clusterIPs, ipFamilies, ...).
fn service(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n{extra}  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}\n  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}\n"
    )
}

/// `echo6`: SingleStack IPv6 on [`VIP6`] with `backends`' IPv6 addresses.
fn single_stack6(backends: &[&Pod]) -> String {
    let ips: Vec<String> = backends.iter().map(|p| p.ip6.to_string()).collect();
    service(
        "echo6",
        &format!("  clusterIP: \"{VIP6}\"\n  clusterIPs: [\"{VIP6}\"]\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n"),
    ) + &slice("echo6", "IPv6", &ips)
}

/// `dual`: RequireDualStack on [`DUAL4`] and [`DUAL6`], one slice per family.
fn dual_stack(backends: &[&Pod]) -> String {
    let v4: Vec<String> = backends.iter().map(|p| p.ip.to_string()).collect();
    let v6: Vec<String> = backends.iter().map(|p| p.ip6.to_string()).collect();
    service(
        "dual",
        &format!("  clusterIP: {DUAL4}\n  clusterIPs: [{DUAL4}, \"{DUAL6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n"),
    ) + &slice("dual", "IPv4", &v4)
        + &slice("dual", "IPv6", &v6)
}

struct Setup {
    lab: Lab,
    kpr: Kpr,
    #[allow(dead_code)]
    dir: PathBuf,
}

impl Setup {
    /// A lab (with the external client if `external`) and kpr in `mode` on the manifest
    /// `make(backends)` makes, with `extra` flags.
    fn new(
        tag: &str,
        mode: ProxyMode,
        external: bool,
        extra: &[&str],
        make: impl Fn(&[&Pod]) -> String,
    ) -> Setup {
        require_lab(tag);
        let lab = Lab::up(LabSpec {
            prefix: Lab::unique_prefix(tag),
            external_client: external,
            ..LabSpec::default()
        })
        .expect("lab up");
        let dir = lab.manifest_dir().unwrap();
        let backends: Vec<&Pod> = lab.backends().iter().collect();
        write_manifest(&dir.join("svc.yaml"), &make(&backends));
        let mut args = mode.args().to_vec();
        args.extend(extra);
        let kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &args).expect("kpr start");
        Setup { lab, kpr, dir }
    }

    fn client(&self) -> Pod {
        self.lab.clients()[0].clone()
    }

    fn backend_names(&self) -> Vec<String> {
        self.lab.backends().iter().map(|p| p.name.clone()).collect()
    }

    /// Waits until kpr's status shows `frontend` with every backend's address of the
    /// frontend's family on `port`.
    fn wait_programmed(&mut self, frontend: &str, port: u16) {
        let v6 = frontend.starts_with('[');
        let want: Vec<String> = self
            .lab
            .backends()
            .iter()
            .map(|p| {
                if v6 {
                    format!("[{}]:{port}", p.ip6)
                } else {
                    format!("{}:{port}", p.ip)
                }
            })
            .collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        self.kpr.wait_for_backends(frontend, &want).unwrap();
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Every backend answered some of `counts`.
#[track_caller]
fn assert_all_answered(
    counts: &std::collections::BTreeMap<String, u64>,
    backends: &[String],
    what: &str,
) {
    for be in backends {
        assert!(
            counts.get(be).copied().unwrap_or(0) > 0,
            "{what}: {be} never answered: {counts:?}"
        );
    }
}

per_mode! {
    /// An IPv6 ClusterIP over TCP (getpeername shows the ClusterIP) and UDP, unconnected
    /// (replies come from the ClusterIP) and connected, reaches every backend, which sees the
    /// pod's own IPv6 address.
    fn an_ipv6_clusterip_reaches_every_backend_over_tcp_and_udp(mode) {
        let mut s = Setup::new("v6cip", mode, false, &[], single_stack6);
        s.wait_programmed(&format!("[{VIP6}]:80/tcp"), 8080);
        s.wait_programmed(&format!("[{VIP6}]:53/udp"), 5353);
        let client = s.client();
        let backends = s.backend_names();
        let r = s.lab.tcp_spread(&client, addr(&format!("[{VIP6}]:80")), 150).unwrap();
        assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
        assert_all_answered(&r.counts, &backends, "TCP over IPv6");
        assert_eq!(r.ports.get("8080"), Some(&150), "{r:?}");
        assert_eq!(
            r.peers.keys().collect::<Vec<_>>(),
            vec![&format!("[{VIP6}]:80")],
            "getpeername: {r:?}"
        );
        assert_eq!(
            r.clients.keys().collect::<Vec<_>>(),
            vec![&client.ip6.to_string()],
            "the backends saw: {r:?}"
        );

        let r = s
            .lab
            .udp_spread(&client, addr(&format!("[{VIP6}]:53")), 150, UdpMode::SocketPerRequest)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_all_answered(&r.counts, &backends, "unconnected UDP over IPv6");
        assert_eq!(
            r.sources.keys().collect::<Vec<_>>(),
            vec![&format!("[{VIP6}]:53")],
            "reply sources: {r:?}"
        );
        let r = s
            .lab
            .udp_spread(&client, addr(&format!("[{VIP6}]:53")), 20, UdpMode::Connected)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.counts.len(), 1, "a connected socket keeps one backend: {r:?}");
    }
}

per_mode! {
    /// A RequireDualStack Service is reached over both families from one pod, each family on
    /// its own ClusterIP and its own endpoints.
    fn a_dual_stack_service_is_reached_over_both_families_from_one_pod(mode) {
        let mut s = Setup::new("dual", mode, false, &[], dual_stack);
        s.wait_programmed(&format!("{DUAL4}:80/tcp"), 8080);
        s.wait_programmed(&format!("[{DUAL6}]:80/tcp"), 8080);
        let client = s.client();
        let backends = s.backend_names();
        for (vip, seen) in [
            (format!("{DUAL4}:80"), client.ip.to_string()),
            (format!("[{DUAL6}]:80"), client.ip6.to_string()),
        ] {
            let r = s.lab.tcp_spread(&client, addr(&vip), 90).unwrap();
            assert_eq!(r.errors, 0, "{vip}: {r:?}\n{}", s.kpr.log());
            assert_all_answered(&r.counts, &backends, &vip);
            assert_eq!(r.clients.keys().collect::<Vec<_>>(), vec![&seen], "{vip}: {r:?}");
        }
    }
}

per_mode! {
    /// An IPv6 ClusterIP without endpoints is refused at once (kube-proxy's REJECT, ICMPv6
    /// port unreachable), counted by the refusing layer; it is not left to time out.
    fn an_ipv6_clusterip_without_endpoints_is_rejected(mode) {
        let mut s = Setup::new("v6rej", mode, false, &[], |_| single_stack6(&[]));
        s.kpr
            .wait_for_frontend(&format!("[{VIP6}]:80/tcp"), "no backends", |f| {
                f.backends.is_empty()
            })
            .unwrap();
        let before = s.kpr.refusals(mode, Refusal::NoEndpoints);
        let client = s.client();
        let r = s
            .lab
            .connect_once(&client, addr(&format!("[{VIP6}]:80")), Duration::from_secs(2))
            .unwrap();
        assert_eq!(r.error.as_deref(), Some("ECONNREFUSED"), "{r:?}\n{}", s.kpr.log());
        let after = s.kpr.refusals(mode, Refusal::NoEndpoints);
        assert_refused(before, after, 1, "IPv6 ClusterIP without endpoints");
    }
}

per_mode! {
    /// A dual-stack socket reaching an IPv4 ClusterIP through its IPv4-mapped IPv6 address
    /// (`::ffff:10.96.0.20`): translated through the IPv4 tables, over TCP and unconnected UDP,
    /// and the application sees the mapped ClusterIP as its peer and reply source.
    fn a_v4_mapped_address_from_an_ipv6_socket_reaches_an_ipv4_clusterip(mode) {
        let mut s = Setup::new("v4map", mode, false, &[], dual_stack);
        s.wait_programmed(&format!("{DUAL4}:80/tcp"), 8080);
        s.wait_programmed(&format!("{DUAL4}:53/udp"), 5353);
        let client = s.client();
        let backends = s.backend_names();
        let mapped = format!("[::ffff:{DUAL4}]");
        let r = s.lab.tcp_spread(&client, addr(&format!("{mapped}:80")), 90).unwrap();
        assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
        assert_all_answered(&r.counts, &backends, "TCP to a v4-mapped ClusterIP");
        assert_eq!(
            r.peers.keys().collect::<Vec<_>>(),
            vec![&format!("{mapped}:80")],
            "getpeername: {r:?}"
        );
        // The packets are IPv4: the backends see the pod's IPv4 address.
        assert_eq!(
            r.clients.keys().collect::<Vec<_>>(),
            vec![&client.ip.to_string()],
            "{r:?}"
        );
        let r = s
            .lab
            .udp_spread(&client, addr(&format!("{mapped}:53")), 90, UdpMode::SocketPerRequest)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_all_answered(&r.counts, &backends, "UDP to a v4-mapped ClusterIP");
        assert_eq!(
            r.sources.keys().collect::<Vec<_>>(),
            vec![&format!("{mapped}:53")],
            "reply sources: {r:?}"
        );
    }
}

per_mode! {
    /// A connected UDP socket to an IPv6 ClusterIP does not stay on a backend that left (see
    /// `clusterip::a_connected_udp_socket_leaves_a_removed_backend`): the netfilter modes delete
    /// its conntrack entry, the eBPF mode destroys the socket (its next call fails with
    /// ECONNABORTED or EDESTADDRREQ) and the client's reconnect is balanced anew.
    fn a_connected_udp_socket_to_an_ipv6_clusterip_leaves_a_removed_backend(mode) {
        let mut s = Setup::new("v6udpc", mode, false, &[], single_stack6);
        let dns = format!("[{VIP6}]:53/udp");
        s.wait_programmed(&dns, 5353);
        let client = s.client();
        let stop = s.lab.work_dir().join("stop-flow");
        let progress = s.lab.work_dir().join("flow-progress");
        let read = || -> (usize, String) {
            let t = std::fs::read_to_string(&progress).unwrap_or_default();
            let (n, b) = t.trim().split_once(' ').unwrap_or(("0", "-"));
            (n.parse().unwrap_or(0), b.to_string())
        };
        let wait_for = |at_least: usize| -> (usize, String) {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let p = read();
                if p.0 >= at_least || std::time::Instant::now() > deadline {
                    return p;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let target = format!("[{VIP6}]:53");
        let (first, programmed, r) = std::thread::scope(|scope| {
            let running = scope.spawn(|| {
                s.lab.labtool_json::<kpr_lab::tool::UdpSpread>(
                    &client,
                    &[
                        "udp-spread", "--target", &target, "--count", "1200", "--connected",
                        "--interval-ms", "25", "--timeout-ms", "500",
                        "--stop-file", stop.to_str().unwrap(),
                        "--progress-file", progress.to_str().unwrap(),
                    ],
                    Duration::from_secs(60),
                )
            });
            let (n, first) = wait_for(10);
            assert!(n >= 10, "the flow made {n} requests");
            let keep: Vec<&Pod> = s.lab.backends().iter().filter(|p| p.name != first).collect();
            assert_eq!(keep.len(), 2, "{first}");
            let want: Vec<String> = keep.iter().map(|p| format!("[{}]:5353", p.ip6)).collect();
            write_manifest(&s.dir.join("svc.yaml"), &single_stack6(&keep));
            let want: Vec<&str> = want.iter().map(String::as_str).collect();
            s.kpr.wait_for_backends(&dns, &want).unwrap();
            let (programmed, _) = read();
            wait_for(programmed + 10);
            std::fs::write(&stop, "").unwrap();
            (first, programmed, running.join().unwrap().unwrap())
        });
        let after: Vec<&String> = r.sequence[programmed..].iter().filter(|b| !b.is_empty()).collect();
        let Some(&moved) = after.first() else {
            panic!("no answer after the change: {r:?}\n{}", s.kpr.log());
        };
        assert_ne!(moved, &first, "the flow stayed on {first}: {r:?}");
        assert!(after.iter().all(|b| *b == moved), "{r:?}");
        let allowed: &[&str] = match mode {
            ProxyMode::Ebpf => &["ECONNABORTED", "EDESTADDRREQ"],
            _ => &["ETIMEDOUT"],
        };
        let explained: u64 = allowed
            .iter()
            .map(|k| r.error_kinds.get(*k).copied().unwrap_or(0))
            .sum();
        assert!(r.errors <= 1 && r.errors == explained, "{r:?}");
        if mode == ProxyMode::Ebpf {
            // The move was the agent's doing: it destroyed the IPv6 socket.
            let destroyed = s.kpr.counters_now().unwrap()["udp_sockets_destroyed"];
            assert!(destroyed >= 1, "udp_sockets_destroyed {destroyed}\n{}", s.kpr.log());
        }
    }
}
