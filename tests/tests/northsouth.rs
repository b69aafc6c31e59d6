//! Traffic from outside the node: NodePort, externalIPs, LoadBalancer IPs through kpr's tc
//! programs, on a two-node lab with an external client (issue 4's acceptance), plus the pod-side
//! cases (pod → another node's NodePort, hairpin). One kpr per node, each on the same manifest
//! directory with its own Node object, attached to its node's fabric device.
//!
//! Lab: node1 192.168.100.11 (be1 10.244.1.11, be2 10.244.1.12, cl1 10.244.1.21),
//! node2 192.168.100.12 (be3 10.244.2.11), external client 192.168.100.100.

use std::net::SocketAddr;
use std::time::Duration;

use kpr_lab::kpr::{assert_refused, Kpr, ProxyMode, Refusal};
use kpr_lab::tool::UdpMode;
use kpr_lab::{per_mode, Lab, LabSpec};

/// One family's addresses in the lab (see `Lab`): the tests run over each.
struct Net {
    node1: &'static str,
    node2: &'static str,
    ext: &'static str,
    /// The Services' ClusterIPs are `<cluster_prefix><n>` (n = 1..8).
    cluster_prefix: &'static str,
    external_ip: &'static str,
    lb_ok: &'static str,
    lb_no: &'static str,
    /// What the external client routes to node1 for the LB and external IPs.
    lb_route: &'static str,
    /// lb-ok allows only the external client; lb-no only the pods' network.
    ext_cidr: &'static str,
    pods_cidr: &'static str,
    /// be1, be2 (node1), be3 (node2).
    endpoints: [(&'static str, &'static str); 3],
    address_type: &'static str,
    /// Spec lines that make a Service of this family.
    family_spec: &'static str,
}

const V4: Net = Net {
    node1: "192.168.100.11",
    node2: "192.168.100.12",
    ext: "192.168.100.100",
    cluster_prefix: "10.96.1.",
    external_ip: "203.0.113.70",
    lb_ok: "203.0.113.60",
    lb_no: "203.0.113.61",
    lb_route: "203.0.113.0/24",
    ext_cidr: "192.168.100.100/32",
    pods_cidr: "10.0.0.0/8",
    endpoints: [
        ("10.244.1.11", "node1"),
        ("10.244.1.12", "node1"),
        ("10.244.2.11", "node2"),
    ],
    address_type: "IPv4",
    family_spec: "",
};

/// The same lab over IPv6 (`Lab`'s fd00:: addresses), with SingleStack IPv6 Services.
const V6: Net = Net {
    node1: "fd00:192:168:100::b",
    node2: "fd00:192:168:100::c",
    ext: "fd00:192:168:100::64",
    cluster_prefix: "fd00:10:96::1:",
    external_ip: "2001:db8::70",
    lb_ok: "2001:db8::60",
    lb_no: "2001:db8::61",
    lb_route: "2001:db8::/64",
    ext_cidr: "fd00:192:168:100::64/128",
    pods_cidr: "fd00:10:244::/48",
    endpoints: [
        ("fd00:10:244:1::b", "node1"),
        ("fd00:10:244:1::c", "node1"),
        ("fd00:10:244:2::b", "node2"),
    ],
    address_type: "IPv6",
    family_spec: "  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n",
};

impl Net {
    fn cluster_ip(&self, n: u8) -> String {
        format!("{}{n}", self.cluster_prefix)
    }

    /// `ip`:`port` as a socket address (IPv6 in brackets).
    fn at(&self, ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    /// A Service `ns/<name>` with `spec` (its clusterIP line included), this family's, and one
    /// EndpointSlice of this family with `endpoints` (ip, node) and `ports`.
    fn svc(&self, name: &str, spec: &str, endpoints: &[(&str, &str)], ports: &str) -> String {
        let mut y = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n{}{spec}---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {}\nports: {ports}\n",
            self.family_spec, self.address_type
        );
        if endpoints.is_empty() {
            y += "endpoints: []\n";
        } else {
            y += "endpoints:\n";
            for (ip, node) in endpoints {
                y += &format!(
                    "  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {node}}}\n"
                );
            }
        }
        y + "---\n"
    }

