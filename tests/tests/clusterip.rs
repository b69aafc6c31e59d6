//! ClusterIP load balancing through kpr's eBPF socket-LB programs, over real sockets in a lab
//! (network namespaces, a cgroup v2 directory, a bpffs), with kpr reading a manifest directory.
//!
//! Each test builds its own lab (unique names, so they run in parallel) and fails, naming what
//! is missing, when not run as root with the lab's tools. kpr is the real binary (`$KPR_BIN`,
//! else target/<profile>/kpr). Changes are waited on through kpr's status (the frontend
//! programmed with the expected backends), never by sleeping; a connection that must fail is
//! checked for its error kind and for the counter of the layer that refused it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kpr_lab::kpr::{assert_refused, kpr_path, Kpr, ProxyMode, Refusal};
use kpr_lab::tool::{UdpMode, UdpSpread};
use kpr_lab::{per_mode, require_lab, write_manifest, Lab, LabSpec};

const VIP: &str = "10.96.0.10";
/// The frontends of [`web_and_dns`] as kpr's status names them.
const WEB: &str = "10.96.0.10:80/tcp";
const DNS: &str = "10.96.0.10:53/udp";
/// What a client gets when kpr does not translate a ClusterIP: the node routes it to its
/// uplink (in the lab, a veth whose peer is down), where it vanishes: the connection times out.
const UNROUTED: &str = "ETIMEDOUT";

/// A lab with kpr running on `manifest` (written as `svc.yaml` in a fresh manifest directory).
struct Setup {
    lab: Lab,
    kpr: Kpr,
    dir: PathBuf,
}

impl Setup {
    fn new(tag: &str, manifest: &str) -> Setup {
        Self::in_mode(tag, manifest, ProxyMode::Ebpf)
    }

    fn in_mode(tag: &str, manifest: &str, mode: ProxyMode) -> Setup {
        require_lab(tag);
        let lab = Lab::up(LabSpec {
            prefix: Lab::unique_prefix(tag),
            ..LabSpec::default()
        })
        .expect("lab up");
        let dir = lab.manifest_dir().unwrap();
        write_manifest(&dir.join("svc.yaml"), manifest);
        let bin = kpr_path();
        assert!(
            bin.is_file(),
            "kpr binary not found at {} (build it, or set KPR_BIN)",
            bin.display()
        );
        let kpr = Kpr::start(&lab, &bin, &dir, "kpr", &mode.args()).expect("kpr start");
        Setup { lab, kpr, dir }
    }

    fn client(&self) -> kpr_lab::Pod {
        self.lab.clients()[0].clone()
    }

    /// Replaces the manifest (kpr picks it up by itself; wait on the result with
    /// [`Kpr::wait_for_backends`]).
    fn update(&self, manifest: &str) {
        write_manifest(&self.dir.join("svc.yaml"), manifest);
    }
}

/// `ip:port` of each backend IP, as kpr's status lists them.
fn at(ips: &[&str], port: u16) -> Vec<String> {
    ips.iter().map(|ip| format!("{ip}:{port}")).collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits until kpr serves [`web_and_dns`]`(ips)`.
fn wait_for_web_and_dns(kpr: &mut Kpr, ips: &[&str]) {
    kpr.wait_for_backends(WEB, &refs(&at(ips, 8080))).unwrap();
    kpr.wait_for_backends(DNS, &refs(&at(ips, 5353))).unwrap();
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A Service `demo/echo` with the given ports (name, protocol, port, targetPort) and one
/// EndpointSlice with the given slice ports (name, protocol, port) and backend IPs.
fn service(
    ports: &[(&str, &str, u16, &str)],
    slice_ports: &[(&str, &str, u16)],
    backends: &[&str],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: demo}}\nspec:\n  clusterIP: {VIP}\n  ports:\n"
    );
    for (name, proto, port, target) in ports {
        y += &format!(
            "  - {{name: {name}, protocol: {proto}, port: {port}, targetPort: {target}}}\n"
        );
    }
    y += "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: demo\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports:\n";
    for (name, proto, port) in slice_ports {
        y += &format!("  - {{name: {name}, protocol: {proto}, port: {port}}}\n");
    }
    if backends.is_empty() {
        y += "endpoints: []\n";
    } else {
        y += "endpoints:\n";
        for b in backends {
            y += &format!("  - addresses: [{b}]\n    conditions: {{ready: true}}\n");
        }
    }
    y
}

const ALL: [&str; 3] = ["10.244.1.11", "10.244.1.12", "10.244.1.13"];

