//! SCTP Services in every mode, on kernels with SCTP (the VM stage: the host kernel has none,
//! so these tests are ignored there). A two-node lab with an external client: an SCTP
//! ClusterIP from a pod, and its NodePort from outside on both nodes, reach every backend
//! (be1, be2 on node1, be3 on node2), over associations the backends answer.
//!
//! The eBPF mode serves SCTP through nftables rules in its tables `kpr-sctp` (see
//! `userspace/src/ebpf/sctp.rs`); the test also checks that the table is there.

use kpr_lab::kpr::{Kpr, ProxyMode};
use kpr_lab::SCTP_PORT;
use kpr_lab::{per_mode, Lab, LabSpec};

const CLUSTER_IP: &str = "10.96.1.9";
const NODE_PORT: u16 = 30090;

fn manifests() -> String {
    let mut y = String::new();
    for (n, ip) in [("node1", "192.168.100.11"), ("node2", "192.168.100.12")] {
        y += &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}]\n---\n");
    }
    y += &format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: sctp, namespace: ns}}\nspec:\n  type: NodePort\n  clusterIP: \"{CLUSTER_IP}\"\n  ports: [{{name: assoc, protocol: SCTP, port: 90, targetPort: {port}, nodePort: {NODE_PORT}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: sctp-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: sctp}}\naddressType: IPv4\nports: [{{name: assoc, protocol: SCTP, port: {port}}}]\nendpoints:\n",
        port = SCTP_PORT
    );
    for (ip, node) in [
        ("10.244.1.11", "node1"),
        ("10.244.1.12", "node1"),
        ("10.244.2.11", "node2"),
    ] {
        y += &format!(
            "  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {node}}}\n"
        );
    }
    y
}

per_mode! {
    #[ignore = "needs a kernel with SCTP: runs in the VM stage"]
    fn sctp_clusterip_and_nodeport_reach_all_backends(mode) {
        kpr_lab::require_lab("sctp");
        assert!(
            kpr_lab::tool::sctp_available(),
            "this kernel has no SCTP (modprobe sctp): run it in the VM stage (cargo xtask vm)"
        );
        let lab = Lab::up(LabSpec {
            prefix: Lab::unique_prefix("sctp"),
            nodes: 2,
            backends_per_node: vec![2, 1],
            clients_per_node: vec![1, 0],
            external_client: true,
            ..LabSpec::default()
        })
        .expect("lab up");
        let dir = lab.manifest_dir().unwrap();
        std::fs::write(dir.join("all.yaml"), manifests()).unwrap();
        let kprs = Kpr::start_on_every_node(&lab, &dir, mode).expect("kpr start");
        let logs = || kprs.iter().map(|k| k.log()).collect::<Vec<_>>().join("\n---\n");
        let client = lab.clients()[0].clone();
        let ext = lab.external_client().unwrap().clone();
        let cluster = format!("{CLUSTER_IP}:90").parse().unwrap();
        let r = lab.sctp_spread(&client, cluster, 60).unwrap();
        assert_eq!(r.errors, 0, "ClusterIP: {r:?}\n{}", logs());
        assert_eq!(r.counts.len(), 3, "ClusterIP reaches every backend: {r:?}");
        for node in ["192.168.100.11", "192.168.100.12"] {
            let target = format!("{node}:{NODE_PORT}").parse().unwrap();
            let r = lab.sctp_spread(&ext, target, 60).unwrap();
            assert_eq!(r.errors, 0, "NodePort on {node}: {r:?}\n{}", logs());
            assert_eq!(r.counts.len(), 3, "NodePort on {node} reaches every backend: {r:?}");
        }
        if mode == ProxyMode::Ebpf {
            // Served by the eBPF mode's SCTP table, which holds the NodePort.
            let out = lab
                .exec_in_node(&["nft", "list", "table", "ip", "kpr-sctp"], None)
                .unwrap();
            let table = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && table.contains(&NODE_PORT.to_string()),
                "table ip kpr-sctp: {table}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
