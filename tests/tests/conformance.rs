//! Kubernetes' Conformance `[sig-network] Services` tests (test/e2e/network/service.go,
//! listed in test/conformance/testdata/conformance.yaml), with real traffic in the lab, in
//! every mode (issue 10). Each test is named after the upstream one; the upstream test's
//! objects become manifests and its checks become connections from a pod (or, for NodePort,
//! from the external client).
//!
//! Lab: node1 192.168.100.11 with be1..be3 (10.244.1.11..13, TCP 8080 and 8081, UDP 5353)
//! and a client pod; an external client 192.168.100.100.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};
use kpr_lab::tool::UdpMode;
use kpr_lab::{per_mode, write_manifest, Lab};

const NODE1: &str = "192.168.100.11";
const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nstatus:\n  addresses: [{type: InternalIP, address: 192.168.100.11}]\n---\n";

struct Setup {
    lab: Lab,
    kpr: Kpr,
    dir: PathBuf,
}

impl Setup {
    fn new(tag: &str, manifest: &str, mode: ProxyMode) -> Setup {
        let (lab, dir) = kpr_lab::external_client_lab(tag, manifest);
        let mut args = vec![
            "--hostname-override",
            "node1",
            "--devices",
            "eth0",
            "--healthz-bind-address",
            "127.0.0.1:10256",
        ];
        args.extend(mode.args());
        let kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &args).expect("kpr start");
        Setup { lab, kpr, dir }
    }

    fn update(&self, manifest: &str) {
        write_manifest(&self.dir.join("svc.yaml"), manifest);
    }

    /// The backends (pod names) 30 TCP connections from the client pod reach.
    fn reached(&self, target: &str) -> BTreeSet<String> {
        let client = self.lab.clients()[0].clone();
        let r = self.lab.tcp_spread(&client, addr(target), 30).unwrap();
        assert_eq!(r.errors, 0, "{target}: {r:?}\n{}", self.kpr.log());
        r.counts.keys().cloned().collect()
    }

    /// How a single connection from the client pod fails (its error kind), if it does.
    fn refused(&self, target: &str) -> Option<String> {
        let client = self.lab.clients()[0].clone();
        let once = self
            .lab
            .connect_once(&client, addr(target), Duration::from_secs(2))
            .unwrap();
        once.error
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The lab's backend pods by IP.
fn ip(backend: &str) -> &'static str {
    match backend {
        "be1" => "10.244.1.11",
        "be2" => "10.244.1.12",
        "be3" => "10.244.1.13",
        other => panic!("not a lab backend: {other}"),
    }
}

/// A Service `conformance/{name}` with `spec` (YAML lines, indented two spaces) and one
/// EndpointSlice per (slice port name, protocol, port, backends).
fn service(name: &str, spec: &str, slices: &[(&str, &str, u16, &[&str])]) -> String {
    let mut y = format!(
        "{NODE}apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: conformance}}\nspec:\n{spec}---\n"
    );
    for (i, (port_name, proto, port, backends)) in slices.iter().enumerate() {
        y += &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{i}\n  namespace: conformance\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: {port_name}, protocol: {proto}, port: {port}}}]\n"
        );
        if backends.is_empty() {
            y += "endpoints: []\n---\n";
        } else {
            y += "endpoints:\n";
            for b in *backends {
                y += &format!(
                    "  - {{addresses: [{}], conditions: {{ready: true}}}}\n",
                    ip(b)
                );
            }
            y += "---\n";
        }
    }
    y
}

/// Waits until the client pod reaches exactly `want` at `target`.
fn wait_reached(s: &Setup, target: &str, want: &BTreeSet<String>) {
    let client = s.lab.clients()[0].clone();
    if let Err(e) = s.lab.wait_until_reaching(&client, addr(target), want) {
        panic!("{e}\n{}", s.kpr.log());
    }
}

const BASIC: &str =
    "  clusterIP: 10.96.0.20\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n";

