//! Session affinity and internal traffic policy for clients on the node, in the lab, real
//! traffic, in every proxy mode.
//!
//! In the eBPF mode affinity is checked deterministically through kpr's datapath counter
//! `affinity_reused` (one increment per connection that reused the client's backend), not by
//! hoping a random choice differs. The netfilter modes keep affinity in the kernel (`-m
//! recent`, nftables sets with timeouts), which counts nothing: there the test checks what
//! clients see (50 connections on one backend, the move off a removed backend, affinity
//! switched off and on) and leaves the expiry to the eBPF counter and the golden rules.

use std::net::SocketAddr;
use std::time::Duration;

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};
use kpr_lab::{per_mode, write_manifest, Lab, LabSpec};

const VIP: &str = "10.96.0.10:80";

/// demo/echo on 10.96.0.10:80 → 8080, endpoints on the given (ip, nodeName) pairs.
fn manifest(affinity_timeout: Option<u32>, itp_local: bool, endpoints: &[(&str, &str)]) -> String {
    let mut spec = String::from("  clusterIP: 10.96.0.10\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n");
    if let Some(t) = affinity_timeout {
        spec += &format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n");
    }
    if itp_local {
        spec += "  internalTrafficPolicy: Local\n";
    }
    let mut y = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: demo}}\nspec:\n{spec}---\n");
    y += "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: demo\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n";
    for (ip, node) in endpoints {
        y += &format!("  - {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: {node}}}\n");
    }
    y
}

/// The lab's backend pods: be1..be3 are 10.244.1.11..13.
fn ip_of(backend: &str) -> String {
    let n: u8 = backend
        .trim_start_matches("be")
        .parse()
        .expect("a backend name");
    format!("10.244.1.{}", 10 + n)
}

struct Setup {
    lab: Lab,
    kpr: Kpr,
    file: std::path::PathBuf,
}

impl Setup {
    fn new(tag: &str, clients: usize, manifest: &str, mode: ProxyMode) -> Setup {
        Self::with_spec(
            LabSpec {
                prefix: Lab::unique_prefix(tag),
                clients,
                ..LabSpec::default()
            },
            manifest,
            mode,
        )
    }

    fn with_spec(spec: LabSpec, manifest: &str, mode: ProxyMode) -> Setup {
        Self::with_args(spec, manifest, mode, &[])
    }

    /// [`Setup::with_spec`], kpr started with `extra` flags too.
    fn with_args(spec: LabSpec, manifest: &str, mode: ProxyMode, extra: &[&str]) -> Setup {
        let lab = Lab::up(spec).expect("lab up");
        let dir = lab.manifest_dir().unwrap();
        let file = dir.join("svc.yaml");
        write_manifest(&file, manifest);
        let kpr = Kpr::start(
            &lab,
            &kpr_path(),
            &dir,
            "kpr",
            &[
                &[
                    "--hostname-override",
                    "node1",
                    mode.args()[0],
                    mode.args()[1],
                ][..],
                extra,
            ]
            .concat(),
        )
        .expect("kpr start");
        Setup { lab, kpr, file }
    }

    /// Replaces the manifest and waits until kpr has programmed `backends` (IPs) for the VIP.
    fn update(&mut self, manifest: &str, backends: &[&str]) {
        write_manifest(&self.file, manifest);
        let want: Vec<String> = backends.iter().map(|ip| format!("{ip}:8080")).collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        self.kpr.wait_for_backends(FRONTEND, &want).unwrap();
    }

    /// The `affinity_reused` counter, read after every connection made so far.
    fn reused(&mut self) -> u64 {
        self.kpr.counters_now().unwrap()["affinity_reused"]
    }
}

const FRONTEND: &str = "10.96.0.10:80/tcp";

const ALL_IPS: [&str; 3] = ["10.244.1.11", "10.244.1.12", "10.244.1.13"];
const ALL: [(&str, &str); 3] = [
    ("10.244.1.11", "node1"),
    ("10.244.1.12", "node1"),
    ("10.244.1.13", "node1"),
];

