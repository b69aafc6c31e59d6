//! Topology hints (issue 10, item 6): two nodes in two zones, a Service whose endpoints carry
//! zone hints (as the EndpointSlice controller writes them for trafficDistribution
//! PreferClose / PreferSameZone). Each node's clients reach only their zone's endpoints, in
//! every mode; an endpoint without hints turns them off, as in kube-proxy.
//!
//! Lab: node1 (zone-a) with two backends and a client; node2 (zone-b) with one of each.

use std::collections::BTreeSet;
use std::time::Duration;

use kpr_lab::kpr::{kpr_path, Kpr};
use kpr_lab::{per_mode, write_manifest, Lab, LabSpec};

fn manifests(lab: &Lab, hint_every_endpoint: bool) -> String {
    let mut y = String::new();
    for (n, zone) in [(1, "zone-a"), (2, "zone-b")] {
        let ip = lab.node(n).unwrap().fabric_ip;
        y += &format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node{n}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}]\n---\n"
        );
    }
    y += "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec:\n  clusterIP: 10.96.0.10\n  trafficDistribution: PreferClose\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\n";
    y += "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: ns\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n";
    for (i, be) in lab.backends().iter().enumerate() {
        let zone = if be.node == 1 { "zone-a" } else { "zone-b" };
        // The last endpoint loses its hints in the second half of the test.
        let hints = if hint_every_endpoint || i + 1 < lab.backends().len() {
            format!(", hints: {{forZones: [{{name: {zone}}}]}}")
        } else {
            String::new()
        };
        y += &format!(
            "  - {{addresses: [{}], conditions: {{ready: true}}, nodeName: node{}{hints}}}\n",
            be.ip, be.node
        );
    }
    y
}

/// The backends `client` (a pod name) reaches through the ClusterIP in 30 connections.
fn reached(lab: &Lab, client: &str) -> BTreeSet<String> {
    let pod = lab
        .clients()
        .iter()
        .find(|p| p.name == client)
        .unwrap()
        .clone();
    let r = lab
        .tcp_spread(&pod, "10.96.0.10:80".parse().unwrap(), 30)
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    r.counts.keys().cloned().collect()
}

per_mode! {
    fn zone_hints_keep_each_nodes_clients_in_its_zone(mode) {
        kpr_lab::require_lab("topology");
        let lab = Lab::up(LabSpec {
            prefix: Lab::unique_prefix("topo"),
            nodes: 2,
            backends_per_node: vec![2, 1],
            clients_per_node: vec![1, 1],
            ..LabSpec::default()
        })
        .expect("lab up");
        let dir = lab.manifest_dir().unwrap();
        write_manifest(&dir.join("all.yaml"), &manifests(&lab, true));
        let mut kprs = Vec::new();
        for n in 1..=2 {
            let node = format!("node{n}");
            let mut args = vec!["--manifests", dir.to_str().unwrap(), "--hostname-override", &node,
                                "--healthz-bind-address", "127.0.0.1:10256"];
            args.extend(mode.args());
            let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
            let mut k = Kpr::start_on(&lab, n, &kpr_path(), "kpr", &args).expect("kpr start");
            k.wait_for_syncs(1, Duration::from_secs(30)).expect("first sync");
            kprs.push(k);
        }
        let clients: Vec<String> = lab.clients().iter().map(|p| p.name.clone()).collect();
        let names = |n: usize| -> BTreeSet<String> {
            lab.backends_on(n).iter().map(|p| p.name.clone()).collect()
        };
        let (zone_a, zone_b) = (names(1), names(2));
        assert_eq!(reached(&lab, &clients[0]), zone_a, "node1's client (zone-a)");
        assert_eq!(reached(&lab, &clients[1]), zone_b, "node2's client (zone-b)");

        // One endpoint without hints: kube-proxy ignores the hints, every endpoint serves.
        // Each node's kpr picks the change up on its own.
        write_manifest(&dir.join("all.yaml"), &manifests(&lab, false));
        let all: BTreeSet<String> = zone_a.union(&zone_b).cloned().collect();
        for (client, kpr) in lab.clients().iter().zip(&kprs) {
            let target = "10.96.0.10:80".parse().unwrap();
            if let Err(e) = lab.wait_until_reaching(client, target, &all) {
                panic!("{e}\n{}", kpr.log());
            }
        }
    }
}
