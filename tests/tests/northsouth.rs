//! Traffic from outside the node: NodePort, externalIPs, LoadBalancer IPs through kpr's tc
//! programs, on a two-node lab with an external client (issue 4's acceptance), plus the pod-side
//! cases (pod → another node's NodePort, hairpin). One kpr per node, each on the same manifest
//! directory with its own Node object, attached to its node's fabric device.
//!
//! Lab: node1 192.168.100.11 (be1 10.244.1.11, be2 10.244.1.12, cl1 10.244.1.21),
//! node2 192.168.100.12 (be3 10.244.2.11), external client 192.168.100.100.

use std::net::SocketAddr;
use std::time::Duration;

use kpr_lab::kpr::{assert_refused, kpr_path, Kpr, ProxyMode, Refusal};
use kpr_lab::tool::UdpMode;
use kpr_lab::{per_mode, Lab, LabSpec};

const NODE1: &str = "192.168.100.11";
const NODE2: &str = "192.168.100.12";
const EXT: &str = "192.168.100.100";

fn svc(name: &str, spec: &str, endpoints: &[(&str, &str)], ports: &str) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n{spec}---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: {ports}\n"
    );
    if endpoints.is_empty() {
        y += "endpoints: []\n";
    } else {
        y += "endpoints:\n";
        for (ip, node) in endpoints {
            y += &format!(
                "  - {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: {node}}}\n"
            );
        }
    }
    y + "---\n"
}

const HTTP: &str = "[{name: http, protocol: TCP, port: 8080}]";
const ALL: [(&str, &str); 3] = [
    ("10.244.1.11", "node1"),
    ("10.244.1.12", "node1"),
    ("10.244.2.11", "node2"),
];

fn manifests() -> String {
    let mut y = String::new();
    for (n, ip) in [("node1", NODE1), ("node2", NODE2)] {
        y += &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}]\n---\n");
    }
    // NodePort (TCP and UDP) with an externalIP, externalTrafficPolicy: Cluster.
    y += &svc(
        "np",
        "  type: NodePort\n  clusterIP: 10.96.1.1\n  externalIPs: [203.0.113.70]\n  ports:\n  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}\n  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}\n",
        &ALL,
        "[{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 5353}]",
    );
    // LoadBalancer, externalTrafficPolicy: Local, endpoint on node1 only.
    y += &svc(
        "local",
        "  type: LoadBalancer\n  clusterIP: 10.96.1.2\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30082}]\n",
        &[("10.244.1.11", "node1")],
        HTTP,
    );
    // No endpoints.
    y += &svc(
        "empty",
        "  type: NodePort\n  clusterIP: 10.96.1.3\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30083}]\n",
        &[],
        HTTP,
    );
    // externalTrafficPolicy: Local and no endpoint anywhere.
    y += &svc(
        "local-empty",
        "  type: NodePort\n  clusterIP: 10.96.1.8\n  externalTrafficPolicy: Local\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30087}]\n",
        &[],
        HTTP,
    );
    // Session affinity.
    y += &svc(
        "aff",
        "  type: NodePort\n  clusterIP: 10.96.1.4\n  sessionAffinity: ClientIP\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30084}]\n",
        &ALL,
        HTTP,
    );
    // Hairpin: be1's own Service.
    y += &svc(
        "self",
        "  clusterIP: 10.96.1.5\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n",
        &[("10.244.1.11", "node1")],
        HTTP,
    );
    // LoadBalancer IPs with source ranges: one allowing the external client, one not.
    for (name, ip, cidr, np, cip) in [
        (
            "lb-ok",
            "203.0.113.60",
            "192.168.100.100/32",
            30085,
            "10.96.1.6",
        ),
        ("lb-no", "203.0.113.61", "10.0.0.0/8", 30086, "10.96.1.7"),
    ] {
        y += &svc(
            name,
            &format!("  type: LoadBalancer\n  clusterIP: {cip}\n  loadBalancerSourceRanges: [{cidr}]\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {np}}}]\n"),
            &ALL,
            HTTP,
        );
        // The status is part of the Service object: append it to the Service document.
        y = y.replacen(
            &format!("  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {np}}}]\n---\n"),
            &format!("  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {np}}}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: {ip}}}]\n---\n"),
            1,
        );
    }
    y
}

struct TwoNodes {
    lab: Lab,
    kprs: Vec<Kpr>,
}

