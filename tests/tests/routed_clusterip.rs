//! ClusterIP traffic routed to the node (issue 10, item 4): a router that sends the Service
//! CIDR to a node, or a sandboxed runtime's guest whose packets reach the node without a socket
//! of the node's. kube-proxy translates ClusterIPs in PREROUTING, so such traffic reaches the
//! Service; it masquerades it with `--masquerade-all`, or when the local-traffic detector
//! (`--detect-local-mode`: by default ClusterCIDR with `--cluster-cidr`, or NodeCIDR,
//! InterfaceNamePrefix, BridgeInterface) says it is not local, and otherwise not at all. kpr
//! does the same in every mode (the eBPF mode in its tc programs).
//!
//! Lab: node1 192.168.100.11 with be1..be3 (10.244.1.11..13, all local, so replies of flows
//! that are not masqueraded come back through node1 too); the external client
//! 192.168.100.100 routes the ClusterIP range through node1.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use kpr_lab::kpr::{kpr_path, Kpr, ProxyMode};
use kpr_lab::per_mode;

const CLIENT: &str = "192.168.100.100";
const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: routed, namespace: ns}\nspec:\n  clusterIP: 10.96.5.1\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: routed-1\n  namespace: ns\n  labels: {kubernetes.io/service-name: routed}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n\
- {addresses: [10.244.1.11], conditions: {ready: true}, nodeName: node1}\n\
- {addresses: [10.244.1.12], conditions: {ready: true}, nodeName: node1}\n\
- {addresses: [10.244.1.13], conditions: {ready: true}, nodeName: node1}\n";

per_mode! {
    fn clusterip_traffic_routed_to_the_node_is_served_and_masqueraded_as_kube_proxy_does(mode) {
        let tag = format!("rcip-{}", mode.name());
        let (lab, dir) = kpr_lab::external_client_lab(&tag, SERVICE);
        lab.route_external_via("10.96.5.0/24", "192.168.100.11")
            .expect("route to the ClusterIPs");
        let ext = lab.external_client().unwrap().clone();
        let target: SocketAddr = "10.96.5.1:80".parse().unwrap();
        let all: BTreeSet<String> = ["be1", "be2", "be3"].iter().map(|s| s.to_string()).collect();
        // (flags, the Node's pod CIDR, masqueraded)
        let variants: [(&[&str], &str, bool); 9] = [
            (&[], "10.244.1.0/24", false),
            (&["--cluster-cidr", "10.244.0.0/16"], "10.244.1.0/24", true),
            // The client is inside this cluster CIDR: local, not masqueraded.
            (&["--cluster-cidr", "192.168.100.0/24"], "10.244.1.0/24", false),
            (&["--masquerade-all"], "10.244.1.0/24", true),
            (&["--detect-local-mode=NodeCIDR"], "10.244.1.0/24", true),
            (&["--detect-local-mode=NodeCIDR"], "192.168.100.0/24", false),
            // The client's packets arrive on eth0.
            (
                &["--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=eth"],
                "10.244.1.0/24",
                false,
            ),
            (
                &["--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=veth"],
                "10.244.1.0/24",
                true,
            ),
            (
                &["--detect-local-mode=BridgeInterface", "--pod-bridge-interface=cni0"],
                "10.244.1.0/24",
                true,
            ),
        ];
        for (flags, pod_cidr, masqueraded) in variants {
            kpr_lab::write_manifest(
                &dir.join("node.yaml"),
                &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nspec: {{podCIDR: {pod_cidr}, podCIDRs: [{pod_cidr}]}}\nstatus:\n  addresses: [{{type: InternalIP, address: 192.168.100.11}}]\n"),
            );
            let mut args = vec!["--hostname-override", "node1", "--devices", "eth0"];
            args.extend(mode.args());
            args.extend(flags);
            let mut kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &args).expect("kpr start");
            kpr.wait_for_frontend("10.96.5.1:80/tcp", "the ClusterIP", |f| f.backends.len() == 3)
                .unwrap();
            if let Err(e) = lab.wait_until_reaching(&ext, target, &all) {
                panic!("{flags:?} (pod CIDR {pod_cidr}): {e}\n{}", kpr.log());
            }
            let r = lab.tcp_spread(&ext, target, 30).unwrap();
            assert_eq!(r.errors, 0, "{flags:?} (pod CIDR {pod_cidr}): {r:?}");
            if mode == ProxyMode::Ebpf {
                // Translated by the tc program (nothing else in this mode could).
                let translated = kpr.counters_now().unwrap()["tc_translated"];
                assert!(translated >= 30, "{flags:?}: tc_translated {translated}");
            }
            let seen: Vec<&String> = r.clients.keys().collect();
            if masqueraded {
                assert!(
                    !seen.iter().any(|c| c.starts_with(CLIENT)),
                    "{flags:?} (pod CIDR {pod_cidr}): not masqueraded: {r:?}"
                );
            } else {
                assert!(
                    seen.iter().all(|c| c.starts_with(CLIENT)),
                    "{flags:?} (pod CIDR {pod_cidr}): masqueraded: {r:?}"
                );
            }
            drop(kpr);
        }
    }
}