    fn manifests(&self) -> String {
        let mut y = String::new();
        // Dual-stack nodes: an InternalIP of each family.
        for (n, ip, ip6) in [("node1", V4.node1, V6.node1), ("node2", V4.node2, V6.node2)] {
            y += &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}, {{type: InternalIP, address: \"{ip6}\"}}]\n---\n");
        }
        let cip = |n| format!("  clusterIP: \"{}\"\n", self.cluster_ip(n));
        let all = &self.endpoints;
        // NodePort (TCP and UDP) with an externalIP, externalTrafficPolicy: Cluster.
        y += &self.svc(
            "np",
            &format!("  type: NodePort\n{}  externalIPs: [\"{}\"]\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}\n  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}}\n", cip(1), self.external_ip),
            all,
            "[{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 5353}]",
        );
        // LoadBalancer, externalTrafficPolicy: Local, endpoint on node1 only.
        y += &self.svc(
            "local",
            &format!("  type: LoadBalancer\n{}  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30082}}]\n", cip(2)),
            &all[..1],
            HTTP,
        );
        // No endpoints.
        y += &self.svc(
            "empty",
            &format!("  type: NodePort\n{}  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30083}}]\n", cip(3)),
            &[],
            HTTP,
        );
        // externalTrafficPolicy: Local and no endpoint anywhere.
        y += &self.svc(
            "local-empty",
            &format!("  type: NodePort\n{}  externalTrafficPolicy: Local\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30087}}]\n", cip(8)),
            &[],
            HTTP,
        );
        // Session affinity.
        y += &self.svc(
            "aff",
            &format!("  type: NodePort\n{}  sessionAffinity: ClientIP\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30084}}]\n", cip(4)),
            all,
            HTTP,
        );
        // Hairpin: be1's own Service.
        y += &self.svc(
            "self",
            &format!(
                "{}  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]\n",
                cip(5)
            ),
            &all[..1],
            HTTP,
        );
        // LoadBalancer IPs with source ranges: one allowing the external client, one not.
        for (name, ip, cidr, np, n) in [
            ("lb-ok", self.lb_ok, self.ext_cidr, 30085, 6),
            ("lb-no", self.lb_no, self.pods_cidr, 30086, 7),
        ] {
            y += &self.svc(
                name,
                &format!("  type: LoadBalancer\n{}  loadBalancerSourceRanges: [\"{cidr}\"]\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {np}}}]\n", cip(n)),
                all,
                HTTP,
            );
            // The status is part of the Service object: append it to the Service document.
            y = y.replacen(
                &format!("  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {np}}}]\n---\n"),
                &format!("  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {np}}}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: \"{ip}\"}}]\n---\n"),
                1,
            );
        }
        y
    }
}

const HTTP: &str = "[{name: http, protocol: TCP, port: 8080}]";

struct TwoNodes {
    lab: Lab,
    kprs: Vec<Kpr>,
}

fn two_nodes(tag: &str, mode: ProxyMode, net: &Net) -> TwoNodes {
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix(tag),
        nodes: 2,
        backends_per_node: vec![2, 1],
        clients_per_node: vec![1, 0],
        external_client: true,
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    std::fs::write(dir.join("all.yaml"), net.manifests()).unwrap();
    // The external client reaches LoadBalancer and external IPs through node1.
    lab.route_external_via(net.lb_route, net.node1)
        .expect("route to the LB IPs");
    let kprs = Kpr::start_on_every_node(&lab, &dir, mode).expect("kpr start");
    TwoNodes { lab, kprs }
}