/// The lab's backend pods: be1..be3 are 10.244.1.11..13.
fn ip_of(backend: &str) -> &'static str {
    match backend {
        "be1" => ALL[0],
        "be2" => ALL[1],
        "be3" => ALL[2],
        other => panic!("not a backend of the lab: {other:?}"),
    }
}

fn web_and_dns(backends: &[&str]) -> String {
    service(
        &[("http", "TCP", 80, "8080"), ("dns", "UDP", 53, "5353")],
        &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
        backends,
    )
}

/// Every backend gets at least 15% of `total`.
fn assert_spread(counts: &std::collections::BTreeMap<String, u64>, total: u64, what: &str) {
    for be in ["be1", "be2", "be3"] {
        let n = counts.get(be).copied().unwrap_or(0);
        assert!(
            n * 100 >= total * 15,
            "{what}: {be} got {n} of {total} (< 15%): {counts:?}"
        );
    }
}

per_mode! {
    fn tcp_clusterip_reaches_all_backends_and_getpeername_shows_the_clusterip(mode) {
        let mut s = Setup::in_mode("tcp", &web_and_dns(&ALL), mode);
        let r = s
            .lab
            .tcp_spread(&s.client(), addr("10.96.0.10:80"), 300)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
        assert_spread(&r.counts, 300, "TCP");
        // Every connection was translated to the target port, and the application still sees
        // the ClusterIP as its peer.
        assert_eq!(r.ports.get("8080"), Some(&300), "{r:?}");
        assert_eq!(
            r.peers.keys().collect::<Vec<_>>(),
            vec!["10.96.0.10:80"],
            "{r:?}"
        );
        if mode == ProxyMode::Ebpf {
            // The socket programs translated every connection themselves.
            s.kpr
                .wait_for_counter("translated", 300, Duration::from_secs(10))
                .unwrap();
        }
    }
}

per_mode! {
    fn udp_clusterip_unconnected_and_connected(mode) {
        let s = Setup::in_mode("udp", &web_and_dns(&ALL), mode);
        let r = s
            .lab
            .udp_spread(
                &s.client(),
                addr("10.96.0.10:53"),
                300,
                UdpMode::SocketPerRequest,
            )
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_spread(&r.counts, 300, "unconnected UDP");
        // Replies to an unconnected socket appear to come from the ClusterIP, not the pod.
        assert_eq!(
            r.sources.keys().collect::<Vec<_>>(),
            vec!["10.96.0.10:53"],
            "{r:?}"
        );
        assert_eq!(r.ports.get("5353"), Some(&300), "{r:?}");

        // A connected UDP socket is translated once, at connect: one backend, and its peer is
        // the ClusterIP.
        let r = s
            .lab
            .udp_spread(&s.client(), addr("10.96.0.10:53"), 20, UdpMode::Connected)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.counts.len(), 1, "{r:?}");
        assert_eq!(
            r.sources.keys().collect::<Vec<_>>(),
            vec!["10.96.0.10:53"],
            "{r:?}"
        );
    }
}

/// A UDP flow (`udp-spread` with `flow_mode`, one request every 25 ms) on DNS while its
/// backend is removed: waits for ten requests on the flow's first backend, removes that
/// backend, waits until kpr programmed the change and for ten more requests. Returns the first
/// backend, how many requests were made when the change was programmed, and the flow's report.
/// Progress is read from the flow's own progress file, so no step depends on how fast the
/// machine is.
fn udp_flow_across_backend_removal(
    tag: &str,
    mode: ProxyMode,
    flow_mode: &str,
) -> (String, usize, UdpSpread) {
    let s = Setup::in_mode(tag, &web_and_dns(&ALL), mode);
    let client = s.client();
    let stop = s.lab.work_dir().join("stop-flow");
    let progress = s.lab.work_dir().join("flow-progress");
    let Setup { lab, mut kpr, dir } = s;
    let read = || -> (usize, String) {
        let t = std::fs::read_to_string(&progress).unwrap_or_default();
        let (n, b) = t.trim().split_once(' ').unwrap_or(("0", "-"));
        (n.parse().unwrap_or(0), b.to_string())
    };
    let wait_for = |at_least: usize| -> Result<(usize, String), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let p = read();
            if p.0 >= at_least {
                return Ok(p);
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("the flow made {} requests, not {at_least}", p.0));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            lab.labtool_json::<UdpSpread>(
                &client,
                &[
                    "udp-spread",
                    "--target",
                    "10.96.0.10:53",
                    "--count",
                    "1200",
                    flow_mode,
                    "--interval-ms",
                    "25",
                    "--timeout-ms",
                    "500",
                    "--stop-file",
                    stop.to_str().unwrap(),
                    "--progress-file",
                    progress.to_str().unwrap(),
                ],
                Duration::from_secs(60),
            )
        });
        let finish = |what: String| -> ! {
            std::fs::write(&stop, "").unwrap();
            panic!("{what}");
        };
        // Ten datagrams on the flow's first backend, before anything changes.
        let (_, backend) = wait_for(10).unwrap_or_else(|e| finish(e));
        let keep: Vec<&str> = ALL
            .iter()
            .copied()
            .filter(|ip| *ip != ip_of(&backend))
            .collect();
        assert_eq!(keep.len(), 2, "{backend}");
        write_manifest(&dir.join("svc.yaml"), &web_and_dns(&keep));
        if let Err(e) = kpr.wait_for_backends(DNS, &refs(&at(&keep, 5353))) {
            finish(e.to_string());
        }
        // Ten more datagrams after the change was programmed.
        let (programmed, _) = read();
        wait_for(programmed + 10).unwrap_or_else(|e| finish(e));
        std::fs::write(&stop, "").unwrap();
        (backend, programmed, running.join().unwrap().unwrap())
    })
}