per_mode! {
    fn client_ip_affinity_keeps_a_client_on_its_backend_until_the_timeout(mode) {
        kpr_lab::require_lab("affinity");
        let mut s = Setup::new("aff", 2, &manifest(Some(2), false, &ALL), mode);
        let (c1, c2) = (s.lab.clients()[0].clone(), s.lab.clients()[1].clone());
        let vip: SocketAddr = VIP.parse().unwrap();

        let ebpf = mode == ProxyMode::Ebpf;
        // 50 connections from one client: one backend, 49 of them by affinity.
        let base = if ebpf { s.reused() } else { 0 };
        let r = s.lab.tcp_spread(&c1, vip, 50).unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.counts.len(), 1, "one client spread over backends: {r:?}");
        let after_c1 = if ebpf { s.reused() } else { 0 };
        if ebpf {
            assert_eq!(after_c1 - base, 49);
        }

        // A second client has its own affinity: its first connection is a fresh choice.
        let r2 = s.lab.tcp_spread(&c2, vip, 20).unwrap();
        assert_eq!(r2.counts.len(), 1, "{r2:?}");
        if ebpf {
            assert_eq!(
                s.reused() - after_c1,
                19,
                "client 2 reused client 1's affinity"
            );

            // After the 2 s timeout since the last new connection, a new choice is made.
            // (Sleeping is the condition here: expiry compares timestamps, so any wait of at
            // least 2 s expires it.)
            std::thread::sleep(Duration::from_millis(2300));
            let before = s.reused();
            let r = s.lab.tcp_spread(&c1, vip, 1).unwrap();
            assert_eq!(r.errors, 0);
            assert_eq!(s.reused(), before, "affinity outlived its timeout");
        }

        // The affinity backend going away is not kept: remove it, and the client moves.
        // Re-establish affinity to whatever c1 has now, then remove that backend.
        let now = s.lab.tcp_spread(&c1, vip, 5).unwrap();
        let current = now.counts.keys().next().unwrap().clone();
        let keep: Vec<(&str, &str)> = ALL
            .iter()
            .copied()
            .filter(|(ip, _)| *ip != ip_of(&current))
            .collect();
        assert_eq!(keep.len(), 2);
        let keep_ips: Vec<&str> = keep.iter().map(|(ip, _)| *ip).collect();
        s.update(&manifest(Some(2), false, &keep), &keep_ips);
        let moved = s.lab.tcp_spread(&c1, vip, 10).unwrap();
        assert_eq!(moved.errors, 0, "{moved:?}");
        assert!(
            !moved.counts.contains_key(&current),
            "affinity kept a removed backend: {moved:?}"
        );

        // Switching affinity off on the live Service spreads the same client again.
        s.update(&manifest(None, false, &ALL), &ALL_IPS);
        s.kpr
            .wait_for_frontend(FRONTEND, "no affinity", |f| f.affinity_timeout_s.is_none())
            .unwrap();
        let spread = s.lab.tcp_spread(&c1, vip, 60).unwrap();
        assert!(spread.counts.len() >= 2, "affinity still on: {spread:?}");
        // And on again.
        s.update(&manifest(Some(60), false, &ALL), &ALL_IPS);
        s.kpr
            .wait_for_frontend(FRONTEND, "affinity 60 s", |f| {
                f.affinity_timeout_s == Some(60)
            })
            .unwrap();
        let sticky = s.lab.tcp_spread(&c1, vip, 30).unwrap();
        assert_eq!(sticky.counts.len(), 1, "affinity not back on: {sticky:?}");
    }
}