per_mode! {
    /// A sandboxed runtime's guest (Kata, gVisor, KubeVirt) sends from its own kernel: no
    /// socket of the node's connects, so nothing translates at connect(), and its packets to a
    /// ClusterIP arrive on the pod's device on the node. kube-proxy translates them in
    /// PREROUTING; the eBPF mode does on that device when `--devices` names it (here the
    /// pattern `vp+`, every pod device of the lab). The guest is a client pod's namespace
    /// whose processes are outside the node's cgroup.
    fn clusterip_traffic_of_a_sandboxed_pod_is_translated_on_its_device(mode) {
        let tag = format!("rsbx-{}", mode.name());
        let (lab, dir) = kpr_lab::external_client_lab(&tag, SERVICE);
        let guest = kpr_lab::Pod {
            role: kpr_lab::PodRole::External,
            ..lab.clients()[0].clone()
        };
        let mut args = vec!["--hostname-override", "node1", "--devices", "eth0,vp+"];
        args.extend(mode.args());
        let mut kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &args).expect("kpr start");
        kpr.wait_for_frontend("10.96.5.1:80/tcp", "the ClusterIP", |f| f.backends.len() == 3)
            .unwrap();
        let target: SocketAddr = "10.96.5.1:80".parse().unwrap();
        let all: BTreeSet<String> = ["be1", "be2", "be3"].iter().map(|s| s.to_string()).collect();
        if let Err(e) = lab.wait_until_reaching(&guest, target, &all) {
            panic!("{e}\n{}", kpr.log());
        }
        if mode == ProxyMode::Ebpf {
            let c = kpr.counters_now().unwrap();
            assert!(c["tc_translated"] >= 30, "{c:?}");
            // Not the socket programs: the guest's connections never met them.
            assert_eq!(c["translated"], 0, "{c:?}");
        }
    }
}

per_mode! {
    /// The same over IPv6, with dual-stack `--cluster-cidr` pairs and Nodes with a pod CIDR of
    /// each family: each family's detector uses its own CIDR.
    fn ipv6_clusterip_traffic_routed_to_the_node_is_masqueraded_by_its_familys_detector(mode) {
        const CLIENT6: &str = "fd00:192:168:100::64";
        let service = SERVICE
            .replace(
                "  clusterIP: 10.96.5.1\n",
                "  clusterIP: \"fd00:10:96::5:1\"\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n",
            )
            .replace("addressType: IPv4", "addressType: IPv6")
            .replace("[10.244.1.11]", "[\"fd00:10:244:1::b\"]")
            .replace("[10.244.1.12]", "[\"fd00:10:244:1::c\"]")
            .replace("[10.244.1.13]", "[\"fd00:10:244:1::d\"]");
        let tag = format!("rcip6-{}", mode.name());
        let (lab, dir) = kpr_lab::external_client_lab(&tag, &service);
        lab.route_external_via("fd00:10:96::/64", "fd00:192:168:100::b")
            .expect("route to the ClusterIPs");
        let ext = lab.external_client().unwrap().clone();
        let target: SocketAddr = "[fd00:10:96::5:1]:80".parse().unwrap();
        let all: BTreeSet<String> = ["be1", "be2", "be3"].iter().map(|s| s.to_string()).collect();
        let pods = "10.244.1.0/24, \"fd00:10:244:1::/64\"";
        let fabric = "10.244.1.0/24, \"fd00:192:168:100::/64\"";
        // (flags, the Node's pod CIDRs, masqueraded)
        let variants: [(&[&str], &str, bool); 5] = [
            (&[], pods, false),
            (&["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48"], pods, true),
            // The client is inside the IPv6 cluster CIDR: local, not masqueraded.
            (&["--cluster-cidr", "10.244.0.0/16,fd00:192:168:100::/64"], pods, false),
            (&["--detect-local-mode=NodeCIDR"], pods, true),
            (&["--detect-local-mode=NodeCIDR"], fabric, false),
        ];
        for (flags, pod_cidrs, masqueraded) in variants {
            kpr_lab::write_manifest(
                &dir.join("node.yaml"),
                &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nspec: {{podCIDR: 10.244.1.0/24, podCIDRs: [{pod_cidrs}]}}\nstatus:\n  addresses: [{{type: InternalIP, address: 192.168.100.11}}, {{type: InternalIP, address: \"fd00:192:168:100::b\"}}]\n"),
            );
            let mut args = vec!["--hostname-override", "node1", "--devices", "eth0"];
            args.extend(mode.args());
            args.extend(flags);
            let mut kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &args).expect("kpr start");
            kpr.wait_for_frontend("[fd00:10:96::5:1]:80/tcp", "the ClusterIP", |f| {
                f.backends.len() == 3
            })
            .unwrap();
            if let Err(e) = lab.wait_until_reaching(&ext, target, &all) {
                panic!("{flags:?} (pod CIDRs {pod_cidrs}): {e}\n{}", kpr.log());
            }
            let r = lab.tcp_spread(&ext, target, 30).unwrap();
            assert_eq!(r.errors, 0, "{flags:?} (pod CIDRs {pod_cidrs}): {r:?}");
            let seen: Vec<&String> = r.clients.keys().collect();
            if masqueraded {
                assert!(
                    !seen.iter().any(|c| c.as_str() == CLIENT6),
                    "{flags:?} (pod CIDRs {pod_cidrs}): not masqueraded: {r:?}"
                );
            } else {
                assert!(
                    seen.iter().all(|c| c.as_str() == CLIENT6),
                    "{flags:?} (pod CIDRs {pod_cidrs}): masqueraded: {r:?}"
                );
            }
            drop(kpr);
        }
    }
}