/// The flow of [`udp_flow_across_backend_removal`] left its removed backend for one remaining
/// one, losing at most one request in the switch, and the client always saw the ClusterIP.
#[track_caller]
fn assert_flow_moved(mode: ProxyMode, (backend, programmed, r): &(String, usize, UdpSpread)) {
    assert_eq!(
        r.sources.keys().collect::<Vec<_>>(),
        vec!["10.96.0.10:53"],
        "{r:?}"
    );
    // Before the change: one backend throughout.
    assert!(r.sequence[..10].iter().all(|b| b == backend), "{r:?}");
    // After it was programmed: on one remaining backend, never back on the removed one.
    let after: Vec<&String> = r.sequence[*programmed..]
        .iter()
        .filter(|b| !b.is_empty())
        .collect();
    let Some(&moved) = after.first() else {
        panic!("{mode:?}: no answer after the change: {r:?}");
    };
    assert!(
        moved != backend,
        "{mode:?}: the flow stayed on {backend}: {r:?}"
    );
    assert!(after.iter().all(|b| *b == moved), "{r:?}");
    assert!(r.errors <= 1, "{r:?}");
}

per_mode! {
    /// One socket is one flow: like a conntrack entry for kube-proxy, the flow stays on the
    /// backend its first datagram went to. When that backend is removed, the flow moves to a
    /// remaining one (eBPF: the socket's sticky entry is checked; netfilter modes: kpr deletes
    /// the flow's conntrack entry, as kube-proxy does), rather than staying on it.
    fn one_udp_flow_stays_on_its_backend_until_it_is_removed(mode) {
        let run = udp_flow_across_backend_removal("udpstick", mode, "--one-socket");
        assert_flow_moved(mode, &run);
        // A request may be lost in the instant of the switch (timed out), no more.
        assert_eq!(run.2.errors, run.2.error_kinds["ETIMEDOUT"], "{:?}", run.2);
    }
}

per_mode! {
    /// A connected UDP socket (a DNS forwarder's upstream, statsd, a QUIC client) does not stay
    /// on a backend that left: kube-proxy deletes the flow's conntrack entry, and the next
    /// datagram goes to a remaining backend (the netfilter modes do the same). The eBPF mode
    /// translated the socket once, at connect(), so it destroys it instead: the socket's next
    /// call fails and the client's reconnect is balanced anew.
    fn a_connected_udp_socket_leaves_a_removed_backend(mode) {
        let run = udp_flow_across_backend_removal("udpconn", mode, "--connected");
        assert_flow_moved(mode, &run);
        let r = &run.2;
        // A destroyed socket is disconnected: a receive in flight fails with ECONNABORTED, the
        // next send with EDESTADDRREQ.
        let allowed: &[&str] = match mode {
            ProxyMode::Ebpf => &["ECONNABORTED", "EDESTADDRREQ"],
            _ => &["ETIMEDOUT"],
        };
        let explained: u64 = allowed
            .iter()
            .map(|k| r.error_kinds.get(*k).copied().unwrap_or(0))
            .sum();
        assert_eq!(r.errors, explained, "{r:?}");
    }
}