fn two_nodes(tag: &str, mode: ProxyMode) -> TwoNodes {
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
    std::fs::write(dir.join("all.yaml"), manifests()).unwrap();
    // The external client reaches LoadBalancer and external IPs through node1.
    lab.route_external_via("203.0.113.0/24", NODE1)
        .expect("route to the LB IPs");
    let mut kprs = Vec::new();
    for n in 1..=2 {
        let node = format!("node{n}");
        let args = [
            "--manifests",
            dir.to_str().unwrap(),
            "--hostname-override",
            &node,
            "--devices",
            "eth0",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            mode.args()[0],
            mode.args()[1],
        ];
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        kprs.push(Kpr::start_on(&lab, n, &kpr_path(), "kpr", &args).expect("kpr start"));
    }
    TwoNodes { lab, kprs }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
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

per_mode! {
    fn external_client_reaches_nodeports_external_ips_and_lb_ips_on_both_nodes(mode) {
        kpr_lab::require_lab("northsouth");
        let t = two_nodes("ns", mode);
        let ext = t.ext();
        for target in [
            format!("{NODE1}:30080"),
            format!("{NODE2}:30080"),
            "203.0.113.70:80".to_string(),
            "203.0.113.60:80".to_string(),
        ] {
            let r = t.lab.tcp_spread(&ext, addr(&target), 90).unwrap();
            assert_eq!(r.errors, 0, "{target}: {r:?}\n{}", t.logs());
            // Local and remote backends alike (be3 lives on node2).
            assert_eq!(r.counts.len(), 3, "{target}: {r:?}");
            // externalTrafficPolicy: Cluster masquerades: backends see a node address.
            assert!(
                !r.clients.contains_key(EXT),
                "{target}: client address leaked: {r:?}"
            );
        }
        // UDP NodePort: replies come back from the NodePort address.
        let r = t
            .lab
            .udp_spread(
                &ext,
                addr(&format!("{NODE1}:30053")),
                60,
                UdpMode::SocketPerRequest,
            )
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}\n{}", t.logs());
        assert_eq!(r.counts.len(), 3, "{r:?}");
        assert_eq!(
            r.sources.keys().collect::<Vec<_>>(),
            vec![&format!("{NODE1}:30053")],
            "{r:?}"
        );
    }
}

per_mode! {
    fn external_traffic_policy_local_keeps_the_client_address_and_health_checks(mode) {
        kpr_lab::require_lab("northsouth_local");
        let mut t = two_nodes("nsl", mode);
        let ext = t.ext();
        let r = t
            .lab
            .tcp_spread(&ext, addr(&format!("{NODE1}:30082")), 20)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}\n{}", t.logs());
        assert_eq!(r.counts.keys().collect::<Vec<_>>(), vec!["be1"], "{r:?}");
        assert_eq!(
            r.clients.keys().collect::<Vec<_>>(),
            vec![EXT],
            "client address not kept: {r:?}"
        );
        // node2 has no local endpoint: node2 drops it (its counter says so: the tc program's, or
        // the netfilter mode's DROP rule), it is not forwarded to node1's endpoint.
        let before = t.kprs[1].refusals(mode, Refusal::NoLocalEndpoints);
        let once = t
            .lab
            .connect_once(
                &ext,
                addr(&format!("{NODE2}:30082")),
                Duration::from_millis(500),
            )
            .unwrap();
        assert_eq!(
            once.error.as_deref(),
            Some("ETIMEDOUT"),
            "node without local endpoints: {once:?}"
        );
        let after = t.kprs[1].refusals(mode, Refusal::NoLocalEndpoints);
        assert_refused(before, after, 1, "node2 for its missing local endpoint");
        // The health-check node port tells a load balancer which node to use.
        let h1 = t
            .lab
            .http_get(&ext, addr(&format!("{NODE1}:32000")), "/")
            .unwrap();
        let h2 = t
            .lab
            .http_get(&ext, addr(&format!("{NODE2}:32000")), "/")
            .unwrap();
        assert_eq!(h1.status, 200, "{h1:?}");
        assert!(h1.body.contains("\"localEndpoints\": 1"), "{h1:?}");
        assert_eq!(h2.status, 503, "{h2:?}");
    }
}