per_mode! {
    /// "should serve a basic endpoint from pods": endpoints added and removed one by one.
    fn should_serve_a_basic_endpoint_from_pods(mode) {
        let mut s = Setup::new("cf-basic", &service("endpoint-test2", BASIC, &[("http", "TCP", 8080, &[])]), mode);
        let fe = "10.96.0.20:80/tcp";
        s.wait_for_backends(fe, &[]);
        assert_eq!(s.refused("10.96.0.20:80").as_deref(), Some("ECONNREFUSED"));
        for backends in [&["be1"][..], &["be1", "be2"], &["be2"]] {
            s.update(&service("endpoint-test2", BASIC, &[("http", "TCP", 8080, backends)]));
            s.wait_for_backends(fe, backends);
            assert_eq!(s.reached("10.96.0.20:80"), names(backends));
        }
        s.update(&service("endpoint-test2", BASIC, &[("http", "TCP", 8080, &[])]));
        s.wait_for_backends(fe, &[]);
        assert_eq!(s.refused("10.96.0.20:80").as_deref(), Some("ECONNREFUSED"));
    }
}

per_mode! {
    /// "should serve multiport endpoints from pods": each Service port reaches the pods that
    /// expose its target port.
    fn should_serve_multiport_endpoints_from_pods(mode) {
        let spec = "  clusterIP: 10.96.0.21\n  ports:\n  - {name: portname1, protocol: TCP, port: 80, targetPort: svc1}\n  - {name: portname2, protocol: TCP, port: 81, targetPort: svc2}\n";
        let s = Setup::new(
            "cf-multi",
            &service("multi-endpoint-test", spec, &[
                ("portname1", "TCP", 8080, &["be1"]),
                ("portname2", "TCP", 8081, &["be2"]),
            ]),
            mode,
        );
        wait_reached(&s, "10.96.0.21:80", &names(&["be1"]));
        wait_reached(&s, "10.96.0.21:81", &names(&["be2"]));
        // Both pods behind both ports.
        s.update(&service("multi-endpoint-test", spec, &[
            ("portname1", "TCP", 8080, &["be1", "be2"]),
            ("portname2", "TCP", 8081, &["be1", "be2"]),
        ]));
        wait_reached(&s, "10.96.0.21:80", &names(&["be1", "be2"]));
        wait_reached(&s, "10.96.0.21:81", &names(&["be1", "be2"]));
    }
}

per_mode! {
    /// "should serve endpoints on same port and different protocols": TCP and UDP on port 53.
    fn should_serve_endpoints_on_same_port_and_different_protocols(mode) {
        let spec = "  clusterIP: 10.96.0.22\n  ports:\n  - {name: tcp-port, protocol: TCP, port: 53, targetPort: 8080}\n  - {name: udp-port, protocol: UDP, port: 53, targetPort: 5353}\n";
        let s = Setup::new(
            "cf-proto",
            &service("proto-test", spec, &[
                ("tcp-port", "TCP", 8080, &["be1", "be2"]),
                ("udp-port", "UDP", 5353, &["be3"]),
            ]),
            mode,
        );
        wait_reached(&s, "10.96.0.22:53", &names(&["be1", "be2"]));
        let client = s.lab.clients()[0].clone();
        let r = s
            .lab
            .udp_spread(&client, addr("10.96.0.22:53"), 20, UdpMode::SocketPerRequest)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.counts.keys().cloned().collect::<BTreeSet<_>>(), names(&["be3"]));
    }
}

per_mode! {
    /// "should be able to create a functioning NodePort service": reached from outside the
    /// node on the node's address, and through its ClusterIP.
    fn should_be_able_to_create_a_functioning_nodeport_service(mode) {
        let spec = "  type: NodePort\n  clusterIP: 10.96.0.23\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30123}]\n";
        let s = Setup::new(
            "cf-np",
            &service("nodeport-test", spec, &[("http", "TCP", 8080, &["be1", "be2", "be3"])]),
            mode,
        );
        let all = names(&["be1", "be2", "be3"]);
        wait_reached(&s, "10.96.0.23:80", &all);
        let ext = s.lab.external_client().unwrap().clone();
        let r = s
            .lab
            .tcp_spread(&ext, addr(&format!("{NODE1}:30123")), 30)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
        assert_eq!(r.counts.keys().cloned().collect::<BTreeSet<_>>(), all);
    }
}