per_mode! {
    /// ClientIP affinity is per Service port and client, as kube-proxy's `recent` lists are:
    /// a client that reached a backend through the ClusterIP keeps it through the NodePort.
    /// Four clients, each checked: were the two frontends balanced on their own, each client
    /// would keep its backend by chance one time in three.
    fn client_ip_affinity_is_shared_by_a_service_ports_frontends(mode) {
        kpr_lab::require_lab("affinity_shared");
        let node_port = 30090;
        let mut m = manifest(Some(600), false, &ALL);
        m = m.replacen(
            "  clusterIP: 10.96.0.10\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]",
            &format!("  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {node_port}}}]"),
            1,
        );
        // With an external client, so that the node has its address on the fabric.
        let spec = LabSpec {
            prefix: Lab::unique_prefix("affsh"),
            clients: 4,
            external_client: true,
            ..LabSpec::default()
        };
        let s = Setup::with_spec(spec, &m, mode);
        let vip: SocketAddr = VIP.parse().unwrap();
        let node: SocketAddr = (kpr_lab::node_fabric_ip(1), node_port).into();
        for client in s.lab.clients().to_vec() {
            let via_cluster_ip = s.lab.tcp_spread(&client, vip, 10).unwrap();
            assert_eq!(via_cluster_ip.errors, 0, "{via_cluster_ip:?}");
            assert_eq!(via_cluster_ip.counts.len(), 1, "{via_cluster_ip:?}");
            let via_node_port = s.lab.tcp_spread(&client, node, 10).unwrap();
            assert_eq!(via_node_port.errors, 0, "{via_node_port:?}");
            assert_eq!(
                via_node_port.counts.keys().collect::<Vec<_>>(),
                via_cluster_ip.counts.keys().collect::<Vec<_>>(),
                "{}: the NodePort chose anew",
                client.name
            );
        }
    }
}

per_mode! {
    fn internal_traffic_policy_local_uses_only_this_nodes_endpoints(mode) {
        kpr_lab::require_lab("itp_local");
        let eps = [
            ("10.244.1.11", "node1"),
            ("10.244.1.12", "node2"),
            ("10.244.1.13", "node2"),
        ];
        let mut s = Setup::new("itp", 1, &manifest(None, true, &eps), mode);
        let c = s.lab.clients()[0].clone();
        let vip: SocketAddr = VIP.parse().unwrap();
        let r = s.lab.tcp_spread(&c, vip, 60).unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.counts.keys().collect::<Vec<_>>(), vec!["be1"], "{r:?}");
        // Cluster policy again: every endpoint.
        s.update(
            &manifest(None, false, &eps),
            &["10.244.1.11", "10.244.1.12", "10.244.1.13"],
        );
        let r = s.lab.tcp_spread(&c, vip, 90).unwrap();
        assert_eq!(r.counts.len(), 3, "{r:?}");
    }
}

per_mode! {
    /// internalTrafficPolicy: Local with no endpoint on this node, while the Service has
    /// endpoints elsewhere: kube-proxy drops ("has no local endpoints"), and so do the netfilter
    /// modes and the eBPF mode with `--reject-no-local-endpoints=false` (its egress program
    /// drops the socket's packets: `drop_no_local_backend`). By default the eBPF mode refuses
    /// the connection at once instead (`drop_no_backend`), a documented difference.
    fn internal_traffic_policy_local_without_a_local_endpoint_drops_or_refuses(mode) {
        kpr_lab::require_lab("itp_drop");
        let eps = [("10.244.1.12", "node2"), ("10.244.1.13", "node2")];
        let vip: SocketAddr = VIP.parse().unwrap();
        let variants: &[(&[&str], &str, Option<&str>)] = match mode {
            ProxyMode::Ebpf => &[
                (&[], "ECONNREFUSED", Some("drop_no_backend")),
                (&["--reject-no-local-endpoints=false"], "ETIMEDOUT", Some("drop_no_local_backend")),
            ],
            _ => &[(&[], "ETIMEDOUT", None)],
        };
        for (extra, error, counter) in variants {
            let spec = LabSpec {
                prefix: Lab::unique_prefix("itpd"),
                clients: 1,
                ..LabSpec::default()
            };
            let mut s = Setup::with_args(spec, &manifest(None, true, &eps), mode, extra);
            s.kpr
                .wait_for_frontend(FRONTEND, "no local endpoint", |f| f.backends.is_empty())
                .unwrap();
            let c = s.lab.clients()[0].clone();
            let before = counter.map(|k| s.kpr.counters_now().unwrap()[k]);
            let once = s
                .lab
                .connect_once(&c, vip, Duration::from_millis(500))
                .unwrap();
            assert_eq!(once.error.as_deref(), Some(*error), "{extra:?}: {once:?}");
            if let (Some(k), Some(before)) = (counter, before) {
                let after = s.kpr.counters_now().unwrap()[*k];
                assert!(after > before, "{extra:?}: {k} {before} → {after}");
            }
        }
    }
}