per_mode! {
    fn no_endpoints_refused_fast_and_source_ranges_enforced(mode) {
        kpr_lab::require_lab("northsouth_refuse");
        let mut t = two_nodes("nsr", mode);
        let ext = t.ext();
        // Refused, not timed out: ebpf: node1's tc program passes the packet to the stack
        // (counted), whose reject rule in kpr's table answers; netfilter modes: their REJECT
        // rule (counted). How fast is the benchmark's to say.
        let counter = |t: &mut TwoNodes, r: Refusal| t.kprs[0].refusals(mode, r);
        let before = counter(&mut t, Refusal::NoEndpointsFromOutside);
        let once = t
            .lab
            .connect_once(
                &ext,
                addr(&format!("{NODE1}:30083")),
                Duration::from_secs(2),
            )
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
            .connect_once(&ext, addr(&format!("{NODE1}:30087")), Duration::from_secs(2))
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
            .connect_once(&cl1, addr("10.96.1.3:80"), Duration::from_secs(2))
            .unwrap();
        assert_eq!(once.error.as_deref(), Some("ECONNREFUSED"), "{once:?}");
        let after = counter(&mut t, Refusal::NoEndpoints);
        assert_refused(before, after, 1, "node1, ClusterIP without endpoints");

        // The control: an LB IP whose ranges allow the external client.
        let ok = t.lab.tcp_spread(&ext, addr("203.0.113.60:80"), 10).unwrap();
        assert_eq!(ok.errors, 0, "allowed source refused: {ok:?}");
        let before = counter(&mut t, Refusal::SourceRange);
        let no = t
            .lab
            .connect_once(&ext, addr("203.0.113.61:80"), Duration::from_millis(500))
            .unwrap();
        assert_eq!(
            no.error.as_deref(),
            Some("ETIMEDOUT"),
            "source outside loadBalancerSourceRanges: {no:?}"
        );
        let after = counter(&mut t, Refusal::SourceRange);
        assert_refused(before, after, 1, "node1, source outside the ranges");
    }
}

per_mode! {
    /// loadBalancerSourceRanges hold for clients on the node too (kube-proxy's TestLoadBalancer
    /// "pod to LB1 blocked"): a pod or host process outside the ranges is dropped, one inside
    /// them is served. The eBPF mode checks the source of a socket's first packet to its
    /// backend in a cgroup egress program (the source is not known at connect()).
    fn source_ranges_hold_for_clients_on_the_node(mode) {
        kpr_lab::require_lab("northsouth_ranges_local");
        let mut t = two_nodes("nsl", mode);
        let pod = t.lab.clients()[0].clone();
        let host = t.lab.host_network_pod(1).unwrap();
        let counter = |t: &mut TwoNodes| t.kprs[0].refusals(mode, Refusal::SourceRange);
        // lb-no allows 10.0.0.0/8, the pods' network: the control.
        let ok = t.lab.tcp_spread(&pod, addr("203.0.113.61:80"), 10).unwrap();
        assert_eq!(ok.errors, 0, "a pod inside the ranges refused: {ok:?}\n{}", t.logs());
        // lb-ok allows only the external client: not the pod, not the node itself.
        for (client, what) in [(&pod, "a pod"), (&host, "a host process")] {
            let before = counter(&mut t);
            let no = t
                .lab
                .connect_once(client, addr("203.0.113.60:80"), Duration::from_millis(500))
                .unwrap();
            assert_eq!(
                no.error.as_deref(),
                Some("ETIMEDOUT"),
                "{what} outside loadBalancerSourceRanges: {no:?}\n{}",
                t.logs()
            );
            let after = counter(&mut t);
            assert_refused(before, after, 1, &format!("node1, {what} outside the ranges"));
        }
        // The ClusterIP of the same Service has no ranges.
        let ok = t.lab.tcp_spread(&pod, addr("10.96.1.6:80"), 10).unwrap();
        assert_eq!(ok.errors, 0, "ClusterIP of a Service with ranges: {ok:?}");
    }
}

per_mode! {
    fn affinity_from_outside_pod_to_other_nodes_nodeport_and_hairpin(mode) {
        kpr_lab::require_lab("northsouth_misc");
        let t = two_nodes("nsm", mode);
        let ext = t.ext();
        let r = t
            .lab
            .tcp_spread(&ext, addr(&format!("{NODE1}:30084")), 30)
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
            .tcp_spread(&cl1, addr(&format!("{NODE2}:30080")), 60)
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}\n{}", t.logs());
        assert_eq!(r.counts.len(), 3, "{r:?}");

        // Hairpin: be1 → its own Service, whose only backend is be1.
        let be1 = t.lab.pod("be1").unwrap().clone();
        let r = t.lab.tcp_spread(&be1, addr("10.96.1.5:80"), 10).unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.counts.keys().collect::<Vec<_>>(), vec!["be1"], "{r:?}");
    }
}