per_mode! {
    /// "should have session affinity work for service with type clusterIP", and "should be
    /// able to switch session affinity for service with type clusterIP": with ClientIP every
    /// connection of the client reaches one backend; switched off, they spread again.
    fn should_be_able_to_switch_session_affinity_for_service_with_type_clusterip(mode) {
        let spec = |affinity: &str| {
            format!("  clusterIP: 10.96.0.24\n  sessionAffinity: {affinity}\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]\n")
        };
        let manifest = |affinity: &str| {
            service("affinity-clusterip", &spec(affinity), &[("http", "TCP", 8080, &["be1", "be2", "be3"])])
        };
        let mut s = Setup::new("cf-aff", &manifest("None"), mode);
        let all = names(&["be1", "be2", "be3"]);
        wait_reached(&s, "10.96.0.24:80", &all);
        s.update(&manifest("ClientIP"));
        s.wait_for_affinity("10.96.0.24:80/tcp", Some(10_800));
        for _ in 0..3 {
            assert_eq!(s.reached("10.96.0.24:80").len(), 1, "ClientIP: one backend");
        }
        s.update(&manifest("None"));
        s.wait_for_affinity("10.96.0.24:80/tcp", None);
        wait_reached(&s, "10.96.0.24:80", &all);
    }
}

per_mode! {
    /// "should have session affinity work for NodePort service": every connection of the
    /// external client to the NodePort reaches one backend.
    fn should_have_session_affinity_work_for_nodeport_service(mode) {
        let spec = "  type: NodePort\n  clusterIP: 10.96.0.25\n  sessionAffinity: ClientIP\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30125}]\n";
        let mut s = Setup::new(
            "cf-npaff",
            &service("affinity-nodeport", spec, &[("http", "TCP", 8080, &["be1", "be2", "be3"])]),
            mode,
        );
        s.wait_for_affinity("10.96.0.25:80/tcp", Some(10_800));
        let ext = s.lab.external_client().unwrap().clone();
        for _ in 0..3 {
            let r = s
                .lab
                .tcp_spread(&ext, addr(&format!("{NODE1}:30125")), 20)
                .unwrap();
            assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
            assert_eq!(r.counts.len(), 1, "ClientIP: one backend: {r:?}");
        }
    }
}

per_mode! {
    /// "should be able to change the type from ClusterIP to ExternalName", "from ExternalName
    /// to NodePort", "from NodePort to ExternalName" and "from ExternalName to ClusterIP": an
    /// ExternalName Service has no frontends (DNS serves it), the others are served at once.
    fn should_be_able_to_change_the_type_between_clusterip_externalname_and_nodeport(mode) {
        let cluster_ip = "  type: ClusterIP\n  clusterIP: 10.96.0.26\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n";
        let external_name = "  type: ExternalName\n  externalName: example.com\n";
        let node_port = "  type: NodePort\n  clusterIP: 10.96.0.26\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30126}]\n";
        let eps: &[(&str, &str, u16, &[&str])] = &[("http", "TCP", 8080, &["be1", "be2"])];
        let mut s = Setup::new("cf-type", &service("type-test", cluster_ip, eps), mode);
        let (fe, np) = ("10.96.0.26:80/tcp", format!("{NODE1}:30126/tcp"));
        let both = names(&["be1", "be2"]);
        s.wait_for_backends(fe, &["be1", "be2"]);
        assert_eq!(s.reached("10.96.0.26:80"), both);
        for (spec, served) in [(external_name, false), (node_port, true), (external_name, false), (cluster_ip, true)] {
            s.update(&service("type-test", spec, eps));
            if served {
                s.wait_for_backends(fe, &["be1", "be2"]);
                assert_eq!(s.reached("10.96.0.26:80"), both);
            } else {
                if let Err(e) = s.kpr.wait_for_no_frontend(fe) {
                    panic!("{e}\n{}", s.kpr.log());
                }
                assert!(!s.kpr.status().unwrap().frontends.contains_key(&np));
            }
            if spec == node_port {
                let ext = s.lab.external_client().unwrap().clone();
                let r = s.lab.tcp_spread(&ext, addr(&format!("{NODE1}:30126")), 20).unwrap();
                assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
            }
        }
    }
}

impl Setup {
    /// Waits until kpr has programmed `frontend` with exactly `backends` (pod names).
    fn wait_for_backends(&mut self, frontend: &str, backends: &[&str]) {
        let want: Vec<String> = backends.iter().map(|b| format!("{}:8080", ip(b))).collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        if let Err(e) = self.kpr.wait_for_backends(frontend, &want) {
            panic!("{e}\n{}", self.kpr.log());
        }
    }

    fn wait_for_affinity(&mut self, frontend: &str, timeout_s: Option<u64>) {
        let what = format!("affinity {timeout_s:?}");
        if let Err(e) = self
            .kpr
            .wait_for_frontend(frontend, &what, |f| f.affinity_timeout_s == timeout_s)
        {
            panic!("{e}\n{}", self.kpr.log());
        }
    }
}

