//! `kpr cleanup` after the agent stopped leaves nothing of kpr behind on the node: no nftables
//! table, no program on the cgroup, no pinned map. In the lab, with the real binary.

use kpr_lab::kpr::{kpr_path, Kpr};
use kpr_lab::{Lab, LabSpec};

const MANIFEST: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: demo\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints: []\n";

#[test]
fn cleanup_removes_the_table_programs_and_pins() {
    kpr_lab::require_lab("cleanup_lab");
    let lab = Lab::up(LabSpec {
        prefix: Lab::unique_prefix("clean"),
        ..LabSpec::default()
    })
    .expect("lab up");
    let dir = lab.manifest_dir().unwrap();
    std::fs::write(dir.join("svc.yaml"), MANIFEST).unwrap();
    let kpr = Kpr::start(&lab, &kpr_path(), &dir, "kpr", &[]).expect("kpr start");
    let pins = lab.bpffs_dir().join("kpr");
    let cgroup = lab.cgroup_dir().to_str().unwrap().to_string();

    // While kpr runs: its table (with the Service without endpoints in the reject set), its
    // programs on the lab's cgroup, its pins.
    let table = lab
        .exec_in_node(&["nft", "list", "table", "ip", "kpr"], None)
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.contains("10.96.0.10"), "{table}");
    let progs = lab
        .exec_in_node(&["bpftool", "cgroup", "show", &cgroup], None)
        .unwrap();
    let progs = String::from_utf8_lossy(&progs.stdout).to_string();
    assert!(progs.contains("kpr_connect4"), "{progs}");
    let pinned = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.starts_with("KPR_"))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(!pinned(&pins).is_empty());

    kpr.stop();
    let out = lab
        .exec_in_node(
            &[
                kpr_path().to_str().unwrap(),
                "cleanup",
                "--bpf-pin-dir",
                pins.to_str().unwrap(),
            ],
            None,
        )
        .expect("kpr cleanup");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));

    assert!(
        lab.exec_in_node(&["nft", "list", "table", "ip", "kpr"], None)
            .is_err(),
        "kpr's table is still there"
    );
    let progs = lab
        .exec_in_node(&["bpftool", "cgroup", "show", &cgroup], None)
        .unwrap();
    let progs = String::from_utf8_lossy(&progs.stdout).to_string();
    assert!(
        !progs.contains("kpr_"),
        "programs left on the cgroup: {progs}"
    );
    assert_eq!(pinned(&pins), Vec::<String>::new(), "pins left behind");
    // And the lab still tears down cleanly (checked by Drop).
}