/// `demo/echo6`: [`manifest`] as a SingleStack IPv6 Service on `[fd00:10:96::10]:80`.
fn manifest6(affinity_timeout: Option<u32>, itp_local: bool, endpoints: &[(&str, &str)]) -> String {
    let v4 = manifest(affinity_timeout, itp_local, endpoints);
    let mut y = v4
        .replace("name: echo,", "name: echo6,")
        .replace("name: echo-1", "name: echo6-1")
        .replace("service-name: echo}", "service-name: echo6}")
        .replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: \"fd00:10:96::10\"\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n",
        )
        .replace("addressType: IPv4", "addressType: IPv6");
    for (ip, _) in endpoints {
        y = y.replace(
            &format!("addresses: [{ip}]"),
            &format!("addresses: [\"{}\"]", v6_of(ip)),
        );
    }
    y
}

/// A lab pod's IPv6 address from its IPv4 one (10.244.N.H → fd00:10:244:N::H, hex).
fn v6_of(ip: &str) -> String {
    let o: Vec<u8> = ip.split('.').map(|p| p.parse().unwrap()).collect();
    format!("fd00:10:244:{}::{:x}", o[2], o[3])
}

const FRONTEND6: &str = "[fd00:10:96::10]:80/tcp";
const VIP6: &str = "[fd00:10:96::10]:80";

per_mode! {
    /// ClientIP affinity over IPv6: each client stays on one backend (in the eBPF mode every
    /// connection after the first reused it, by the datapath's counter).
    fn client_ip_affinity_over_ipv6(mode) {
        kpr_lab::require_lab("affinity6");
        let mut s = Setup::new("aff6", 2, &manifest6(Some(60), false, &ALL), mode);
        s.kpr
            .wait_for_frontend(FRONTEND6, "affinity 60 s", |f| {
                f.affinity_timeout_s == Some(60) && f.backends.len() == 3
            })
            .unwrap();
        let (c1, c2) = (s.lab.clients()[0].clone(), s.lab.clients()[1].clone());
        let vip: SocketAddr = VIP6.parse().unwrap();
        let ebpf = mode == ProxyMode::Ebpf;
        let base = if ebpf { s.reused() } else { 0 };
        let r = s.lab.tcp_spread(&c1, vip, 50).unwrap();
        assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
        assert_eq!(r.counts.len(), 1, "one client spread over backends: {r:?}");
        let r2 = s.lab.tcp_spread(&c2, vip, 20).unwrap();
        assert_eq!(r2.counts.len(), 1, "{r2:?}");
        if ebpf {
            assert_eq!(s.reused() - base, 49 + 19);
        }
        // Without affinity the same client spreads.
        write_manifest(&s.file, &manifest6(None, false, &ALL));
        s.kpr
            .wait_for_frontend(FRONTEND6, "no affinity", |f| f.affinity_timeout_s.is_none())
            .unwrap();
        let spread = s.lab.tcp_spread(&c1, vip, 60).unwrap();
        assert!(spread.counts.len() >= 2, "affinity still on: {spread:?}");
    }
}

per_mode! {
    /// internalTrafficPolicy: Local over IPv6: only this node's endpoint answers.
    fn internal_traffic_policy_local_over_ipv6(mode) {
        kpr_lab::require_lab("itp_local6");
        let eps = [
            ("10.244.1.11", "node1"),
            ("10.244.1.12", "node2"),
            ("10.244.1.13", "node2"),
        ];
        let mut s = Setup::new("itp6", 1, &manifest6(None, true, &eps), mode);
        s.kpr
            .wait_for_frontend(FRONTEND6, "the local endpoint", |f| f.backends.len() == 1)
            .unwrap();
        let c = s.lab.clients()[0].clone();
        let vip: SocketAddr = VIP6.parse().unwrap();
        let r = s.lab.tcp_spread(&c, vip, 60).unwrap();
        assert_eq!(r.errors, 0, "{r:?}\n{}", s.kpr.log());
        assert_eq!(r.counts.keys().collect::<Vec<_>>(), vec!["be1"], "{r:?}");
    }
}