per_mode! {
    fn a_removed_backend_gets_no_new_connections(mode) {
        let mut s = Setup::in_mode("rmbe", &web_and_dns(&ALL), mode);
        let before = s
            .lab
            .tcp_spread(&s.client(), addr("10.96.0.10:80"), 60)
            .unwrap();
        assert!(before.counts.contains_key("be3"), "{before:?}");

        // Once kpr has programmed the change, no new connection reaches be3. (How soon after the
        // write that happens is a latency figure: the benchmark measures it.)
        s.update(&web_and_dns(&["10.244.1.11", "10.244.1.12"]));
        wait_for_web_and_dns(&mut s.kpr, &["10.244.1.11", "10.244.1.12"]);
        let after = s
            .lab
            .tcp_spread(&s.client(), addr("10.96.0.10:80"), 200)
            .unwrap();
        assert_eq!(after.errors, 0, "{after:?}");
        assert_eq!(after.counts.get("be3"), None, "{after:?}\n{}", s.kpr.log());
        assert!(after.counts.contains_key("be1") && after.counts.contains_key("be2"));

        // And it comes back when re-added.
        s.update(&web_and_dns(&ALL));
        wait_for_web_and_dns(&mut s.kpr, &ALL);
        let back = s
            .lab
            .tcp_spread(&s.client(), addr("10.96.0.10:80"), 100)
            .unwrap();
        assert!(back.counts.contains_key("be3"), "{back:?}");
    }
}

per_mode! {
    fn a_deleted_service_stops_being_translated(mode) {
        // Two Services: echo (deleted below) and other, the positive control that must keep working.
        let other = "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: demo}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: other-1\n  namespace: demo\n  labels: {kubernetes.io/service-name: other}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n  - addresses: [10.244.1.12]\n";
        let mut s = Setup::in_mode("delsvc", &format!("{}---\n{other}", web_and_dns(&ALL)), mode);
        let vip = addr("10.96.0.10:80");
        let control = addr("10.96.0.11:80");
        let once = s
            .lab
            .connect_once(&s.client(), vip, Duration::from_secs(1))
            .unwrap();
        assert!(once.ok, "{once:?}");

        // Only echo's slice and the other Service are left: echo is gone.
        let slice_only = web_and_dns(&ALL).split("---\n").nth(1).unwrap().to_string();
        s.update(&format!("{slice_only}---\n{other}"));
        s.kpr.wait_for_no_frontend(WEB).unwrap();
        s.kpr.wait_for_no_frontend(DNS).unwrap();
        let before = s.kpr.counters_now().unwrap();
        let once = s
            .lab
            .connect_once(&s.client(), vip, Duration::from_secs(2))
            .unwrap();
        // Not translated: the connection went to the ClusterIP itself, which nothing routes.
        assert_eq!(once.error.as_deref(), Some(UNROUTED), "{once:?}");
        let r = s
            .lab
            .udp_spread(&s.client(), addr("10.96.0.10:53"), 3, UdpMode::OneSocket)
            .unwrap();
        assert_eq!(r.errors, 3, "UDP still translated after deletion: {r:?}");
        let after = s.kpr.counters_now().unwrap();
        let counters: &[&str] = match mode {
            ProxyMode::Ebpf => &["translated", "drop_no_backend", "sticky_reused"],
            ProxyMode::Iptables => &["reject_no_endpoints"],
            ProxyMode::Nftables | ProxyMode::Ipvs => &[],
        };
        for &counter in counters {
            assert_eq!(
                after[counter], before[counter],
                "kpr still handled the deleted Service ({counter})"
            );
        }
        // The control: kpr is alive and translating in the same test.
        let ok = s
            .lab
            .connect_once(&s.client(), control, Duration::from_secs(2))
            .unwrap();
        assert_eq!(ok.backend.as_deref(), Some("be2"), "{ok:?}");
        if mode == ProxyMode::Ebpf {
            assert_eq!(
                s.kpr.counters_now().unwrap()["translated"],
                after["translated"] + 1
            );
        }
    }
}

per_mode! {
    fn a_two_port_service_with_named_target_ports_works_on_both_ports(mode) {
        // Service ports name their targets; the slice maps the names to numbers — crossed
        // relative to the service port order, so a positional mix-up would show.
        let manifest = service(
            &[("web", "TCP", 80, "web"), ("admin", "TCP", 9090, "admin")],
            &[("admin", "TCP", 8080), ("web", "TCP", 8081)],
            &ALL,
        );
        let s = Setup::in_mode("named", &manifest, mode);
        let web = s
            .lab
            .tcp_spread(&s.client(), addr("10.96.0.10:80"), 90)
            .unwrap();
        assert_eq!(web.errors, 0, "{web:?}");
        assert_eq!(
            web.ports.keys().collect::<Vec<_>>(),
            vec!["8081"],
            "{web:?}"
        );
        assert_eq!(web.counts.len(), 3, "{web:?}");
        let admin = s
            .lab
            .tcp_spread(&s.client(), addr("10.96.0.10:9090"), 90)
            .unwrap();
        assert_eq!(admin.errors, 0, "{admin:?}");
        assert_eq!(
            admin.ports.keys().collect::<Vec<_>>(),
            vec!["8080"],
            "{admin:?}"
        );
    }
}