impl TwoNodes {
    fn ext(&self) -> kpr_lab::Pod {
        self.lab.external_client().unwrap().clone()
    }
    fn logs(&self) -> String {
        self.kprs
            .iter()
            .map(|k| k.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

fn external_client_reaches_nodeports_external_ips_and_lb_ips(mode: ProxyMode, net: &Net) {
    kpr_lab::require_lab("northsouth");
    let t = two_nodes("ns", mode, net);
    let ext = t.ext();
    for target in [
        net.at(net.node1, 30080),
        net.at(net.node2, 30080),
        net.at(net.external_ip, 80),
        net.at(net.lb_ok, 80),
    ] {
        let r = t.lab.tcp_spread(&ext, target, 90).unwrap();
        assert_eq!(r.errors, 0, "{target}: {r:?}\n{}", t.logs());
        // Local and remote backends alike (be3 lives on node2).
        assert_eq!(r.counts.len(), 3, "{target}: {r:?}");
        // externalTrafficPolicy: Cluster masquerades: backends see a node address.
        assert!(
            !r.clients.contains_key(net.ext),
            "{target}: client address leaked: {r:?}"
        );
    }
    // UDP NodePort: replies come back from the NodePort address.
    let target = net.at(net.node1, 30053);
    let r = t
        .lab
        .udp_spread(&ext, target, 60, UdpMode::SocketPerRequest)
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}\n{}", t.logs());
    assert_eq!(r.counts.len(), 3, "{r:?}");
    assert_eq!(
        r.sources.keys().collect::<Vec<_>>(),
        vec![&target.to_string()],
        "{r:?}"
    );
}

per_mode! {
    fn external_client_reaches_nodeports_external_ips_and_lb_ips_on_both_nodes(mode) {
        external_client_reaches_nodeports_external_ips_and_lb_ips(mode, &V4)
    }
}

per_mode! {
    fn external_client_reaches_nodeports_external_ips_and_lb_ips_over_ipv6(mode) {
        external_client_reaches_nodeports_external_ips_and_lb_ips(mode, &V6)
    }
}

fn external_traffic_policy_local(mode: ProxyMode, net: &Net) {
    kpr_lab::require_lab("northsouth_local");
    let mut t = two_nodes("nsl", mode, net);
    let ext = t.ext();
    let r = t
        .lab
        .tcp_spread(&ext, net.at(net.node1, 30082), 20)
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}\n{}", t.logs());
    assert_eq!(r.counts.keys().collect::<Vec<_>>(), vec!["be1"], "{r:?}");
    assert_eq!(
        r.clients.keys().collect::<Vec<_>>(),
        vec![net.ext],
        "client address not kept: {r:?}"
    );
    // node2 has no local endpoint: node2 drops it (its counter says so: the tc program's, or
    // the netfilter mode's DROP rule), it is not forwarded to node1's endpoint. The IPVS mode
    // refuses instead, as kube-proxy's does: its virtual server has no real server, and IPVS
    // answers that with ICMP port unreachable (docs/DESIGN.md, "Differences between the
    // modes").
    let before = t.kprs[1].refusals(mode, Refusal::NoLocalEndpoints);
    let once = t
        .lab
        .connect_once(&ext, net.at(net.node2, 30082), Duration::from_millis(500))
        .unwrap();
    let refused_as = if mode == ProxyMode::Ipvs {
        "ECONNREFUSED"
    } else {
        "ETIMEDOUT"
    };
    assert_eq!(
        once.error.as_deref(),
        Some(refused_as),
        "node without local endpoints: {once:?}"
    );
    let after = t.kprs[1].refusals(mode, Refusal::NoLocalEndpoints);
    assert_refused(before, after, 1, "node2 for its missing local endpoint");
    // The health-check node port tells a load balancer which node to use.
    let h1 = t.lab.http_get(&ext, net.at(net.node1, 32000), "/").unwrap();
    let h2 = t.lab.http_get(&ext, net.at(net.node2, 32000), "/").unwrap();
    assert_eq!(h1.status, 200, "{h1:?}");
    assert!(h1.body.contains("\"localEndpoints\": 1"), "{h1:?}");
    assert_eq!(h2.status, 503, "{h2:?}");
}

per_mode! {
    fn external_traffic_policy_local_keeps_the_client_address_and_health_checks(mode) {
        external_traffic_policy_local(mode, &V4)
    }
}

per_mode! {
    fn external_traffic_policy_local_over_ipv6(mode) {
        external_traffic_policy_local(mode, &V6)
    }
}

fn no_endpoints_and_source_ranges(mode: ProxyMode, net: &Net) {
    kpr_lab::require_lab("northsouth_refuse");
    let mut t = two_nodes("nsr", mode, net);
    let ext = t.ext();
    // Refused, not timed out: ebpf: node1's tc program passes the packet to the stack
    // (counted), whose reject rule in kpr's table answers; netfilter modes: their REJECT
    // rule (counted). How fast is the benchmark's to say.
    let counter = |t: &mut TwoNodes, r: Refusal| t.kprs[0].refusals(mode, r);
    let before = counter(&mut t, Refusal::NoEndpointsFromOutside);
    let once = t
        .lab
        .connect_once(&ext, net.at(net.node1, 30083), Duration::from_secs(2))
        .unwrap();
    assert_eq!(
        once.error.as_deref(),
        Some("ECONNREFUSED"),
        "{once:?}\n{}",
        t.logs()
    );
    let after = counter(&mut t, Refusal::NoEndpointsFromOutside);
    assert_refused(before, after, 1, "node1, NodePort without endpoints");
    // externalTrafficPolicy: Local with no endpoint anywhere is refused too (kube-proxy's
    // "has no endpoints" REJECT), not dropped as when endpoints exist on other nodes.
    let once = t
        .lab
        .connect_once(&ext, net.at(net.node1, 30087), Duration::from_secs(2))
        .unwrap();
    assert_eq!(
        once.error.as_deref(),
        Some("ECONNREFUSED"),
        "eTP=Local without any endpoint: {once:?}\n{}",
        t.logs()
    );
    // From a pod: kpr's connect hook, or the netfilter mode's REJECT rule, refuses it.
    let cl1 = t.lab.clients()[0].clone();
    let before = counter(&mut t, Refusal::NoEndpoints);
    let once = t
        .lab
        .connect_once(&cl1, net.at(&net.cluster_ip(3), 80), Duration::from_secs(2))
        .unwrap();
    assert_eq!(once.error.as_deref(), Some("ECONNREFUSED"), "{once:?}");
    let after = counter(&mut t, Refusal::NoEndpoints);
    assert_refused(before, after, 1, "node1, ClusterIP without endpoints");

    // The control: an LB IP whose ranges allow the external client.
    let ok = t.lab.tcp_spread(&ext, net.at(net.lb_ok, 80), 10).unwrap();
    assert_eq!(ok.errors, 0, "allowed source refused: {ok:?}\n{}", t.logs());
    let before = counter(&mut t, Refusal::SourceRange);
    let no = t
        .lab
        .connect_once(&ext, net.at(net.lb_no, 80), Duration::from_millis(500))
        .unwrap();
    assert_eq!(
        no.error.as_deref(),
        Some("ETIMEDOUT"),
        "source outside loadBalancerSourceRanges: {no:?}"
    );
    let after = counter(&mut t, Refusal::SourceRange);
    assert_refused(before, after, 1, "node1, source outside the ranges");
}

per_mode! {
    fn no_endpoints_refused_fast_and_source_ranges_enforced(mode) {
        no_endpoints_and_source_ranges(mode, &V4)
    }
}

per_mode! {
    fn no_endpoints_refused_fast_and_source_ranges_enforced_over_ipv6(mode) {
        no_endpoints_and_source_ranges(mode, &V6)
    }
}

/// loadBalancerSourceRanges hold for clients on the node too (kube-proxy's TestLoadBalancer
/// "pod to LB1 blocked"): a pod or host process outside the ranges is dropped, one inside them
/// is served. The eBPF mode checks the source of a socket's first packet to its backend in a
/// cgroup egress program (the source is not known at connect()).
fn source_ranges_for_clients_on_the_node(mode: ProxyMode, net: &Net) {
    kpr_lab::require_lab("northsouth_ranges_local");
    let mut t = two_nodes("nsl", mode, net);
    let pod = t.lab.clients()[0].clone();
    let host = t.lab.host_network_pod(1).unwrap();
    let counter = |t: &mut TwoNodes| t.kprs[0].refusals(mode, Refusal::SourceRange);
    // lb-no allows the pods' network: the control.
    let ok = t.lab.tcp_spread(&pod, net.at(net.lb_no, 80), 10).unwrap();
    assert_eq!(
        ok.errors,
        0,
        "a pod inside the ranges refused: {ok:?}\n{}",
        t.logs()
    );
    // lb-ok allows only the external client: not the pod, not the node itself.
    for (client, what) in [(&pod, "a pod"), (&host, "a host process")] {
        let before = counter(&mut t);
        let no = t
            .lab
            .connect_once(client, net.at(net.lb_ok, 80), Duration::from_millis(500))
            .unwrap();
        assert_eq!(
            no.error.as_deref(),
            Some("ETIMEDOUT"),
            "{what} outside loadBalancerSourceRanges: {no:?}\n{}",
            t.logs()
        );
        let after = counter(&mut t);
        assert_refused(
            before,
            after,
            1,
            &format!("node1, {what} outside the ranges"),
        );
    }
    // The ClusterIP of the same Service has no ranges.
    let ok = t
        .lab
        .tcp_spread(&pod, net.at(&net.cluster_ip(6), 80), 10)
        .unwrap();
    assert_eq!(ok.errors, 0, "ClusterIP of a Service with ranges: {ok:?}");
}

per_mode! {
    fn source_ranges_hold_for_clients_on_the_node(mode) {
        source_ranges_for_clients_on_the_node(mode, &V4)
    }
}

per_mode! {
    fn source_ranges_hold_for_clients_on_the_node_over_ipv6(mode) {
        source_ranges_for_clients_on_the_node(mode, &V6)
    }
}

fn affinity_pod_to_other_node_and_hairpin(mode: ProxyMode, net: &Net) {
    kpr_lab::require_lab("northsouth_misc");
    let t = two_nodes("nsm", mode, net);
    let ext = t.ext();
    let r = t
        .lab
        .tcp_spread(&ext, net.at(net.node1, 30084), 30)
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}\n{}", t.logs());
    assert_eq!(
        r.counts.len(),
        1,
        "affinity from the external client: {r:?}"
    );

    // A pod on node1 → node2's NodePort (translated by node2's tc programs).
    let cl1 = t.lab.clients()[0].clone();
    let r = t
        .lab
        .tcp_spread(&cl1, net.at(net.node2, 30080), 60)
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}\n{}", t.logs());
    assert_eq!(r.counts.len(), 3, "{r:?}");

    // Hairpin: be1 → its own Service, whose only backend is be1.
    let be1 = t.lab.pod("be1").unwrap().clone();
    let r = t
        .lab
        .tcp_spread(&be1, net.at(&net.cluster_ip(5), 80), 10)
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.counts.keys().collect::<Vec<_>>(), vec!["be1"], "{r:?}");
}

per_mode! {
    fn affinity_from_outside_pod_to_other_nodes_nodeport_and_hairpin(mode) {
        affinity_pod_to_other_node_and_hairpin(mode, &V4)
    }
}

per_mode! {
    fn affinity_pod_to_other_nodes_nodeport_and_hairpin_over_ipv6(mode) {
        affinity_pod_to_other_node_and_hairpin(mode, &V6)
    }
}