per_mode! {
    /// "should be able to switch session affinity for NodePort service": with ClientIP every
    /// connection of the external client to the NodePort reaches one backend; switched off,
    /// they spread over every backend again.
    fn should_be_able_to_switch_session_affinity_for_nodeport_service(mode) {
        let spec = |affinity: &str| {
            format!("  type: NodePort\n  clusterIP: 10.96.0.26\n  sessionAffinity: {affinity}\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30126}}]\n")
        };
        let manifest = |affinity: &str| {
            service("affinity-nodeport-transition", &spec(affinity), &[("http", "TCP", 8080, &["be1", "be2", "be3"])])
        };
        let mut s = Setup::new("cf-npsw", &manifest("None"), mode);
        let all = names(&["be1", "be2", "be3"]);
        let ext = s.lab.external_client().unwrap().clone();
        let node_port = addr(&format!("{NODE1}:30126"));
        let spread_reaches_all = |s: &Setup| {
            if let Err(e) = s.lab.wait_until_reaching(&ext, node_port, &all) {
                panic!("{e}\n{}", s.kpr.log());
            }
        };
        spread_reaches_all(&s);
        s.update(&manifest("ClientIP"));
        s.wait_for_affinity("10.96.0.26:80/tcp", Some(10_800));
        for _ in 0..3 {
            let r = s.lab.tcp_spread(&ext, node_port, 20).unwrap();
            assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
            assert_eq!(r.counts.len(), 1, "ClientIP: one backend: {r:?}");
        }
        s.update(&manifest("None"));
        s.wait_for_affinity("10.96.0.26:80/tcp", None);
        spread_reaches_all(&s);
    }
}

per_mode! {
    /// "Service endpoints latency should not be very high": 200 Services, each with its
    /// endpoints, appear one after another; every one must be programmed and served.
    /// Upstream asserts percentiles of the latency (p50 < 20 s, p99 < 50 s); tests here assert
    /// no times, so 50 s bounds the wait for all of them and the observed percentiles are
    /// printed (the benchmark is where programming time is measured).
    fn service_endpoints_latency_should_not_be_very_high(mode) {
        const SERVICES: usize = 200;
        let s = Setup::new("cf-lat", NODE, mode);
        let kpr = s.kpr;
        let frontend = |i: usize| format!("10.96.{}.{}:80/tcp", 8 + i / 250, i % 250 + 1);
        let mut written = Vec::with_capacity(SERVICES);
        for i in 0..SERVICES {
            let ip = frontend(i);
            let ip = ip.split(':').next().unwrap();
            let spec = format!("  clusterIP: {ip}\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]\n");
            let y = service(&format!("latency-svc-{i}"), &spec, &[("http", "TCP", 8080, &["be1"])]);
            write_manifest(&s.dir.join(format!("latency-{i}.yaml")), &y);
            written.push(std::time::Instant::now());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(50);
        let mut seen: Vec<Option<Duration>> = vec![None; SERVICES];
        while seen.iter().any(Option::is_none) {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {SERVICES} Services not programmed within 50 s\n{}",
                seen.iter().filter(|x| x.is_none()).count(),
                kpr.log()
            );
            if let Some(status) = kpr.status() {
                let now = std::time::Instant::now();
                for (i, slot) in seen.iter_mut().enumerate() {
                    let programmed = status
                        .frontends
                        .get(&frontend(i))
                        .is_some_and(|f| f.backends == ["10.244.1.11:8080"]);
                    if slot.is_none() && programmed {
                        *slot = Some(now - written[i]);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut latencies: Vec<Duration> = seen.into_iter().flatten().collect();
        latencies.sort();
        let pct = |p: usize| latencies[(latencies.len() - 1) * p / 100];
        println!(
            "{mode:?}: {SERVICES} Services programmed, latency p50 {:?}, p90 {:?}, p99 {:?}",
            pct(50),
            pct(90),
            pct(99)
        );
        // And served: the first, a middle and the last one.
        for i in [0, SERVICES / 2, SERVICES - 1] {
            let target = frontend(i);
            let target = target.trim_end_matches("/tcp");
            let client = s.lab.clients()[0].clone();
            let r = s.lab.tcp_spread(&client, addr(target), 5).unwrap();
            assert_eq!(r.errors, 0, "{target}: {r:?}\n{}", kpr.log());
            assert_eq!(r.counts.keys().collect::<Vec<_>>(), vec!["be1"], "{r:?}");
        }
    }
}