per_mode! {
    fn a_service_without_endpoints_is_refused_at_once(mode) {
        let mut s = Setup::in_mode("noep", &web_and_dns(&[]), mode);
        s.kpr.wait_for_backends(WEB, &[]).unwrap();
        let before = s.kpr.refusals(mode, Refusal::NoEndpoints);
        let once = s
            .lab
            .connect_once(&s.client(), addr("10.96.0.10:80"), Duration::from_secs(2))
            .unwrap();
        // Refused by kpr's layer itself (its counter says so: the connect hook, or the netfilter
        // mode's REJECT rule), not by a timeout or the network. How fast is the benchmark's to say.
        assert_eq!(once.error.as_deref(), Some("ECONNREFUSED"), "{once:?}");
        let after = s.kpr.refusals(mode, Refusal::NoEndpoints);
        assert_refused(before, after, 1, "the connect hook or REJECT rule");
        // The control: with an endpoint the same frontend connects.
        s.update(&web_and_dns(&["10.244.1.13"]));
        s.kpr.wait_for_backends(WEB, &["10.244.1.13:8080"]).unwrap();
        let once = s
            .lab
            .connect_once(&s.client(), addr("10.96.0.10:80"), Duration::from_secs(2))
            .unwrap();
        assert_eq!(once.backend.as_deref(), Some("be3"), "{once:?}");
    }
}

per_mode! {
    /// In every mode: the model skips bad objects before any writer sees them, and what it
    /// keeps must load (a writer choking on a kept object would fail every Service's sync).
    fn bad_manifests_are_skipped_and_named_while_valid_services_keep_working(mode) {
    let bad = [
        // 0: a valid Service on another ClusterIP, with its slice in good.yaml.
        "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: demo}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n",
        // 1: broken YAML.
        "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n",
        // 2: an invalid ClusterIP.
        "apiVersion: v1\nkind: Service\nmetadata: {name: badip, namespace: demo}\nspec:\n  clusterIP: 10.96.0.999\n  ports: [{port: 80}]\n",
        // 3: an FQDN slice.
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: other-fqdn\n  namespace: demo\n  labels: {kubernetes.io/service-name: other}\naddressType: FQDN\nendpoints:\n  - addresses: [backend.example.com]\n",
    ]
    .join("---\n");
    let other_slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: other-1\n  namespace: demo\n  labels: {kubernetes.io/service-name: other}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n  - addresses: [10.244.1.12]\n";
    let mut s = Setup::in_mode("bad", &web_and_dns(&ALL), mode);
    let client = s.client();
    write_manifest(&s.dir.join("bad.yaml"), &bad);
    write_manifest(&s.dir.join("good.yaml"), other_slice);
    s.kpr
        .wait_for_backends("10.96.0.11:80/tcp", &["10.244.1.12:8080"])
        .unwrap();
    // Programming 10.96.0.11 needs both files, so bad.yaml's other documents have been read
    // (and reported) by now.
    let kpr = s.kpr;

    let r = s
        .lab
        .tcp_spread(&client, addr("10.96.0.10:80"), 60)
        .unwrap();
    assert_eq!(r.errors, 0, "the first Service broke: {r:?}");
    let r = s
        .lab
        .tcp_spread(&client, addr("10.96.0.11:80"), 20)
        .unwrap();
    assert_eq!(
        r.errors, 0,
        "the valid Service in bad.yaml is not served: {r:?}"
    );
    assert_eq!(r.counts.keys().collect::<Vec<_>>(), vec!["be2"], "{r:?}");

    let log = kpr.log();
    for needle in [
        "bad.yaml: document 1",
        "bad.yaml: document 2",
        "bad.yaml: document 3",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    assert!(log.contains("10.96.0.999"), "{log}");
    assert!(log.contains("FQDN"), "{log}");
}
}

#[test]
fn restarting_kpr_keeps_the_programmed_state() {
    let s = Setup::new("restart", &web_and_dns(&ALL));
    let client = s.client();
    s.kpr.stop();
    // Same pins: the new process restores ids and has nothing to write.
    let kpr = Kpr::start(&s.lab, &kpr_path(), &s.dir, "kpr", &[]).unwrap();
    let log = kpr.log();
    assert!(
        log.contains("writes=0") && log.contains("deletes=0"),
        "a restart re-programmed the maps:\n{log}"
    );
    let r = s
        .lab
        .tcp_spread(&client, addr("10.96.0.10:80"), 60)
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
}
